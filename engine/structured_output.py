"""Structured outputs: a grammar the output must match, applied as a token mask per step.

Built on llguidance (Rust, behind an abi3 wheel with no Python dependencies). Why it and
not xgrammar, the other maintained engine vLLM and SGLang use:

- it compiles lazily, so a new schema costs well under a millisecond before its first
  mask (xgrammar compiles the whole grammar against the vocabulary up front);
- every compile and every mask step runs under explicit fuel limits
  (``LLParserLimits``): a hostile schema or regex ends in an error, not in a worker
  stalled for seconds; this plane trusts no client;
- it validates a grammar without a tokenizer and without torch, so the gateway refuses a
  broken schema with a 400 before routing, and stays torch-free (xgrammar imports torch
  and transformers on import, ~3 s);
- its masks are xgrammar's layout (int32 words, bit ``j`` of word ``i`` = token
  ``32 i + j``), which ``logits_processors.apply_token_bitmask`` applies, and a batch of
  masks is filled by its thread pool with the GIL released.

What a kind means (``sampling_params.StructuredOutput``): "json" a JSON schema,
"json_object" any JSON object, "regex", "choice" one of a JSON list of strings,
"grammar" Lark or GBNF/EBNF (llama.cpp's and vLLM's ``guided_grammar`` syntax). JSON is
generated compact (no whitespace between tokens), so a schema with bounded strings and
arrays has a bounded output; ``max_tokens`` still cuts it, with finish_reason "length".

Who owns what: a :class:`Grammars` per tokenizer caches each spec's compiled grammar
(a matcher with no tokens consumed) by the whole ``StructuredOutput``; each completion gets its own
:class:`GrammarConstraint`, a copy of that matcher, which the engine advances on every
output token it appends (its own, or the first token a prefill worker sampled under the
same grammar: the hop needs to carry nothing else) and closes when the completion ends.
Nothing here imports torch.
"""

from __future__ import annotations

import json
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import llguidance as llg

from .sampling_params import StructuredOutput

if TYPE_CHECKING:
    import torch

MAX_CHOICES = 1024
CACHE_SIZE = 256
"""Compiled grammars kept per tokenizer (least recently used beyond)."""

_JSON_OPTIONS = {"whitespace_flexible": False}
"""Compact JSON: ``{"a":1}``, never ``{ "a" : 1 }``: bounded output, fewer tokens."""


def _limits() -> llg.LLParserLimits:
    # llguidance's defaults bound a mask step to ~15 ms and a grammar's lexer to ~20 ms
    # of work; verbose errors would echo parser internals into logs.
    return llg.LLParserLimits(verbose_errors=False)


class TokenConstraint(ABC):
    """A per-request constraint on the next token (a grammar matcher), as a bitmask.

    The engine calls ``catch_up`` with the output tokens after every append; the logits
    stage calls it again before each mask (a no-op then) and fills the masks of a batch
    with ``fill_bitmasks``.
    """

    num_accepted: int = 0
    """Output tokens accepted so far."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor) -> None:
        """Write the allowed next tokens into ``bitmask``: int32 [ceil(vocab / 32)] on the
        CPU, contiguous, bit ``j`` of word ``i`` set = token ``32 * i + j`` allowed
        (xgrammar's layout). It arrives all zeros."""

    @abstractmethod
    def accept_token(self, token_id: int) -> None:
        """Advance past ``token_id``; ValueError if the constraint does not allow it."""

    @property
    def is_terminated(self) -> bool:
        """Nothing more may follow (the grammar accepted an end token)."""
        return False

    def close(self) -> None:
        """Release what the constraint holds (called once its completion ended)."""

    def catch_up(self, output_token_ids: Sequence[int]) -> None:
        """Accept the output tokens not accepted yet, in order."""
        for token_id in output_token_ids[self.num_accepted :]:
            self.accept_token(token_id)
            self.num_accepted += 1

    @classmethod
    def fill_bitmasks(cls, items: Sequence[tuple[TokenConstraint, int]], bitmask: torch.Tensor) -> None:
        """Fill row ``r`` of ``bitmask`` [R, words] for each ``(constraint, r)`` (one class)."""
        for constraint, row in items:
            constraint.fill_bitmask(bitmask[row])


THINK_START, THINK_END = "<think>", "</think>"

# The thinking block before a reasoning model's constrained answer: free text up to the
# closing tag (llguidance's stop attribute: no lookahead regex needed), then the
# newlines chat templates put after it (what router/reasoning.py strips), then the
# answer's own grammar (@body).
_REASONING_LARK = {
    "optional": 'start: think? @body\nthink: "{start}" thought "{end}" SEP\n',
    "open": 'start: "{start}"? thought "{end}" SEP @body\n',
}
_THOUGHT_LARK = 'thought[stop="{end}"]: /(.|\\n)*/\nSEP: /\\n*/\n'


def grammar_text(so: StructuredOutput) -> str:
    """The llguidance grammar of ``so``; ValueError naming what is wrong with the spec."""
    body = _body_text(so)
    if not so.reasoning:
        return body
    grammars = json.loads(body)["grammars"]
    grammars[0] = {**grammars[0], "name": "body"}
    lark = (_REASONING_LARK[so.reasoning] + _THOUGHT_LARK).format(start=THINK_START, end=THINK_END)
    return json.dumps({"grammars": [{"lark_grammar": lark}, *grammars]})


def _body_text(so: StructuredOutput) -> str:
    kind, spec = so.kind, so.spec
    if kind == "json":
        try:
            schema = json.loads(spec)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"a JSON schema must be an object or a boolean, got {type(schema).__name__}")
        return llg.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    if kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_OPTIONS)
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        try:
            choices = json.loads(spec)
        except ValueError as e:
            raise ValueError(f"choices must be a JSON list of strings: {e}") from None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError("choices must be a non-empty list of non-empty strings")
        if len(choices) > MAX_CHOICES:
            raise ValueError(f"at most {MAX_CHOICES} choices, got {len(choices)}")
        # Lark string literals take JSON's escapes.
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                     for c in choices))
    if kind == "grammar":
        try:
            return llg.grammar_from("grammar", spec)  # Lark as is; GBNF/EBNF converted
        except Exception as e:  # noqa: BLE001 - the converter raises what it meets
            raise ValueError(f"the grammar is not valid Lark or GBNF: {e}") from None
    raise ValueError(f"unknown structured output kind {kind!r}")


