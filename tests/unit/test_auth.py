"""The internal plane's token (pdserve.proto.auth) on real gRPC servers.

A sync server (the embedded store's ControlPlaneServer) and a grpc.aio server (a fake
Decode service behind the same interceptor the workers use) accept a call signed with
the cluster secret and refuse, with UNAUTHENTICATED, one with a wrong secret, an expired
token, a token made for another method, or none; refusals are counted by reason.
Health checks stay open. Then the secret's sources: environment, files (mode checked),
and the client-only fallback to the local ``pdserve up``'s file.
"""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdserve.deploy import credentials
from pdserve.deploy.store import ControlPlaneServer, RemoteStore, StoreUnavailableError
from pdserve.proto import auth
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

SECRET = b"0123456789abcdef" * 4
OTHER = b"fedcba9876543210" * 4
LIST = "/pdserve.v1.ControlPlane/ListWorkers"
REGISTER = "/pdserve.v1.ControlPlane/Register"


# ------------------------------------------------------------------------ tokens


def test_token_checks():
    now = [1_700_000_000.0]
    a = auth.ClusterAuth(SECRET, clock=lambda: now[0])
    tok = a.token(LIST)
    assert tok.startswith("v1:1700000000:") and len(tok.split(":")[2]) == 64
    assert a.check(LIST, tok) is None
    assert a.check(LIST.encode(), tok.encode()) is None  # grpc.aio hands bytes around
    assert auth.ClusterAuth(OTHER, clock=lambda: now[0]).check(LIST, tok) == "bad signature"
    assert a.check(REGISTER, tok) == "bad signature"  # replay against another method
    now[0] += auth.WINDOW_S
    assert a.check(LIST, tok) is None  # the window's edge
    now[0] += 1
    assert a.check(LIST, tok) == "expired"
    assert a.check(LIST, a.token(LIST, when=now[0] + 3600)) == "expired"  # from the future too
    assert a.check(LIST, None) == "missing" and a.check(LIST, "") == "missing"
    for bad in ("v2:1:ab", "v1:x:ab", "v1:1", "v1:1:2:3", "v1:-5:ab", b"\xff"):
        assert a.check(LIST, bad) == "malformed", bad
    assert a.check(LIST, f"v1:{int(now[0])}:é") == "bad signature"  # non-ASCII MAC: no exception


def test_short_or_missing_secrets_are_refused():
    with pytest.raises(ValueError, match="at least 16"):
        auth.ClusterAuth(b"short")
    assert len(auth.generate_secret()) == 64 and auth.generate_secret() != auth.generate_secret()


# ------------------------------------------------------------------------ a sync server


def _raw_list(address: str, metadata=None):
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.ControlPlaneStub(ch).ListWorkers(pb.ListWorkersRequest(), timeout=5, metadata=metadata)


