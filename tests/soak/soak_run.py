"""One chaos soak, start to finish: the harness ``tests/soak/test_chaos.py`` and
``benchmarks/bench_soak.py`` share.

1. ``pdserve up`` (2 prefill + 2 decode workers of the tiny model, NIXL), as a user runs
   it; while it starts, the offline ``LLM`` answers every spec (checked to see the same
   prompt tokens as the gateway).
2. The load (``soak_load.Load``): a few client threads streaming the mixed chat specs.
3. Baseline: completion tokens per second the clients receive over a window with no fault.
4. Chaos (``soak_cluster.Chaos``): a SIGKILL every ``kill_every_s``, decode and prefill in
   turn, ``num_kills`` times or for ``duration_s``; the PoolScaler replaces each victim.
5. Recovery: from the last kill, the first window of ``window_s`` (wholly after it) whose
   rate is at least ``recovery_ratio`` of the baseline; it must end within
   ``recovery_limit_s`` of the kill. The load runs until then and every victim is replaced.
6. Settle: the load stops; every killed worker's registration lapses, and every
   registered worker's Stats must show all KV blocks free, nothing running or waiting.
7. ``pdserve up`` stops (Ctrl-C); each completed request must equal its spec's offline
   answer (``soak_load.compare``; a greedy near-tie is reported, not failed).

:class:`SoakReport` holds the counts and ``problems()``: the pass conditions violated.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

from soak_cluster import Chaos, Kill, UpCluster
from soak_load import Load, RequestSpec, build_specs, compare

DISAGG_THRESHOLD = 256
"""The gateway's default ``disagg_threshold_tokens``: long specs must exceed it."""


@dataclass(frozen=True)
class SoakConfig:
    num_clients: int = 4
    warmup_s: float = 5.0
    """Load before the baseline window (the workers' first requests are slower)."""
    baseline_s: float = 12.0
    kill_every_s: float = 12.0
    num_kills: int | None = 4
    """Kills, or None: kill until ``duration_s`` of chaos has passed."""
    duration_s: float | None = None
    window_s: float = 5.0
    recovery_ratio: float = 0.7
    recovery_limit_s: float = 30.0
    settle_timeout_s: float = 90.0
    """Load stopped -> every pool idle. Longer than a NIXL lease (the hop's 60 s + 5 s): a
    prefill worker killed while writing leaves its destination blocks quarantined that long."""
    num_spec_rounds: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.num_kills is None) == (self.duration_s is None):
            raise ValueError(f"set num_kills ({self.num_kills}) or duration_s ({self.duration_s}), not both")


