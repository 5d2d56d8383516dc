"""The planner, the profile (fit, JSON, validation) and the `pdserve plan` command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pdserve.loadtest import plan_cli
from pdserve.loadtest.planner import candidate_configs, format_table, plan
from pdserve.loadtest.profile import (CostFit, DecodePoint, DeploymentInfo, PrefillPoint, Profile, fit_linear,
                                      fit_profile)
from pdserve.loadtest.profile_run import decode_window
from pdserve.loadtest.simulator import SLO, SimRequest

FIT = CostFit(iteration_s=0.004, prefill_token_s=2e-4, prefill_attn_s=2e-8, decode_seq_s=5e-4, decode_ctx_s=2e-7,
              remote_overhead_s=0.01, local_overhead_s=0.004)


def _poisson(num, rate, input_len, output_len, seed=0):
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1 / rate, num))
    return [SimRequest(i, float(t), input_len, output_len) for i, t in enumerate(times)]


# ------------------------------------------------------------------------------ planner


def test_candidates_respect_the_budget_and_cover_it():
    configs = candidate_configs(6, (1, 2))
    assert all(c.num_gpus <= 6 and c.num_prefill >= 1 and c.num_decode >= 1 for c in configs)
    expected = {(p, pt, d, dt) for pt in (1, 2) for dt in (1, 2) for p in range(1, 7) for d in range(1, 7)
                if p * pt + d * dt <= 6}
    assert {(c.num_prefill, c.prefill_tp, c.num_decode, c.decode_tp) for c in configs} == expected
    with pytest.raises(ValueError, match="budget"):
        candidate_configs(1, (1,))
    with pytest.raises(ValueError, match="tp sizes"):
        candidate_configs(4, (0, 1))


def test_table_lists_every_candidate_best_first():
    profile = Profile(DeploymentInfo(), FIT)
    result = plan(profile, _poisson(150, 4.0, 800, 32), 4, (1, 2), slo=SLO(ttft_ms=400, tpot_ms=40))
    rows = result.rows()
    assert len(rows) == len(candidate_configs(4, (1, 2)))
    assert {r["config"] for r in rows} == {c.label for c in candidate_configs(4, (1, 2))}
    assert all(r["num_gpus"] <= 4 for r in rows)
    per_gpu = [r["goodput_per_gpu"] for r in rows]
    # Sorted by goodput per GPU, up to the 1% tie band.
    assert all(a >= b * 0.99 - 1e-12 for a, b in zip(per_gpu, per_gpu[1:])) or per_gpu[0] == max(per_gpu)
    assert per_gpu[0] >= max(per_gpu) * 0.99
    table = format_table(rows)
    for r in rows:
        assert r["config"] in table
    assert result.to_json()["recommended"]["config"] == rows[0]["config"]


def test_prefill_heavy_workload_gets_more_prefill_gpus_than_decode_heavy():
    profile = Profile(DeploymentInfo(), FIT)
    slo = SLO(ttft_ms=600, tpot_ms=30)
    prefill_heavy = plan(profile, _poisson(120, 6.0, 1500, 4), 5, (1,), slo=slo).best.config
    decode_heavy = plan(profile, _poisson(120, 6.0, 300, 200), 5, (1,), slo=slo).best.config
    share = lambda c: c.num_prefill * c.prefill_tp / c.num_gpus  # noqa: E731
    assert share(prefill_heavy) > share(decode_heavy), (prefill_heavy.label, decode_heavy.label)


# ------------------------------------------------------------------------------ profile


def test_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    prefill = [PrefillPoint((n,), 0.014 + 2e-4 * n + 2e-8 * n * n) for n in (256, 384, 512, 768, 1024, 1536)]
    prefill += [PrefillPoint((512,) * k, 0.014 + 2e-4 * 512 * k + 2e-8 * 512 * 512 * k) for k in (2, 4)]
    decode = [DecodePoint(b, ctx, 0.004 + 5e-4 * b + 2e-7 * b * ctx) for b in (1, 2, 4, 8) for ctx in (40.0, 1050.0)]
    fit = fit_profile(DeploymentInfo(), prefill, decode, hop_s=0.006).fit
    assert fit.iteration_s == pytest.approx(0.004, rel=1e-6)
    assert fit.decode_seq_s == pytest.approx(5e-4, rel=1e-6)
    assert fit.decode_ctx_s == pytest.approx(2e-7, rel=1e-6)
    assert fit.prefill_token_s == pytest.approx(2e-4, rel=1e-6)
    assert fit.prefill_attn_s == pytest.approx(2e-8, rel=1e-6)
    assert fit.remote_overhead_s == pytest.approx(0.010, rel=1e-6)
    assert fit.local_overhead_s == pytest.approx(0.004, rel=1e-6)
    # With 1% multiplicative noise the linear terms stay within a few percent.
    noisy = [DecodePoint(p.batch_size, p.context_len, p.step_s * (1 + 0.01 * rng.standard_normal())) for p in decode]
    fit = fit_profile(DeploymentInfo(), prefill, noisy).fit
    assert fit.decode_seq_s == pytest.approx(5e-4, rel=0.15)
    assert fit.iteration_s == pytest.approx(0.004, rel=0.1)


def test_fit_never_returns_negative_costs():
    x = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    coef = fit_linear(x, np.array([3.0, 2.0, 1.0]))  # a falling line: the slope pins to 0
    assert coef[1] == 0.0 and coef[0] == pytest.approx(2.0)


def test_profile_json_round_trip(tmp_path):
    prefill = [PrefillPoint((n,), 0.02 + 1e-4 * n) for n in (256, 512, 1024)]
    decode = [DecodePoint(b, 100.0, 0.01 + 1e-3 * b) for b in (1, 2, 4)]
    dep = DeploymentInfo(num_prefill=2, num_decode=3, decode_tp=2, kv_blocks_per_decode_worker=999, model="m")
    profile = fit_profile(dep, prefill, decode, metadata={"url": "http://x"})
    path = tmp_path / "profile.json"
    profile.save(path)
    loaded = Profile.load(path)
    assert loaded.deployment == dep and loaded.fit == profile.fit
    assert loaded.prefill_points == profile.prefill_points and loaded.decode_points == profile.decode_points
    assert loaded.metadata["url"] == "http://x"


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(version=7), "version"),
    (lambda d: d["fit"].update(iteration_s=-1.0), "fit.iteration_s"),
    (lambda d: d["fit"].pop("decode_seq_s"), "decode_seq_s"),
    (lambda d: d["deployment"].update(num_decode=0), "deployment.num_decode"),
    (lambda d: d["deployment"].update(colour="red"), "colour"),
    (lambda d: d["points"]["decode"].append({"batch_size": 2, "context_len": 1.0, "step_s": "fast"}), "step_s"),
    (lambda d: d["points"].update(prefill={"a": 1}), "points.prefill"),
])
def test_profile_validation_names_the_field(tmp_path, mutate, match):
    data = fit_profile(DeploymentInfo(), [PrefillPoint((n,), 0.01 * n) for n in (256, 512, 1024)],
                       [DecodePoint(b, 10.0, 0.01 * b) for b in (1, 2, 4)]).to_json()
    mutate(data)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        Profile.load(path)


def test_profile_load_refuses_missing_and_garbage(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Profile.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Profile.load(tmp_path / "bad.json")


def test_decode_window_measures_the_full_batch_only():
    # Two streams: one starts 0.1 s earlier (alone, 5 ms steps), then both at 10 ms steps.
    a = [(0.1 + 0.005 * i, 1) for i in range(20)] + [(0.2 + 0.01 * i, 1) for i in range(1, 40)]
    b = [(0.2 + 0.01 * i, 1) for i in range(0, 45)]
    point = decode_window([a, b], input_len=100)
    assert point.batch_size == 2
    assert point.step_s == pytest.approx(0.01)


# ------------------------------------------------------------------------------ command line


def _cli(argv):
    import argparse

    parser = argparse.ArgumentParser()
    plan_cli.add_arguments(parser)
    return plan_cli.run(parser.parse_args(argv))


def test_cli_recommend_and_simulate(tmp_path, capsys):
    path = tmp_path / "profile.json"
    Profile(DeploymentInfo(), FIT).save(path)
    common = ["--profile", str(path), "--rate", "4", "--num-requests", "60", "--input-len", "600",
              "--output-len", "16", "--slo-ttft", "500", "--slo-tpot", "50"]
    assert _cli(["recommend", "--gpus", "3", "--json", *common]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["candidates"]) == 3 and out["recommended"]["num_gpus"] <= 3
    assert _cli(["simulate", "--prefill", "1", "--decode", "2", *common]) == 0
    assert "1P:2D" in capsys.readouterr().out
    assert _cli(["recommend", "--gpus", "1", *common]) == 2
    assert "budget" in capsys.readouterr().err
    assert _cli(["simulate", "--prefill", "1", "--decode", "1", "--profile", str(tmp_path / "no.json")]) == 2


def test_batch_one_decode_is_fitted_on_its_own():
    decode = [DecodePoint(1, ctx, 0.010 + 3e-6 * ctx) for ctx in (40.0, 540.0)]
    decode += [DecodePoint(b, ctx, 0.016 + 5e-4 * b + 2e-7 * b * ctx) for b in (2, 4, 8) for ctx in (40.0, 540.0)]
    prefill = [PrefillPoint((n,), 0.03 + 2e-4 * n) for n in (256, 512, 1024)]
    fit = fit_profile(DeploymentInfo(), prefill, decode).fit
    assert fit.single_decode_s == pytest.approx(0.010) and fit.single_decode_ctx_s == pytest.approx(3e-6)
    assert fit.iteration_s == pytest.approx(0.016) and fit.decode_seq_s == pytest.approx(5e-4)
    assert fit.step_s((), 1, 300.0) == pytest.approx(0.010 + 3e-6 * 300)
    assert fit.step_s((), 2, 600.0) == pytest.approx(0.016 + 1e-3 + 2e-7 * 600)
    with pytest.raises(ValueError, match="together"):
        CostFit(**{**fit.__dict__, "single_decode_ctx_s": None})


def test_profile_run_config_refuses_bad_values():
    from pdserve.loadtest.profile_run import ProfileRunConfig, run_profile

    assert callable(run_profile)
    with pytest.raises(ValueError, match="http"):
        ProfileRunConfig(base_url="127.0.0.1:8000")
    with pytest.raises(ValueError, match="decode_tokens"):
        ProfileRunConfig(base_url="http://127.0.0.1:8000", decode_tokens=2)
    with pytest.raises(ValueError, match="prefill_lens"):
        ProfileRunConfig(base_url="http://127.0.0.1:8000", prefill_lens=())
