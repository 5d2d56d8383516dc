"""Prompt text of a wanted token length, built from words.

With the target model's tokenizer (``PromptFactory.from_dir(model_dir)``), the words
are the vocabulary's own " word" tokens: lowercase ASCII words that are a single
token when preceded by a space. A byte-level BPE pre-tokenizer splits text at those
spaces, so a text of k such words is exactly k tokens, and two texts sharing their
first words share exactly those tokens (what the shared-prefix and trace workloads
rely on). Each prompt is then *measured* with the real framing (the BOS the
tokenizer adds, or the whole chat template) and the number of words adjusted until
the measured length is the wanted one, so lengths are exact whatever the template
does to the first word.

Without a tokenizer the words come from a fixed English word list and one word is
*assumed* to be one token: lengths are approximate (common English words are one
token in most modern vocabularies, but not all of them, and BOS/template tokens are
not counted). The server's ``usage.prompt_tokens`` is then the true count, and that is
what the records report.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_FALLBACK_WORDS = tuple("""
the of and to in is that for it as was with be by on not he this are or his from at which but have an they
you were her she there one all we their has been would will more when who if no out so said what up its about
into than them can only other new some could time these two may then do first any my now such like our over man
me even most made after also did many before must through back years where much your way well down should because
each just those people how too little state good very make world still own see men work long get here between both
life being under never day same another know while last might us great old year off come since against go came
right used take three place small found part again thing number house world water light point group given order
""".split())
_MAX_CORRECTIONS = 3
_MAX_VOCAB_WORDS = 4096


class PromptFactory:
    """Words and prompts for one target; ``is_exact`` says whether lengths are exact."""

    def __init__(self, tokenizer: Any | None = None) -> None:
        self.tokenizer = tokenizer
        self.words: tuple[str, ...] = _vocab_words(tokenizer) if tokenizer is not None else _FALLBACK_WORDS
        if not self.words:
            raise ValueError("the tokenizer has no single-token lowercase words to build prompts from")

    @classmethod
    def from_dir(cls, model_dir: str | Path | None) -> PromptFactory:
        """The factory for ``model_dir``'s tokenizer; approximate words when ``model_dir`` is None."""
        if model_dir is None:
            return cls(None)
        from pdserve.engine.tokenizer import Tokenizer  # noqa: PLC0415 - torch-free, but only when asked

        tokenizer = Tokenizer.from_dir(model_dir)
        if tokenizer is None:
            raise ValueError(f"no tokenizer.json in {model_dir}")
        return cls(tokenizer)

    @property
    def is_exact(self) -> bool:
        return self.tokenizer is not None

    @property
    def can_count_chat(self) -> bool:
        return self.tokenizer is not None and self.tokenizer.chat_template is not None

    def random_words(self, rng: np.random.Generator, num_words: int) -> list[str]:
        idx = rng.integers(0, len(self.words), size=max(num_words, 0))
        return [self.words[i] for i in idx]

    @staticmethod
    def text(words: Sequence[str]) -> str:
        """Each word with its leading space: the form that is one token."""
        return "".join(" " + w for w in words)

    # -- measuring -------------------------------------------------------------------------

    def count_completion(self, text: str) -> int:
        """Tokens the server counts for a /v1/completions text prompt (one per word without a tokenizer)."""
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer.encode(text))

    def count_chat(self, messages: list[dict[str, str]]) -> int:
        """Tokens of the templated chat; without a template, the words of every message."""
        if not self.can_count_chat:
            return sum(len(m["content"].split()) for m in messages)
        return len(self.tokenizer.encode_chat(messages))

    # -- building ----------------------------------------------------------------------------

    def completion_prompt(self, words: Sequence[str], target_len: int) -> tuple[str, int]:
        """The text of the first k of ``words`` that counts ``target_len`` tokens (or the
        closest reachable), and its count. ``words`` must hold at least ``target_len`` words."""
        k = self._fit(words, target_len, lambda k: self.count_completion(self.text(words[:k])))
        text = self.text(words[:k])
        return text, self.count_completion(text)

    def chat_messages(self, history: list[dict[str, str]], words: Sequence[str],
                      target_len: int | None) -> tuple[list[dict[str, str]], int]:
        """``history`` plus one user message of the first k of ``words``; with ``target_len``
        the whole templated chat counts that many tokens, else the message has all ``words``."""

        def build(k: int) -> list[dict[str, str]]:
            return [*history, {"role": "user", "content": self.text(words[:k])}]

        k = len(words) if target_len is None else self._fit(words, target_len, lambda k: self.count_chat(build(k)))
        messages = build(k)
        return messages, self.count_chat(messages)

    @staticmethod
    def _fit(words: Sequence[str], target_len: int, count: Callable[[int], int]) -> int:
        """Number of leading words whose measured length is ``target_len`` (the closest
        reachable if none is exact). ``count(k)`` never decreases with ``k``.

        Fast path: measure the framing overhead once and correct by the measured error
        (with one-token words this is exact in one or two encodes, which matters for long
        prompts). If that does not land, bisect between the counts seen."""
        seen: dict[int, int] = {}

        def measure(k: int) -> int:
            if k not in seen:
                seen[k] = count(k)
            return seen[k]

        def clamp(k: int) -> int:
            return max(1, min(len(words), k))

        k = clamp(target_len)
        k = clamp(target_len - (measure(k) - k))
        for _ in range(_MAX_CORRECTIONS):
            err = measure(k) - target_len
            if err == 0:
                return k
            if clamp(k - err) == k:
                break
            k = clamp(k - err)
        low = max((k for k, n in seen.items() if n <= target_len), default=1)
        high = min((k for k, n in seen.items() if n > target_len), default=len(words) + 1)
        while high - low > 1:
            mid = (low + high) // 2
            if measure(mid) <= target_len:
                low = mid
            else:
                high = mid
        candidates = [k for k in (low, high) if 1 <= k <= len(words)]
        return min(candidates, key=lambda k: abs(measure(k) - target_len))


def _vocab_words(tokenizer: Any) -> tuple[str, ...]:
    """Lowercase ASCII words (2+ letters) of the vocabulary that add exactly one token when
    appended after a space, in id order, at most ``_MAX_VOCAB_WORDS`` (deterministic for
    a given tokenizer). Works for byte-level BPE ("Ġword") and SentencePiece ("▁word")."""
    words: dict[str, None] = {}
    for token_id in range(tokenizer.vocab_size):
        if token_id in tokenizer.special_token_ids:
            continue
        word = tokenizer.decode([token_id]).strip()
        if len(word) < 2 or word in words or not (word.isascii() and word.isalpha() and word.islower()):
            continue
        once = tokenizer.encode(" " + word, add_special_tokens=False)
        twice = tokenizer.encode(" " + word + " " + word, add_special_tokens=False)
        if len(twice) == len(once) + 1:
            words[word] = None
            if len(words) >= _MAX_VOCAB_WORDS:
                break
    return tuple(words)
