"""Per-completion output text: incremental detokenization and stop strings, bounded per token.

A :class:`CompletionText` turns a completion's token ids into its text:

- **Streamed** (online, or any request with stop strings): each token is detokenized
  incrementally (``IncrementalDetokenizer``: a short window, O(new tokens)); the text is
  kept as committed parts plus a pending tail of at most ``len(longest stop) - 1``
  characters. A stop string can only begin in that tail or in the new text, so each token
  searches ``tail + new`` (bounded by the stop strings, not by the output), and only
  committed text is ever streamed: a stop string is never sent and then retracted.
- **Not streamed** (offline ``LLM.generate`` without stop strings): nothing happens per
  token; the text is decoded once, in one call, when the completion finishes.

Either way the final text equals the incremental decode of the output tokens, cut
before the first stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer


class CompletionText:
    def __init__(self, tokenizer: Tokenizer | None, prompt_token_ids: Sequence[int], stop: Sequence[str],
                 skip_special_tokens: bool, stream: bool) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens) if tokenizer else None
        self.stop = StopStringMatcher(list(stop)) if stop else None
        self.incremental = self.detok is not None and (stream or self.stop is not None)
        self._hold = self.stop.max_len - 1 if self.stop is not None else 0
        self._parts: list[str] = []
        self._pending = ""
        self._num_streamed = 0
        """Committed parts already handed out by ``take_delta``."""
        self.stop_string: str | None = None

    def append(self, token_id: int, finished: bool) -> bool:
        """Add one output token (``finished``: it is the last). Returns True when a stop
        string completed: the text is then final, cut before it."""
        if not self.incremental:
            return False
        new = self.detok.append(token_id)
        if finished:
            new += self.detok.flush()  # a held-back split character is final now
        if not new and not finished:
            return False
        window = self._pending + new
        cut = self.stop.check(window, len(new)) if self.stop is not None and new else None
        if cut is not None:
            self.stop_string = next(s for s in self.stop.stop if window.startswith(s, cut))
            self._parts.append(window[:cut])
            self._pending = ""
            return True
        if finished:
            self._parts.append(window)
            self._pending = ""
        else:
            keep = min(self._hold, len(window))
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
            return self.detok.decode_all(output_token_ids)
        return "".join(self._parts) + self._pending
