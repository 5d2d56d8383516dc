"""torch.distributed backend: two-sided gloo send/recv over per-pair process groups.

No global ``init_process_group`` and no Ray: every agent runs its own ``TCPStore``
server (its address is in ``metadata()``). The first ``write`` to a peer opens a
one-directional connection to it:

1. the writer connects a store client to the peer's store, takes a connection id
   (``add("pdkv/nconn", 1)``) and announces itself under ``pdkv/conn/<id>``;
2. the peer's accept thread sees the announcement and both sides construct a
   2-rank ``ProcessGroupGloo`` on ``PrefixStore("pdkv/pg/<id>", store)``
   (writer rank 0, receiver rank 1), pinned to the agents' host addresses.

Per transfer (in order, on the connection's own thread on each side) the writer
puts a header under ``pdkv/c<id>/h/<seq>`` (transfer id, notify bytes, byte count,
destination ``(offset, length)`` list), gathers the source bytes into a staging
buffer (or sends a single descriptor straight from the region) and ``send``s
them; the receiver, blocked in ``store.wait`` on that key, ``recv``s into a
staging buffer and then, under the agent lock, admits the transfer (a live
expectation from that peer with that id and exactly those destination bytes,
base invariant 6), scatters it into its region and completes the expectation,
or refuses it and copies nothing; it acknowledges under ``pdkv/c<id>/a/<seq>``
(empty, or the refusal). The writer's transfer is DONE when an empty
acknowledgement arrives, so DONE means the bytes are in the peer's region and
admitted. The receiver decides what lands, so a cancelled expectation receives
nothing more (``RECEIVER_CONTROLS_WRITES``).

Every blocking step of the writer is bounded by the transfer's deadline; a
failure or a timeout drops the connection (the next write opens a new one).
The receiver's ``recv`` is bounded by ``io_timeout_s``. CUDA regions are staged
through host memory (gloo moves CPU tensors); NCCL is not used.

Listening: the agent's ``TCPStore`` and gloo's pair sockets bind ``host`` (the worker's
advertised address, ``$PDSERVE_KV_HOST``, default 127.0.0.1), not every interface:
torch's own TCPStore server would bind all of them, so the agent binds the socket itself
and hands it over (``master_listen_fd``). Neither is authenticated (docs/security.md).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import struct
import threading
import time
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .base import (DONE, KVTransferAgent, PeerInfo, TransferHandle, TransferStatus,
                   check_bounds, failed)
from .frames import Frame, coverage_digest
from .layout import KVRegionLayout

log = logging.getLogger(__name__)

_STOP = b"\x00STOP"
_REFUSED = b"refused: "
_HDR = struct.Struct("<4sHIQI")  # magic, tid length, message length, bytes, descriptors
_HDR_MAGIC = b"PDKH"
_FOREVER = timedelta(days=30)


def _td(seconds: float) -> timedelta:
    return timedelta(seconds=max(float(seconds), 0.001))


def _make_pg(store: Any, rank: int, host: str, timeout_s: float) -> Any:
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = _td(timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(store, rank, 2, opts)


def _listen(host: str) -> socket.socket:
    """A listening TCP socket on ``host`` (any free port), for the agent's TCPStore."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _encode_header(tid: str, nbytes: int, message: bytes, descs: np.ndarray) -> bytes:
    t = tid.encode()
    dd = np.ascontiguousarray(descs[:, 1:3], dtype="<i8")
    return (_HDR.pack(_HDR_MAGIC, len(t), len(message), nbytes, len(dd)) + t + bytes(message)
            + dd.tobytes())


def _decode_header(raw: bytes) -> tuple[str, int, bytes, np.ndarray]:
    magic, nt, nm, nbytes, nd = _HDR.unpack_from(raw)
    if magic != _HDR_MAGIC:
        raise ValueError("bad transfer header")
    p = _HDR.size
    tid = raw[p:p + nt].decode()
    p += nt
    message = raw[p:p + nm]
    p += nm
    dd = np.frombuffer(raw, dtype="<i8", count=2 * nd, offset=p).reshape(nd, 2).astype(np.int64)
    return tid, nbytes, message, dd


