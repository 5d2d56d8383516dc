"""A real, throwaway redis-server for tests.

``RedisServer`` starts ``redis-server`` on a free loopback port in a temporary directory
(no persistence) and stops it. ``ensure_redis_server()`` finds the binary and, when it
is missing, installs the Debian package (``apt-get update`` + ``apt-get install -y
redis-server``; needs root) once per machine; if that is impossible it raises with
a clear message: tests that need Redis fail, they are never silently skipped.

The session-scoped pytest fixture ``redis_url`` yields ``redis://127.0.0.1:PORT/0``;
use it with ``from redis_server import redis_url`` in a test module.

``RedisServer(password=...)`` runs it with ``requirepass`` (given in a 0600 config
file, not on its command line); ``RedisServer(tls=TLSFiles(...))`` serves TLS only
(``rediss://``), for a redis-server built with TLS (:func:`redis_has_tls`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

_LOCK_PATH = Path(tempfile.gettempdir()) / "pdserve-redis-install.lock"
_EXTRA_DIRS = ("/usr/bin", "/usr/local/bin", "/usr/sbin")


def _find() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    for d in _EXTRA_DIRS:
        p = Path(d) / "redis-server"
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def _run_quiet(cmd: list[str], timeout: float) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}:\n{tail}")


def ensure_redis_server() -> str:
    """Path of ``redis-server``, installing the Debian package if needed (idempotent)."""
    path = _find()
    if path:
        return path
    hint = "install it (Debian/Ubuntu: `apt-get install -y redis-server`) and put it on PATH"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        why = "not running as root" if os.geteuid() != 0 else "apt-get is not available"
        pytest.fail(f"redis-server is not installed and cannot be installed here ({why}): {hint}", pytrace=False)
    with open(_LOCK_PATH, "w") as lock:  # one installer at a time (parallel test runs)
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = _find()
        if path:
            return path
        try:
            _run_quiet(["apt-get", "-qq", "-o", "DPkg::Lock::Timeout=120", "update"], timeout=300)
            _run_quiet(
                ["apt-get", "-qq", "-y", "-o", "DPkg::Lock::Timeout=120", "install", "--no-install-recommends", "redis-server"],
                timeout=600,
            )
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
            pytest.fail(f"redis-server is not installed and installing it failed: {e}\n{hint}", pytrace=False)
    path = _find()
    if not path:
        pytest.fail(f"apt-get installed redis-server but the binary is not found: {hint}", pytrace=False)
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path
    ca: Path


def redis_has_tls() -> bool:
    """Whether this machine's redis-server was built with TLS (and openssl can make certificates)."""
    binary = _find()
    if binary is None or shutil.which("openssl") is None:
        return False
    out = subprocess.run([binary, "--port", "0", "--tls-port", "1", "--save", ""], capture_output=True, text=True,
                         timeout=10)
    return "No tls-cert-file configured" in out.stdout + out.stderr  # a build without TLS rejects the option


def make_tls_files(directory: Path) -> TLSFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl)."""
    d = Path(directory)
    run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True, timeout=60)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=pdserve-test-ca",
        "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(d / "server.key"),
        "-out", str(d / "server.csr"))
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
        "-CAcreateserial", "-days", "2", "-extfile", str(d / "ext.cnf"), "-out", str(d / "server.crt"))
    return TLSFiles(d / "server.crt", d / "server.key", d / "ca.crt")


def _ping(port: int, password: str | None = None, tls: TLSFiles | None = None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw:
            s = raw
            if tls is not None:
                s = ssl.create_default_context(cafile=str(tls.ca)).wrap_socket(raw, server_hostname="127.0.0.1")
            if password is not None:
                s.sendall(f"AUTH {password}\r\n".encode())
                if not s.recv(64).startswith(b"+OK"):
                    return False
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; ``with RedisServer() as srv: srv.url``."""

    def __init__(self, startup_timeout_s: float = 15.0, password: str | None = None, tls: TLSFiles | None = None):
        self._timeout = startup_timeout_s
        self._password = password
        self._tls = tls
        self._proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        """The server's URL, without any password."""
        return f"{'rediss' if self._tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        binary = ensure_redis_server()
        self._dir = tempfile.TemporaryDirectory(prefix="pdserve-redis-")
        last_log = ""
        for _ in range(3):  # the free port can be taken between probing and binding
            port = _free_port()
            log = Path(self._dir.name) / f"redis-{port}.log"
            conf = Path(self._dir.name) / "redis.conf"  # the password stays off the command line
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                if self._password is not None:
                    f.write(f"requirepass {self._password}\n")
            ports = ["--port", str(port)]
            if self._tls is not None:
                ports = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(self._tls.cert),
                         "--tls-key-file", str(self._tls.key), "--tls-ca-cert-file", str(self._tls.ca),
                         "--tls-auth-clients", "no"]
            cmd = [
                binary, str(conf), *ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self._dir.name, "--daemonize", "no", "--logfile", str(log),
            ]
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + self._timeout
            while time.monotonic() < deadline and proc.poll() is None:
                if _ping(port, self._password, self._tls):
                    self._proc, self.port = proc, port
                    return self
                time.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            last_log = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        self._dir.cleanup()
        raise RuntimeError(f"redis-server did not start (tried 3 ports); its log:\n{last_log}")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="session")
def redis_url():
    """``redis://127.0.0.1:PORT/0`` of a redis-server that lives for the test session."""
    with RedisServer() as server:
        yield server.url