def _refused(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value
    return info.value


def test_control_plane_server_accepts_only_valid_tokens():
    with ControlPlaneServer(cluster_secret=SECRET) as server:
        good = RemoteStore(server.url, cluster_secret=SECRET)
        assert good.list_workers() == [] and good.get_pool_targets() is None
        good.close()
        wrong = RemoteStore(server.url, cluster_secret=OTHER)
        with pytest.raises(StoreUnavailableError, match="UNAUTHENTICATED"):
            wrong.list_workers()
        wrong.close()
        err = _refused(lambda: _raw_list(server.address))
        assert "missing" in err.details()
        old = auth.ClusterAuth(SECRET).token(LIST, when=time.time() - 3600)
        _refused(lambda: _raw_list(server.address, [(auth.METADATA_KEY, old)]))
        for_register = auth.ClusterAuth(SECRET).token(REGISTER)
        _refused(lambda: _raw_list(server.address, [(auth.METADATA_KEY, for_register)]))
        ok = auth.ClusterAuth(SECRET).token(LIST)
        assert _raw_list(server.address, [(auth.METADATA_KEY, ok)]).workers == []
        assert server.rejections.counts == {"bad signature": 2, "missing": 1, "expired": 1}
        assert server.rejections.total == 4


def test_secret_from_the_environment_and_loopback_rule(monkeypatch):
    monkeypatch.delenv(auth.SECRET_FILE_ENV, raising=False)
    monkeypatch.setenv(auth.SECRET_ENV, SECRET.decode())
    with ControlPlaneServer() as server:  # the environment's secret: checked
        _refused(lambda: _raw_list(server.address))
        assert RemoteStore(server.url).list_workers() == []  # the client reads the same variable
    monkeypatch.delenv(auth.SECRET_ENV)
    with pytest.raises(ValueError, match="beyond loopback"):
        ControlPlaneServer(host="0.0.0.0")
    ControlPlaneServer(host="0.0.0.0", cluster_secret=SECRET)  # allowed (not started)
    with ControlPlaneServer() as server:  # loopback, no secret: nothing checked
        assert server.rejections is None and _raw_list(server.address).workers == []


# ------------------------------------------------------------------------ a grpc.aio server


class _FakeDecode(pb_grpc.DecodeServicer):
    async def Stats(self, request, context):
        return pb.StatsResponse(num_running=7)

    async def Generate(self, request, context):
        for i in range(3):
            yield pb.GenerateResponse(token_ids=[i])


async def _aio_case() -> dict:
    interceptor = auth.AioServerAuth(SECRET, "test worker")
    server = grpc.aio.server(interceptors=[interceptor])
    pb_grpc.add_DecodeServicer_to_server(_FakeDecode(), server)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    out: dict = {}
    try:
        async with auth.aio_insecure_channel(address, SECRET) as ch:
            stub = pb_grpc.DecodeStub(ch)
            out["stats"] = (await stub.Stats(pb.StatsRequest(), timeout=5)).num_running
            out["tokens"] = [m.token_ids[0] async for m in stub.Generate(pb.GenerateRequest(), timeout=5)]
        for name, secret in (("none", None), ("wrong", OTHER)):
            async with auth.aio_insecure_channel(address, secret) as ch:
                stub = pb_grpc.DecodeStub(ch)
                try:
                    await stub.Stats(pb.StatsRequest(), timeout=5)
                except grpc.aio.AioRpcError as e:
                    out[f"{name}-stats"] = e.code()
                try:
                    async for _ in stub.Generate(pb.GenerateRequest(), timeout=5):
                        pass
                except grpc.aio.AioRpcError as e:
                    out[f"{name}-generate"] = e.code()
                reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                out[f"{name}-health"] = reply.status
        out["counts"] = dict(interceptor.rejections.counts)

        def sync_client() -> list[int]:  # WorkerProcess's kind of channel
            with auth.insecure_channel(address, SECRET) as ch:
                return [m.token_ids[0] for m in pb_grpc.DecodeStub(ch).Generate(pb.GenerateRequest(), timeout=5)]

        out["sync tokens"] = await asyncio.to_thread(sync_client)
    finally:
        await server.stop(0)
    return out


def test_aio_server_refuses_unsigned_and_wrong_calls():
    out = asyncio.run(_aio_case())
    assert out["stats"] == 7 and out["tokens"] == [0, 1, 2] and out["sync tokens"] == [0, 1, 2]
    for name in ("none", "wrong"):
        assert out[f"{name}-stats"] == grpc.StatusCode.UNAUTHENTICATED
        assert out[f"{name}-generate"] == grpc.StatusCode.UNAUTHENTICATED
        assert out[f"{name}-health"] == health_pb2.HealthCheckResponse.SERVING  # open, reveals nothing
    assert out["counts"] == {"missing": 2, "bad signature": 2}


def test_sync_client_signs_every_kind_of_call():
    with ControlPlaneServer(cluster_secret=SECRET) as server:
        ch = auth.insecure_channel(server.address, SECRET)
        stub = pb_grpc.ControlPlaneStub(ch)
        assert stub.ListWorkers(pb.ListWorkersRequest(), timeout=5).workers == []
        # caller metadata is kept alongside the token
        assert stub.ListWorkers(pb.ListWorkersRequest(), timeout=5, metadata=[("x-extra", "1")]).workers == []
        ch.close()
        assert server.rejections.total == 0


# ------------------------------------------------------------------------ where the secret comes from


def test_secret_files_must_be_private(tmp_path, monkeypatch):
    path = tmp_path / "secret"
    auth.write_secret_file(path, SECRET)
    assert (path.stat().st_mode & 0o777) == 0o600 and auth.read_secret_file(path) == SECRET
    monkeypatch.delenv(auth.SECRET_ENV, raising=False)
    monkeypatch.setenv(auth.SECRET_FILE_ENV, str(path))
    assert auth.load_secret() == SECRET
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        auth.load_secret()
    monkeypatch.setenv(auth.SECRET_ENV, OTHER.decode())
    assert auth.load_secret() == OTHER  # the value wins over the file
    assert auth.load_secret({}) is None


def test_client_falls_back_to_the_local_up_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_HOME", str(tmp_path))
    monkeypatch.delenv(auth.SECRET_ENV, raising=False)
    monkeypatch.delenv(auth.SECRET_FILE_ENV, raising=False)
    assert credentials.client_secret() is None
    local = credentials.LocalSecret(SECRET)
    assert local.path == tmp_path / "cluster-secret" and (local.path.stat().st_mode & 0o777) == 0o600
    assert credentials.client_secret() == SECRET and credentials.client_secret(OTHER) == OTHER
    assert auth.load_secret() is None  # servers never read it
    local.remove()
    assert not local.path.exists()


def test_loopback_and_store_url_helpers():
    assert all(auth.is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"))
    assert not any(auth.is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "node-1", ""))
    assert credentials.redact("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert credentials.strip_password("redis://u:p%40w@h:1/0") == "redis://u@h:1/0"
    assert credentials.url_password("redis://u:p%40w@h:1/0") == "p@w"
    assert credentials.url_password("rediss://h:1/0") is None
