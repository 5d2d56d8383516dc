"""Hosts as Linux network namespaces, for multi-host tests on one machine.

A :class:`Network` is a private Ethernet segment: one bridge namespace (``<prefix>-br``,
holding the switch ``br0``) and one namespace per host (``<prefix>-<host>``), each
plugged into the bridge by a veth pair whose host end is called ``eth0`` and carries
``<subnet>.<n>/24``. Nothing touches the root namespace: no route leads out, so the
hosts reach each other and nothing else. Each host also has its own loopback.

The namespaces share everything else with the machine (filesystem, /dev/shm,
processes, hostname), so a program that must *not* take a shortcut between "hosts"
(UCX's shared-memory transports) has to be told so; see the test module.

Lifecycle, and why it is safe to run after a crash:

* namespace names are ``pdmh-<creator pid>-...``; :func:`cleanup_stale` removes every
  namespace of that prefix whose creator is no longer alive (killing what still runs
  in it first), so a crashed run is cleaned by the next one, and a run going on in
  parallel (its creator alive) is left alone;
* :meth:`Network.destroy` kills what runs in each of its namespaces (SIGTERM, then
  SIGKILL; every process in a namespace of ours was started by us) and deletes them.
  The veth pairs vanish with their namespaces. Idempotent.

Only ``ip`` (iproute2) is needed; ``ss`` lists listening sockets when present.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

PREFIX = "pdmh"
_NETNS_DIR = Path("/run/netns")


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (None when they can)."""
    if os.geteuid() != 0:
        return "multi-host tests need root (network namespaces)"
    if shutil.which("ip") is None:
        return "multi-host tests need iproute2's `ip`"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    try:
        veth = _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1", check=False)
        if veth.returncode != 0:
            return f"cannot create veth pairs here: {veth.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def netns_pids(name: str) -> list[int]:
    """Pids of every process whose network namespace is ``name`` (empty if it is gone)."""
    proc = _ip("netns", "pids", name, check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def kill_netns_processes(name: str, grace_s: float = 5.0) -> list[int]:
    """SIGTERM every process in namespace ``name``, SIGKILL what is left after ``grace_s``.
    Returns the pids that needed SIGKILL."""
    def signal_all(sig: int) -> list[int]:
        pids = netns_pids(name)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    if not signal_all(signal.SIGTERM):
        return []
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _alive(netns_pids(name)):
            return []
        time.sleep(0.1)
    return signal_all(signal.SIGKILL)


def _alive(pids: Iterable[int]) -> list[int]:
    """Pids that are running (not zombies waiting for a parent that is not us)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            out.append(pid)
    return out


def _creator_alive(name: str) -> bool:
    parts = name.split("-")
    if len(parts) < 3 or not parts[1].isdigit():
        return False
    return Path(f"/proc/{parts[1]}").exists()


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Delete the namespaces ``<prefix>-<pid>-*`` left by runs whose process is gone."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    names = [line.split()[0] for line in listed if line.strip()]
    stale = [n for n in names if n.startswith(prefix + "-") and not _creator_alive(n)]
    for name in stale:
        kill_netns_processes(name, grace_s=2.0)
        _ip("netns", "del", name, check=False)
    return stale


@dataclass
class Host:
    """One namespace on the network: ``name`` (host name in the tests), ``netns``, ``ip``."""

    name: str
    netns: str
    ip: str
    #: The bridge-side end of this host's link (unplug it to cut the host off).
    port: str

    def cmd(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, argv: list[str], *, check: bool = True, timeout: float = 60.0,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.cmd(argv), capture_output=True, text=True, timeout=timeout,
                              env=None if env is None else dict(env))
        if check and proc.returncode != 0:
            raise RuntimeError(f"{self.name}: `{' '.join(argv)}` failed ({proc.returncode}): "
                               f"{(proc.stdout + proc.stderr)[-2000:]}")
        return proc

    def popen(self, argv: list[str], *, env: Mapping[str, str] | None = None, log: Path | None = None,
              **kw) -> subprocess.Popen:
        """Start ``argv`` in this namespace; stdout and stderr go to ``log`` (or nowhere)."""
        out = open(log, "ab") if log is not None else subprocess.DEVNULL
        try:
            return subprocess.Popen(self.cmd(argv), env=None if env is None else dict(env), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        finally:
            if log is not None:
                out.close()

    def pids(self) -> list[int]:
        return _alive(netns_pids(self.netns))

    def listening(self) -> list[tuple[str, int, str]]:
        """``(address, port, process description)`` of every listening TCP socket here."""
        out = self.run(["ss", "-ltnpH"], timeout=10).stdout
        found = []
        for line in out.splitlines():
            cols = line.split()
            if len(cols) < 4:
                continue
            addr, _, port = cols[3].rpartition(":")
            found.append((addr.strip("[]").removeprefix("::ffff:"), int(port), " ".join(cols[5:])))
        return found

    def wait_port(self, port: int, timeout_s: float = 60.0, proc: subprocess.Popen | None = None,
                  log: Path | None = None) -> None:
        """Wait until something in this namespace listens on TCP ``port``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(p == port for _, p, _ in self.listening()):
                return
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.2)
        tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
        raise TimeoutError(f"{self.name}: nothing listens on port {port} after {timeout_s:.0f} s "
                           f"(process exit code {proc.poll() if proc else None}):\n{tail}")

    def tx_bytes(self) -> int:
        """Bytes this host sent on its link (the kernel's counter of ``eth0``)."""
        return int(self.run(["cat", "/sys/class/net/eth0/statistics/tx_bytes"], timeout=10).stdout)


