"""Workers as plain child processes, without Ray: for machines without Ray (a GPU box),
benchmarks and tests.

    w = WorkerProcess("decode", ["--model", DIR, "--store", URL, "--worker-id", "d0"])
    w.wait_ready()            # the worker printed READY: registered and serving
    w.stats(); w.all_free()   # its Stats over gRPC
    w.stop()                  # SIGTERM twice: it deregisters and exits now
    w.stop(drain=True)        # one SIGTERM: it drains first (finishes its requests)

Start several, then wait for all, to start them in parallel. stdout is drained by a
thread into ``lines`` and stderr goes to a file, so a chatty worker can never block
on a full pipe.

The cluster secret (``pdserve.proto.auth``) reaches a worker the way it reaches any
plain-process worker: ``$PDSERVE_CLUSTER_SECRET`` in its environment (inherited, or
``cluster_secret=`` here, which sets it for the child only), never its command line.
``channel`` signs its calls with the same secret.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import grpc

from pdserve.proto import auth, convert
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

_STUBS = {"prefill": pb_grpc.PrefillStub, "decode": pb_grpc.DecodeStub, "both": pb_grpc.DecodeStub}


class WorkerProcess:
    def __init__(self, role: str, argv: list[str], env: dict[str, str] | None = None,
                 cluster_secret: bytes | None = None) -> None:
        if role not in _STUBS:
            raise ValueError(f"unknown worker role {role!r}; choose from {sorted(_STUBS)}")
        env = _with_secret(env, cluster_secret)
        #: What this worker checks (and ``channel`` signs with): the secret given, else its environment's.
        self.cluster_secret = auth.load_secret(os.environ if env is None else env)
        self.role = role
        self.lines: list[str] = []
        self.address: str | None = None
        self.metrics_url: str | None = None
        self.worker_id: str | None = None
        self._channel: grpc.Channel | None = None
        self.log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "pdserve.deploy.runner", "--role", role, *argv]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_ready(self, timeout_s: float = 120.0, metrics: bool = False) -> str:
        """Wait for ``READY <id> <address>`` (and ``METRICS`` too when asked); returns the address."""
        deadline = time.monotonic() + timeout_s
        while True:
            ready = [ln.split() for ln in list(self.lines) if ln.startswith("READY")]
            served = [ln.split() for ln in list(self.lines) if ln.startswith("METRICS")]
            if ready and (served or not metrics):
                _, self.worker_id, self.address = ready[0]
                self.metrics_url = served[0][2] if served else None
                return self.address
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"{self.role} worker did not start: {''.join(self.lines)}\n{self.log_tail()}")
            time.sleep(0.02)

    def output(self, timeout_s: float = 5.0) -> str:
        """Everything the worker printed on stdout (complete once it has exited)."""
        if self.proc.poll() is not None:
            self._reader.join(timeout_s)
        return "".join(self.lines)

    def log_tail(self, num_chars: int = 3000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-num_chars:]

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            if self.address is None:
                raise RuntimeError("wait_ready() first")
            self._channel = auth.insecure_channel(self.address, self.cluster_secret)
        return self._channel

    def stats(self, timeout_s: float = 10.0) -> pb.StatsResponse:
        return _STUBS[self.role](self.channel).Stats(pb.StatsRequest(), timeout=timeout_s)

    def generate(self, request_id: str, prompt_token_ids: list[int], params, prefill_worker_id: str = "",
                 timeout_s: float = 60.0) -> tuple[list[int], pb.GenerateResponse | None]:
        """One ``Decode.Generate`` call straight to this (decode) worker: every token it
        streamed, and the message that carried the finish reason (None if none did).
        ``params`` is an engine ``SamplingParams``."""
        req = pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt_token_ids,
                                 sampling_params=convert.sampling_message(params),
                                 prefill_worker_id=prefill_worker_id)
        tokens, final = [], None
        for msg in pb_grpc.DecodeStub(self.channel).Generate(req, timeout=timeout_s):
            tokens.extend(msg.token_ids)
            if msg.finish_reason:
                final = msg
        return tokens, final

    def all_free(self) -> bool:
        """Every KV block back in the pool, nothing running or waiting, no grammar matcher open."""
        s = self.stats()
        return (s.num_kv_blocks_free == s.num_kv_blocks_total and s.num_running == 0 and s.num_waiting == 0
                and s.num_open_grammars == 0)

    def stop(self, timeout_s: float = 20.0, drain: bool = False) -> None:
        """Stop now (two SIGTERMs), or with ``drain`` one SIGTERM: the worker finishes
        what it runs first (``deploy/drain.py``). It deregisters either way; SIGKILL if it
        does not exit in ``timeout_s``."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc.poll() is None:
            self.proc.terminate()
            if not drain:
                time.sleep(0.05)
                self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def wait_all_free(workers: list[WorkerProcess], timeout_s: float = 10.0) -> bool:
    """True once every worker has all its KV blocks back and nothing running or waiting."""
    deadline = time.monotonic() + timeout_s
    while not all(w.all_free() for w in workers):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


_GATEWAY = """
import json, sys
from pdserve.router.gateway import GatewayConfig
from pdserve.router.app import serve
cfg = json.loads(sys.argv[1])
port = cfg.pop("port")
serve(GatewayConfig(**cfg), host="127.0.0.1", port=port, log_level="warning")
"""


def _with_secret(env: dict[str, str] | None, secret: bytes | None) -> dict[str, str] | None:
    """The child's environment: ``env`` (default: ours), plus the secret when one is given."""
    if secret is None:
        return env
    return {**(os.environ if env is None else env), auth.SECRET_ENV: secret.decode()}


def start_gateway(config: dict, port: int, timeout_s: float = 60.0,
                  cluster_secret: bytes | None = None) -> tuple[subprocess.Popen, str]:
    """A gateway (``GatewayConfig(**config)``) as a child process on 127.0.0.1:``port``.
    Returns (process, base URL) once it routes to a decode worker (not "ready": a prefill
    worker is optional) and one registry refresh has passed. ``cluster_secret`` reaches
    it through its environment (``GatewayConfig``'s default), not its command line."""
    import httpx

    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-c", _GATEWAY, json.dumps({**config, "port": port})],
                            stdout=log, stderr=subprocess.STDOUT, env=_with_secret(None, cluster_secret))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/ready").json().get("decode", 0) >= 1:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            proc.kill()
            raise RuntimeError(f"the gateway did not start: {log.read()[-2000:]}")
        time.sleep(0.1)
    time.sleep(1.0)  # one registry refresh: the gateway's own worker list has the decode worker
    return proc, url
