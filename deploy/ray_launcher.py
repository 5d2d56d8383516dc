"""Launch a :class:`~pdserve.deploy.cluster.ClusterSpec`'s workers as Ray actors.

::

    server = ControlPlaneServer(); server.start()          # or a Redis URL
    with RayLauncher(spec, server.url) as launcher:         # local Ray (or ray_address=...)
        workers = launcher.launch()                        # [WorkerHandle(worker_id, role, address, actor)]
        ...
        launcher.stop_worker("prefill-0")                  # graceful: deregisters, then exits
        launcher.kill_worker("decode-0")                   # crash: no cleanup, the store's TTL notices

Placement. Every worker is one tensor-parallel group and gets its own placement group
of ``tp_size`` bundles (each bundle = the pool's per-rank resources) with strategy
``STRICT_PACK``, so a TP group never spans nodes. The :class:`WorkerActor` (``deploy/worker_actor.py``) is placed in
bundle 0 and consumes exactly that bundle's resources. It runs the same
``pdserve.deploy.runner.serve`` coroutine as a plain-process worker, on an asyncio loop
in a thread of its own, so the actor stays responsive to ``stop``/``ping`` calls.

TP ranks 1..tp-1 are *not* Ray actors: the engine (``engine/executor.py``,
``MultiprocExecutor``) spawns them itself as torch multiprocessing children of the
actor process. They run inside the resources that bundles 1..tp-1 reserve: nothing else
is ever scheduled into a worker's placement group, so those bundles stay free for them.
On GPU bundles Ray would restrict the actor (and so its children) to bundle 0's GPU;
for ``tp_size > 1`` the launcher therefore asks each bundle which GPU it holds (a tiny
probe task per bundle), starts the actor with Ray's ``CUDA_VISIBLE_DEVICES`` override
off, and sets ``CUDA_VISIBLE_DEVICES`` to the group's GPUs in rank order before the
engine spawns its ranks. (That path has not been run on GPUs yet.)

Spreading. Each group gets a *soft* target node from
:class:`~pdserve.deploy.placement.SpreadPlanner`: the node, among those that fit the
whole group now, hosting the fewest workers of the same pool (then the fewest of any),
so a pool spreads across nodes while each TP group stays on one.
:meth:`RayLauncher.placement` reports where every rank landed.

Multi-node. On a cluster the launcher joined (``ray_address``, or a Ray already
initialized in the process) each worker binds its gRPC server, metrics endpoint and
torch_dist KV store to its node's IP (``--host``, ``PDSERVE_KV_HOST``) and registers
that address, so the gateway and the other workers reach it from any node; a spec
whose ``extra_args`` set ``--host`` keeps its own. A Ray the launcher started itself
is one machine: workers stay on loopback. A store URL on loopback is refused (a clear
``ValueError``) when the cluster has nodes on other IPs, since their workers could
never register. Leaving, the launcher removes only what it created (its actors and
placement groups) and disconnects; a cluster it joined keeps running.

Liveness. The store is the source of truth for routing: a worker heartbeats its
registration every TTL/3 and a dead one expires after its TTL (the store removes
expired entries on read). :meth:`RayLauncher.alive` answers from Ray's actor table;
an actor's lifetime is its worker's: if ``serve`` ends on its own after registering
(a crash), the actor process exits. Ray kills a dead actor's child processes (its TP
ranks) along with it.

Ray is the orchestrator, never on the data path: requests and KV go over gRPC and the
transfer backend, never through Ray objects.

Security (docs/security.md). A local Ray the launcher starts listens on 127.0.0.1 only
(GCS, raylet, object manager, agents, workers: :func:`_loopback_ray`), with Ray's token
authentication on and its token file readable by its owner only. Each worker gets the
cluster secret (``cluster_secret``, else the environment's; generated here when a
worker would listen beyond loopback without one: :attr:`RayLauncher.cluster_secret`)
and the store's password as actor arguments: never in its flags (the store URL it gets
has no password) or its runtime environment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable
from urllib.parse import urlsplit

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pdserve.proto import auth

from .cluster import ClusterSpec, PoolSpec
from .credentials import redis_password, strip_password, url_password
from .worker_actor import WorkerActor, WorkerStartError
from .placement import NodeView, SpreadPlanner, group_resources, live_nodes, plain_resources

log = logging.getLogger("pdserve.deploy.ray")

#: Object store size of a local Ray instance the launcher starts: workers pass no data
#: through Ray, so keep it at Ray's minimum-ish instead of 30% of memory.
LOCAL_OBJECT_STORE_BYTES = 128 << 20
_NOSET_CUDA = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"



@dataclass
class WorkerHandle:
    worker_id: str
    role: str
    #: gRPC ``host:port`` the worker registered.
    address: str
    actor: Any  # ray.actor.ActorHandle
    pool: str = ""
    index: int = 0
    placement_group: PlacementGroup | None = field(default=None, repr=False)
    #: Ray node id and OS pid of the actor process (TP rank 0).
    node_id: str = ""
    pid: int = 0
    #: Ray node id of every bundle (TP rank) of the worker's placement group, in rank order.
    bundle_node_ids: tuple[str, ...] = ()


@ray.remote(num_cpus=0)
def _bundle_gpu_ids() -> list[str]:
    return [str(i) for i in ray.get_gpu_ids()]


def _actor_resource_options(resources: dict[str, float]) -> dict[str, Any]:
    res = dict(resources)
    opts: dict[str, Any] = {"num_cpus": res.pop("CPU", 0), "num_gpus": res.pop("GPU", 0)}
    if "memory" in res:
        opts["memory"] = res.pop("memory")
    if res:
        opts["resources"] = res
    return opts


LOCAL_START_ATTEMPTS = 3


#: Ray 2.60's switch for single-machine platforms: off, a new node takes 127.0.0.1 as its
#: IP instead of the external interface's, and every Ray server binds the node IP.
_RAY_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_ray():
    """While a new local Ray node starts: make it bind 127.0.0.1, not every interface.

    NOTE: Ray 2.60 binds its servers to the node IP, and picks the external interface's
    address for a new node even when given 127.0.0.1 (``resolve_ip_for_localhost``),
    unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is off: then a node is one machine, on
    loopback. The variable is read by the processes the node starts (they inherit it),
    and by this process once, at import (``ray_constants.ENABLE_RAY_CLUSTER``), so both
    are set while the node starts and restored after. Checked with ``ss -ltnp``: GCS,
    raylet, object manager, agents and workers all on 127.0.0.1
    (tests/integration/test_security.py).
    """
    from ray._private import ray_constants  # noqa: PLC0415

    old_env = os.environ.get(_RAY_SINGLE_MACHINE)
    old_const = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_RAY_SINGLE_MACHINE] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop(_RAY_SINGLE_MACHINE, None)
        else:
            os.environ[_RAY_SINGLE_MACHINE] = old_env
        if old_const is not None:
            ray_constants.ENABLE_RAY_CLUSTER = old_const


def _ensure_ray_token_file() -> None:
    """Ray 2.60 turns token authentication on for a new local node and writes a missing
    token to ``~/.ray/auth_token`` with the default umask (often world-readable). Write
    it first, readable by its owner only; warn about an existing one others can read."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = os.path.expanduser("~/.ray/auth_token")
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        return
    if mode & 0o077:
        log.warning("Ray's token file %s is readable by other users (mode %04o): chmod 600 %s", path, mode, path)


