"""Tests for pdserve.engine.tokenizer (checked against transformers)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import jinja2
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from pdserve.engine.tiny_model import build_corpus, ensure_tiny_model
from pdserve.engine.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "",
    " ",
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "emoji 🙂🚀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Ünïcödé çàfé naïve — “quoted” … ∑∞≤π",
    "def f(x):\n    return {'a': x ** 2}  # comment\n",
    "special tokens inline <|eot_id|> and <|begin_of_text|> here",
    "a" * 300,
    "0123456789 3.14159 1e-5 0xDEADBEEF",
]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny_model")


@pytest.fixture(scope="session")
def tok(tiny_dir: Path) -> Tokenizer:
    t = Tokenizer.from_dir(tiny_dir)
    assert t is not None
    return t


@pytest.fixture(scope="session")
def hf_tok(tiny_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


def _write_tokenizer_dir(path: Path, backend: BackendTokenizer, config: dict[str, Any]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def sentencepiece_style_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama-2-like: Metaspace BPE with byte fallback, <s> via TemplateProcessing."""
    backend = BackendTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=1500, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], show_progress=False
    )
    backend.train_from_iterator(build_corpus()[:400], trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    return _write_tokenizer_dir(
        tmp_path_factory.mktemp("sp_style"),
        backend,
        {
            "bos_token": {"content": "<s>", "__type": "AddedToken"},
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
        },
    )


@pytest.fixture(scope="session")
def wordpiece_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BERT-like: lowercasing normalizer, WordPiece, [CLS] ... [SEP]."""
    backend = BackendTokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=2000, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False
    )
    backend.train_from_iterator(build_corpus()[:400], trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return _write_tokenizer_dir(
        tmp_path_factory.mktemp("wordpiece"),
        backend,
        {
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "unk_token": "[UNK]",
            "pad_token": "[PAD]",
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
        },
    )


# --------------------------------------------------------------------- loading


def test_metadata(tok: Tokenizer, hf_tok: Any) -> None:
    assert tok.vocab_size == len(hf_tok) == 8192
    assert tok.bos_token_id == hf_tok.bos_token_id
    eot = hf_tok.convert_tokens_to_ids("<|eot_id|>")
    assert tok.eos_token_ids == frozenset({hf_tok.eos_token_id, eot})
    assert tok.special_token_ids == frozenset(range(8187, 8192))
    assert tok.chat_template == hf_tok.chat_template


def test_from_dir_without_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert Tokenizer.from_dir(tmp_path) is None
    assert Tokenizer.from_dir(tmp_path / "missing") is None


def test_generation_config_eos_int_and_bad(tmp_path: Path, tiny_dir: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d, ignore=shutil.ignore_patterns("model.safetensors"))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 8191}))
    t = Tokenizer.from_dir(d)
    assert t is not None and t.eos_token_ids == frozenset({8188, 8191})
    (d / "generation_config.json").unlink()
    t = Tokenizer.from_dir(d)
    assert t is not None and t.eos_token_ids == frozenset({8188})
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ValueError, match="'x'"):
        Tokenizer.from_dir(d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [99999]}))
    with pytest.raises(ValueError, match="99999"):
        Tokenizer.from_dir(d)


# -------------------------------------------------------------------- encoding


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tok: Tokenizer, hf_tok: Any, add_special_tokens: bool) -> None:
    for text in TEXTS:
        expected = hf_tok(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert tok.encode(text, add_special_tokens=add_special_tokens) == expected, text
    assert tok.encode("hi")[0] == tok.bos_token_id


@pytest.mark.parametrize("fixture_name", ["sentencepiece_style_dir", "wordpiece_dir"])
def test_encode_decode_match_transformers_other_tokenizers(
    fixture_name: str, request: pytest.FixtureRequest
) -> None:
    d = request.getfixturevalue(fixture_name)
    ours = Tokenizer.from_dir(d)
    assert ours is not None
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert ours.vocab_size == len(hf)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)


def test_add_bos_token_honoured_without_post_processor(tmp_path: Path, tiny_dir: Path) -> None:
    backend = BackendTokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    backend.post_processor = None
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    plain = Tokenizer.from_dir(_write_tokenizer_dir(tmp_path / "plain", backend, config))
    bos = Tokenizer.from_dir(_write_tokenizer_dir(tmp_path / "bos", backend, {**config, "add_bos_token": True}))
    both = Tokenizer.from_dir(
        _write_tokenizer_dir(tmp_path / "both", backend, {**config, "add_bos_token": True, "add_eos_token": True})
    )
    assert plain is not None and bos is not None and both is not None
    body = plain.encode("Hello world")
    assert body and body[0] != 8187
    assert bos.encode("Hello world") == [8187, *body]
    assert both.encode("Hello world") == [8187, *body, 8188]
    assert bos.encode("Hello world", add_special_tokens=False) == body


def test_add_bos_flag_ignored_when_post_processor_present(tmp_path: Path, tiny_dir: Path, hf_tok: Any) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d, ignore=shutil.ignore_patterns("model.safetensors"))
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    ours = Tokenizer.from_dir(d)
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert ours is not None
    assert ours.encode("Hello") == hf("Hello")["input_ids"] == hf_tok("Hello")["input_ids"]


def test_encode_rejects_non_str(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="123"):
        tok.encode(123)  # type: ignore[arg-type]


# -------------------------------------------------------------------- decoding


def test_decode_roundtrip_and_matches_transformers(tok: Tokenizer, hf_tok: Any) -> None:
    for text in TEXTS:
        if "<|" in text:
            continue
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>" + text
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def _stream(tok: Tokenizer, prompt: list[int], output: list[int], skip: bool = True) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [detok.append(t) for t in output]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    assert detok.output_token_ids == output
    return deltas, detok.text


def test_incremental_valid_text_never_emits_replacement(tok: Tokenizer) -> None:
    text = "Emoji: 🙂🚀👍🏽 👨‍👩‍👧 — 日本語 and ünïcode!"
    ids = tok.encode(text, add_special_tokens=False)
    # The tokenizer must split at least one emoji across tokens for this test to mean anything.
    assert any(tok.decode([i]) .endswith("\ufffd") for i in ids)
    prompt = tok.encode("Prompt: ")
    deltas, full = _stream(tok, prompt, ids)
    assert full == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[-1] == ""  # nothing was left to flush


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_random_sequences(tok: Tokenizer, skip: bool) -> None:
    rng = random.Random(1234)
    byte_tokens = [i for i in range(tok.vocab_size) if tok.decode([i]) == "\ufffd"]
    assert len(byte_tokens) > 50
    emoji_ids = tok.encode("🙂🚀🎉👍🏽", add_special_tokens=False)
    for _ in range(150):
        out: list[int] = []
        for _ in range(rng.randint(1, 40)):
            r = rng.random()
            if r < 0.3:
                out.append(rng.choice(byte_tokens))
            elif r < 0.4:
                out.extend(emoji_ids)
            elif r < 0.45:
                out.append(rng.randrange(8187, 8192))
            else:
                out.append(rng.randrange(tok.vocab_size))
        prompt = tok.encode("ctx " * rng.randint(0, 3))
        _, full = _stream(tok, prompt, out, skip)
        assert full == tok.decode(out, skip_special_tokens=skip)


def test_incremental_window_stays_small(tok: Tokenizer) -> None:
    """A run of stray bytes (e.g. a degenerate random model) must not grow the window."""
    byte_tokens = [i for i in range(tok.vocab_size) if tok.decode([i]) == "\ufffd"]
    longest = 0
    real_decode = tok.decode

    class Spy(Tokenizer):
        def decode(self, token_ids: Any, skip_special_tokens: bool = True) -> str:
            nonlocal longest
            longest = max(longest, len(token_ids))
            return real_decode(token_ids, skip_special_tokens)

    spy = Spy.__new__(Spy)
    spy.__dict__.update(tok.__dict__)
    out = [byte_tokens[0]] * 500 + tok.encode(" ok 🙂", add_special_tokens=False) + [byte_tokens[1]] * 300
    _, full = _stream(spy, tok.encode("x"), out)
    assert full == tok.decode(out)
    assert longest <= 20


def _byte_token_ids(tok: Tokenizer) -> list[int]:
    """Token id of each single byte value, via the GPT-2 byte-to-unicode table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    ids = [tok.token_to_id(table[b]) for b in range(256)]
    assert all(i is not None for i in ids)
    return ids  # type: ignore[return-value]


@pytest.mark.parametrize("window,keep", [(1, 1), (2, 1), (3, 2), (16, 4)])
def test_incremental_reanchor_byte_streams(
    tok: Tokenizer, monkeypatch: pytest.MonkeyPatch, window: int, keep: int
) -> None:
    """Single-byte tokens mixing valid multi-byte chars and stray bytes, with a
    tiny re-anchor window so splits inside characters are attempted (and must be refused)."""
    import pdserve.engine.tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "_MAX_WINDOW_TOKENS", window)
    monkeypatch.setattr(tokenizer_module, "_REANCHOR_KEEP_TOKENS", keep)
    byte_ids = _byte_token_ids(tok)
    rng = random.Random(7)
    pieces = ["é", "€", "😀", "日", "a", " ", "\n"]
    for _ in range(300):
        data = bytearray()
        for _ in range(rng.randint(1, 30)):
            if rng.random() < 0.35:
                data.append(rng.randrange(0x80, 0x100))
            else:
                data += rng.choice(pieces).encode()
        out = [byte_ids[b] for b in data]
        if rng.random() < 0.3:
            out.insert(rng.randrange(len(out) + 1), 8191)  # a skipped special token
        _, full = _stream(tok, tok.encode("p"), out)
        assert full == tok.decode(out) == data.decode("utf-8", errors="replace").replace("\n", "\n")


