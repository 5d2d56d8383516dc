"""The profiling run behind ``pdserve plan profile``: a short, quiet measurement over HTTP.

Run it on an otherwise idle deployment; every measurement assumes nothing else runs.

1. **Prefill curve.** Sequential ``max_tokens=1`` requests over prompt lengths at or
   above the gateway's ``disagg_threshold_tokens``, so the prefill pool serves them;
   TTFT (median of ``reps``) per length. Then ``k`` identical-length prompts at once
   (batched prefill); the last TTFT. Prompts are random, so nothing hits a prefix cache.
2. **Hop.** Prompts of ``threshold - 1`` tokens (prefilled on the decode worker) and of
   ``threshold`` tokens (prefilled remotely) alternately: the median TTFT difference
   is the fixed cost of the disaggregated path (RPC, KV hop).
3. **Decode curve.** For each context length and batch size ``B``: ``B`` streams of
   ``decode_tokens`` tokens (``ignore_eos``) started together. Inside the window where
   all ``B`` are decoding (after the last first token, before the first end) the batch
   is exactly ``B``; the mean inter-token time there is the step time, at the window's
   mean context length.

Prompts are token-id lists (pdserve's gateway takes them and counts them exactly), or
text of exact length when a tokenizer directory is given.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass

import httpx

from .profile import DecodePoint, DeploymentInfo, PrefillPoint, Profile, fit_profile
from .sse import SSEParser

_TOKEN_ID_RANGE = (100, 4000)  # inside any real vocabulary, clear of the special tokens


@dataclass(frozen=True)
class ProfileRunConfig:
    base_url: str
    api_key: str | None = None
    model: str | None = None
    tokenizer_dir: str | None = None
    prefill_lens: tuple[int, ...] = (256, 384, 512, 768, 1024, 1536)
    reps: int = 3
    batch_sizes_prefill: tuple[int, ...] = (2, 4)
    batch_prefill_len: int = 512
    hop_reps: int = 5
    decode_batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    decode_context_lens: tuple[int, ...] = (32, 1024)
    decode_tokens: int = 64
    #: Seeds the random prompts; None: a fresh seed per run, so a second profile of the
    #: same deployment cannot hit prompts the first one left in the prefix caches.
    seed: int | None = None
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.base_url!r}")
        for name in ("prefill_lens", "batch_sizes_prefill", "decode_batch_sizes", "decode_context_lens"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values):
                raise ValueError(f"{name} must be integers >= 1, got {values!r}")
        for name in ("reps", "hop_reps", "batch_prefill_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.decode_tokens < 8:
            raise ValueError(f"decode_tokens must be >= 8 to see a decode window, got {self.decode_tokens}")

    @property
    def api_url(self) -> str:
        url = self.base_url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"


class _Client:
    def __init__(self, config: ProfileRunConfig, http: httpx.AsyncClient, model: str) -> None:
        self.config = config
        self.http = http
        self.model = model
        seed = config.seed if config.seed is not None else time.time_ns()
        self.rng = random.Random(seed)
        self.factory = None
        if config.tokenizer_dir is not None:
            from .prompts import PromptFactory  # noqa: PLC0415 - only with a tokenizer

            self.factory = PromptFactory.from_dir(config.tokenizer_dir)
            self.np_rng = __import__("numpy").random.default_rng(seed)

    def prompt(self, num_tokens: int):
        if self.factory is None:
            return [self.rng.randrange(*_TOKEN_ID_RANGE) for _ in range(num_tokens)]
        words = self.factory.random_words(self.np_rng, num_tokens + 8)
        return self.factory.completion_prompt(words, num_tokens)[0]

    async def stream(self, num_tokens: int, max_tokens: int) -> list[tuple[float, int]]:
        """Send one streamed completion; ``(time.perf_counter(), tokens)`` per chunk, after
        ``(send time, 0)`` first."""
        body = {"model": self.model, "prompt": self.prompt(num_tokens), "max_tokens": max_tokens, "stream": True,
                "ignore_eos": True, "temperature": 0.0, "logprobs": 1}
        t0 = time.perf_counter()
        out = [(t0, 0)]
        async with self.http.stream("POST", f"{self.config.api_url}/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:300]
                raise ValueError(f"profiling request failed with HTTP {resp.status_code}: {text}")
            parser = SSEParser()
            async for raw in resp.aiter_bytes():
                now = time.perf_counter()
                for data in parser.feed(raw):
                    if data == "[DONE]":
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        raise ValueError(f"profiling request failed: {event['error']}")
                    for choice in event.get("choices", []):
                        # logprobs=1 makes every token visible, even one whose text is held back
                        lp = choice.get("logprobs") or {}
                        out.append((now, max(1, len(lp.get("tokens") or [None]))))
        if len(out) < 2:
            raise ValueError("a profiling request returned no tokens")
        return out

    async def ttft(self, num_tokens: int) -> float:
        events = await self.stream(num_tokens, 1)
        return events[1][0] - events[0][0]


async def _first_model(http: httpx.AsyncClient, config: ProfileRunConfig) -> str:
    resp = await http.get(f"{config.api_url}/models")
    if resp.status_code != 200:
        raise ValueError(f"GET /v1/models failed with HTTP {resp.status_code}")
    return resp.json()["data"][0]["id"]


def decode_window(streams: list[list[tuple[float, int]]], input_len: int) -> DecodePoint | None:
    """The decode point of ``len(streams)`` streams started together (see the module docstring)."""
    streams = [s[1:] if s and s[0][1] == 0 else s for s in streams]  # drop the send marks
    start = max(s[0][0] for s in streams)
    end = min(s[-1][0] for s in streams)
    gaps, ctxs = [], []
    for s in streams:
        produced = 0
        inside = []
        for t, n in s:
            produced += n
            if start <= t <= end:
                inside.append((t, produced))
        if len(inside) >= 3:
            (t_a, n_a), (t_b, n_b) = inside[0], inside[-1]
            gaps.append((t_b - t_a) / (n_b - n_a))
            ctxs.append(input_len + (n_a + n_b) / 2)
    if len(gaps) < len(streams):
        return None
    return DecodePoint(len(streams), statistics.fmean(ctxs), statistics.fmean(gaps))


async def _run(config: ProfileRunConfig, deployment: DeploymentInfo, log) -> Profile:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    async with httpx.AsyncClient(headers=headers, timeout=config.timeout_s) as http:
        model = config.model or await _first_model(http, config)
        c = _Client(config, http, model)
        thr = deployment.disagg_threshold_tokens
        for _ in range(3):  # warm-up: first requests pay for connections and lazy initialisation
            await c.stream(max(thr, 64), 4)
        prefill: list[PrefillPoint] = []
        for n in config.prefill_lens:
            if n < thr:
                raise ValueError(f"prefill length {n} is below disagg_threshold_tokens {thr}: it would not reach "
                                 f"the prefill pool")
            times = [await c.ttft(n) for _ in range(config.reps)]
            prefill.append(PrefillPoint((n,), statistics.median(times)))
            log(f"prefill {n:5d} tokens: TTFT {1e3 * prefill[-1].seconds:.1f} ms")
        for k in config.batch_sizes_prefill:
            n = config.batch_prefill_len
            for _ in range(config.reps):
                times = await asyncio.gather(*(c.ttft(n) for _ in range(k)))
                prefill.append(PrefillPoint((n,) * k, max(times)))
            log(f"prefill {k} x {n} tokens at once: last TTFT {1e3 * prefill[-1].seconds:.1f} ms")
        hop_s = 0.0
        if thr >= 2:
            local, remote = [], []
            for _ in range(config.hop_reps):
                local.append(await c.ttft(thr - 1))
                remote.append(await c.ttft(thr))
            hop_s = statistics.median(remote) - statistics.median(local)
            # The remote ones are prefill points too, the shortest the prefill pool sees.
            prefill.append(PrefillPoint((thr,), statistics.median(remote)))
            log(f"hop: local {1e3 * statistics.median(local):.1f} ms ({thr - 1} tokens), "
                f"remote {1e3 * statistics.median(remote):.1f} ms ({thr} tokens)")
        decode: list[DecodePoint] = []
        for ctx in config.decode_context_lens:
            for b in config.decode_batch_sizes:
                # Remote prefills of the batch run one after another: decode long enough
                # (at >= 10 ms a token) that all b overlap for decode_tokens tokens.
                ramp_s = b * _predict(prefill, ctx) if ctx >= thr else 0.0
                num_tokens = config.decode_tokens + int(ramp_s / 0.010)
                streams = await asyncio.gather(*(c.stream(ctx, num_tokens) for _ in range(b)))
                point = decode_window(list(streams), ctx)
                if point is None:
                    log(f"decode batch {b} context {ctx}: no window with all {b} decoding; skipped")
                    continue
                single = [p.step_s for p in decode if p.batch_size == 1 and abs(p.context_len - point.context_len)
                          < 0.5 * point.context_len]
                if single and point.step_s < 0.9 * min(single):
                    # More sequences never make a step faster: the stream arrived in bursts
                    # (a stalled client or gateway), so its timestamps are not step times.
                    log(f"decode batch {b} context {ctx}: {1e3 * point.step_s:.2f} ms is below batch 1's; skipped")
                    continue
                decode.append(point)
                log(f"decode batch {b:3d} context {point.context_len:7.1f}: step {1e3 * point.step_s:.2f} ms")
        slow_p, slow_d = await _colocation(c, config.batch_prefill_len, log)
    meta = {"url": config.base_url, "model": model, "reps": config.reps, "decode_tokens": config.decode_tokens}
    return fit_profile(deployment, prefill, decode, hop_s=hop_s, prefill_colocation_slowdown=slow_p,
                       decode_colocation_slowdown=slow_d, metadata=meta)


def _predict(points: list[PrefillPoint], num_tokens: int) -> float:
    """TTFT of a single prompt of ``num_tokens``, interpolated from the sequential points."""
    singles = sorted((p.prompt_lens[0], p.seconds) for p in points if len(p.prompt_lens) == 1)
    for (n_a, t_a), (n_b, t_b) in zip(singles, singles[1:]):
        if n_a <= num_tokens <= n_b:
            return t_a + (t_b - t_a) * (num_tokens - n_a) / max(1, n_b - n_a)
    n_last, t_last = singles[-1]
    return t_last * num_tokens / n_last


async def _colocation(c: _Client, prompt_len: int, log) -> tuple[float, float]:
    """How much a prefill and a decode slow each other down on this deployment's hosts.

    Per rep: a prefill of ``prompt_len`` tokens alone, then one while a decode streams
    (interleaved, so a drifting background load hits both sides alike). The ratio of
    median TTFTs, and the decode's median token gap during the prefill against its gap
    after it. About 0 when every worker owns its accelerator.
    """
    alone, beside, inside, outside = [], [], [], []
    for _ in range(c.config.reps):
        alone.append(await c.ttft(prompt_len))
        task = asyncio.create_task(c.stream(32, 48))
        await asyncio.sleep(0.2)
        t0 = time.perf_counter()
        beside.append(await c.ttft(prompt_len))
        window = (t0, t0 + beside[-1])
        events = (await task)[2:]  # after the send mark and the first token
        for (t_a, _), (t_b, n) in zip(events, events[1:]):
            gap = (t_b - t_a) / n
            if window[0] <= t_a and t_b <= window[1]:
                inside.append(gap)
            elif t_a > window[1]:
                outside.append(gap)
    slow_p = statistics.median(beside) / statistics.median(alone) - 1
    slow_d = statistics.median(inside) / statistics.median(outside) - 1 if inside and outside else 0.0
    log(f"colocation: prefill {1e3 * statistics.median(alone):.1f} -> {1e3 * statistics.median(beside):.1f} ms "
        f"beside a decode ({slow_p:+.0%}); decode step {slow_d:+.0%} beside a prefill")
    return slow_p, slow_d


def run_profile(config: ProfileRunConfig, deployment: DeploymentInfo, log=print) -> Profile:
    """Measure the deployment at ``config.base_url`` and fit its profile (blocking)."""
    return asyncio.run(_run(config, deployment, log))
