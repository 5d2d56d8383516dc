"""PrefixIndex: precise and optimistic entries, longest-prefix matching, expiry."""

from __future__ import annotations

import random
import threading

import pytest

from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.index import PrefixIndex


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def stored(worker_id: str, hashes) -> pb.KVEvent:
    return pb.KVEvent(worker_id=worker_id, stored=pb.BlocksStored(block_hashes=list(hashes), block_size=16))


def removed(worker_id: str, hashes) -> pb.KVEvent:
    return pb.KVEvent(worker_id=worker_id, removed=pb.BlocksRemoved(block_hashes=list(hashes)))


def cleared(worker_id: str) -> pb.KVEvent:
    return pb.KVEvent(worker_id=worker_id, cleared=pb.AllBlocksCleared())


H = [101, 102, 103, 104, 105, 106]


def test_empty_index_matches_nothing():
    idx = PrefixIndex()
    assert idx.match(H) == {}
    assert idx.match([]) == {}
    assert len(idx) == 0


def test_match_counts_longest_consecutive_prefix_per_worker():
    idx = PrefixIndex()
    idx.add_blocks("a", H[:4])
    idx.add_blocks("b", H[:2])
    idx.add_blocks("c", H)
    assert idx.match(H) == {"a": 4, "b": 2, "c": 6}
    assert idx.match(H[:3]) == {"a": 3, "b": 2, "c": 3}


def test_match_stops_at_first_miss():
    idx = PrefixIndex()
    # "a" holds blocks 0, 1, 3, 4, 5 but not 2: only 2 usable blocks.
    idx.add_blocks("a", [H[0], H[1], H[3], H[4], H[5]])
    # "b" holds everything except the first block: useless.
    idx.add_blocks("b", H[1:])
    assert idx.match(H) == {"a": 2}


def test_stored_removed_cleared_events():
    idx = PrefixIndex()
    idx.apply_events([stored("a", H), stored("b", H[:3])])
    assert idx.match(H) == {"a": 6, "b": 3}
    idx.apply_event(removed("a", [H[2]]))
    assert idx.match(H) == {"a": 2, "b": 3}
    idx.apply_event(cleared("b"))
    assert idx.match(H) == {"a": 2}
    assert idx.workers() == ["a"]
    # removing blocks of an unknown worker or unknown hashes is harmless
    idx.apply_event(removed("zzz", H))
    idx.apply_event(removed("a", [999]))
    assert idx.match(H) == {"a": 2}
    st = idx.stats()
    assert st.events_applied == {"stored": 2, "removed": 3, "cleared": 1, "pending": 0}
    assert st.num_precise_entries == 5 and st.num_blocks == 5


def test_stored_event_is_idempotent():
    idx = PrefixIndex()
    idx.add_blocks("a", H)
    idx.add_blocks("a", H)
    assert idx.stats().num_precise_entries == len(H)
    idx.remove_blocks("a", H[:1])
    assert idx.match(H) == {}


def test_remove_worker_drops_precise_and_optimistic_and_reuses_the_bit():
    idx = PrefixIndex()
    idx.add_blocks("a", H)
    idx.add_optimistic("a", [1, 2, 3])
    idx.add_blocks("b", H[:1])
    idx.remove_worker("a")
    assert idx.match(H) == {"b": 1}
    assert idx.match([1, 2, 3]) == {}
    st = idx.stats()
    assert st.num_precise_entries == 1 and st.num_optimistic_entries == 0 and st.num_blocks == 1
    # A new worker reuses the released bit and sees none of a's entries.
    idx.add_blocks("c", H[:2])
    assert idx.match(H) == {"b": 1, "c": 2}
    idx.remove_worker("never-seen")  # no-op