def _bytes_view(t: torch.Tensor) -> Any:
    """A 1-D uint8 tensor as a numpy array when on CPU (same memory), else itself.

    CPU copies go through numpy: a plain memcpy on the calling thread. torch's
    ``copy_`` splits copies over 32 KiB across its OpenMP pool, and on a small CPU box
    those threads then contend with the peer process's (measured: 64 KiB descriptor
    copies 10x slower once two processes do it)."""
    return t.numpy() if t.device.type == "cpu" else t


def _copy(dst: Any, src: Any) -> None:
    if isinstance(dst, np.ndarray) and isinstance(src, np.ndarray):
        np.copyto(dst, src)
    else:  # a CUDA region and a host staging buffer
        (dst if isinstance(dst, torch.Tensor) else torch.from_numpy(dst)).copy_(
            src if isinstance(src, torch.Tensor) else torch.from_numpy(src))


def _staging(buf: torch.Tensor | None, nbytes: int) -> torch.Tensor:
    if buf is None or buf.numel() < nbytes:
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)
    return buf


class _Job:
    __slots__ = ("handle", "descs", "header", "result", "cancelled", "is_sent", "is_refused")

    def __init__(self, handle: TransferHandle, descs: np.ndarray, header: bytes) -> None:
        self.handle = handle
        self.descs = descs
        self.header = header
        self.result: TransferStatus | None = None
        self.cancelled = False
        self.is_sent = False  # the header is out: the receiver may admit and copy it
        self.is_refused = False  # the receiver refused it: nothing was copied


class _OutConn:
    """Writer side of one connection to one peer: a queue and a thread."""

    def __init__(self, agent: "TorchDistAgent", peer: str, host: str, port: int) -> None:
        self.agent, self.peer, self.host, self.port = agent, peer, host, port
        self.q: queue.Queue[_Job | None] = queue.Queue()
        self.broken = False
        self.current: _Job | None = None
        self._buf: torch.Tensor | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"pdkv-out-{peer}")
        self.thread.start()

    def submit(self, job: _Job) -> None:
        self.q.put(job)

    def close(self) -> None:
        self.broken = True
        self.q.put(None)

    def _gather(self, descs: np.ndarray) -> torch.Tensor:
        flat = self.agent._flat
        total = int(descs[:, 2].sum())
        if len(descs) == 1 and flat.device.type == "cpu":
            s, _, n = (int(x) for x in descs[0])
            return flat[s:s + n]
        self._buf = _staging(self._buf, total)
        out, pos = self._buf[:total], 0
        dst, src = _bytes_view(out), _bytes_view(flat)
        for s, _, n in descs.tolist():
            _copy(dst[pos:pos + n], src[s:s + n])
            pos += n
        return out

    def _run(self) -> None:
        cli = pg = None
        cid = seq = 0
        try:
            while True:
                job = self.q.get()
                if job is None:
                    return
                if job.cancelled:
                    continue
                self.current = job
                deadline = job.handle.deadline

                def left() -> float:  # no step starts after the deadline or a cancel
                    r = deadline - time.monotonic()
                    if r <= 0 or job.cancelled:
                        raise TimeoutError("deadline passed" if r <= 0 else "cancelled")
                    return r

                if pg is None:
                    cli = dist.TCPStore(self.host, self.port, is_master=False, timeout=_td(left()))
                    cid = cli.add("pdkv/nconn", 1) - 1
                    cli.set(f"pdkv/conn/{cid}", self.agent.name)
                    pg = _make_pg(dist.PrefixStore(f"pdkv/pg/{cid}", cli), 0, self.agent.host, left())
                payload = self._gather(job.descs)
                left()
                job.is_sent = True
                cli.set(f"pdkv/c{cid}/h/{seq}", job.header)
                # the header is out: finish the exchange unless the deadline passes
                if payload.numel():
                    pg.send([payload], 1, 0).wait(_td(deadline - time.monotonic()))
                ack_key = f"pdkv/c{cid}/a/{seq}"
                cli.wait([ack_key], _td(deadline - time.monotonic()))
                ack = cli.get(ack_key)
                cli.delete_key(ack_key)
                seq += 1
                job.is_refused = ack.startswith(_REFUSED)
                job.result = DONE if not ack else failed(f"receiver {self.peer}: {ack.decode(errors='replace')}")
                self.current = None
        except Exception as e:  # connection unusable from here on
            self.broken = True
            msg = f"connection to {self.peer} failed: {type(e).__name__}: {e}"
            log.info("%s", msg)
            if self.current is not None and self.current.result is None:
                self.current.result = failed(msg)
            while True:
                try:
                    j = self.q.get_nowait()
                except queue.Empty:
                    break
                if j is not None and j.result is None:
                    j.result = failed(msg)
        finally:
            self.current = None
            pg = cli = None


