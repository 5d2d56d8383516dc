"""`pdserve scale`: change the pool sizes of a running `pdserve up`.

    pdserve scale --prefill 2 --decode 4      # set targets, wait until the pools match
    pdserve scale                             # print the pools and their targets

It writes ``PoolTargets`` into the deployment's control-plane store; the
``PoolScaler`` inside ``pdserve up`` starts or drains workers to match (see
``deploy/scaler.py``). The store is ``--store URL`` (the Redis URL given to
``pdserve up --redis-url``), or else the one the local ``pdserve up`` recorded in
``$PDSERVE_HOME/up.json``. With ``--wait`` (default) it returns once the registered,
non-draining workers of each role equal the targets and no worker is draining;
``--timeout`` bounds the wait (exit 1 if it passes).
"""

from __future__ import annotations

import argparse
import sys
import time

from pdserve.proto import pdserve_pb2 as pb

from .state import running_up
from .store import open_store

ROLE_NAMES = {pb.PREFILL: "prefill", pb.DECODE: "decode"}


def _nonnegative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill", type=_nonnegative, default=None, help="target number of prefill workers")
    p.add_argument("--decode", type=_nonnegative, default=None, help="target number of decode workers (>= 1)")
    p.add_argument("--store", default=None,
                   help="the deployment's control-plane store URL (default: the local `pdserve up`)")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="wait until the pools match the targets (default: yes)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait (default 900)")


def find_store_url(arg: str | None) -> str:
    return arg or running_up()["store_url"]


def pool_counts(store) -> dict[str, dict[str, int]]:
    """role -> {"serving": non-draining workers, "draining": draining ones}."""
    counts = {name: {"serving": 0, "draining": 0} for name in ROLE_NAMES.values()}
    for w in store.list_workers():
        name = ROLE_NAMES.get(w.role)
        if name is not None:
            counts[name]["draining" if w.draining else "serving"] += 1
    return counts


def describe(counts: dict[str, dict[str, int]], targets: pb.PoolTargets | None) -> str:
    parts = []
    for name in ("prefill", "decode"):
        c = counts[name]
        target = "?" if targets is None else getattr(targets, f"num_{name}")
        drain = f", {c['draining']} draining" if c["draining"] else ""
        parts.append(f"{name} {c['serving']}/{target}{drain}")
    return "  ".join(parts)


def run(args: argparse.Namespace) -> int:
    if args.decode == 0:
        raise ValueError("--decode must be >= 1: prefill workers alone cannot serve requests")
    store = open_store(find_store_url(args.store))
    try:
        targets = store.get_pool_targets()
        if args.prefill is None and args.decode is None:
            print(f"pools (serving/target): {describe(pool_counts(store), targets)}")
            return 0
        current = pool_counts(store)
        new = pb.PoolTargets(
            num_prefill=args.prefill if args.prefill is not None else (
                targets.num_prefill if targets else current["prefill"]["serving"]),
            num_decode=args.decode if args.decode is not None else (
                targets.num_decode if targets else current["decode"]["serving"]),
        )
        store.set_pool_targets(new)
        print(f"pdserve: targets set: prefill {new.num_prefill}, decode {new.num_decode}", flush=True)
        if not args.wait:
            return 0
        deadline = time.monotonic() + args.timeout
        last = None
        while True:
            counts = pool_counts(store)
            line = describe(counts, new)
            if line != last:
                print(f"pdserve:   {line}", flush=True)
                last = line
            if all(counts[n]["serving"] == getattr(new, f"num_{n}") and counts[n]["draining"] == 0
                   for n in ("prefill", "decode")):
                print("pdserve: pools match the targets", flush=True)
                return 0
            if time.monotonic() > deadline:
                print(f"pdserve: error: pools did not reach the targets within {args.timeout:g} s "
                      "(see the `pdserve up` log)", file=sys.stderr)
                return 1
            time.sleep(0.5)
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdserve scale")
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except ValueError as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
