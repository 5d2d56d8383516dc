"""The soak's load: a fixed set of chat requests streamed through the gateway by a few
client threads, and the offline engine's answers to check them against.

Every request is one of ``build_specs()``'s specs (greedy or seeded sampling, n = 1 or
2, logprobs on some, prompts short enough to prefill on the decode worker or long enough
to take the prefill pool), sent with ``stream: true`` and continuous usage. Greedy and
seeded sampling are deterministic (greedy up to near-ties, :data:`NEAR_TIE`), so every
request that completes must equal the offline ``LLM`` run of its spec, text for text and
token for token, whatever workers died under it. Long prompts carry a fresh ``cache_salt`` each time, so no cache ever
holds them and every one of them takes the prefill pool (the salt changes no output).

A request ends one of four ways (:class:`Outcome.kind`):

- ``completed``: HTTP 200, every choice finished, ``[DONE]``;
- ``failed_before_content``: a clear error before the first token: an HTTP error status
  with an OpenAI error body, or an error event before any content;
- ``failed_after_content``: an error event after content (a stream that broke where
  the client can see it);
- ``broken``: anything without a clear error (a cut stream, no ``[DONE]``, a choice left
  unfinished, a transport error).

The last two fail the soak.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import httpx

from pdserve.engine import SamplingParams

#: Words the prompts are made of (plain ASCII: the tiny tokenizer splits them into a few tokens each).
WORDS = ("list", "items", "iterable", "order", "key", "function", "reverse", "flag", "result", "sorted",
         "value", "index", "table", "block", "token", "stream", "worker", "request", "prefix", "cache",
         "decode", "prefill", "model", "layer", "the", "a", "of", "to", "and", "in", "with", "from")


@dataclass(frozen=True)
class RequestSpec:
    """One kind of request the clients send (every send of it must give the same answer)."""

    name: str
    content: str
    """The user message."""
    temperature: float
    seed: int | None
    n: int
    max_tokens: int
    logprobs: bool
    ignore_eos: bool
    is_long: bool
    """Meant to exceed the gateway's disaggregation threshold (checked once tokenized)."""

    def body(self, model: str) -> dict:
        body = {"model": model, "messages": [{"role": "user", "content": self.content}], "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                "temperature": self.temperature, "n": self.n, "max_tokens": self.max_tokens,
                "ignore_eos": self.ignore_eos}
        if self.seed is not None:
            body["seed"] = self.seed
        if self.logprobs:
            body["logprobs"] = True
        if self.is_long:
            body["cache_salt"] = uuid.uuid4().hex  # a fresh prompt for every cache: it takes the prefill pool
        return body

    def reference_params(self) -> SamplingParams:
        """The offline engine's parameters for this spec, with the top-2 logprobs of every
        token (they change no token; ``compare`` uses them to recognize near-ties)."""
        return SamplingParams(temperature=self.temperature, seed=self.seed, n=self.n, max_tokens=self.max_tokens,
                              ignore_eos=self.ignore_eos, logprobs=2)


#: (name, temperature, seeded, n, logprobs, ignore_eos, long): the mix, one spec each per round.
KINDS = (
    ("greedy-short-logprobs", 0.0, False, 1, True, True, False),
    ("greedy-long", 0.0, False, 1, False, True, True),
    ("seeded-long-logprobs", 1.0, True, 1, True, True, True),
    ("seeded-n2-short", 1.0, True, 2, False, True, False),
    ("seeded-n2-long-logprobs", 1.0, True, 2, True, False, True),
    ("greedy-short-eos", 0.0, False, 1, False, False, False),
    ("seeded-short-eos-logprobs", 1.0, True, 1, True, False, False),
    ("seeded-long-eos", 1.0, True, 1, False, False, True),
)


def build_specs(num_rounds: int = 2, seed: int = 0) -> list[RequestSpec]:
    """``num_rounds`` specs of each kind, with their own prompts, seeds and lengths."""
    rng = random.Random(seed)
    specs = []
    for r in range(num_rounds):
        for name, temperature, seeded, n, logprobs, ignore_eos, is_long in KINDS:
            num_words = rng.randint(300, 400) if is_long else rng.randint(6, 30)
            content = " ".join(rng.choice(WORDS) for _ in range(num_words))
            specs.append(RequestSpec(f"{name}-{r}", content, temperature, rng.randrange(1 << 31) if seeded else None,
                                     n, rng.randint(24, 48), logprobs, ignore_eos, is_long))
    return specs


