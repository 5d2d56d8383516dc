"""The soak's cluster and its chaos: `pdserve up` as a subprocess, the workers' Stats over
authenticated gRPC, and a thread that SIGKILLs workers while the PoolScaler replaces them.

Finding a worker's process. Workers run as Ray actors whose process title is
``ray::WorkerActor`` whatever worker they run, so the title cannot tell them apart;
their registrations can. A worker registers its gRPC ``host:port``, and the process
that holds that listening socket is the worker (the actor process itself, TP rank 0):
:func:`listening_pid` looks the port up in ``/proc/net/tcp{,6}`` and finds the process
with that socket inode among ``/proc/<pid>/fd``. No Ray client, no private Ray API;
killing that pid is exactly a crash of the worker (its actor dies, Ray reports it DEAD,
the scaler releases and replaces it; the store keeps the registration until its
heartbeat TTL lapses, as after any crash).

The chaos kills one worker at a time, alternating decode and prefill, and never kills
in a pool that has not yet got its previous victim's replacement registered: the
fault model is "a worker dies, the scaler replaces it", not "a whole pool is gone" (the
gateway ends a stream with ``no_workers`` / ``migrations_exhausted`` then, by design,
and ``tests/integration/test_migration.py`` covers that bound).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from pdserve.deploy.store import open_store
from pdserve.proto import auth
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

ROLES = {pb.PREFILL: "prefill", pb.DECODE: "decode"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_pid(address: str) -> int | None:
    """The pid of the process listening on ``address``'s TCP port (loopback), or None."""
    port = int(address.rsplit(":", 1)[1])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":  # 0A: LISTEN
                inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                return int(pid)
        except OSError:
            continue  # gone, or not ours to read
    return None


