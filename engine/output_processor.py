"""Per-completion output text: incremental detokenization and stop strings, bounded per token.

A :class:`CompletionText` turns a completion's token ids into its text:

- **Streamed** (online, or any request with stop strings): each token is detokenized
  incrementally (``IncrementalDetokenizer``: a short window, O(new tokens)); the text is
  kept as committed parts plus a pending tail of at most ``len(longest stop) - 1``
  characters. A stop string can only begin in that tail or in the new text, so each token
  searches ``tail + new`` (bounded by the stop strings, not by the output), and only
  committed text is ever streamed: a stop string is never sent and then retracted.
  With ``include_stop_str_in_output`` nothing is held back (the stop string is part of
  the text anyway); the tail is then kept for searching only.
- **Not streamed** (offline ``LLM.generate`` without stop strings): nothing happens per
  token; the text is decoded once, in one call, when the completion finishes.

Either way the final text equals the incremental decode of the output tokens, cut
before the first stop string (after it, with ``include_stop_str_in_output``). As in
vLLM, the text of a token that ends the completion (EOS, ``stop_token_ids``) is left
out unless ``include_stop_str_in_output``. With ``skip_special_tokens`` false and
``spaces_between_special_tokens`` true, added tokens are separated from the text
around them by one space, as Hugging Face's slow tokenizers decode
(:class:`SpacedDetokenizer`); with it false they are glued to it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from .tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer


class SpacedDetokenizer:
    """``IncrementalDetokenizer`` (same ``append``/``flush``/``decode_all``) that joins
    the parts of the output with single spaces: each added token is a part, and so is
    each run of text between them (decoded on its own; empty runs are no part).

    The first run keeps the prompt as its left context, as the plain detokenizer does;
    a run after an added token starts afresh, as the slow tokenizers decode it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._added = tokenizer.added_token_ids
        self._run = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens=False)
        self._num_parts = 0
        self._is_run_open = False
        """The current run emitted text already (so it is a part, with its space)."""

    def _token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def _fresh_run(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self._tokenizer, (), skip_special_tokens=False)

    def _run_text(self, text: str) -> str:
        if text and not self._is_run_open:
            self._is_run_open = True
            if self._num_parts:
                text = " " + text
            self._num_parts += 1
        return text

    def append(self, token_id: int) -> str:
        if token_id not in self._added:
            return self._run_text(self._run.append(token_id))
        out = self._run_text(self._run.flush())  # the run ends at the added token
        out += (" " if self._num_parts else "") + self._token_text(token_id)
        self._num_parts += 1
        self._run, self._is_run_open = self._fresh_run(), False
        return out

    def flush(self) -> str:
        return self._run_text(self._run.flush())

    def decode_all(self, output_token_ids: Sequence[int]) -> str:
        """The whole text in one decode per part (for a detokenizer not appended to)."""
        parts: list[str] = []
        run: list[int] = []
        first = self._run

        def close_run() -> None:
            nonlocal first
            if run:
                text = (first or self._fresh_run()).decode_all(run)
                if text:
                    parts.append(text)
                run.clear()
            first = None

        for t in output_token_ids:
            if t in self._added:
                close_run()
                parts.append(self._token_text(t))
            else:
                run.append(t)
        close_run()
        return " ".join(parts)


class CompletionText:
    """The text of one completion, token by token (see the module docstring).

    ``stop_token_ids``: every token id that ends the completion when sampled (EOS unless
    ``ignore_eos``, and the request's ``stop_token_ids``); such a final token adds no text
    unless ``include_stop_str_in_output``.
    """

    def __init__(self, tokenizer: Tokenizer | None, prompt_token_ids: Sequence[int], stop: Sequence[str],
                 skip_special_tokens: bool, stream: bool, *, include_stop_str_in_output: bool = False,
                 spaces_between_special_tokens: bool = True, stop_token_ids: Collection[int] = ()) -> None:
        self.detok: IncrementalDetokenizer | SpacedDetokenizer | None = None
        if tokenizer is not None:
            if spaces_between_special_tokens and not skip_special_tokens and tokenizer.added_token_ids:
                self.detok = SpacedDetokenizer(tokenizer, prompt_token_ids)
            else:
                self.detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)
        self.stop = StopStringMatcher(list(stop)) if stop else None
        self.incremental = self.detok is not None and (stream or self.stop is not None)
        self.include_stop = include_stop_str_in_output
        self._silent_stop_ids = frozenset(()) if include_stop_str_in_output else frozenset(stop_token_ids)
        self._search = self.stop.max_len - 1 if self.stop is not None else 0
        """Characters before the new text a stop string can begin in."""
        self._parts: list[str] = []
        self._pending = ""
        """Uncommitted text (held back while it may begin a stop string)."""
        self._tail = ""
        """With include_stop: the last committed characters, kept only to search in."""
        self._num_streamed = 0
        """Committed parts already handed out by ``take_delta``."""
        self.stop_string: str | None = None

    def append(self, token_id: int, finished: bool) -> bool:
        """Add one output token (``finished``: it is the last). Returns True when a stop
        string completed: the text is then final, cut before it (after it with
        ``include_stop_str_in_output``)."""
        if not self.incremental:
            return False
        new = "" if finished and token_id in self._silent_stop_ids else self.detok.append(token_id)
        if finished:
            new += self.detok.flush()  # a held-back split character is final now
        if not new and not finished:
            return False
        before = self._tail if self.include_stop else self._pending
        window = before + new
        cut = self.stop.check(window, len(new)) if self.stop is not None and new else None
        if cut is not None:
            self.stop_string = next(s for s in self.stop.stop if window.startswith(s, cut))
            if self.include_stop:  # the match overlaps the new text, so it ends inside it
                self._parts.append(window[len(before) : cut + len(self.stop_string)])
            else:
                self._parts.append(window[:cut])
            self._pending = ""
            return True
        if self.include_stop:
            self._parts.append(new)
            self._tail = window[len(window) - min(self._search, len(window)) :]
        elif finished:
            self._parts.append(window)
            self._pending = ""
        else:
            keep = min(self._search, len(window))
            if len(window) > keep:
                self._parts.append(window[: len(window) - keep])
            self._pending = window[len(window) - keep :]
        return False

    def take_delta(self) -> str:
        """Committed text not handed out yet (streaming)."""
        if self._num_streamed == len(self._parts):
            return ""
        delta = "".join(self._parts[self._num_streamed :])
        self._num_streamed = len(self._parts)
        return delta

    def final_text(self, output_token_ids: list[int]) -> str:
        """The whole text once finished."""
        if self.detok is None:
            return ""
        if not self.incremental:
            # A final token that ends the completion adds no text; one that finished it by
            # length cannot be such a token (stop tokens are checked first).
            if output_token_ids and output_token_ids[-1] in self._silent_stop_ids:
                output_token_ids = output_token_ids[:-1]
            return self.detok.decode_all(output_token_ids)
        return "".join(self._parts) + self._pending
