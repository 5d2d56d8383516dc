"""Redis backend of the control-plane store: any number of stores, in any processes or
machines, on the same Redis server and namespace share one registry and one stream.

Keys (all carry the ``{namespace}`` hash tag, so they live in one Redis Cluster slot):

``{ns}:deadlines``  sorted set  worker_id -> expiry deadline (ms, Redis server clock)
``{ns}:workers``    hash        worker_id -> WorkerInfo bytes
``{ns}:compat``     hash        worker_id -> compatibility signature (base.compat_signature)
``{ns}:started``    hash        worker_id -> started_at_ms
``{ns}:kv:seq``     string      last assigned KV event sequence number (INCR)
``{ns}:kv:events``  stream      entry id ``<seq>-0``, fields ``w`` (worker id) and
                                ``e`` (KVEvent bytes without seq/worker_id); trimmed to
                                ``max_retained_events`` with exact MAXLEN
``{ns}:pool_targets`` string    PoolTargets bytes

Every operation is one Lua script, so it is atomic against all other clients: the
compatibility check and the registration, sequence assignment and append, and the reaping
of expired entries (each expired id is removed from the sorted set and gets its cleared
event in the same script, so exactly one cleared event is emitted however many clients
notice the expiry at once). Deadlines use Redis' ``TIME``, so client clocks never matter.
A sorted set of deadlines is used rather than per-key TTLs because a key that Redis
expires by itself vanishes silently: nobody could then emit its cleared event exactly once.

Credentials: a password in the URL (``redis://:PASSWORD@host``; discouraged on command
lines), else ``password=``, else ``$PDSERVE_REDIS_PASSWORD`` or the file
``$PDSERVE_REDIS_PASSWORD_FILE`` names (``pdserve.deploy.credentials.redis_password``);
an ACL user goes in the URL (``redis://USER@host``). TLS: ``rediss://``, with redis-py's
URL options, e.g. ``rediss://host:6380/0?ssl_ca_certs=/etc/pdserve/redis-ca.pem``.
Errors never echo the password.
"""

from __future__ import annotations

import functools
import threading

import redis
import redis.exceptions

from pdserve.proto import pdserve_pb2 as pb

from ..credentials import redact, redis_password
from .base import (
    DEFAULT_MAX_RETAINED_EVENTS,
    DEFAULT_READ_BATCH,
    ControlPlaneStore,
    IncompatibleWorkerError,
    KVEventBatch,
    StoreClosedError,
    StoreUnavailableError,
    check_compatible,
    cleared_event,
    compat_signature,
    event_payload,
    role_matches,
    validate_read,
    validate_ttl,
    validate_worker,
)

__all__ = ["RedisStore"]

# KEYS: 1 deadlines, 2 workers, 3 compat, 4 started, 5 seq, 6 stream
# ARGV: 1 stream MAXLEN, 2 cleared-event payload, 3.. per script
_PRELUDE = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function append(worker_id, payload)
  local seq = redis.call('INCR', KEYS[5])
  redis.call('XADD', KEYS[6], 'MAXLEN', ARGV[1], string.format('%d-0', seq), 'w', worker_id, 'e', payload)
  return seq
end
local function forget(id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
end
local function reap(now)
  local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
  for _, id in ipairs(dead) do
    redis.call('ZREM', KEYS[1], id)
    forget(id)
    append(id, ARGV[2])
  end
  return #dead
end
local function live(id)
  return redis.call('ZSCORE', KEYS[1], id) ~= false
end
local now = now_ms()
local reaped = reap(now)
"""

# ARGV: 3 worker_id, 4 info bytes, 5 signature, 6 started_at_ms, 7 ttl_ms
_REGISTER = _PRELUDE + r"""
local id = ARGV[3]
for _, other in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if other ~= id and redis.call('HGET', KEYS[3], other) ~= ARGV[5] then
    return {'incompatible', other, redis.call('HGET', KEYS[2], other) or ''}
  end
end
local restarted = 0
if live(id) and redis.call('HGET', KEYS[4], id) ~= ARGV[6] then
  append(id, ARGV[2])
  restarted = 1
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[7]), id)
redis.call('HSET', KEYS[2], id, ARGV[4])
redis.call('HSET', KEYS[3], id, ARGV[5])
redis.call('HSET', KEYS[4], id, ARGV[6])
return {'ok', restarted}
"""

# ARGV: 3 worker_id, 4 ttl_ms
_HEARTBEAT = _PRELUDE + r"""
if not live(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[4]), ARGV[3])
return 1
"""

# ARGV: 3 worker_id
_DEREGISTER = _PRELUDE + r"""
if redis.call('ZREM', KEYS[1], ARGV[3]) == 1 then
  forget(ARGV[3])
  append(ARGV[3], ARGV[2])
  return 1