@dataclass
class Outcome:
    """What the client saw of one request."""

    spec_index: int
    started: float
    response_id: str = ""
    ended: float = 0.0
    status: int = 0
    texts: dict[int, str] = field(default_factory=dict)
    logprobs: dict[int, list[tuple[str, float]]] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    usage: dict | None = None
    error: str | None = None
    has_content: bool = False
    is_done: bool = False
    is_clear_error: bool = False

    @property
    def kind(self) -> str:
        if self.error is None:
            return "completed" if self.is_done and len(self.finish) == len(self.texts) and self.texts else "broken"
        if not self.is_clear_error:
            return "broken"
        return "failed_after_content" if self.has_content else "failed_before_content"


def stream_chat(client: httpx.Client, url: str, body: dict, out: Outcome,
                on_tokens: Callable[[float, int], None]) -> None:
    """Send one streamed chat request and record everything into ``out``; ``on_tokens(t,
    k)`` gets each chunk's new completion tokens (from its continuous usage) as they arrive."""
    num_tokens = 0
    try:
        with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            out.status = r.status_code
            if r.status_code != 200:
                text = r.read().decode(errors="replace")
                try:
                    err = json.loads(text)["error"]
                    out.error, out.is_clear_error = f"{r.status_code} {err['code']}: {err['message']}", True
                except (ValueError, KeyError, TypeError):
                    out.error = f"{r.status_code} (no OpenAI error body): {text[:300]}"
                return
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out.is_done = True
                    continue
                event = json.loads(line.removeprefix("data: "))
                out.response_id = event.get("id", out.response_id)
                if "error" in event:
                    err = event["error"]
                    out.error, out.is_clear_error = f"error event {err.get('code')}: {err.get('message')}", True
                    continue
                if event.get("usage"):
                    out.usage = event["usage"]
                    new = event["usage"]["completion_tokens"] - num_tokens
                    if new > 0:
                        num_tokens += new
                        on_tokens(time.monotonic(), new)
                for c in event["choices"]:
                    i = c["index"]
                    text = c["delta"].get("content") or ""
                    out.texts[i] = out.texts.get(i, "") + text
                    if c.get("logprobs"):
                        out.logprobs.setdefault(i, []).extend(
                            (e["token"], e["logprob"]) for e in c["logprobs"]["content"])
                    out.has_content = out.has_content or bool(text) or bool(c.get("logprobs"))
                    if c.get("finish_reason"):
                        out.finish[i] = c["finish_reason"]
    except (httpx.HTTPError, ValueError) as e:
        out.error = f"transport: {e!r}"
    finally:
        out.ended = time.monotonic()


class Load:
    """``num_clients`` threads streaming the specs back to back (each its own rotation of
    them) until stopped. ``outcomes`` holds every request, ``token_events`` (time, tokens)
    every chunk's new tokens, for throughput over any window."""

    def __init__(self, url: str, model: str, specs: list[RequestSpec], num_clients: int = 4) -> None:
        self.url, self.model, self.specs = url, model, specs
        self.outcomes: list[Outcome] = []
        self.token_events: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i, num_clients), name=f"soak-client-{i}",
                                          daemon=True) for i in range(num_clients)]
        for t in self._threads:
            t.start()

    def _on_tokens(self, t: float, k: int) -> None:
        with self._lock:
            self.token_events.append((t, k))

    def _run(self, client_index: int, num_clients: int) -> None:
        k = client_index * len(self.specs) // num_clients
        with httpx.Client(timeout=httpx.Timeout(180, connect=10)) as client:
            while not self._stop.is_set():
                index = k % len(self.specs)
                k += 1
                out = Outcome(index, time.monotonic())
                stream_chat(client, self.url, self.specs[index].body(self.model), out, self._on_tokens)
                with self._lock:
                    self.outcomes.append(out)

    def tokens_per_s(self, start: float, end: float) -> float:
        """Completion tokens the clients received per second in [start, end)."""
        with self._lock:
            return sum(k for t, k in self.token_events if start <= t < end) / max(end - start, 1e-9)

    def stop(self, timeout_s: float = 180.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout_s)


