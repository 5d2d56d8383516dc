"""EventFollower against a real EmbeddedStore: apply, paginate, gaps and resync, departures."""

from __future__ import annotations

import time

import pytest

from pdserve.deploy.store import EmbeddedStore, StoreUnavailableError
from pdserve.proto import PROTOCOL_VERSION
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.events import EventFollower
from pdserve.router.index import PrefixIndex


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def worker(worker_id: str, role=pb.PREFILL, started_at_ms: int = 1) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        worker_id=worker_id,
        role=role,
        address="127.0.0.1:1",
        protocol_version=PROTOCOL_VERSION,
        model=pb.ModelIdentity(name="m", architecture="LlamaForCausalLM", weights_digest="d", vocab_size=100),
        kv_layout=pb.KVLayout(layout="l", num_layers=1, num_kv_heads=1, head_dim=8, block_size=16, dtype="float32", tp_size=1),
        num_kv_blocks=64,
        started_at_ms=started_at_ms,
    )


def stored(*hashes) -> pb.KVEvent:
    return pb.KVEvent(stored=pb.BlocksStored(block_hashes=list(hashes), block_size=16))


def removed(*hashes) -> pb.KVEvent:
    return pb.KVEvent(removed=pb.BlocksRemoved(block_hashes=list(hashes)))


def make(store=None, **kw):
    store = store if store is not None else EmbeddedStore()
    index = PrefixIndex()
    kw.setdefault("registry_interval_s", None)
    return store, index, EventFollower(store, index, **kw)


def test_applies_events_of_two_publishers_in_order():
    store, index, fol = make()
    store.publish_kv_events("p0", [stored(1, 2, 3)])
    store.publish_kv_events("p1", [stored(1, 2)])
    store.publish_kv_events("p0", [removed(3)])
    assert fol.poll() == 3
    assert index.match([1, 2, 3]) == {"p0": 2, "p1": 2}
    assert fol.applied_seq == 3
    assert fol.poll() == 0  # nothing new
    store.publish_kv_events("p1", [stored(3)])
    assert fol.poll() == 1
    assert index.match([1, 2, 3]) == {"p0": 2, "p1": 3}
    st = fol.stats()
    assert st.events_applied == 4 and st.resyncs == 0 and st.lag == 0 and st.polls == 3


def test_reads_in_pages_and_bounds_one_poll():
    store, index, fol = make(page_size=3, max_pages_per_poll=2)
    for h in range(10):
        store.publish_kv_events("p0", [stored(h)])
    assert fol.poll() == 6  # two pages of three
    assert fol.stats().lag == 4
    assert fol.poll() == 4
    assert fol.applied_seq == 10 and fol.stats().lag == 0
    assert index.num_blocks("p0") == 10


def test_gap_after_trimming_resyncs_from_the_retained_events():
    store, index, fol = make(store=EmbeddedStore(max_retained_events=4))
    store.publish_kv_events("p0", [stored(1, 2, 3)])
    assert fol.poll() == 1
    assert index.match([1, 2, 3]) == {"p0": 3}
    # The follower falls behind: 10 more events, only the last 4 are retained.
    store.publish_kv_events("p0", [removed(3)])  # trimmed: the follower never sees it
    for h in range(100, 109):
        store.publish_kv_events("p1", [stored(h)])
    batch = store.read_kv_events(fol.applied_seq, 10)
    assert batch.gap(fol.applied_seq)
    applied = fol.poll()
    assert applied == 4
    assert fol.stats().resyncs == 1
    assert fol.applied_seq == store.read_kv_events(0, 1).last_seq
    # Everything learnt before the gap is gone (p0's blocks, which it had partly
    # evicted meanwhile); only the retained events are indexed.
    assert index.match([1, 2, 3]) == {}
    assert index.workers() == ["p1"]
    assert index.num_blocks("p1") == 4
    # And following continues normally.
    store.publish_kv_events("p0", [stored(1)])
    assert fol.poll() == 1
    assert index.match([1, 2]) == {"p0": 1}
    assert fol.stats().resyncs == 1


def test_resync_keeps_optimistic_entries():
    store, index, fol = make(store=EmbeddedStore(max_retained_events=2))
    index.add_optimistic("d0", [7, 8])
    store.publish_kv_events("p0", [stored(1)])
    fol.poll()
    for h in range(5):
        store.publish_kv_events("p0", [stored(10 + h)])
    fol.poll()
    assert fol.stats().resyncs == 1
    assert index.match([7, 8]) == {"d0": 2}
    assert index.match([1]) == {}


