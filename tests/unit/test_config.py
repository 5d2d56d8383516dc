"""ModelConfig reads what the runtime needs from Hugging Face config files."""

import json

import pytest

from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig, parse_dtype

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def write(tmp_path, cfg, generation=None):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_llama_defaults(tmp_path):
    m = ModelConfig.from_dir(write(tmp_path, LLAMA))
    assert (m.head_dim, m.num_kv_heads, m.rope_scaling, m.attention_bias, m.qk_norm) == (16, 2, None, False, False)
    assert m.rope_theta == 10000.0


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM.*LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        ModelConfig.from_dir(write(tmp_path, {**LLAMA, "architectures": ["GPTNeoXForCausalLM"]}))


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        ModelConfig.from_dir(tmp_path)


def test_qwen_flags(tmp_path):
    assert ModelConfig.from_dir(write(tmp_path, {**LLAMA, "architectures": ["Qwen2ForCausalLM"]})).attention_bias
    assert ModelConfig.from_dir(write(tmp_path, {**LLAMA, "architectures": ["Qwen3ForCausalLM"], "head_dim": 32})).qk_norm


@pytest.mark.parametrize(
    "spelling",
    [
        {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    ],
    ids=["transformers4", "transformers5"],
)
def test_llama3_rope_both_spellings(tmp_path, spelling):
    m = ModelConfig.from_dir(write(tmp_path, {**LLAMA, **spelling}))
    assert m.rope_theta == 5e5
    assert m.rope_scaling.factor == 8.0 and m.rope_scaling.original_max_position_embeddings == 64


def test_unsupported_rope_type(tmp_path):
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_dir(write(tmp_path, {**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))


def test_eos_ids_merge_config_and_generation_config(tmp_path):
    m = ModelConfig.from_dir(write(tmp_path, {**LLAMA, "eos_token_id": 2}, {"eos_token_id": [2, 7]}))
    assert m.eos_token_ids == (2, 7)


def test_sliding_window_caps_the_context(tmp_path):
    m = ModelConfig.from_dir(write(tmp_path, {**LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": 128}))
    assert m.max_position_embeddings == 128
    off = ModelConfig.from_dir(write(tmp_path, {**LLAMA, "sliding_window": 128, "use_sliding_window": False}))
    assert off.max_position_embeddings == 256


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: CacheConfig(block_size=12), "12"),
        (lambda: CacheConfig(num_blocks=0), "0"),
        (lambda: SchedulerConfig(max_num_batched_tokens=0), "0"),
        (lambda: SchedulerConfig(prefill_chunk_size=-3), "-3"),
        (lambda: ParallelConfig(tensor_parallel_size=0), "0"),
        (lambda: parse_dtype("int8"), "int8"),
    ],
)
def test_bad_engine_settings_name_the_value(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_tp_must_divide_heads(tmp_path):
    m = ModelConfig.from_dir(write(tmp_path, LLAMA))
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        EngineConfig(model=m, parallel=ParallelConfig(3))
