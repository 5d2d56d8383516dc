"""One contract for every control-plane store backend.

Backends: ``embedded`` (EmbeddedStore in this process), ``remote`` (an EmbeddedStore
behind a real ControlPlaneServer, used through RemoteStore over gRPC) and ``redis``
(RedisStore on a real redis-server started for the session, see tests/redis_server.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest
from redis_server import redis_url  # noqa: F401  (session fixture)

from pdserve.deploy.store import (
    ControlPlaneServer,
    ControlPlaneStore,
    EmbeddedStore,
    IncompatibleWorkerError,
    RemoteStore,
    StoreClosedError,
    open_store,
)
from pdserve.deploy.store.redis_store import RedisStore
from pdserve.proto import PROTOCOL_VERSION
from pdserve.proto import pdserve_pb2 as pb

pytestmark = pytest.mark.integration

TTL = 0.3  # seconds; short so expiry tests are fast
LONG_TTL = 30.0


def make_worker(worker_id: str, role=pb.DECODE, started_at_ms: int = 1000, **overrides) -> pb.WorkerInfo:
    w = pb.WorkerInfo(
        worker_id=worker_id,
        role=role,
        address=f"127.0.0.1:{5000 + len(worker_id)}",
        protocol_version=PROTOCOL_VERSION,
        model=pb.ModelIdentity(name="tiny-llama", architecture="LlamaForCausalLM", weights_digest="sha256:abc", vocab_size=512),
        kv_layout=pb.KVLayout(
            layout="layer,block,kv,head,token,dim", num_layers=2, num_kv_heads=4, head_dim=16, block_size=16, dtype="float32", tp_size=1
        ),
        transfer=pb.TransferEndpoint(
            backend=pb.TORCH_DIST, ranks=[pb.RankAgent(tp_rank=0, agent_name=f"{worker_id}-r0", metadata=b"\x00\xffmeta", num_blocks=64)]
        ),
        num_kv_blocks=64,
        node_id="node-0",
        started_at_ms=started_at_ms,
    )
    for path, value in overrides.items():
        target = w
        parts = path.split("__")
        for p in parts[:-1]:
            target = getattr(target, p)
        setattr(target, parts[-1], value)
    return w


def stored(*hashes: int) -> pb.KVEvent:
    return pb.KVEvent(stored=pb.BlocksStored(block_hashes=list(hashes), token_ids=[1, 2], block_size=16))


def read_all(store: ControlPlaneStore, after_seq: int = 0) -> list[pb.KVEvent]:
    out = []
    while True:
        batch = store.read_kv_events(after_seq, 1000)
        out += batch.events
        if not batch.events:
            return out
        after_seq = batch.events[-1].seq


def cleared_for(events, worker_id: str) -> int:
    return sum(1 for e in events if e.worker_id == worker_id and e.WhichOneof("event") == "cleared")


# ---------------------------------------------------------------------------- backends


class Backend:
    """One shared store; ``client()`` opens another client of it (same object for embedded)."""

    def __init__(self, kind: str, redis_url: str | None, max_retained_events: int):
        self.kind = kind
        self._clients: list[ControlPlaneStore] = []
        self._server = None
        if kind == "embedded":
            self._store = EmbeddedStore(max_retained_events=max_retained_events)
        elif kind == "remote":
            self._server = ControlPlaneServer(EmbeddedStore(max_retained_events=max_retained_events))
            self._server.start()
        elif kind == "redis":
            self._redis = (redis_url, f"test-{uuid.uuid4().hex[:12]}", max_retained_events)
        else:
            raise ValueError(kind)

    def client(self) -> ControlPlaneStore:
        if self.kind == "embedded":
            return self._store
        if self.kind == "remote":
            c = RemoteStore(self._server.address)
        else:
            url, ns, maxlen = self._redis
            c = RedisStore(url, namespace=ns, max_retained_events=maxlen)
        self._clients.append(c)
        return c

    def close(self) -> None:
        for c in self._clients:
            c.close()
        if self.kind == "embedded":
            self._store.close()
        if self._server is not None:
            self._server.stop(grace=None)
            self._server.store.close()


@pytest.fixture(params=["embedded", "remote", "redis"])
def backend_factory(request):
    made: list[Backend] = []

    def make(max_retained_events: int = 10_000) -> Backend:
        url = request.getfixturevalue("redis_url") if request.param == "redis" else None
        b = Backend(request.param, url, max_retained_events)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture
def backend(backend_factory) -> Backend:
    return backend_factory()


@pytest.fixture
def store(backend) -> ControlPlaneStore:
    return backend.client()


# ------------------------------------------------------------------------------ registry


def test_register_list_get(store):
    assert store.list_workers() == []
    assert store.get_worker("d0") is None
    d0 = make_worker("d0")
    store.register(d0, LONG_TTL)
    store.register(make_worker("p0", role=pb.PREFILL), LONG_TTL)
    assert [w.worker_id for w in store.list_workers()] == ["d0", "p0"]
    got = store.get_worker("d0")
    assert got == d0  # every field round-trips, bytes metadata included
    assert got.transfer.ranks[0].metadata == b"\x00\xffmeta"
    assert store.get_worker("nope") is None


def test_role_filtering_counts_both(store):
    store.register(make_worker("p0", role=pb.PREFILL), LONG_TTL)
    store.register(make_worker("d0", role=pb.DECODE), LONG_TTL)
    store.register(make_worker("b0", role=pb.BOTH), LONG_TTL)
    ids = lambda role: [w.worker_id for w in store.list_workers(role)]  # noqa: E731
    assert ids(None) == ["b0", "d0", "p0"]
    assert ids(pb.ROLE_UNSPECIFIED) == ["b0", "d0", "p0"]
    assert ids(pb.PREFILL) == ["b0", "p0"]
    assert ids(pb.DECODE) == ["b0", "d0"]
    assert ids(pb.BOTH) == ["b0"]


def test_register_rejects_bad_input(store):
    with pytest.raises(ValueError):
        store.register(make_worker(""), LONG_TTL)
    with pytest.raises(ValueError):
        store.register(make_worker("x", role=pb.ROLE_UNSPECIFIED), LONG_TTL)
    with pytest.raises(ValueError):
        store.register(make_worker("x"), 0)
    assert store.list_workers() == []


INCOMPATIBLE = [
    ("protocol_version", dict(protocol_version=PROTOCOL_VERSION + 1)),
    ("model.name", dict(model__name="other-model")),
    ("model.architecture", dict(model__architecture="Qwen2ForCausalLM")),
    ("model.weights_digest", dict(model__weights_digest="sha256:def")),
    ("model.vocab_size", dict(model__vocab_size=1024)),
    ("kv_layout.layout", dict(kv_layout__layout="layer,block,token,kv,head,dim")),
    ("kv_layout.num_layers", dict(kv_layout__num_layers=3)),
    ("kv_layout.num_kv_heads", dict(kv_layout__num_kv_heads=8)),
    ("kv_layout.head_dim", dict(kv_layout__head_dim=32)),
    ("kv_layout.block_size", dict(kv_layout__block_size=32)),
    ("kv_layout.dtype", dict(kv_layout__dtype="bfloat16")),
]


@pytest.mark.parametrize("field,overrides", INCOMPATIBLE, ids=[f for f, _ in INCOMPATIBLE])
def test_incompatible_worker_is_refused(store, field, overrides):
    store.register(make_worker("d0"), LONG_TTL)
    before = read_all(store)
    bad = make_worker("p0", role=pb.PREFILL, **overrides)
    with pytest.raises(IncompatibleWorkerError) as info:
        store.register(bad, LONG_TTL)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.field == field
    msg = str(err)
    assert field.split(".")[-1] in msg and "p0" in msg
    mine, theirs = _field(bad, field), _field(make_worker("d0"), field)
    assert str(mine) in msg and str(theirs) in msg, msg
    # nothing registered, nothing published
    assert [w.worker_id for w in store.list_workers()] == ["d0"]
    assert store.get_worker("p0") is None
    assert read_all(store) == before


def _field(w, path):
    for p in path.split("."):
        w = getattr(w, p)
    return w


def test_protocol_version_is_refused_even_when_alone(store):
    with pytest.raises(IncompatibleWorkerError, match="protocol_version"):
        store.register(make_worker("d0", protocol_version=PROTOCOL_VERSION + 1), LONG_TTL)
    assert store.list_workers() == []


def test_different_tp_size_is_accepted(store):
    store.register(make_worker("d0", kv_layout__tp_size=1), LONG_TTL)
    store.register(make_worker("p0", role=pb.PREFILL, kv_layout__tp_size=4, num_kv_blocks=999, node_id="node-1"), LONG_TTL)
    assert {w.worker_id: w.kv_layout.tp_size for w in store.list_workers()} == {"d0": 1, "p0": 4}


def test_sole_worker_may_change_model_when_re_registering(store):
    store.register(make_worker("d0"), LONG_TTL)
    store.register(make_worker("d0", started_at_ms=2000, model__weights_digest="sha256:new"), LONG_TTL)
    assert store.get_worker("d0").model.weights_digest == "sha256:new"


def test_heartbeat_keeps_alive_and_expiry_emits_one_cleared(store):
    # A 1 s lease renewed every 0.1 s: a scheduling stall on a loaded 2-core machine
    # must not look like a missed heartbeat.
    lease = 1.0
    store.register(make_worker("d0"), lease)
    store.register(make_worker("d1"), LONG_TTL)
    t_end = time.monotonic() + 2 * lease
    while time.monotonic() < t_end:  # alive well past one lease thanks to heartbeats
        assert store.heartbeat("d0", lease) is True
        time.sleep(0.1)
    assert store.heartbeat("d0", LONG_TTL) is True  # still live after two leases
    assert store.get_worker("d0") is not None
    assert cleared_for(read_all(store), "d0") == 0
    assert store.heartbeat("d0", TTL) is True  # a short lease again, then no more heartbeats
    time.sleep(TTL * 1.5)
    assert [w.worker_id for w in store.list_workers()] == ["d1"]
    assert store.get_worker("d0") is None
    assert store.heartbeat("d0", TTL) is False  # must re-register
    store.reap_expired()
    store.list_workers()
    events = read_all(store)
    assert cleared_for(events, "d0") == 1 and cleared_for(events, "d1") == 0
    # re-registering after expiry (same started_at_ms) works and emits nothing more
    store.register(make_worker("d0"), LONG_TTL)
    assert store.heartbeat("d0", LONG_TTL) is True
    assert cleared_for(read_all(store), "d0") == 1


def test_expiry_noticed_by_several_clients_emits_once(backend):
    clients = [backend.client() for _ in range(3)]
    clients[0].register(make_worker("d0"), TTL)
    time.sleep(TTL * 1.5)
    barrier = threading.Barrier(len(clients))

    def notice(c):
        barrier.wait()
        c.list_workers()
        c.read_kv_events(0, 10)

    threads = [threading.Thread(target=notice, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cleared_for(read_all(clients[1]), "d0") == 1


def test_heartbeat_unknown_worker(store):
    assert store.heartbeat("ghost", TTL) is False
    assert store.list_workers() == []


def test_restart_emits_cleared(store):
    store.register(make_worker("d0", started_at_ms=1000), LONG_TTL)
    last = store.publish_kv_events("d0", [stored(1, 2)])
    store.register(make_worker("d0", started_at_ms=1000), LONG_TTL)  # a retry: no restart
    assert store.read_kv_events(last, 10).events == []
    store.register(make_worker("d0", started_at_ms=2000, address="127.0.0.1:9999"), LONG_TTL)
    events = store.read_kv_events(last, 10).events
    assert [(e.worker_id, e.WhichOneof("event")) for e in events] == [("d0", "cleared")]
    assert events[0].seq == last + 1
    got = store.list_workers()
    assert len(got) == 1 and got[0].started_at_ms == 2000 and got[0].address == "127.0.0.1:9999"


def test_deregister(store):
    store.register(make_worker("d0"), LONG_TTL)
    store.register(make_worker("p0", role=pb.PREFILL), LONG_TTL)
    store.deregister("d0")
    assert [w.worker_id for w in store.list_workers()] == ["p0"]
    assert store.get_worker("d0") is None
    assert store.heartbeat("d0", LONG_TTL) is False
    store.deregister("d0")  # again: no-op
    store.deregister("never-registered")
    events = read_all(store)
    assert cleared_for(events, "d0") == 1 and len(events) == 1


# ---------------------------------------------------------------------------- KV events


def test_publish_assigns_consecutive_seq_and_worker_id(store):
    assert store.read_kv_events(0, 10) == ([], 1, 0)
    assert store.publish_kv_events("d0", []) == 0
    ev = stored(7)
    ev.seq, ev.worker_id = 999, "liar"  # ignored
    assert store.publish_kv_events("d0", [ev, pb.KVEvent(removed=pb.BlocksRemoved(block_hashes=[2**64 - 1]))]) == 2
    assert store.publish_kv_events("p0", [stored(8)]) == 3
    assert store.publish_kv_events("p0", []) == 3
    batch = store.read_kv_events(0, 10)
    assert batch.first_available_seq == 1 and batch.last_seq == 3
    assert [(e.seq, e.worker_id, e.WhichOneof("event")) for e in batch.events] == [
        (1, "d0", "stored"), (2, "d0", "removed"), (3, "p0", "stored"),
    ]
    assert list(batch.events[0].stored.block_hashes) == [7]
    assert list(batch.events[1].removed.block_hashes) == [2**64 - 1]


def test_publish_rejects_events_without_payload(store):
    with pytest.raises(ValueError):
        store.publish_kv_events("d0", [stored(1), pb.KVEvent()])
    with pytest.raises(ValueError):
        store.publish_kv_events("", [stored(1)])
    assert store.read_kv_events(0, 10).last_seq == 0  # nothing appended


def test_read_pagination(store):
    for i in range(5):
        store.publish_kv_events("d0", [stored(10 * i + j) for j in range(5)])
    seen, after, pages = [], 0, 0
    while True:
        batch = store.read_kv_events(after, 7)
        assert len(batch.events) <= 7 and batch.last_seq == 25 and batch.first_available_seq == 1
        if not batch.events:
            break
        pages += 1
        seen += [e.seq for e in batch.events]
        after = batch.events[-1].seq
    assert seen == list(range(1, 26)) and pages == 4
    assert [e.seq for e in store.read_kv_events(20, 1000).events] == [21, 22, 23, 24, 25]
    assert store.read_kv_events(25, 10).events == []
    with pytest.raises(ValueError):
        store.read_kv_events(0, 0)


def test_seq_consecutive_across_concurrent_publishers(backend):
    clients = [backend.client(), backend.client()]
    n_batches, batch_size = 40, 3
    returned: list[list[int]] = [[], []]
    barrier = threading.Barrier(2)

    def publish(i):
        barrier.wait()
        for b in range(n_batches):
            returned[i].append(clients[i].publish_kv_events(f"w{i}", [stored(i, b, k) for k in range(batch_size)]))

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = read_all(clients[0])
    total = 2 * n_batches * batch_size
    assert [e.seq for e in events] == list(range(1, total + 1))
    for i in range(2):
        mine = [e for e in events if e.worker_id == f"w{i}"]
        assert len(mine) == n_batches * batch_size
        # a batch is contiguous and in order; the returned seq is its last event's
        assert [list(e.stored.block_hashes) for e in mine] == [[i, b, k] for b in range(n_batches) for k in range(batch_size)]
        for b, last in enumerate(returned[i]):
            batch = [e for e in events if e.seq in range(last - batch_size + 1, last + 1)]
            assert all(e.worker_id == f"w{i}" and e.stored.block_hashes[1] == b for e in batch)


def test_trimming_makes_gap_detectable(backend_factory):
    store = backend_factory(max_retained_events=10).client()
    for i in range(25):
        store.publish_kv_events("d0", [stored(i)])
    batch = store.read_kv_events(0, 100)
    assert batch.last_seq == 25 and batch.first_available_seq == 16
    assert [e.seq for e in batch.events] == list(range(16, 26))
    assert batch.gap(0) and batch.gap(14)  # a reader at 14 missed 15: resync
    ok = store.read_kv_events(15, 100)
    assert not ok.gap(15) and [e.seq for e in ok.events] == list(range(16, 26))
    assert not store.read_kv_events(25, 100).gap(25)
    # a reader ahead of the stream (the store lost its data) must resync too
    assert store.read_kv_events(40, 100).gap(40)


def test_pool_targets(backend):
    a, b = backend.client(), backend.client()
    assert a.get_pool_targets() is None
    a.set_pool_targets(pb.PoolTargets(num_prefill=2, num_decode=3))
    assert b.get_pool_targets() == pb.PoolTargets(num_prefill=2, num_decode=3)
    b.set_pool_targets(pb.PoolTargets(num_prefill=0, num_decode=0))
    got = a.get_pool_targets()
    assert got is not None and got == pb.PoolTargets()  # "zero" is distinguishable from "never set"


def test_clients_share_state(backend):
    a, b = backend.client(), backend.client()
    a.register(make_worker("d0"), LONG_TTL)
    a.publish_kv_events("d0", [stored(1)])
    assert [w.worker_id for w in b.list_workers()] == ["d0"]
    assert [e.seq for e in b.read_kv_events(0, 10).events] == [1]
    with pytest.raises(IncompatibleWorkerError):
        b.register(make_worker("p0", role=pb.PREFILL, kv_layout__block_size=32), LONG_TTL)


def test_close(backend):
    a = backend.client()
    a.register(make_worker("d0"), LONG_TTL)
    a.close()
    a.close()  # idempotent
    with pytest.raises(StoreClosedError):
        a.list_workers()
    with pytest.raises(StoreClosedError):
        a.publish_kv_events("d0", [stored(1)])
    if backend.kind != "embedded":  # closing a client leaves the shared state alone
        b = backend.client()
        assert [w.worker_id for w in b.list_workers()] == ["d0"]


def test_context_manager(backend):
    with backend.client() as c:
        c.set_pool_targets(pb.PoolTargets(num_prefill=1))
    with pytest.raises(StoreClosedError):
        c.get_pool_targets()


# ------------------------------------------------------------------- backend specifics


def test_open_store_dispatch(redis_url):  # noqa: F811
    with open_store(None) as s:
        assert isinstance(s, EmbeddedStore)
    with ControlPlaneServer() as server:
        with open_store(server.url) as s:
            assert isinstance(s, RemoteStore)
            s.register(make_worker("d0"), LONG_TTL)
            assert [w.worker_id for w in server.store.list_workers()] == ["d0"]
    with open_store(redis_url, namespace=f"t-{uuid.uuid4().hex}") as s:
        assert isinstance(s, RedisStore)
        assert s.list_workers() == []


def test_remote_store_unreachable():
    from pdserve.deploy.store import StoreUnavailableError

    server = ControlPlaneServer()
    server.start()
    address = server.address
    server.stop(grace=None)
    with RemoteStore(address, timeout_s=1.0) as s:
        with pytest.raises(StoreUnavailableError):
            s.list_workers()


_CHILD = textwrap.dedent(
    """
    import json, sys
    from pdserve.deploy.store.redis_store import RedisStore
    from pdserve.proto import PROTOCOL_VERSION, pdserve_pb2 as pb
    url, ns, template = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
    s = RedisStore(url, namespace=ns)
    w = pb.WorkerInfo.FromString(template)
    w.worker_id, w.role = "child-p0", pb.PREFILL
    s.register(w, 30.0)
    seen = [x.worker_id for x in s.list_workers()]
    print("READY", flush=True)
    sys.stdin.readline()  # go
    lasts = [s.publish_kv_events("child-p0", [pb.KVEvent(stored=pb.BlocksStored(block_hashes=[1, i]))]) for i in range(150)]
    bad = w.__class__(); bad.CopyFrom(w); bad.worker_id = "child-bad"; bad.kv_layout.dtype = "float16"
    try:
        s.register(bad, 30.0); refused = None
    except ValueError as e:
        refused = type(e).__name__
    print(json.dumps({"seen": seen, "lasts": lasts, "refused": refused}), flush=True)
    s.close()
    """
)


def test_two_processes_agree_on_redis(redis_url):  # noqa: F811
    ns = f"proc-{uuid.uuid4().hex[:12]}"
    parent = RedisStore(redis_url, namespace=ns)
    try:
        parent.register(make_worker("parent-d0"), LONG_TTL)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, redis_url, ns, make_worker("x").SerializeToString().hex()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        try:
            assert child.stdout.readline().strip() == "READY", child.stderr.read()
            child.stdin.write("go\n")
            child.stdin.flush()
            mine = [parent.publish_kv_events("parent-d0", [stored(2, i)]) for i in range(150)]
            out, err = child.communicate(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["seen"] == ["child-p0", "parent-d0"]
        assert result["refused"] == "IncompatibleWorkerError"
        assert [w.worker_id for w in parent.list_workers()] == ["child-p0", "parent-d0"]
        assert [w.worker_id for w in parent.list_workers(pb.PREFILL)] == ["child-p0"]
        events = read_all(parent)
        assert [e.seq for e in events] == list(range(1, 301))
        assert sorted(mine + result["lasts"]) == list(range(1, 301))
        by_seq = {e.seq: e for e in events}
        assert all(by_seq[s].worker_id == "child-p0" for s in result["lasts"])
        assert all(by_seq[s].worker_id == "parent-d0" for s in mine)
    finally:
        parent.close()


def test_server_checks_protocol_version_itself():
    """A client that skips the local check still gets FAILED_PRECONDITION from the server."""
    import grpc

    from pdserve.proto import auth
    from pdserve.proto import pdserve_pb2_grpc as pb_grpc

    # Signed when the environment gives the server a secret (it then checks tokens first).
    with ControlPlaneServer() as server, auth.insecure_channel(server.address, auth.load_secret()) as channel:
        stub = pb_grpc.ControlPlaneStub(channel)
        bad = make_worker("d0", protocol_version=PROTOCOL_VERSION + 1)
        with pytest.raises(grpc.RpcError) as info:
            stub.Register(pb.RegisterRequest(worker=bad, ttl_ms=1000), timeout=5)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "protocol_version" in info.value.details()
        assert dict(info.value.trailing_metadata())["pdserve-incompatible-field"] == "protocol_version"
        with pytest.raises(grpc.RpcError) as info:
            stub.Register(pb.RegisterRequest(worker=make_worker("d0"), ttl_ms=0), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            stub.GetPoolTargets(pb.GetPoolTargetsRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert server.store.list_workers() == []
