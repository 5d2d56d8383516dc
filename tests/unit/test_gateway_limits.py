"""What a client can hold at the gateway's edge (router/limits.py), against fake decode workers.

Slow senders hold no in-flight slot and are cut off (headers, body), the bytes of bodies
being read are bounded, a streaming client that stops reading is cut off and its
generation cancelled, and a decode worker whose queue is full (RESOURCE_EXHAUSTED) is a
503 with Retry-After. Raw sockets play the misbehaving clients. Every wait has a hang
guard; none is a performance threshold.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent import futures

import grpc
import httpx
import pytest

from pdserve.deploy.store import ControlPlaneServer
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.router.app import ServerThread, create_app
from pdserve.router.gateway import GatewayConfig
from pdserve.router.policy import NoWorkersError, RoutingDecision
from test_gateway_edge import BOS, check_error, make_model_dir, post, worker_info

BIG = 7
"""A prompt starting with this token gets 256 KiB of text per step (more than loopback buffers hold)."""
HANG_GUARD_S = 20.0


class Fake(pb_grpc.DecodeServicer):
    """Streams ``max_tokens`` steps of "A" (256 KiB of "x" for a BIG prompt, 50 ms apart);
    with ``full``, refuses every call as a worker whose waiting queue is full."""

    def __init__(self, full: bool = False) -> None:
        self.full = full
        self.num_refused = 0
        self.cancelled: list[str] = []
        self.finished: list[str] = []

    def Generate(self, request, context):
        if self.full:
            self.num_refused += 1
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "8 requests are waiting to be scheduled")
        ids = request.prompt_token_ids
        big = (ids[0] if ids[0] != BOS else ids[1]) == BIG
        steps = request.sampling_params.max_tokens
        for step in range(steps):
            if big:
                time.sleep(0.05)
            if not context.is_active():
                self.cancelled.append(request.request_id)
                return
            last = step == steps - 1
            yield pb.GenerateResponse(request_id=request.request_id, token_ids=[65],
                                      text="x" * (256 << 10) if big else "A",
                                      finish_reason=pb.LENGTH if last else pb.FINISH_REASON_UNSPECIFIED)
        self.finished.append(request.request_id)


class InOrder:
    """Routes every prompt to the first routable decode worker by id (deterministic)."""

    def __init__(self) -> None:
        self.worker_ids: list[str] = []

    def update_workers(self, workers) -> None:
        self.worker_ids = sorted(w.worker_id for w in workers if w.role in (pb.DECODE, pb.BOTH))

    def route(self, prompt_token_ids, block_hashes=None) -> RoutingDecision:
        if not self.worker_ids:
            raise NoWorkersError("none")
        return RoutingDecision(self.worker_ids[0], None, 0, 0, "in-order")

    def on_finished(self, decision, prompt_token_ids=None) -> None:
        pass


def _serve(fake: Fake) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_DecodeServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One store with a serving fake (``d0``), one with a full fake (``a-full``) and a serving one (``b-ok``)."""
    model_dir = str(make_model_dir(tmp_path_factory.mktemp("limits") / "fake"))
    fakes = {"d0": Fake(), "a-full": Fake(full=True), "b-ok": Fake()}
    servers = {wid: _serve(f) for wid, f in fakes.items()}
    one, two = ControlPlaneServer(), ControlPlaneServer()
    one.start()
    two.start()
    one.store.register(worker_info("d0", pb.DECODE, servers["d0"][1]), 3600)
    for wid in ("a-full", "b-ok"):
        two.store.register(worker_info(wid, pb.DECODE, servers[wid][1]), 3600)
    gateways: list[ServerThread] = []

    def gateway(store=one, router=None, **overrides):
        cfg = GatewayConfig(**{"store_url": store.url, "model_dir": model_dir, "stats_interval_s": 0, **overrides})
        app = create_app(cfg, router=router)
        gateways.append(ServerThread(app))
        return gateways[-1].url, app.state.gateway

    try:
        yield fakes, gateway, two
    finally:
        for g in gateways:
            g.stop()
        for server, _ in servers.values():
            server.stop(0)
        one.stop()
        two.stop()


def _connect(url: str, rcvbuf: int | None = None) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connecting: the window
    sock.settimeout(HANG_GUARD_S)
    sock.connect((host, int(port)))
    return sock


