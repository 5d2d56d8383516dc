"""LoadTestConfig validation and the CLI's exit codes that need no server."""

from __future__ import annotations

import argparse
import json
import socket

import pytest

from pdserve.loadtest import LengthDistribution, LoadTestConfig
from pdserve.loadtest import cli

URL = "http://127.0.0.1:8000"


@pytest.mark.parametrize("kwargs, message", [
    ({"base_url": "localhost:8000"}, "base_url must start with http"),
    ({"endpoint": "embeddings"}, "endpoint must be one of"),
    ({"workload": "random"}, "workload must be one of"),
    ({"input_len": 0}, "input_len must be an integer >= 1"),
    ({"output_len": 2.5}, "output_len must be an integer >= 1"),
    ({"workload": "synthetic"}, "needs input_dist and output_dist"),
    ({"input_dist": "fixed:3"}, "input_dist must be a LengthDistribution"),
    ({"workload": "trace"}, "needs trace_path"),
    ({"workload": "trace", "trace_path": "/nonexistent.jsonl"}, "is not a file"),
    ({"rate": 0}, "rate must be a finite number > 0"),
    ({"rate": float("inf")}, "rate must be a finite number > 0"),
    ({"burstiness": 0}, "burstiness"),
    ({"concurrency": 0}, "concurrency must be an integer >= 1"),
    ({"num_requests": None}, "must be bounded"),
    ({"num_requests": None, "duration_s": 5.0}, "duration_s needs rate or concurrency"),
    ({"duration_s": -1.0}, "duration_s must be a finite number > 0"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"drain_timeout_s": -1.0}, "drain_timeout_s must be a finite number >= 0"),
    ({"slo_ttft_ms": -5}, "slo_ttft_ms must be a finite number > 0"),
    ({"temperature": 3.0}, "temperature"),
    ({"trace_time_scale": 0}, "trace_time_scale"),
    ({"seed": "1"}, "seed must be an int"),
    ({"extra_body": {"top_k": 3}}, "extra_body must be a tuple of"),
])
def test_bad_config_values_are_named(kwargs, message):
    base = {"base_url": URL, "num_requests": 10}
    with pytest.raises(ValueError, match=message):
        LoadTestConfig(**{**base, **kwargs})


def test_trace_takes_no_rate(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 4, "output_length": 2, "hash_ids": [1]}\n')
    LoadTestConfig(base_url=URL, workload="trace", trace_path=str(path))  # bounded by the file
    with pytest.raises(ValueError, match="arrivals from the trace"):
        LoadTestConfig(base_url=URL, workload="trace", trace_path=str(path), rate=2.0)


def test_good_config_properties():
    cfg = LoadTestConfig(base_url=URL + "/v1/", concurrency=4, num_requests=3, slo_tpot_ms=50,
                         output_dist=LengthDistribution.parse("fixed:9"))
    assert cfg.api_url == URL + "/v1" and cfg.is_closed_loop and cfg.has_slo
    assert cfg.input_lengths() == LengthDistribution.fixed(512) and cfg.output_lengths().mean == 9
    assert not LoadTestConfig(base_url=URL, concurrency=4, rate=2.0, num_requests=3).is_closed_loop


def args_of(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def closed_port() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("argv, message", [
    (["--num-requests", "0"], "num_requests must be an integer >= 1"),
    (["--workload", "synthetic", "--input-dist", "lognormal:mean=5", "--output-dist", "fixed:3",
      "--num-requests", "2"], "sigma"),
    (["--num-requests", "2", "--sweep"], "needs at least one SLO"),
    (["--num-requests", "2", "--sweep", "--slo-ttft", "100", "--sweep-attainment", "1.5"], "sweep-attainment"),
    (["--rate", "-1", "--num-requests", "2"], "rate"),
    ([], "must be bounded"),
])
def test_cli_bad_arguments_exit_2_with_one_line(capsys, argv, message):
    assert cli.run(args_of("--url", closed_port(), *argv)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("pdserve loadtest: error:")


def test_cli_unreachable_server_exits_1(capsys, tmp_path):
    url = closed_port()
    assert cli.run(args_of("--url", url, "--num-requests", "2")) == 1
    assert "cannot reach" in capsys.readouterr().err
    # With the model named, requests are sent, all fail, and are counted by kind.
    out = tmp_path / "out"
    assert cli.run(args_of("--url", url, "--model", "m", "--num-requests", "3", "--input-len", "5",
                           "--output-dir", str(out), "--no-progress")) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == {"connection": 3} and summary["num_completed"] == 0
    assert summary["config"]["api_key"] is None
