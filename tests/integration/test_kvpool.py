"""The KV pool against a real ``mooncake_master`` on loopback, with two clients in two
processes (workers are processes; each client here is one, as in a deployment).

Lifecycle narrated by the tests: a master starts; client A puts blocks; client B reads
them byte-identical; misses (absent key, wrong-size buffer) are ``False``; the master is
SIGKILLed and every call raises ``KVPoolUnavailable`` quickly; a master restarted on the
same port is used again; nothing is left running at the end.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import platform
import sys
import time

import pytest

from pdserve.kvtransfer.kvpool import KVPoolClient, KVPoolConfig, KVPoolUnavailable

pytestmark = pytest.mark.integration

if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
    pytest.skip("mooncake-transfer-engine-non-cuda ships Linux x86_64/aarch64 wheels only", allow_module_level=True)
try:  # installed by `make setup` (the kvpool extra, Debian's libibverbs1): missing is a failure, not a skip
    import mooncake.store  # noqa: F401
except ImportError as e:
    pytest.fail(f"Mooncake is not importable ({e}): run `make setup` (pip install '.[kvpool]', apt-get install "
                "libibverbs1)", pytrace=False)

from pdserve.deploy.kvpool import MasterProcess  # noqa: E402

ARENA_BYTES = 4 << 20
SEGMENT_BYTES = 32 << 20


def _peer(conn, config: KVPoolConfig) -> None:
    """One pool client in its own process, driven over a pipe: ``(op, args)`` in,
    ``("ok", result)`` or ``("error", exception class name, message)`` out."""
    import numpy as np

    logging.basicConfig(level=logging.WARNING)
    client = KVPoolClient(config)
    arena = np.zeros(ARENA_BYTES, dtype=np.uint8)
    client.register(arena)

    def views(sizes):
        offsets = np.cumsum([0, *sizes])
        return [arena[o:o + n] for o, n in zip(offsets, sizes)]

    conn.send(("ok", os.getpid()))
    while True:
        op, args = conn.recv()
        try:
            if op == "put":
                keys, payloads = args
                bufs = views([len(p) for p in payloads])
                for b, p in zip(bufs, payloads):
                    b[:] = np.frombuffer(p, dtype=np.uint8)
                result = client.put_blocks(keys, bufs)
            elif op == "get":
                keys, sizes = args
                bufs = views(sizes)
                for b in bufs:
                    b[:] = 0xAB  # a sentinel, so a hit that copied nothing cannot pass
                hits = client.get_blocks(keys, bufs)
                result = (hits, [b.tobytes() if h else None for b, h in zip(bufs, hits)])
            elif op == "exists":
                result = client.exists(args)
            elif op == "counters":
                result = (client.library_calls, client.is_available)
            elif op == "close":
                client.close()
                conn.send(("ok", None))
                return
            else:
                raise ValueError(f"unknown op {op!r}")
            conn.send(("ok", result))
        except Exception as e:  # noqa: BLE001 - sent back to the test, which asserts on it
            conn.send(("error", type(e).__name__, str(e)))


class Peer:
    """The test's side of ``_peer``; ``call`` returns its result or re-raises by class name."""

    def __init__(self, config: KVPoolConfig) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_peer, args=(child, config), daemon=True)
        self.proc.start()
        child.close()
        self.pid = self._reply(30.0)

    def call(self, op: str, args=None, timeout_s: float = 15.0):
        self.conn.send((op, args))
        return self._reply(timeout_s)

    def _reply(self, timeout_s: float):
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"pool client process gave no answer within {timeout_s} s")
        reply = self.conn.recv()
        if reply[0] == "ok":
            return reply[1]
        raise {"KVPoolUnavailable": KVPoolUnavailable, "ValueError": ValueError}.get(reply[1], RuntimeError)(reply[2])

    def close(self) -> None:
        """Leave the pool if it answers in time, else SIGKILL (a dead master makes the
        library's unmount retry for ~15 s); the process is gone afterwards either way."""
        if self.proc.is_alive():
            try:
                self.call("close", timeout_s=5.0)
            except (TimeoutError, OSError, EOFError):
                pass
            self.proc.join(2.0)
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5.0)
        assert not self.proc.is_alive()


@pytest.fixture
def master():
    m = MasterProcess().start()
    yield m
    m.stop()
    assert m.proc.poll() is not None, "the master outlived its test"


