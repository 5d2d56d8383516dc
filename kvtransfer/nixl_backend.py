"""NIXL backend: one-sided RDMA-style WRITE with a completion notification.

Works on CPU-only machines with the ``nixl-cu12`` wheel (UCX over shared memory /
TCP loopback; no CUDA library needed at run time) and moves VRAM on GPU hosts
with the same code (the region is registered as VRAM when it is a CUDA tensor).

* The whole region is registered once at construction.
* ``metadata()`` = our JSON header (region address, memory type, device, layout)
  + NIXL's agent metadata blob (``get_agent_metadata``), which carries the UCX
  worker address and the registration keys.
* ``write`` first *claims* the transfer: a CLAIM notification (transfer id, byte
  count, coverage digest of the destination; ``frames``) to the target, whose agent
  answers GRANT only for a live expectation from this agent with that id and those
  destination bytes, once (base invariant 6), else REFUSE. On GRANT it builds one
  NIXL descriptor per plan descriptor and posts one WRITE with a DONE frame as its
  notification, which NIXL delivers after the data; on REFUSE it posts nothing and
  FAILS (``is_started`` False). ``expect`` registers what may be granted; the
  expectation completes on the DONE frame of a granted write.
* What the target cannot do: stop a WRITE. Any process holding the target's
  metadata (published in the control-plane store) can write into its registered
  region without claiming, and NIXL delivers writes and notifications even from
  agents whose metadata the target never loaded (tests/unit/test_kvtransfer_agents.py). The claim keeps
  compliant writers (ours) out of blocks that are not offered to them; a
  non-compliant one is refused on completion (never used), but its bytes land.
* Each agent runs a small pump thread that drains notifications (claims, grants,
  completions): every ``pump_interval_s`` (500 us) while an expectation is pending,
  every 50 us while one of its own claims awaits its answer (a round trip at most),
  every 20 ms otherwise, and at once after ``expect`` or a claim; so a claim is
  answered without waiting for a caller's poll and a granted write is posted at once.
  The claim costs about 0.4-1 ms per write on the 2-vCPU CPU box (1 MiB between two
  processes, loaded machine: 0.5-0.8 ms -> 0.9-2.0 ms median); the pump about 2% of
  a core per agent while expectations are pending.
* A dead peer fails ``write`` at once (NIXL_ERR_REMOTE_DISCONNECT); a peer that
  never progresses leaves the transfer in flight until its deadline, when it is
  released (NIXL cancels it) and reported FAILED.
* Progress: with UCX over TCP/shared memory the TARGET must progress too, so an
  agent runs NIXL's progress thread (without it, writes into an agent stall until
  that agent calls into NIXL). NIXL's Python wrapper makes that thread spin (a full
  core per agent); ``progress_delay_us`` (default 100) makes it wait between rounds
  instead (~2% of a core idle, and faster on a small CPU box).
* No UCX environment variables are needed on a CPU-only host (UCX picks
  shared memory / TCP loopback itself). Do not restrict ``UCX_TLS`` to shared
  memory only: NIXL's UCX backend needs a transport with peer-failure handling
  (TCP), e.g. ``UCX_TLS=sm,self`` fails at agent creation.
* Listening: UCX's TCP transport listens on every interface it uses, and by default
  it uses all of them. Unless ``UCX_NET_DEVICES`` is set already, the agent sets it to
  the interface holding its host (``$PDSERVE_KV_HOST``, the worker's advertised address;
  default 127.0.0.1, so ``lo``) plus every RDMA port (which opens no TCP listener), so
  it listens there only (:func:`ucx_net_devices`). NIXL's own metadata listener thread
  stays off: metadata goes through the control-plane store. Nothing here is
  authenticated (docs/security.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib
import ipaddress
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .base import (DONE, KVTransferAgent, Notification, PeerInfo, TransferHandle,
                   TransferStatus, failed)
from .frames import Frame, FrameKind, pack_frame, unpack_frame
from .layout import KVRegionLayout

_MODULES = ("nixl._api", "nixl_cu12._api", "nixl_cu13._api")
log = logging.getLogger(__name__)


def import_nixl() -> Any:
    """The ``nixl._api`` module of whichever NIXL wheel is installed."""
    errors = []
    for mod in _MODULES:
        try:
            return importlib.import_module(mod)
        except ImportError as e:  # not installed, or no usable build
            errors.append(f"{mod}: {e}")
    raise ImportError("NIXL is not available (pip install nixl-cu12): " + "; ".join(errors))


def nixl_available() -> bool:
    try:
        import_nixl()
        return True
    except ImportError:
        return False


class _Sockaddr(ctypes.Structure):
    _fields_ = [("sa_family", ctypes.c_ushort), ("sa_data", ctypes.c_ubyte * 14)]


class _Ifaddrs(ctypes.Structure):
    pass


_Ifaddrs._fields_ = [("ifa_next", ctypes.POINTER(_Ifaddrs)), ("ifa_name", ctypes.c_char_p),
                     ("ifa_flags", ctypes.c_uint), ("ifa_addr", ctypes.POINTER(_Sockaddr)),
                     ("ifa_netmask", ctypes.POINTER(_Sockaddr))]


def _ip_of(sa: Any) -> str | None:
    if not sa:
        return None
    family = sa.contents.sa_family
    raw = ctypes.string_at(ctypes.addressof(sa.contents), 28 if family == socket.AF_INET6 else 16)
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8])
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24])
    return None


def interface_addresses() -> list[tuple[str, ipaddress.IPv4Interface | ipaddress.IPv6Interface]]:
    """(interface name, address/netmask) of every IP address of this host (getifaddrs)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    head = ctypes.POINTER(_Ifaddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        raise OSError(ctypes.get_errno(), "getifaddrs failed")
    out = []
    try:
        node = head
        while node:
            ifa = node.contents
            ip, mask = _ip_of(ifa.ifa_addr), _ip_of(ifa.ifa_netmask)
            if ip is not None and mask is not None:
                prefix = bin(int(ipaddress.ip_address(mask))).count("1")
                out.append((ifa.ifa_name.decode(), ipaddress.ip_interface(f"{ip}/{prefix}")))
            node = ifa.ifa_next
    finally:
        libc.freeifaddrs(head)
    return out


def ucx_net_devices(host: str) -> str | None:
    """``UCX_NET_DEVICES`` for an agent reachable at ``host``: the interface holding that
    address (a loopback address: the loopback interface), plus every RDMA port
    (``mlx5_0:1``: no TCP listener). None when no interface holds it (e.g. ``0.0.0.0``)."""
    try:
        ip = ipaddress.ip_address(socket.getaddrinfo(host, None)[0][4][0].split("%")[0])
        addresses = interface_addresses()
    except (OSError, ValueError):
        return None
    names = [name for name, iface in addresses if iface.ip == ip]
    if not names and ip.is_loopback:
        names = [name for name, iface in addresses if ip in iface.network]
    if not names or ip.is_unspecified:
        return None
    rdma = sorted(f"{dev.name}:{port.name}" for dev in Path("/sys/class/infiniband").glob("*")
                  for port in (dev / "ports").glob("*"))
    return ",".join([names[0], *rdma])


@contextlib.contextmanager
def _ucx_bound_to_host():
    """While an agent is created: ``UCX_NET_DEVICES`` (unless set) from ``$PDSERVE_KV_HOST``
    (see the module docstring). UCX reads it when the agent's context is created; it is
    restored after, so nothing else in the process (or its children) inherits it."""
    if os.environ.get("UCX_NET_DEVICES"):
        yield
        return
    host = os.environ.get("PDSERVE_KV_HOST", "127.0.0.1")
    devices = ucx_net_devices(host)
    if devices is None:
        log.warning("no interface holds %s; UCX will listen on every interface (set UCX_NET_DEVICES)", host)
        yield
        return
    old = os.environ.get("UCX_NET_DEVICES")
    os.environ["UCX_NET_DEVICES"] = devices
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("UCX_NET_DEVICES", None)
        else:
            os.environ["UCX_NET_DEVICES"] = old


_PATCH_LOCK = threading.Lock()


def _new_nixl_agent(api: Any, name: str, conf: Any, progress_delay_us: int) -> Any:
    """``api.nixl_agent(name, conf)`` with the progress thread's delay set.

    The Python wrapper hard-codes ``pthrDelay = 0``: its progress thread then spins
    and burns a whole core per agent even when idle (measured: 100% of a core).
    With a delay the thread waits between rounds (measured: ~2.5% of a core idle).
    The wrapper exposes no option for it, so the binding's constructor is wrapped
    while the agent is built.
    """
    bind = getattr(api, "nixlBind", None)
    if progress_delay_us <= 0 or bind is None or not hasattr(bind, "nixlAgent"):
        return api.nixl_agent(name, conf)
    orig = bind.nixlAgent

    def make(agent_name: str, cfg: Any) -> Any:
        if hasattr(cfg, "pthrDelay"):
            cfg.pthrDelay = int(progress_delay_us)
        return orig(agent_name, cfg)

    with _PATCH_LOCK:
        bind.nixlAgent = make
        try:
            return api.nixl_agent(name, conf)
        finally:
            bind.nixlAgent = orig


class NixlAgent(KVTransferAgent):
    backend = "nixl"

    def __init__(self, name: str, region: Any, layout: KVRegionLayout, *,
                 default_timeout_s: float = 30.0, nixl_backends: tuple[str, ...] = ("UCX",),
                 num_threads: int = 0, progress_thread: bool = True,
                 progress_delay_us: int = 100, pump_interval_s: float = 0.0005) -> None:
        super().__init__(name, region, layout, default_timeout_s=default_timeout_s)
        api = import_nixl()
        conf = api.nixl_agent_config(enable_prog_thread=progress_thread, enable_listen_thread=False,
                                     backends=list(nixl_backends), num_threads=num_threads)
        with _ucx_bound_to_host():
            self._agent = _new_nixl_agent(api, name, conf, progress_delay_us)
        missing = [b for b in nixl_backends if b not in self._agent.backends]
        if missing:
            raise RuntimeError(f"NIXL backend(s) {missing} unavailable; plugins: "
                               f"{self._agent.get_plugin_list()}")
        self._mem = "DRAM" if region.device.type == "cpu" else "VRAM"
        self._dev = 0 if region.device.type == "cpu" else int(region.device.index or 0)
        self._base = int(region.data_ptr())
        self._reg = self._agent.register_memory(region)
        self._xfers: dict[TransferHandle, Any] = {}
        self._claiming: dict[TransferHandle, tuple[np.ndarray, Frame]] = {}
        """Writes whose CLAIM awaits GRANT or REFUSE: nothing posted yet."""
        self._zombies: list[Any] = []  # handles NIXL refused to release yet
        self._remote: dict[str, tuple[int, str, int]] = {}  # peer -> (addr, mem, dev)
        self._pump_interval_s = float(pump_interval_s)
        self._pump_stop = threading.Event()
        self._pump_wake = threading.Event()  # set by expect() and claims: no idle wait then
        self._pump = threading.Thread(target=self._pump_loop, daemon=True, name=f"pdkv-pump-{name}")
        self._pump.start()

    # ---- metadata / peers ---------------------------------------------------------
    def _metadata_fields(self) -> dict[str, Any]:
        return {"addr": self._base, "mem": self._mem, "dev": self._dev}

    def _metadata_blob(self) -> bytes:
        return bytes(self._agent.get_agent_metadata())

    def _add_peer_backend(self, info: PeerInfo, blob: bytes) -> None:
        got = self._agent.add_remote_agent(blob)
        got = got.decode() if isinstance(got, bytes) else str(got)
        if got != info.name:
            self._agent.remove_remote_agent(got)
            raise ValueError(f"NIXL metadata names agent {got!r}, expected {info.name!r}")
        h = info.header
        self._remote[info.name] = (int(h["addr"]), str(h["mem"]), int(h["dev"]))

    def _remove_peer_backend(self, name: str) -> None:
        self._remote.pop(name, None)
        try:
            self._agent.remove_remote_agent(name)
        except Exception:
            pass

    # ---- writes -------------------------------------------------------------------
    def _start_write(self, h: TransferHandle, descs: np.ndarray, done: Frame) -> None:
        claim = Frame(FrameKind.CLAIM, done.transfer_id, done.num_bytes, done.digest)
        self._claiming[h] = (descs, done)
        self._agent.send_notif(h.peer, pack_frame(claim))
        self._pump_wake.set()

    def _post(self, h: TransferHandle) -> None:
        """The receiver granted the claim: post the WRITE (DONE frame as its notification)."""
        descs, done = self._claiming.pop(h)
        h.is_started = True
        if len(descs) == 0:  # nothing to move: just complete
            self._agent.send_notif(h.peer, pack_frame(done))
            self._xfers[h] = None
            return
        addr, mem, dev = self._remote[h.peer]
        n = len(descs)
        local = np.empty((n, 3), dtype=np.uint64)
        local[:, 0] = self._base + descs[:, 0]
        local[:, 1] = descs[:, 2]
        local[:, 2] = self._dev
        remote = np.empty((n, 3), dtype=np.uint64)
        remote[:, 0] = addr + descs[:, 1]
        remote[:, 1] = descs[:, 2]
        remote[:, 2] = dev
        xfer = self._agent.initialize_xfer(
            "WRITE", self._agent.get_xfer_descs(local, self._mem),
            self._agent.get_xfer_descs(remote, mem), h.peer, pack_frame(done))
        self._xfers[h] = xfer
        if self._agent.transfer(xfer) == "ERR":
            raise RuntimeError("NIXL refused to post the transfer")

    def _poll_write(self, h: TransferHandle) -> TransferStatus | None:
        if h in self._claiming:
            return None
        xfer = self._xfers.get(h)
        if xfer is None:
            return DONE if h in self._xfers else failed("unknown transfer")
        st = self._agent.check_xfer_state(xfer)
        if st == "DONE":
            return DONE
        if st == "ERR":
            return failed("NIXL transfer error")
        return None

    def _release_write(self, h: TransferHandle) -> None:
        self._claiming.pop(h, None)
        xfer = self._xfers.pop(h, None)
        if xfer is not None:
            self._release(xfer)

    def _release(self, xfer: Any) -> bool:
        try:
            self._agent.release_xfer_handle(xfer)
            return True
        except Exception:
            self._zombies.append(xfer)
            return False

    # ---- incoming -----------------------------------------------------------------
    def _progress_backend(self) -> None:
        if self._zombies:
            zombies, self._zombies = self._zombies, []
            for x in zombies:
                self._release(x)
        for peer, msgs in self._agent.get_new_notifs().items():
            peer = peer.decode() if isinstance(peer, bytes) else str(peer)
            for m in msgs:
                frame = unpack_frame(m)
                if frame is None:  # not one of ours (e.g. a plain send_notif)
                    self._notifications.append(Notification(peer, bytes(m)))
                else:
                    self._on_frame(peer, frame)

    def _on_frame(self, peer: str, f: Frame) -> None:
        if f.kind is FrameKind.CLAIM:
            why = self._admit(peer, f.transfer_id, f.num_bytes, f.digest)
            if peer in self._peers:  # else it cannot be answered: the writer times out
                answer = Frame(FrameKind.REFUSE, f.transfer_id, f.num_bytes, f.digest, why.encode()) if why \
                    else Frame(FrameKind.GRANT, f.transfer_id, f.num_bytes, f.digest)
                try:
                    self._agent.send_notif(peer, pack_frame(answer))
                except Exception:  # noqa: BLE001 - the writer went away; its claim times out
                    pass
        elif f.kind is FrameKind.DONE:
            self._complete_incoming(peer, f.transfer_id, f.num_bytes, f.digest, f.message)
        else:  # an answer to one of our claims
            h = self._writes.get((peer, f.transfer_id))
            if h is None or h not in self._claiming:
                return  # given up meanwhile (cancelled, timed out)
            if f.kind is FrameKind.REFUSE:
                self._fail_write(h, f"refused by {peer}: {f.message.decode(errors='replace')}")
                return
            try:
                self._post(h)
            except Exception as e:  # noqa: BLE001 - a write that could not be posted fails
                self._fail_write(h, f"{type(e).__name__}: {e}")

    def expect(self, *args: Any, **kwargs: Any) -> TransferHandle:
        h = super().expect(*args, **kwargs)
        self._pump_wake.set()
        return h

    def _pump_loop(self) -> None:
        while not self._pump_stop.is_set():
            with self._lock:
                if self._closed:
                    return
                try:
                    self.progress()
                except Exception:  # noqa: BLE001 - keep pumping; callers see their transfers fail
                    log.debug("NIXL pump of %s: progress failed", self.name, exc_info=True)
                interval = 5e-5 if self._claiming else self._pump_interval_s if self._expects else 0.02
            self._pump_wake.wait(interval)
            self._pump_wake.clear()

    def _backend_pending(self) -> int:
        return len(self._zombies)

    def _close_backend(self) -> None:
        self._pump_stop.set()  # NOTE: not joined: it may be waiting for the lock held here
        self._pump_wake.set()
        self._claiming.clear()
        for x in list(self._xfers.values()):
            if x is not None:
                self._release(x)
        self._xfers.clear()
        for x in self._zombies:
            try:
                self._agent.release_xfer_handle(x)
            except Exception:
                pass
        self._zombies.clear()
        try:
            self._agent.deregister_memory(self._reg)
        except Exception:
            pass
        self._agent = None
