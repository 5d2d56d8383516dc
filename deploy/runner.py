"""Run one worker (prefill, decode or both) as a plain process.

    python -m pdserve.decode_worker --model DIR --store grpc://127.0.0.1:PORT [--port 0] ...
    python -m pdserve.prefill_worker --model DIR --store redis://127.0.0.1:6379 ...

Steps: build the engine and its KV transfer agent, start the gRPC server (with
grpc.health.v1), register the worker in the control-plane store (refused with a
clear error when incompatible), heartbeat within the TTL (re-registering if the
entry expired), and on SIGTERM/SIGINT drain (``deploy/drain.py``: marked draining,
finishes what it runs, refuses new work only once idle; a second signal stops at
once), stop serving, deregister and exit. Prints
``READY <worker_id> <host:port>`` once registered. Ray actors run the same
``serve`` coroutine (deploy launches them); nothing here needs Ray.

Authentication (``pdserve.proto.auth``, docs/security.md): with a cluster secret every
gRPC call to this worker needs a valid token (health checks excepted), and its own calls
(to a prefill worker, to a ``grpc://`` store) carry one. The secret comes from the Ray
launcher (``args.cluster_secret``, an actor argument), ``--cluster-secret-file`` or the
environment (``$PDSERVE_CLUSTER_SECRET[_FILE]``); never from a flag's value. Without one
the worker only serves on loopback. The KV transfer agents bind ``--host`` too
(``$PDSERVE_KV_HOST``), not every interface.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import logging
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.block_pool import BlockStored
from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig, parse_dtype
from pdserve.engine.engine import LLMEngine
from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto import PROTOCOL_VERSION, auth
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

from .drain import Activity, DrainPolicy, Shutdown, drain
from .store import ControlPlaneStore, open_store

log = logging.getLogger("pdserve.worker")

ROLES = {"prefill": pb.PREFILL, "decode": pb.DECODE, "both": pb.BOTH}
KV_LAYOUT = "layer,block,kv,head,token,dim"
#: ``KVLayout.layout`` per KV cache kind (``ModelConfig.cache_kind``). The string is a
#: registration compatibility field, so a prefill and a decode worker whose caches are of
#: different kinds are refused at registration, naming ``kv_layout.layout``.
KV_LAYOUTS = {"kv": KV_LAYOUT, "mla_latent": "mla_latent:layer,block,token,latent"}


def build_parser(role: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m pdserve.{role}_worker" if role else "pdserve worker")
    if role is None:
        ap.add_argument("--role", choices=sorted(ROLES), required=True)
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--store", required=True, help="control-plane store: redis://... or grpc://host:port")
    ap.add_argument("--worker-id", default=None, help="default: <role>-<random>")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    ap.add_argument("--port", type=int, default=0, help="gRPC port (0: any free port)")
    ap.add_argument("--cluster-secret-file", default=None,
                    help="file (mode 600) holding the cluster secret that authenticates internal gRPC calls "
                         "(default: $PDSERVE_CLUSTER_SECRET or $PDSERVE_CLUSTER_SECRET_FILE; required beyond loopback)")
    ap.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="where the model and KV cache live (auto: cuda when a GPU is visible, else cpu)")
    ap.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"],
                    help="auto: the Triton kernels on CUDA, pure torch on CPU")
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="capture decode steps in CUDA graphs (default: on with CUDA + Triton + TP 1)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--kv-cache-memory", type=int, default=512 << 20, help="KV bytes per rank when --num-kv-blocks is unset")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8_e4m3"],
                    help="auto: KV cache in --dtype; fp8_e4m3: float8 with per-layer scales (the checkpoint's, "
                         "else 1.0): half of bfloat16's bytes per block and per transfer")
    ap.add_argument("--kv-offload-memory", type=int, default=0,
                    help="host-memory KV tier per rank, bytes: evicted blocks are kept there and loaded back on a "
                         "prefix hit (default 0: none)")
    ap.add_argument("--kv-offload-dir", default=None,
                    help="disk KV tier below the host tier (needs --kv-offload-memory): blocks it evicts are kept "
                         "there as files, LRU, and survive a restart; one directory per worker")
    ap.add_argument("--kv-offload-dir-size", type=int, default=16 << 30, help="disk tier bytes per rank (default 16 GiB)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-waiting-requests", type=int, default=None,
                    help="refuse new Generate calls (RESOURCE_EXHAUSTED; the gateway tries another worker) while "
                         "this many requests wait to be scheduled (default: 4 x --max-num-seqs; 0: no limit)")
    ap.add_argument("--transfer-backend", default="nixl", choices=["nixl", "torch_dist"])
    ap.add_argument("--heartbeat-ttl", type=float, default=10.0, help="seconds a registration lives without heartbeat")
    ap.add_argument("--prefill-timeout", type=float, default=60.0, help="seconds for a remote prefill hop")
    ap.add_argument("--drain-grace", type=float, default=DrainPolicy.grace_s,
                    help="seconds a draining worker keeps accepting new calls (> the gateways' refresh interval)")
    ap.add_argument("--drain-timeout", type=float, default=DrainPolicy.timeout_s,
                    help="seconds a draining worker waits for its in-flight requests before stopping anyway")
    ap.add_argument("--metrics-port", type=int, default=None,
                    help="Prometheus /metrics port on --host (default: any free port; -1: disabled)")
    ap.add_argument("--kv-pool-master", default=None, metavar="HOST:PORT",
                    help="join the cluster-shared KV pool whose mooncake_master serves here (default: no pool)")
    ap.add_argument("--kv-pool-metadata", default="P2PHANDSHAKE",
                    help="transfer-engine metadata: P2PHANDSHAKE (no server) or an http:// / etcd:// URL")
    ap.add_argument("--kv-pool-protocol", default="tcp", choices=["tcp", "rdma"])
    ap.add_argument("--kv-pool-device", default="", help="RDMA NICs for the pool, e.g. mlx5_0,mlx5_1 (rdma only)")
    ap.add_argument("--kv-pool-segment-size", type=int, default=256 << 20,
                    help="host memory bytes this worker contributes to the pool (0: reads and writes, holds none)")
    ap.add_argument("--log-level", default="INFO")
    return ap


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one worker process runs with: its flags (``build_parser``; same names),
    validated once, plus the credentials no flag carries (the launcher's actor arguments,
    or the environment). ``WorkerConfig.from_args`` builds it from parsed flags."""

    model: str
    store: str
    worker_id: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    cluster_secret_file: str | None = None
    tensor_parallel_size: int = 1
    dtype: str = "float32"
    device: str = "auto"
    attention_backend: str = "auto"
    cuda_graphs: bool | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int = 512 << 20
    kv_cache_dtype: str = "auto"
    kv_offload_memory: int = 0
    kv_offload_dir: str | None = None
    kv_offload_dir_size: int = 16 << 30
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_waiting_requests: int | None = None
    transfer_backend: str = "nixl"
    heartbeat_ttl: float = 10.0
    prefill_timeout: float = 60.0
    drain_grace: float = DrainPolicy.grace_s
    drain_timeout: float = DrainPolicy.timeout_s
    metrics_port: int | None = None
    log_level: str = "INFO"
    kv_pool_master: str | None = None
    """The KV pool's master (``HOST:PORT``); None: this worker does not join a pool."""
    kv_pool_metadata: str = "P2PHANDSHAKE"
    kv_pool_protocol: str = "tcp"
    kv_pool_device: str = ""
    kv_pool_segment_size: int = 256 << 20
    role: str | None = None
    """Only for ``pdserve worker --role``; the role-specific entry points pass it to ``serve``."""
    cluster_secret: bytes | None = field(default=None, repr=False)
    """From the launcher (an actor argument), never a flag."""
    store_password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("port", "block_size", "max_num_batched_tokens", "max_num_seqs", "tensor_parallel_size"):
            value = getattr(self, name)
            if value < (0 if name == "port" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name == 'port' else 1}, got {value}")
        for name in ("heartbeat_ttl", "prefill_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 0:
            raise ValueError(f"--max-waiting-requests must be >= 0, got {self.max_waiting_requests}")
        self.kv_pool_config()  # validates the --kv-pool-* flags

    def kv_pool_config(self, local_hostname: str | None = None):
        """The ``KVPoolConfig`` the ``--kv-pool-*`` flags describe, or None without
        ``--kv-pool-master``. ``local_hostname``: where other workers reach this one's
        segment (its node IP; default ``--host``)."""
        if self.kv_pool_master is None:
            return None
        from pdserve.kvtransfer.kvpool import KVPoolConfig  # noqa: PLC0415

        return KVPoolConfig(master_address=self.kv_pool_master, metadata_server=self.kv_pool_metadata,
                            protocol=self.kv_pool_protocol, device_name=self.kv_pool_device,
                            local_hostname=local_hostname or self.host, segment_size=self.kv_pool_segment_size)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **credentials) -> WorkerConfig:
        """From ``build_parser(...).parse_args(...)``; ``credentials``: cluster_secret,
        store_password."""
        return cls(**{**vars(args), **credentials})


