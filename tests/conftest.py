"""Shared pytest setup.

* Puts tests/ on sys.path so test modules can ``import hf_reference``.
* Sets ``TRITON_INTERPRET=1`` without CUDA, so Triton kernels run on CPU.
* ``hf_model_dir``: session-scoped factory building tiny random HF checkpoints
  (see hf_reference.MODEL_VARIANTS below), each built once per session.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Triton kernels run on CPU through Triton's interpreter. It must be chosen before
# triton is first imported, so here, for every test module. (On a CUDA machine the
# kernels compile for the GPU instead; tests/gpu runs them at real shapes.)
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(_TESTS_DIR))

# name -> make_random_hf_model kwargs.  Keep in sync with the test modules'
# parametrisation; every entry is cheap (~0.1-0.5 s to build).
MODEL_VARIANTS: dict[str, dict] = {
    "llama": dict(arch="llama"),
    # Qwen2 is written in the pre-transformers-5 spelling (top-level rope_theta,
    # rope_scaling: null), like Qwen2.5 checkpoints on the Hub.
    "qwen2": dict(arch="qwen2", config_style="legacy"),
    "qwen3": dict(arch="qwen3"),
    "llama-tied": dict(arch="llama", tied=True, seed=1),
    "llama-rope3": dict(arch="llama", rope_llama3=True, seed=2),
    "llama-rope3-legacy": dict(arch="llama", rope_llama3=True, config_style="legacy", seed=2),
    "llama-sharded": dict(arch="llama", sharded=True, seed=3),
    # Mixture of experts (tests/integration/test_moe_vs_hf.py, test_disagg_engine.py).
    "qwen3_moe": dict(arch="qwen3_moe"),
    "mixtral": dict(arch="mixtral"),
    "qwen2_moe": dict(arch="qwen2_moe", config_style="legacy"),
    # MLA + grouped routing (tests/integration/test_deepseek_vs_hf.py). EOS given: picking one
    # by greedy probing costs ~50 s for these models, and these tests run with ignore_eos.
    "deepseek_v3": dict(arch="deepseek_v3", rope_yarn=True, eos_token_id=2),
    "deepseek_v2": dict(arch="deepseek_v2", rope_yarn=True, config_style="legacy", eos_token_id=2),
}


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """``hf_model_dir(variant) -> Path`` of a checkpoint built once per session."""
    import hf_reference as H

    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("hf_models")

    def get(variant: str) -> Path:
        if variant not in built:
            kw = dict(MODEL_VARIANTS[variant])
            vocab = kw.get("vocab_size", H.DEFAULT_VOCAB_SIZE)
            built[variant] = H.make_random_hf_model(
                root / variant, eos_probe_prompts=H.standard_prompts(vocab), **kw
            )
        return built[variant]

    return get