def check(so: StructuredOutput) -> None:
    """Validate ``so`` without a tokenizer (the gateway's check); ValueError if invalid."""
    error = llg.LLMatcher.validate_grammar(grammar_text(so), None, limits=_limits())
    if error:
        raise ValueError(_describe(so, error))


def _describe(so: StructuredOutput, error: str) -> str:
    what = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
            "choice": "choice list", "grammar": "grammar"}[so.kind]
    return f"invalid {what}: {error.strip()}"


class Grammars:
    """Compiled grammars for one tokenizer, and the constraints made from them."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        """``vocab_size``: the model's logits width (masks cover it; tokens past the
        tokenizer's vocabulary are never allowed). ``eos_token_ids``: what ends a match."""
        eos = sorted(eos_token_ids)
        if not eos:
            raise ValueError("structured outputs need at least one EOS token id")
        self.vocab_size = vocab_size
        self.tokenizer = llg.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)
        self._cache: OrderedDict[StructuredOutput, llg.LLMatcher | str] = OrderedDict()
        self._lock = threading.Lock()
        self.num_open = 0
        """Constraints made and not closed yet (tests check this drops back to 0)."""

    def _compiled(self, so: StructuredOutput) -> llg.LLMatcher:
        key = so  # frozen: kind, spec and reasoning
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        if hit is None:
            try:
                matcher = llg.LLMatcher(self.tokenizer, grammar_text(so), limits=_limits())
                hit = _describe(so, matcher.get_error()) if matcher.is_error() else matcher
            except ValueError as e:
                hit = str(e)
            with self._lock:  # a bad spec is cached too: refusing it again costs nothing
                self._cache[key] = hit
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        if isinstance(hit, str):
            raise ValueError(hit)
        return hit

    def check(self, so: StructuredOutput) -> None:
        """ValueError if ``so`` does not compile against this tokenizer."""
        self._compiled(so)

    def constraint(self, so: StructuredOutput) -> GrammarConstraint:
        """A fresh matcher for one completion (ValueError if ``so`` is invalid)."""
        return GrammarConstraint(self, self._compiled(so).deep_copy())


class GrammarConstraint(TokenConstraint):
    """One completion's grammar matcher."""

    _executor: llg.LLExecutor | None = None

    def __init__(self, grammars: Grammars, matcher: llg.LLMatcher) -> None:
        self.grammars = grammars
        self.matcher: llg.LLMatcher | None = matcher
        self.num_accepted = 0
        grammars.num_open += 1

    def fill_bitmask(self, bitmask: torch.Tensor) -> None:
        self.matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * bitmask.element_size())

    @classmethod
    def fill_bitmasks(cls, items: Sequence[tuple[TokenConstraint, int]], bitmask: torch.Tensor) -> None:
        if len(items) == 1:
            constraint, row = items[0]
            constraint.fill_bitmask(bitmask[row])
            return
        if cls._executor is None:
            cls._executor = llg.LLExecutor()
        row_bytes = bitmask.shape[1] * bitmask.element_size()
        cls._executor.unsafe_compute_mask_ptr([(c.matcher, row) for c, row in items], bitmask.data_ptr(),
                                              row_bytes, bitmask.shape[0])

    def accept_token(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            raise ValueError(f"token {token_id} does not match the grammar: {self.matcher.get_error()}")

    @property
    def is_terminated(self) -> bool:
        return self.matcher is not None and self.matcher.is_stopped()

    def close(self) -> None:
        if self.matcher is not None:
            self.matcher = None
            self.grammars.num_open -= 1


__all__ = ["Grammars", "GrammarConstraint", "TokenConstraint", "check", "grammar_text"]