def test_optimistic_entries_expire_after_ttl():
    clock = FakeClock()
    idx = PrefixIndex(optimistic_ttl_s=30, clock=clock)
    idx.add_optimistic("a", H)
    assert idx.match(H) == {"a": 6}
    assert idx.match(H, precise_only=True) == {}
    clock.advance(29.9)
    assert idx.match(H) == {"a": 6}
    clock.advance(0.2)
    assert idx.match(H) == {}
    st = idx.stats()
    assert st.num_optimistic_entries == 0 and st.optimistic_expired == 6 and st.num_blocks == 0


def test_optimistic_refresh_extends_the_deadline():
    clock = FakeClock()
    idx = PrefixIndex(optimistic_ttl_s=10, clock=clock)
    idx.add_optimistic("a", H)
    clock.advance(8)
    idx.add_optimistic("a", H[:3])  # a new request with the same prefix
    clock.advance(5)  # first insertion's deadline passed, the refresh's did not
    assert idx.match(H) == {"a": 3}
    clock.advance(5)
    assert idx.match(H) == {}


def test_stored_event_confirms_optimistic_entry():
    clock = FakeClock()
    idx = PrefixIndex(optimistic_ttl_s=5, clock=clock)
    idx.add_optimistic("a", H)
    idx.apply_event(stored("a", H[:4]))
    assert idx.stats().optimistic_confirmed == 4
    clock.advance(60)
    # the confirmed ones are precise now; the two unconfirmed ones expired
    assert idx.match(H) == {"a": 4}
    assert idx.match(H, precise_only=True) == {"a": 4}


def test_removed_and_cleared_drop_optimistic_entries_at_once():
    idx = PrefixIndex()
    idx.add_optimistic("a", H)
    idx.add_optimistic("b", H)
    idx.apply_event(removed("a", [H[1]]))
    assert idx.match(H) == {"a": 1, "b": 6}
    idx.apply_event(cleared("b"))
    assert idx.match(H) == {"a": 1}


def test_optimistic_skips_blocks_already_held_precisely():
    idx = PrefixIndex()
    idx.add_blocks("a", H[:3])
    idx.add_optimistic("a", H)
    assert idx.stats().num_optimistic_entries == 3
    assert idx.match(H) == {"a": 6}


def test_clear_precise_keeps_optimistic_entries():
    idx = PrefixIndex()
    idx.add_blocks("a", H)
    idx.add_optimistic("b", H[:2])
    idx.clear_precise()
    assert idx.match(H) == {"b": 2}
    st = idx.stats()
    assert st.num_precise_entries == 0 and st.num_optimistic_entries == 2
    # precise entries learnt after the resync work as before
    idx.add_blocks("a", H[:1])
    assert idx.match(H) == {"a": 1, "b": 2}
    idx.clear()
    assert idx.match(H) == {} and idx.workers() == []


def test_num_blocks_and_stats():
    idx = PrefixIndex()
    idx.add_blocks("a", H)
    idx.add_blocks("b", H[:2])
    idx.add_optimistic("b", [7, 8])
    assert idx.num_blocks() == 8
    assert idx.num_blocks(precise_only=True) == 6
    assert idx.num_blocks("b") == 4
    assert idx.num_blocks("b", precise_only=True) == 2
    assert idx.num_blocks("nobody") == 0
    st = idx.stats()
    assert st.precise_blocks_per_worker == {"a": 6, "b": 2}
    assert st.num_workers == 2


def test_many_workers_beyond_64_bits():
    idx = PrefixIndex()
    for i in range(100):
        idx.add_blocks(f"w{i:03d}", H[: 1 + i % 6])
    m = idx.match(H)
    assert len(m) == 100
    assert all(m[f"w{i:03d}"] == 1 + i % 6 for i in range(100))


