"""`pdserve up`: the whole cluster from one command.

1. The model: ``--model DIR``, or the embedded tiny model (written on first use).
2. The control-plane store: ``--redis-url``, or an embedded store served over gRPC
   from this process (single machine). With ``--kv-pool``, a KV pool master
   (``deploy/kvpool.py``) beside it; every worker gets its address (``--kv-pool-master``).
3. The workers: a ``ClusterSpec`` (``--spec FILE.yaml``, or the flags) launched as
   Ray actors on a local Ray, or on ``--ray-address``.
4. The OpenAI-compatible gateway on ``--host:--port`` (127.0.0.1:8000) until Ctrl-C
   or SIGTERM; then every worker stops, Ray shuts down and the store closes.
5. Meanwhile a :class:`~pdserve.deploy.scaler.PoolScaler` keeps the pools at the
   store's pool targets, which ``pdserve scale`` changes (live scaling), and replaces
   workers that die. How to reach this deployment (store and gateway URL) is recorded
   in ``$PDSERVE_HOME/up.json`` for ``pdserve scale``.

Every internal gRPC call is authenticated with one cluster secret (docs/security.md):
``--cluster-secret-file``, else ``$PDSERVE_CLUSTER_SECRET[_FILE]``, else a new one. It
goes to the store server and the gateway in this process and to the workers as Ray actor
arguments; a generated one is also left in ``$PDSERVE_HOME/cluster-secret`` (mode 0600)
for ``pdserve scale`` while this runs. The Redis password (``--redis-url``'s, or
``$PDSERVE_REDIS_PASSWORD[_FILE]``) reaches the workers the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from .cluster import ClusterSpec, PoolSpec
from .gateway_cmd import add_routing_arguments, routing_config

log = logging.getLogger("pdserve.up")


DEFAULT_POOL_HOST_TIER_BYTES = 1 << 30
"""Host tier per rank `pdserve up --kv-pool` gives workers whose spec names none."""


def pool_worker_args(extra_args: tuple[str, ...], master: str) -> tuple[str, ...]:
    """The worker arguments `pdserve up` adds for a KV pool at ``master``: its address, and
    a host tier of ``DEFAULT_POOL_HOST_TIER_BYTES`` unless ``extra_args`` name one (the
    pool fills the host tier; a worker refuses the pool without it)."""
    extra = ("--kv-pool-master", master)
    if not any(a.split("=", 1)[0] == "--kv-offload-memory" for a in extra_args):
        extra += ("--kv-offload-memory", str(DEFAULT_POOL_HOST_TIER_BYTES))
    return extra


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", help="cluster spec YAML (flags below override its model and pool sizes)")
    p.add_argument("--model", help="Hugging Face model directory (default: the embedded tiny model)")
    p.add_argument("--prefill", type=int, default=None, help="prefill workers (default 1)")
    p.add_argument("--decode", type=int, default=None, help="decode workers (default 1)")
    p.add_argument("--prefill-tp", type=int, default=None, help="tensor-parallel size of each prefill worker")
    p.add_argument("--decode-tp", type=int, default=None, help="tensor-parallel size of each decode worker")
    p.add_argument("--router-policy", default="kv", choices=["kv", "round_robin", "random", "least_loaded"])
    p.add_argument("--host", default="127.0.0.1", help="gateway address (default loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $PDSERVE_API_KEY)")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--redis-url", default=None,
                   help="Redis control-plane store, redis:// or rediss:// (TLS) (default: embedded); its password "
                        "from $PDSERVE_REDIS_PASSWORD_FILE or $PDSERVE_REDIS_PASSWORD, not the URL")
    p.add_argument("--cluster-secret-file", default=None,
                   help="file (mode 600) holding the secret that authenticates internal gRPC calls (default: "
                        "$PDSERVE_CLUSTER_SECRET or $PDSERVE_CLUSTER_SECRET_FILE, else a new random one)")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache bytes per worker rank")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--transfer-backend", default=None, choices=["nixl", "torch_dist"])
    p.add_argument("--local-cpus", type=int, default=None,
                   help="logical CPUs of the local Ray instance `up` starts (default: room for 4x the spec's "
                        "workers, so `pdserve scale` can grow the pools on one machine)")
    p.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json", "mistral"],
                   help="how tool_choice 'auto' finds calls in the output (default: hermes for the embedded tiny "
                        "model, whose template is hermes-style; none otherwise: only forced tool choices)")
    p.add_argument("--reasoning-parser", default=None, choices=["qwen3", "deepseek_r1"],
                   help="split <think>...</think> into reasoning_content (Qwen3, DeepSeek-R1)")
    p.add_argument("--max-migrations", type=int, default=3,
                   help="times the gateway resumes one completion on another decode worker after its stream "
                        "broke mid-way (the worker died or was stopped); past it the stream ends with an error")
    p.add_argument("--drain-timeout", type=float, default=600.0,
                   help="seconds a worker removed by `pdserve scale` may take to finish its requests")
    p.add_argument("--kv-pool", action="store_true",
                   help="start a KV pool master (mooncake_master, the kvpool extra) beside the store and give "
                        "its address to every worker (--kv-pool-master)")
    p.add_argument("--kv-pool-host", default="127.0.0.1",
                   help="address the --kv-pool master binds (default loopback; a private IP when workers run on "
                        "other nodes: it has no authentication, docs/security.md)")
    p.add_argument("--kv-pool-master", default=None, metavar="HOST:PORT",
                   help="an already running KV pool master to give the workers instead of starting one")
    add_routing_arguments(p)


def spec_from_args(args: argparse.Namespace, model: str) -> ClusterSpec:
    """The spec the flags describe, on top of ``--spec`` when given."""
    base = ClusterSpec.from_yaml(args.spec) if args.spec else ClusterSpec(
        model=model, pools=(PoolSpec("prefill"), PoolSpec("decode")), extra_args=("--log-level", "WARNING")
    )
    pools = []
    for pool in base.pools:
        count = {"prefill": args.prefill, "decode": args.decode}.get(pool.role)
        tp = {"prefill": args.prefill_tp, "decode": args.decode_tp}.get(pool.role)
        pools.append(dataclasses.replace(pool, count=pool.count if count is None else count,
                                         tp_size=pool.tp_size if tp is None else tp))
    overrides = {k: v for k, v in (("block_size", args.block_size), ("kv_cache_memory", args.kv_cache_memory),
                                   ("dtype", args.dtype), ("transfer_backend", args.transfer_backend)) if v is not None}
    if args.model or not args.spec:
        overrides["model"] = model
    return dataclasses.replace(base, pools=tuple(pools), **overrides)


def run(args: argparse.Namespace) -> int:
    from pdserve.router.app import GatewayConfig, serve

    from .credentials import LocalSecret, cluster_secret_for_up, strip_password, warn_if_password_in_url
    from .ray_launcher import RayLauncher
    from .state import clear_state, default_model_dir, write_state
    from .scaler import PoolScaler
    from .store import open_store
    from .store.embedded import ControlPlaneServer

    if args.model:
        model = args.model
    else:
        from pdserve.engine.tiny_model import ensure_tiny_model

        model = str(ensure_tiny_model(default_model_dir()))
        if args.tool_call_parser is None:
            args.tool_call_parser = "hermes"
    if args.api_key is None and os.environ.get("PDSERVE_API_KEY"):
        args.api_key = os.environ["PDSERVE_API_KEY"]  # keeps the key off the command line
    spec = spec_from_args(args, model)
    if not any(a.split("=", 1)[0] == "--drain-timeout" for a in spec.extra_args):
        spec = dataclasses.replace(spec, extra_args=spec.extra_args + ("--drain-timeout", f"{args.drain_timeout:g}"))
    warn_if_password_in_url(args.redis_url, "--redis-url")
    secret, generated = cluster_secret_for_up(args.cluster_secret_file)
    server = kv_master = None
    if args.kv_pool and args.kv_pool_master:
        raise SystemExit("pdserve up: --kv-pool starts a master; --kv-pool-master names a running one: pick one")
    if args.redis_url:
        store_url = args.redis_url
    else:
        server = ControlPlaneServer(cluster_secret=secret)
        server.start()
        store_url = server.url
    local_secret = LocalSecret(secret) if generated else None  # for `pdserve scale` on this machine
    launcher = scaler = store = None
    try:
        if args.kv_pool:
            from .kvpool import MasterProcess

            kv_master = MasterProcess(host=args.kv_pool_host).start()
            args.kv_pool_master = kv_master.address
            print(f"pdserve: KV pool master at {kv_master.address}", flush=True)
        if args.kv_pool_master:
            extra = pool_worker_args(spec.extra_args, args.kv_pool_master)
            if "--kv-offload-memory" in extra:
                print(f"pdserve: KV pool: workers get a host tier of {DEFAULT_POOL_HOST_TIER_BYTES >> 20} MiB "
                      "(--kv-offload-memory in the spec's extra_args sets another)", flush=True)
            spec = dataclasses.replace(spec, extra_args=spec.extra_args + extra)
        print(f"pdserve: starting {spec.num_workers()} workers for {spec.model} ...", flush=True)
        local_cpus = None
        if not args.ray_address:
            needed = int(-(-spec.total_resources().get("CPU", 0) // 1))
            local_cpus = args.local_cpus or max(os.cpu_count() or 1, 4 * needed)
        launcher = RayLauncher(spec, store_url, args.ray_address, num_cpus=local_cpus, cluster_secret=secret)
        for w in launcher.launch():
            print(f"pdserve:   {w.role:<8} {w.worker_id:<12} {w.address}", flush=True)
        url = f"http://{args.host}:{args.port}"
        auth = f' -H "Authorization: Bearer {args.api_key}"' if args.api_key else ""
        name = Path(spec.model).name
        print(f"pdserve: serving {name} at {url}/v1  (Ctrl-C stops everything)", flush=True)
        print(f"pdserve: try: curl {url}/v1/completions -H 'Content-Type: application/json'{auth} "
              f"-d '{{\"model\": \"{name}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'", flush=True)
        store = open_store(store_url, cluster_secret=secret)
        scaler = PoolScaler(launcher, store, spec, drain_timeout_s=args.drain_timeout)
        scaler.publish_spec_targets()
        scaler.start()
        write_state(strip_password(store_url), url, model=str(Path(spec.model).resolve()))
        config = GatewayConfig(store_url=store_url, model_dir=spec.model, served_model_name=name,
                               api_key=args.api_key, router_policy=args.router_policy,
                               max_migrations=args.max_migrations, cluster_secret=secret,
                               tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
                               **routing_config(args))
        serve(config, host=args.host, port=args.port)
    finally:
        print("pdserve: stopping ...", flush=True)
        clear_state()
        if scaler is not None:
            scaler.stop()
        if store is not None:
            store.close()
        if launcher is not None:
            launcher.shutdown()
        if server is not None:
            server.stop()
        if kv_master is not None:
            kv_master.stop()
        if local_secret is not None:
            local_secret.remove()
        print("pdserve: stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdserve up")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
