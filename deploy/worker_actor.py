"""The Ray actor that runs one worker (TP rank 0 of its group): ``runner.serve`` on an
asyncio loop in a thread of its own, so the actor stays responsive to ``stop``/``ping``.

``start`` returns once the worker registered in the control-plane store (or raises
:class:`WorkerStartError` with the reason); ``stop`` ends ``serve`` (with a drain when
asked, ``deploy/drain.py``); an actor whose ``serve`` ended on its own exits, so Ray's
actor table tells the truth. Placement and supervision: ``deploy/ray_launcher.py``.

Credentials (the cluster secret, the store's password) arrive as an actor argument,
never in the worker's flags or its runtime environment (which the Ray dashboard shows),
and are set on the parsed arguments ``runner.serve`` reads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

import ray

log = logging.getLogger("pdserve.deploy.ray")

class WorkerStartError(RuntimeError):
    """A worker could not be placed, or its process failed before it registered."""


@ray.remote(max_concurrency=4, max_restarts=0)
class WorkerActor:
    """One worker (TP rank 0 of its group): runs ``runner.serve`` on its own asyncio loop.

    ``start`` returns once the worker registered in the control-plane store (or raises
    with the reason it did not); ``stop`` ends ``serve`` gracefully (stop serving,
    deregister, free the engine) and waits for it; ``ping`` reports the state.
    """

    def __init__(self, role: str, argv: list[str], env: dict[str, str] | None = None,
                 credentials: dict | None = None) -> None:
        os.environ.update(env or {})  # e.g. CUDA_VISIBLE_DEVICES for the TP ranks the engine spawns
        self.role = role
        self.argv = list(argv)
        #: {"cluster_secret": bytes | None, "store_password": str | None}
        self._credentials = dict(credentials or {})
        self.worker_id: str | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown = None  # deploy.drain.Shutdown, made on the worker's loop
        self._stop_requested = False
        self._drain_requested = False
        self._error: BaseException | None = None
        self._registered = False
        self._lock = threading.Lock()

    def start(self, timeout_s: float = 300.0) -> dict:
        from pdserve.deploy.runner import WorkerConfig, build_parser  # noqa: PLC0415 - the engine loads in the actor
        from pdserve.deploy.store import open_store  # noqa: PLC0415

        if self._thread is not None:
            raise RuntimeError("worker already started")
        args = WorkerConfig.from_args(build_parser(self.role).parse_args(self.argv),
                                      cluster_secret=self._credentials.get("cluster_secret"),
                                      store_password=self._credentials.get("store_password"))
        if not args.worker_id:
            raise ValueError("the launcher must name the worker (--worker-id)")
        self.worker_id = args.worker_id
        logging.basicConfig(level=args.log_level,
                            format=f"%(asctime)s {self.role} {args.worker_id} %(levelname)s %(name)s: %(message)s")
        t0_ms = int(time.time() * 1000)
        self._thread = threading.Thread(target=self._run, args=(args,), name=f"pdserve-{args.worker_id}", daemon=True)
        self._thread.start()
        store = open_store(args.store, cluster_secret=args.cluster_secret, password=args.store_password)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if not self._thread.is_alive():
                    err = self._error
                    raise WorkerStartError(
                        f"worker {args.worker_id} exited before registering: "
                        f"{type(err).__name__ + ': ' + str(err) if err else 'serve returned'}"
                    )
                try:
                    info = store.get_worker(args.worker_id)
                except Exception as e:  # noqa: BLE001 - the store may be briefly unreachable; keep polling
                    log.debug("store lookup failed: %s", e)
                    info = None
                # started_at_ms tells our registration from a stale one of an earlier incarnation.
                if info is not None and info.started_at_ms >= t0_ms:
                    self._registered = True
                    return {"worker_id": args.worker_id, "address": info.address, "pid": os.getpid(),
                            "node_id": ray.get_runtime_context().get_node_id()}
                if time.monotonic() > deadline:
                    self._request_stop()
                    raise WorkerStartError(f"worker {args.worker_id} did not register within {timeout_s:.0f} s")
                time.sleep(0.05)
        finally:
            store.close()

    def _run(self, args) -> None:
        from pdserve.deploy.drain import Shutdown  # noqa: PLC0415
        from pdserve.deploy.runner import serve  # noqa: PLC0415

        async def main() -> None:
            with self._lock:
                self._loop = asyncio.get_running_loop()
                self._shutdown = Shutdown()
                if self._stop_requested:
                    self._shutdown.request(drain=self._drain_requested)
            await serve(args, self.role, self._shutdown)

        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - reported by start/ping
            self._error = e
            log.exception("worker %s failed", args.worker_id)
        if self._registered and not self._stop_requested:
            # serve ended on its own after the worker was up: die like a plain-process
            # worker would, so Ray's actor state (alive()) tells the truth.
            log.error("worker %s stopped serving unexpectedly; exiting the actor", args.worker_id)
            os._exit(1)

    def _request_stop(self, drain: bool = False) -> None:
        with self._lock:
            self._stop_requested = True
            self._drain_requested = drain
            if self._loop is not None and self._shutdown is not None:
                try:
                    self._loop.call_soon_threadsafe(self._shutdown.request, drain)
                except RuntimeError:  # loop already closed: serve is over
                    pass

    def stop(self, timeout_s: float = 30.0, drain: bool = False) -> bool:
        """Stop serving, deregister, shut the engine down; True once ``serve`` returned.

        With ``drain`` the worker first drains (``deploy/drain.py``): it is marked
        draining, finishes its in-flight requests, and only then stops; ``timeout_s``
        should then exceed the worker's ``--drain-timeout``.
        """
        self._request_stop(drain)
        if self._thread is not None:
            self._thread.join(timeout_s)
            return not self._thread.is_alive()
        return True

    def ping(self) -> dict:
        return {"worker_id": self.worker_id, "pid": os.getpid(),
                "serving": self._thread is not None and self._thread.is_alive(),
                "error": None if self._error is None else f"{type(self._error).__name__}: {self._error}"}