def test_match_agrees_with_a_naive_model():
    rng = random.Random(7)
    idx = PrefixIndex()
    model: dict[str, set[int]] = {}
    workers = [f"w{i}" for i in range(12)]
    universe = list(range(1, 60))
    for _ in range(3000):
        w = rng.choice(workers)
        op = rng.random()
        hs = rng.sample(universe, rng.randrange(1, 8))
        if op < 0.55:
            idx.add_blocks(w, hs)
            model.setdefault(w, set()).update(hs)
        elif op < 0.95:
            idx.remove_blocks(w, hs)
            model.get(w, set()).difference_update(hs)
        else:
            idx.remove_worker(w)
            model.pop(w, None)
        if rng.random() < 0.2:
            q = rng.sample(universe, rng.randrange(1, 20))
            want = {}
            for wid, held in model.items():
                k = 0
                while k < len(q) and q[k] in held:
                    k += 1
                if k:
                    want[wid] = k
            assert idx.match(q) == want


def test_concurrent_apply_and_match():
    idx = PrefixIndex()
    stop = threading.Event()
    errors = []

    def writer():
        i = 0
        while not stop.is_set():
            idx.add_blocks(f"w{i % 8}", range(i % 100, i % 100 + 20))
            idx.remove_blocks(f"w{(i + 3) % 8}", range(i % 50, i % 50 + 5))
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(2000):
            for wid, n in idx.match(list(range(0, 40))).items():
                if not (wid.startswith("w") and 1 <= n <= 40):
                    errors.append((wid, n))
    finally:
        stop.set()
        t.join()
    assert not errors


def test_bad_arguments():
    with pytest.raises(ValueError):
        PrefixIndex(optimistic_ttl_s=0)
    with pytest.raises(ValueError):
        PrefixIndex().add_blocks("", [1])


def test_reused_bit_is_not_expired_by_the_previous_owners_entries():
    clock = FakeClock()
    idx = PrefixIndex(optimistic_ttl_s=30, clock=clock)
    idx.add_optimistic("a", H)  # deadline t+30
    idx.remove_worker("a")
    clock.advance(10)
    idx.add_optimistic("b", H)  # reuses a's bit; deadline t+40
    clock.advance(25)  # a's stale queue item is due, b's entries are not
    assert idx.match(H) == {"b": 6}
    clock.advance(10)
    assert idx.match(H) == {}
    assert idx.stats().num_optimistic_entries == 0


def test_precise_and_optimistic_agree_with_a_naive_model():
    """Random stored / removed / cleared / optimistic / expiry / resync operations."""
    rng = random.Random(11)
    clock = FakeClock()
    ttl = 5.0
    idx = PrefixIndex(optimistic_ttl_s=ttl, clock=clock)
    precise: dict[str, set[int]] = {}
    opt: dict[str, dict[int, float]] = {}  # worker -> hash -> deadline
    workers = [f"w{i}" for i in range(6)]
    universe = list(range(1, 40))

    def model_match(q, precise_only):
        now = clock.t
        out = {}
        for wid in workers:
            held = set(precise.get(wid, ()))
            if not precise_only:
                held |= {h for h, d in opt.get(wid, {}).items() if d > now}
            k = 0
            while k < len(q) and q[k] in held:
                k += 1
            if k:
                out[wid] = k
        return out

    for _ in range(4000):
        wid = rng.choice(workers)
        hs = rng.sample(universe, rng.randrange(1, 6))
        op = rng.random()
        if op < 0.3:
            idx.add_blocks(wid, hs)
            precise.setdefault(wid, set()).update(hs)
            for h in hs:
                opt.get(wid, {}).pop(h, None)
        elif op < 0.5:
            idx.remove_blocks(wid, hs)
            precise.get(wid, set()).difference_update(hs)
            for h in hs:
                opt.get(wid, {}).pop(h, None)
        elif op < 0.8:
            idx.add_optimistic(wid, hs)
            for h in hs:
                if h not in precise.get(wid, ()):
                    opt.setdefault(wid, {})[h] = clock.t + ttl
        elif op < 0.83:
            idx.remove_worker(wid)
            precise.pop(wid, None)
            opt.pop(wid, None)
        elif op < 0.84:
            idx.clear_precise()
            precise.clear()
        else:
            clock.advance(rng.random() * 2)
        if rng.random() < 0.3:
            q = rng.sample(universe, rng.randrange(1, 12))
            for precise_only in (False, True):
                assert idx.match(q, precise_only=precise_only) == model_match(q, precise_only)
    st = idx.stats()
    now = clock.t
    assert st.num_precise_entries == sum(len(s) for s in precise.values())
    assert st.num_optimistic_entries == sum(1 for d in opt.values() for t in d.values() if t > now)


