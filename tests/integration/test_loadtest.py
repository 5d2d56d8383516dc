"""``pdserve loadtest`` against a real deployment.

One deployment for the module: an embedded control-plane server, one prefill and one
decode worker process on the tiny model (NIXL transfer; every request is prefilled
remotely), and the gateway in-process with an API key. The CLI's ``run()`` is called
in-process for each workload, endpoint and arrival mode; the checks are on what the
server itself reports (``usage`` in every stream) and on the files written. After each
run every KV block must be back in the workers' pools, including after requests that
the load tester cancelled mid-stream.
"""

from __future__ import annotations

import argparse
import json
import time

import httpx
import pytest

from pdserve.deploy.processes import WorkerProcess, wait_all_free
from pdserve.deploy.store.embedded import ControlPlaneServer
from pdserve.engine.tiny_model import make_tiny_model
from pdserve.loadtest import LoadTestConfig, run_loadtest
from pdserve.loadtest import cli
from pdserve.router.app import ServerThread, create_app
from pdserve.router.gateway import GatewayConfig

pytestmark = pytest.mark.integration

API_KEY = "sekrit-key"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Deployment:
    def __init__(self, model_dir, url: str, workers: list[WorkerProcess]):
        self.model_dir, self.url, self.workers = model_dir, url, workers

    def wait_all_free(self, timeout_s: float = 15.0) -> None:
        assert wait_all_free(self.workers, timeout_s), [str(w.stats()) for w in self.workers]


@pytest.fixture(scope="module")
def deploy(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("loadtest") / "tiny")
    store = ControlPlaneServer()
    store.start()
    workers = [WorkerProcess(role, ["--model", str(model_dir), "--store", store.url, "--worker-id", f"{role}-0",
                                    "--num-kv-blocks", "384", "--transfer-backend", "nixl", "--heartbeat-ttl", "5",
                                    "--prefill-timeout", "20", "--log-level", "WARNING"])
               for role in ("prefill", "decode")]
    server = None
    try:
        for w in workers:
            w.wait_ready()
        cfg = GatewayConfig(store_url=store.url, model_dir=str(model_dir), api_key=API_KEY,
                            disagg_threshold_tokens=1, refresh_interval_s=0.2)
        server = ServerThread(create_app(cfg))
        deadline = time.monotonic() + 15
        while httpx.get(server.url + "/ready").json().get("ready") is not True:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        yield Deployment(model_dir, server.url, workers)
    finally:
        if server is not None:
            server.stop()
        for w in workers:
            w.stop()
        store.stop()


def run_cli(deploy: Deployment, out_dir, *argv: str, api_key: str | None = API_KEY, tokenizer: bool = True) -> int:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = ["--url", deploy.url, "--output-dir", str(out_dir), "--no-progress", "--timeout", "60", *argv]
    if api_key is not None:
        args += ["--api-key", api_key]
    if tokenizer:
        args += ["--tokenizer", str(deploy.model_dir)]
    return cli.run(parser.parse_args(args))


