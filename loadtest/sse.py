"""An incremental parser of Server-Sent Events (the ``text/event-stream`` of OpenAI streaming).

Bytes are fed as the network delivers them, split anywhere (inside a line, inside a
multi-byte UTF-8 character, between ``\\r`` and ``\\n``). An event ends at a blank line;
its ``data:`` lines are joined with ``\\n`` (the HTML standard's rule). Comment lines
(``:`` first) and other fields (``event:``, ``id:``, ``retry:``) are skipped: OpenAI
streams carry everything in ``data``. Lines end with ``\\n``, ``\\r\\n`` or ``\\r``.
"""

from __future__ import annotations


class SSEParser:
    """``feed(bytes) -> [data, ...]`` for each event completed by those bytes; ``close()``
    returns an event left unterminated when the stream ended (servers that omit the
    final blank line)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        events: list[str] = []
        while True:
            line, rest = _split_line(self._buffer)
            if line is None:
                return events
            self._buffer = rest
            self._take(line.decode("utf-8", errors="replace"), events)

    def close(self) -> list[str]:
        events: list[str] = []
        if self._buffer:
            self._take(self._buffer.rstrip(b"\r").decode("utf-8", errors="replace"), events)
            self._buffer = b""
        self._take("", events)
        return events

    def _take(self, line: str, events: list[str]) -> None:
        if line == "":
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)


def _split_line(buffer: bytes) -> tuple[bytes | None, bytes]:
    """The first complete line of ``buffer`` and the rest; (None, buffer) when no line ends yet.
    A lone ``\\r`` at the very end is not yet a line end: a ``\\n`` may follow in the next chunk."""
    n = buffer.find(b"\n")
    r = buffer.find(b"\r")
    if r != -1 and (n == -1 or r < n):
        if r == len(buffer) - 1:
            return None, buffer
        end = r + 2 if buffer[r + 1 : r + 2] == b"\n" else r + 1
        return buffer[:r], buffer[end:]
    if n == -1:
        return None, buffer
    return buffer[:n], buffer[n + 1 :]