class UpCluster:
    """`pdserve up` with ``num_prefill`` + ``num_decode`` workers of the tiny model, its own
    ``$PDSERVE_HOME`` and a cluster secret this harness chose (so it can sign Stats calls)."""

    def __init__(self, home: Path, num_prefill: int = 2, num_decode: int = 2, extra_args: tuple[str, ...] = ()):
        self.home = home
        self.num_workers = {"prefill": num_prefill, "decode": num_decode}
        self.secret = auth.generate_secret()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PDSERVE_HOME": str(home), auth.SECRET_ENV: self.secret.decode()}
        self.env.pop(auth.SECRET_FILE_ENV, None)
        self.cmd = [sys.executable, "-m", "pdserve.deploy.up", "--port", str(self.port), "--transfer-backend", "nixl",
                    "--prefill", str(num_prefill), "--decode", str(num_decode), *extra_args]
        self.lines: list[str] = []
        self.log = tempfile.TemporaryFile(mode="w+")
        self.log_text = ""
        """Its whole stderr (the gateway's and scaler's logs), once stopped."""
        self.proc: subprocess.Popen | None = None
        self.store = None

    def launch(self) -> None:
        """Start `pdserve up` (returns at once; :meth:`wait_serving` waits for it)."""
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=self.env)
        threading.Thread(target=lambda: [self.lines.append(ln) for ln in self.proc.stdout], daemon=True).start()

    def wait_serving(self, timeout_s: float = 300.0) -> None:
        """Until the gateway is ready (a decode worker registered); then open the store."""
        deadline = time.monotonic() + timeout_s
        while not any("serving" in ln for ln in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pdserve up did not start: {''.join(self.lines)}\n{self.log_tail()}")
            time.sleep(0.5)
        state = json.loads((self.home / "up.json").read_text())
        self.store = open_store(state["store_url"], cluster_secret=self.secret)
        while True:  # the gateway's first registry refresh
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway never got ready: {self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, num_chars: int = 4000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-num_chars:]

    def workers(self) -> list[pb.WorkerInfo]:
        return self.store.list_workers()

    def stats(self, info: pb.WorkerInfo, timeout_s: float = 5.0) -> pb.StatsResponse:
        stub = pb_grpc.PrefillStub if info.role == pb.PREFILL else pb_grpc.DecodeStub
        with auth.insecure_channel(info.address, self.secret) as ch:
            return stub(ch).Stats(pb.StatsRequest(), timeout=timeout_s)

    def metric(self, prefix: str) -> float:
        """Sum of the gateway's /metrics samples whose line starts with ``prefix``."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(prefix))

    def stop(self, timeout_s: float = 120.0) -> int | None:
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.seek(0)
        self.log_text = self.log.read()
        self.log.close()
        return None if self.proc is None else self.proc.returncode


@dataclass
class Kill:
    worker_id: str
    role: str
    pid: int
    at: float
    num_requests: int
    """Requests running or waiting on it when it was killed (its Stats just before)."""
    num_blocks_held: int
    """KV blocks in use on it then."""
    replaced_at: float | None = None
    replacement_id: str | None = None


class Chaos:
    """Kills a worker every ``every_s`` seconds, alternating decode and prefill, until
    ``max_kills`` or :meth:`stop_killing`; records each kill and when its pool was whole
    again. A pool not whole again within ``full_pool_timeout_s`` ends the killing (an error)."""

    def __init__(self, cluster: UpCluster, every_s: float, max_kills: int | None, seed: int = 0,
                 full_pool_timeout_s: float = 120.0) -> None:
        self.cluster = cluster
        self.every_s = every_s
        self.max_kills = max_kills
        self.full_pool_timeout_s = full_pool_timeout_s
        self.kills: list[Kill] = []
        self.errors: list[str] = []
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._no_more_kills = threading.Event()
        self._killing_done = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="soak-chaos", daemon=True)
        self._known: set[str] = set()
        """Worker ids seen so far (the first ones and every replacement)."""
        self.last_stats: dict[str, pb.StatsResponse] = {}
        """Every decode worker's last Stats (sampled each second; a killed one's from before its death)."""
        self._sampled_at = 0.0

    def start(self) -> None:
        self._known = {w.worker_id for w in self.cluster.workers()}
        self._thread.start()

    def stop(self) -> None:
        self._no_more_kills.set()
        self._stop.set()
        self._thread.join(self.full_pool_timeout_s + 30)

    def killed_ids(self) -> set[str]:
        with self._lock:
            return {k.worker_id for k in self.kills}

    def live(self, role: str) -> list[pb.WorkerInfo]:
        """Registered, non-draining workers of ``role`` that were not killed (a killed one
        stays registered until its heartbeat TTL lapses)."""
        killed = self.killed_ids()
        return [w for w in self.cluster.workers()
                if ROLES.get(w.role) == role and not w.draining and w.worker_id not in killed]

    def watch(self) -> None:
        """Record replacements: once a pool is whole again, its pending kills are replaced
        (each by one of the workers it did not have before). Sample the decode workers'
        Stats once a second."""
        try:
            now = time.monotonic()
            if now - self._sampled_at >= 1.0:
                self._sampled_at = now
                for w in self.live("decode"):
                    try:
                        self.last_stats[w.worker_id] = self.cluster.stats(w)
                    except Exception:  # noqa: BLE001 - just killed, or starting: next second
                        pass
            with self._lock:
                pending = [k for k in self.kills if k.replaced_at is None]
            for role in sorted({k.role for k in pending}):
                live = self.live(role)
                if len(live) < self.cluster.num_workers[role]:
                    continue
                new_ids = sorted(w.worker_id for w in live if w.worker_id not in self._known)
                self._known.update(new_ids)
                with self._lock:
                    for k in (k for k in pending if k.role == role):
                        k.replaced_at, k.replacement_id = now, new_ids.pop(0) if new_ids else None
        except Exception as e:  # noqa: BLE001 - the store is briefly slow: the next round
            self.errors.append(f"watch: {e!r}")

    def all_replaced(self) -> bool:
        with self._lock:
            return all(k.replaced_at is not None for k in self.kills)

    def stop_killing(self) -> None:
        """Kill no more; keep watching until every victim is replaced."""
        self._no_more_kills.set()

    @property
    def is_killing_done(self) -> bool:
        return self._killing_done.is_set()

    def _run(self) -> None:
        roles = ("decode", "prefill")
        next_at = time.monotonic()
        try:
            while not self._no_more_kills.is_set() and (self.max_kills is None or len(self.kills) < self.max_kills):
                role = roles[len(self.kills) % 2]
                give_up_at = next_at + self.full_pool_timeout_s
                while not self._no_more_kills.is_set():  # wait for the time, and for the pool to be whole
                    self.watch()
                    if time.monotonic() >= next_at and len(self.live(role)) >= self.cluster.num_workers[role]:
                        break
                    if time.monotonic() > give_up_at:
                        raise RuntimeError(f"the {role} pool was not whole again within {self.full_pool_timeout_s:g} s")
                    self._no_more_kills.wait(0.25)
                if self._no_more_kills.is_set():
                    break
                self._kill_one(role)
                next_at = time.monotonic() + self.every_s
        except Exception as e:  # noqa: BLE001 - reported (the soak fails on it); no more kills
            self.errors.append(f"chaos: {e!r}")
        finally:
            self._killing_done.set()
        while not self._stop.is_set() and not self.all_replaced():
            self.watch()
            self._stop.wait(0.25)

    def _kill_one(self, role: str, aim_s: float = 3.0) -> None:
        """SIGKILL the busiest live worker of ``role``, waiting up to ``aim_s`` for one to
        be busy at all, so that kills interrupt work; ties broken by the seeded RNG.

        Busy: requests running or waiting, else KV blocks in use. A prefill worker answers
        Stats between engine steps, when its prompts are computed and wait for their
        transfer with their blocks held, so for it the blocks are the telling figure."""
        deadline = time.monotonic() + aim_s
        while True:
            candidates = []
            for w in self.live(role):
                try:
                    s = self.cluster.stats(w)
                except Exception:  # noqa: BLE001 - unreachable: not a candidate
                    continue
                busy = (s.num_running + s.num_waiting, s.num_kv_blocks_total - s.num_kv_blocks_free)
                candidates.append((busy, self._rng.random(), w))
            if not candidates:
                raise RuntimeError(f"no live {role} worker to kill")
            busy, _, victim = max(candidates, key=lambda c: (c[0], c[1]))
            if any(busy) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        pid = listening_pid(victim.address)
        if pid is None:
            raise RuntimeError(f"no process listens on {victim.address} ({victim.worker_id})")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        if "WorkerActor" not in cmdline:
            raise RuntimeError(f"{victim.address} is held by pid {pid} ({cmdline!r}), not a Ray worker actor")
        os.kill(pid, signal.SIGKILL)
        with self._lock:
            self.kills.append(Kill(victim.worker_id, role, pid, time.monotonic(), *busy))
