"""The internal plane's authentication: one cluster secret, a signed token on every call.

Only the gateway faces clients (its API key, limits and validation). Every gRPC call
behind it (gateway -> decode worker, decode -> prefill worker, anyone -> embedded
control-plane store) carries the metadata entry::

    x-pdserve-auth: v1:<unix seconds>:<hex HMAC-SHA256(key, "<method>:<unix seconds>")>

where ``method`` is the full gRPC method (``/pdserve.v1.Decode/Generate``) and ``key``
is derived from the cluster secret. A server accepts a token whose time is within
``WINDOW_S`` of its own clock and whose MAC matches (``hmac.compare_digest``), else the
call ends with UNAUTHENTICATED and is counted (:attr:`Rejections.counts`). So the secret
never crosses the wire, and a captured token is good only for the same method for about
a minute. Why this and not mTLS, and what it does not protect: docs/security.md.

Which servers check: those given a secret. Who has one:

* ``PDSERVE_CLUSTER_SECRET`` (the secret itself) or ``PDSERVE_CLUSTER_SECRET_FILE`` (a
  file holding it, readable by its owner only) in the environment (:func:`load_secret`);
* whatever a caller passes explicitly (``pdserve up`` generates one and hands it to the
  store, the gateway, and through Ray to every worker; never on a command line);
* clients only: ``$PDSERVE_HOME/cluster-secret``, which a local ``pdserve up`` writes
  for ``pdserve scale`` and other tools on the machine
  (``pdserve.deploy.credentials.client_secret``).

A server that listens beyond loopback must have one (:func:`require_secret_beyond_loopback`);
on loopback without one it serves unauthenticated (tests, a hand-started worker).
``grpc.health.v1.Health`` stays open: it reveals only SERVING / NOT_SERVING, and
Kubernetes' gRPC probes cannot send metadata.

This module imports grpc and the standard library only (no Ray, no torch).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import stat
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping

import grpc

log = logging.getLogger("pdserve.auth")

METADATA_KEY = "x-pdserve-auth"
SECRET_ENV = "PDSERVE_CLUSTER_SECRET"
SECRET_FILE_ENV = "PDSERVE_CLUSTER_SECRET_FILE"
WINDOW_S = 60
"""Accepted difference, in seconds, between a token's time and the server's clock."""
MIN_SECRET_LEN = 16
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
_VERSION = "v1"
_KEY_LABEL = b"pdserve internal gRPC auth v1"


# ------------------------------------------------------------------------ the secret


def generate_secret() -> bytes:
    """A new cluster secret: 32 random bytes, hex-encoded (so it fits an env variable)."""
    return secrets.token_bytes(32).hex().encode()


def _check_secret(secret: bytes, source: str) -> bytes:
    if not isinstance(secret, bytes):
        raise TypeError(f"a cluster secret is bytes, got {type(secret).__name__} (from {source})")
    if len(secret) < MIN_SECRET_LEN:
        raise ValueError(f"the cluster secret from {source} is {len(secret)} bytes; use at least {MIN_SECRET_LEN} "
                         f"(e.g. `openssl rand -hex 32`)")
    return secret


def read_secret_file(path: str | os.PathLike, what: str = "cluster secret") -> bytes:
    """The stripped contents of ``path``; refuses a file others may read or write.

    A group-readable file is accepted with a warning (Kubernetes Secret volumes under an
    ``fsGroup`` look like that); ``chmod 600`` is the expected mode.
    """
    p = Path(path).expanduser()
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError as e:
        raise ValueError(f"cannot read the {what} file {p}: {e.strerror}") from None
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o007:
            raise ValueError(f"the {what} file {p} is accessible to other users (mode {mode:04o}): chmod 600 {p}")
        if mode & 0o070:
            log.warning("the %s file %s is group-accessible (mode %04o); chmod 600 is safer", what, p, mode)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read().strip()
    finally:
        os.close(fd)
    if not data:
        raise ValueError(f"the {what} file {p} is empty")
    return data


def write_secret_file(path: str | os.PathLike, secret: bytes) -> Path:
    """Write ``secret`` to ``path`` with mode 0600 (created that way, then renamed into place)."""
    p = Path(path).expanduser()
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secret + b"\n")
    finally:
        os.close(fd)
    os.replace(tmp, p)
    return p


def load_secret(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The secret this process was given in its environment, or None.

    ``PDSERVE_CLUSTER_SECRET`` (the value) wins over ``PDSERVE_CLUSTER_SECRET_FILE``.
    """
    env = os.environ if environ is None else environ
    value = env.get(SECRET_ENV, "").strip()
    if value:
        return _check_secret(value.encode(), f"${SECRET_ENV}")
    path = env.get(SECRET_FILE_ENV, "").strip()
    if path:
        return _check_secret(read_secret_file(path), f"${SECRET_FILE_ENV} ({path})")
    return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address to bind or connect to) is on loopback only."""
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or a wildcard such as 0.0.0.0 / ::


def require_secret_beyond_loopback(host: str, secret: bytes | None, what: str) -> None:
    """Refuse (ValueError) to serve on a non-loopback ``host`` without a cluster secret."""
    if secret is None and not is_loopback(host):
        raise ValueError(
            f"{what} would listen on {host}, beyond loopback, without a cluster secret: set "
            f"{SECRET_FILE_ENV}=<file, mode 600> or {SECRET_ENV} (e.g. `openssl rand -hex 32`); "
            f"`pdserve up` makes one itself"
        )


# ------------------------------------------------------------------------ tokens


def _method_name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


class ClusterAuth:
    """Makes and checks tokens for one cluster secret. ``clock`` (unix seconds) is injectable."""

    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        self._key = hmac.new(_check_secret(secret, "the caller"), _KEY_LABEL, hashlib.sha256).digest()
        self._clock = clock

    def _mac(self, method: str, when: int) -> str:
        return hmac.new(self._key, f"{method}:{when}".encode(), hashlib.sha256).hexdigest()

    def token(self, method: str | bytes, when: int | None = None) -> str:
        """The metadata value for one call of ``method`` (now, unless ``when`` is given)."""
        t = int(self._clock()) if when is None else int(when)
        return f"{_VERSION}:{t}:{self._mac(_method_name(method), t)}"

    def check(self, method: str | bytes, value: str | bytes | None) -> str | None:
        """None if ``value`` authorizes a call of ``method`` now, else why not: "missing",
        "malformed", "expired" (outside the window) or "bad signature" (wrong secret, or
        a token made for another method)."""
        if value is None or value == "" or value == b"":
            return "missing"
        if isinstance(value, bytes):
            try:
                value = value.decode("ascii")
            except UnicodeDecodeError:
                return "malformed"
        parts = value.split(":")
        if len(parts) != 3 or parts[0] != _VERSION or not parts[1].isdigit() or len(parts[1]) > 12:
            return "malformed"
        when = int(parts[1])
        if abs(self._clock() - when) > WINDOW_S:
            return "expired"
        if not parts[2].isascii() or not hmac.compare_digest(self._mac(_method_name(method), when), parts[2]):
            return "bad signature"
        return None


def _metadata_value(metadata: Any) -> Any:
    for key, value in metadata or ():
        if key == METADATA_KEY:
            return value
    return None


class Rejections:
    """Counts refused calls by reason; logs the first of each reason, then every 100th."""

    def __init__(self, server_name: str) -> None:
        self.server_name = server_name
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def record(self, method: str, reason: str, peer: str) -> None:
        with self._lock:
            self.counts[reason] += 1
            n = self.counts[reason]
        if n == 1 or n % 100 == 0:
            log.warning("%s refused %s from %s: %s token (%d so far for this reason)",
                        self.server_name, method, peer, reason, n)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())


def _denied_message(reason: str) -> str:
    return f"pdserve internal call refused: {reason} {METADATA_KEY} token (is the cluster secret the same?)"


# ------------------------------------------------------------------------ servers


def _same_kind(handler: grpc.RpcMethodHandler, behavior: Callable) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s streaming kind that runs ``behavior`` (which aborts)."""
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behavior, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behavior, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behavior, **kw)
    return grpc.unary_unary_rpc_method_handler(behavior, **kw)