class Network:
    """Hosts on one bridge: ``Network({"head": 1, "a": 11})`` -> ``net.hosts["a"].ip == "10.123.0.11"``."""

    def __init__(self, hosts: Mapping[str, int], subnet: str = "10.123.0", prefix: str = PREFIX) -> None:
        self.tag = f"{prefix}-{os.getpid()}"
        self.bridge = f"{self.tag}-br"
        self.hosts = {name: Host(name, f"{self.tag}-{name}", f"{subnet}.{n}", f"v-{name}"[:15])
                      for name, n in hosts.items()}
        self._created: list[str] = []

    def create(self) -> "Network":
        cleanup_stale()
        try:
            self._add(self.bridge)
            _ip("-n", self.bridge, "link", "set", "lo", "up")
            _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge, "link", "set", "br0", "up")
            for h in self.hosts.values():
                self._add(h.netns)
                _ip("-n", self.bridge, "link", "add", h.port, "type", "veth", "peer", "name", "eth0",
                    "netns", h.netns)
                _ip("-n", self.bridge, "link", "set", h.port, "master", "br0", "up")
                _ip("-n", h.netns, "link", "set", "lo", "up")
                _ip("-n", h.netns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
                _ip("-n", h.netns, "link", "set", "eth0", "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def _add(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)

    def unplug(self, host: str) -> None:
        """Cut ``host`` off (its switch port goes down: its packets go nowhere, no error)."""
        _ip("-n", self.bridge, "link", "set", self.hosts[host].port, "down")

    def plug(self, host: str) -> None:
        _ip("-n", self.bridge, "link", "set", self.hosts[host].port, "up")

    def is_plugged(self, host: str) -> bool:
        out = _ip("-n", self.bridge, "-o", "link", "show", self.hosts[host].port).stdout
        return ",UP" in out or "<UP" in out

    def destroy(self, grace_s: float = 5.0) -> dict[str, list[int]]:
        """Kill everything running in our namespaces, then delete them. Returns, per
        namespace, the pids that had to be SIGKILLed. Idempotent."""
        killed = {}
        for name in reversed(self._created):
            forced = kill_netns_processes(name, grace_s)
            if forced:
                killed[name] = forced
            _ip("netns", "del", name, check=False)
        self._created.clear()
        return killed

    def exists(self) -> list[str]:
        listed = _ip("netns", "list", check=False).stdout
        return [n for n in [self.bridge, *(h.netns for h in self.hosts.values())] if n in listed.split()]