class _InConn:
    """Receiver side of one connection from one peer."""

    def __init__(self, agent: "TorchDistAgent", cid: int, peer: str) -> None:
        self.agent, self.cid, self.peer = agent, cid, peer
        self.seq = 0
        self._buf: torch.Tensor | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"pdkv-in-{peer}")
        self.thread.start()

    def stop(self, store: Any) -> None:
        try:
            store.set(f"pdkv/c{self.cid}/h/{self.seq}", _STOP)
        except Exception:
            pass

    def _run(self) -> None:
        a = self.agent
        try:
            cli = dist.TCPStore(a.host, a.port, is_master=False, timeout=_FOREVER)
            pg = _make_pg(dist.PrefixStore(f"pdkv/pg/{self.cid}", cli), 1, a.host, a.io_timeout_s)
            while not a._stopping:
                key = f"pdkv/c{self.cid}/h/{self.seq}"
                cli.wait([key])
                raw = cli.get(key)
                cli.delete_key(key)
                if raw == _STOP:
                    return
                tid, nbytes, message, dd = _decode_header(raw)
                err = ""
                try:
                    if int(dd[:, 1].sum()) != nbytes:
                        raise ValueError("header byte count does not match its descriptors")
                    check_bounds(dd[:, 0], dd[:, 1], a.region_bytes, "local")
                except Exception as e:
                    err = f"bad transfer: {e}"
                self._buf = _staging(self._buf, nbytes)
                buf = self._buf[:nbytes]
                if nbytes:
                    pg.recv([buf], 0, 0).wait(_td(a.io_timeout_s))
                ack = a._land(self.peer, tid, nbytes, dd, buf, message, err)
                cli.set(f"pdkv/c{self.cid}/a/{self.seq}", ack)
                self.seq += 1
        except Exception as e:  # the writer died or the agent is closing
            if not a._stopping:
                log.info("KV connection %d from %s closed: %s: %s", self.cid, self.peer,
                         type(e).__name__, e)