@dataclass
class SoakReport:
    config: SoakConfig
    outcomes: Counter = field(default_factory=Counter)
    """Requests by kind (completed, failed_before_content, failed_after_content, broken)."""
    errors_before_content: Counter = field(default_factory=Counter)
    bad_requests: list[str] = field(default_factory=list)
    """Requests that failed after content, broke, or completed wrong (first few, in detail)."""
    num_mismatched: int = 0
    near_ties: list[str] = field(default_factory=list)
    """Greedy choices that left the reference at a near-tie (``soak_load.NEAR_TIE``): not failures."""
    migrations: dict[str, float] = field(default_factory=dict)
    retries: float = 0.0
    kills: list[Kill] = field(default_factory=list)
    chaos_errors: list[str] = field(default_factory=list)
    baseline_tps: float = 0.0
    recovery_s: float | None = None
    recovered_tps: float = 0.0
    after_replacement_tps: float | None = None
    hops: dict[str, int] = field(default_factory=dict)
    """Remote prefills by outcome on the decode workers (each one's last Stats, killed ones included)."""
    leaks: list[str] = field(default_factory=list)
    num_leaked_blocks: int = 0
    settle_s: float | None = None
    final_workers: list[str] = field(default_factory=list)
    up_returncode: int | None = None
    up_log: str = ""
    """`pdserve up`'s stderr: the gateway's, scaler's and workers' logs."""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return sum(self.outcomes.values())

    def problems(self) -> list[str]:
        """The pass conditions this run violated (empty: it passed)."""
        c, out = self.config, []
        if self.outcomes["completed"] < 20:
            out.append(f"only {self.outcomes['completed']} requests completed")
        if self.num_mismatched:
            out.append(f"{self.num_mismatched} completed requests differ from the offline engine")
        for kind in ("failed_after_content", "broken"):
            if self.outcomes[kind]:
                out.append(f"{self.outcomes[kind]} requests {kind.replace('_', ' ')}")
        want_kills = c.num_kills if c.num_kills is not None else 1
        if len(self.kills) < want_kills or self.chaos_errors:
            out.append(f"{len(self.kills)} kills (wanted {want_kills}); chaos errors: {self.chaos_errors[:3]}")
        unreplaced = [k.worker_id for k in self.kills if k.replaced_at is None]
        if unreplaced:
            out.append(f"never replaced: {unreplaced}")
        if self.leaks:
            out.append(f"not idle after the load ({self.num_leaked_blocks} KV blocks held): {self.leaks}")
        if self.recovery_s is None or self.recovery_s > c.recovery_limit_s:
            out.append(f"throughput not back to {c.recovery_ratio:.0%} of the baseline ({self.baseline_tps:.1f} "
                       f"tok/s) within {c.recovery_limit_s:g} s of the last kill (recovery: {self.recovery_s})")
        if self.up_returncode != 0:
            out.append(f"pdserve up exited with {self.up_returncode}")
        return out

    def format(self) -> str:
        k = self.kills
        replace_s = [x.replaced_at - x.at for x in k if x.replaced_at is not None]
        lines = [
            f"requests: {self.num_requests} sent, {self.outcomes['completed']} completed intact "
            f"(of which {self.num_mismatched} differ from the reference, {len(self.near_ties)} left it at a "
            f"greedy near-tie), "
            f"{self.outcomes['failed_before_content']} failed before the first token "
            f"{dict(self.errors_before_content)}, {self.outcomes['failed_after_content']} failed after content, "
            f"{self.outcomes['broken']} broken",
            f"migrations: {self.migrations}; retries before the first token: {self.retries:g}",
            f"remote prefills on the decode workers: {self.hops}",
            f"workers killed: {len(k)} ({sum(x.role == 'decode' for x in k)} decode, "
            f"{sum(x.role == 'prefill' for x in k)} prefill; busy when killed: "
            f"{sum(x.num_requests > 0 or x.num_blocks_held > 0 for x in k)}, with {sum(x.num_requests for x in k)} "
            f"requests), replaced: {len(replace_s)}"
            + (f" in {min(replace_s):.1f}-{max(replace_s):.1f} s (mean {sum(replace_s) / len(replace_s):.1f} s)"
               if replace_s else ""),
            f"leaked KV blocks after settling: {self.num_leaked_blocks}; busy workers: {self.leaks or 'none'}; "
            f"settled in {self.settle_s if self.settle_s is None else round(self.settle_s, 1)} s; "
            f"workers at the end: {self.final_workers}",
            f"throughput: baseline {self.baseline_tps:.1f} tok/s; recovered to {self.recovered_tps:.1f} tok/s "
            f"({self.recovered_tps / max(self.baseline_tps, 1e-9):.2f}x) "
            f"{'never' if self.recovery_s is None else f'{self.recovery_s:.1f} s'} after the last kill"
            + (f"; {self.after_replacement_tps:.1f} tok/s in the window after its replacement registered"
               if self.after_replacement_tps is not None else ""),
            "timings: " + ", ".join(f"{name} {s:.1f} s" for name, s in self.timings.items()),
        ] + [f"bad request: {b}" for b in self.bad_requests[:10]] + [f"near-tie: {t}" for t in self.near_ties]
        return "\n".join(lines)


def tokenize(url: str, spec: RequestSpec) -> list[int]:
    r = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": spec.content}]}, timeout=30)
    r.raise_for_status()
    return r.json()["tokens"]