def _start_local_ray(**kwargs: Any) -> None:
    """``ray.init`` of a new local node, retried when the node is slow to come up.

    NOTE: Ray gives a new raylet a fixed 30 s to register. The first start in a fresh
    environment (its agents' one-time set-up) on a loaded 2-core machine has been seen
    to overrun that; a second start then comes up in seconds. Ray also waits 30 s for a
    new GCS to publish its port ("Timed out waiting for file .../gcs_server_port_...");
    on the loaded 2-core machine 5 of 94 local starts in a day ended that way, with no
    GCS log written at all (the chaos soak, tests/soak, met 4 of them). A second start
    comes up as usual (checked by failing the first on purpose); what the failed one
    started lives until this process exits, then dies with it (Ray's fate sharing).
    """
    _ensure_ray_token_file()
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            with _loopback_ray():
                ray.init(address="local", **kwargs)
            if ray.util.get_node_ip_address() != "127.0.0.1":
                log.warning("the local Ray node is on %s, not loopback", ray.util.get_node_ip_address())
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            is_slow = "timed out during startup" in str(e) or "gcs_server_port" in str(e)
            if not is_slow or attempt == LOCAL_START_ATTEMPTS:
                raise
            log.warning("local Ray node was slow to start (attempt %d): %s; retrying", attempt, e)
            ray.shutdown()