def _head(path: str, content_length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {content_length}\r\n\r\n").encode()


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _outcome(url: str, outcome: str) -> float:
    line = f'pdserve_gateway_requests_total{{endpoint="completions",outcome="{outcome}"}}'
    return sum(float(ln.split()[-1]) for ln in httpx.get(url + "/metrics").text.splitlines() if ln.startswith(line))


def _wait(cond, timeout=HANG_GUARD_S) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


OK = {"model": "fake", "prompt": "hi", "max_tokens": 2}


def test_clients_that_send_no_body_hold_no_slot(cluster):
    url, gw = cluster[1](max_inflight=2)
    idle = []
    try:
        for _ in range(300):  # headers announcing a body that never comes
            idle.append(_connect(url))
            idle[-1].sendall(_head("/v1/completions", 100))
        time.sleep(0.5)  # let the gateway start reading them all
        assert gw.num_inflight == 0
        for _ in range(3):
            r = post(url, "/v1/completions", OK)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == "AA"
    finally:
        for sock in idle:
            sock.close()
    assert _wait(lambda: gw.body_budget.num_bytes == 0) and gw.num_inflight == 0


def test_a_body_that_does_not_arrive_in_time_is_408(cluster):
    url, gw = cluster[1](body_timeout_s=0.5)
    body = json.dumps(OK).encode()
    with _connect(url) as sock:
        sock.sendall(_head("/v1/completions", len(body)) + body[:5])  # and never the rest
        answer = _read_until_closed(sock)  # the gateway answers, then closes the connection
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
    err = json.loads(payload)["error"]
    assert err["code"] == "request_timeout" and err["type"] == "invalid_request_error" and "0.5 s" in err["message"]
    assert _outcome(url, "body_timeout") == 1 and gw.num_inflight == 0 and gw.body_budget.num_bytes == 0
    assert post(url, "/v1/completions", OK).status_code == 200


def test_a_connection_that_does_not_finish_its_headers_is_closed(cluster):
    url, _ = cluster[1](header_timeout_s=0.5)
    with _connect(url) as silent, _connect(url) as partial, _connect(url) as kept:
        partial.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: te")
        # A kept-alive connection: a full request, then the start of another that never ends.
        body = json.dumps(OK).encode()
        kept.sendall(_head("/v1/completions", len(body)) + body)
        first = b""
        while b'"AA"' not in first:
            first += kept.recv(65536)
        kept.sendall(b"POST /v1/comp")
        assert _read_until_closed(silent) == b"" and _read_until_closed(partial) == b""
        assert _read_until_closed(kept) == b""
    assert post(url, "/v1/completions", OK).status_code == 200  # complete requests are unaffected


def test_the_bytes_of_bodies_being_read_are_bounded(cluster):
    url, gw = cluster[1](max_body_bytes_reading=1000)
    with _connect(url) as slow:
        slow.sendall(_head("/v1/completions", 5000) + b"x" * 900)
        assert _wait(lambda: gw.body_budget.num_bytes == 900)
        r = post(url, "/v1/completions", {**OK, "prompt": "y" * 100})
        assert check_error(r, 503, None)["code"] == "overloaded" and r.headers["retry-after"] == "1"
    assert _wait(lambda: gw.body_budget.num_bytes == 0)  # the slow client left: its bytes are free again
    assert post(url, "/v1/completions", {**OK, "prompt": "y" * 100}).status_code == 200


def test_a_stream_whose_client_stops_reading_is_ended_and_cancelled(cluster):
    fake = cluster[0]["d0"]
    url, gw = cluster[1](send_timeout_s=0.5)
    body = json.dumps({"model": "fake", "prompt": [BIG], "max_tokens": 120, "stream": True}).encode()
    with _connect(url, rcvbuf=4096) as sock:
        sock.sendall(_head("/v1/completions", len(body)) + body)
        head = sock.recv(4096)  # the stream started; from now on nothing is read
        assert head.startswith(b"HTTP/1.1 200 ")
        rid = next(ln.split(b":")[1].strip().decode() for ln in head.split(b"\r\n")
                   if ln.lower().startswith(b"x-request-id"))
        assert _wait(lambda: rid in fake.cancelled), "the generation was not cancelled"
        assert _wait(lambda: gw.num_inflight == 0)
        rest = _read_until_closed(sock)  # what was buffered, then the gateway's close
    assert not rest.endswith(b"data: [DONE]\n\n") and rid not in fake.finished
    assert _outcome(url, "send_timeout") == 1


def test_a_full_decode_worker_is_503_with_retry_after(cluster):
    fakes, gateway, two = cluster
    # Only the full worker is routable: the router routes around it for a while, but never empties the pool.
    url, _ = gateway(store=two, router=_Only("a-full"))
    before = fakes["a-full"].num_refused
    r = post(url, "/v1/completions", OK)
    check_error(r, 503, None)
    assert r.headers["retry-after"] == "1" and fakes["a-full"].num_refused > before
    r = post(url, "/v1/completions", {**OK, "stream": True})
    check_error(r, 503, None)  # a stream that cannot start gets a real status too
    assert r.headers["retry-after"] == "1"


def test_a_full_decode_worker_sends_the_request_to_another(cluster):
    fakes, gateway, two = cluster
    url, _ = gateway(store=two, router=InOrder())  # "a-full" first, "b-ok" once it is routed around
    before = fakes["a-full"].num_refused
    r = post(url, "/v1/completions", OK)
    assert r.status_code == 200, r.text
    assert fakes["a-full"].num_refused == before + 1


class _Only(InOrder):
    def __init__(self, worker_id: str) -> None:
        super().__init__()
        self.only = worker_id

    def update_workers(self, workers) -> None:
        super().update_workers([w for w in workers if w.worker_id == self.only])


def test_limits_are_validated(tmp_path):
    model_dir = str(make_model_dir(tmp_path / "fake"))
    for name in ("header_timeout_s", "body_timeout_s", "max_body_bytes_reading", "send_timeout_s", "max_connections"):
        with pytest.raises(ValueError, match=name):
            GatewayConfig(store_url="grpc://x:1", model_dir=model_dir, **{name: 0})


def test_slow_clients_do_not_block_each_other(cluster):
    """Several slow bodies time out independently, each with its own 408."""
    url, gw = cluster[1](body_timeout_s=0.5)
    answers: list[bytes] = []

    def slow() -> None:
        with _connect(url) as sock:
            sock.sendall(_head("/v1/completions", 100) + b"{")
            answers.append(_read_until_closed(sock))

    threads = [threading.Thread(target=slow) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD_S)
    assert len(answers) == 5 and all(a.startswith(b"HTTP/1.1 408 ") for a in answers)
    assert gw.body_budget.num_bytes == 0
