"""Metric math of loadtest/metrics.py on hand-made records, checked against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.loadtest.metrics import RequestRecord, stats, summarize


def rec(i, start, ttft, e2e, n_out, itl=(), error=None, n_in=10):
    r = RequestRecord(request_id=i, session_id=i, turn=0, group_id=None, input_len=n_in, output_len=n_out,
                      start_s=start, end_s=start + (e2e if e2e is not None else 0.5), ttft_s=ttft, e2e_s=e2e,
                      itl_s=list(itl), num_prompt_tokens=n_in, num_output_tokens=n_out if error is None else 0,
                      error=error)
    return r


@pytest.fixture
def records():
    return [
        rec(0, 0.0, 0.10, 1.10, 11, itl=[0.1] * 10),         # TPOT 100 ms
        rec(1, 0.2, 0.30, 0.80, 6, itl=[0.05, 0.15, 0.1, 0.1, 0.1]),  # TPOT 100 ms
        rec(2, 0.5, 0.05, 0.05, 1),                            # one token: no TPOT, no ITL
        rec(3, 0.6, 0.20, 2.20, 5, itl=[0.5] * 4),            # TPOT 500 ms
        rec(4, 0.7, None, None, 5, error="http_500:server_error"),
        rec(5, 0.9, None, None, 5, error="timeout"),
        rec(6, 1.0, None, None, 5, error="timeout"),
    ]


def test_latency_statistics_match_numpy(records):
    s = summarize(records)
    ok = records[:4]
    ttft = np.array([r.ttft_s for r in ok]) * 1e3
    e2e = np.array([r.e2e_s for r in ok]) * 1e3
    for key, values in (("ttft_ms", ttft), ("e2e_ms", e2e)):
        assert s[key]["mean"] == pytest.approx(values.mean())
        for q in (50, 90, 95, 99):
            assert s[key][f"p{q}"] == pytest.approx(np.percentile(values, q))
    # ITL pools every gap of every completed request.
    gaps = np.array([g for r in ok for g in r.itl_s]) * 1e3
    assert s["itl_ms"]["p90"] == pytest.approx(np.percentile(gaps, 90))
    assert s["itl_ms"]["mean"] == pytest.approx(gaps.mean())


def test_tpot_excludes_single_token_outputs(records):
    s = summarize(records)
    tpots = np.array([100.0, 100.0, 500.0])  # request 2 (one token) is left out
    assert records[2].tpot_s is None
    assert records[0].tpot_s == pytest.approx(0.1)
    assert s["tpot_ms"]["mean"] == pytest.approx(tpots.mean())
    assert s["tpot_ms"]["p50"] == pytest.approx(np.percentile(tpots, 50))


def test_counts_throughput_and_errors(records):
    s = summarize(records)
    assert (s["num_requests"], s["num_completed"], s["num_errors"]) == (7, 4, 3)
    assert s["errors"] == {"http_500:server_error": 1, "timeout": 2}
    # First send at 0.0; last end: request 3 ends at 0.6 + 2.2 = 2.8.
    assert s["duration_s"] == pytest.approx(2.8)
    assert s["request_throughput"] == pytest.approx(4 / 2.8)
    assert s["output_throughput"] == pytest.approx((11 + 6 + 1 + 5) / 2.8)
    assert s["input_throughput"] == pytest.approx(40 / 2.8)


@pytest.mark.parametrize("slo, good_ids", [
    ({}, {0, 1, 2, 3}),                                    # no SLO: every completed request
    ({"slo_ttft_ms": 150}, {0, 2}),                        # TTFT 100, 300, 50, 200 ms
    ({"slo_tpot_ms": 200}, {0, 1, 2}),                     # request 2 has no TPOT: passes
    ({"slo_e2e_ms": 1000}, {1, 2}),                        # E2E 1100, 800, 50, 2200 ms
    ({"slo_ttft_ms": 350, "slo_tpot_ms": 200, "slo_e2e_ms": 1000}, {1, 2}),
    ({"slo_ttft_ms": 250, "slo_tpot_ms": 200, "slo_e2e_ms": 1000}, {2}),   # every SLO must hold
    ({"slo_ttft_ms": 100, "slo_e2e_ms": 1100}, {0, 2}),    # the bounds are inclusive
])
def test_goodput_and_attainment_per_slo(records, slo, good_ids):
    s = summarize(records, **slo)
    assert {r.request_id for r in records if r.meets(slo.get("slo_ttft_ms"), slo.get("slo_tpot_ms"),
                                                     slo.get("slo_e2e_ms"))} == good_ids
    assert s["goodput"] == pytest.approx(len(good_ids) / 2.8)
    assert s["slo_attainment"] == pytest.approx(len(good_ids) / 7)  # failed requests count against it


def test_duration_ends_at_the_last_completion(records):
    late = rec(7, 1.0, None, None, 5, error="cancelled_at_end")
    late.end_s = 9.0  # cancelled long after the last completion (2.8 s)
    assert summarize([*records, late])["duration_s"] == pytest.approx(2.8)
    only_failed = summarize([late])
    assert only_failed["duration_s"] == pytest.approx(8.0) and only_failed["request_throughput"] == 0.0


def test_empty_and_all_failed_runs():
    assert stats([]) == {"mean": None, "p50": None, "p90": None, "p95": None, "p99": None}
    s = summarize([rec(0, 0.0, None, None, 5, error="connection")])
    assert s["num_completed"] == 0 and s["request_throughput"] == 0.0 and s["ttft_ms"]["p99"] is None
    assert summarize([])["slo_attainment"] == 0.0


def test_jsonl_record_is_in_milliseconds(records):
    d = records[1].to_json()
    assert d["ttft_ms"] == pytest.approx(300.0) and d["e2e_ms"] == pytest.approx(800.0)
    assert d["tpot_ms"] == pytest.approx(100.0)
    assert d["itl_ms"] == pytest.approx([50.0, 150.0, 100.0, 100.0, 100.0])
