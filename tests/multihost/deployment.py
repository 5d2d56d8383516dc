"""A real multi-host pdserve deployment in network namespaces (see ``netns.py``).

Topology (one /24, one bridge; every host has only its loopback and ``eth0``)::

    head   10.123.0.1   ray start --head (no CPUs), `pdserve up` (workers via Ray + gateway :8000),
                        extra gateway replicas (:8001, :8002)
    a      10.123.0.11  ray start, 1 CPU + custom resource host_a  -> the prefill pool
    b      10.123.0.12  ray start, 1 CPU + custom resource host_b  -> the decode pool
    redis  10.123.0.20  redis-server --requirepass (the control-plane store)
    client 10.123.0.30  the test's agent (``agent.py``): every HTTP / gRPC / probe call

Placement: the spec's prefill pool asks for ``{CPU: 1, host_a: 1}`` per rank and the
decode pool for ``{CPU: 1, host_b: 1}``; only host a's node has ``host_a``, only b's
has ``host_b``, so Ray can place each pool on its host only.

Credentials, none on a command line: Ray runs with token authentication (a token
made for the run, ``RAY_AUTH_TOKEN`` in every Ray process and in ``pdserve up``);
``pdserve up``, the extra gateways and the test's agent get the cluster secret
(``PDSERVE_CLUSTER_SECRET``) and the Redis password (``PDSERVE_REDIS_PASSWORD``) in
their environment; the Ray nodes get neither (the launcher hands both to each worker as
actor arguments); redis-server reads its password from a mode-600 config file.

UCX is limited to TCP (``UCX_TLS=tcp`` in the worker hosts' ``ray start`` environment,
which Ray's worker processes inherit): the namespaces share /dev/shm, the hostname and
the process namespace, so UCX would otherwise take its shared-memory (or CMA) shortcut
between "hosts". Which interface it listens on is left to pdserve (its NIXL agent sets
``UCX_NET_DEVICES`` to the interface holding the worker's address, ``eth0`` here).
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netns import Host, Network, kill_netns_processes

HOSTS = {"head": 1, "a": 11, "b": 12, "redis": 20, "client": 30}
RAY_PORT = 6379
REDIS_PORT = 6379
GATEWAY_PORT = 8000
MODEL_NAME = "tiny-llama"
RAY_DIR_PREFIX = "pdmh-ray-"
_HERE = Path(__file__).resolve().parent
_BIN = Path(sys.executable).parent


class AgentError(RuntimeError):
    pass


def _wait_ray_started(svc: "Service", timeout_s: float = 120.0) -> bool:
    """True once ``ray start --block`` says the node runs; False when it gave up because
    the node did not register in time (worth a retry); raises on anything else."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = svc.tail(200_000)
        if "Ray runtime started" in log:
            return True
        if svc.proc.poll() is not None:
            if "timed out during startup" in log:
                return False
            break
        time.sleep(0.2)
    raise RuntimeError(f"ray on {svc.host.name} did not start (exit {svc.proc.poll()}):\n{svc.tail()}")


