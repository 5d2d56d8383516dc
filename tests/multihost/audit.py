"""Every TCP port listening on the hosts, probed by a client that holds no credentials.

:func:`audit` lists the listening sockets of each host (``ss -ltnp`` in its namespace),
skips those on loopback (no other host can reach them), names each by what owns it, and
probes it from the client host with an agent that has neither the cluster secret nor
the Redis password. What each kind must answer (docs/security.md, "What listens where"):

==========================  =================================================================
worker gRPC                 UNAUTHENTICATED for every Prefill / Decode method (health is open)
gateway HTTP                401 on /v1/models without the API key (/health, /ready open)
Redis                       -NOAUTH
worker metrics HTTP         open, read-only Prometheus text (documented); on the node IP
NIXL/UCX listener           unauthenticated (documented); bound to the node IP only
Ray gRPC (GCS, raylet,      UNAUTHENTICATED (Ray's token), for a read-only method of the
object manager, workers,    service that port serves
client server)
Ray HTTP agents             401 without Ray's token, except :data:`RAY_OPEN`
anything else               a problem
==========================  =================================================================
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

PDSERVE_METHODS = {
    "PREFILL": ("/pdserve.v1.Prefill/Prefill", "/pdserve.v1.Prefill/Abort", "/pdserve.v1.Prefill/Stats"),
    "DECODE": ("/pdserve.v1.Decode/Generate", "/pdserve.v1.Decode/Abort", "/pdserve.v1.Decode/Stats"),
}
#: One harmless (read-only or no-op on an empty request) method per Ray gRPC service; a
#: port answers UNIMPLEMENTED for services it does not serve.
RAY_METHODS = (
    "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo",
    "/ray.rpc.NodeManagerService/GetNodeStats",
    "/ray.rpc.ObjectManagerService/Pull",
    "/ray.rpc.CoreWorkerService/GetCoreWorkerStats",
    "/ray.rpc.RayletDriver/ClusterInfo",
)
#: Ray's own listeners that answer without its token, by a fragment of the owner's
#: command line: not pdserve's, and read-only.
RAY_OPEN = {
    "ray/autoscaler/_private/monitor.py": "Ray autoscaler's Prometheus metrics (port 44217, 0.0.0.0, read-only)",
}


@dataclass
class Listener:
    host: str
    bind: str
    port: int
    pid: int
    cmdline: str
    target: str = ""
    kind: str = ""
    verdict: str = ""
    ok: bool = False

    def __str__(self) -> str:
        return (f"{'ok ' if self.ok else 'BAD'} {self.host:<5} {self.bind}:{self.port:<6} {self.kind:<22} "
                f"{self.verdict}  [{self.cmdline[:60]}]")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _pid(users: str) -> int:
    return int(users.split("pid=", 1)[1].split(",", 1)[0]) if "pid=" in users else 0


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _http_status(answer: str) -> int | None:
    parts = answer.split(" ", 2)
    return int(parts[1]) if answer.startswith("HTTP/") and len(parts) > 1 and parts[1].isdigit() else None


def audit(dep, stranger, hosts: tuple[str, ...] = ("head", "a", "b", "redis")) -> list[Listener]:
    workers = dep.workers()
    worker_grpc = {w["address"]: w for w in workers.values()}
    worker_metrics = {urlsplit(w["metrics_url"]).netloc for w in workers.values()}
    gateways = {f"{dep.ip('head')}:{p}" for p in dep.gateway_ports()}
    redis = f"{dep.ip('redis')}:6379"
    found: list[Listener] = []
    for name in hosts:
        for bind, port, users in dep.net.hosts[name].listening():
            pid = _pid(users)
            found.append(Listener(name, bind, port, pid, _cmdline(pid)))
    by_target = {}
    for lst in found:
        wildcard = lst.bind in ("0.0.0.0", "*", "::")
        lst.target = f"{dep.ip(lst.host) if wildcard else lst.bind}:{lst.port}"
        by_target[lst.target] = lst
    pdserve_pids = {by_target[t].pid for t in [*worker_grpc, *gateways] if t in by_target}
    for lst in found:
        _judge(lst, dep, stranger, worker_grpc, worker_metrics, gateways, redis, pdserve_pids)
    return found


def _judge(lst: Listener, dep, stranger, worker_grpc, worker_metrics, gateways, redis, pdserve_pids) -> None:
    on_node_ip = lst.bind == dep.ip(lst.host)
    if _is_loopback(lst.bind):
        lst.kind, lst.verdict, lst.ok = "loopback", "not reachable from other hosts", True
        return
    target = lst.target
    if target == redis:
        answer = stranger.call("tcp_probe", host=dep.ip("redis"), port=lst.port, send="PING\r\n").get("answer", "")
        lst.kind, lst.verdict, lst.ok = "redis", answer.strip(), answer.startswith("-NOAUTH")
    elif target in gateways:
        r = stranger.call("http", url=f"http://{target}/v1/models", timeout=5)
        lst.kind, lst.verdict, lst.ok = "gateway", f"/v1/models without key: {r['status']}", r["status"] == 401
    elif target in worker_grpc:
        role = worker_grpc[target]["role"]
        codes = {m: stranger.call("grpc_probe", address=target, method=m)["code"] for m in PDSERVE_METHODS[role]}
        lst.kind = f"worker gRPC ({worker_grpc[target]['worker_id']})"
        lst.verdict = ", ".join(f"{m.rsplit('/', 1)[1]}: {c}" for m, c in codes.items())
        lst.ok = on_node_ip and set(codes.values()) == {"UNAUTHENTICATED"}
    elif target in worker_metrics:
        r = stranger.call("http", url=f"http://{target}/metrics", timeout=5)
        lst.kind, lst.verdict = "worker metrics", f"open, read-only (documented): GET /metrics {r['status']}"
        lst.ok = on_node_ip and r["status"] == 200
    else:
        _judge_other(lst, stranger, on_node_ip, lst.pid in pdserve_pids)


def _judge_other(lst: Listener, stranger, on_node_ip: bool, is_pdserve_process: bool) -> None:
    codes = [stranger.call("grpc_probe", address=lst.target, method=m)["code"] for m in RAY_METHODS]
    is_grpc = bool({"UNIMPLEMENTED", "UNAUTHENTICATED", "OK"} & set(codes))
    owner = "pdserve process" if is_pdserve_process else "Ray"
    if is_grpc:
        lst.kind = f"Ray gRPC in {owner}"
        lst.verdict = "UNAUTHENTICATED" if "UNAUTHENTICATED" in codes else f"answers without a token: {codes}"
        lst.ok = "UNAUTHENTICATED" in codes and "OK" not in codes
        return
    answer = stranger.call("tcp_probe", host=lst.target.rsplit(":", 1)[0], port=lst.port,
                           send="GET / HTTP/1.0\r\n\r\n")
    status = _http_status(answer.get("answer", ""))
    if status is not None:
        lst.kind = f"HTTP in {owner}"
        open_ok = next((why for frag, why in RAY_OPEN.items() if frag in lst.cmdline), None)
        if status == 401:
            lst.verdict, lst.ok = "401 without Ray's token", not is_pdserve_process
        elif open_ok and not is_pdserve_process:
            lst.verdict, lst.ok = f"open: {open_ok}", True
        else:
            lst.verdict = f"answers {status} without credentials"
        return
    if is_pdserve_process:
        # Neither gRPC nor HTTP in a worker: the NIXL/UCX TCP listener (no authentication
        # by design, docs/security.md), which must sit on the node IP only.
        lst.kind, lst.verdict, lst.ok = "NIXL/UCX (TCP)", "unauthenticated (documented)", on_node_ip
        if not on_node_ip:
            lst.verdict += f", but bound to {lst.bind}, not the node IP"
        return
    lst.kind, lst.verdict = f"unknown ({owner})", f"not gRPC, not HTTP: {answer}"


def credential_leaks(dep) -> list[str]:
    """Where a credential shows: on any command line in our namespaces (``ps`` shows
    those to every user), or in the environment of a process on a worker host (Ray
    shows actors' runtime environments; the launcher must hand credentials over as
    actor arguments). Ray's token is expected in the worker hosts' environment (every
    Ray node needs it: docs/security.md), so only the cluster secret, the Redis password
    and the API key are looked for there."""
    secrets = {"cluster secret": dep.cluster_secret, "Redis password": dep.redis_password,
               "API key": dep.api_key, "Ray token": dep.ray_token}
    leaks = []
    for host in dep.net.hosts.values():
        for pid in host.pids():
            cmdline = _cmdline(pid)
            leaks += [f"{name} on the command line of {pid} on {host.name}: {cmdline[:80]}"
                      for name, value in secrets.items() if value in cmdline]
            if host.name in ("a", "b"):
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                leaks += [f"{name} in the environment of {pid} on {host.name}: {cmdline[:80]}"
                          for name, value in secrets.items() if name != "Ray token" and value in environ]
    return leaks
