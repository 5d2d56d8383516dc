"""Tokenization, chat templating, streaming detokenization and stop strings.

Built directly on the ``tokenizers`` library (no ``transformers`` at runtime).
``Tokenizer.encode`` matches ``AutoTokenizer.from_pretrained(dir)(text)``
for tokenizers whose ``tokenizer.json`` is used as-is (``PreTrainedTokenizerFast``
/ ``TokenizersBackend`` style directories, e.g. Llama 3, Qwen, Mistral).
"""

from __future__ import annotations

import functools

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _BackendTokenizer
from tokenizers import processors

_REPLACEMENT_CHAR = "\ufffd"
# An incomplete UTF-8 character is at most 3 bytes, which decoders render as at
# most 3 replacement characters; more than that at the tail is final garbage.
_MAX_HELD_REPLACEMENTS = 3
# Number of prompt tokens decoded as left context for the first output tokens.
_PROMPT_CONTEXT_TOKENS = 4
# Window length (tokens) above which the detokenizer tries to re-anchor while
# output keeps ending in replacement characters (e.g. a stream of stray bytes).
_MAX_WINDOW_TOKENS = 16
_REANCHOR_KEEP_TOKENS = 4


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any, field: str) -> str | None:
    """A special-token entry of tokenizer_config: a string, an AddedToken dict or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"tokenizer_config {field} must be a string or token object, got {value!r}")


def _id_list(value: Any, field: str) -> list[int]:
    """An ``eos_token_id`` style entry: null, an int or a list of ints."""
    if value is None:
        return []
    if isinstance(value, bool):
        raise ValueError(f"{field} must be an int or a list of ints, got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise ValueError(f"{field} must be an int or a list of ints, got {value!r}")


def _select_chat_template(model_dir: Path, config: Mapping[str, Any]) -> str | None:
    """The default chat template: ``chat_template.jinja`` wins over the config entry."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):  # legacy [{"name": ..., "template": ...}, ...]
        named = {
            t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)
        }
        default = named.get("default")
        if isinstance(default, str):
            return default
    raise ValueError(f"unsupported chat_template in tokenizer_config: {template!r}")


def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template the way Hugging Face does (sandboxed, trimmed)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        # Unlike jinja's built-in filter, no HTML escaping.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def _validate_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of dicts, got {messages!r}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {message!r}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(f"messages[{i}][{key!r}] must be a str, got {message.get(key)!r}")
        # Like HF: optional keys set to None (e.g. tool_calls=None) count as absent.
        out.append({k: v for k, v in message.items() if v is not None})
    return out