@pytest.fixture
def peers(master):
    config = KVPoolConfig(master_address=master.address, segment_size=SEGMENT_BYTES, retry_interval_s=1.0,
                          connect_timeout_s=0.5)
    made = []
    yield lambda: made.append(Peer(config)) or made[-1]
    for p in made:
        p.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_blocks_written_by_one_worker_are_read_by_another(master, peers):
    a, b = peers(), peers()
    rng = __import__("random").Random(16)
    sizes = [4096, 12345, 1 << 20, 1]
    keys = [f"tiny-llama/v1/layer,block,kv,head,token,dim/tp0/{rng.getrandbits(64):016x}" for _ in sizes]
    payloads = [rng.randbytes(n) for n in sizes]

    assert a.call("put", (keys, payloads)) == [True] * len(keys)
    assert a.call("put", (keys[:1], payloads[:1])) == [True]  # already there: content-addressed, fine

    hits, data = b.call("get", (keys, sizes))
    assert hits == [True] * len(keys)
    assert data == payloads  # byte-identical, across processes
    assert b.call("exists", keys + ["absent"]) == [True] * len(keys) + [False]

    # Misses are False, never exceptions: an absent key, a smaller and a larger buffer.
    hits, data = b.call("get", (["absent", keys[0], keys[0]], [4096, 4095, 4097]))
    assert hits == [False, False, False] and data == [None, None, None]
    # The rest of the batch is unaffected by its misses.
    hits, data = b.call("get", ([keys[1], "absent"], [sizes[1], 16]))
    assert hits == [True, False] and data[0] == payloads[1]

    # Bounded sizes are the caller's error, caught before the library sees them.
    with pytest.raises(ValueError, match="max_block_bytes"):
        b.call("get", ([keys[0]], [0]))
    with pytest.raises(ValueError, match="duplicate"):
        a.call("put", ([keys[0], keys[0]], payloads[:1] * 2))


def test_master_crash_fails_fast_and_a_restarted_master_is_used_again(master, peers):
    a, b = peers(), peers()
    key, payload = "m/crash/tp0/0001", os.urandom(8192)
    assert a.call("put", ([key], [payload])) == [True]

    master.kill()  # SIGKILL: a crash, no goodbye to the clients
    # The call that finds the master gone raises (after the library's own RPC timeout,
    # seconds); every later call raises without reaching the library: while
    # retry_interval_s runs, and after it, because the reachability probe fails first.
    for client in (b, a):
        calls, available = client.call("counters")
        assert available
        with pytest.raises(KVPoolUnavailable, match="unavailable"):
            client.call("exists", [key])
        assert client.call("counters") == (calls + 1, False)
        for op, args in (("get", ([key], [8192])), ("put", (["m/crash/tp0/0002"], [payload]))):
            with pytest.raises(KVPoolUnavailable, match="unavailable"):
                client.call(op, args)
        assert client.call("counters")[0] == calls + 1, "a call waited on the dead master again"

    # Same ports, new (empty) master: after retry_interval_s the clients use it again, and
    # once they have re-mounted their segments (the library does, within seconds) puts land.
    restarted = MasterProcess(rpc_port=master.rpc_port, metrics_port=master.metrics_port).start()
    try:
        def until_ok(client, op, args, want):
            """Each client reconnects on its own schedule (the library's, seconds)."""
            t0 = time.monotonic()
            while True:
                try:
                    got = client.call(op, args)
                except KVPoolUnavailable:
                    got = None
                if got == want:
                    return time.monotonic() - t0
                assert time.monotonic() - t0 < 30.0, f"a client never came back to the restarted master ({got})"
                time.sleep(0.5)

        took = until_ok(b, "put", (["m/crash/tp0/0003"], [payload]), [True])
        print(f"pool usable again {took:.1f} s after the master restarted")
        until_ok(a, "exists", [key, "m/crash/tp0/0003"], [False, True])  # the old index died with the master
        hits, data = a.call("get", (["m/crash/tp0/0003"], [8192]))
        assert hits == [True] and data == [payload]
        a.close()  # leave while the master is up: ~1 s (against a dead one the library retries ~15 s)
        b.close()
    finally:
        restarted.stop()


def test_cleanup_leaves_no_process_behind(master, peers):
    a = peers()
    pids = [a.pid, master.proc.pid]
    a.close()
    master.stop()
    assert not any(_alive(pid) for pid in pids)


def test_no_master_is_unavailable_at_once():
    config = KVPoolConfig(master_address="127.0.0.1:9", connect_timeout_s=0.5)  # discard port: nothing listens
    # "not reachable" comes from the TCP probe, before the library (whose setup retries
    # take seconds per attempt) is ever called.
    with pytest.raises(KVPoolUnavailable, match="not reachable"):
        KVPoolClient(config)


def test_master_binary_missing_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot run mooncake_master .*pdserve\\[kvpool\\]"):
        MasterProcess(binary=str(tmp_path / "nothing-here")).start()
