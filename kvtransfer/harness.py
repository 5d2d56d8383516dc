"""Run KV transfer agents in child processes, driven over pipes (tests and benchmarks).

Each ``AgentProcess`` is a spawned process (no Ray, no global process group) that
can host several agents of any backend. The parent sends commands and gets
results back; metadata is exchanged through the parent, as a control-plane store
would do it. Test/benchmark helper only: commands travel pickled over a local
pipe, which never leaves this machine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback
from typing import Any


class HarnessError(RuntimeError):
    pass


def _child(conn: Any) -> None:
    import numpy as np
    import torch

    from . import create_agent
    from .layout import KVRegionLayout

    agents: dict[str, Any] = {}
    handles: dict[tuple[str, str, str], Any] = {}

    def create(backend, name, layout, seed, kwargs):
        lay = KVRegionLayout.from_dict(layout)
        region = torch.empty(lay.shape, dtype=getattr(torch, lay.dtype))
        fill(region, seed)
        agents[name] = create_agent(backend, name, region, lay, **(kwargs or {}))
        return agents[name].metadata()

    def fill(region, seed):
        g = torch.Generator().manual_seed(int(seed))
        flat = region.view(-1).view(torch.uint8)
        flat.copy_(torch.randint(0, 256, flat.shape, generator=g, dtype=torch.uint8))

    def write(name, tid, peer, descs, notify=b"", timeout_s=None):
        handles[(name, tid, "write")] = agents[name].write(tid, peer, descs, notify, timeout_s)

    def expect(name, tid, peer, descs, timeout_s=None):
        handles[(name, tid, "expect")] = agents[name].expect(tid, peer, descs, timeout_s)

    def expect_many(name, peer, descs, tids, timeout_s=None):
        """Expect several transfers of the same descriptors (benchmarks: one per write)."""
        for tid in tids:
            agents[name].expect(tid, peer, descs, timeout_s)

    def wait(name, keys):
        out = []
        for tid, direction in keys:
            h = handles.pop((name, tid, direction))
            t0 = time.monotonic()
            st = agents[name].wait(h)
            out.append((st.state.value, st.message, time.monotonic() - t0, h.latency_s))
        return out

    def region(name):
        return agents[name].region.view(-1).view(torch.uint8).numpy().tobytes()

    def notifications(name):
        return [(n.peer, n.message) for n in agents[name].take_notifications()]

    def refusals(name):
        return [tuple(r) for r in agents[name].take_refusals()]

    def cancel(name, tid, direction):
        """Cancel (revoke) a transfer; returns whether it had started (bytes may have moved)."""
        h = handles.pop((name, tid, direction))
        agents[name].cancel(h)
        return h.is_started

    def pending(name, settle_s=0.0):
        end = time.monotonic() + settle_s
        while True:  # backends may need a moment to let go of a dead connection
            agents[name].progress()
            n = agents[name].num_pending()
            if n == 0 or time.monotonic() >= end:
                return n
            time.sleep(0.01)

    def metrics(name):
        m = agents[name].metrics
        return {k: getattr(m, k) for k in ("writes_done", "writes_failed", "expects_done",
                                           "expects_failed", "bytes_written", "bytes_received",
                                           "descriptors_written", "refused")}

    def close(name):
        agents.pop(name).close()

    def bench_write(name, peer, descs, iters, interval_s=5e-5, tids=None):
        """Sequential writes, each waited for; returns per-transfer seconds. The receiver
        must expect each one first (``tids``: the transfer ids it expects, in order)."""
        a = agents[name]
        times = []
        for i in range(iters):
            t0 = time.perf_counter()
            h = a.write(tids[i] if tids else f"bench-{i}", peer, descs, b"")
            st = a.wait(h, interval_s=interval_s)
            times.append(time.perf_counter() - t0)
            if not st.done:
                raise HarnessError(f"bench transfer failed: {st.message}")
        return times

    def drain(name, seconds):
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            n += len(agents[name].take_notifications())
            time.sleep(0.001)
        return n

    def memcpy(nbytes, iters):
        """One torch copy of ``nbytes``, each time at a new place in a pool larger than
        the caches (so small sizes are not measured from cache)."""
        slots = max(1, min(iters, (512 << 20) // max(nbytes, 1)))
        slots = max(slots, min(iters, -(-(64 << 20) // max(nbytes, 1))))
        src = torch.randint(0, 256, (slots * nbytes,), dtype=torch.uint8)
        dst = torch.zeros_like(src)
        times = []
        for i in range(iters):
            k = (i % slots) * nbytes
            t0 = time.perf_counter()
            dst[k:k + nbytes].copy_(src[k:k + nbytes])
            times.append(time.perf_counter() - t0)
        return times

    def memcpy1(nbytes, iters):
        """memcpy(3) of ``nbytes`` on one thread (numpy), at a fresh place each time."""
        slots = max(1, min(iters, (512 << 20) // max(nbytes, 1)))
        slots = max(slots, min(iters, -(-(64 << 20) // max(nbytes, 1))))
        src = np.random.default_rng(0).integers(0, 256, slots * nbytes, dtype=np.uint8)
        dst = np.zeros_like(src)
        times = []
        for i in range(iters):
            k = (i % slots) * nbytes
            t0 = time.perf_counter()
            np.copyto(dst[k:k + nbytes], src[k:k + nbytes])
            times.append(time.perf_counter() - t0)
        return times

    def descs_memcpy(name, descs, iters):
        """Copy the same descriptors within this rank's own region (local reference)."""
        flat = agents[name].region.view(-1).view(torch.uint8)
        scratch = torch.empty_like(flat)
        rows = np.asarray(descs).tolist()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            for s, d, n in rows:
                scratch[d:d + n].copy_(flat[s:s + n])
            times.append(time.perf_counter() - t0)
        return times

    cmds = {f.__name__: f for f in (create, write, expect, expect_many, wait, region, notifications, refusals, cancel,
                                    pending, metrics, close, bench_write, drain, memcpy, memcpy1,
                                    descs_memcpy)}
    cmds["add_peer"] = lambda name, peer, md: agents[name].add_peer(peer, md)
    cmds["pid"] = os.getpid
    while True:
        try:
            cmd, args = conn.recv()
        except EOFError:
            break
        if cmd == "exit":
            break
        try:
            conn.send(("ok", cmds[cmd](*args)))
        except Exception as e:
            conn.send(("err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    for a in agents.values():
        try:
            a.close()
        except Exception:
            pass


class AgentProcess:
    """One spawned child process hosting agents; ``call`` runs a command there."""

    def __init__(self, ctx: Any = None) -> None:
        ctx = ctx or mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def send(self, cmd: str, *args: Any) -> None:
        self._conn.send((cmd, args))

    def result(self, timeout_s: float = 60.0) -> Any:
        if not self._conn.poll(timeout_s):
            raise HarnessError(f"no answer from pid {self.pid} in {timeout_s}s")
        status, value = self._conn.recv()
        if status != "ok":
            raise HarnessError(value)
        return value

    def call(self, cmd: str, *args: Any, timeout_s: float = 60.0) -> Any:
        self.send(cmd, *args)
        return self.result(timeout_s)

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.join(10)

    def stop(self) -> None:
        """Freeze the process (it stops answering but keeps its sockets open)."""
        os.kill(self.pid, signal.SIGSTOP)
        end = time.monotonic() + 5.0
        while time.monotonic() < end:  # signals are asynchronous: wait until it is stopped
            try:
                with open(f"/proc/{self.pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                        return
            except OSError:
                return
            time.sleep(0.001)

    def shutdown(self) -> None:
        if self.proc.is_alive():
            try:
                self._conn.send(("exit", ()))
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(5)
        self.kill()
