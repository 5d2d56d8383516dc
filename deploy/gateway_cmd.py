"""``pdserve gateway``: one more OpenAI gateway on a running deployment.

Gateway replicas share the deployment's control-plane store and nothing else: each one
reads the registry, the workers' KV events and their Stats, publishes its own routing
decisions to the store (``pending`` KV events) and applies the others', so several
gateways route as one (docs/architecture.md, "Several gateways"). Put them behind any
load balancer; a replica that dies loses only its own in-flight requests.

    pdserve gateway [--store URL] [--model DIR] [--port 8001] [routing flags]

``--store`` and ``--model`` default to the local ``pdserve up``'s (``$PDSERVE_HOME/up.json``),
and the cluster secret to ``--cluster-secret-file``, else ``$PDSERVE_CLUSTER_SECRET[_FILE]``,
else the local ``pdserve up``'s ``$PDSERVE_HOME/cluster-secret``.
"""

from __future__ import annotations

import argparse
import sys

from .state import running_up


def add_routing_arguments(p: argparse.ArgumentParser) -> None:
    """The kv policy's deployment-level settings (``pdserve.router.cost``), shared by
    ``pdserve up`` and ``pdserve gateway``."""
    from pdserve.router.cost import CostWeights  # noqa: PLC0415 - keeps `pdserve --help` light

    d = CostWeights()
    g = p.add_argument_group("kv routing (see docs/architecture.md, 'Routing')")
    g.add_argument("--balance-abs-tokens", type=int, default=d.balance_abs_tokens,
                   help="prefill: queued tokens a worker may have above the least loaded one before its load "
                        f"counts against its prefix hits (default {d.balance_abs_tokens})")
    g.add_argument("--balance-rel", type=float, default=d.balance_rel,
                   help=f"prefill: ... and the ratio to the least loaded one it must exceed too (default {d.balance_rel})")
    g.add_argument("--decode-balance-abs-tokens", type=int, default=d.decode_balance_abs_tokens,
                   help="decode: the same over the decode load, KV tokens used + 256 per running request "
                        f"(default {d.decode_balance_abs_tokens})")
    g.add_argument("--decode-balance-rel", type=float, default=d.decode_balance_rel,
                   help=f"decode: its relative threshold (default {d.decode_balance_rel})")
    g.add_argument("--share-placements", action=argparse.BooleanOptionalAction, default=True,
                   help="publish routing decisions to the store and apply other gateways' (default: on)")


def routing_config(args: argparse.Namespace) -> dict:
    """GatewayConfig keyword arguments from :func:`add_routing_arguments`' flags."""
    return {"balance_abs_tokens": args.balance_abs_tokens, "balance_rel": args.balance_rel,
            "decode_balance_abs_tokens": args.decode_balance_abs_tokens,
            "decode_balance_rel": args.decode_balance_rel, "share_placements": args.share_placements}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None, help="the deployment's control-plane store URL (default: the local "
                                                 "`pdserve up`'s); a Redis password from $PDSERVE_REDIS_PASSWORD[_FILE]")
    p.add_argument("--model", default=None, help="the served model's directory: tokenizer, chat template "
                                                 "(default: the local `pdserve up`'s)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes "
                                                   "(default: $PDSERVE_API_KEY)")
    p.add_argument("--cluster-secret-file", default=None,
                   help="file holding the deployment's cluster secret (default: $PDSERVE_CLUSTER_SECRET[_FILE], "
                        "else the local `pdserve up`'s)")
    p.add_argument("--router-policy", default="kv", choices=["kv", "round_robin", "random", "least_loaded"])
    p.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json", "mistral"])
    p.add_argument("--reasoning-parser", default=None, choices=["qwen3", "deepseek_r1"])
    p.add_argument("--max-migrations", type=int, default=3)
    add_routing_arguments(p)


def config_from_args(args: argparse.Namespace):
    import os  # noqa: PLC0415

    from pdserve.proto import auth  # noqa: PLC0415
    from pdserve.router.gateway import GatewayConfig  # noqa: PLC0415

    from .credentials import client_secret  # noqa: PLC0415

    store, model = args.store, args.model
    if store is None or model is None:
        up = running_up()
        store = store or up["store_url"]
        model = model or up.get("model")
        if model is None:
            raise ValueError("the local `pdserve up` did not record its model; pass --model DIR")
    secret = auth.read_secret_file(args.cluster_secret_file) if args.cluster_secret_file else client_secret()
    return GatewayConfig(store_url=store, model_dir=model, served_model_name=args.served_model_name,
                         api_key=args.api_key or os.environ.get("PDSERVE_API_KEY") or None,
                         router_policy=args.router_policy, tool_call_parser=args.tool_call_parser,
                         reasoning_parser=args.reasoning_parser, max_migrations=args.max_migrations,
                         cluster_secret=secret, **routing_config(args))


def run(args: argparse.Namespace) -> int:
    from pdserve.router.app import serve  # noqa: PLC0415

    from .credentials import redact, warn_if_password_in_url  # noqa: PLC0415

    warn_if_password_in_url(args.store, "--store")
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"pdserve gateway: error: {e}", file=sys.stderr)
        return 2
    print(f"pdserve: gateway on http://{args.host}:{args.port}/v1 (store {redact(config.store_url)})",
          flush=True)
    serve(config, host=args.host, port=args.port)
    return 0
