"""Mixture-of-experts cost on the CPU: the expert block against a dense MLP with the same
active parameters, and the two expert-parallel dispatches at 2 ranks.

    python benchmarks/bench_moe.py [--experts 128] [--iters 20] [--skip-ep]

Shapes are Qwen3-30B-A3B's layer: hidden 2048, 128 experts of intermediate 768, top-8;
the dense twin is one SiLU-gated MLP of intermediate 8 * 768 = 6144 (the same parameters
per token). float32, one layer, weights random.

1. Decode step of one FFN block at batch 1, 4 and 16 tokens: the MoE block as the
   engine runs it (router GEMM, softmax top-k, ``FusedMoE`` with the torch twin) vs the
   dense ``MLP``. The issue's goal is MoE <= 1.5x dense at batch 1; at larger batches the
   tokens touch more distinct experts (more weight bytes read), which no implementation
   avoids.
2. Expert parallelism: 2 gloo ranks on this machine, 64 experts each, ``FusedMoE``
   forward with ``all_reduce`` vs ``all_to_all`` dispatch at 1, 16 and 256 tokens
   (fastest of the iterations, slower rank).
3. DeepSeek-V3 decode step (CUDA only, skipped otherwise; ``--deepseek-layers N``, 0 to
   skip): N MoE layers of V3's shape in bfloat16 with random weights, a batch of 1, 16
   and 64 sequences at 2048 tokens of paged latent cache, absorbed MLA decode on the
   torch twin and on the Triton kernel (engine/kernels/mla_decode.py), experts on
   ``FusedMoE``. Two layers hold ~45 GB of expert weights.

Prints figures; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import time

import torch

HIDDEN, MOE_INTER, TOP_K = 2048, 768, 8


def _time(fn, iters: int) -> float:
    """Fastest of ``iters`` calls: the host is shared, and the minimum is the figure that
    other processes' load disturbs least."""
    fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return min(samples)


