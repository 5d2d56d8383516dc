"""Reasoning output: splitting a thinking model's text into ``reasoning_content`` and ``content``.

A parser per model family, chosen by name (``REASONING_PARSERS``): ``split`` for a whole
output, ``stream()`` for a streamed one, whose deltas concatenate to the same two texts
whatever the split of the output into deltas (partial tags are held back until known).

The reasoning is the text between the tags without the newlines that chat templates put
around it (Qwen's renders ``<think>\\n`` + reasoning + ``\\n</think>\\n\\n`` + content),
and the content loses the newlines that follow ``</think>``, so a turn sent back through
the template renders as the model wrote it.

- ``qwen3``: a ``<think>...</think>`` block at the start of the output (after whitespace).
  Without ``<think>`` everything is content (Qwen3 with ``enable_thinking`` false renders
  an empty block in the prompt and answers directly).
- ``deepseek_r1``: the chat template already opened ``<think>``, so the output starts
  inside the reasoning (a leading ``<think>`` is dropped): up to ``</think>`` is reasoning,
  and if ``</think>`` never comes, all of it is.

An unfinished block (the output cut before ``</think>``) is reasoning in both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum

THINK_START = "<think>"
THINK_END = "</think>"
_WS = " \t\n\r"


def _held_suffix_len(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that may be the start of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class _Phase(Enum):
    START = "start"  # not yet known whether the output opens a block
    REASONING = "reasoning"
    CONTENT = "content"


class ReasoningStream:
    """One completion's text deltas in, ``(reasoning_delta, content_delta)`` out ("" for none).

    Call ``feed`` per delta, then ``finish`` once.
    """

    def __init__(self, *, starts_in_reasoning: bool) -> None:
        self._starts_in_reasoning = starts_in_reasoning
        self._phase = _Phase.START
        self._buf = ""
        self._reasoning_begun = False  # leading newlines of the reasoning are dropped until then
        self._content_begun = True  # after </think>, leading newlines of the content are dropped

    def feed(self, delta: str) -> tuple[str, str]:
        self._buf += delta
        return self._advance(final=False)

    def finish(self) -> tuple[str, str]:
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, str]:
        reasoning = content = ""
        if self._phase is _Phase.START:
            body = self._buf.lstrip(_WS)
            if body.startswith(THINK_START):
                self._buf = body[len(THINK_START):]
                self._phase = _Phase.REASONING
            elif not final and THINK_START.startswith(body):
                return "", ""
            else:
                self._phase = _Phase.REASONING if self._starts_in_reasoning else _Phase.CONTENT
        if self._phase is _Phase.REASONING:
            j = self._buf.find(THINK_END)
            if j >= 0:
                reasoning = self._reasoning(self._buf[:j].rstrip("\n"))
                self._buf = self._buf[j + len(THINK_END):]
                self._phase = _Phase.CONTENT
                self._content_begun = False
            else:
                keep = 0 if final else _held_suffix_len(self._buf, THINK_END)
                # Trailing newlines wait too: they are dropped if </think> follows them.
                safe = self._buf[:len(self._buf) - keep].rstrip("\n")
                reasoning = self._reasoning(safe)
                self._buf = "" if final else self._buf[len(safe):]
        if self._phase is _Phase.CONTENT:
            content, self._buf = self._buf, ""
            if not self._content_begun:
                content = content.lstrip("\n")
                self._content_begun = bool(content)
        return reasoning, content

    def _reasoning(self, text: str) -> str:
        if not self._reasoning_begun:
            text = text.lstrip("\n")
            self._reasoning_begun = bool(text)
        return text


class ReasoningParser(ABC):
    name: str
    grammar_mode: str
    """Where a structured output's grammar lets this family think first
    (``StructuredOutput.reasoning``): "optional" or "open"."""

    @abstractmethod
    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole output; None for an empty part."""

    @abstractmethod
    def stream(self) -> ReasoningStream:
        """A fresh streaming splitter for one completion."""


def _split_block(body: str) -> tuple[str | None, str | None]:
    """``body`` starts inside the reasoning."""
    reasoning, found, content = body.partition(THINK_END)
    reasoning = reasoning.strip("\n")
    content = content.lstrip("\n") if found else ""
    return reasoning or None, content or None


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    grammar_mode = "optional"

    def split(self, text: str) -> tuple[str | None, str | None]:
        body = text.lstrip(_WS)
        if not body.startswith(THINK_START):
            return None, text or None
        return _split_block(body[len(THINK_START):])

    def stream(self) -> ReasoningStream:
        return ReasoningStream(starts_in_reasoning=False)


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    grammar_mode = "open"

    def split(self, text: str) -> tuple[str | None, str | None]:
        body = text.lstrip(_WS)
        return _split_block(body[len(THINK_START):] if body.startswith(THINK_START) else text)

    def stream(self) -> ReasoningStream:
        return ReasoningStream(starts_in_reasoning=True)


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    p.name: p for p in (Qwen3ReasoningParser, DeepSeekR1ReasoningParser)
}


def get_reasoning_parser(name: str) -> ReasoningParser:
    """The parser registered as ``name``; ValueError listing the known ones otherwise."""
    cls = REASONING_PARSERS.get(name)
    if cls is None:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {sorted(REASONING_PARSERS)}")
    return cls()
