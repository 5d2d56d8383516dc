"""NIXL backend: one-sided RDMA-style WRITE with a completion notification.

Works on CPU-only machines with the ``nixl-cu12`` wheel (UCX over shared memory /
TCP loopback; no CUDA library needed at run time) and moves VRAM on GPU hosts
with the same code (the region is registered as VRAM when it is a CUDA tensor).

* The whole region is registered once at construction.
* ``metadata()`` = our JSON header (region address, memory type, device, layout)
  + NIXL's agent metadata blob (``get_agent_metadata``), which carries the UCX
  worker address and the registration keys.
* ``write`` builds one NIXL descriptor per plan descriptor and posts one WRITE with
  a notification frame (transfer id, byte count, user message); NIXL delivers the
  notification after the data. ``expect`` is bookkeeping only: completion comes
  from that notification.
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
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

import numpy as np

from .base import (DONE, KVTransferAgent, Notification, PeerInfo, TransferHandle,
                   TransferStatus, failed, unpack_notif)
from .layout import KVRegionLayout

_MODULES = ("nixl._api", "nixl_cu12._api", "nixl_cu13._api")


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
                 progress_delay_us: int = 100) -> None:
        super().__init__(name, region, layout, default_timeout_s=default_timeout_s)
        api = import_nixl()
        conf = api.nixl_agent_config(enable_prog_thread=progress_thread, backends=list(nixl_backends),
                                     num_threads=num_threads)
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
        self._zombies: list[Any] = []  # handles NIXL refused to release yet
        self._remote: dict[str, tuple[int, str, int]] = {}  # peer -> (addr, mem, dev)

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
    def _start_write(self, h: TransferHandle, descs: np.ndarray, frame: bytes) -> None:
        if len(descs) == 0:  # nothing to move: just notify
            self._agent.send_notif(h.peer, frame)
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
            self._agent.get_xfer_descs(remote, mem), h.peer, frame)
        self._xfers[h] = xfer
        if self._agent.transfer(xfer) == "ERR":
            raise RuntimeError("NIXL refused to post the transfer")

    def _poll_write(self, h: TransferHandle) -> TransferStatus | None:
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
                parsed = unpack_notif(m)
                if parsed is None:  # not one of ours (e.g. a plain send_notif)
                    self._notifications.append(Notification(peer, bytes(m)))
                else:
                    tid, nbytes, message = parsed
                    self._on_incoming(peer, tid, nbytes, message)

    def _backend_pending(self) -> int:
        return len(self._zombies)

    def _close_backend(self) -> None:
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
