"""The authenticated internal plane, end to end (docs/security.md).

* A real prefill worker, decode worker and embedded store started with a cluster
  secret (given to the workers through their environment, as plain-process workers get
  it) refuse a client without it, or with another one, with UNAUTHENTICATED: Generate
  and Stats on the decode worker, Prefill with any destination on the prefill worker,
  ListWorkers and Register on the store. Health checks stay open. A gateway given the
  secret serves completions on both prefill paths (the decode worker signs its hop to
  the prefill worker). Every socket the workers listen on is on 127.0.0.1.
* A worker asked to listen beyond loopback without a secret refuses to start.
* Redis with ``requirepass``: the store needs the password (environment, 0600 file, or
  URL) and says so when it is missing or wrong; over TLS (``rediss://``) too when this
  machine's redis-server has TLS.
* A local Ray the launcher starts listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import grpc
import httpx
import pytest

from pdserve.deploy.processes import WorkerProcess, wait_all_free
from pdserve.deploy.store import open_store
from pdserve.deploy.store.base import StoreUnavailableError
from pdserve.deploy.store.embedded import ControlPlaneServer
from pdserve.engine import SamplingParams
from pdserve.engine.tiny_model import make_tiny_model
from pdserve.proto import auth, convert
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.router.app import ServerThread, create_app
from pdserve.router.gateway import GatewayConfig
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis_server import RedisServer, make_tls_files, redis_has_tls
from test_store_contract import make_worker

pytestmark = pytest.mark.integration

SECRET = auth.generate_secret()
OTHER = auth.generate_secret()
NUM_BLOCKS = 32


def _worker(role: str, model_dir, store_url: str, worker_id: str) -> WorkerProcess:
    return WorkerProcess(role, ["--model", str(model_dir), "--store", store_url, "--worker-id", worker_id,
                                "--num-kv-blocks", str(NUM_BLOCKS), "--transfer-backend", "nixl",
                                "--heartbeat-ttl", "5", "--prefill-timeout", "10", "--log-level", "WARNING"],
                         cluster_secret=SECRET)


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("security") / "tiny-llama")
    store = ControlPlaneServer(cluster_secret=SECRET)
    store.start()
    workers = [_worker("prefill", model_dir, store.url, "p0"), _worker("decode", model_dir, store.url, "d0")]
    try:
        for w in workers:
            w.wait_ready()
        yield model_dir, store, *workers
    finally:
        for w in reversed(workers):
            w.stop()
        store.stop()


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _generate_req(prompt: list[int]) -> pb.GenerateRequest:
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    return pb.GenerateRequest(request_id="intruder", prompt_token_ids=prompt,
                              sampling_params=convert.sampling_message(params))


def test_clients_without_the_secret_are_refused(secured):
    _, store, p, d = secured
    prefill_req = pb.PrefillRequest(request_id="x", prompt_token_ids=list(range(40)),
                                    sampling_params=convert.sampling_message(SamplingParams(max_tokens=1)),
                                    destination=pb.KVDestination(worker_id="d0", transfer_id="t", block_ids=[0, 1, 2]))
    for secret in (None, OTHER):
        with auth.insecure_channel(d.address, secret) as ch:
            stub = pb_grpc.DecodeStub(ch)
            assert _code(lambda: list(stub.Generate(_generate_req(list(range(5, 40))), timeout=10))) \
                == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda: stub.Stats(pb.StatsRequest(), timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # open: reveals nothing else
        with auth.insecure_channel(p.address, secret) as ch:
            assert _code(lambda: pb_grpc.PrefillStub(ch).Prefill(prefill_req, timeout=10)) \
                == grpc.StatusCode.UNAUTHENTICATED
        with auth.insecure_channel(store.address, secret) as ch:
            stub = pb_grpc.ControlPlaneStub(ch)
            assert _code(lambda: stub.ListWorkers(pb.ListWorkersRequest(), timeout=10)) \
                == grpc.StatusCode.UNAUTHENTICATED
            reg = pb.RegisterRequest(worker=make_worker("d0"), ttl_ms=60_000)  # would hijack d0's entry
            assert _code(lambda: stub.Register(reg, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    assert store.rejections.counts == {"missing": 2, "bad signature": 2}
    assert store.store.get_worker("d0").address == d.address
    assert d.stats().num_running == 0  # the worker's own client (WorkerProcess) signs: accepted


def test_gateway_with_the_secret_serves_both_paths(secured):
    model_dir, store, p, d = secured
    app = create_app(GatewayConfig(store_url=store.url, model_dir=str(model_dir), disagg_threshold_tokens=16,
                                   cluster_secret=SECRET))
    srv = ServerThread(app)
    try:
        before = p.stats().transfer_count
        for prompt in ("Hi", "a longer prompt that certainly has more than sixteen tokens in it, " * 2):
            r = httpx.post(srv.url + "/v1/completions", timeout=60, json={
                "model": model_dir.name, "prompt": prompt, "max_tokens": 4, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 4
        assert p.stats().transfer_count == before + 1  # the long prompt went through the prefill worker
        assert wait_all_free([d, p])
    finally:
        srv.stop()


def _listeners(pid: int) -> list[str]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [ln.split()[3] for ln in out.splitlines() if f"pid={pid}," in ln]


def _on_loopback(address: str) -> bool:
    return address.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]")


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_workers_listen_on_loopback_only(secured):
    _, store, p, d = secured
    for w in (p, d):
        found = _listeners(w.proc.pid)
        assert len(found) >= 3, found  # gRPC, metrics, NIXL/UCX
        assert all(_on_loopback(a) for a in found), (w.role, found)
        print(w.role, "listens on", sorted(found))
    mine = _listeners(os.getpid())  # the store server (and nothing else of this process) listens
    assert mine and all(_on_loopback(a) for a in mine), mine
    print("store listens on", mine)


def test_worker_refuses_to_listen_beyond_loopback_without_a_secret(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (auth.SECRET_ENV, auth.SECRET_FILE_ENV)}
    out = subprocess.run([sys.executable, "-m", "pdserve.deploy.runner", "--role", "decode", "--model",
                          str(tmp_path), "--store", "grpc://127.0.0.1:1", "--host", "0.0.0.0"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "beyond loopback" in out.stderr, out.stderr


# ------------------------------------------------------------------------ Redis


def _roundtrip(store) -> None:
    try:
        store.register(make_worker("w-auth"), 30)
        assert [w.worker_id for w in store.list_workers()] == ["w-auth"]
        store.deregister("w-auth")
    finally:
        store.close()


def test_redis_with_a_password(tmp_path, monkeypatch):
    password = "pw-" + auth.generate_secret().decode()[:24]
    monkeypatch.delenv("PDSERVE_REDIS_PASSWORD", raising=False)
    monkeypatch.delenv("PDSERVE_REDIS_PASSWORD_FILE", raising=False)
    with RedisServer(password=password) as srv:
        with pytest.raises(StoreUnavailableError, match="refused our credentials"):
            _roundtrip(open_store(srv.url))
        with pytest.raises(StoreUnavailableError, match="refused our credentials") as info:
            _roundtrip(open_store(srv.url, password="wrong"))
        assert "wrong" not in str(info.value)
        _roundtrip(open_store(srv.url, password=password))
        _roundtrip(open_store(srv.url.replace("://", f"://:{password}@")))
        monkeypatch.setenv("PDSERVE_REDIS_PASSWORD", password)
        _roundtrip(open_store(srv.url))
        monkeypatch.delenv("PDSERVE_REDIS_PASSWORD")
        path = tmp_path / "redis-password"
        auth.write_secret_file(path, password.encode())
        monkeypatch.setenv("PDSERVE_REDIS_PASSWORD_FILE", str(path))
        _roundtrip(open_store(srv.url))
        path.chmod(0o644)
        with pytest.raises(ValueError, match="chmod 600"):
            open_store(srv.url)


@pytest.mark.skipif(not redis_has_tls(), reason="this machine's redis-server was built without TLS")
def test_redis_over_tls(tmp_path, monkeypatch):
    tls = make_tls_files(tmp_path)
    monkeypatch.setenv("PDSERVE_REDIS_PASSWORD", "tls-password-1234")
    with RedisServer(password="tls-password-1234", tls=tls) as srv:
        assert srv.url.startswith("rediss://")
        _roundtrip(open_store(f"{srv.url}?ssl_ca_certs={tls.ca}"))
        with pytest.raises(StoreUnavailableError):  # plaintext to the TLS port
            _roundtrip(open_store(srv.url.replace("rediss://", "redis://")))


# ------------------------------------------------------------------------ Ray


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_local_ray_listens_on_loopback_only():
    ray = pytest.importorskip("ray")
    from pdserve.deploy.ray_launcher import LOCAL_OBJECT_STORE_BYTES, _start_local_ray

    if ray.is_initialized():
        pytest.skip("Ray is already running in this process")

    def listening() -> set[str]:
        out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
        return {ln.split()[3] for ln in out.splitlines()}

    before = listening()
    _start_local_ray(num_cpus=1, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                     configure_logging=False, log_to_driver=False)
    try:
        @ray.remote
        def node_ip() -> str:
            return ray.util.get_node_ip_address()

        assert ray.get(node_ip.remote()) == "127.0.0.1"
        new = listening() - before
        assert len(new) >= 4, new  # GCS, raylet (2), agents, a worker
        assert all(_on_loopback(a) for a in new), new
        print("local Ray listens on", sorted(new))
        assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") is None  # restored for later Rays
    finally:
        ray.shutdown()