class Tokenizer:
    """A model's tokenizer: ``tokenizer.json`` plus the special-token metadata.

    Build with ``Tokenizer.from_dir``. Post-processing follows
    ``tokenizer.json``; only when it has no post-processor at all are the
    ``add_bos_token`` / ``add_eos_token`` flags of ``tokenizer_config.json``
    applied (Llama-2 style). Note: transformers 5.x ignores those flags whenever
    a tokenizer.json exists, so for that (rare) layout we add the BOS it omits.
    """

    def __init__(
        self,
        backend: _BackendTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        template_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self._backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id: int | None = self._known_id(bos_token, "bos_token")
        eos_id = self._known_id(eos_token, "eos_token")
        eos_ids = set(extra_eos_token_ids)
        if eos_id is not None:
            eos_ids.add(eos_id)
        vocab_size = self.vocab_size
        for token_id in eos_ids:
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"eos token id {token_id} outside vocabulary of size {vocab_size}")
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        added = backend.get_added_tokens_decoder()
        special = {token_id for token_id, tok in added.items() if tok.special}
        special.update(eos_ids)
        if self.bos_token_id is not None:
            special.add(self.bos_token_id)
        self.special_token_ids: frozenset[int] = frozenset(special)
        self.chat_template = chat_template
        self._template_tokens = dict(template_tokens or {})
        self._compiled_template: jinja2.Template | None = None

    def _known_id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{field} {token!r} is not in the vocabulary")
        return token_id

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer | None:
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json``, ``generation_config.json``).

        Returns None when ``model_dir/tokenizer.json`` does not exist.
        """
        directory = Path(model_dir)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            return None
        backend = _BackendTokenizer.from_file(str(tokenizer_file))
        config = _read_json(directory / "tokenizer_config.json")
        generation = _read_json(directory / "generation_config.json")

        tokens = {
            field: _token_content(config.get(field), field)
            for field in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        bos_token, eos_token = tokens["bos_token"], tokens["eos_token"]
        if backend.post_processor is None:
            add_bos = bool(config.get("add_bos_token", False)) and bos_token is not None
            add_eos = bool(config.get("add_eos_token", False)) and eos_token is not None
            if add_bos or add_eos:
                backend.post_processor = _bos_eos_processor(backend, bos_token, eos_token, add_bos, add_eos)

        return cls(
            backend,
            bos_token=bos_token,
            eos_token=eos_token,
            extra_eos_token_ids=_id_list(generation.get("eos_token_id"), "generation_config eos_token_id"),
            chat_template=_select_chat_template(directory, config),
            template_tokens={k: v for k, v in tokens.items() if v is not None},
        )

    @functools.cached_property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included. NOTE: cached: the backend recounts its
        added tokens on every call (milliseconds with Llama 3's 256 reserved ones, per token
        in the detokenizer)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def to_json(self) -> str:
        """The backend tokenizer as ``tokenizer.json`` text (what grammar engines load)."""
        return self._backend.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens (e.g. BOS) come from the post-processor."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}: {text!r}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def added_token_ids(self) -> frozenset[int]:
        """Ids of the added tokens (special or not): the ones ``spaces_between_special_tokens``
        separates from the text around them."""
        return frozenset(self._backend.get_added_tokens_decoder())

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        """The vocabulary's own strings of ``token_ids`` (byte-level ``"Ġhello"``, not text)."""
        return [self._backend.id_to_token(t) or "" for t in token_ids]

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render ``messages`` with the model's chat template (as HF ``tokenize=False``).

        ``tools``: function definitions in OpenAI's shape (``{"type": "function",
        "function": {...}}``), as HF's ``tools=``; ``template_kwargs`` become template
        variables too (a request's ``chat_template_kwargs``, e.g. ``enable_thinking``).
        The rendered text usually already contains BOS, so encode it with
        ``add_special_tokens=False`` (or use ``encode_chat``).
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template")
        validated = _validate_messages(messages)
        if self._compiled_template is None:
            self._compiled_template = _compile_chat_template(self.chat_template)
        context: dict[str, Any] = {"tools": None, "documents": None}
        context.update(self._template_tokens)
        context.update(template_kwargs)
        context["tools"] = None if tools is None else list(tools)
        context["messages"] = validated
        context["add_generation_prompt"] = bool(add_generation_prompt)
        return self._compiled_template.render(**context)

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """Token ids of the rendered chat (no extra BOS; as HF ``apply_chat_template(tokenize=True)``);
        ``tools`` and ``template_kwargs`` as in ``apply_chat_template``."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools=tools, **template_kwargs)
        return self.encode(text, add_special_tokens=False)


def _bos_eos_processor(
    backend: _BackendTokenizer,
    bos: str | None,
    eos: str | None,
    add_bos: bool,
    add_eos: bool,
) -> processors.TemplateProcessing:
    """``[bos] $A [eos]`` template, the HF ``update_post_processor`` layout."""
    specials: list[tuple[str, int]] = []
    prefix = suffix = ""
    if add_bos and bos is not None:
        prefix = f"{bos}:0 "
        bos_id = backend.token_to_id(bos)
        if bos_id is None:
            raise ValueError(f"bos_token {bos!r} is not in the vocabulary")
        specials.append((bos, bos_id))
    if add_eos and eos is not None:
        suffix = f" {eos}:0"
        eos_id = backend.token_to_id(eos)
        if eos_id is None:
            raise ValueError(f"eos_token {eos!r} is not in the vocabulary")
        specials.append((eos, eos_id))
    single = f"{prefix}$A:0{suffix}"
    pair = f"{single} {prefix.replace(':0', ':1')}$B:1{suffix.replace(':0', ':1')}"
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _trailing_replacements(text: str) -> int:
    n = 0
    for ch in reversed(text):
        if ch != _REPLACEMENT_CHAR:
            break
        n += 1
    return n


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text deltas.

    Each ``append`` decodes only a short window of recent token ids. Text is
    held back while the window's decode ends in U+FFFD (a UTF-8 character split
    across byte-level tokens), at most 3 such characters. After ``flush()``
    the concatenated deltas (``text``) equal ``tokenizer.decode(output_ids)`` for
    byte-level decoders; the last few prompt tokens are used as left context,
    so decoders that strip a leading space (SentencePiece) keep it.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids)
        self._num_prompt = len(self._ids)
        # Window start, end of the last cleanly decoded chunk, and how many
        # characters of decode(ids[start:]) were already emitted.
        self._start = max(0, self._num_prompt - _PROMPT_CONTEXT_TOKENS)
        self._clean_end = self._num_prompt
        context = self._decode(self._start, self._num_prompt)
        if context.endswith(_REPLACEMENT_CHAR):
            # Prompt ends mid-character: decode the output on its own.
            self._start = self._num_prompt
            context = ""
        self._emitted = len(context)
        self._text_parts: list[str] = []

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._text_parts) > 1:
            self._text_parts = ["".join(self._text_parts)]
        return self._text_parts[0] if self._text_parts else ""

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_prompt :]

    def append(self, token_id: int) -> str:
        """Add one generated token id; return the newly decodable text (may be "")."""
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < self._tokenizer.vocab_size:
            raise ValueError(f"invalid token id {token_id!r}")
        self._ids.append(token_id)
        full = self._decode(self._start)
        held = min(_trailing_replacements(full), _MAX_HELD_REPLACEMENTS)
        delta = self._advance(full, len(full) - held)
        if held == 0:
            # Clean boundary: keep the chunk just decoded as the next context.
            self._start, self._clean_end = self._clean_end, len(self._ids)
            self._emitted = len(self._decode(self._start))
        elif len(self._ids) - self._start > _MAX_WINDOW_TOKENS:
            self._reanchor(full)
        return delta

    def decode_all(self, output_token_ids: Sequence[int]) -> str:
        """The whole text of ``output_token_ids`` in one decode call, as the deltas of
        appending them one by one and flushing would concatenate to (for a detokenizer
        that has not been appended to)."""
        full = self._tokenizer.decode(self._ids[self._start :] + list(output_token_ids),
                                      skip_special_tokens=self._skip_special)
        return full[self._emitted :]

    def flush(self) -> str:
        """Emit any held-back text (call once the sequence is finished)."""
        full = self._decode(self._start)
        return self._advance(full, len(full))

    def _advance(self, full: str, stable: int) -> str:
        if stable <= self._emitted:
            return ""
        delta = full[self._emitted : stable]
        self._emitted = stable
        self._text_parts.append(delta)
        return delta

    def _reanchor(self, full: str) -> None:
        """Move the window start forward to a split point that decodes consistently.

        A split is safe when decode(left) + decode(right) == decode(both) and the
        right side is non-empty: with UTF-8 lossy decoding the left side can
        then no longer change.
        """
        split = len(self._ids) - _REANCHOR_KEEP_TOKENS
        left = self._decode(self._start, split)
        right = self._decode(split)
        if not right or left + right != full or len(left) > self._emitted:
            return
        self._emitted -= len(left)
        self._start = split
        self._clean_end = max(self._clean_end, split)


class StopStringMatcher:
    """Finds stop strings in accumulated output text.

    ``check`` only searches the tail that can contain a match overlapping the
    newly added characters, so it is cheap per token. Truncate the output at
    the returned index (the stop string is not part of the output).
    """

    def __init__(self, stop: Sequence[str]) -> None:
        if isinstance(stop, str) or not isinstance(stop, Sequence):
            raise ValueError(f"stop must be a list of strings, got {stop!r}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self.stop: tuple[str, ...] = tuple(dict.fromkeys(stop))
        self.max_len: int = max((len(s) for s in self.stop), default=0)

    def check(self, text: str, num_new_chars: int) -> int | None:
        """Index in ``text`` where the earliest stop string overlapping the last
        ``num_new_chars`` characters begins, or None."""
        if isinstance(num_new_chars, bool) or not isinstance(num_new_chars, int) or not 0 <= num_new_chars <= len(text):
            raise ValueError(f"num_new_chars must be in [0, {len(text)}], got {num_new_chars!r}")
        if num_new_chars == 0 or not self.stop:
            return None
        new_start = len(text) - num_new_chars
        best: int | None = None
        for s in self.stop:
            idx = text.find(s, max(0, new_start - len(s) + 1))
            if idx != -1 and (best is None or idx < best):
                best = idx
        return best
