"""Overload against a real decode worker: its waiting queue is bounded, and a streaming
client that stops reading is cut off with every KV block freed.

One decode worker process on the tiny model (it prefills locally) running one
sequence at a time with room for one waiting request (``--max-num-seqs 1
--max-waiting-requests 1``), an embedded control-plane store, and the gateway under
uvicorn in a thread. Raw sockets play the clients that never read. Every wait has a
hang guard; none is a performance threshold.
"""

from __future__ import annotations

import json
import socket
import time

import grpc
import httpx
import pytest

from pdserve.deploy.processes import WorkerProcess
from pdserve.deploy.store.embedded import ControlPlaneServer
from pdserve.engine import SamplingParams
from pdserve.engine.tiny_model import make_tiny_model
from pdserve.router.app import ServerThread, create_app
from pdserve.router.gateway import GatewayConfig

pytestmark = pytest.mark.integration

HANG_GUARD_S = 60.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("overload") / "tiny-llama")
    store = ControlPlaneServer()
    store.start()
    worker = WorkerProcess("decode", ["--model", str(model_dir), "--store", store.url, "--worker-id", "d0",
                                      "--num-kv-blocks", "256", "--max-num-seqs", "1", "--max-waiting-requests", "1",
                                      "--heartbeat-ttl", "5", "--log-level", "WARNING"])
    servers: list[ServerThread] = []

    def gateway(**overrides) -> ServerThread:
        cfg = GatewayConfig(**{"store_url": store.url, "model_dir": str(model_dir), **overrides})
        servers.append(ServerThread(create_app(cfg)))
        return servers[-1]

    try:
        worker.wait_ready()
        yield worker, gateway, model_dir.name
    finally:
        for srv in servers:
            srv.stop()
        worker.stop()
        store.stop()


def _wait(cond, timeout=HANG_GUARD_S) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cond()


def _open_stream(url: str, body: dict, rcvbuf: int | None = None) -> socket.socket:
    """A streaming request sent on a raw socket whose answer nobody reads (yet)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(HANG_GUARD_S)
    sock.connect((host, int(port)))
    data = json.dumps({**body, "stream": True}).encode()
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_a_full_waiting_queue_is_refused_with_503_and_retry_after(cluster):
    worker, gateway, model = cluster
    url = gateway().url
    long = {"model": model, "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True}
    running = _open_stream(url, long)
    try:
        assert _wait(lambda: worker.stats().num_running == 1)
        waiting = _open_stream(url, long)  # max_num_seqs 1: it waits
        try:
            assert _wait(lambda: worker.stats().num_waiting == 1)
            # The queue is full: refused before any work, straight from the worker and through the gateway.
            with pytest.raises(grpc.RpcError) as refused:
                worker.generate("direct", [1, 2, 3], SamplingParams(max_tokens=1))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_waiting_requests=1" in refused.value.details()
            for stream in (False, True):
                r = httpx.post(url + "/v1/completions", json={**long, "max_tokens": 1, "stream": stream}, timeout=30)
                assert r.status_code == 503, r.text
                assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "server_error"
            stats = worker.stats()
            assert stats.num_running == 1 and stats.num_waiting == 1  # the refused ones left no trace
        finally:
            waiting.close()
    finally:
        running.close()
    assert _wait(worker.all_free)


def test_a_client_that_stops_reading_is_cut_off_and_its_blocks_freed(cluster):
    worker, gateway, model = cluster
    srv = gateway(send_timeout_s=0.5)
    # Small socket buffers on the gateway's side of new connections, so a client that
    # reads nothing blocks the first big write (the prompt logprobs, ~100 KB).
    srv.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    body = {"model": model, "prompt": "the cat sat on the mat " * 50, "max_tokens": 1500, "ignore_eos": True,
            "prompt_logprobs": 20}
    sock = _open_stream(srv.url, body, rcvbuf=4096)
    try:
        assert _wait(lambda: worker.stats().num_running == 1)
        # The send times out, the gateway ends the stream and cancels: the worker frees every block
        # while this client is still connected and the request still far from its 1500 tokens.
        assert _wait(worker.all_free)
        received = b""
        while chunk := sock.recv(1 << 20):  # what was buffered, then the gateway's close
            received += chunk
    finally:
        sock.close()
    assert received.startswith(b"HTTP/1.1 200 ") and not received.endswith(b"data: [DONE]\n\n")
    text = httpx.get(srv.url + "/metrics").text
    assert 'pdserve_gateway_requests_total{endpoint="completions",outcome="send_timeout"} 1.0' in text