def references(model_dir: Path, specs: list[RequestSpec]) -> tuple[list[list[int]], list, Any]:
    """(prompt ids, the offline engine's RequestOutput per spec, the tokenizer)."""
    from pdserve.engine import LLM
    from pdserve.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model_dir)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": s.content}]) for s in specs]
    for s, p in zip(specs, prompts):
        if s.is_long != (len(p) > DISAGG_THRESHOLD):
            raise ValueError(f"spec {s.name}: {len(p)} prompt tokens, but is_long={s.is_long}")
    with LLM(model_dir) as llm:
        refs = llm.generate(prompts, [s.reference_params() for s in specs])
    return prompts, refs, tokenizer


def run_soak(config: SoakConfig, home: Path, log: Callable[[str], None] = print) -> SoakReport:
    from pdserve.engine.tiny_model import ensure_tiny_model

    report = SoakReport(config)
    t0 = time.monotonic()
    model_dir = ensure_tiny_model(home / "tiny-llama")  # where `pdserve up` looks for it
    cluster = UpCluster(home)
    load = chaos = None
    try:
        cluster.launch()
        # The offline answers while the workers start (the CPU is shared either way).
        specs = build_specs(config.num_spec_rounds, config.seed)
        prompts, refs, tokenizer = references(model_dir, specs)
        report.timings["reference"] = time.monotonic() - t0
        cluster.wait_serving()
        report.timings["startup"] = time.monotonic() - t0
        log(f"soak: pdserve up serving after {report.timings['startup']:.1f} s")
        for s, p in zip(specs, prompts):
            if tokenize(cluster.url, s) != p:
                raise ValueError(f"spec {s.name}: the gateway's prompt is not the reference's")

        t_load = time.monotonic()
        load = Load(cluster.url, model_dir.name, specs, config.num_clients)
        time.sleep(config.warmup_s)
        start = time.monotonic()
        time.sleep(config.baseline_s)
        report.baseline_tps = load.tokens_per_s(start, time.monotonic())
        log(f"soak: baseline {report.baseline_tps:.1f} tok/s; chaos starts")

        chaos = Chaos(cluster, config.kill_every_s, config.num_kills, seed=config.seed)
        chaos.start()
        chaos_start = time.monotonic()
        while not chaos.is_killing_done:
            if config.duration_s is not None and time.monotonic() - chaos_start >= config.duration_s:
                chaos.stop_killing()
            time.sleep(0.5)
        last = chaos.kills[-1].at if chaos.kills else time.monotonic()
        log(f"soak: {len(chaos.kills)} kills done; waiting for recovery")
        _wait_recovery(report, load, chaos, last)
        load.stop()
        report.timings["load"] = time.monotonic() - t_load
        chaos.stop()
        report.kills, report.chaos_errors = list(chaos.kills), list(chaos.errors)
        report.hops = _hop_counts(chaos.last_stats.values())

        report.migrations = {o: cluster.metric(f'pdserve_gateway_migrations_total{{outcome="{o}"')
                             for o in ("resumed", "exhausted", "no_workers")}
        report.retries = cluster.metric("pdserve_gateway_generate_retries_total")
        t_settle = time.monotonic()
        _settle(report, cluster, chaos.killed_ids(), config.settle_timeout_s)
        report.timings["settle"] = time.monotonic() - t_settle
    finally:
        if load is not None:
            load.stop()
        if chaos is not None:
            chaos.stop()
        t_stop = time.monotonic()
        report.up_returncode = cluster.stop()
        report.up_log = cluster.log_text
        report.timings["shutdown"] = time.monotonic() - t_stop
    _check_outcomes(report, load.outcomes, specs, prompts, refs, tokenizer, cluster.log_text)
    report.timings["total"] = time.monotonic() - t0
    return report


