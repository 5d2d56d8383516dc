"""Tests for pdserve.engine.tiny_model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

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


def test_deterministic(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = make_tiny_model(tmp_path / "again")
    assert tiny_model_digest(again) == tiny_model_digest(tiny_model_dir)


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


# -- chat template: tools ---------------------------------------------------------------

# The template before tools: without tools and tool messages the new one renders the same bytes.
_PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city, “quoted” é",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
]

TOOL_CONVERSATIONS = [
    [{"role": "user", "content": "Weather in Paris?"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Weather in Paris?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 °C"},
        {"role": "tool", "tool_call_id": "call_2", "content": " rain "},
        {"role": "assistant", "content": "Paris: sunny. Oslo: rain."},
        {"role": "user", "content": "And the time?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"type": "function", "function": {"name": "now", "arguments": {}}}]},
    ],
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Any:
    from pdserve.engine.tokenizer import Tokenizer

    t = Tokenizer.from_dir(tiny_model_dir)
    assert t is not None
    return t


def _ours(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our tokenizer takes string content only: a tool-call turn without text has ""."""
    return [{**m, "content": m["content"] or ""} for m in messages]


def test_template_without_tools_renders_as_before(tok: Any) -> None:
    from pdserve.engine.tokenizer import _compile_chat_template

    plain = _compile_chat_template(_PLAIN_TEMPLATE)
    conversations = [
        [{"role": "user", "content": "Hi there!"}],
        [{"role": "system", "content": "  You are terse.  "}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "developer", "content": "x\n"},
         {"role": "user", "content": "Unicode 🙂 and\nnewlines\n"}],
    ]
    for messages in conversations:
        for add in (True, False):
            expected = plain.render(messages=messages, add_generation_prompt=add, bos_token=BOS_TOKEN)
            assert tok.apply_chat_template(messages, add_generation_prompt=add) == expected
            assert tok.apply_chat_template(messages, add_generation_prompt=add, tools=[]) == expected
            assert tok.apply_chat_template(messages, add_generation_prompt=add, tools=None) == expected


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_with_tools_matches_transformers(tiny_model_dir: Path, tok: Any, add_generation_prompt: bool) -> None:
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    for messages in TOOL_CONVERSATIONS:
        for tools in (TOOLS, None):
            expected = hf_tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
            assert tok.apply_chat_template(_ours(messages), add_generation_prompt, tools=tools) == expected
            hf_ids = hf_tok.apply_chat_template(messages, tools=tools, tokenize=True,
                                                add_generation_prompt=add_generation_prompt)
            if hasattr(hf_ids, "keys"):
                hf_ids = hf_ids["input_ids"]
            assert tok.encode_chat(_ours(messages), add_generation_prompt, tools=tools) == list(hf_ids)


def test_template_tool_layout(tok: Any) -> None:
    rendered = tok.apply_chat_template(_ours(TOOL_CONVERSATIONS[2]), tools=TOOLS)
    system = rendered.split("<|eot_id|>")[0]
    assert system.startswith(f"{BOS_TOKEN}<|start_header_id|>system<|end_header_id|>\n\nBe brief.\n\n# Tools")
    tool_lines = system.split("<tools>\n")[1].split("\n</tools>")[0].split("\n")
    assert [json.loads(line) for line in tool_lines] == TOOLS
    assert rendered.count("<|start_header_id|>system") == 1  # the system message is merged, not repeated
    assert ("<|start_header_id|>tool<|end_header_id|>\n\n<tool_response>\nsunny, 21 °C\n</tool_response><|eot_id|>"
            in rendered)
    assert ("<|start_header_id|>assistant<|end_header_id|>\n\nChecking.\n<tool_call>\n"
            '{"name": "now", "arguments": {}}\n</tool_call><|eot_id|>') in rendered
    # Without a system message the tools turn comes first on its own.
    alone = tok.apply_chat_template(_ours(TOOL_CONVERSATIONS[0]), tools=TOOLS)
    assert alone.startswith(f"{BOS_TOKEN}<|start_header_id|>system<|end_header_id|>\n\n# Tools")


def test_rendered_tool_calls_parse_back(tok: Any) -> None:
    """What the template writes for a tool-call turn is what the hermes parser reads."""
    from pdserve.router.tool_parsers import get_tool_parser
    from pdserve.router.tools import tool_calls_for_template

    openai_calls = [{"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris \\"Île\\""}'}},
                    {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "tool_calls": tool_calls_for_template(openai_calls)}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=False, tools=TOOLS)
    turn = rendered.rsplit("<|start_header_id|>assistant<|end_header_id|>\n\n", 1)[1].removesuffix("<|eot_id|>")
    content, calls = get_tool_parser("hermes").extract(turn)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in openai_calls]


def test_encode_chat_passes_template_kwargs(tmp_path: Path, tiny_model_dir: Path) -> None:
    from pdserve.engine.tokenizer import Tokenizer

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d, ignore=shutil.ignore_patterns("model.safetensors"))
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
        "{% if tools %}{{ tools | length }}{% endif %}")
    t = Tokenizer.from_dir(d)
    assert t is not None
    messages = [{"role": "user", "content": "hi"}]
    assert t.apply_chat_template(messages, enable_thinking=False, tools=TOOLS) == "hi<think></think>2"
    assert t.encode_chat(messages, enable_thinking=False) == t.encode("hi<think></think>", add_special_tokens=False)
    assert t.encode_chat(messages, tools=TOOLS) == t.encode("hi2", add_special_tokens=False)
    assert t.encode_chat(messages) == t.encode("hi", add_special_tokens=False)


def test_ensure_refreshes_a_stale_chat_template(tmp_path: Path, tiny_model_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "old"
    shutil.copytree(tiny_model_dir, d, ignore=shutil.ignore_patterns("model.safetensors"))
    fresh = (tiny_model_dir / "tokenizer_config.json").read_bytes()
    config = json.loads(fresh)
    config["chat_template"] = _PLAIN_TEMPLATE
    tiny_model._write_json(d / "tokenizer_config.json", config)
    monkeypatch.setattr(tiny_model, "make_tiny_model", lambda *a, **k: pytest.fail("must not rebuild"))
    assert ensure_tiny_model(d) == d
    assert (d / "tokenizer_config.json").read_bytes() == fresh
    assert sorted(p.name for p in d.iterdir()) == sorted(EXPECTED_FILES - {"model.safetensors"})
    # Another model at the path is not ours to change.
    other = tmp_path / "other"
    shutil.copytree(d, other)
    model_config = json.loads((other / "config.json").read_text())
    model_config["hidden_size"] = 4096
    (other / "config.json").write_text(json.dumps(model_config))
    tiny_model._write_json(other / "tokenizer_config.json", config)
    ensure_tiny_model(other)
    assert json.loads((other / "tokenizer_config.json").read_text())["chat_template"] == _PLAIN_TEMPLATE
