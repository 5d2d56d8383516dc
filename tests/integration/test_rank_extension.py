"""Rank extensions: every TP rank answers call_extension, errors surface on rank 0."""

import dataclasses

import pytest

from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig
from pdserve.engine.executor import make_executor

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("tp", [1, 2])
def test_call_extension_reaches_every_rank(hf_model_dir, tp):
    cfg = EngineConfig(
        model=ModelConfig.from_dir(hf_model_dir("llama")), cache=CacheConfig(num_blocks=8),
        parallel=ParallelConfig(tp), rank_extension="rank_ext_probe:make", rank_extension_config=b"cfg",
    )
    executor = make_executor(cfg, 8)
    try:
        heads = cfg.model.num_kv_heads // tp
        assert executor.call_extension(b"hello") == [f"{r}/{tp} cfg hello heads={heads}".encode() for r in range(tp)]
        with pytest.raises(RuntimeError, match=f"rank {tp - 1}: ValueError: boom on rank {tp - 1}"):
            executor.call_extension(b"boom")
        assert executor.call_extension(b"") == [f"{r}/{tp} cfg  heads={heads}".encode() for r in range(tp)]  # still in sync
    finally:
        executor.shutdown()


def test_no_extension_configured(hf_model_dir):
    cfg = EngineConfig(model=ModelConfig.from_dir(hf_model_dir("llama")), cache=CacheConfig(num_blocks=4))
    executor = make_executor(dataclasses.replace(cfg), 4)
    with pytest.raises(RuntimeError, match="no rank extension"):
        executor.call_extension(b"x")
    executor.shutdown()
