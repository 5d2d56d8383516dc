"""pdserve on real (namespaced) hosts: Ray across hosts, KV over UCX/TCP, faults.

One deployment for the module (``deployment.py`` has the topology): Ray head, two Ray
worker hosts (prefill pool on host a, decode pool on host b, by custom resources), a
password-protected Redis on its own host, ``pdserve up --ray-address ... --redis-url
...`` and its gateway on the head, and every client call from a client host. The
tests run in file order on that deployment; each fault test puts the network and the
services back as they were and checks that no KV block leaked on any worker.

Needs root and ``ip netns``; the whole module is skipped (with the reason) otherwise.
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from netns import unavailable_reason

_WHY = unavailable_reason()
if _WHY:
    pytest.skip(_WHY, allow_module_level=True)

from audit import audit, credential_leaks  # noqa: E402
from deployment import GATEWAY_PORT, MODEL_NAME, Deployment  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.multihost]

NUM_TOKENS = 8
#: Prompts at least this long are prefilled remotely (the gateway's disagg threshold, 256).
REMOTE_PROMPT_LEN = 300
#: A prompt whose prefill takes a while on this CPU (seconds), to cut a link during it.
LONG_PROMPT_LEN = 1024


def _prompt(seed: int, length: int = REMOTE_PROMPT_LEN) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 8000) for _ in range(length)]


#: Prompts whose output is compared with the offline engine's.
PROMPTS = {name: _prompt(seed) for seed, name in enumerate(("across", "after_link", "after_redis", "gateways"))}
PROMPTS["long"] = _prompt(100, LONG_PROMPT_LEN)
#: How long a hop may take to end after its prefill host went silent: the decode
#: worker's Prefill deadline, the lease's margin (``kvtransfer/lease.py``, 5 s) while it
#: revokes what the prefill side may have been admitted to write, then a local prefill of
#: the long prompt on the decode host (seconds on this loaded 2-core machine).
HOP_BOUND_MARGIN_S = 5.0 + 20.0


def _body(prompt: list[int], max_tokens: int = NUM_TOKENS) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def _offline_texts(model_dir) -> dict[str, str]:
    """The offline greedy text of every prompt (``pdserve.engine.LLM``, this process)."""
    from pdserve.engine import LLM, SamplingParams

    with LLM(model_dir, num_kv_blocks=128) as llm:
        outs = llm.generate(list(PROMPTS.values()), SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS,
                                                                   ignore_eos=True))
    return {name: out.text for name, out in zip(PROMPTS, outs)}


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    from pdserve.engine.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("multihost")
    model_dir = make_tiny_model(root / MODEL_NAME)
    d = Deployment(root=root, model_dir=model_dir)
    # The reference runs here while the hosts start (they mostly wait on processes).
    pool = ThreadPoolExecutor(1)
    d.offline = pool.submit(_offline_texts, model_dir)
    d.create()
    try:
        d.start_redis()
        agent = d.start_agent()
        d.start_ray({"a": "host_a", "b": "host_b"})
        agent.wait_started()
        up = d.start_up()
        d.wait_ready(d.gateway_url(), up)
        yield d
    finally:
        pool.shutdown(cancel_futures=True)
        report = d.teardown()
        leftover = d.net.exists()
        assert not leftover, f"namespaces left behind: {leftover}"
        assert not report["forced"], f"processes that ignored SIGTERM: {report}"
        assert report.get("up_exit") in (0, None), f"pdserve up did not stop cleanly on SIGINT: {report}"


@pytest.fixture
def offline(dep) -> dict[str, str]:
    return dep.offline.result(300)


@pytest.fixture(autouse=True)
def _network_restored(dep):
    """Every test leaves every link plugged and Redis running (a failed one too)."""
    yield
    unplugged = [h for h in dep.net.hosts if not dep.net.is_plugged(h)]
    for h in unplugged:
        dep.net.plug(h)
    if dep.services["redis"].proc.poll() is not None:
        dep.start_redis()
    assert not unplugged, f"the test left {unplugged} cut off"


def _roles(dep: Deployment) -> tuple[dict, dict]:
    workers = dep.workers()
    prefill = [w for w in workers.values() if w["role"] == "PREFILL"]
    decode = [w for w in workers.values() if w["role"] == "DECODE"]
    assert len(prefill) == 1 and len(decode) == 1, workers
    return prefill[0], decode[0]


def _wait_idle(dep: Deployment, timeout_s: float = 30.0) -> dict[str, dict]:
    """Every worker's Stats once nothing runs or waits and every KV block is free."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = {}
        for wid, w in dep.workers().items():
            try:
                stats[wid] = dep.stats(w)
            except Exception as e:  # noqa: BLE001 - not reachable yet
                stats[wid] = {"error": str(e)}
        idle = all("error" not in s and s["num_running"] == 0 and s["num_waiting"] == 0
                   and int(s["num_kv_blocks_free"]) == int(s["num_kv_blocks_total"]) for s in stats.values())
        if idle and len(stats) == 2:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"workers not idle with all blocks free after {timeout_s} s: {stats}")
        time.sleep(0.3)