def test_incremental_rejects_bad_token(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [])
    for bad in (-1, tok.vocab_size, "5", True):
        with pytest.raises(ValueError):
            detok.append(bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------ stop strings


def test_stop_strings_across_token_boundaries(tok: Tokenizer) -> None:
    text = "The answer is 42.\nObservation: done"
    ids = tok.encode(text, add_special_tokens=False)
    matcher = StopStringMatcher(["Observation:", "\nObs", "zzz"])
    detok = IncrementalDetokenizer(tok, [])
    hit = None
    for token_id in ids:
        delta = detok.append(token_id)
        hit = matcher.check(detok.text, len(delta))
        if hit is not None:
            break
    assert hit == text.index("\nObs")
    assert detok.text[:hit] == "The answer is 42."
    # The stop string is spread over several tokens.
    assert tok.encode("\nObs", add_special_tokens=False) != [ids[0]]


def test_stop_string_earliest_and_tail_only() -> None:
    m = StopStringMatcher(["world", "lo w", "d!"])
    assert m.max_len == 5
    assert m.check("Hello world!", len("Hello world!")) == 3
    assert m.check("Hello world!", 1) == 10  # only "d!" overlaps the last char
    assert m.check("Hello world!", 0) is None
    assert m.check("abc", 3) is None
    # Matches lying entirely in old text are not reported again.
    assert m.check("Hello world and more", 5) is None
    assert StopStringMatcher([]).check("anything", 3) is None


def test_stop_string_validation() -> None:
    for bad in ("stop", [""], [3], None):
        with pytest.raises(ValueError):
            StopStringMatcher(bad)  # type: ignore[arg-type]
    m = StopStringMatcher(["x"])
    with pytest.raises(ValueError, match="-1"):
        m.check("abc", -1)
    with pytest.raises(ValueError, match="4"):
        m.check("abc", 4)


# ------------------------------------------------------------------ chat template

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "  You are terse.  "},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Unicode 🙂 and\nnewlines\n"},
    ],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok: Tokenizer, hf_tok: Any, add_generation_prompt: bool) -> None:
    for messages in CONVERSATIONS:
        expected = hf_tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
        hf_ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        if hasattr(hf_ids, "keys"):
            hf_ids = hf_ids["input_ids"]
        assert tok.encode_chat(messages, add_generation_prompt=add_generation_prompt) == list(hf_ids)
    rendered = tok.apply_chat_template(CONVERSATIONS[0])
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>")
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chat_template_features(tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d, ignore=shutil.ignore_patterns("model.safetensors"))
    template = (
        "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
        "{{ m | tojson }}{% if loop.index > 0 %}{% continue %}{% endif %}{% endfor %}"
        "{% if tools is not none %}TOOLS{% endif %}"
    )
    (d / "chat_template.jinja").write_text(template)
    t = Tokenizer.from_dir(d)
    assert t is not None
    assert t.apply_chat_template([{"role": "user", "content": "<é>"}]) == '{"role": "user", "content": "<é>"}'
    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role"):
        t.apply_chat_template([{"role": "bad", "content": "x"}])
    # Sandboxed: no access to Python internals.
    (d / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    t = Tokenizer.from_dir(d)
    assert t is not None
    with pytest.raises(jinja2.exceptions.SecurityError):
        t.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [],
        ["hello"],
        [{"role": "user"}],
        [{"content": "x"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
        [{"role": 1, "content": "x"}],
        ({"role": "user", "content": "x"},),
    ],
)
def test_chat_template_bad_messages(tok: Tokenizer, messages: Any) -> None:
    with pytest.raises(ValueError):
        tok.apply_chat_template(messages)


def test_chat_template_missing(tmp_path: Path, tiny_dir: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d, ignore=shutil.ignore_patterns("model.safetensors"))
    config = json.loads((d / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    t = Tokenizer.from_dir(d)
    assert t is not None and t.chat_template is None
    with pytest.raises(ValueError, match="chat_template"):
        t.apply_chat_template([{"role": "user", "content": "x"}])