NEAR_TIE = 1e-4
"""Top-two logprob gap below which a greedy token may go either way. The same request's
logprobs differ by up to ~2e-6 between batch compositions (the CPU's float32 GEMMs round
differently by batch shape; measured on the soak's specs, batched vs alone), so greedy is
deterministic only away from ties: a choice that leaves the reference exactly at such a
token is a different, equally valid continuation, not a lost or duplicated token."""


def compare(out: Outcome, spec: RequestSpec, ref, num_prompt_tokens: int, tokenizer) -> tuple[list[str], list[str]]:
    """(problems, near_ties) of a completed request against the offline engine's ``ref``
    (a RequestOutput run with top-2 logprobs): each choice's text, finish reason and (with
    logprobs) every token's string and logprob; token counts through usage. A greedy choice
    that first differs at a token whose reference top two are within :data:`NEAR_TIE` is a
    near-tie, reported, and its tail is not compared."""
    problems, near_ties = [], []
    if out.usage is not None and out.usage["prompt_tokens"] != num_prompt_tokens:
        problems.append(f"prompt tokens {out.usage['prompt_tokens']} != {num_prompt_tokens}")
    if sorted(out.texts) != list(range(len(ref.outputs))):
        return problems + [f"choices {sorted(out.texts)} != {len(ref.outputs)}"], near_ties
    for i, c in enumerate(ref.outputs):
        token_strs = [tokenizer.decode([t], skip_special_tokens=False) for t in c.token_ids]
        j = _first_difference(out, i, c, token_strs, tokenizer)
        if j is None:
            continue
        if spec.temperature == 0 and j < len(c.token_ids) and len(c.logprobs[j]) > 1:
            top = sorted(c.logprobs[j].values(), reverse=True)
            if top[0] - top[1] < NEAR_TIE:
                near_ties.append(f"choice {i} left the reference at token {j}, a near-tie "
                                 f"(top two {top[0]:.7f} / {top[1]:.7f})")
                continue
        problems.append(f"choice {i}: differs from token {j} of {len(c.token_ids)}: " + _describe(out, i, c, token_strs))
    if not near_ties:
        want = sum(len(c.token_ids) for c in ref.outputs)
        if out.usage is None or out.usage["completion_tokens"] != want:
            problems.append(f"completion tokens {out.usage and out.usage['completion_tokens']} != {want}")
    return problems, near_ties


def _first_difference(out: Outcome, i: int, c, token_strs: list[str], tokenizer) -> int | None:
    """The first token index where choice ``i`` leaves the reference choice ``c``, or None."""
    if got := out.logprobs.get(i):
        got_strs = [s for s, _ in got]
        if got_strs != token_strs:
            return next((j for j, (a, b) in enumerate(zip(got_strs, token_strs)) if a != b),
                        min(len(got_strs), len(token_strs)))
        far = [j for j, ((_, lp), t) in enumerate(zip(got, c.token_ids)) if abs(lp - c.logprobs[j][t]) > 1e-3]
        if far:
            return far[0]
    text = out.texts[i]
    if text == c.text and out.finish.get(i) == c.finish_reason:
        return None
    at = next((k for k, (a, b) in enumerate(zip(text, c.text)) if a != b), min(len(text), len(c.text)))
    for j in range(len(c.token_ids)):  # the token whose text covers character `at`
        if len(tokenizer.decode(c.token_ids[: j + 1])) > at:
            return j
    return len(c.token_ids)


def _describe(out: Outcome, i: int, c, token_strs: list[str]) -> str:
    text = out.texts[i]
    at = next((k for k, (a, b) in enumerate(zip(text, c.text)) if a != b), min(len(text), len(c.text)))
    got_lps = out.logprobs.get(i, [])
    return (f"text from character {at}: got {text[at:at + 40]!r}, want {c.text[at:at + 40]!r} (lengths {len(text)} / "
            f"{len(c.text)}); finish {out.finish.get(i)!r} / {c.finish_reason!r}; "
            + (f"{len(got_lps)} tokens / {len(token_strs)}" if got_lps else "no logprobs asked"))
