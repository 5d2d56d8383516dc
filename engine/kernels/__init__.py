"""Triton kernels, each beside its pure-torch twin (the specification and the CPU path).

- prefill_attention: causal attention of new tokens over a paged cached prefix (twin: attention.paged_attention, prefill part).
- norm: RMSNorm with the residual add fused (twin: layers.RMSNorm).
- rotary: rotate-half RoPE from the model's cos/sin tables (twin: layers.RotaryEmbedding.apply).
- activation: SiLU(gate) * up on the merged [gate, up] projection (twin: llama.MLP).
- decode_attention: split-K paged decode attention, grouped-query, one new token per sequence (twin: attention.paged_attention, decode part).
- kv_store: writes new keys/values into the paged cache by slot, skipping padding slots < 0 (twin: attention.store_kv).
"""
