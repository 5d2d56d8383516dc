"""A client process that lives in one network namespace and acts for the test.

The test process sits in the root namespace, which has no route to the hosts, so
everything a client does (HTTP to the gateways, gRPC to the workers, probes of every
port) runs here, in the ``client`` host. One JSON object per line on stdin is a
command ``{"id": N, "op": NAME, ...}``; each runs on its own thread (so a stream can
go on while other calls are made) and answers one line on stdout
``{"id": N, "ok": true, "result": ...}`` or ``{"id": N, "ok": false, "error": "..."}``.

Ops: ``http`` (one request, the whole body), ``sse`` (a streamed request: every
``data:`` payload), ``stats`` (a worker's Stats), ``wait_busy`` (poll a worker's Stats
until it runs or queues something), ``workers`` (the store's registry), ``grpc_probe``
(an unauthenticated unary call: the status code), ``tcp_probe`` (send bytes, read the
answer). Worker calls are signed with the cluster secret of the agent's environment
(``PDSERVE_CLUSTER_SECRET``), the store is opened with ``PDSERVE_REDIS_PASSWORD``;
``grpc_probe`` and ``tcp_probe`` use neither.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
from google.protobuf import json_format

from pdserve.proto import auth
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

_OUT_LOCK = threading.Lock()


def _reply(msg: dict) -> None:
    with _OUT_LOCK:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()


def op_http(url: str, method: str = "GET", body=None, headers=None, timeout: float = 60.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return {"status": r.status, "body": r.read().decode(errors="replace"), "elapsed_s": time.monotonic() - t0}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": e.read().decode(errors="replace"), "elapsed_s": time.monotonic() - t0}
    except (OSError, urllib.error.URLError) as e:
        return {"status": None, "error": f"{type(e).__name__}: {e}", "elapsed_s": time.monotonic() - t0}


def op_sse(url: str, body: dict, headers=None, timeout: float = 60.0) -> dict:
    """A streamed request: the status and every ``data:`` payload, in order."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", **(headers or {})})
    t0 = time.monotonic()
    events: list[str] = []
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for raw in r:
                line = raw.decode(errors="replace").strip()
                if line.startswith("data:"):
                    events.append(line[5:].strip())
            return {"status": r.status, "events": events, "elapsed_s": time.monotonic() - t0}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": e.read().decode(errors="replace"), "events": events,
                "elapsed_s": time.monotonic() - t0}
    except (OSError, urllib.error.URLError) as e:
        return {"status": None, "error": f"{type(e).__name__}: {e}", "events": events,
                "elapsed_s": time.monotonic() - t0}


def _stub(address: str, role: str):
    """A stub whose calls carry the cluster secret of this process's environment."""
    ch = auth.insecure_channel(address, auth.load_secret())
    return ch, (pb_grpc.PrefillStub(ch) if role == "prefill" else pb_grpc.DecodeStub(ch))


def op_stats(address: str, role: str, timeout: float = 5.0) -> dict:
    ch, stub = _stub(address, role)
    with ch:
        msg = stub.Stats(pb.StatsRequest(), timeout=timeout)
    return json_format.MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def op_wait_busy(address: str, role: str, timeout: float = 30.0) -> dict:
    """Poll Stats until the worker runs or queues a request; returns that Stats."""
    ch, stub = _stub(address, role)
    deadline = time.monotonic() + timeout
    with ch:
        while time.monotonic() < deadline:
            msg = stub.Stats(pb.StatsRequest(), timeout=5.0)
            if msg.num_running or msg.num_waiting:
                return json_format.MessageToDict(msg, preserving_proto_field_name=True)
            time.sleep(0.01)
    raise TimeoutError(f"{address} did not get busy within {timeout} s")


def op_workers(store_url: str) -> list[dict]:
    from pdserve.deploy.store import open_store  # noqa: PLC0415

    store = open_store(store_url)
    try:
        return [{"worker_id": w.worker_id, "role": pb.Role.Name(w.role), "address": w.address,
                 "metrics_url": w.metrics_url, "draining": w.draining,
                 "num_ranks": len(w.transfer.ranks)} for w in store.list_workers()]
    finally:
        store.close()


def op_grpc_probe(address: str, method: str, timeout: float = 5.0) -> dict:
    """Call ``method`` with an empty request and no credentials (a plain channel, no
    token): the status it ends with."""
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            call(b"", timeout=timeout)
            return {"code": "OK", "details": ""}
        except grpc.RpcError as e:
            return {"code": e.code().name, "details": e.details() or ""}


def op_tcp_probe(host: str, port: int, send: str = "", timeout: float = 3.0) -> dict:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            if send:
                s.sendall(send.encode())
            s.settimeout(timeout)
            try:
                data = s.recv(512)
            except socket.timeout:
                data = b""
            return {"connected": True, "answer": data.decode(errors="replace")}
    except OSError as e:
        return {"connected": False, "error": f"{type(e).__name__}: {e}"}


OPS = {"http": op_http, "sse": op_sse, "stats": op_stats, "wait_busy": op_wait_busy, "workers": op_workers,
       "grpc_probe": op_grpc_probe, "tcp_probe": op_tcp_probe}


def _handle(cmd: dict) -> None:
    rid = cmd.pop("id")
    try:
        result = OPS[cmd.pop("op")](**cmd)
        _reply({"id": rid, "ok": True, "result": result})
    except BaseException as e:  # noqa: BLE001 - reported to the test
        _reply({"id": rid, "ok": False, "error": f"{type(e).__name__}: {e}"})


def main() -> None:
    _reply({"id": 0, "ok": True, "result": "ready"})
    for line in sys.stdin:
        if line.strip():
            threading.Thread(target=_handle, args=(json.loads(line),), daemon=True).start()


if __name__ == "__main__":
    main()
