"""Chaos soak: workers SIGKILLed under a mixed streaming load; no client sees a fault.

`pdserve up` with 2 prefill + 2 decode workers of the tiny model (NIXL); four client
threads stream chat completions back to back (greedy and seeded sampling, n = 1 and 2,
logprobs on some, prompts that prefill locally and prompts that take the prefill pool);
after a fault-free baseline a worker is SIGKILLed every 10 s, decode and prefill in
turn, four times, and the PoolScaler replaces each. Then (``soak_run.SoakReport.problems``):

- every request completed intact, equal to the offline ``LLM`` (text, every token's
  string and logprob where asked, token counts), or failed with a clear error before its
  first token; none failed after content or broke without a clear error;
- every victim was replaced, and once the load stopped every registered worker's Stats
  show all KV blocks free, nothing running or waiting;
- completion tokens per second were back to 70% of the baseline within 30 s of the last
  kill;
- `pdserve up` stopped cleanly on Ctrl-C.

``benchmarks/bench_soak.py`` runs the same harness for minutes and prints its counts.
"""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from soak_run import SoakConfig, run_soak  # noqa: E402

pytestmark = [pytest.mark.soak, pytest.mark.integration]


def test_workers_killed_under_load_lose_no_token(tmp_path):
    report = run_soak(SoakConfig(warmup_s=5, baseline_s=12, kill_every_s=10, num_kills=4), tmp_path / "home",
                      log=lambda m: None)
    print(report.format())
    problems = report.problems()
    assert not problems, "\n".join(problems) + "\n" + report.format()
    # The kills hit work: streams were resumed elsewhere (two decode workers died under load).
    assert report.migrations["resumed"] >= 1, report.format()
