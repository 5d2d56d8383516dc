"""Routing decision latency with a large prefix index.

    python benchmarks/bench_router.py [--workers 16] [--blocks 100000] [--prompt-len 2000]
                                      [--decisions 5000] [--seed 0] [--out FILE.json]

Builds a router over ``--workers`` workers (half prefill, half decode), fills its
prefix index with ``--blocks`` distinct block hashes through real ``BlocksStored``
events (chains of ``--prompt-len`` tokens, each stored on 1-3 random workers), gives
every worker a Stats report, then times ``Router.route`` for each policy on
``--prompt-len``-token prompts:

* ``kv hit``: prompts whose whole prefix is indexed (``match`` walks all blocks on
  several workers: the expensive case), with a fresh suffix token;
* ``kv miss``: fresh prompts (nothing matches);
* ``kv + hashing``: as ``kv hit`` but ``route`` computes the block hashes itself
  (the gateway normally computes them once and passes them in);
* ``round_robin`` / ``random`` / ``least_loaded``;
* ``kv while following``: ``kv hit`` routes (one every 0.5 ms) while an
  ``EventFollower`` thread catches up on ``--catchup-events`` stored events (16 blocks
  each) from an ``EmbeddedStore``: the cost of sharing the GIL with the follower.

Each decision is followed by ``on_finished`` (not timed), so load stays level.
Optimistic entries accumulate as in production. Also reports ``PrefixIndex.match``
alone, ``block_hashes`` of one prompt, and the rate at which the index applies
stored events. Prints figures (microseconds); asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

from pdserve.deploy.store import EmbeddedStore
from pdserve.engine.hashing import block_hashes
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.events import EventFollower
from pdserve.router.policy import POLICIES, Router

BS = 16


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))] / 1000.0  # noqa: E731
    return {"p50_us": pick(0.50), "p99_us": pick(0.99), "max_us": s[-1] / 1000.0,
            "mean_us": statistics.fmean(s) / 1000.0, "n": len(s)}


def build(policy: str, workers: list[pb.WorkerInfo], chains: list[list[int]], placement: list[list[str]], seed: int) -> Router:
    r = Router(policy, block_size=BS, seed=seed)
    r.update_workers(workers)
    for hashes, holders in zip(chains, placement):
        for wid in holders:
            r.index.apply_event(pb.KVEvent(worker_id=wid, stored=pb.BlocksStored(block_hashes=hashes, block_size=BS)))
    rng = random.Random(seed)
    for w in workers:
        total = w.num_kv_blocks
        r.update_load(w.worker_id, pb.StatsResponse(
            worker_id=w.worker_id, num_running=rng.randrange(0, 32), num_waiting=rng.randrange(0, 4),
            num_kv_blocks_total=total, num_kv_blocks_free=rng.randrange(total // 4, total),
            num_queued_prefill_tokens=rng.randrange(0, 8000)))
    return r


def time_routes(r: Router, prompts: list[tuple[list[int], list[int] | None]], n: int) -> list[int]:
    out = []
    perf = time.perf_counter_ns
    for i in range(n):
        tokens, hashes = prompts[i % len(prompts)]
        t0 = perf()
        d = r.route(tokens, hashes)
        out.append(perf() - t0)
        r.on_finished(d, tokens)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=100_000, help="distinct block hashes in the index")
    ap.add_argument("--prompt-len", type=int, default=2000)
    ap.add_argument("--decisions", type=int, default=5000)
    ap.add_argument("--catchup-events", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    n_prefill = args.workers // 2
    workers = [pb.WorkerInfo(worker_id=f"prefill-{i:02d}", role=pb.PREFILL, num_kv_blocks=20_000) for i in range(n_prefill)]
    workers += [pb.WorkerInfo(worker_id=f"decode-{i:02d}", role=pb.DECODE, num_kv_blocks=20_000)
                for i in range(args.workers - n_prefill)]
    ids = [w.worker_id for w in workers]

    blocks_per_prompt = args.prompt_len // BS
    n_chains = max(1, args.blocks // blocks_per_prompt)
    t0 = time.perf_counter()
    # Tuples, not lists: the garbage collector untracks tuples of ints, so its full
    # collections measure the router's data, not this script's.
    token_chains = [tuple(rng.randrange(1, 128_000) for _ in range(args.prompt_len)) for _ in range(n_chains)]
    chains = [block_hashes(t, BS) for t in token_chains]
    placement = [rng.sample(ids, rng.randrange(1, 4)) for _ in range(n_chains)]
    print(f"{args.workers} workers ({n_prefill} prefill), {n_chains} indexed prompts x {blocks_per_prompt} blocks "
          f"= {n_chains * blocks_per_prompt} distinct blocks, {sum(map(len, placement)) * blocks_per_prompt} entries; "
          f"prompts of {args.prompt_len} tokens; setup {time.perf_counter() - t0:.1f}s")
    print(f"python {sys.version.split()[0]}")

    hit_prompts = [(t + (7,), block_hashes(t + (7,), BS)) for t in token_chains[:200]]
    fresh = [tuple(rng.randrange(1, 128_000) for _ in range(args.prompt_len)) for _ in range(200)]
    miss_prompts = [(t, block_hashes(t, BS)) for t in fresh]
    figures: dict[str, dict] = {}

    # index rate: apply stored events of 16 blocks each into a fresh router's index
    r = build("kv", workers, [], [], args.seed)
    evs = [pb.KVEvent(worker_id=ids[i % len(ids)], stored=pb.BlocksStored(block_hashes=chains[i % n_chains][(i // n_chains) * 16 % blocks_per_prompt:][:16], block_size=BS))
           for i in range(min(5000, n_chains * 4))]
    t = time.perf_counter()
    r.index.apply_events(evs)
    dt = time.perf_counter() - t
    blocks = sum(len(e.stored.block_hashes) for e in evs)
    figures["apply_stored_events"] = {"events_per_s": len(evs) / dt, "blocks_per_s": blocks / dt}

    r = build("kv", workers, chains, placement, args.seed)
    st = r.index.stats()
    print(f"index: {st.num_blocks} blocks, {st.num_precise_entries} precise entries, {st.num_workers} workers")

    perf = time.perf_counter_ns
    samples = []
    for i in range(args.decisions):
        hs = hit_prompts[i % len(hit_prompts)][1]
        t = perf()
        r.index.match(hs)
        samples.append(perf() - t)
    figures["match hit"] = percentiles(samples)
    samples = []
    for i in range(min(args.decisions, 1000)):
        tokens = hit_prompts[i % len(hit_prompts)][0]
        t = perf()
        block_hashes(tokens, BS)
        samples.append(perf() - t)
    figures["block_hashes"] = percentiles(samples)

    figures["route kv hit"] = percentiles(time_routes(r, hit_prompts, args.decisions))
    figures["route kv miss"] = percentiles(time_routes(r, miss_prompts, args.decisions))
    figures["route kv + hashing"] = percentiles(time_routes(r, [(t, None) for t, _ in hit_prompts], min(args.decisions, 2000)))
    st = r.index.stats()
    print(f"after the kv runs: {st.num_blocks} blocks, {st.num_precise_entries} precise + "
          f"{st.num_optimistic_entries} optimistic entries")
    for policy in POLICIES:
        if policy == "kv":
            continue
        rp = build(policy, workers, chains[:10], placement[:10], args.seed)
        figures[f"route {policy}"] = percentiles(time_routes(rp, hit_prompts, args.decisions))

    store = EmbeddedStore(max_retained_events=max(1, args.catchup_events))
    for i in range(args.catchup_events):
        store.publish_kv_events(ids[i % len(ids)], [pb.KVEvent(stored=pb.BlocksStored(
            block_hashes=[rng.getrandbits(63) for _ in range(16)], block_size=BS))])
    r = build("kv", workers, chains, placement, args.seed)
    follower = EventFollower(store, r.index, registry_interval_s=None)
    samples = []
    t_catchup = time.perf_counter()
    follower.start(interval_s=0.01)
    i = 0
    while follower.applied_seq < args.catchup_events and time.perf_counter() - t_catchup < 120:
        tokens, hashes = hit_prompts[i % len(hit_prompts)]
        i += 1
        t = perf()
        d = r.route(tokens, hashes)
        samples.append(perf() - t)
        r.on_finished(d, tokens)
        time.sleep(0.0005)
    t_catchup = time.perf_counter() - t_catchup
    follower.stop()
    if samples:
        figures["route kv while following"] = percentiles(samples)

    ev = figures.pop("apply_stored_events")
    print(f"\n{'operation':<24}{'p50 us':>10}{'p99 us':>10}{'max us':>10}{'mean us':>10}{'n':>8}")
    for name, f in figures.items():
        print(f"{name:<24}{f['p50_us']:>10.1f}{f['p99_us']:>10.1f}{f['max_us']:>10.1f}{f['mean_us']:>10.1f}{f['n']:>8}")
    print(f"\nindex applies {ev['events_per_s']:,.0f} stored events/s ({ev['blocks_per_s']:,.0f} blocks/s, 16 blocks/event)")
    print(f"follower caught up on {args.catchup_events} events in {t_catchup:.2f}s while routing "
          f"({args.catchup_events / t_catchup:,.0f} events/s)")
    ev["catchup_s"] = t_catchup
    figures["apply_stored_events"] = ev
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "figures": figures}, f, indent=2)


if __name__ == "__main__":
    main()