def _wait_remote_prefill(dep: Deployment, seed: int, timeout_s: float = 30.0) -> None:
    """Until a fresh prompt is prefilled on host a again (the prefill worker's transfer
    count moves). Right after a fault the first hops may be prefilled on the decode host
    instead: the gateway's view lags the store by up to its refresh interval, and the
    decode worker's channel to host a may still be in gRPC's reconnect backoff (2 s)."""
    prefill, _ = _roles(dep)
    before = int(dep.stats(prefill)["transfer_count"])
    deadline = time.monotonic() + timeout_s
    for attempt in itertools.count():
        assert _text(dep.complete(_body(_prompt(seed + attempt))))
        if int(dep.stats(prefill)["transfer_count"]) > before:
            return
        assert time.monotonic() < deadline, f"no remote prefill within {timeout_s} s ({attempt + 1} requests)"
        time.sleep(0.5)


def _wait_gateway_idle(dep: Deployment, port: int = GATEWAY_PORT, timeout_s: float = 15.0) -> None:
    """Until the gateway holds no request (its ``pdserve_gateway_requests_running``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = dep.agent.call("http", url=f"{dep.gateway_url(port)}/metrics", timeout=5)["body"]
        running = [line for line in body.splitlines() if line.startswith("pdserve_gateway_requests_running ")]
        if running and float(running[0].split()[1]) == 0:
            return
        assert time.monotonic() < deadline, running
        time.sleep(0.2)


def _text(resp: dict) -> str:
    assert resp["status"] == 200, resp
    body = json.loads(resp["body"])
    assert body["choices"][0]["finish_reason"] == "length", body
    return body["choices"][0]["text"]


def test_pools_are_placed_on_their_hosts(dep):
    prefill, decode = _roles(dep)
    assert prefill["address"].startswith(dep.ip("a") + ":"), prefill
    assert decode["address"].startswith(dep.ip("b") + ":"), decode
    for w, host in ((prefill, "a"), (decode, "b")):
        port = int(w["address"].rsplit(":", 1)[1])
        listening = dep.net.hosts[host].listening()
        assert (dep.ip(host), port) in {(a, p) for a, p, _ in listening}, listening
        assert w["metrics_url"].startswith(f"http://{dep.ip(host)}:"), w


def test_completion_across_hosts_equals_offline(dep, offline):
    prefill, decode = _roles(dep)
    before = {"p": dep.stats(prefill), "d": dep.stats(decode), "tx": dep.net.hosts["a"].tx_bytes()}
    text = _text(dep.complete(_body(PROMPTS["across"])))
    assert text == offline["across"]
    p, d = dep.stats(prefill), dep.stats(decode)
    moved = int(p["transfer_bytes"]) - int(before["p"]["transfer_bytes"])
    assert int(p["transfer_count"]) == int(before["p"]["transfer_count"]) + 1, p
    assert int(d["transfer_count"]) == int(before["d"]["transfer_count"]) + 1, d
    assert moved >= REMOTE_PROMPT_LEN // 16 * 8 * 2 * 4 * 16 * 64 * 4, moved  # full blocks x layers x K,V x ...
    # The KV crossed host a's link (UCX over TCP on eth0, not shared memory).
    sent = dep.net.hosts["a"].tx_bytes() - before["tx"]
    assert sent >= moved, (sent, moved)
    _wait_idle(dep)


def test_link_down_during_remote_prefill(dep, offline):
    """Host a (prefill) is cut off while it computes a long prompt for host b.

    The decode worker's hop gets no answer; at its deadline the hop ends, the decode
    worker revokes the transfer it offered, and the request either moves to the decode
    host (a local prefill: then its text is the offline one) or fails with a clear
    error. Either way within the hop's bound, and once the link is back every worker
    gets every block back and serves remote prefills again.
    """
    prefill, decode = _roles(dep)
    before = dep.stats(decode)
    fut = dep.stream(_body(PROMPTS["long"]), timeout=120)
    dep.agent.call("wait_busy", address=prefill["address"], role="prefill", timeout=60)
    t0 = time.monotonic()
    dep.net.unplug("a")
    try:
        res = fut.result(dep.prefill_timeout_s + HOP_BOUND_MARGIN_S + 30)
        elapsed = time.monotonic() - t0
    finally:
        dep.net.plug("a")
    assert res["status"] == 200 and res["events"][-1] == "[DONE]", res
    chunks = [json.loads(e) for e in res["events"][:-1]]
    errors = [c["error"] for c in chunks if "error" in c]
    after = dep.stats(decode)
    fallbacks = int(after["local_prefill_fallbacks"]) - int(before["local_prefill_fallbacks"])
    print(f"\nlink down: the request ended after {elapsed:.1f} s: "
          f"{'error ' + json.dumps(errors) if errors else f'migrated ({fallbacks} local prefill)'}; "
          f"decode hop outcomes {after.get('hop_outcomes')}")
    assert elapsed < dep.prefill_timeout_s + HOP_BOUND_MARGIN_S, elapsed
    if errors:
        assert "prefill" in json.dumps(errors), errors
    else:
        text = "".join(ch["text"] for c in chunks for ch in c["choices"])
        assert text == offline["long"] and fallbacks == 1, (chunks, after)
    _wait_idle(dep, timeout_s=60)  # also waits for prefill-0 to register again
    assert _text(dep.complete(_body(PROMPTS["after_link"]))) == offline["after_link"]
    _wait_remote_prefill(dep, seed=1000)
    _wait_idle(dep)


def test_redis_restart(dep, offline):
    """The store dies mid-stream and comes back empty (same address and password).

    While it is down the workers keep serving what the gateway routes with its last
    view (a short prompt, prefilled on the decode host); once it is back the workers'
    heartbeats register them again and remote prefill works. The stream that was
    running finishes too: the gateway keeps a vanished worker's channel while streams may
    run on it (closing it used to cancel the stream, which then stalled).
    """
    prefill, decode = _roles(dep)
    # 15 s without a byte ends the client's read: a stalled stream must not outlive the test.
    stream = dep.stream(_body(_prompt(200, 64), max_tokens=160), timeout=15)
    dep.agent.call("wait_busy", address=decode["address"], role="decode", timeout=30)
    dep.services["redis"].stop(signal.SIGKILL)
    down_at = time.monotonic()
    during = dep.complete(_body(_prompt(201, 32)), timeout=30)
    time.sleep(max(0.0, 2.0 - (time.monotonic() - down_at)))
    dep.start_redis()
    assert during["status"] == 200, during
    # The registry is rebuilt by the workers' heartbeats (TTL / 3); then remote prefill again.
    deadline = time.monotonic() + 30
    while len(dep.workers()) < 2:
        assert time.monotonic() < deadline, dep.workers()
        time.sleep(0.2)
    deadline = time.monotonic() + 30
    while (resp := dep.complete(_body(PROMPTS["after_redis"]), timeout=30))["status"] != 200:
        assert time.monotonic() < deadline, resp
        time.sleep(0.5)
    assert _text(resp) == offline["after_redis"]
    _wait_remote_prefill(dep, seed=2000)
    res = stream.result(60)
    _wait_idle(dep)
    _wait_gateway_idle(dep)
    assert res["status"] == 200 and res["events"][-1:] == ["[DONE]"], res
    chunks = [json.loads(e) for e in res["events"][:-1]]
    assert not [c for c in chunks if "error" in c], chunks
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"]][-1] == "length", chunks


def test_two_gateway_replicas_and_a_restart(dep, offline):
    """Two more gateways on the same store: each serves; one killed, the others go on;
    restarted, it serves again. The same prompt through every gateway gives the same text."""
    replicas = {8001: dep.start_gateway("gw1", 8001), 8002: dep.start_gateway("gw2", 8002)}
    for port, svc in replicas.items():
        dep.wait_ready(dep.gateway_url(port), svc, timeout_s=120)
    ports = (8001, 8002, GATEWAY_PORT)
    texts = [_text(dep.complete(_body(PROMPTS["gateways"]), port=port)) for port in ports]
    assert texts == [offline["gateways"]] * 3, texts
    replicas[8001].stop(signal.SIGKILL)
    gone = dep.agent.call("http", url=f"{dep.gateway_url(8001)}/health", timeout=5)
    assert gone["status"] is None and "refused" in gone["error"], gone
    for port in (8002, GATEWAY_PORT):
        assert _text(dep.complete(_body(_prompt(300 + port)), port=port))
    restarted = dep.start_gateway("gw1", 8001)
    dep.wait_ready(dep.gateway_url(8001), restarted, timeout_s=120)
    assert _text(dep.complete(_body(PROMPTS["gateways"]), port=8001)) == offline["gateways"]
    _wait_idle(dep)


def test_unauthenticated_client_is_refused_by_every_internal_port(dep):
    """A stranger on the client host (addresses only: no cluster secret, no Redis
    password, no Ray token, no API key) probes every port listening on every host."""
    stranger = dep.start_agent(credentials=False)
    stranger.wait_started()
    found = audit(dep, stranger)
    report = "\n".join(map(str, found))
    print("\n" + report)
    assert not [f for f in found if not f.ok], report
    kinds = {f.kind for f in found}
    for kind in ("redis", "gateway", "worker metrics", "NIXL/UCX (TCP)"):
        assert kind in kinds, report
    assert sum(f.kind.startswith("worker gRPC") for f in found) == 2, report


def test_no_credential_on_a_command_line_or_in_a_worker_environment(dep):
    assert credential_leaks(dep) == []