end
return 0
"""

_LIST = _PRELUDE + r"""
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local info = redis.call('HGET', KEYS[2], id)
  if info then
    out[#out + 1] = id
    out[#out + 1] = info
  end
end
return out
"""

# ARGV: 3 worker_id
_GET = _PRELUDE + r"""
if not live(ARGV[3]) then return false end
return redis.call('HGET', KEYS[2], ARGV[3])
"""

_REAP = _PRELUDE + r"""
return reaped
"""

# ARGV: 3 worker_id, 4.. payloads
_PUBLISH = _PRELUDE + r"""
local last = tonumber(redis.call('GET', KEYS[5]) or '0')
for i = 4, #ARGV do
  last = append(ARGV[3], ARGV[i])
end
return last
"""

# ARGV: 3 first stream id to return, 4 count
_READ = _PRELUDE + r"""
local last = tonumber(redis.call('GET', KEYS[5]) or '0')
local oldest = redis.call('XRANGE', KEYS[6], '-', '+', 'COUNT', 1)
local first = ''
if #oldest > 0 then first = oldest[1][1] end
local events = redis.call('XRANGE', KEYS[6], ARGV[3], '+', 'COUNT', ARGV[4])
return {last, first, events}
"""


def _wrap_errors(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if self._closed:
            raise StoreClosedError("RedisStore is closed")
        try:
            return fn(self, *args, **kwargs)
        except redis.exceptions.AuthenticationError as e:
            raise StoreUnavailableError(
                f"redis at {self._url_for_errors} refused our credentials ({e}): set $PDSERVE_REDIS_PASSWORD_FILE "
                f"(or $PDSERVE_REDIS_PASSWORD) to its requirepass"
            ) from e
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise StoreUnavailableError(f"redis at {self._url_for_errors} unreachable: {e}") from e

    return wrapper


class RedisStore(ControlPlaneStore):
    """:class:`ControlPlaneStore` in Redis (>= 6.2; streams, Lua, ``TIME`` in scripts).

    ``url`` is a redis-py URL (``redis://host:port/db``, ``rediss://``, ``unix://``);
    ``password`` when the URL has none (default: the environment's, see the module
    docstring). Stores sharing a server share state per ``namespace``. ``max_retained_events``
    bounds the KV stream; every store on one namespace should use the same value (each
    trims to its own on append).
    """

    def __init__(
        self,
        url: str,
        namespace: str = "pdserve",
        max_retained_events: int = DEFAULT_MAX_RETAINED_EVENTS,
        socket_timeout_s: float = 5.0,
        password: str | None = None,
    ):
        if not namespace or any(c in namespace for c in "{}"):
            raise ValueError(f"namespace must be non-empty without braces, got {namespace!r}")
        if max_retained_events < 1:
            raise ValueError("max_retained_events must be >= 1")
        self.namespace = namespace
        self._maxlen = int(max_retained_events)
        self._url_for_errors = redact(url)  # never echo credentials
        self._closed = False
        self._close_lock = threading.Lock()
        extra = {}
        password = redis_password(url, password)
        if password is not None:
            extra["password"] = password
        self._redis = redis.Redis.from_url(
            url,
            **extra,
            decode_responses=False,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            health_check_interval=30,
        )
        tag = "{" + namespace + "}"
        self._keys = [
            f"{tag}:deadlines",
            f"{tag}:workers",
            f"{tag}:compat",
            f"{tag}:started",
            f"{tag}:kv:seq",
            f"{tag}:kv:events",
        ]
        self._pool_key = f"{tag}:pool_targets"
        self._cleared = event_payload(cleared_event(""))
        s = self._redis.register_script
        self._s_register = s(_REGISTER)
        self._s_heartbeat = s(_HEARTBEAT)
        self._s_deregister = s(_DEREGISTER)
        self._s_list = s(_LIST)
        self._s_get = s(_GET)
        self._s_reap = s(_REAP)
        self._s_publish = s(_PUBLISH)
        self._s_read = s(_READ)

    def _run(self, script, *args):
        return script(keys=self._keys, args=[self._maxlen, self._cleared, *args])

    @staticmethod
    def _ttl_ms(ttl_s: float) -> int:
        validate_ttl(ttl_s)
        return max(1, int(round(ttl_s * 1000)))

    # -- registry --------------------------------------------------------------------

    @_wrap_errors
    def register(self, worker: pb.WorkerInfo, ttl_s: float) -> None:
        validate_worker(worker, ttl_s)
        res = self._run(
            self._s_register,
            worker.worker_id,
            worker.SerializeToString(),
            compat_signature(worker),
            str(int(worker.started_at_ms)),
            self._ttl_ms(ttl_s),
        )
        if res[0] == b"incompatible":
            other_id = res[1].decode()
            if res[2]:
                check_compatible(worker, [pb.WorkerInfo.FromString(res[2])])  # raises with the diff
            raise IncompatibleWorkerError(
                f"worker {worker.worker_id!r} is incompatible with registered worker {other_id!r}"
            )

    @_wrap_errors
    def heartbeat(self, worker_id: str, ttl_s: float) -> bool:
        ttl_ms = self._ttl_ms(ttl_s)
        if not worker_id:
            return False
        return bool(self._run(self._s_heartbeat, worker_id, ttl_ms))

    @_wrap_errors
    def deregister(self, worker_id: str) -> None:
        if worker_id:
            self._run(self._s_deregister, worker_id)

    @_wrap_errors
    def list_workers(self, role: int | None = None) -> list[pb.WorkerInfo]:
        flat = self._run(self._s_list)
        out = []
        for i in range(0, len(flat), 2):
            info = pb.WorkerInfo.FromString(flat[i + 1])
            if role_matches(info.role, role):
                out.append(info)
        out.sort(key=lambda w: w.worker_id)
        return out

    @_wrap_errors
    def get_worker(self, worker_id: str) -> pb.WorkerInfo | None:
        if not worker_id:
            return None
        raw = self._run(self._s_get, worker_id)
        return None if raw is None else pb.WorkerInfo.FromString(raw)

    @_wrap_errors
    def reap_expired(self) -> int:
        return int(self._run(self._s_reap))

    # -- KV events -------------------------------------------------------------------

    @_wrap_errors
    def publish_kv_events(self, worker_id: str, events: list[pb.KVEvent]) -> int:
        if not worker_id:
            raise ValueError("worker_id must be set")
        payloads = [event_payload(ev) for ev in events]
        return int(self._run(self._s_publish, worker_id, *payloads))

    @_wrap_errors
    def read_kv_events(self, after_seq: int = 0, max_events: int = DEFAULT_READ_BATCH) -> KVEventBatch:
        validate_read(after_seq, max_events)
        last, first_id, entries = self._run(self._s_read, f"{after_seq + 1}-0", max_events)
        last = int(last)
        first = int(first_id.split(b"-")[0]) if first_id else last + 1
        events = []
        for entry_id, fields in entries:
            kv = dict(zip(fields[::2], fields[1::2]))
            ev = pb.KVEvent.FromString(kv[b"e"])
            ev.seq = int(entry_id.split(b"-")[0])
            ev.worker_id = kv[b"w"].decode()
            events.append(ev)
        return KVEventBatch(events, first, last)

    # -- pool targets ----------------------------------------------------------------

    @_wrap_errors
    def get_pool_targets(self) -> pb.PoolTargets | None:
        raw = self._redis.get(self._pool_key)
        return None if raw is None else pb.PoolTargets.FromString(raw)

    @_wrap_errors
    def set_pool_targets(self, targets: pb.PoolTargets) -> None:
        if not isinstance(targets, pb.PoolTargets):
            raise TypeError(f"targets must be pdserve.v1.PoolTargets, not {type(targets).__name__}")
        self._redis.set(self._pool_key, targets.SerializeToString())

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self._redis.close()