def test_tier_events_extend_the_match_after_the_region():
    from pdserve.proto import pdserve_pb2 as pb

    idx = PrefixIndex()
    H = list(range(1000, 1010))
    idx.apply_event(pb.KVEvent(worker_id="a", stored=pb.BlocksStored(block_hashes=H[:3])))
    idx.apply_event(pb.KVEvent(worker_id="a", stored=pb.BlocksStored(block_hashes=H[3:8], tier=pb.KV_TIER_HOST)))
    idx.apply_event(pb.KVEvent(worker_id="b", stored=pb.BlocksStored(block_hashes=H[:6], tier=pb.KV_TIER_HOST)))
    m = idx.match(H)
    assert m == {"a": 3}
    assert idx.match_tiers(H, m) == {"a": 5, "b": 6}
    idx.apply_event(pb.KVEvent(worker_id="a", removed=pb.BlocksRemoved(block_hashes=[H[5]], tier=pb.KV_TIER_HOST)))
    assert idx.match_tiers(H, m) == {"a": 2, "b": 6}
    idx.apply_event(pb.KVEvent(worker_id="b", cleared=pb.AllBlocksCleared()))
    assert idx.match_tiers(H, m) == {"a": 2}
    assert idx.workers() == ["a"]


def test_pool_blocks_are_held_by_every_worker_after_its_own_until_their_ttl():
    clock = FakeClock()
    idx = PrefixIndex(clock=clock, pool_ttl_s=60.0)
    H = list(range(2000, 2010))
    idx.apply_event(stored("a", H[:2]))
    idx.apply_event(pb.KVEvent(worker_id="a", stored=pb.BlocksStored(block_hashes=H[2:4], tier=pb.KV_TIER_HOST)))
    # Worker c put blocks 0-7 to the pool: held by the pool, not by c.
    idx.apply_event(pb.KVEvent(worker_id="c", stored=pb.BlocksStored(block_hashes=H[:8], tier=pb.KV_TIER_POOL)))
    assert idx.num_pool_blocks() == 8 and idx.workers() == ["a"]
    m = idx.match(H)
    t = idx.match_tiers(H, m)
    starts = {w: m.get(w, 0) + t.get(w, 0) for w in ("a", "b")}
    assert starts == {"a": 4, "b": 0}
    assert idx.match_pool(H, starts, ["a", "b", "new"]) == {"a": 4, "b": 8, "new": 8}
    assert idx.match_pool(H[8:], {}, ["a"]) == {}  # the pool does not hold 8, 9
    # A gap stops the run; a removal (never sent by workers today) counts at once.
    idx.apply_event(pb.KVEvent(worker_id="c", removed=pb.BlocksRemoved(block_hashes=[H[5]], tier=pb.KV_TIER_POOL)))
    assert idx.match_pool(H, starts, ["a", "b"]) == {"a": 1, "b": 5}
    # The pool evicts silently: entries expire ``pool_ttl_s`` after their last put.
    clock.advance(40)
    idx.add_pool_blocks(H[:2])  # put again (another worker evicted them to its host tier)
    clock.advance(30)
    assert idx.match_pool(H, starts, ["a", "b"]) == {"b": 2}
    assert idx.num_pool_blocks() == 2
    clock.advance(31)
    assert idx.match_pool(H, starts, ["a", "b"]) == {} and idx.num_pool_blocks() == 0
    with pytest.raises(ValueError, match="pool_ttl_s"):
        PrefixIndex(pool_ttl_s=0)
