"""Load a Hugging Face checkpoint (one or many safetensors files) into a sharded model.

The model class comes from the registry (engine/models/registry.py); the model maps
each checkpoint name to (its parameter, a shard id) and the parameter's
``weight_loader`` cuts this rank's slice, so this file knows no architecture.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .models.registry import model_class
from .moe import FusedMoE
from .parallel import TPGroup

log = logging.getLogger("pdserve.engine")


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {model_dir}")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"checkpoint index names missing files: {[m.name for m in missing]}")
    return files


#: Where FP8 checkpoints keep a layer's KV cache scales: ``self_attn.k_scale`` / ``v_scale``
#: (vLLM, llm-compressor), ``self_attn.kv_scale`` (one for both: AutoFP8), or the output
#: scales of ``k_proj`` / ``v_proj`` (compressed-tensors). stored = x / scale.
_KV_SCALE_NAME = re.compile(r"layers\.(\d+)\.self_attn\.(k_scale|v_scale|kv_scale|k_proj\.output_scale|v_proj\.output_scale)$")


def _take_kv_scale(scales: dict[int, dict[str, float]], key: str, match: re.Match, tensor: torch.Tensor) -> None:
    if tensor.numel() != 1:
        raise ValueError(f"{key}: a per-tensor KV cache scale must have one element, got shape {tuple(tensor.shape)}")
    value = float(tensor.float())
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{key}: a KV cache scale must be a positive finite number, got {value}")
    entry = scales.setdefault(int(match.group(1)), {})
    for plane in {"k_scale": "k", "k_proj.output_scale": "k", "v_scale": "v",
                  "v_proj.output_scale": "v", "kv_scale": "kv"}[match.group(2)]:
        entry[plane] = value


def kv_scales_for(model: torch.nn.Module, config) -> list[tuple[float, float]]:
    """Set and return each layer's FP8 KV cache scales ``(k_scale, v_scale)``: the
    checkpoint's where it has them (all layers, or it is an error), else 1.0.

    Why 1.0 and not scales computed here: prefill and decode workers move the cached bytes
    as they are, so every worker of a model must quantize with identical scales, and
    scales measured on a worker's first batches would differ between workers. 1.0 keeps
    |x| <= 448 exact in range, which covers keys and values of the models measured
    (docs/benchmarks.md "FP8 KV cache" reports the largest |K|, |V| seen); larger values
    saturate rather than overflow.
    """
    n = config.model.num_layers
    found = getattr(model, "checkpoint_kv_scales", {})
    if found:
        incomplete = [i for i in range(n) if set(found.get(i, ())) != {"k", "v"}]
        if incomplete:
            raise ValueError(f"checkpoint in {config.model.model_dir} has KV cache scales for some layers but not for "
                             f"layers {incomplete[:8]} (both k_scale and v_scale are needed for every layer)")
        scales = [(found[i]["k"], found[i]["v"]) for i in range(n)]
        log.info("FP8 KV cache: per-layer scales from the checkpoint")
    else:
        scales = [(1.0, 1.0)] * n
        log.info("FP8 KV cache: the checkpoint has no KV cache scales; using 1.0 for every layer")
    model.set_kv_scales([k for k, _ in scales], [v for _, v in scales])
    return scales


def load_model(cfg: ModelConfig, tp: TPGroup, dtype: torch.dtype, device: str, max_positions: int) -> torch.nn.Module:
    # Parameters are created in the target dtype (no float32 copy of a large model).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(cfg.architecture)(cfg, tp, dtype, max_positions)
    finally:
        torch.set_default_dtype(previous)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    model.checkpoint_kv_scales = {}
    for path in checkpoint_files(Path(cfg.model_dir)):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                kv_scale = _KV_SCALE_NAME.search(key)
                if kv_scale is not None:  # an FP8 checkpoint's KV cache scales (used by an FP8 cache only)
                    _take_kv_scale(model.checkpoint_kv_scales, key, kv_scale, f.get_tensor(key))
                    continue
                target = model.param_for(key)
                if target is None:
                    continue
                name, shard = target
                param = params.get(name)
                if param is None:
                    raise ValueError(f"unexpected tensor {key!r} in {path.name} for {cfg.architecture}")
                tensor = f.get_tensor(key)  # copied (and cast) into the parameter by its loader
                if shard is None:
                    param.weight_loader(param, tensor)
                else:
                    param.weight_loader(param, tensor, shard)
                loaded.add(name)
    missing = sorted(set(params) - loaded)
    # A stacked expert parameter counts as loaded at its first expert; each needs all of them.
    missing += [f"{name}: {w}" for name, m in model.named_modules() if isinstance(m, FusedMoE) for w in m.missing_weights()]
    if missing:
        raise ValueError(f"checkpoint in {cfg.model_dir} lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return model.eval()
