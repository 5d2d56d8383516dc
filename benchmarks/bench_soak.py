"""The chaos soak of ``tests/soak/test_chaos.py``, run longer: `pdserve up` (2 prefill + 2
decode workers, tiny model, NIXL) under a mixed streaming chat load while a worker is
SIGKILLed every ``--kill-every`` seconds and the PoolScaler replaces it.

    python benchmarks/bench_soak.py [--duration 600] [--kill-every 20] [--clients 4]
        [--home DIR] [--seed 0] [--up-log FILE]

Prints the counts: requests completed (each checked against the offline engine), failed
before their first token, failed after content (must be 0), migrations (the gateway's
``pdserve_gateway_migrations_total``), workers killed and replaced, leaked KV blocks once
the load stopped, and how long throughput took to come back after the last kill. The
harness is ``tests/soak/soak_run.py``; exits 1 if a pass condition of the soak failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "soak"))

from soak_run import SoakConfig, run_soak  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of chaos (kills) after the baseline")
    ap.add_argument("--kill-every", type=float, default=20.0, help="seconds between kills")
    ap.add_argument("--clients", type=int, default=4, help="client threads streaming requests back to back")
    ap.add_argument("--baseline", type=float, default=20.0, help="seconds of the fault-free baseline window")
    ap.add_argument("--home", default=None, help="PDSERVE_HOME for this run (default: a temporary directory)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--up-log", default=None, help="write `pdserve up`'s stderr (gateway, scaler, workers) here")
    args = ap.parse_args()

    config = SoakConfig(num_clients=args.clients, baseline_s=args.baseline, kill_every_s=args.kill_every,
                        num_kills=None, duration_s=args.duration, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="pdserve-soak-") as tmp:
        home = Path(args.home) if args.home else Path(tmp) / "home"
        t0 = time.monotonic()
        report = run_soak(config, home, log=lambda m: print(m, flush=True))
    if args.up_log:
        Path(args.up_log).write_text(report.up_log)
    print(report.format())
    for k in report.kills:
        replaced = "never" if k.replaced_at is None else f"{k.replacement_id} after {k.replaced_at - k.at:.1f} s"
        print(f"  killed {k.worker_id:<11} pid {k.pid:<7} at +{k.at - t0:6.1f} s, {k.num_requests} requests "
              f"and {k.num_blocks_held} KV blocks on it; "
              f"replaced by {replaced}")
    problems = report.problems()
    print("PASS" if not problems else "FAIL:\n  " + "\n  ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
