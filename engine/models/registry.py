"""The model registry: one dict from a Hugging Face ``architectures`` entry to our model
class and the parser of that family's config fields.

``ModelConfig.from_dir`` reads the fields every decoder has (sizes, heads, RoPE, EOS)
and then calls the architecture's ``parse`` for the rest (q/k/v bias, q/k norm, the
mixture-of-experts section ...), so one family's quirks live in one function here, not
in ``if name == ...`` sites across the engine. The loader builds
``model_class(cfg.architecture)(cfg, tp, dtype, max_positions)``; every model class
provides ``param_for(ckpt_name)``, ``forward``, ``compute_logits``, ``set_kernels`` and
``num_local_kv_heads`` (see ``llama.LlamaForCausalLM``).

A parser raises ``ValueError`` naming the config field it cannot serve (an unknown
routing method, an activation we do not implement ...): at load time, never mid-request.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from ..config import MoEConfig
from .deepseek_config import parse_deepseek_v2, parse_deepseek_v3


@dataclass(frozen=True)
class Architecture:
    name: str
    """The HF ``architectures`` entry, e.g. "Qwen3MoeForCausalLM"."""
    model_class: str
    """"module:Class", imported on first use (a model file may need Triton or more)."""
    parse: Callable[[dict], dict]
    """HF config dict -> extra ``ModelConfig`` keyword arguments (e.g. ``{"moe": MoEConfig(...)}``)."""


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> None:
    if arch.name in ARCHITECTURES:
        raise ValueError(f"architecture {arch.name!r} is already registered")
    ARCHITECTURES[arch.name] = arch


def find(names: list[str]) -> Architecture:
    """The first registered entry of a config's ``architectures`` list."""
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ValueError(f"unsupported architecture {names!r}; supported: {', '.join(sorted(ARCHITECTURES))}")


def model_class(name: str) -> type:
    if name not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {name!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    module, _, cls = ARCHITECTURES[name].model_class.partition(":")
    return getattr(importlib.import_module(module), cls)


# ----------------------------------------------------------------------------------
# Parsers
# ----------------------------------------------------------------------------------


def _check_silu(cfg: dict) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported; supported: 'silu'")


def _dense(**fixed) -> Callable[[dict], dict]:
    def parse(cfg: dict) -> dict:
        _check_silu(cfg)
        return dict(fixed)

    return parse


def _positive(cfg: dict, key: str, default=None) -> int:
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key}={value!r} must be a positive integer")
    return value


def _qwen_sparse_layers(cfg: dict) -> tuple[int, ...]:
    """Qwen2/3-MoE: layer i is sparse unless listed in ``mlp_only_layers`` or off the
    ``decoder_sparse_step`` grid (``(i + 1) % step == 0``)."""
    num_layers = cfg["num_hidden_layers"]
    step = _positive(cfg, "decoder_sparse_step", 1)
    dense = cfg.get("mlp_only_layers") or []
    if not isinstance(dense, list) or any(not isinstance(i, int) or not 0 <= i < num_layers for i in dense):
        raise ValueError(f"mlp_only_layers={dense!r} must list layer indices in [0, {num_layers})")
    return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)


def _qwen_moe(cfg: dict, shared_expert: bool) -> MoEConfig:
    _check_silu(cfg)
    return MoEConfig(
        # Hub checkpoints spell it num_experts; transformers 5 writes Qwen3-MoE's as num_local_experts.
        num_experts=_positive(cfg, "num_experts" if "num_experts" in cfg else "num_local_experts"),
        top_k=_positive(cfg, "num_experts_per_tok"),
        intermediate_size=_positive(cfg, "moe_intermediate_size"),
        renormalize=bool(cfg.get("norm_topk_prob", False)),
        sparse_layers=_qwen_sparse_layers(cfg),
        shared_expert_intermediate_size=_positive(cfg, "shared_expert_intermediate_size") if shared_expert else 0,
    )


def parse_qwen3_moe(cfg: dict) -> dict:
    return {"qk_norm": True, "moe": _qwen_moe(cfg, shared_expert=False)}


def parse_qwen2_moe(cfg: dict) -> dict:
    return {"attention_bias": bool(cfg.get("qkv_bias", True)), "moe": _qwen_moe(cfg, shared_expert=True)}


def parse_mixtral(cfg: dict) -> dict:
    _check_silu(cfg)
    moe = MoEConfig(
        num_experts=_positive(cfg, "num_local_experts"),
        top_k=_positive(cfg, "num_experts_per_tok"),
        intermediate_size=_positive(cfg, "intermediate_size"),
        renormalize=True,  # Mixtral always renormalizes its top-k softmax weights
        sparse_layers=tuple(range(cfg["num_hidden_layers"])),
    )
    return {"moe": moe}


_MODELS = "pdserve.engine.models"

for _arch in (
    Architecture("LlamaForCausalLM", f"{_MODELS}.llama:LlamaForCausalLM", _dense()),
    Architecture("MistralForCausalLM", f"{_MODELS}.llama:LlamaForCausalLM", _dense()),
    Architecture("Qwen2ForCausalLM", f"{_MODELS}.llama:LlamaForCausalLM", _dense(attention_bias=True)),
    Architecture("Qwen3ForCausalLM", f"{_MODELS}.llama:LlamaForCausalLM", _dense(qk_norm=True)),
    Architecture("Qwen3MoeForCausalLM", f"{_MODELS}.sparse_moe:SparseMoeForCausalLM", parse_qwen3_moe),
    Architecture("Qwen2MoeForCausalLM", f"{_MODELS}.sparse_moe:SparseMoeForCausalLM", parse_qwen2_moe),
    Architecture("MixtralForCausalLM", f"{_MODELS}.sparse_moe:SparseMoeForCausalLM", parse_mixtral),
    Architecture("DeepseekV3ForCausalLM", f"{_MODELS}.deepseek:DeepseekForCausalLM", parse_deepseek_v3),
    Architecture("DeepseekV2ForCausalLM", f"{_MODELS}.deepseek:DeepseekForCausalLM", parse_deepseek_v2),
):
    register(_arch)
