"""Prefill attention and fused-op Triton kernels against the GPU's matmul rate and their torch twins.

    python benchmarks/bench_prefill_kernel.py [--dtype bfloat16] [--num-tokens 4096] [--sweep]
    python benchmarks/bench_prefill_kernel.py --compile-only [--arch 90]   # no GPU needed

(a) measured dense matmul TFLOP/s (8192^3 in the chosen dtype), the ceiling;
(b) paged prefill attention at the Llama-3-8B shape (32 query heads, 8 KV heads,
    head_dim 128, block 16) on a 4k-token prompt and on a 2k chunk after a 6k cached
    prefix: achieved TFLOP/s (causal FLOPs only) and its ratio to (a), next to torch
    SDPA on the same tokens in contiguous layout and the pure-torch paged twin;
    ``--sweep`` also times other tile shapes;
(c) each fused op (RMSNorm+residual, rotary, SiLU-and-mul) against its torch twin at a
    decode-sized batch (64 tokens) and a prefill-sized one (4096): twin time / kernel
    time, the "where they measurably help" figure.
Checks each kernel against its twin at one shape before timing. Needs CUDA: prints
that and exits 0 elsewhere. Prints figures; asserts nothing.

``--compile-only`` compiles every kernel for a CUDA architecture (default sm_90) on any
machine, GPU or not, with the specialisations the JIT applies at run time (16-byte
aligned pointers, strides divisible by 16), and prints shared memory per program and
whether the prefill key loop is software-pipelined: the compile errors the CPU
interpreter cannot see.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
HIDDEN, INTERMEDIATE = 4096, 14336


def _time_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def matmul_tflops(dtype: torch.dtype, n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = _time_ms(lambda: torch.matmul(a, b))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _paged_case(seqs: list[tuple[int, int]], dtype: torch.dtype) -> dict:
    """Random paged KV and queries for [(prefix_len, q_len)], block ids shuffled."""
    context_lens = [p + q for p, q in seqs]
    blocks_per_seq = [-(-c // BLOCK_SIZE) for c in context_lens]
    num_blocks = sum(blocks_per_seq)
    kv = torch.randn(num_blocks, 2, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, device="cuda", dtype=dtype)
    perm = torch.randperm(num_blocks, device="cuda")
    tables = torch.zeros(len(seqs), max(blocks_per_seq), dtype=torch.int32, device="cuda")
    block_ids, used = [], 0
    for p, nb in enumerate(blocks_per_seq):
        block_ids.append(perm[used : used + nb])
        tables[p, :nb] = block_ids[-1].to(torch.int32)
        used += nb
    q_lens = [q for _, q in seqs]
    return dict(
        q=torch.randn(sum(q_lens), NUM_HEADS, HEAD_DIM, device="cuda", dtype=dtype),
        kv=kv,
        cu=torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda"),
        ctx=torch.tensor(context_lens, dtype=torch.int32, device="cuda"),
        tables=tables,
        q_lens=q_lens,
        context_lens=context_lens,
        block_ids=block_ids,
    )


def _twin_meta(case: dict):
    from pdserve.engine.attention import AttentionMetadata

    return AttentionMetadata(
        slot_mapping=torch.zeros(len(case["q"]), dtype=torch.long, device="cuda"), num_decodes=0,
        decode_block_tables=torch.zeros(0, 1, dtype=torch.long, device="cuda"),
        decode_context_lens=torch.zeros(0, dtype=torch.long, device="cuda"),
        prefill_query_lens=case["q_lens"], prefill_context_lens=case["context_lens"], prefill_block_ids=case["block_ids"],
    )


def _run_kernel(case: dict, tiles=None) -> torch.Tensor:
    from pdserve.engine.kernels.prefill_attention import paged_prefill_attention

    return paged_prefill_attention(
        case["q"], case["kv"], case["cu"], case["ctx"], case["tables"], HEAD_DIM**-0.5,
        max_query_len=max(case["q_lens"]), tiles=tiles,
    )


def _causal_flops(case: dict) -> float:
    # QK^T and PV, 2 FLOPs per multiply-add each, over the visible (query, key) pairs only.
    pairs = sum(q * (c - q) + q * (q + 1) // 2 for q, c in zip(case["q_lens"], case["context_lens"]))
    return 4.0 * NUM_HEADS * HEAD_DIM * pairs


def check_attention(dtype: torch.dtype) -> bool:
    from pdserve.engine.attention import paged_attention

    case = _paged_case([(0, 1000), (512, 700), (333, 257)], dtype)
    out = _run_kernel(case).float()
    expected = paged_attention(case["q"].float(), case["kv"].float(), _twin_meta(case), HEAD_DIM**-0.5)
    err = (out - expected).abs().max().item()
    limit = 1.5e-2 if dtype == torch.bfloat16 else 2e-3
    print(f"check prefill attention vs twin: max abs error {err:.2e} (limit {limit:.0e}) {'ok' if err <= limit else 'FAILED'}")
    return err <= limit


def bench_attention(dtype: torch.dtype, num_tokens: int, peak: float, sweep: bool) -> None:
    from pdserve.engine.attention import paged_attention
    from pdserve.engine.kernels.prefill_attention import PrefillTiles, default_tiles

    cases = {
        f"prompt {num_tokens}": [(0, num_tokens)],
        f"chunk {num_tokens // 2} after {3 * num_tokens // 2} cached": [(3 * num_tokens // 2, num_tokens // 2)],
    }
    for name, seqs in cases.items():
        case = _paged_case(seqs, dtype)
        flops = _causal_flops(case)
        ms = _time_ms(lambda: _run_kernel(case))
        tflops = flops / (ms * 1e-3) / 1e12
        print(f"prefill attention, {name}: {ms:.3f} ms, {tflops:.1f} TFLOP/s, {tflops / peak:.2f} of matmul")
        # Ceiling for comparison: SDPA on the same tokens in contiguous layout (flash backend).
        prefix_len, q_len = seqs[0]
        k, v = case["kv"][:, 0], case["kv"][:, 1]  # contiguous in cache order: fine for timing
        k = k.permute(1, 0, 2, 3).reshape(1, NUM_KV_HEADS, -1, HEAD_DIM)[:, :, : prefix_len + q_len]
        v = v.permute(1, 0, 2, 3).reshape(1, NUM_KV_HEADS, -1, HEAD_DIM)[:, :, : prefix_len + q_len]
        group = NUM_HEADS // NUM_KV_HEADS
        k, v = k.repeat_interleave(group, 1).contiguous(), v.repeat_interleave(group, 1).contiguous()
        qs = case["q"].transpose(0, 1).unsqueeze(0)
        if prefix_len == 0:
            sdpa = lambda: F.scaled_dot_product_attention(qs, k, v, is_causal=True)  # noqa: E731
        else:
            qpos = torch.arange(prefix_len, prefix_len + q_len, device="cuda")[:, None]
            mask = torch.arange(prefix_len + q_len, device="cuda")[None, :] <= qpos
            sdpa = lambda: F.scaled_dot_product_attention(qs, k, v, attn_mask=mask)  # noqa: E731
        sdpa_ms = _time_ms(sdpa)
        print(f"  torch SDPA (contiguous, MHA-expanded): {sdpa_ms:.3f} ms, {flops / (sdpa_ms * 1e-3) / 1e12:.1f} TFLOP/s")
        meta = _twin_meta(case)
        twin_ms = _time_ms(lambda: paged_attention(case["q"], case["kv"], meta, HEAD_DIM**-0.5))
        print(f"  pure-torch paged twin: {twin_ms:.3f} ms ({twin_ms / ms:.1f}x the kernel's time)")
        if sweep:
            print(f"  default tiles {default_tiles(HEAD_DIM, dtype)}")
            for block_m in (64, 128):
                for block_n in (32, 64, 128):
                    for num_warps in (4, 8):
                        for num_stages in (2, 3, 4):
                            tiles = PrefillTiles(block_m, block_n, num_warps, num_stages)
                            try:
                                t = _time_ms(lambda: _run_kernel(case, tiles))
                            except Exception as exc:  # e.g. triton OutOfResources (shared memory)
                                print(f"    {tiles}: failed ({type(exc).__name__})")
                                continue
                            print(f"    m{block_m} n{block_n} w{num_warps} s{num_stages}: {t:.3f} ms, {flops / (t * 1e-3) / 1e12:.1f} TFLOP/s")


def bench_fused_ops(dtype: torch.dtype) -> bool:
    from pdserve.engine.config import RopeScaling
    from pdserve.engine.kernels.activation import silu_and_mul
    from pdserve.engine.kernels.norm import rms_norm
    from pdserve.engine.kernels.rotary import apply_rotary
    from pdserve.engine.layers import RMSNorm, RotaryEmbedding

    norm = RMSNorm(HIDDEN, 1e-5).to(device="cuda", dtype=dtype)
    norm.weight.data.normal_(1.0, 0.2)
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    rope = RotaryEmbedding(HEAD_DIM, 32768, 500000.0, scaling, dtype).to("cuda")
    ok = True
    for num_tokens in (64, 4096):
        x = torch.randn(num_tokens, HIDDEN, device="cuda", dtype=dtype)
        residual = torch.randn_like(x)
        qkv = torch.randn(num_tokens, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, device="cuda", dtype=dtype)
        q, k, _ = qkv.split([NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM], dim=-1)
        q, k = q.view(num_tokens, NUM_HEADS, HEAD_DIM), k.view(num_tokens, NUM_KV_HEADS, HEAD_DIM)
        positions = torch.randint(0, 32768, (num_tokens,), device="cuda")
        cos_sin = rope.cos_sin(positions)  # the model looks this up once per step, not per layer
        gate_up = torch.randn(num_tokens, 2 * INTERMEDIATE, device="cuda", dtype=dtype)

        def silu_twin():
            gate, up = gate_up.chunk(2, dim=-1)
            return F.silu(gate) * up

        ops = {
            "rms_norm+residual": (lambda: rms_norm(x, norm.weight, 1e-5, residual), lambda: norm(x, residual)),
            "rotary q+k": (lambda: apply_rotary(q, k, positions, rope.cos, rope.sin), lambda: RotaryEmbedding.apply(cos_sin, q, k)),
            "silu_and_mul": (lambda: silu_and_mul(gate_up), silu_twin),
        }
        for name, (kernel, twin) in ops.items():
            got, want = kernel(), twin()
            got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
            err = max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want))
            scale = max(w.float().abs().max().item() for w in want)
            good = err <= 4 * torch.finfo(dtype).eps * scale
            ok &= good
            kernel_ms, twin_ms = _time_ms(kernel), _time_ms(twin)
            print(
                f"{name}, {num_tokens} tokens: kernel {kernel_ms * 1e3:.1f} us, twin {twin_ms * 1e3:.1f} us, "
                f"speedup {twin_ms / kernel_ms:.2f}x (check max abs error {err:.1e} {'ok' if good else 'FAILED'})"
            )
    return ok


def compile_only(arch: int, dtype: torch.dtype) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pdserve.engine.kernels import activation, norm, prefill_attention, rotary

    if not isinstance(prefill_attention._prefill_kernel, triton.runtime.JITFunction):
        print("--compile-only needs TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    dt = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    tiles = prefill_attention.default_tiles(HEAD_DIM, dtype)
    kernels = {
        "prefill_attention": (
            prefill_attention._prefill_kernel,
            dict(Q=f"*{dt}", KV=f"*{dt}", Out=f"*{dt}", CuQueryLens="*i32", ContextLens="*i32", BlockTables="*i32",
                 scale_log2="fp32", v_scale="fp32", stride_q_token="i32", stride_q_head="i32", stride_o_token="i32", stride_o_head="i32",
                 stride_kv_block="i32", stride_kv_kind="i32", stride_kv_head="i32", stride_kv_token="i32", stride_table="i32"),
            dict(GROUP=NUM_HEADS // NUM_KV_HEADS, BLOCK_SIZE=BLOCK_SIZE, HEAD_DIM=HEAD_DIM, BLOCK_M=tiles.block_m,
                 BLOCK_N=tiles.block_n, PRECISION="tf32"),
            dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        ),
        "rms_norm": (
            norm._rms_norm_kernel,
            dict(X=f"*{dt}", Residual=f"*{dt}", Weight=f"*{dt}", Out=f"*{dt}", ResidualOut=f"*{dt}", eps="fp32",
                 hidden="i32", stride_x="i32", stride_r="i32", stride_o="i32", stride_ro="i32"),
            dict(HAS_RESIDUAL=True, BLOCK=HIDDEN),
            dict(num_warps=8),
        ),
        "rotary": (
            rotary._rotary_kernel,
            dict(Q=f"*{dt}", K=f"*{dt}", QOut=f"*{dt}", KOut=f"*{dt}", Positions="*i64", Cos=f"*{dt}", Sin=f"*{dt}",
                 num_heads="i32", num_kv_heads="i32", stride_q_token="i32", stride_q_head="i32", stride_k_token="i32",
                 stride_k_head="i32", stride_table="i32"),
            dict(HALF=HEAD_DIM // 2, BLOCK_H=NUM_HEADS, BLOCK_HKV=NUM_KV_HEADS),
            dict(num_warps=4),
        ),
        "silu_and_mul": (
            activation._silu_and_mul_kernel,
            dict(X=f"*{dt}", Out=f"*{dt}", width="i32", stride_x="i32", stride_o="i32"),
            dict(BLOCK=1024),
            dict(num_warps=4),
        ),
    }
    for name, (fn, signature, constexprs, options) in kernels.items():
        signature = dict(signature, **{k: "constexpr" for k in constexprs})
        names = list(signature)
        # What the JIT marks at run time for these shapes: aligned pointers, strides % 16 == 0.
        aligned = [n for n, t in signature.items() if t.startswith("*") or (n.startswith("stride") and n != "stride_table")]
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", arch, 32), options=options,
        )
        pipelined = compiled.asm["ttgir"].count("async_copy_global_to_local")
        print(f"{name}: compiled for sm_{arch}, {compiled.metadata.shared} bytes shared memory, {pipelined} async copies")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--num-tokens", type=int, default=4096)
    ap.add_argument("--sweep", action="store_true", help="also time other prefill tile shapes")
    ap.add_argument("--compile-only", action="store_true", help="compile the kernels for --arch; no GPU needed")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability for --compile-only, e.g. 80, 90")
    args = ap.parse_args()
    if args.compile_only:
        return compile_only(args.arch, getattr(torch, args.dtype))
    if not torch.cuda.is_available():
        print("bench_prefill_kernel needs CUDA (no GPU here); nothing measured.")
        return 0
    if args.num_tokens < 2:
        print(f"--num-tokens must be >= 2, got {args.num_tokens}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, dtype {args.dtype}")
    peak = matmul_tflops(dtype)
    print(f"dense matmul 8192^3: {peak:.1f} TFLOP/s")
    ok = check_attention(dtype)
    bench_attention(dtype, args.num_tokens, peak, args.sweep)
    ok &= bench_fused_ops(dtype)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