def _hop_counts(stats) -> dict[str, int]:
    """Remote prefills by outcome, and local fallbacks, over the decode workers' last Stats."""
    stats = list(stats)
    out = {name: sum(getattr(s.hop_outcomes, name) for s in stats)
           for name in ("done", "never_started", "transfer_failed", "aborted")}
    out["local_prefill_fallbacks"] = sum(s.local_prefill_fallbacks for s in stats)
    out["refused_transfers"] = sum(s.refused_transfers for s in stats)
    return out


def _wait_recovery(report: SoakReport, load: Load, chaos: Chaos, last: float) -> None:
    """Keep the load on until a window after the last kill reaches the recovery ratio and
    every victim is replaced (or the limits pass); record when it recovered."""
    c = report.config
    want = c.recovery_ratio * report.baseline_tps
    deadline = last + max(c.recovery_limit_s, 0) + c.window_s
    while True:
        now = time.monotonic()
        if report.recovery_s is None:
            t = last + c.window_s
            while t <= now:
                rate = load.tokens_per_s(t - c.window_s, t)
                if rate >= want:
                    report.recovery_s, report.recovered_tps = t - last, rate
                    break
                t += 0.5
        if report.recovery_s is not None and chaos.all_replaced():
            break
        if now > deadline and (chaos.all_replaced() or now > last + c.settle_timeout_s):
            break
        time.sleep(0.5)
    if chaos.kills and chaos.kills[-1].replaced_at is not None:
        r = chaos.kills[-1].replaced_at
        while time.monotonic() < r + c.window_s:
            time.sleep(0.2)
        report.after_replacement_tps = load.tokens_per_s(r, r + c.window_s)


def _settle(report: SoakReport, cluster: UpCluster, killed: set[str], timeout_s: float) -> None:
    """Wait until the killed workers' registrations lapsed and every registered worker is
    idle with all its KV blocks free; record what is still held at the deadline."""
    t0 = time.monotonic()
    while True:
        leaks, num_blocks, ids = [], 0, []
        for w in cluster.workers():
            ids.append(w.worker_id)
            if w.worker_id in killed:
                leaks.append(f"{w.worker_id} (killed) still registered")
                continue
            try:
                s = cluster.stats(w)
            except Exception as e:  # noqa: BLE001 - a live worker must answer
                leaks.append(f"{w.worker_id}: Stats failed: {e!r}")
                continue
            held = s.num_kv_blocks_total - s.num_kv_blocks_free
            if held or s.num_running or s.num_waiting or s.num_open_grammars:
                num_blocks += held
                leaks.append(f"{w.worker_id}: {held} blocks held, {s.num_running} running, {s.num_waiting} waiting")
        report.leaks, report.num_leaked_blocks, report.final_workers = leaks, num_blocks, sorted(ids)
        if not leaks:
            report.settle_s = time.monotonic() - t0
            return
        if time.monotonic() - t0 > timeout_s:
            return
        time.sleep(0.5)


def _check_outcomes(report: SoakReport, outcomes: list, specs: list[RequestSpec], prompts: list[list[int]],
                    refs: list, tokenizer: Any, up_log: str) -> None:
    for o in outcomes:
        report.outcomes[o.kind] += 1
        if o.kind == "failed_before_content":
            report.errors_before_content[o.error.split(":")[0]] += 1
            continue
        what = o.kind if o.kind != "completed" else None
        if o.kind == "completed":
            diff, near_ties = compare(o, specs[o.spec_index], refs[o.spec_index], len(prompts[o.spec_index]),
                                      tokenizer)
            report.near_ties += [f"{specs[o.spec_index].name} ({o.response_id}): {t}" for t in near_ties]
            if not diff:
                continue
            report.num_mismatched += 1
            what = "differs: " + "; ".join(diff)
        else:
            what += f": {o.error}"
        # What the gateway logged about it (a migration, a retry), by its request id.
        request_id = o.response_id.rsplit("-", 1)[-1]
        logged = [ln for ln in up_log.splitlines() if request_id and request_id in ln]
        report.bad_requests.append(f"{specs[o.spec_index].name} ({o.response_id or 'no id'}): {what}"
                                   + "".join(f"\n    log: {ln[:300]}" for ln in logged))
