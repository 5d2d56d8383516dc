"""What one client can hold at the gateway's HTTP edge, and for how long.

A generation request takes one of ``max_inflight`` slots only once its whole body is
here, so clients that are slow to send cannot starve the others. Around that:

1. Headers: a connection must complete a request's headers within
   ``header_timeout_s`` (:func:`http_protocol`; uvicorn has no such timeout, so a
   connection that never finished its headers would be held forever), in at most
   16 KiB (h11's limit on an incomplete event).
2. Body: :func:`read_body` reads it within ``body_timeout_s`` (else 408, and the
   connection is closed), at most ``max_body_bytes`` (413), and charges every byte to
   a :class:`BodyBudget` shared by all requests being read (``max_body_bytes_reading``;
   past it, 503 with Retry-After), so concurrent slow uploads cannot exhaust memory.
   Uvicorn buffers at most 64 KiB more per connection before it stops reading.
3. Response: :func:`timed_send` bounds every write of a streamed response by
   ``send_timeout_s``; a client that stops reading gets its stream ended (and its
   generation cancelled) instead of holding a slot forever.
4. Connections: at most ``max_connections`` (uvicorn's ``limit_concurrency``; beyond
   it, uvicorn answers 503), idle keep-alive ones closed after 5 s.

Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from starlette.requests import ClientDisconnect, Request

from .errors import APIError

if TYPE_CHECKING:
    from .gateway import GatewayConfig

log = logging.getLogger("pdserve.gateway")

KEEP_ALIVE_TIMEOUT_S = 5
"""Idle keep-alive connections are closed after this (uvicorn's default)."""
MAX_HEADER_BYTES = 16 << 10
"""Bytes of a request line and headers (h11's incomplete-event limit; beyond: 400)."""


class ClientGone(Exception):
    """The client disconnected before its response started."""


class SendTimeout(Exception):
    """One write of a response did not complete within the send timeout: the client stopped reading."""


class BodyBudget:
    """Bytes of request bodies being read at once, over every connection."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.num_bytes = 0

    def allocate(self, num_bytes: int) -> bool:
        if self.num_bytes + num_bytes > self.max_bytes:
            return False
        self.num_bytes += num_bytes
        return True

    def free(self, num_bytes: int) -> None:
        self.num_bytes -= num_bytes


async def read_body(request: Request, config: GatewayConfig, budget: BodyBudget) -> bytearray:
    """The request's body: whole, within ``config.body_timeout_s``, at most
    ``config.max_body_bytes`` (413), within ``budget`` while it is read (503); 408 when
    it is late; :class:`ClientGone` when the client left."""
    limit = config.max_body_bytes
    too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(config.body_timeout_s):
            async for chunk in request.stream():
                if not budget.allocate(len(chunk)):
                    raise APIError(503, "the server is reading too many request bodies; retry later",
                                   type="server_error", code="overloaded",
                                   headers={"Retry-After": str(config.retry_after_s), "Connection": "close"})
                body += chunk
                if len(body) > limit:
                    raise too_large
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {config.body_timeout_s:g} s",
                       code="request_timeout", headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise ClientGone() from None
    finally:
        budget.free(len(body))
    return body


def timed_send(send: Any, timeout_s: float) -> Any:
    """``send`` (an ASGI send callable) whose every call raises :class:`SendTimeout` if it
    cannot complete within ``timeout_s`` (the server waits for the client to drain its
    socket before it writes more)."""

    async def send_within(message: dict[str, Any]) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await send(message)
        except TimeoutError:
            raise SendTimeout() from None

    return send_within


def http_protocol(header_timeout_s: float) -> type:
    """Uvicorn's h11 protocol, closing a connection whose request headers do not
    complete within ``header_timeout_s`` (from the connection's start, or from the first
    byte of the next request on a kept-alive connection)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: PLC0415 - only where uvicorn serves

    class HeaderTimeoutH11Protocol(H11Protocol):
        # NOTE: uses uvicorn's ``cycle`` (the request being answered, None before the
        # first): a new cycle means a request's headers were complete.
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:
                self._disarm()
            elif self._between_requests():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self._between_requests() and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11Protocol


def uvicorn_settings(config: GatewayConfig) -> dict[str, Any]:
    """Keyword arguments of ``uvicorn.run`` / ``uvicorn.Config`` that bound a gateway's connections."""
    return dict(http=http_protocol(config.header_timeout_s), limit_concurrency=config.max_connections,
                timeout_keep_alive=KEEP_ALIVE_TIMEOUT_S, h11_max_incomplete_event_size=MAX_HEADER_BYTES)


__all__ = ["BodyBudget", "ClientGone", "SendTimeout", "http_protocol", "read_body", "timed_send", "uvicorn_settings"]
