"""The gateway's router and the planner's simulator decide alike (router/cost.py is
their one cost function): the same workers, loads and cached prefixes give the same
decode worker and the same prefill choice, over random states (ties included)."""

from __future__ import annotations

import random
import pytest

from pdserve.loadtest.sim_router import SimRouter
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.policy import Router

BS = 16


class _View:
    def __init__(self, hit_blocks: int) -> None:
        self.hit_blocks = hit_blocks

    def match(self, hashes, max_hit, now) -> int:
        return min(self.hit_blocks, max_hit)

    def add_optimistic(self, hashes, now) -> None:
        pass


class _SimWorker:
    """What SimRouter reads of a simulated worker (hashable, as the real ones)."""

    def __init__(self, **attrs) -> None:
        self.__dict__.update(attrs)


def _state(rng: random.Random, num_decode: int, num_prefill: int):
    decode, prefill = [], []
    for i in range(num_decode):
        total = rng.choice([64, 128, 512])
        decode.append(dict(name=f"d{i}", total=total, free=rng.randrange(0, total + 1), running=rng.randrange(0, 6),
                           waiting=rng.randrange(0, 3), queued=rng.choice([0, 0, 64, 300]),
                           hit=rng.choice([0, 0, 1, 4, 40])))
    for i in range(num_prefill):
        prefill.append(dict(name=f"p{i}", queued=rng.choice([0, 0, 128, 700]), hit=rng.choice([0, 2, 40])))
    return decode, prefill


def _router_decision(decode, prefill, prompt_len, hashes, threshold, seed):
    router = Router("kv", block_size=BS, disagg_threshold_tokens=threshold, seed=seed)
    workers = [pb.WorkerInfo(worker_id=w["name"], role=pb.DECODE, num_kv_blocks=w["total"]) for w in decode]
    workers += [pb.WorkerInfo(worker_id=w["name"], role=pb.PREFILL, num_kv_blocks=1024) for w in prefill]
    router.update_workers(workers)
    for w in decode:
        router.update_load(w["name"], pb.StatsResponse(
            num_running=w["running"], num_waiting=w["waiting"], num_kv_blocks_total=w["total"],
            num_kv_blocks_free=w["free"], num_queued_prefill_tokens=w["queued"]))
    for w in prefill:
        router.update_load(w["name"], pb.StatsResponse(num_queued_prefill_tokens=w["queued"]))
    for w in decode + prefill:
        if w["hit"]:
            router.index.add_optimistic(w["name"], hashes[: w["hit"]])
    d = router.route(list(range(prompt_len)), hashes)
    return d.decode_worker_id, d.prefill_worker_id


def _sim_decision(decode, prefill, prompt_len, hashes, threshold, seed):
    sim_decode = [_SimWorker(
        name=w["name"], view=_View(w["hit"]), num_total_blocks=w["total"], num_free_blocks=w["free"], waiting=[],
        num_requests=lambda w=w: w["running"] + w["waiting"], num_queued_prefill_tokens=lambda w=w: w["queued"])
        for w in decode]
    sim_prefill = [_SimWorker(name=w["name"], view=_View(w["hit"]), num_queued_tokens=w["queued"])
                   for w in prefill]
    sim = SimRouter("kv", sim_decode, sim_prefill, BS, threshold, seed=seed)
    d, p = sim.route(prompt_len, hashes, 0.0)
    return d.name, (p.name if p is not None else None)


@pytest.mark.parametrize("seed", range(4))
def test_router_and_simulator_agree(seed):
    rng = random.Random(seed)
    agreed = remote = 0
    for trial in range(150):
        decode, prefill = _state(rng, rng.randrange(1, 5), rng.randrange(1, 3))
        prompt_len = rng.choice([5, 40, 300, 900])
        hashes = [rng.getrandbits(63) for _ in range(prompt_len // BS)]
        threshold = rng.choice([0, 64, 256])
        got = _router_decision(decode, prefill, prompt_len, hashes, threshold, seed=trial)
        want = _sim_decision(decode, prefill, prompt_len, hashes, threshold, seed=trial)
        assert got == want, (trial, decode, prefill, prompt_len, threshold)
        agreed += 1
        remote += got[1] is not None
    assert agreed == 150 and 0 < remote < 150  # both paths were exercised
