"""pdserve's engine against transformers' generate, same model, dtype and threads, one run.

    python benchmarks/bench_engine.py [--model DIR] [--dtype float32] [--threads 2]

(a) fixed shapes: batch 1 and 32, 128-token prompts, 64 output tokens;
(b) 64 requests, prompt lengths 16-256 and output lengths 8-256 drawn with a fixed
    seed: transformers in static batches of 32 (left-padded, each batch runs to its
    longest output), pdserve with continuous batching.
Throughput counts only requested output tokens. Also: the decode step time against
the memory-bandwidth floor, weight bytes / measured copy bandwidth (bytes read +
written per second by a large tensor copy). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch


def copy_bandwidth(num_bytes: int = 256 << 20, repeats: int = 10) -> float:
    src = torch.empty(num_bytes // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * num_bytes / statistics.median(times)


def hf_generate(model, batches: list[tuple[list[list[int]], int]], pad_id: int) -> float:
    """Static batches: left-pad each batch, run it to ``max_new`` tokens. Returns seconds."""
    start = time.perf_counter()
    for prompts, max_new in batches:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            model.generate(
                ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                do_sample=False, pad_token_id=pad_id,
            )
    return time.perf_counter() - start


def pd_generate(llm, prompts: list[list[int]], out_lens: list[int]):
    from pdserve.engine import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - start, outs


def decode_step_ms(llm, batch: int, prompt_len: int, vocab: int, steps: int = 20) -> float:
    from pdserve.engine import SamplingParams

    eng = llm.engine
    g = torch.Generator().manual_seed(1)
    rids = []
    for i in range(batch):
        rid = f"step-{batch}-{i}"
        eng.add_request(rid, torch.randint(0, vocab, (prompt_len,), generator=g).tolist(),
                        SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True))
        rids.append(rid)
    while any(r.is_prefilling or r.num_computed_tokens == 0 for r in eng.scheduler.requests.values()):
        eng.step()
    eng.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    for rid in rids:
        eng.abort_request(rid)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: the embedded tiny model)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from pdserve.deploy.cli import _resolve_model
    from pdserve.engine import LLM

    model_dir = _resolve_model(args.model)
    dtype = getattr(torch, args.dtype)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    llm = LLM(model_dir, dtype=args.dtype)
    vocab = llm.engine.config.model.vocab_size
    rng = random.Random(args.seed)
    res: dict = {"model": str(model_dir), "dtype": args.dtype, "threads": args.threads,
                 "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpu_count": torch.get_num_threads()}

    # Warm both up (allocator, oneDNN primitives).
    warm = [[rng.randrange(vocab) for _ in range(32)] for _ in range(2)]
    hf_generate(hf, [(warm, 4)], 0)
    pd_generate(llm, warm, [4, 4])

    print(f"model {model_dir}  dtype {args.dtype}  threads {args.threads}")
    print(f"{'workload':<34}{'transformers tok/s':>20}{'pdserve tok/s':>16}{'ratio':>8}{'greedy equal':>14}")
    for batch in (1, 32):
        prompts = [[rng.randrange(vocab) for _ in range(128)] for _ in range(batch)]
        t_hf = hf_generate(hf, [(prompts, 64)], 0)
        t_pd, outs = pd_generate(llm, prompts, [64] * batch)
        with torch.inference_mode():
            ref = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(batch, 128, dtype=torch.long),
                              max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)[:, 128:].tolist()
        equal = sum(o.token_ids == r for o, r in zip(outs, ref))
        key = f"a_batch{batch}"
        res[key] = {"hf_tok_s": batch * 64 / t_hf, "pd_tok_s": batch * 64 / t_pd, "ratio": t_hf / t_pd, "equal": equal}
        print(f"{'(a) batch ' + str(batch) + ', 128 in / 64 out':<34}{res[key]['hf_tok_s']:>20.1f}"
              f"{res[key]['pd_tok_s']:>16.1f}{res[key]['ratio']:>8.2f}{f'{equal}/{batch}':>14}")

    n = 64
    in_lens = [rng.randint(16, 256) for _ in range(n)]
    out_lens = [rng.randint(8, 256) for _ in range(n)]
    prompts = [[rng.randrange(vocab) for _ in range(k)] for k in in_lens]
    batches = [(prompts[i : i + 32], max(out_lens[i : i + 32])) for i in range(0, n, 32)]
    t_hf = hf_generate(hf, batches, 0)
    t_pd, _ = pd_generate(llm, prompts, out_lens)
    useful = sum(out_lens)
    res["b_mixed64"] = {"hf_tok_s": useful / t_hf, "pd_tok_s": useful / t_pd, "ratio": t_hf / t_pd}
    print(f"{'(b) 64 mixed, static 32 vs cont.':<34}{useful / t_hf:>20.1f}{useful / t_pd:>16.1f}{t_hf / t_pd:>8.2f}{'-':>14}")

    bw = copy_bandwidth()
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.engine.executor.runner.model.parameters())
    floor_ms = 1000 * weight_bytes / bw
    res["copy_bandwidth_gb_s"] = bw / 1e9
    res["weight_mb"] = weight_bytes / 1e6
    res["floor_ms"] = floor_ms
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s (read+write); weights {weight_bytes / 1e6:.1f} MB; floor {floor_ms:.2f} ms/step")
    for batch in (1, 32):
        ms = decode_step_ms(llm, batch, 192, vocab)
        res[f"decode_step_ms_batch{batch}"] = ms
        print(f"decode step, batch {batch:>2}, context ~192: {ms:.2f} ms = {ms / floor_ms:.2f}x the floor")
    stats = llm.kv_cache_stats()
    assert stats.num_free_blocks == stats.num_total_blocks, stats  # a leak would skew every figure
    llm.shutdown()
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
