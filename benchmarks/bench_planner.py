"""Validate the planner's simulator against real deployments: measured vs simulated TTFT and TPOT.

    python benchmarks/bench_planner.py [--runs 1:1@0.5,1:1@1.0,2:1@1.0,1:2@1.0] [--input-len 320] [--output-len 32]
        [--num-requests 60] [--profile PATH] [--profile-out PATH] [--port 18500] [--threads 1]

1. ``pdserve up --prefill 1 --decode 1`` as a subprocess (``python -m pdserve.deploy.up``:
   the embedded tiny model, local Ray, embedded store), every worker pinned to
   ``--threads`` intra-op threads (OMP_NUM_THREADS / MKL_NUM_THREADS; Ray gives each
   worker actor one CPU), then ``pdserve plan profile``'s measurement on it (skipped
   with ``--profile``).
2. For each run ``P:D@RATE``: a fresh ``pdserve up --prefill P --decode D``, the load test
   (``pdserve.loadtest.run_loadtest``: fixed workload, Poisson arrivals at RATE req/s,
   exact prompt lengths from the model's tokenizer), and the simulator on the very same
   planned requests (``pdserve.loadtest.sim_workload.sim_requests``).
3. One table: measured and simulated TTFT p50 and TPOT p50 and the error of each, with
   the simulator's shared-host model (``ClusterConfig.shared_cpus`` = this machine's
   cores, and the colocation slowdowns the profile measured) and without it (every
   worker on its own device, as on a GPU cluster), and the 1-minute load average at
   the end of the run (other users of the machine disturb every figure).

Prints figures; asserts nothing. On a 2-core machine a deployment with more workers
than cores shares CPUs between workers, which the simulator does not model (it assumes
each worker owns its accelerator): expect the error to grow with the worker count.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from pdserve.loadtest import LoadTestConfig, run_loadtest
from pdserve.loadtest.profile import DeploymentInfo, Profile
from pdserve.loadtest.profile_run import ProfileRunConfig, run_profile
from pdserve.loadtest.sim_workload import sim_requests
from pdserve.loadtest.simulator import ClusterConfig, simulate


class Deployment:
    """``pdserve up`` as a child process; SIGINT stops everything it started."""

    def __init__(self, num_prefill: int, num_decode: int, port: int, threads: int) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        cmd = [sys.executable, "-m", "pdserve.deploy.up", "--prefill", str(num_prefill), "--decode", str(num_decode),
               "--port", str(port)]
        self.url = f"http://127.0.0.1:{port}"
        self.lines: list[str] = []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(ln.startswith("pdserve: serving") for ln in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("pdserve up did not start:\n" + "".join(self.lines[-30:]))
            time.sleep(0.5)
        while True:  # the gateway also needs to have seen both pools
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway never became ready")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start(num_prefill: int, num_decode: int, port: int, threads: int, attempts: int = 2) -> Deployment:
    """A ready deployment; a failed start (a local Ray that timed out on a busy machine) is retried."""
    for attempt in range(attempts):
        dep = Deployment(num_prefill, num_decode, port + 100 * attempt, threads)
        try:
            dep.wait_ready()
            return dep
        except RuntimeError as e:
            dep.stop()
            if attempt == attempts - 1:
                raise
            print(f"  pdserve up failed to start ({str(e).splitlines()[-1][:120]}); retrying", flush=True)
    raise AssertionError("unreachable")


def _parse_runs(text: str) -> list[tuple[int, int, float]]:
    runs = []
    for item in text.split(","):
        pools, _, rate = item.partition("@")
        p, _, d = pools.partition(":")
        runs.append((int(p), int(d), float(rate)))
    return runs


def _err(measured: float | None, simulated: float | None) -> str:
    if not measured or simulated is None:
        return "-"
    return f"{100 * (simulated - measured) / measured:+.1f}%"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="1:1@0.5,1:1@1.0,2:1@1.0,1:2@1.0", help="P:D@RATE,... (rate in requests/s)")
    ap.add_argument("--input-len", type=int, default=320)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--num-requests", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default=None, help="reuse this profile instead of measuring one")
    ap.add_argument("--profile-out", default="/tmp/pdserve-bench-profile.json")
    ap.add_argument("--port", type=int, default=18500)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per worker")
    args = ap.parse_args()
    runs = _parse_runs(args.runs)

    from pdserve.deploy.state import default_model_dir
    from pdserve.engine.tiny_model import ensure_tiny_model

    model_dir = str(ensure_tiny_model(default_model_dir()))
    if args.profile:
        profile = Profile.load(args.profile)
    else:
        dep = start(1, 1, args.port, args.threads)
        try:
            config = ProfileRunConfig(base_url=dep.url, prefill_lens=(256, 384, 512, 768, 1024), reps=5,
                                      decode_context_lens=(32, 512), decode_tokens=48)
            t0 = time.perf_counter()
            profile = run_profile(config, DeploymentInfo(model=model_dir), log=lambda m: print(f"  profile: {m}"))
            print(f"profiled 1P1D in {time.perf_counter() - t0:.0f} s -> {args.profile_out}")
            profile.save(args.profile_out)
        finally:
            dep.stop()
    f = profile.fit
    print(f"fit: iteration {1e3 * f.iteration_s:.2f} ms, prefill {1e6 * f.prefill_token_s:.1f} us/tok + "
          f"{1e9 * f.prefill_attn_s:.3f} ns/tok^2, decode {1e3 * f.decode_seq_s:.3f} ms/seq + "
          f"{1e6 * f.decode_ctx_s:.3f} us/ctx tok, overhead remote {1e3 * f.remote_overhead_s:.1f} ms, "
          f"local {1e3 * f.local_overhead_s:.1f} ms")

    rows = []
    for i, (num_prefill, num_decode, rate) in enumerate(runs):
        lt = LoadTestConfig(base_url="http://127.0.0.1:1", workload="fixed", input_len=args.input_len,
                            output_len=args.output_len, rate=rate, num_requests=args.num_requests,
                            tokenizer_dir=model_dir, seed=args.seed)
        requests = sim_requests(lt, profile.deployment.block_size)
        # The workers share this machine's processors: the simulator's shared-host model.
        sim = simulate(profile, ClusterConfig(num_prefill, num_decode, shared_cpus=os.cpu_count()), requests).summary
        own = simulate(profile, ClusterConfig(num_prefill, num_decode), requests).summary
        dep = start(num_prefill, num_decode, args.port + 1 + i, args.threads)
        try:
            lt = dataclasses.replace(lt, base_url=dep.url)
            measured = run_loadtest(lt).summary
            load = os.getloadavg()[0]
        finally:
            dep.stop()
        row = (f"{num_prefill}P{num_decode}D @ {rate:g}/s", measured["ttft_ms"]["p50"], sim["ttft_ms"]["p50"],
               measured["tpot_ms"]["p50"], sim["tpot_ms"]["p50"], own["ttft_ms"]["p50"], own["tpot_ms"]["p50"], load)
        rows.append(row)
        print(f"  {row[0]}: measured TTFT p50 {row[1]:.1f} ms TPOT p50 {row[3]:.1f} ms "
              f"({measured['num_completed']} completed, load average {load:.1f}); simulated {row[2]:.1f} / "
              f"{row[4]:.1f} ms (without the shared-host model {row[5]:.1f} / {row[6]:.1f})", flush=True)

    print(f"\nworkload: fixed {args.input_len} -> {args.output_len} tokens, {args.num_requests} requests, Poisson; "
          f"{args.threads} thread(s) per worker")
    print(f"{'config':<16} {'TTFT p50 meas':>13} {'sim':>8} {'err':>8} {'TPOT p50 meas':>13} {'sim':>7} {'err':>8}"
          f"  | own-device sim: {'TTFT':>7} {'err':>7} {'TPOT':>6} {'err':>7} | load avg")
    for name, mt, st, mp, sp, ot, op, load in rows:
        print(f"{name:<16} {mt:13.1f} {st:8.1f} {_err(mt, st):>8} {mp:13.2f} {sp:7.2f} {_err(mp, sp):>8}"
              f"  | {'':15} {ot:7.1f} {_err(mt, ot):>7} {op:6.2f} {_err(mp, op):>7} | {load:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
