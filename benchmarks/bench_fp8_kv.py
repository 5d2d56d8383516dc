"""The FP8 KV cache against bfloat16: blocks per GiB, KV transfer time per request, and
accuracy, in one run (issue 16; `bench_kv_tiers.py --fp8` runs this).

    python benchmarks/bench_fp8_kv.py [--model DIR] [--tokens 1024] [--backends nixl,torch_dist]
        [--prompts 16] [--max-tokens 64]

1. **Blocks per GiB**, at real shapes: Llama-3.1-8B (one rank) and Llama-3.1-70B at TP 8
   (one KV head per rank), from the KV layout's bytes per block; and the KV region a real
   engine allocates for the model under test with the same memory budget.
2. **Transfer time per request**: one request's KV (``--tokens`` tokens, Llama-3.1-8B
   geometry, blocks scattered over the region as a busy worker's are) written from a
   prefill rank's region to a decode rank's region by the real transfer backends, each
   rank its own process (kvtransfer/harness.py), bfloat16 and float8_e4m3fn regions
   measured back to back: the median time from ``write`` to DONE, and FP8's as a ratio
   of bfloat16's (goal <= 55%).
3. **Accuracy**, model under test in bfloat16 (default: the embedded tiny model, random
   weights, so near-ties between logits are common and the figures are pessimistic):
   * free-running greedy: % of generated tokens identical to the bfloat16 cache's (a
     sequence counts its tokens up to and after its first difference as they come);
   * teacher-forced: the bfloat16 run's prompt + completion scored by both caches
     (prompt logprobs): % of positions whose top-1 token agrees, and the largest
     absolute difference of the scored token's log-probability (the logit error after
     the softmax's normalisation; raw logits are not exposed by the engine's API);
   * the largest |K| and |V| the FP8 cache stored, against e4m3's 448 (scale 1.0 when the
     checkpoint has no scales: how close the values come to saturating).
Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

from pdserve.kvtransfer import KVRegionLayout, available_backends, plan_transfer
from pdserve.kvtransfer.harness import AgentProcess

GiB, MiB = 1 << 30, 1 << 20
LLAMA_8B = dict(num_layers=32, num_kv_heads=8, block_size=16, head_dim=128)
LLAMA_70B_TP8 = dict(num_layers=80, num_kv_heads=1, block_size=16, head_dim=128)  # 8 KV heads over 8 ranks


def blocks_per_gib(geo: dict, dtype: str) -> float:
    lay = KVRegionLayout.for_rank(num_blocks=1, dtype=dtype, **geo)
    return GiB / (lay.num_layers * lay.block_bytes)


def engine_blocks(model: str, memory: int) -> dict[str, int]:
    from pdserve.engine import LLM

    out = {}
    for kv in ("auto", "fp8_e4m3"):
        with LLM(model, dtype="bfloat16", kv_cache_dtype=kv, kv_cache_memory=memory) as llm:
            out[kv] = llm.kv_cache_stats().num_total_blocks
    return out


def transfer_times(backends: list[str], tokens: int, iters: int, seed: int) -> list[dict]:
    nblocks = -(-tokens // LLAMA_8B["block_size"])
    rng = random.Random(seed)
    rows = []
    a, b = AgentProcess(), AgentProcess()
    try:
        for backend in backends:
            for dtype in ("bfloat16", "float8_e4m3fn"):
                lay = KVRegionLayout.for_rank(num_blocks=3 * nblocks, dtype=dtype, **LLAMA_8B)
                src, dst = f"src-{backend}-{dtype}", f"dst-{backend}-{dtype}"
                src_md = a.call("create", backend, src, lay.to_dict(), 1, {})
                dst_md = b.call("create", backend, dst, lay.to_dict(), 2, {})
                a.call("add_peer", src, dst, dst_md)
                b.call("add_peer", dst, src, src_md)
                sb, db = rng.sample(range(lay.num_blocks), nblocks), rng.sample(range(lay.num_blocks), nblocks)
                [plan] = plan_transfer([lay], [lay], sb, db)
                tids = [f"{backend}-{dtype}-{i}" for i in range(iters + 2)]
                b.call("expect_many", dst, src, plan.descs, tids, 600.0)
                a.call("bench_write", src, dst, plan.descs, 2, 5e-5, tids[:2])  # warm up
                times = a.call("bench_write", src, dst, plan.descs, iters, 5e-5, tids[2:], timeout_s=600)
                b.call("notifications", dst)
                rows.append(dict(backend=backend, dtype=dtype, mib=plan.num_bytes / MiB,
                                 descriptors=plan.num_descriptors, median_ms=1e3 * statistics.median(times),
                                 p90_ms=1e3 * sorted(times)[int(0.9 * (len(times) - 1))]))
                a.call("close", src)
                b.call("close", dst)
    finally:
        a.shutdown()
        b.shutdown()
    return rows


def accuracy(model: str, num_prompts: int, max_tokens: int, seed: int) -> dict:
    from pdserve.engine import LLM, SamplingParams
    from pdserve.engine.config import ModelConfig

    vocab = ModelConfig.from_dir(model).vocab_size
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randrange(16, 512))] for _ in range(num_prompts)]
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    score = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    runs = {}
    for kv in ("auto", "fp8_e4m3"):
        # Prefix caching off: the scoring pass must compute every position with this cache.
        with LLM(model, dtype="bfloat16", kv_cache_dtype=kv, enable_prefix_caching=False) as llm:
            outs = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
            runs[kv] = dict(outs=outs)
            if kv == "fp8_e4m3":
                cache = llm.engine.executor.runner.kv_cache.float()  # values / scale (scales are 1.0 here)
                runs[kv]["max_k"] = float(cache[:, :, 0].abs().max())
                runs[kv]["max_v"] = float(cache[:, :, 1].abs().max())
                runs[kv]["scales"] = sorted(set(llm.engine.executor.runner.kv_scales))
    ref_seqs = [p + o for p, o in zip(prompts, runs["auto"]["outs"])]
    scored = {}
    for kv in ("auto", "fp8_e4m3"):
        with LLM(model, dtype="bfloat16", kv_cache_dtype=kv, enable_prefix_caching=False) as llm:
            scored[kv] = [o.prompt_logprobs for o in llm.generate(ref_seqs, score)]
    same = total = agree = positions = 0
    max_err = 0.0
    for a, b in zip(runs["auto"]["outs"], runs["fp8_e4m3"]["outs"]):
        same += sum(x == y for x, y in zip(a, b))
        total += len(a)
    for seq, pa, pb in zip(ref_seqs, scored["auto"], scored["fp8_e4m3"]):
        for j in range(1, len(seq)):
            ea, eb = pa[j], pb[j]
            tok = seq[j]
            max_err = max(max_err, abs(ea[tok] - eb[tok]))
            top_a = max(ea.items(), key=lambda kv: kv[1])[0]
            top_b = max(eb.items(), key=lambda kv: kv[1])[0]
            agree += top_a == top_b
            positions += 1
    return dict(greedy_same=same / total, tokens=total, teacher_agree=agree / positions, positions=positions,
                max_logprob_err=max_err, max_k=runs["fp8_e4m3"]["max_k"], max_v=runs["fp8_e4m3"]["max_v"],
                scales=runs["fp8_e4m3"]["scales"])


def run(model: str, tokens: int = 1024, backends: list[str] | None = None, iters: int = 20,
        num_prompts: int = 16, max_tokens: int = 64, seed: int = 0) -> None:
    backends = backends or available_backends()
    print("## FP8 KV cache vs bfloat16\n")
    print("| shape | bf16 blocks/GiB | fp8 blocks/GiB | ratio |")
    print("|---|---|---|---|")
    for name, geo in (("Llama-3.1-8B, 1 rank", LLAMA_8B), ("Llama-3.1-70B, TP 8 rank", LLAMA_70B_TP8)):
        bf, f8 = blocks_per_gib(geo, "bfloat16"), blocks_per_gib(geo, "float8_e4m3fn")
        print(f"| {name} | {bf:.1f} | {f8:.1f} | {f8 / bf:.2f}x |")
    eng = engine_blocks(model, 64 * MiB)
    print(f"| {Path(model).name} engine, 64 MiB region (allocated) | {eng['auto']} blocks | {eng['fp8_e4m3']} blocks "
          f"| {eng['fp8_e4m3'] / eng['auto']:.2f}x |")

    rows = transfer_times(backends, tokens, iters, seed)
    print(f"\nOne request's KV, {tokens} tokens at Llama-3.1-8B geometry, scattered blocks, "
          f"median of {iters} writes (write -> DONE):\n")
    print("| backend | cache | MiB | descriptors | median ms | p90 ms | fp8 / bf16 |")
    print("|---|---|---|---|---|---|---|")
    by = {(r["backend"], r["dtype"]): r for r in rows}
    for r in rows:
        ratio = "" if r["dtype"] == "bfloat16" else f"**{r['median_ms'] / by[r['backend'], 'bfloat16']['median_ms']:.0%}**"
        print(f"| {r['backend']} | {r['dtype']} | {r['mib']:.0f} | {r['descriptors']} | {r['median_ms']:.1f} "
              f"| {r['p90_ms']:.1f} | {ratio} |")

    acc = accuracy(model, num_prompts, max_tokens, seed)
    print(f"\nAccuracy, {Path(model).name} in bfloat16, {num_prompts} prompts of 16-511 tokens, "
          f"{max_tokens} greedy tokens each (FP8 scales {acc['scales']}):\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| greedy tokens identical to the bf16 cache (free-running) | {acc['greedy_same']:.1%} of {acc['tokens']} |")
    print(f"| top-1 agreement, teacher-forced on the bf16 sequences | {acc['teacher_agree']:.2%} of {acc['positions']} positions |")
    print(f"| largest scored-token log-probability difference | {acc['max_logprob_err']:.4f} |")
    print(f"| largest stored value, of e4m3's 448 | K {acc['max_k']:.2f}, V {acc['max_v']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: the embedded tiny model)")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens of the transferred request")
    ap.add_argument("--backends", default=",".join(available_backends()))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from pdserve.deploy.cli import _resolve_model

    run(str(_resolve_model(args.model).resolve()), args.tokens, [b for b in args.backends.split(",") if b],
        args.iters, args.prompts, args.max_tokens, args.seed)


if __name__ == "__main__":
    main()
