"""A one-line live progress bar on stderr: requests done, errors, running TTFT/TPOT.

Plain text rewritten in place with ``\\r`` (no dependency), at most every
``interval_s``; the caller decides whether to show it (the CLI does so only when
stderr is a TTY and ``--no-progress`` is not given).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

import numpy as np

from .metrics import RequestRecord

_BAR_LEN = 20


class Progress:
    def __init__(self, total: int | None, enabled: bool, stream: TextIO | None = None, interval_s: float = 0.5) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self._ttft_ms: list[float] = []
        self._tpot_ms: list[float] = []
        self._num_done = 0
        self._num_errors = 0
        self._start = time.perf_counter()
        self._last_draw = 0.0

    def update(self, record: RequestRecord) -> None:
        self._num_done += 1
        if record.is_ok:
            self._ttft_ms.append(record.ttft_s * 1e3)
            if record.tpot_s is not None:
                self._tpot_ms.append(record.tpot_s * 1e3)
        else:
            self._num_errors += 1
        now = time.perf_counter()
        if self.enabled and now - self._last_draw >= self.interval_s:
            self._last_draw = now
            self._draw(now)

    async def tick(self) -> None:
        """Redraw every ``interval_s`` (elapsed time moves while no request finishes)."""
        while self.enabled:
            self._draw(time.perf_counter())
            await asyncio.sleep(self.interval_s)

    def line(self, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        total = bar = ""
        if self.total:
            filled = min(_BAR_LEN, _BAR_LEN * self._num_done // self.total)
            total, bar = f"/{self.total}", "[" + "#" * filled + "." * (_BAR_LEN - filled) + "] "
        return (f"{bar}{now - self._start:6.1f}s {self._num_done}{total} done, {self._num_errors} errors | "
                f"TTFT p50/p99 {_pct(self._ttft_ms)} ms | TPOT p50/p99 {_pct(self._tpot_ms)} ms")

    def _draw(self, now: float) -> None:
        self.stream.write("\r" + self.line(now) + "\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()


def _pct(values: list[float]) -> str:
    if not values:
        return "-/-"
    p50, p99 = np.percentile(values, [50, 99])
    return f"{p50:.1f}/{p99:.1f}"