class TorchDistAgent(KVTransferAgent):
    backend = "torch_dist"
    RECEIVER_CONTROLS_WRITES = True

    def __init__(self, name: str, region: Any, layout: KVRegionLayout, *, host: str | None = None,
                 default_timeout_s: float = 30.0, io_timeout_s: float = 30.0) -> None:
        super().__init__(name, region, layout, default_timeout_s=default_timeout_s)
        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this torch build")
        self.host = host or os.environ.get("PDSERVE_KV_HOST", "127.0.0.1")
        self.io_timeout_s = float(io_timeout_s)
        self._flat = region.view(-1).view(torch.uint8)
        listener = _listen(self.host)
        port = listener.getsockname()[1]
        self._store = dist.TCPStore(self.host, port, is_master=True, wait_for_workers=False,
                                    timeout=_td(self.io_timeout_s), master_listen_fd=listener.detach())
        self.port = int(self._store.port)
        self._stopping = False
        self._out: dict[str, _OutConn] = {}
        self._old_out: list[_OutConn] = []
        self._in: list[_InConn] = []
        self._jobs: dict[TransferHandle, tuple[_Job, _OutConn]] = {}
        self._accept = threading.Thread(target=self._accept_loop, daemon=True, name="pdkv-accept")
        self._accept.start()

    # ---- metadata / peers ---------------------------------------------------------
    def _metadata_fields(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port}

    def _add_peer_backend(self, info: PeerInfo, blob: bytes) -> None:
        pass  # connections open on the first write

    def _remove_peer_backend(self, name: str) -> None:
        conn = self._out.pop(name, None)
        if conn is not None:
            conn.close()
            self._old_out.append(conn)

    # ---- writes -------------------------------------------------------------------
    def _start_write(self, h: TransferHandle, descs: np.ndarray, done: Frame) -> None:
        conn = self._out.get(h.peer)
        if conn is None or conn.broken or not conn.thread.is_alive():
            if conn is not None:
                conn.close()
                self._old_out.append(conn)
            info = self._peers[h.peer].header
            conn = self._out[h.peer] = _OutConn(self, h.peer, str(info["host"]), int(info["port"]))
        job = _Job(h, descs, _encode_header(done.transfer_id, done.num_bytes, done.message, descs))
        self._jobs[h] = (job, conn)
        conn.submit(job)

    def _poll_write(self, h: TransferHandle) -> TransferStatus | None:
        entry = self._jobs.get(h)
        if entry is None:
            return failed("unknown transfer")
        job = entry[0]
        h.is_started = job.is_sent and not job.is_refused
        return job.result

    def _release_write(self, h: TransferHandle) -> None:
        entry = self._jobs.pop(h, None)
        if entry is None:
            return
        job, conn = entry
        if job.result is None:
            job.cancelled = True
            if conn.current is job:  # in flight: the stream's state is unknown now
                conn.broken = True

    def _backend_pending(self) -> int:
        self._old_out = [c for c in self._old_out if c.thread.is_alive()]
        return sum(1 for c in [*self._out.values(), *self._old_out]
                   if c.current is not None and c.current.cancelled)

    # ---- incoming -----------------------------------------------------------------
    def _accept_loop(self) -> None:
        try:
            cli = dist.TCPStore(self.host, self.port, is_master=False, timeout=_FOREVER)
            n = 0
            while not self._stopping:
                key = f"pdkv/conn/{n}"
                cli.wait([key])
                raw = cli.get(key)
                cli.delete_key(key)
                n += 1
                if raw == _STOP:
                    return
                peer = raw.decode()
                with self._lock:
                    if self._stopping:
                        return
                    for old in self._in:
                        if old.peer == peer and old.thread.is_alive():
                            old.stop(cli)  # the peer reconnected: its old stream is dead
                    self._in = [c for c in self._in if c.thread.is_alive()]
                    self._in.append(_InConn(self, n - 1, peer))
        except Exception as e:
            if not self._stopping:
                log.warning("KV accept loop of %s stopped: %s: %s", self.name, type(e).__name__, e)

    def _land(self, peer: str, tid: str, nbytes: int, dd: np.ndarray, buf: torch.Tensor, message: bytes,
              error: str) -> bytes:
        """Admit, copy and complete an incoming transfer in one hold of the lock (so a
        ``cancel`` either precedes it and nothing lands, or follows a completed one).
        Returns the acknowledgement: empty, or why it was refused."""
        with self._lock:
            if self._closed:
                return _REFUSED + b"agent closed"
            if error:
                return _REFUSED + self._refuse(peer, tid, error).encode()
            descs = np.zeros((len(dd), 3), dtype=np.int64)
            descs[:, 1:] = dd
            digest = coverage_digest(descs)
            why = self._admit(peer, tid, nbytes, digest)
            if why:
                return _REFUSED + why.encode()
            pos = 0
            dst, src = _bytes_view(self._flat), _bytes_view(buf)
            for off, n in dd.tolist():
                _copy(dst[off:off + n], src[pos:pos + n])
                pos += n
            self._complete_incoming(peer, tid, nbytes, digest, message)
        return b""

    def _close_backend(self) -> None:
        self._stopping = True
        for conn in [*self._out.values(), *self._old_out]:
            conn.close()
        try:
            for c in self._in:
                c.stop(self._store)
            n = self._store.add("pdkv/nconn", 1) - 1
            self._store.set(f"pdkv/conn/{n}", _STOP)
        except Exception:
            pass
        deadline = time.monotonic() + 2.0
        for t in [self._accept, *(c.thread for c in self._in),
                  *(c.thread for c in [*self._out.values(), *self._old_out])]:
            t.join(max(0.0, deadline - time.monotonic()))
        self._out.clear()
        self._old_out.clear()
        self._in.clear()
        self._jobs.clear()
        self._store = None