class RayLauncher:
    """Places and supervises the workers of a :class:`ClusterSpec` on Ray.

    ``store_url`` is the control-plane store every worker registers in (``grpc://``
    of a :class:`~pdserve.deploy.store.ControlPlaneServer`, or ``redis://``); it must be
    reachable from the worker processes. ``ray_address``: an existing cluster
    (``"auto"``, ``"host:port"``, ``"ray://..."``); None starts a local Ray instance with
    ``num_cpus = max(cores, CPUs the spec needs)`` (logical CPUs, so a TP=2 spec still
    fits a 2-core box), no dashboard and a small object store, on 127.0.0.1 only. If
    Ray is already initialized in this process the launcher uses it and leaves it
    running on shutdown. With ``ray_address`` the launcher's :meth:`shutdown` only
    disconnects this process from the cluster (after removing its own actors and
    placement groups).

    ``cluster_secret`` (default: the environment's) is every worker's; ``store_password``
    (default: the store URL's, else the environment's) is the Redis store's. Both reach
    the workers as actor arguments only.
    """

    def __init__(
        self,
        spec: ClusterSpec,
        store_url: str,
        ray_address: str | None = None,
        *,
        log_to_driver: bool = False,
        runtime_env: dict | None = None,
        namespace: str | None = None,
        placement_timeout_s: float = 60.0,
        start_timeout_s: float = 300.0,
        num_cpus: int | None = None,
        cluster_secret: bytes | None = None,
        store_password: str | None = None,
    ) -> None:
        if not isinstance(spec, ClusterSpec):
            raise TypeError(f"spec must be a ClusterSpec, got {type(spec).__name__}")
        if not store_url or "://" not in store_url:
            raise ValueError(
                f"store_url must be a URL the workers can reach (grpc://host:port or redis://...), got {store_url!r}"
            )
        self.spec = spec
        self.store_url = store_url
        #: The workers' secret (None: none given, and every worker listens on loopback).
        self.cluster_secret: bytes | None = cluster_secret if cluster_secret is not None else auth.load_secret()
        is_redis = urlsplit(store_url).scheme in ("redis", "rediss", "unix")
        self._store_password = store_password or url_password(store_url) or (
            redis_password(store_url) if is_redis else None)
        self._worker_store_url = strip_password(store_url)
        self.ray_address = ray_address
        self.placement_timeout_s = placement_timeout_s
        self.start_timeout_s = start_timeout_s
        self.workers: dict[str, WorkerHandle] = {}
        self._tag = uuid.uuid4().hex[:6]
        self._owns_ray = False
        self._closed = False
        #: Workers bind to their node's IP unless this launcher started a local Ray.
        self._bind_node_ip = True
        if ray.is_initialized():
            if runtime_env or ray_address or num_cpus is not None:
                log.warning("Ray is already initialized in this process: ignoring ray_address/runtime_env/num_cpus")
            return
        kw: dict[str, Any] = {"log_to_driver": log_to_driver, "namespace": namespace, "runtime_env": runtime_env,
                              "configure_logging": False}
        if ray_address:
            try:
                ray.init(address=ray_address, **kw)
            except ConnectionError as e:
                # NOTE: Ray 2.60 turns token authentication on for `ray start --head` when
                # ~/.ray/auth_token exists; a driver without the token only sees this.
                raise ConnectionError(
                    f"{e} (if the cluster uses token authentication, set RAY_AUTH_MODE=token and give "
                    f"this machine the cluster's token: RAY_AUTH_TOKEN or ~/.ray/auth_token)"
                ) from e
        else:
            cpus = num_cpus if num_cpus is not None else max(
                os.cpu_count() or 1, int(-(-spec.total_resources().get("CPU", 0) // 1))
            )
            _start_local_ray(num_cpus=cpus, include_dashboard=False,
                             object_store_memory=LOCAL_OBJECT_STORE_BYTES, **kw)
            self._bind_node_ip = False
        self._owns_ray = True

    # ------------------------------------------------------------------ launching

    def launch(self) -> list[WorkerHandle]:
        """Start every worker of the spec (in parallel); returns once all registered.

        On any failure, the workers this call started are torn down and the error is
        raised (:class:`WorkerStartError`).
        """
        return self._launch(list(self.spec.workers()))

    def launch_worker(self, pool: PoolSpec | str, index: int) -> WorkerHandle:
        """Start one more worker (e.g. to replace one that died): ``<pool>-<index>``."""
        return self._launch([(self.spec._resolve_pool(pool), index)])[0]

    def _launch(self, targets: list[tuple[PoolSpec, int]]) -> list[WorkerHandle]:
        self._check_open()
        for p, i in targets:
            if p.worker_id(i) in self.workers:
                raise ValueError(f"worker {p.worker_id(i)} is already running")
        try:
            nodes = live_nodes()
        except Exception as e:  # noqa: BLE001 - e.g. Ray Client: place without spreading
            log.warning("cannot list the cluster's nodes (%s); placing workers without spreading them", e)
            nodes = []
        if self._bind_node_ip:
            self._check_store_reachable(nodes)
        planner = SpreadPlanner(nodes, [(h.pool, h.node_id) for h in self.workers.values()])
        started: list[tuple[PoolSpec, int, PlacementGroup, Any]] = []
        pgs: list[tuple[PoolSpec, int, PlacementGroup]] = []
        bundle_nodes: dict[str, tuple[str, ...]] = {}
        try:
            for p, i in targets:
                pgs.append((p, i, placement_group(p.bundles(), strategy="STRICT_PACK",
                                                  name=f"pdserve-{self._tag}-{p.worker_id(i)}",
                                                  _soft_target_node_id=planner.choose(p))))
            self._wait_placed(pgs, planner)
            addresses = {n.node_id: n.address for n in nodes}
            for p, i, pg in pgs:
                bundle_nodes[p.worker_id(i)] = nodes_of = _bundle_node_ids(pg)
                if nodes_of[0] not in addresses:  # a node that joined after the snapshot
                    addresses.update({n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()})
                host = addresses[nodes_of[0]] if self._bind_node_ip else None
                if host is not None and not auth.is_loopback(host) and self.cluster_secret is None:
                    self.cluster_secret = auth.generate_secret()
                    log.info("workers listen beyond loopback and no cluster secret was given: generated one")
                started.append((p, i, pg, self._create_actor(p, i, pg, host)))
            refs = [actor.start.remote(self.start_timeout_s) for *_, actor in started]
            handles = []
            for (p, i, pg, actor), ref in zip(started, refs):
                try:
                    info = ray.get(ref, timeout=self.start_timeout_s + 30)
                except ray.exceptions.RayError as e:
                    cause = getattr(e, "cause", None) or e
                    msg = str(cause) if isinstance(cause, WorkerStartError) else f"worker {p.worker_id(i)} failed to start: {cause}"
                    raise WorkerStartError(msg) from None
                handles.append(WorkerHandle(worker_id=info["worker_id"], role=p.role, address=info["address"],
                                            actor=actor, pool=p.name, index=i, placement_group=pg,
                                            node_id=info["node_id"], pid=info["pid"],
                                            bundle_node_ids=bundle_nodes[p.worker_id(i)]))
        except BaseException:
            # Those that did register deregister first, so the store does not keep them for a TTL.
            stops = [actor.stop.remote(5.0) for *_, actor in started]
            if stops:
                ray.wait(stops, num_returns=len(stops), timeout=10)
            for *_, actor in started:
                self._kill_actor(actor)
            for *_, pg in pgs:
                self._remove_pg(pg)
            raise
        for h in handles:
            self.workers[h.worker_id] = h
            log.info("worker %s (%s) ready at %s on node %s", h.worker_id, h.role, h.address, h.node_id[:8])
        return handles

    def _wait_placed(self, pgs: list[tuple[PoolSpec, int, PlacementGroup]], planner: SpreadPlanner) -> None:
        pending = {pg.ready(): (p, i) for p, i, pg in pgs}
        ready, not_ready = ray.wait(list(pending), num_returns=len(pending), timeout=self.placement_timeout_s)
        if not_ready:
            missing = [pending[r] for r in not_ready]
            p = missing[0][0]
            # NOTE: no fail-fast when no node can ever fit: an autoscaler may add one.
            why = ("the cluster's nodes could not be listed" if not planner.nodes
                   else "no node of the cluster is that large" if not planner.can_ever_fit(p)
                   else "the nodes that could hold it are busy")
            raise WorkerStartError(
                f"could not place {[q.worker_id(i) for q, i in missing]} within {self.placement_timeout_s:.0f} s: "
                f"each needs {p.tp_size} x {dict(p.resources)} = {group_resources(p)} on ONE node (STRICT_PACK), "
                f"and {why}; nodes (total resources): {_node_summary(planner.nodes)}; "
                f"available now: {plain_resources(ray.available_resources())}"
            )
        ray.get(ready)

    def _check_store_reachable(self, nodes: list[NodeView]) -> None:
        host = urlsplit(self.store_url).hostname or ""
        if host not in ("localhost", "::1") and not host.startswith("127."):
            return
        here = ray.util.get_node_ip_address()
        remote = sorted({n.address for n in nodes} - {here})
        if remote:
            raise ValueError(
                f"the control-plane store {self.store_url} is on loopback, which workers on other nodes "
                f"({', '.join(remote)}) cannot reach: use a store every node reaches (e.g. --redis-url "
                f"redis://<host>:6379)"
            )

    def _create_actor(self, pool: PoolSpec, index: int, pg: PlacementGroup, host: str | None = None):
        argv = self.spec.worker_args(pool, index, store_url=self._worker_store_url)
        env: dict[str, str] = {}
        if host is not None and not any(a == "--host" or a.startswith("--host=") for a in argv):
            argv += ["--host", host]
            env["PDSERVE_KV_HOST"] = host  # the torch_dist backend's KV store binds there
        runtime_env: dict | None = None
        if pool.tp_size > 1 and pool.resources.get("GPU", 0) > 0:
            ids: list[str] = []
            probes = [
                _bundle_gpu_ids.options(num_gpus=pool.resources["GPU"], scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=b)).remote()
                for b in range(pool.tp_size)
            ]
            for got in ray.get(probes, timeout=self.placement_timeout_s):
                ids += [g for g in got if g not in ids]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
            runtime_env = {"env_vars": {_NOSET_CUDA: "1"}}
        opts = _actor_resource_options(dict(pool.resources))
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=False
        )
        if runtime_env:
            opts["runtime_env"] = runtime_env
        credentials = {"cluster_secret": self.cluster_secret, "store_password": self._store_password}
        return WorkerActor.options(**opts).remote(pool.role, argv, env, credentials)

    # ------------------------------------------------------------------ supervision

    def placement(self) -> dict[str, list[str]]:
        """worker_id -> the Ray node id of each of its bundles (TP ranks), in rank order."""
        return {wid: list(h.bundle_node_ids) for wid, h in sorted(self.workers.items())}

    def handle(self, worker_id: str) -> WorkerHandle:
        try:
            return self.workers[worker_id]
        except KeyError:
            raise KeyError(f"no worker {worker_id!r} launched; running: {sorted(self.workers)}") from None

    def stop_worker(self, worker_id: str, timeout_s: float = 30.0, drain: bool = False) -> bool:
        """Graceful stop: the worker stops serving, deregisters from the store and exits.

        With ``drain`` it first finishes its in-flight requests (see ``WorkerActor.stop``).
        Returns True when ``serve`` finished (deregistered) within ``timeout_s``; the
        actor and its placement group are released either way.
        """
        h = self.handle(worker_id)
        try:
            graceful = bool(ray.get(h.actor.stop.remote(timeout_s, drain), timeout=timeout_s + 10))
        except (ray.exceptions.RayError, TimeoutError) as e:
            log.warning("graceful stop of %s failed: %s", worker_id, e)
            graceful = False
        self._release(h)
        return graceful

    def kill_worker(self, worker_id: str) -> None:
        """Kill the worker's process with no cleanup (simulates a crash): it stays
        registered until its heartbeat TTL lapses."""
        self._release(self.handle(worker_id))

    def _release(self, h: WorkerHandle) -> None:
        self._kill_actor(h.actor)
        if h.placement_group is not None:
            self._remove_pg(h.placement_group)
        self.workers.pop(h.worker_id, None)

    def alive(self) -> dict[str, bool]:
        """worker_id -> whether Ray reports its actor ALIVE (for every launched worker)."""
        if not self.workers or not ray.is_initialized():
            return {w: False for w in self.workers}
        out = {}
        for wid, h in self.workers.items():
            out[wid] = _actor_state(h.actor) == "ALIVE"
        return out

    def ping(self, worker_id: str, timeout_s: float = 10.0) -> dict:
        """The actor's own view: pid, whether ``serve`` still runs, its error if any."""
        return ray.get(self.handle(worker_id).actor.ping.remote(), timeout=timeout_s)

    # ------------------------------------------------------------------ shutdown

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop every worker gracefully (in parallel), release all actors and placement
        groups, then ``ray.shutdown()`` if this launcher initialized Ray. Idempotent."""
        if self._closed:
            return
        self._closed = True
        handles = list(self.workers.values())
        if handles and ray.is_initialized():
            refs = [h.actor.stop.remote(timeout_s) for h in handles]
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s + 10)
            for h, ref in zip(handles, refs):
                if ref not in done:
                    log.warning("worker %s did not stop within %.0f s; killing it", h.worker_id, timeout_s)
                else:
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayError:
                        pass  # already dead
            for h in handles:
                self._release(h)
        self.workers.clear()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> "RayLauncher":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the launcher was shut down")

    @staticmethod
    def _kill_actor(actor) -> None:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as e:  # noqa: BLE001 - already gone
            log.debug("ray.kill: %s", e)

    @staticmethod
    def _remove_pg(pg: PlacementGroup) -> None:
        try:
            remove_placement_group(pg)
        except Exception as e:  # noqa: BLE001 - already removed
            log.debug("remove_placement_group: %s", e)


def _bundle_node_ids(pg: PlacementGroup) -> tuple[str, ...]:
    nodes = ray.util.placement_group_table(pg)["bundles_to_node_id"]
    return tuple(nodes[b] for b in sorted(nodes))


def _node_summary(nodes: list[NodeView]) -> str:
    return ", ".join(f"{n.node_id[:8]}@{n.address} {dict(n.total)}" for n in nodes) or "none alive"


def _actor_state(actor) -> str:
    """Ray's actor-table state (ALIVE, PENDING_CREATION, RESTARTING, DEAD, ...)."""
    from ray._private import state as ray_state  # noqa: PLC0415 - no public API without the dashboard

    info = ray_state.actors(actor_id=actor._actor_id.hex())
    return info.get("State", "DEAD") if info else "DEAD"


def launch(spec: ClusterSpec, store_url: str, ray_address: str | None = None, **kw) -> tuple[RayLauncher, list[WorkerHandle]]:
    """Convenience: make a :class:`RayLauncher` and launch the spec (shut down on failure)."""
    launcher = RayLauncher(spec, store_url, ray_address, **kw)
    try:
        return launcher, launcher.launch()
    except BaseException:
        launcher.shutdown()
        raise


__all__: Iterable[str] = ["RayLauncher", "WorkerActor", "WorkerHandle", "WorkerStartError", "launch"]