class ServerAuth(grpc.ServerInterceptor):
    """Sync-server interceptor: refuses calls without a valid token (UNAUTHENTICATED)."""

    def __init__(self, secret: bytes, server_name: str = "server", clock: Callable[[], float] = time.time) -> None:
        self.auth = ClusterAuth(secret, clock)
        self.rejections = Rejections(server_name)

    def intercept_service(self, continuation, handler_call_details):
        method = _method_name(handler_call_details.method)
        handler = continuation(handler_call_details)
        if handler is None or method in OPEN_METHODS:
            return handler
        reason = self.auth.check(method, _metadata_value(handler_call_details.invocation_metadata))
        if reason is None:
            return handler

        def deny(request, context):
            self.rejections.record(method, reason, context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, _denied_message(reason))

        return _same_kind(handler, deny)


class AioServerAuth(grpc.aio.ServerInterceptor):
    """grpc.aio-server interceptor: refuses calls without a valid token (UNAUTHENTICATED).

    Put it first in the server's interceptors, so a refused call reaches nothing else
    (not the drain's in-flight count). An accepted call gets its own handler back
    unwrapped: no cost per streamed message.
    """

    def __init__(self, secret: bytes, server_name: str = "server", clock: Callable[[], float] = time.time) -> None:
        self.auth = ClusterAuth(secret, clock)
        self.rejections = Rejections(server_name)

    async def intercept_service(self, continuation, handler_call_details):
        method = _method_name(handler_call_details.method)
        handler = await continuation(handler_call_details)
        if handler is None or method in OPEN_METHODS:
            return handler
        reason = self.auth.check(method, _metadata_value(handler_call_details.invocation_metadata))
        if reason is None:
            return handler

        async def deny(request, context):
            self.rejections.record(method, reason, context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, _denied_message(reason))

        return _same_kind(handler, deny)


