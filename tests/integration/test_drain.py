"""Workers leaving without failing requests: drain, gateway retry, local-prefill fallback.

A real deployment: the embedded store, one prefill and two decode worker processes on
the tiny Llama (NIXL), and the gateway in-process. Each test narrates one departure:

- a decode worker drained mid-stream (SIGTERM) finishes the stream it serves, is
  marked draining in the store meanwhile (the gateway sends new requests to the other
  decode worker), then deregisters and exits;
- a decode worker whose prefill worker has left (deregistered, or killed and still
  registered) computes the prompt itself; the output is the same tokens;
- a crashed decode worker (SIGKILL, still registered) costs the client nothing: the
  gateway's call is refused before any token and it routes the prompt again.

Every test ends with every KV block of the surviving workers back in the pool.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from pdserve.deploy.processes import WorkerProcess, wait_all_free
from pdserve.deploy.store.embedded import ControlPlaneServer
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tiny_model import make_tiny_model
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.app import ServerThread, create_app
from pdserve.router.gateway import GatewayConfig

pytestmark = pytest.mark.integration

NUM_BLOCKS = 64


def Worker(role: str, model_dir, store_url: str, worker_id: str) -> WorkerProcess:
    return WorkerProcess(role, ["--model", str(model_dir), "--store", store_url, "--worker-id", worker_id,
                                "--num-kv-blocks", str(NUM_BLOCKS), "--transfer-backend", "nixl",
                                "--heartbeat-ttl", "5", "--prefill-timeout", "10", "--drain-grace", "1.0",
                                "--log-level", "WARNING"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("drain") / "tiny-llama")


@pytest.fixture()
def deployment(model_dir):
    """p0, d0, d1 and a gateway; each test gets fresh ones (they take workers away)."""
    store = ControlPlaneServer()
    store.start()
    workers = {wid: Worker(role, model_dir, store.url, wid)
               for role, wid in (("prefill", "p0"), ("decode", "d0"), ("decode", "d1"))}
    gateway = None
    try:
        for w in workers.values():
            w.wait_ready()
        gateway = ServerThread(create_app(GatewayConfig(store_url=store.url, model_dir=str(model_dir),
                                                        disagg_threshold_tokens=8, router_policy="round_robin")))
        yield store, workers, gateway.url
    finally:
        if gateway is not None:
            gateway.stop()
        for w in workers.values():
            w.stop()
        store.stop()


def complete(url: str, prompt: list[int], max_tokens: int) -> dict:
    r = httpx.post(url + "/v1/completions", json={"model": "tiny-llama", "prompt": prompt, "max_tokens": max_tokens,
                                                  "ignore_eos": True, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def generate(worker: WorkerProcess, prompt: list[int], prefill_worker_id: str = "", max_tokens: int = 8) -> list[int]:
    """Greedy tokens straight from a decode worker's Generate (no gateway)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tokens, final = worker.generate(f"r{time.monotonic_ns()}", prompt, params, prefill_worker_id)
    assert final is not None and final.finish_reason == pb.LENGTH, final
    return tokens


def wait_until(predicate, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_drained_decode_worker_finishes_its_stream_then_leaves(deployment):
    store, workers, url = deployment
    d0, d1 = workers["d0"], workers["d1"]
    prompt = list(range(100, 140))
    # A long stream on d0 (round robin: the first request after start goes to d0 or d1;
    # send until one is running on d0).
    received: list[str] = []
    done = threading.Event()

    def stream() -> None:
        body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                received.append(line)
        done.set()

    threads = [threading.Thread(target=stream) for _ in range(2)]  # round robin: one on each decode worker
    for t in threads:
        t.start()
    assert wait_until(lambda: d0.stats().num_running == 1 and d1.stats().num_running == 1)
    d0.stop_async = threading.Thread(target=d0.stop, kwargs={"drain": True, "timeout_s": 120})
    d0.stop_async.start()
    # Marked draining while its stream runs; new requests all go to d1.
    assert wait_until(lambda: (w := store.store.get_worker("d0")) is not None and w.draining)
    assert d0.stats().num_running == 1
    time.sleep(0.6)  # > the gateway's refresh interval
    for _ in range(3):
        complete(url, list(range(300, 320)), 4)
    assert d0.stats().num_running == 1  # none of them went to d0
    for t in threads:
        t.join(120)
    d0.stop_async.join(120)
    assert d0.proc.returncode == 0 and store.store.get_worker("d0") is None
    # Both streams ran to the end: 200 tokens each, a finish reason, [DONE].
    finishes = [ln for ln in received if '"finish_reason":"length"' in ln]
    assert len(finishes) == 2 and received.count("data: [DONE]") == 2
    assert wait_all_free([d1, workers["p0"]])


def test_decode_worker_prefills_locally_when_the_prefill_worker_left(deployment):
    store, workers, url = deployment
    d0, p0 = workers["d0"], workers["p0"]
    prompt = list(range(500, 560))
    remote = generate(d0, prompt, "p0")
    local = generate(d0, prompt, "")
    assert remote == local
    # A prefill worker id that is not registered (it left): prefilled here.
    before = d0.stats().local_prefill_fallbacks
    assert generate(d0, list(range(600, 660)), "ghost") == generate(d0, list(range(600, 660)), "")
    assert d0.stats().local_prefill_fallbacks == before + 1
    # Killed (no cleanup: still registered until its TTL): the hop is refused, same fallback.
    p0.proc.kill()
    p0.proc.wait()
    assert store.store.get_worker("p0") is not None
    assert generate(d0, list(range(700, 760)), "p0") == generate(d0, list(range(700, 760)), "")
    assert d0.stats().local_prefill_fallbacks == before + 2
    assert wait_all_free([d0, workers["d1"]])


def test_gateway_routes_again_when_a_decode_worker_refuses(deployment):
    store, workers, url = deployment
    d0, d1 = workers["d0"], workers["d1"]
    d0.proc.kill()  # crashed: still registered for its TTL, its port refuses connections
    d0.proc.wait()
    outs = [complete(url, list(range(900 + 10 * i, 940 + 10 * i)), 6) for i in range(4)]
    assert all(o["choices"][0]["finish_reason"] == "length" and o["usage"]["completion_tokens"] == 6 for o in outs)
    metrics = httpx.get(url + "/metrics").text
    retries = sum(float(ln.split()[-1]) for ln in metrics.splitlines()
                  if ln.startswith("pdserve_gateway_generate_retries_total"))
    assert retries >= 1
    assert wait_all_free([d1, workers["p0"]])
