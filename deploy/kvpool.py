"""The KV pool's master: ``mooncake_master`` as a child process.

    master = MasterProcess().start()     # loopback, free ports; returns once it serves
    KVPoolConfig(master_address=master.address, ...)   # what workers are given
    master.stop()                        # SIGTERM, then SIGKILL after a grace period

The master indexes the pool (which key lives in which worker's segment, leases,
eviction); it holds no KV bytes itself, so it is small. It serves two ports, both bound
to ``host`` / ``metrics_host`` (127.0.0.1 unless told otherwise) and both **without
authentication** (docs/security.md): its RPC service (``address``), which workers join,
and an HTTP admin port (``metrics_url``: ``/health``, ``/metrics``, and key listings).
The master's own HTTP metadata server is left off: in 0.3.13.post1 it binds every
interface whatever ``--http_metadata_server_host`` says, and workers do not need it
(they exchange segment metadata peer to peer, ``P2PHANDSHAKE``).

The binary ships in the ``mooncake-transfer-engine-non-cuda`` wheel (the ``kvpool``
extra) as ``mooncake/mooncake_master``; ``find_master_binary`` finds it there or on PATH.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

MASTER_BINARY = "mooncake_master"
_INSTALL_HINT = ("pip install 'pdserve[kvpool]' (mooncake-transfer-engine-non-cuda; it needs Debian's "
                 "libibverbs1), or `make setup`")


def find_master_binary() -> str:
    """Path of ``mooncake_master``: the installed wheel's, else PATH's; a clear error if neither."""
    spec = importlib.util.find_spec("mooncake")
    for d in (spec.submodule_search_locations or []) if spec else []:
        path = Path(d) / MASTER_BINARY
        if path.is_file():
            return str(path)
    found = shutil.which(MASTER_BINARY)
    if found:
        return found
    raise FileNotFoundError(f"{MASTER_BINARY} not found (neither in the mooncake package nor on PATH): "
                            f"{_INSTALL_HINT}")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class MasterProcess:
    """One ``mooncake_master``: started by ``start``, stopped by ``stop`` (or ``with``).

    ``rpc_port`` / ``metrics_port`` 0 pick free ports. ``extra_args`` pass further master
    flags through (``--client_ttl=10``, ``--eviction_high_watermark_ratio=0.9``, ...).
    Its log (glog, stderr) goes to ``log_path``, a temporary file by default.
    """

    def __init__(self, host: str = "127.0.0.1", rpc_port: int = 0, metrics_host: str = "127.0.0.1",
                 metrics_port: int = 0, extra_args: tuple[str, ...] = (), binary: str | None = None,
                 log_path: str | None = None) -> None:
        self.host = host
        self.metrics_host = metrics_host
        self.rpc_port = rpc_port or _free_port(host)
        self.metrics_port = metrics_port or _free_port(metrics_host)
        self.binary = binary or find_master_binary()
        self.extra_args = tuple(extra_args)
        self._owns_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="pdserve-mooncake-master-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        """``HOST:PORT`` of the RPC service, for ``KVPoolConfig.master_address``."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"[{host}]:{self.rpc_port}" if ":" in host else f"{host}:{self.rpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_host}:{self.metrics_port}"

    def command(self) -> list[str]:
        return [self.binary, f"--rpc_address={self.host}", f"--rpc_port={self.rpc_port}",
                f"--metrics_host={self.metrics_host}", f"--metrics_port={self.metrics_port}",
                "--enable_http_metadata_server=false", *self.extra_args]

    def start(self, timeout_s: float = 30.0) -> MasterProcess:
        """Start it and wait until ``/health`` says it serves; on failure stop it and raise
        with the tail of its log."""
        if self.proc is not None:
            raise RuntimeError("this MasterProcess was already started")
        with open(self.log_path, "ab") as log:
            try:
                self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             start_new_session=True)  # `up` stops it, not the terminal's Ctrl-C
            except OSError as e:
                self.stop()  # removes the log
                raise FileNotFoundError(f"cannot run {MASTER_BINARY} ({self.binary}): {e}; {_INSTALL_HINT}") from e
        deadline = time.monotonic() + timeout_s
        while not self.is_ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with {self.proc.returncode}" if self.proc.poll() is not None
                       else f"did not answer within {timeout_s:g} s")
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"{MASTER_BINARY} {why}; its log ends:\n{tail}")
            time.sleep(0.05)
        return self

    def is_ready(self) -> bool:
        """Whether this process is alive and its admin port reports the service ready."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{self.metrics_url}/health", timeout=0.5) as r:
                return r.status == 200 and bool(json.loads(r.read()).get("service_ready"))
        except (OSError, ValueError):
            return False

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; waits until it is gone, then removes the
        temporary log. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._owns_log:
            Path(self.log_path).unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL now (a crash, for tests) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, num_bytes: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - num_bytes))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> MasterProcess:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