def _fill(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data.normal_(0, p.shape[-1] ** -0.5, generator=g)


def _moe_block(num_experts: int):
    from pdserve.engine.config import ModelConfig, MoEConfig
    from pdserve.engine.models.sparse_moe import SparseMoeBlock
    from pdserve.engine.parallel import TPGroup

    cfg = ModelConfig(
        model_dir="", architecture="Qwen3MoeForCausalLM", vocab_size=1, hidden_size=HIDDEN,
        intermediate_size=TOP_K * MOE_INTER, num_layers=1, num_heads=32, num_kv_heads=4, head_dim=128,
        max_position_embeddings=1, rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=None,
        tie_word_embeddings=False, attention_bias=False, qk_norm=True,
        moe=MoEConfig(num_experts, TOP_K, MOE_INTER, True, (0,)),
    )
    from pdserve.engine.models.llama import MLP

    block, dense = SparseMoeBlock(cfg, TPGroup()), MLP(cfg, TPGroup())
    _fill(block, 0)
    _fill(dense, 1)
    return block, dense


def bench_decode(num_experts: int, iters: int) -> None:
    block, dense = _moe_block(num_experts)
    print(f"\n1. FFN block decode step, hidden {HIDDEN}: MoE {num_experts} experts x {MOE_INTER}, top-{TOP_K} "
          f"vs dense MLP {TOP_K * MOE_INTER} (float32, {torch.get_num_threads()} threads)")
    print(f"{'tokens':>6} {'experts hit':>11} {'dense ms':>9} {'MoE ms':>8} {'MoE/dense':>9}")
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for T in (1, 4, 16):
            x = torch.randn(T, HIDDEN, generator=g)
            hit = len(torch.unique(torch.topk(torch.nn.functional.linear(x, block.gate), TOP_K).indices))
            t_dense = t_moe = float("inf")
            for _ in range(iters):  # interleaved, so a burst of load hits both alike
                t_dense = min(t_dense, _time(lambda: dense(x), 1))
                t_moe = min(t_moe, _time(lambda: block(x), 1))
            print(f"{T:>6} {hit:>11} {t_dense * 1e3:>9.2f} {t_moe * 1e3:>8.2f} {t_moe / t_dense:>8.2f}x")


def _ep_rank(rank: int, port: int, num_experts: int, iters: int, results) -> None:
    import torch.distributed as dist

    from pdserve.engine.moe import FusedMoE, select_experts
    from pdserve.engine.parallel import TPGroup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        moe = FusedMoE(num_experts, HIDDEN, MOE_INTER, TPGroup(rank, 2))
        _fill(moe, rank)
        out = {}
        with torch.inference_mode():
            for T in (1, 16, 256):
                g = torch.Generator().manual_seed(T)
                x = torch.randn(T, HIDDEN, generator=g)
                weights, ids = select_experts(torch.randn(T, num_experts, generator=g), TOP_K, True)
                for mode in ("all_reduce", "all_to_all"):
                    moe.dispatch = mode
                    dist.barrier()
                    out[T, mode] = _time(lambda: moe(x, weights, ids), iters)
        results.put((rank, out))
    finally:
        dist.destroy_process_group()


def bench_ep(num_experts: int, iters: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_ep_rank, args=(r, port, num_experts, iters, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    print(f"\n2. Expert parallelism, 2 gloo ranks x {num_experts // 2} experts, 1 thread each: FusedMoE forward "
          f"(fastest of {iters}, slower rank)")
    print(f"{'tokens':>6} {'all_reduce ms':>13} {'all_to_all ms':>13} {'a2a/ar':>7}")
    for T in (1, 16, 256):
        ar = max(got[r][T, "all_reduce"] for r in got)
        a2a = max(got[r][T, "all_to_all"] for r in got)
        print(f"{T:>6} {ar * 1e3:>13.2f} {a2a * 1e3:>13.2f} {a2a / ar:>6.2f}x")


# DeepSeek-V3's layer (GPU only): MLA over the latent cache + 256 experts, top-8 of 8 groups.
DEEPSEEK_V3 = dict(hidden_size=7168, num_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                   qk_rope_head_dim=64, v_head_dim=128, num_experts=256, top_k=8, moe_intermediate_size=2048,
                   num_groups=8, topk_groups=4, num_shared_experts=1)


def _deepseek_layers(shape: dict, num_layers: int, device: str, dtype: torch.dtype):
    """``num_layers`` MoE decoder layers of DeepSeek-V3 (or ``shape``) with random weights."""
    from pdserve.engine.config import GroupedTopKConfig, MLAConfig, ModelConfig, MoEConfig, YarnScaling
    from pdserve.engine.mla import MLARotary
    from pdserve.engine.models.deepseek import DeepseekDecoderLayer
    from pdserve.engine.parallel import TPGroup

    mla = MLAConfig(shape["q_lora_rank"], shape["kv_lora_rank"], shape["qk_nope_head_dim"], shape["qk_rope_head_dim"],
                    shape["v_head_dim"], True, YarnScaling(40.0, 4096, mscale=1.0, mscale_all_dim=1.0))
    cfg = ModelConfig(
        model_dir="", architecture="DeepseekV3ForCausalLM", vocab_size=1, hidden_size=shape["hidden_size"],
        intermediate_size=shape["moe_intermediate_size"], num_layers=num_layers, num_heads=shape["num_heads"],
        num_kv_heads=1, head_dim=mla.latent_dim, max_position_embeddings=16384, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling=None, tie_word_embeddings=False, attention_bias=False, qk_norm=False,
        moe=MoEConfig(shape["num_experts"], shape["top_k"], shape["moe_intermediate_size"], True, tuple(range(num_layers))),
        mla=mla,
        grouped_topk=GroupedTopKConfig("sigmoid", "noaux_tc", shape["num_groups"], shape["topk_groups"], 2.5,
                                       shape["num_shared_experts"]),
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            layers = torch.nn.ModuleList(DeepseekDecoderLayer(cfg, TPGroup(), i) for i in range(num_layers))
            rotary = MLARotary(mla, cfg.rope_theta, cfg.max_position_embeddings, dtype)
    finally:
        torch.set_default_dtype(previous)
    g = torch.Generator(device).manual_seed(0)
    for p in layers.parameters():
        p.data.normal_(0, p.shape[-1] ** -0.5, generator=g)
    return cfg, layers.eval(), rotary


def bench_deepseek_v3_decode(iters: int, num_layers: int = 2, batches=(1, 16, 64), context_len: int = 2048,
                             device: str = "cuda", shape: dict | None = None) -> None:
    """A DeepSeek-V3-shaped decode step (bf16 on CUDA): ``num_layers`` layers of absorbed
    MLA decode over a paged latent cache (torch twin vs the Triton kernel) and the expert
    block, at ``context_len`` tokens per sequence. Skips without CUDA (call with
    ``device="cpu"`` and a small ``shape`` to run the code path on a CPU)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("\n3. DeepSeek-V3 decode step: skipped (no CUDA)")
        return
    from pdserve.engine.mla import MLABackend, TritonMLABackend

    shape = shape or DEEPSEEK_V3
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    cfg, layers, rotary = _deepseek_layers(shape, num_layers, device, dtype)
    block_size = 16
    blocks_per_seq = -(-context_len // block_size)
    num_blocks = max(batches) * blocks_per_seq + 1
    cache = torch.randn(num_layers, num_blocks, 1, 1, block_size, cfg.head_dim, device=device, dtype=dtype)
    backends = {"torch": MLABackend()}
    if device.startswith("cuda"):
        backends["triton"] = TritonMLABackend()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    print(f"\n3. DeepSeek-V3 decode step, {num_layers} MoE layers ({shape['num_experts']} experts, top-{shape['top_k']}), "
          f"context {context_len}, {dtype} on {device}: ms per step")
    print(f"{'batch':>5} " + " ".join(f"{name + ' ms':>10}" for name in backends))
    with torch.inference_mode():
        for B in batches:
            tables = torch.arange(1, B * blocks_per_seq + 1, device=device).view(B, blocks_per_seq)
            lens = torch.full((B,), context_len, device=device)
            slots = tables[:, -1] * block_size + (context_len - 1) % block_size
            positions = lens - 1
            x = torch.randn(B, cfg.hidden_size, device=device, dtype=dtype)
            times = []
            for backend in backends.values():
                meta = backend.build_metadata(slots, tables, lens, torch.zeros(0, 2, dtype=torch.long),
                                              torch.zeros(0, 1, dtype=torch.long, device=device), block_size)
                for layer in layers:
                    layer.self_attn.backend = backend

                def step():
                    h, residual, cos_sin = x, None, rotary.for_step(positions)
                    for i, layer in enumerate(layers):
                        h, residual = layer(rotary, cos_sin, h, residual, cache[i], meta)
                    sync()

                times.append(_time(step, iters))
            print(f"{B:>5} " + " ".join(f"{t * 1e3:>10.2f}" for t in times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--skip-ep", action="store_true")
    ap.add_argument("--deepseek-layers", type=int, default=2, help="DeepSeek-V3 layers of section 3 (CUDA); 0 skips it")
    args = ap.parse_args()
    bench_decode(args.experts, args.iters)
    if not args.skip_ep:
        bench_ep(args.experts, args.iters)
    if args.deepseek_layers:
        bench_deepseek_v3_decode(args.iters, args.deepseek_layers)


if __name__ == "__main__":
    main()
