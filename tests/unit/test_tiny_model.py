"""Tests for pdserve.engine.tiny_model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pdserve.engine import tiny_model
from pdserve.engine.tiny_model import (
    BOS_TOKEN,
    EOS_TOKEN,
    EOT_TOKEN,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    ensure_tiny_model,
    make_tiny_model,
    tiny_model_digest,
)

EXPECTED_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny_model")


def test_files_and_config(tiny_model_dir: Path) -> None:
    assert {p.name for p in tiny_model_dir.iterdir()} == EXPECTED_FILES
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["vocab_size"] == VOCAB_SIZE
    assert config["hidden_size"] == 512
    assert config["num_hidden_layers"] == 8
    assert config["num_key_value_heads"] == 4
    assert config["tie_word_embeddings"] is False
    tok = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    vocab_ids = set(tok["model"]["vocab"].values()) | {t["id"] for t in tok["added_tokens"]}
    assert vocab_ids == set(range(VOCAB_SIZE))
    special_ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert set(special_ids) == set(SPECIAL_TOKENS)
    assert config["bos_token_id"] == special_ids[BOS_TOKEN]
    assert config["eos_token_id"] == special_ids[EOS_TOKEN]
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [special_ids[EOS_TOKEN], special_ids[EOT_TOKEN]]


def test_weights(tiny_model_dir: Path) -> None:
    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").shape == (256, 512)
        assert f.get_tensor("model.layers.7.mlp.down_proj.weight").shape == (512, 1408)
        assert f.get_tensor("lm_head.weight").dtype == torch.float32
        assert torch.equal(f.get_tensor("model.norm.weight"), torch.ones(512))
        total = sum(_numel(f.get_slice(n).get_shape()) for n in names)
    assert len(names) == 2 + 1 + 8 * 9
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert 25_000_000 < total < 40_000_000


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_deterministic_and_fast(tmp_path: Path, tiny_model_dir: Path) -> None:
    start = time.perf_counter()
    again = make_tiny_model(tmp_path / "again")
    elapsed = time.perf_counter() - start
    assert tiny_model_digest(again) == tiny_model_digest(tiny_model_dir)
    assert elapsed < 30


def test_seed_changes_weights_only(tmp_path: Path, tiny_model_dir: Path) -> None:
    other = tiny_model_digest(make_tiny_model(tmp_path / "s1", seed=1))
    base = tiny_model_digest(tiny_model_dir)
    assert other["model.safetensors"] != base["model.safetensors"]
    assert other["tokenizer.json"] == base["tokenizer.json"]


def test_bad_seed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seed"):
        make_tiny_model(tmp_path / "x", seed="0")  # type: ignore[arg-type]


def test_ensure_is_idempotent(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tiny_model_dir
    mtime = (target / "model.safetensors").stat().st_mtime_ns

    def boom(*args: object, **kwargs: object) -> Path:
        raise AssertionError("must not rebuild")

    monkeypatch.setattr(tiny_model, "make_tiny_model", boom)
    assert ensure_tiny_model(target) == target
    assert (target / "model.safetensors").stat().st_mtime_ns == mtime


def test_ensure_interrupted_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tiny_model.make_tiny_model

    def interrupted(out_dir: Path, *, seed: int = 0) -> Path:
        real(out_dir, seed=seed)
        (Path(out_dir) / "model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_model, "make_tiny_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_tiny_model(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_ensure_into_empty_dir_and_refuses_non_empty(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    ensure_tiny_model(empty)
    assert (empty / "config.json").is_file()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "other.txt").write_text("x")
    with pytest.raises(ValueError, match="junk"):
        ensure_tiny_model(junk)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_transformers_loads_and_runs(tiny_model_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, output_loading_info=True
    )
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 31_990_272
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tok) == VOCAB_SIZE
    ids = torch.tensor([tok("The json module encodes data.")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], VOCAB_SIZE)
    assert torch.isfinite(logits).all()
