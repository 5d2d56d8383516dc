"""Prometheus /metrics on real worker processes.

A prefill and a decode worker run as processes against the embedded control plane;
each prints ``METRICS <worker_id> <url>`` after its READY line. The figures are
scraped before and after one remote-prefill Generate and must have moved as the
request did: KV bytes sent by the prefill worker equal those the decode worker
received, the prefill worker looked the whole prompt up in its prefix cache, and
nothing is left running or holding blocks. ``--metrics-port -1`` serves nothing.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import hf_reference as H
from pdserve.deploy.processes import WorkerProcess
from pdserve.deploy.store.embedded import ControlPlaneServer
from pdserve.engine import SamplingParams
from pdserve.proto import pdserve_pb2 as pb

pytestmark = pytest.mark.integration

NUM_BLOCKS = 64


def Worker(role: str, model_dir, store_url: str, worker_id: str, extra=(), expect_metrics=True) -> WorkerProcess:
    """A started worker; waits for READY (and METRICS, when served). READY's format is unchanged."""
    w = WorkerProcess(role, ["--model", str(model_dir), "--store", store_url, "--worker-id", worker_id,
                             "--num-kv-blocks", str(NUM_BLOCKS), "--transfer-backend", "torch_dist",
                             "--heartbeat-ttl", "5", "--prefill-timeout", "10", "--log-level", "WARNING", *extra])
    w.wait_ready(metrics=expect_metrics)
    assert w.worker_id == worker_id
    return w


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of one scrape."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples, name: str, **labels) -> float:
    want = set(labels.items())
    hits = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


@pytest.fixture(scope="module")
def cluster(hf_model_dir):
    model_dir = hf_model_dir("llama")
    server = ControlPlaneServer()
    server.start()
    workers = []
    try:
        workers.append(Worker("prefill", model_dir, server.url, "p0"))
        workers.append(Worker("decode", model_dir, server.url, "d0"))
        yield model_dir, server, *workers
    finally:
        for w in reversed(workers):
            w.stop()
        server.stop()


def generate(d: Worker, rid: str, prompt, params: SamplingParams, prefill="p0", timeout=60):
    return d.generate(rid, prompt, params, prefill, timeout)


def test_metrics_follow_a_remote_prefill(cluster):
    _, _, p, d = cluster
    for w in (p, d):
        host = w.address.rsplit(":", 1)[0]
        assert w.metrics_url.startswith(f"http://{host}:") and w.metrics_url.endswith("/metrics")
    p0, d0 = scrape(p.metrics_url), scrape(d.metrics_url)
    assert value(p0, "pdserve_worker_info", worker_id="p0", role="prefill") == 1
    assert value(d0, "pdserve_worker_info", worker_id="d0", role="decode") == 1
    for s, wid, role in ((p0, "p0", "prefill"), (d0, "d0", "decode")):
        assert value(s, "pdserve_kv_blocks_total", worker_id=wid, role=role) == NUM_BLOCKS
        assert value(s, "pdserve_kv_blocks_used", worker_id=wid, role=role) == 0
        assert value(s, "pdserve_requests_running", worker_id=wid, role=role) == 0
        assert value(s, "pdserve_requests_waiting", worker_id=wid, role=role) == 0
    assert value(p0, "pdserve_kv_transfer_bytes_total", direction="send") == 0
    assert value(d0, "pdserve_kv_transfer_bytes_total", direction="receive") == 0
    assert not any(n.startswith("pdserve_kv_transfer") and ("direction", "receive") in ls for n, ls in p0)

    prompt = H.random_prompts(1000, [37], seed=21)[0]
    tokens, final = generate(d, "m1", prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert len(tokens) == 6 and final.finish_reason == pb.LENGTH

    # The engine figures are a snapshot refreshed every 0.5 s: wait until they show the request.
    deadline = time.monotonic() + 10
    while True:
        p1, d1 = scrape(p.metrics_url), scrape(d.metrics_url)
        done = all(value(a, "pdserve_prefix_cache_query_tokens_total") > value(b, "pdserve_prefix_cache_query_tokens_total")
                   and value(a, "pdserve_requests_running") == 0 and value(a, "pdserve_kv_blocks_used") == 0
                   for a, b in ((p1, p0), (d1, d0)))
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    def delta(name, after, before, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    sent = delta("pdserve_kv_transfer_bytes_total", p1, p0, direction="send")
    received = delta("pdserve_kv_transfer_bytes_total", d1, d0, direction="receive")
    assert sent > 0 and received == sent  # both sides count the same bytes (3 blocks of 16 tokens)
    for after, before, direction in ((p1, p0, "send"), (d1, d0, "receive")):
        assert delta("pdserve_kv_transfers_total", after, before, direction=direction) == 1
        assert delta("pdserve_kv_transfer_failures_total", after, before, direction=direction) == 0
        assert delta("pdserve_kv_transfer_latency_seconds_total", after, before, direction=direction) > 0
    assert delta("pdserve_prefix_cache_query_tokens_total", p1, p0) == len(prompt)
    assert delta("pdserve_prefix_cache_hit_tokens_total", p1, p0) == 0  # a fresh prompt
    for s in (p1, d1):
        assert value(s, "pdserve_requests_running") == 0 and value(s, "pdserve_requests_waiting") == 0
        assert value(s, "pdserve_kv_blocks_used") == 0 and value(s, "pdserve_kv_blocks_total") == NUM_BLOCKS

    # The same prompt again: the prefill worker finds its full blocks cached (2 of 16 tokens).
    generate(d, "m2", prompt, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), prefill="p0")
    deadline = time.monotonic() + 10
    while True:
        p2 = scrape(p.metrics_url)
        if (value(p2, "pdserve_prefix_cache_query_tokens_total") > value(p1, "pdserve_prefix_cache_query_tokens_total")
                or time.monotonic() > deadline):
            break
        time.sleep(0.1)
    assert delta("pdserve_prefix_cache_query_tokens_total", p2, p1) == len(prompt)
    assert delta("pdserve_prefix_cache_hit_tokens_total", p2, p1) == 32


def test_metrics_port_minus_one_disables_metrics(cluster, hf_model_dir):
    model_dir, server, _, _ = cluster
    w = Worker("decode", model_dir, server.url, "d-nometrics", extra=["--metrics-port", "-1"], expect_metrics=False)
    try:
        assert w.metrics_url is None
        w.proc.terminate()
        w.proc.wait(20)
        assert "METRICS" not in w.output()
    finally:
        w.stop()


def test_explicit_metrics_port_stops_with_the_worker(cluster):
    model_dir, server, _, _ = cluster
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    w = Worker("prefill", model_dir, server.url, "p-port", extra=["--metrics-port", str(port)])
    try:
        assert w.metrics_url == f"http://127.0.0.1:{port}/metrics"
        assert value(scrape(w.metrics_url), "pdserve_worker_info", worker_id="p-port", role="prefill") == 1
        w.proc.terminate()
        assert w.proc.wait(20) == 0
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            scrape(w.metrics_url)
    finally:
        w.stop()