def test_a_store_that_started_over_is_a_gap():
    old = EmbeddedStore()
    store, index, fol = make(store=old)
    for h in range(5):
        old.publish_kv_events("p0", [stored(h)])
    fol.poll()
    assert fol.applied_seq == 5
    # The store lost its data (e.g. Redis restarted empty) and got 2 new events.
    fresh = EmbeddedStore()
    fresh.publish_kv_events("p1", [stored(50)])
    fresh.publish_kv_events("p1", [stored(51)])
    fol.store = fresh
    assert fol.poll() == 2
    assert fol.stats().resyncs == 1
    assert index.workers() == ["p1"]
    assert fol.applied_seq == 2


def test_explicit_resync():
    store, index, fol = make()
    store.publish_kv_events("p0", [stored(1)])
    fol.poll()
    fol.resync()
    assert index.match([1]) == {}
    assert fol.poll() == 1  # re-read from the oldest retained event
    assert index.match([1]) == {"p0": 1}


def test_expired_worker_loses_its_entries():
    clock = FakeClock()
    store = EmbeddedStore(clock=clock)
    store, index, fol = make(store=store)
    store.register(worker("p0"), ttl_s=5)
    store.register(worker("p1"), ttl_s=50)
    store.publish_kv_events("p0", [stored(1, 2)])
    store.publish_kv_events("p1", [stored(1)])
    fol.poll()
    assert index.match([1, 2]) == {"p0": 2, "p1": 1}
    clock.advance(10)  # p0's TTL lapses: the store appends its AllBlocksCleared
    fol.poll()
    assert index.match([1, 2]) == {"p1": 1}
    assert index.stats().events_applied["cleared"] == 1


def test_restarted_worker_loses_only_its_old_entries():
    store, index, fol = make()
    store.register(worker("p0", started_at_ms=1), ttl_s=60)
    store.publish_kv_events("p0", [stored(1, 2, 3)])
    fol.poll()
    # The process restarts: same id, new started_at_ms, then stores new blocks.
    store.register(worker("p0", started_at_ms=2), ttl_s=60)
    store.publish_kv_events("p0", [stored(1)])
    fol.poll()
    assert index.match([1, 2, 3]) == {"p0": 1}


def test_registry_check_drops_unregistered_workers():
    clock = FakeClock()
    store = EmbeddedStore()
    store, index, fol = make(store=store, registry_interval_s=1.0, clock=clock)
    store.register(worker("p0"), ttl_s=60)
    store.publish_kv_events("p0", [stored(1)])
    # "ghost" publishes without being registered (e.g. it kept publishing after it
    # expired, its cleared event already applied).
    store.publish_kv_events("ghost", [stored(1, 2)])
    fol.poll()  # registry checked before reading: ghost had no entries yet
    assert index.match([1, 2]) == {"p0": 1, "ghost": 2}
    fol.poll()  # registry check not due yet
    assert "ghost" in index.workers()
    clock.advance(1.5)
    fol.poll()
    assert index.workers() == ["p0"]
    assert fol.stats().workers_dropped == 1
    assert fol.sync_registry() == 0


def test_background_thread_follows_and_survives_errors():
    store, index, fol = make()
    fol.start(interval_s=0.01)
    try:
        assert fol.running
        with pytest.raises(RuntimeError):
            fol.start(0.01)
        store.publish_kv_events("p0", [stored(1, 2)])
        deadline = time.monotonic() + 5
        while index.match([1, 2]) != {"p0": 2} and time.monotonic() < deadline:
            time.sleep(0.005)
        assert index.match([1, 2]) == {"p0": 2}

        real_read = store.read_kv_events
        calls = {"n": 0}

        def flaky(*a, **kw):
            calls["n"] += 1
            if calls["n"] <= 3:
                raise StoreUnavailableError("redis is down")
            return real_read(*a, **kw)

        store.read_kv_events = flaky
        store.publish_kv_events("p1", [stored(1)])
        deadline = time.monotonic() + 5
        while "p1" not in index.workers() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert "p1" in index.workers()
        assert fol.stats().errors == 3
    finally:
        fol.stop()
    assert not fol.running
    fol.stop()  # idempotent


def test_poll_propagates_store_errors_and_keeps_position():
    store, index, fol = make()
    store.publish_kv_events("p0", [stored(1)])
    fol.poll()
    store.close()
    with pytest.raises(Exception):
        fol.poll()
    assert fol.applied_seq == 1


def test_bad_arguments():
    with pytest.raises(ValueError):
        EventFollower(EmbeddedStore(), PrefixIndex(), page_size=0)
    with pytest.raises(ValueError):
        EventFollower(EmbeddedStore(), PrefixIndex()).start(0)