def server_interceptors(secret: bytes | None, server_name: str, aio: bool = True) -> list:
    """``[the auth interceptor]`` for a server with a secret, ``[]`` without one."""
    if secret is None:
        return []
    return [AioServerAuth(secret, server_name) if aio else ServerAuth(secret, server_name)]


# ------------------------------------------------------------------------ clients


class _CallDetails(grpc.ClientCallDetails):
    """A ``grpc.ClientCallDetails`` with our token added to its metadata."""

    def __init__(self, details: Any, metadata: list) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class _ClientAuth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, auth: ClusterAuth) -> None:
        self.auth = auth

    def _details(self, details):
        md = [*(details.metadata or ()), (METADATA_KEY, self.auth.token(details.method))]
        return _CallDetails(details, md)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class _AioSigner:
    def __init__(self, auth: ClusterAuth) -> None:
        self.auth = auth

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        md = grpc.aio.Metadata(*tuple(details.metadata or ()), (METADATA_KEY, self.auth.token(details.method)))
        return details._replace(metadata=md)


# NOTE: one class per call kind: a grpc.aio channel files each interceptor under the
# first kind it is an instance of only.
class _AioUnaryUnary(_AioSigner, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioUnaryStream(_AioSigner, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioStreamUnary(_AioSigner, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _AioStreamStream(_AioSigner, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def insecure_channel(address: str, secret: bytes | None, options: list | None = None) -> grpc.Channel:
    """A plaintext sync channel whose calls carry tokens for ``secret`` (none when None)."""
    channel = grpc.insecure_channel(address, options=options)
    if secret is None:
        return channel
    return grpc.intercept_channel(channel, _ClientAuth(ClusterAuth(secret)))


def aio_insecure_channel(address: str, secret: bytes | None, options: list | None = None) -> grpc.aio.Channel:
    """A plaintext grpc.aio channel whose calls carry tokens for ``secret`` (none when None)."""
    if secret is None:
        return grpc.aio.insecure_channel(address, options=options)
    a = ClusterAuth(secret)
    interceptors = [_AioUnaryUnary(a), _AioUnaryStream(a), _AioStreamUnary(a), _AioStreamStream(a)]
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


__all__ = [
    "AioServerAuth", "ClusterAuth", "METADATA_KEY", "OPEN_METHODS", "Rejections", "SECRET_ENV", "SECRET_FILE_ENV",
    "ServerAuth", "WINDOW_S", "aio_insecure_channel", "generate_secret", "insecure_channel",
    "is_loopback", "load_secret", "read_secret_file", "require_secret_beyond_loopback",
    "server_interceptors", "write_secret_file",
]
