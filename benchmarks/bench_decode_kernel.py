"""Paged decode attention kernel bandwidth on a GPU, against the device's copy bandwidth.

    python benchmarks/bench_decode_kernel.py [--batches 1,32,128] [--contexts 512,2048,8192,32768]
                                             [--iters 30] [--sweep-splits]

Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128, 16-token blocks),
bfloat16, one layer's cache with shuffled block ids, every sequence at the full context.
First the reference bandwidth: a 1 GiB device-to-device copy timed with CUDA events
(bytes read + bytes written per second). Then one correctness check against the
pure-torch twin at a ragged shape, then the table: achieved bandwidth = (KV bytes read
+ q, out and block-table bytes) / kernel time, and its ratio to the copy bandwidth. The
issue's goal is >= 80 % of copy bandwidth at context >= 2k and batch >= 32.

Each timed call is one CUDA-graph replay (as the engine will run it: no launch
overhead), after writing a buffer larger than L2 so no shape is served from cache.
``--sweep-splits`` also times num_splits in 1, 2, 4, ..., 64 and prints the best, to
check the automatic choice. Without CUDA it prints that it needs CUDA and exits 0.
Prints figures; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
GiB = 1 << 30


def copy_bandwidth(nbytes: int = GiB, iters: int = 20) -> float:
    """Bytes/s of a device-to-device copy, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * nbytes * iters / (start.elapsed_time(end) / 1e3)


def make_case(batch: int, context_lens: list[int], seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    max_blocks = -(-max(context_lens) // BLOCK_SIZE)
    num_blocks = batch * max_blocks
    kv = torch.randn(num_blocks, 2, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, generator=gen, device="cuda", dtype=DTYPE)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=DTYPE)
    block_tables = torch.randperm(num_blocks, generator=gen, device="cuda").view(batch, max_blocks).to(torch.int32)
    context_lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    return q, kv, block_tables, context_lens


def check_correctness() -> float:
    """Max abs error against the float32 twin at a ragged batch; exits 1 if off."""
    from pdserve.engine.attention import AttentionMetadata, paged_attention
    from pdserve.engine.kernels.decode_attention import paged_decode_attention

    context_lens = [1, 16, 17, 900, 2048, 4095, 4096, 3000]
    q, kv, bt, cl = make_case(len(context_lens), context_lens, seed=1)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(context_lens), dtype=torch.long, device="cuda"),
        num_decodes=len(context_lens), decode_block_tables=bt.long(), decode_context_lens=cl.long(),
        prefill_query_lens=[], prefill_context_lens=[], prefill_block_ids=[],
    )
    meta.build_decode_mask(BLOCK_SIZE)
    scale = HEAD_DIM**-0.5
    ref = paged_attention(q.float(), kv.float(), meta, scale)
    out = paged_decode_attention(q, kv, bt, cl, scale)
    err = (out.float() - ref).abs().max().item()
    # bf16 weights in P @ V and a bf16 output: ~2^-9 relative on values ~N(0, 1).
    if not err < 2e-2:
        print(f"FAILED correctness check: max abs error {err:.3g} against the float32 reference")
        sys.exit(1)
    return err


def time_call(fn, iters: int, flush: torch.Tensor) -> float:
    """Median seconds of fn (a graph replay when capture works), L2 flushed before each."""
    fn()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except RuntimeError as e:  # timing eagerly still gives a (launch-bound) figure
        print(f"  (CUDA graph capture failed, timing eagerly: {e})")
        torch.cuda.synchronize()
        run = fn
    run()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


def bench_shape(batch: int, context: int, iters: int, flush: torch.Tensor, splits: list[int | None]):
    from pdserve.engine.kernels.decode_attention import (
        choose_num_splits, paged_decode_attention, workspace_numel)

    q, kv, bt, cl = make_case(batch, [context] * batch)
    elem = DTYPE.itemsize
    nbytes = (batch * context * NUM_KV_HEADS * HEAD_DIM * 2 * elem  # K and V read
              + 2 * q.numel() * elem + bt.numel() * 4 + cl.numel() * 4)
    out = torch.empty_like(q)
    results = {}
    for s in splits:
        num_splits = s or choose_num_splits(batch, NUM_KV_HEADS, bt.shape[1], BLOCK_SIZE, q.device)
        ws = torch.empty(workspace_numel(batch, NUM_HEADS, HEAD_DIM, num_splits), device="cuda")
        seconds = time_call(lambda: paged_decode_attention(
            q, kv, bt, cl, HEAD_DIM**-0.5, num_splits=num_splits, out=out, workspace=ws), iters, flush)
        results[s] = (num_splits, seconds, nbytes / seconds)
    del q, kv, bt, cl, out
    torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,32,128")
    p.add_argument("--contexts", default="512,2048,8192,32768")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--sweep-splits", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode_kernel needs CUDA (no GPU here); nothing measured.")
        return 0
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]

    print(f"device: {torch.cuda.get_device_name()}, "
          f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs")
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth (1 GiB device-to-device, read + write): {copy_bw / 1e9:.0f} GB/s")
    print(f"correctness vs float32 twin (ragged batch of 8 up to 4096): max abs error {check_correctness():.2e}")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")  # > H100's 50 MB L2

    splits: list[int | None] = [None] + ([1, 2, 4, 8, 16, 32, 64] if args.sweep_splits else [])
    head = f"{'batch':>5} {'context':>7} {'splits':>6} {'time us':>9} {'GB/s':>7} {'% copy':>7}"
    print(f"\nbf16, {NUM_HEADS} q heads, {NUM_KV_HEADS} kv heads, head_dim {HEAD_DIM}, block {BLOCK_SIZE}")
    print(head + ("  best sweep (splits, GB/s, % copy)" if args.sweep_splits else "") + "  goal")
    for batch in batches:
        for context in contexts:
            res = bench_shape(batch, context, args.iters, flush, splits)
            num_splits, seconds, bw = res[None]
            line = f"{batch:>5} {context:>7} {num_splits:>6} {seconds * 1e6:>9.1f} {bw / 1e9:>7.0f} {100 * bw / copy_bw:>6.1f}%"
            if args.sweep_splits:
                best_s, _, best_bw = max((v for k, v in res.items() if k is not None), key=lambda v: v[2])
                line += f"  {best_s:>3} {best_bw / 1e9:>6.0f} {100 * best_bw / copy_bw:>5.1f}%"
            if context >= 2048 and batch >= 32:
                line += "  " + ("met" if bw >= 0.8 * copy_bw else "MISSED (< 80%)")
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
