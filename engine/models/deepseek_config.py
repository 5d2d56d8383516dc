"""Reading DeepSeek-V2/V3 config fields: multi-head latent attention, YaRN, grouped routing.

The registry (``registry.py``) calls ``parse_deepseek_v3`` / ``parse_deepseek_v2`` on the
HF config dict; they return the extra ``ModelConfig`` keyword arguments. This module
imports no model code, so reading a config stays cheap. Anything transformers (our
reference) would compute differently from the DeepSeek release, or that we do not
implement, is a ``ValueError`` naming the config field, raised at load time.
"""

from __future__ import annotations

from ..config import GroupedTopKConfig, MLAConfig, MoEConfig, YarnScaling


def _int(cfg: dict, key: str, default=None, minimum: int = 1) -> int:
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{key}={value!r} must be an integer >= {minimum}")
    return value


def _rope(cfg: dict) -> YarnScaling | None:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type != "yarn":
        raise ValueError(f"rope_parameters.rope_type={rope_type!r} is not supported for DeepSeek; supported: default, yarn")
    if params.get("factor") is None:
        raise ValueError("rope_parameters.factor is required for rope_type 'yarn'")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"rope_parameters.partial_rotary_factor={params['partial_rotary_factor']!r} is not supported")
    return YarnScaling(
        factor=float(params["factor"]),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 2048)),
        # transformers takes a missing or zero beta as its default (``or 32`` / ``or 1``).
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def _mla(cfg: dict, rope_interleave: bool) -> MLAConfig:
    q_lora = cfg.get("q_lora_rank")
    return MLAConfig(
        q_lora_rank=None if q_lora is None else _int(cfg, "q_lora_rank"),
        kv_lora_rank=_int(cfg, "kv_lora_rank"),
        qk_nope_head_dim=_int(cfg, "qk_nope_head_dim"),
        qk_rope_head_dim=_int(cfg, "qk_rope_head_dim"),
        v_head_dim=_int(cfg, "v_head_dim"),
        rope_interleave=rope_interleave,
        yarn=_rope(cfg),
    )


def _moe(cfg: dict, renormalize: bool) -> MoEConfig:
    num_layers = _int(cfg, "num_hidden_layers")
    first_dense = _int(cfg, "first_k_dense_replace", 0, minimum=0)
    freq = cfg.get("moe_layer_freq", 1)
    if freq != 1:
        # transformers makes every layer from first_k_dense_replace on sparse whatever this says.
        raise ValueError(f"moe_layer_freq={freq!r} is not supported; supported: 1")
    return MoEConfig(
        num_experts=_int(cfg, "n_routed_experts"),
        top_k=_int(cfg, "num_experts_per_tok"),
        intermediate_size=_int(cfg, "moe_intermediate_size"),
        renormalize=renormalize,
        sparse_layers=tuple(range(min(first_dense, num_layers), num_layers)),
    )


def _check_common(cfg: dict) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported; supported: 'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ValueError(f"{key}={cfg[key]!r} is not supported for DeepSeek; supported: false")


def _check_groups(moe: MoEConfig, routing: GroupedTopKConfig) -> None:
    if moe.num_experts % routing.num_groups:
        raise ValueError(f"n_routed_experts={moe.num_experts} is not divisible by n_group={routing.num_groups}")
    per_group = moe.num_experts // routing.num_groups
    if routing.topk_method == "noaux_tc" and per_group < 2:
        raise ValueError(f"n_group={routing.num_groups}: noaux_tc ranks groups by their top-2 experts, "
                         f"so each group needs >= 2 of the {moe.num_experts} experts")
    if moe.top_k > routing.topk_groups * per_group:
        raise ValueError(f"num_experts_per_tok={moe.top_k} exceeds the {routing.topk_groups * per_group} experts "
                         f"of topk_group={routing.topk_groups} groups")


def _fields(mla: MLAConfig, moe: MoEConfig, routing: GroupedTopKConfig) -> dict:
    _check_groups(moe, routing)
    return {"num_kv_heads": 1, "head_dim": mla.latent_dim, "attention_bias": False, "qk_norm": False,
            "mla": mla, "moe": moe, "grouped_topk": routing}


def parse_deepseek_v3(cfg: dict) -> dict:
    """DeepseekV3ForCausalLM: sigmoid scores, ``noaux_tc`` grouped top-k with the score
    correction bias, renormalized by ``norm_topk_prob``, times ``routed_scaling_factor``."""
    _check_common(cfg)
    scoring = cfg.get("scoring_func") or "sigmoid"
    method = cfg.get("topk_method") or "noaux_tc"
    if scoring != "sigmoid":
        raise ValueError(f"scoring_func={scoring!r} is not supported for DeepseekV3ForCausalLM; supported: sigmoid")
    if method != "noaux_tc":
        raise ValueError(f"topk_method={method!r} is not supported for DeepseekV3ForCausalLM; supported: noaux_tc")
    interleave = cfg.get("rope_interleave", True)
    routing = GroupedTopKConfig(
        scoring_func=scoring, topk_method=method,
        num_groups=_int(cfg, "n_group", 1), topk_groups=_int(cfg, "topk_group", 1),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        num_shared_experts=_int(cfg, "n_shared_experts", 0, minimum=0),
    )
    moe = _moe(cfg, renormalize=bool(cfg.get("norm_topk_prob", True)))
    return _fields(_mla(cfg, rope_interleave=True if interleave is None else bool(interleave)), moe, routing)


def parse_deepseek_v2(cfg: dict) -> dict:
    """DeepseekV2ForCausalLM: softmax scores, ``greedy`` or ``group_limited_greedy`` top-k,
    never renormalized, times ``routed_scaling_factor``; RoPE always interleaved."""
    _check_common(cfg)
    scoring = cfg.get("scoring_func") or "softmax"
    method = cfg.get("topk_method") or "greedy"
    if scoring != "softmax":
        raise ValueError(f"scoring_func={scoring!r} is not supported for DeepseekV2ForCausalLM; supported: softmax")
    if method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"topk_method={method!r} is not supported for DeepseekV2ForCausalLM; "
                         f"supported: greedy, group_limited_greedy")
    if cfg.get("norm_topk_prob"):
        # The DeepSeek-V2 release renormalizes then; transformers (the reference) never does.
        raise ValueError(f"norm_topk_prob={cfg['norm_topk_prob']!r} is not supported for DeepseekV2ForCausalLM; supported: false")
    grouped = method == "group_limited_greedy"
    routing = GroupedTopKConfig(
        scoring_func=scoring, topk_method=method,
        num_groups=_int(cfg, "n_group") if grouped else 1,
        topk_groups=_int(cfg, "topk_group") if grouped else 1,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        num_shared_experts=_int(cfg, "n_shared_experts", 0, minimum=0),
    )
    moe = _moe(cfg, renormalize=False)
    return _fields(_mla(cfg, rope_interleave=True), moe, routing)