def read_outputs(out_dir) -> tuple[dict, list[dict]]:
    summary = json.loads((out_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (out_dir / "requests.jsonl").read_text().splitlines()]
    assert (out_dir / "latency_cdf.png").read_bytes()[:8] == PNG_MAGIC
    assert len(records) == summary["num_requests"]
    return summary, records


def check_exact(summary: dict, records: list[dict], num_requests: int) -> None:
    """Every request completed with the asked output length, the planned input length is
    the server's count, and the latencies are ordered."""
    assert summary["num_requests"] == summary["num_completed"] == num_requests, summary["errors"]
    for r in records:
        assert r["error"] is None and r["is_usage_reported"], r
        assert r["num_output_tokens"] == r["output_len"], r
        assert r["num_prompt_tokens"] == r["input_len"], r
        assert 0 < r["ttft_ms"] <= r["e2e_ms"], r
        assert r["tpot_ms"] is None or r["tpot_ms"] > 0
    assert summary["output_throughput"] > 0 and summary["ttft_ms"]["p50"] is not None
    assert summary["model"] == "tiny" and summary["config"]["api_key"] == "***"


def test_completions_fixed_closed_loop(deploy, tmp_path, capsys):
    assert run_cli(deploy, tmp_path, "--input-len", "100", "--output-len", "12", "--concurrency", "4",
                   "--num-requests", "8", "--slo-ttft", "60000") == 0
    summary, records = read_outputs(tmp_path)
    check_exact(summary, records, 8)
    assert all(r["input_len"] == 100 and r["output_len"] == 12 for r in records)
    assert summary["slo_attainment"] == 1.0
    table = capsys.readouterr().out
    assert "Request throughput (req/s)" in table and "P99 TPOT" in table
    deploy.wait_all_free()


def test_chat_synthetic_open_loop(deploy, tmp_path):
    assert run_cli(deploy, tmp_path, "--endpoint", "chat", "--workload", "synthetic",
                   "--input-dist", "uniform:min=30,max=150", "--output-dist", "normal:mean=8,std=3",
                   "--rate", "20", "--num-requests", "6", "--seed", "3") == 0
    summary, records = read_outputs(tmp_path)
    check_exact(summary, records, 6)
    assert len({r["input_len"] for r in records}) > 1
    # Nothing is sent before its arrival (asyncio may wake a timer up to its clock resolution early).
    assert all(r["start_s"] >= r["scheduled_s"] - 1e-3 for r in records)
    deploy.wait_all_free()


def test_shared_prefix(deploy, tmp_path):
    assert run_cli(deploy, tmp_path, "--workload", "shared-prefix", "--num-prefix-groups", "2", "--prefix-len", "64",
                   "--suffix-len", "16", "--output-len", "4", "--concurrency", "3", "--num-requests", "6") == 0
    summary, records = read_outputs(tmp_path)
    check_exact(summary, records, 6)
    assert [r["group_id"] for r in records] == [0, 1] * 3 and all(r["input_len"] == 80 for r in records)
    deploy.wait_all_free()


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_multi_turn_contexts_grow_with_real_answers(deploy, tmp_path, endpoint):
    assert run_cli(deploy, tmp_path, "--endpoint", endpoint, "--workload", "multi-turn", "--num-turns", "3",
                   "--input-len", "20", "--output-len", "6", "--concurrency", "2", "--num-requests", "6") == 0
    summary, records = read_outputs(tmp_path)
    check_exact(summary, records, 6)  # input_len is counted from the real context: the server agrees
    by_conversation: dict[int, list[dict]] = {}
    for r in records:
        by_conversation.setdefault(r["session_id"], []).append(r)
    assert sorted(len(turns) for turns in by_conversation.values()) == [3, 3]
    for turns in by_conversation.values():
        turns.sort(key=lambda r: r["turn"])
        for prev, cur in zip(turns, turns[1:]):
            # The previous prompt, its answer, and a new 20-token message.
            assert cur["num_prompt_tokens"] >= prev["num_prompt_tokens"] + 20
            assert cur["start_s"] >= prev["end_s"]  # turns are sequential
    deploy.wait_all_free()


def test_trace_replay(deploy, tmp_path):
    trace = tmp_path / "trace.jsonl"
    lines = [{"timestamp": 0, "input_length": 60, "output_length": 5, "hash_ids": [1, 2, 3, 4]},
             {"timestamp": 200, "input_length": 50, "output_length": 3, "hash_ids": [1, 2, 9, 10]},
             {"timestamp": 400, "input_length": 20, "output_length": 7, "hash_ids": [11, 12]}]
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    assert run_cli(deploy, out, "--workload", "trace", "--trace", str(trace), "--trace-block-size", "16",
                   "--trace-time-scale", "0.5") == 0
    summary, records = read_outputs(out)
    check_exact(summary, records, 3)
    assert [r["input_len"] for r in records] == [60, 50, 20]
    assert [r["output_len"] for r in records] == [5, 3, 7]
    assert [r["scheduled_s"] for r in records] == pytest.approx([0.0, 0.1, 0.2])
    assert all(r["start_s"] >= r["scheduled_s"] - 1e-3 for r in records)
    deploy.wait_all_free()


def test_api_key_is_sent(deploy, tmp_path, monkeypatch, capsys):
    # A wrong key: every request is refused and counted by kind (model named: no /v1/models call).
    out = tmp_path / "wrong"
    assert run_cli(deploy, out, "--model", "tiny", "--num-requests", "3", "--input-len", "10", "--output-len", "2",
                   api_key="wrong") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == {"http_401:authentication_error": 3} and summary["num_completed"] == 0
    # Without a model name, the wrong key already fails at GET /v1/models.
    assert run_cli(deploy, out, "--num-requests", "1", api_key="wrong") == 1
    assert "http_401" in capsys.readouterr().err
    # The right key from the environment.
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    out = tmp_path / "env"
    assert run_cli(deploy, out, "--num-requests", "2", "--input-len", "10", "--output-len", "2", api_key=None) == 0
    check_exact(*read_outputs(out), 2)
    deploy.wait_all_free()


def test_stream_without_usage_counts_text_chunks(deploy):
    cfg = LoadTestConfig(base_url=deploy.url, api_key=API_KEY, tokenizer_dir=str(deploy.model_dir), input_len=30,
                         output_len=10, num_requests=2, extra_body=(("stream_options", {"include_usage": False}),))
    result = run_loadtest(cfg)
    assert result.summary["num_completed"] == 2
    for r in result.records:
        assert not r.is_usage_reported and r.num_prompt_tokens == r.input_len == 30
        # One token per text chunk, as counted; tokens whose text was held back are not seen.
        assert 1 <= r.num_output_tokens <= 10 and len(r.itl_s) == r.num_output_tokens - 1
    deploy.wait_all_free()


def test_duration_bound_cancels_in_flight_requests(deploy):
    # Long outputs, a 1 s duration and a short drain: requests still streaming at the end are
    # cancelled, recorded as cancelled_at_end, and the server frees their blocks.
    cfg = LoadTestConfig(base_url=deploy.url, api_key=API_KEY, input_len=20, output_len=400, rate=8.0,
                         duration_s=1.0, drain_timeout_s=0.2, timeout_s=60, seed=1)
    result = run_loadtest(cfg)
    s = result.summary
    assert s["num_requests"] >= 1 and s["errors"].get("cancelled_at_end", 0) >= 1, s
    assert s["num_requests"] == s["num_completed"] + s["num_errors"]
    assert all(r.start_s is not None and r.start_s < 1.0 for r in result.records)  # nothing sent after the end
    deploy.wait_all_free()


def test_closed_loop_runs_for_its_duration(deploy):
    # The drain period starts at the end of the duration, not at the start of the run: the
    # two loops keep sending until 2 s, then whatever still runs gets 0.2 s.
    cfg = LoadTestConfig(base_url=deploy.url, api_key=API_KEY, input_len=20, output_len=16, concurrency=2,
                         duration_s=2.0, drain_timeout_s=0.2, timeout_s=60)
    result = run_loadtest(cfg)
    s = result.summary
    assert s["num_requests"] == s["num_completed"] + s["errors"].get("cancelled_at_end", 0), s
    assert all(r.start_s < 2.0 for r in result.records)
    # A closed loop always has a request in flight at the deadline: it ends (completed, or
    # cancelled after the drain period) no earlier than the deadline.
    assert max(r.end_s for r in result.records) >= 2.0
    assert all(r.num_output_tokens == 16 for r in result.records if r.is_ok)
    deploy.wait_all_free()


def test_sweep_writes_its_files(deploy, tmp_path, capsys):
    assert run_cli(deploy, tmp_path, "--sweep", "--slo-e2e", "60000", "--sweep-start-rate", "20",
                   "--sweep-max-steps", "2", "--num-requests", "4", "--input-len", "20", "--output-len", "3") == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [p["rate"] for p in sweep["points"]] == [20.0, 40.0]
    assert sweep["best_rate"] == 40.0 and not sweep["is_saturated"]
    for name in ("sweep_throughput.png", "sweep_latency.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert "highest rate meeting the SLOs" in capsys.readouterr().out
    deploy.wait_all_free()


def test_plan_profiles_this_deployment_then_simulates_and_recommends(deploy, tmp_path, capsys):
    """`pdserve plan` end to end on the real deployment: a short profiling run over HTTP,
    then the simulator and the planner on the profile it wrote."""
    from pdserve.loadtest import plan_cli
    from pdserve.loadtest.profile import Profile

    parser = argparse.ArgumentParser()
    plan_cli.add_arguments(parser)
    out = tmp_path / "profile.json"
    assert plan_cli.run(parser.parse_args([
        "profile", "--url", deploy.url, "--api-key", API_KEY, "--tokenizer", str(deploy.model_dir),
        "--out", str(out), "--prefill-lens", "64,160", "--decode-batch-sizes", "1,2",
        "--decode-context-lens", "16,96", "--decode-tokens", "8", "--reps", "1",
        "--prefill", "1", "--decode", "1", "--kv-blocks", "384", "--disagg-threshold", "1"])) == 0
    profile = Profile.load(out)
    # Every length and batch size asked for was measured, with real (positive) times,
    # and the deployment is described as launched.
    assert {p.prompt_lens[0] for p in profile.prefill_points} >= {64, 160}
    assert {(p.batch_size, p.context_len > 50) for p in profile.decode_points} >= {(1, False), (2, True)}
    assert all(p.seconds > 0 for p in profile.prefill_points) and all(p.step_s > 0 for p in profile.decode_points)
    assert profile.fit.iteration_s >= 0 and profile.fit.prefill_token_s >= 0
    assert profile.deployment.num_prefill == 1 and profile.deployment.kv_blocks_per_decode_worker == 384
    deploy.wait_all_free()
    capsys.readouterr()
    assert plan_cli.run(parser.parse_args([
        "simulate", "--profile", str(out), "--prefill", "1", "--decode", "1", "--input-len", "100",
        "--output-len", "8", "--rate", "2", "--num-requests", "40", "--json"])) == 0
    sim = json.loads(capsys.readouterr().out)
    assert sim["summary"]["num_completed"] == 40 and sim["summary"]["ttft_ms"]["p50"] > 0
    assert plan_cli.run(parser.parse_args([
        "recommend", "--profile", str(out), "--gpus", "3", "--tp-sizes", "1", "--input-len", "100",
        "--output-len", "8", "--rate", "2", "--num-requests", "40", "--slo-ttft", "5000"])) == 0
    table = capsys.readouterr().out
    # Every split of 3 GPUs with at least one worker per pool is a row: 1P:1D, 1P:2D, 2P:1D.
    assert all(label in table for label in ("1P:1D", "1P:2D", "2P:1D")) and "recommended" in table