class Agent:
    """The test's hands in one namespace: ``agent.call("http", url=...)`` (see ``agent.py``)."""

    def __init__(self, host: Host, env: dict[str, str], log: Path) -> None:
        self.host = host
        self._ids = itertools.count(1)
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._ready: Future = Future()
        self._pending[0] = self._ready
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(host.cmd([sys.executable, str(_HERE / "agent.py")]), env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        threading.Thread(target=self._read, daemon=True, name=f"agent-{host.name}").start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:  # something else printed to stdout: keep it in the log
                with open(self.log, "a") as f:
                    f.write(line)
                continue
            with self._lock:
                fut = self._pending.pop(msg["id"], None)
            if fut is not None:
                if msg["ok"]:
                    fut.set_result(msg["result"])
                else:
                    fut.set_exception(AgentError(msg["error"]))
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.set_exception(AgentError(f"the agent exited ({self.proc.poll()}): {self.log.read_text()[-2000:]}"))

    def wait_started(self, timeout_s: float = 60.0) -> None:
        self._ready.result(timeout_s)

    def submit(self, op: str, **kw: Any) -> Future:
        rid = next(self._ids)
        fut: Future = Future()
        with self._lock:
            self._pending[rid] = fut
        self.proc.stdin.write(json.dumps({"id": rid, "op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return fut

    def call(self, op: str, timeout_s: float = 120.0, **kw: Any) -> Any:
        return self.submit(op, **kw).result(timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Service:
    """A process the deployment started in one host, with its log."""

    host: Host
    proc: subprocess.Popen
    log: Path

    def tail(self, num_chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-num_chars:] if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@dataclass
class Deployment:
    root: Path
    model_dir: Path
    net: Network = field(default_factory=lambda: Network(HOSTS))
    redis_password: str = field(default_factory=lambda: secrets.token_hex(16))
    ray_token: str = field(default_factory=lambda: secrets.token_hex(32))
    api_key: str = field(default_factory=lambda: "k-" + secrets.token_hex(8))
    cluster_secret: str = field(default_factory=lambda: secrets.token_hex(32))
    services: dict[str, Service] = field(default_factory=dict)
    agent: Agent | None = None
    agents: list[Agent] = field(default_factory=list)
    replica_ports: dict[str, int] = field(default_factory=dict)
    prefill_timeout_s: float = 8.0
    heartbeat_ttl_s: float = 3.0
    num_kv_blocks: int = 160
    #: Ray's temporary directories: short, for its AF_UNIX socket paths (<= 107 bytes).
    ray_root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix=f"{RAY_DIR_PREFIX}{os.getpid()}-")))
    #: The offline reference outputs (a future; the test module computes them meanwhile).
    offline: Future | None = None

    # -- addresses ------------------------------------------------------------------

    def ip(self, host: str) -> str:
        return self.net.hosts[host].ip

    @property
    def store_url(self) -> str:
        """The store's URL; its password travels in ``$PDSERVE_REDIS_PASSWORD``."""
        return f"redis://{self.ip('redis')}:{REDIS_PORT}/0"

    def gateway_url(self, port: int = GATEWAY_PORT) -> str:
        return f"http://{self.ip('head')}:{port}"

    def env(self, credentials: bool = True, **extra: str) -> dict[str, str]:
        """The environment of every process we start: ours, without anything that
        could point it at another cluster, plus Ray's token; with ``credentials`` also
        the cluster secret and the store's password (``pdserve up``, the gateways and
        the agent have them; the Ray nodes do not: the launcher hands them to each
        worker)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PDSERVE_", "UCX_", "NIXL_"))}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.ray_token, PDSERVE_HOME=str(self.root / "home"),
                   PATH=f"{_BIN}:{env.get('PATH', '/usr/bin:/bin')}", PYTHONUNBUFFERED="1")
        if credentials:
            env.update(PDSERVE_CLUSTER_SECRET=self.cluster_secret, PDSERVE_REDIS_PASSWORD=self.redis_password)
        env.update(extra)
        return env

    # -- starting -------------------------------------------------------------------

    def create(self) -> None:
        """The network, after removing what crashed runs left (namespaces, Ray's dirs)."""
        for d in Path(tempfile.gettempdir()).glob(f"{RAY_DIR_PREFIX}*-*"):
            pid = d.name[len(RAY_DIR_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(d, ignore_errors=True)
        self.net.create()

    def _start(self, name: str, host: str, argv: list[str], env: dict[str, str], log_name: str = "") -> Service:
        log = self.root / f"{log_name or name}.log"
        h = self.net.hosts[host]
        svc = Service(h, h.popen(argv, env=env, log=log), log)
        self.services[name] = svc
        return svc

    def start_redis(self) -> Service:
        """redis-server on the redis host, password-protected (its config file is mode
        600, so the password is on no command line); no persistence: a restart is empty."""
        data = self.root / "redis"
        data.mkdir(exist_ok=True)
        conf = data / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"bind {self.ip('redis')}\nport {REDIS_PORT}\nrequirepass {self.redis_password}\n"
                    f"save \"\"\nappendonly no\ndir {data}\ndaemonize no\n")
        svc = self._start("redis", "redis", ["redis-server", str(conf)], self.env(credentials=False))
        svc.host.wait_port(REDIS_PORT, 30, svc.proc, svc.log)
        return svc

    def start_ray(self, workers: dict[str, str], attempts: int = 3) -> None:
        """``ray start`` on the head, then on each worker host (``{host: custom resource}``)
        in parallel, each retried when Ray's fixed 30 s for a new node to register ran out
        (seen on this 2-core machine under load; a second start comes up in seconds)."""
        head = ["--head", "--port", str(RAY_PORT), "--num-cpus", "0", "--include-dashboard", "false"]
        self._start_ray_nodes({"head": head}, attempts)
        join = ["--address", f"{self.ip('head')}:{RAY_PORT}", "--num-cpus", "1"]
        self._start_ray_nodes({h: [*join, "--resources", json.dumps({r: 1})] for h, r in workers.items()}, attempts)

    def _start_ray_nodes(self, nodes: dict[str, list[str]], attempts: int) -> None:
        pending = dict(nodes)
        # UCX_TLS reaches the workers through their raylet's environment (on every node alike).
        for attempt in range(1, attempts + 1):
            started = {h: self._start(f"ray-{h}", h, [
                str(_BIN / "ray"), "start", "--block", *args, "--node-ip-address", self.ip(h),
                "--temp-dir", str(self.ray_root / h), "--disable-usage-stats",
            ], self.env(credentials=False, UCX_TLS="tcp"), log_name=f"ray-{h}.{attempt}") for h, args in pending.items()}
            for h, svc in started.items():
                if _wait_ray_started(svc) or attempt == attempts:
                    pending.pop(h)
                    if svc.proc.poll() is not None:
                        raise RuntimeError(f"ray on {h} did not start (exit {svc.proc.poll()}):\n{svc.tail()}")
                else:  # timed out registering: clear the host and start it again
                    kill_netns_processes(svc.host.netns)
            if not pending:
                return

    def spec_yaml(self) -> Path:
        import yaml  # noqa: PLC0415

        spec = {
            "model": str(self.model_dir), "dtype": "float32", "block_size": 16, "num_kv_blocks": self.num_kv_blocks,
            "transfer_backend": "nixl", "heartbeat_ttl": self.heartbeat_ttl_s,
            "extra_args": ["--prefill-timeout", f"{self.prefill_timeout_s:g}", "--log-level", "WARNING"],
            "pools": [
                # Chunked (256 tokens a step), so a long prompt's prefill takes several
                # steps and Stats, answered between steps, shows it running.
                {"role": "prefill", "count": 1, "resources": {"CPU": 1, "host_a": 1},
                 "extra_args": ["--max-num-batched-tokens", "256"]},
                {"role": "decode", "count": 1, "resources": {"CPU": 1, "host_b": 1}},
            ],
        }
        path = self.root / "spec.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    def start_up(self) -> Service:
        """``pdserve up`` on the head, joining the Ray cluster, with the Redis store."""
        return self._start("up", "head", [
            sys.executable, "-m", "pdserve.deploy.cli", "up", "--spec", str(self.spec_yaml()),
            "--model", str(self.model_dir), "--ray-address", f"{self.ip('head')}:{RAY_PORT}",
            "--redis-url", self.store_url, "--host", self.ip("head"), "--port", str(GATEWAY_PORT),
        ], self.env(PDSERVE_API_KEY=self.api_key))

    def gateway_ports(self) -> list[int]:
        """Ports of the gateways running now (``pdserve up``'s and the replicas)."""
        running = [n for n, svc in self.services.items() if n.startswith("gw") and svc.proc.poll() is None]
        return [GATEWAY_PORT, *(self.replica_ports[n] for n in running)]

    def start_gateway(self, name: str, port: int) -> Service:
        """One more gateway process sharing the store (``router.app.serve``); the
        secret and the store's password come from its environment."""
        spec = {"config": {"store_url": self.store_url, "model_dir": str(self.model_dir),
                           "api_key": self.api_key, "stats_interval_s": 0.5},
                "host": self.ip("head"), "port": port}
        self.replica_ports[name] = port
        return self._start(name, "head", [sys.executable, str(_HERE / "gateway_replica.py")],
                           self.env(PDSERVE_TEST_GATEWAY=json.dumps(spec)))

    def start_agent(self, credentials: bool = True) -> Agent:
        """An agent on the client host: with ``credentials`` the test's own (it signs its
        worker calls and logs into Redis); without, a stranger who knows only addresses."""
        if not credentials:
            return self._add_agent(Agent(self.net.hosts["client"], self.env(credentials=False),
                                         self.root / "stranger.log"))
        self.agent = self._add_agent(Agent(self.net.hosts["client"], self.env(), self.root / "agent.log"))
        return self.agent

    def _add_agent(self, agent: Agent) -> Agent:
        self.agents.append(agent)
        return agent

    # -- asking ---------------------------------------------------------------------

    def wait_ready(self, url: str, svc: Service | None = None, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            last = self.agent.call("http", url=f"{url}/ready", timeout=5)
            if last["status"] == 200:
                return
            if svc is not None and svc.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"{url} not ready: {last}\n{svc.tail() if svc else ''}")

    def workers(self) -> dict[str, dict]:
        return {w["worker_id"]: w for w in self.agent.call("workers", store_url=self.store_url)}

    def stats(self, worker: dict) -> dict:
        return self.agent.call("stats", address=worker["address"], role=worker["role"].lower())

    def complete(self, body: dict, port: int = GATEWAY_PORT, timeout: float = 60.0) -> dict:
        return self.agent.call("http", timeout_s=timeout + 30, url=f"{self.gateway_url(port)}/v1/completions",
                               method="POST", body={"model": MODEL_NAME, **body}, timeout=timeout,
                               headers={"Authorization": f"Bearer {self.api_key}"})

    def stream(self, body: dict, port: int = GATEWAY_PORT, timeout: float = 60.0) -> Future:
        return self.agent.submit("sse", url=f"{self.gateway_url(port)}/v1/completions",
                                 body={"model": MODEL_NAME, "stream": True, **body}, timeout=timeout,
                                 headers={"Authorization": f"Bearer {self.api_key}"})

    # -- stopping -------------------------------------------------------------------

    def teardown(self) -> dict[str, Any]:
        """Stop everything in order (pdserve up drains its workers and deregisters them,
        then Ray on the workers, then the head), then delete the namespaces."""
        report: dict[str, Any] = {}
        if "up" in self.services:
            report["up_exit"] = self.services["up"].stop(signal.SIGINT, 90)
        for name in [n for n in self.services if n.startswith("gw")]:
            self.services[name].stop()
        for agent in self.agents:
            agent.close()
        for name in ("ray-a", "ray-b", "ray-head", "redis"):
            if name in self.services:
                self.services[name].stop(signal.SIGTERM, 30)
        report["forced"] = self.net.destroy()
        self._keep_ray_logs()
        shutil.rmtree(self.ray_root, ignore_errors=True)
        return report

    def _keep_ray_logs(self) -> None:
        """Copy each host's Ray logs (the workers' output is there) next to ours."""
        for logs in self.ray_root.glob("*/session_*/logs"):
            host = logs.parent.parent.name
            shutil.copytree(logs, self.root / "ray-logs" / host, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("events", "*.pid", "*.sock"))
