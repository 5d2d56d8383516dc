"""The router's EventFollower against a real Redis control-plane store.

Two publishers (separate RedisStore clients, publishing concurrently from threads, as
two workers would) and one follower (the gateway's own client) on a real redis-server.
"""

from __future__ import annotations

import random
import threading
import time
import uuid

import pytest
from redis_server import redis_url  # noqa: F401  (session fixture)

from pdserve.deploy.store.redis_store import RedisStore
from pdserve.engine.hashing import block_hashes
from pdserve.proto import PROTOCOL_VERSION
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.events import EventFollower
from pdserve.router.index import PrefixIndex
from pdserve.router.policy import Router

pytestmark = pytest.mark.integration

BS = 16


def worker(worker_id: str, role=pb.PREFILL, started_at_ms: int = 1) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        worker_id=worker_id,
        role=role,
        address="127.0.0.1:1",
        protocol_version=PROTOCOL_VERSION,
        model=pb.ModelIdentity(name="m", architecture="LlamaForCausalLM", weights_digest="d", vocab_size=32000),
        kv_layout=pb.KVLayout(layout="l", num_layers=1, num_kv_heads=1, head_dim=8, block_size=BS, dtype="float32", tp_size=1),
        num_kv_blocks=1024,
        started_at_ms=started_at_ms,
    )


def stored(hashes) -> pb.KVEvent:
    return pb.KVEvent(stored=pb.BlocksStored(block_hashes=list(hashes), block_size=BS))


def removed(hashes) -> pb.KVEvent:
    return pb.KVEvent(removed=pb.BlocksRemoved(block_hashes=list(hashes)))


@pytest.fixture
def stores(redis_url):  # noqa: F811
    """Three clients of one fresh namespace: publisher A, publisher B, the gateway."""
    ns = f"router-test-{uuid.uuid4().hex[:8]}"
    made = []

    def make(**kw):
        s = RedisStore(redis_url, namespace=ns, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_two_concurrent_publishers_are_followed_exactly(stores):
    a, b, gw = stores(), stores(), stores()
    a.register(worker("p0"), ttl_s=30)
    b.register(worker("p1"), ttl_s=30)
    index = PrefixIndex()
    follower = EventFollower(gw, index, page_size=50, registry_interval_s=0.2)
    follower.start(interval_s=0.02)
    expected: dict[str, set[int]] = {"p0": set(), "p1": set()}

    def publish(store, wid, seed):
        rng = random.Random(seed)
        held = expected[wid]
        for _ in range(150):
            if held and rng.random() < 0.3:
                gone = rng.sample(sorted(held), min(len(held), rng.randrange(1, 4)))
                held.difference_update(gone)
                store.publish_kv_events(wid, [removed(gone)])
            else:
                new = [rng.randrange(1, 400) for _ in range(rng.randrange(1, 6))]
                held.update(new)
                store.publish_kv_events(wid, [stored(new)])

    try:
        threads = [threading.Thread(target=publish, args=(a, "p0", 1)), threading.Thread(target=publish, args=(b, "p1", 2))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        last = gw.read_kv_events(0, 1).last_seq
        assert last == 300
        assert wait_for(lambda: follower.applied_seq == last)
    finally:
        follower.stop()
    for wid, held in expected.items():
        assert index.num_blocks(wid, precise_only=True) == len(held)
        for h in held:
            assert wid in index.match([h])
    st = follower.stats()
    assert st.events_applied == 300 and st.resyncs == 0 and st.errors == 0


def test_gap_in_redis_stream_resyncs(stores):
    a, gw = stores(max_retained_events=20), stores(max_retained_events=20)
    index = PrefixIndex()
    follower = EventFollower(gw, index, page_size=7, registry_interval_s=None)
    a.publish_kv_events("p0", [stored([1, 2, 3])])
    follower.poll()
    assert index.match([1, 2, 3]) == {"p0": 3}
    # The gateway is away while 200 events go by (far more than the 20 retained).
    for h in range(1000, 1200):
        a.publish_kv_events("p1", [stored([h])])
    a.publish_kv_events("p0", [removed([1])])
    follower.poll()
    st = follower.stats()
    assert st.resyncs == 1
    assert follower.applied_seq == gw.read_kv_events(0, 1).last_seq
    assert index.match([1, 2, 3]) == {}
    n = index.num_blocks("p1")
    assert 1 <= n <= 20  # only what the retained events say


def test_expiry_and_restart_drop_entries_and_router_follows(stores):
    a, b, gw = stores(), stores(), stores()
    a.register(worker("p0"), ttl_s=0.5)
    b.register(worker("p1"), ttl_s=30)
    b.register(worker("d0", pb.DECODE), ttl_s=30)
    router = Router("kv", block_size=BS)
    router.update_workers(gw.list_workers())
    follower = EventFollower(gw, router.index, registry_interval_s=0.1)
    prefix = [random.Random(3).randrange(1, 32000) for _ in range(512)]
    hs = block_hashes(prefix, BS)
    a.publish_kv_events("p0", [stored(hs)])
    b.publish_kv_events("p1", [stored(hs[:8])])
    follower.poll()
    d = router.route(prefix + [7] * 300)
    assert d.prefill_worker_id == "p0" and d.cached_tokens_prefill == 512
    router.on_finished(d, None)

    # p0 stops heartbeating: its entry expires, the store appends its cleared event.
    assert wait_for(lambda: "p0" not in [w.worker_id for w in gw.list_workers()], timeout=5)
    follower.poll()
    router.update_workers(gw.list_workers())
    assert "p0" not in router.index.workers()
    d = router.route(prefix + [8] * 300)
    assert d.prefill_worker_id == "p1" and d.cached_tokens_prefill == 128

    # p1 restarts (new started_at_ms): its old blocks are gone once the event is read.
    b.register(worker("p1", started_at_ms=2), ttl_s=30)
    follower.poll()
    assert router.index.match(hs, precise_only=True) == {}