def model_identity(cfg: ModelConfig) -> pb.ModelIdentity:
    """Identify the weights by content of the config and the checkpoint's names and sizes."""
    d = Path(cfg.model_dir)
    h = hashlib.sha256((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return pb.ModelIdentity(name=d.name, architecture=cfg.architecture, weights_digest=h.hexdigest()[:32],
                            vocab_size=cfg.vocab_size)


def resolve_device(device: str) -> str:
    import torch  # noqa: PLC0415

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    return device


def engine_config(args: WorkerConfig) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig.from_dir(args.model),
        dtype=parse_dtype(args.dtype),
        device=resolve_device(args.device),
        attention_backend=args.attention_backend,
        cuda_graphs=args.cuda_graphs,
        cache=CacheConfig(args.block_size, args.num_kv_blocks, args.kv_cache_memory,
                          offload_memory_bytes=args.kv_offload_memory, offload_dir=args.kv_offload_dir,
                          offload_dir_bytes=args.kv_offload_dir_size, kv_cache_dtype=args.kv_cache_dtype,
                          # Every rank joins the pool with its own client; a master that does not
                          # answer at start is logged and the worker serves without the pool.
                          kv_pool=args.kv_pool_config()),
        scheduler=SchedulerConfig(args.max_num_batched_tokens, args.max_num_seqs),
        parallel=ParallelConfig(args.tensor_parallel_size),
    )


def worker_info(args: WorkerConfig, role: int, worker_id: str, address: str, engine: LLMEngine, endpoint: pb.TransferEndpoint) -> pb.WorkerInfo:
    cfg = engine.config
    m = cfg.model
    return pb.WorkerInfo(
        worker_id=worker_id, role=role, address=address, protocol_version=PROTOCOL_VERSION,
        model=model_identity(m),
        kv_layout=pb.KVLayout(layout=KV_LAYOUTS[m.cache_kind], num_layers=m.num_layers, num_kv_heads=m.num_kv_heads,
                              head_dim=m.head_dim, block_size=cfg.cache.block_size,
                              dtype=str(cfg.kv_dtype).removeprefix("torch."),
                              tp_size=cfg.parallel.tensor_parallel_size),
        transfer=endpoint, num_kv_blocks=engine.num_blocks, node_id=socket.gethostname(),
        started_at_ms=int(time.time() * 1000),
    )


class StorePeers:
    """Worker lookups for the services, through the (blocking) store client."""

    def __init__(self, store: ControlPlaneStore) -> None:
        self.store = store

    async def get(self, worker_id: str) -> pb.WorkerInfo | None:
        return await asyncio.to_thread(self.store.get_worker, worker_id)


async def serve(args: WorkerConfig, role_name: str, shutdown: Shutdown | None = None) -> None:
    """Serve until ``shutdown`` is requested (default: on SIGTERM/SIGINT)."""
    from pdserve.kvtransfer import worker as kvworker  # noqa: PLC0415 - transfer backends load on demand

    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # NIXL logs every agent creation at INFO
    role = ROLES[role_name]
    worker_id = args.worker_id or f"{role_name}-{uuid.uuid4().hex[:8]}"
    policy = DrainPolicy(args.drain_grace, args.drain_timeout)
    secret = cluster_secret(args)
    auth.require_secret_beyond_loopback(args.host, secret, f"the {role_name} worker")
    if not auth.is_loopback(args.host) and args.host not in ("", "0.0.0.0", "::"):
        os.environ.setdefault("PDSERVE_KV_HOST", args.host)  # the KV agents bind where the worker serves
    store = open_store(args.store, cluster_secret=secret, password=args.store_password)
    config = dataclasses.replace(
        engine_config(args),
        rank_extension=kvworker.EXTENSION,
        rank_extension_config=kvworker.extension_config(args.transfer_backend, worker_id),
    )
    engine = LLMEngine(config, Tokenizer.from_dir(args.model))
    transport = kvworker.EngineTransport(engine, args.transfer_backend)  # before the engine thread starts
    waiting = args.max_waiting_requests if args.max_waiting_requests is not None else 4 * args.max_num_seqs
    aengine = AsyncEngine(engine, asyncio.get_running_loop(), max_waiting_requests=waiting or None)
    transport.attach(aengine)
    peers = StorePeers(store)
    activity = Activity()
    # Auth first: a refused call never reaches the drain's in-flight count.
    server = grpc.aio.server(interceptors=[*auth.server_interceptors(secret, f"worker {worker_id}"), activity])
    services = {}
    if role in (pb.PREFILL, pb.BOTH):
        from pdserve.prefill_worker.service import PrefillService

        services["prefill"] = PrefillService(aengine, worker_id, peers, transport)
        pb_grpc.add_PrefillServicer_to_server(services["prefill"], server)
    if role in (pb.DECODE, pb.BOTH):
        from pdserve.decode_worker.service import DecodeService

        services["decode"] = DecodeService(aengine, worker_id, peers, transport, args.prefill_timeout,
                                           cluster_secret=secret)
        pb_grpc.add_DecodeServicer_to_server(services["decode"], server)
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    address = f"{args.host}:{port}"
    info = worker_info(args, role, worker_id, address, engine, transport.endpoint())
    metrics = None
    if args.metrics_port != -1:  # before registering: a taken port fails the start
        from .worker_metrics import WorkerMetrics  # noqa: PLC0415

        metrics = WorkerMetrics(worker_id, role_name, aengine, services)
        await metrics.start(args.host, args.metrics_port or 0)
        info.metrics_url = metrics.url
    await asyncio.to_thread(store.register, info, args.heartbeat_ttl)
    await _set_serving(health_servicer)
    print(f"READY {worker_id} {address}", flush=True)
    if metrics is not None:
        log.info("metrics at %s", metrics.url)
        print(f"METRICS {worker_id} {metrics.url}", flush=True)
    shutdown = shutdown or _shutdown_on_signals()
    beat = asyncio.create_task(_heartbeat(store, info, args.heartbeat_ttl))
    events = asyncio.create_task(_publish_kv_events(store, aengine, worker_id))

    async def mark_draining() -> None:
        info.draining = True  # the heartbeat's re-registrations keep the mark
        await _set_serving(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
        await asyncio.to_thread(store.register, info, args.heartbeat_ttl)

    try:
        await shutdown.requested.wait()
        if not shutdown.now.is_set():
            log.info("draining (grace %.1f s, timeout %.0f s)", policy.grace_s, policy.timeout_s)
            draining = asyncio.create_task(drain(activity, policy, mark_draining))
            stop_now = asyncio.create_task(shutdown.now.wait())
            await asyncio.wait([draining, stop_now], return_when=asyncio.FIRST_COMPLETED)
            draining.cancel()
            stop_now.cancel()
        activity.close()
    finally:
        beat.cancel()
        events.cancel()
        if metrics is not None:
            metrics.close()
        await server.stop(grace=2.0)
        if "decode" in services:
            await services["decode"].close()
        try:
            await asyncio.to_thread(store.deregister, worker_id)
        except Exception as e:  # noqa: BLE001 - the TTL removes the entry anyway
            log.warning("deregister failed: %s", e)
        transport.close()
        aengine.shutdown()
        store.close()


def cluster_secret(args: WorkerConfig) -> bytes | None:
    """The worker's secret: the launcher's (``args.cluster_secret``, never a flag), else
    ``--cluster-secret-file``'s, else the environment's, else None."""
    if args.cluster_secret is not None:
        return args.cluster_secret
    if args.cluster_secret_file:
        return auth.read_secret_file(args.cluster_secret_file)
    return auth.load_secret()


async def _set_serving(servicer, status=health_pb2.HealthCheckResponse.SERVING) -> None:
    result = servicer.set("", status)
    if asyncio.iscoroutine(result):
        await result


def _shutdown_on_signals() -> Shutdown:
    """The first SIGTERM/SIGINT drains; a second one stops at once."""
    shutdown = Shutdown()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shutdown.request)
    return shutdown


async def _heartbeat(store: ControlPlaneStore, info: pb.WorkerInfo, ttl_s: float) -> None:
    while True:
        await asyncio.sleep(ttl_s / 3)
        try:
            if not await asyncio.to_thread(store.heartbeat, info.worker_id, ttl_s):
                log.warning("registration of %s expired; registering again", info.worker_id)
                await asyncio.to_thread(store.register, info, ttl_s)
        except Exception as e:  # noqa: BLE001 - keep serving; the next beat retries
            log.warning("heartbeat failed: %s", e)


KV_TIERS = {"device": pb.KV_TIER_DEVICE, "host": pb.KV_TIER_HOST, "disk": pb.KV_TIER_DISK, "pool": pb.KV_TIER_POOL}


def kv_event_messages(worker_id: str, events) -> list[pb.KVEvent]:
    """Engine KV events as wire messages (the store assigns sequence numbers)."""
    out = []
    for ev in events:
        tier = KV_TIERS[ev.tier]
        if isinstance(ev, BlockStored):
            stored = pb.BlocksStored(block_hashes=ev.block_hashes, token_ids=ev.token_ids, block_size=ev.block_size,
                                     tier=tier)
            if ev.parent_block_hash is not None:
                stored.parent_block_hash = ev.parent_block_hash
            out.append(pb.KVEvent(worker_id=worker_id, stored=stored))
        else:
            out.append(pb.KVEvent(worker_id=worker_id, removed=pb.BlocksRemoved(block_hashes=ev.block_hashes,
                                                                                tier=tier)))
    return out


async def _publish_kv_events(store: ControlPlaneStore, aengine: AsyncEngine, worker_id: str,
                             interval_s: float = 0.1, max_pending: int = 100_000) -> None:
    """Publish what the prefix cache stored and evicted, for routers to index.

    Events that could not be published are retried with the next batch; past
    ``max_pending`` they are dropped and replaced by one AllBlocksCleared, so readers
    forget this worker's entries rather than trust an index with a hole in it.
    """
    pending: list[pb.KVEvent] = []
    while True:
        await asyncio.sleep(interval_s)
        pending += kv_event_messages(worker_id, await aengine.call(aengine.engine.kv.take_events))
        if len(pending) > max_pending:
            pending = [pb.KVEvent(worker_id=worker_id, cleared=pb.AllBlocksCleared())]
        if not pending:
            continue
        try:
            await asyncio.to_thread(store.publish_kv_events, worker_id, pending)
            pending = []
        except Exception as e:  # noqa: BLE001 - retried with the next batch
            log.warning("publishing %d KV events failed (will retry): %s", len(pending), e)


def main(role: str | None = None, argv: list[str] | None = None) -> int:
    try:
        args = WorkerConfig.from_args(build_parser(role).parse_args(argv))
    except ValueError as e:
        print(f"pdserve {role or 'worker'}: error: {e}", file=sys.stderr)
        return 2
    role = role or args.role
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
    from .credentials import warn_if_password_in_url  # noqa: PLC0415

    warn_if_password_in_url(args.store, "--store")
    try:
        asyncio.run(serve(args, role))
    except ValueError as e:  # bad configuration, incompatible registration
        print(f"pdserve {role} worker: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
