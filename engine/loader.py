"""Load a Hugging Face checkpoint (one or many safetensors files) into a sharded model.

The model class comes from the registry (engine/models/registry.py); the model maps
each checkpoint name to (its parameter, a shard id) and the parameter's
``weight_loader`` cuts this rank's slice, so this file knows no architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .models.registry import model_class
from .moe import FusedMoE
from .parallel import TPGroup


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
    for path in checkpoint_files(Path(cfg.model_dir)):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
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
