"""Several gateways, one store: each publishes its routing decisions as ``pending`` KV
events (router/events.py PlacementPublisher) and applies the others' (EventFollower ->
PrefixIndex optimistic entries + Router.note_placement load), so a group's follower
routed by gateway B goes where gateway A sent its leader, while that prefill is still
in flight (no worker event exists yet). Real EmbeddedStore, real routers."""

from __future__ import annotations

import random

from pdserve.deploy.store.embedded import EmbeddedStore
from pdserve.engine.hashing import block_hashes
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.events import EventFollower, PlacementPublisher
from pdserve.router.policy import Router

BS = 16


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 32000) for _ in range(n)]


def workers():
    return ([pb.WorkerInfo(worker_id="d0", role=pb.DECODE, num_kv_blocks=4096, started_at_ms=1)]
            + [pb.WorkerInfo(worker_id=f"p{i}", role=pb.PREFILL, num_kv_blocks=4096, started_at_ms=1)
               for i in range(4)])


class Gateway:
    def __init__(self, store, name: str, share: bool = True, seed: int = 0) -> None:
        self.router = Router("kv", block_size=BS, disagg_threshold_tokens=1, seed=seed,
                             origin=name if share else None)
        self.router.update_workers(workers())
        self.follower = EventFollower(store, self.router.index, registry_interval_s=None, origin=self.router.origin,
                                      on_pending=self.router.note_placement)
        self.publisher = PlacementPublisher(store, self.router)

    def route(self, tokens):
        d = self.router.route(tokens)
        self.publisher.publish_now()
        return d


def test_a_follower_at_another_gateway_goes_where_the_leader_went():
    store = EmbeddedStore()
    a, b = Gateway(store, "gw-a", seed=1), Gateway(store, "gw-b", seed=2)
    leaders = {}
    for g in range(4):
        leaders[g] = a.route(prompt(100 + g, 1024) + prompt(200 + g, 16)).prefill_worker_id
    assert len(set(leaders.values())) == 4  # fresh groups spread over the idle workers
    assert b.follower.poll() == 8  # a's 4 decisions: decode side + prefill side each
    for g in range(4):
        follower = b.route(prompt(100 + g, 1024) + prompt(300 + g, 16))
        assert follower.prefill_worker_id == leaders[g], g
        assert follower.cached_tokens_prefill == 1024
    # b sees a's queued prefill tokens on each worker until that worker's next report
    assert b.router._load["p0"].queued_prefill_tokens() >= 1040
    b.router.update_load("p0", pb.StatsResponse(num_queued_prefill_tokens=0))
    assert b.router._load["p0"].queued_prefill_tokens() == 0
    # a skips its own placements and learns b's
    a.follower.poll()
    stats = a.router.index.stats()
    assert stats.events_applied["pending"] == 8
    store.close()


def test_without_shared_placements_the_follower_is_sent_elsewhere():
    """The failure mode the placements fix: b knows nothing of a's in-flight prefills, so
    its followers land on whichever worker it picks itself."""
    store = EmbeddedStore()
    a, b = Gateway(store, "gw-a", share=False, seed=1), Gateway(store, "gw-b", share=False, seed=5)
    leaders = {g: a.route(prompt(100 + g, 1024) + prompt(200 + g, 16)).prefill_worker_id for g in range(4)}
    assert b.follower.poll() == 0
    same = sum(b.route(prompt(100 + g, 1024) + prompt(300 + g, 16)).prefill_worker_id == leaders[g]
               for g in range(4))
    assert same < 4
    store.close()


def test_the_stored_event_confirms_a_pending_entry_and_a_departure_drops_it():
    store = EmbeddedStore()
    a, b = Gateway(store, "gw-a"), Gateway(store, "gw-b")
    p = prompt(7, 512)
    leader = a.route(p)
    b.follower.poll()
    leader_hashes = block_hashes(p, BS)[:31]
    assert b.router.index.match(leader_hashes)[leader.prefill_worker_id] == 31
    store.publish_kv_events(leader.prefill_worker_id, [pb.KVEvent(stored=pb.BlocksStored(
        block_hashes=leader_hashes, block_size=BS))])
    b.follower.poll()
    assert b.router.index.stats().optimistic_confirmed >= 31
    store.publish_kv_events(leader.prefill_worker_id, [pb.KVEvent(cleared=pb.AllBlocksCleared())])
    b.follower.poll()
    assert leader.prefill_worker_id not in b.router.index.match(leader_hashes)
    store.close()
