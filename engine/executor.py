"""Runs a step on every rank of the tensor-parallel group.

``LocalExecutor`` is the group of one. ``MultiprocExecutor`` spawns ranks
1..tp-1 as processes; rank 0 (this process) broadcasts each step's inputs —
a header of shapes, then the tensors — and every rank runs the same forward,
joining the all-reduces inside the model. Workers leave on a STOP header or when
the group breaks. ``execute`` returns rank 0's ``ModelOutput``: the sampled rows'
logits, and the prompt-logprob rows (which the other ranks help compute, since the
LM head gathers the vocabulary from every rank, but do not reduce or keep).

Rank extensions (``EngineConfig.rank_extension``) are per-rank objects that live
beside the model runner, such as a KV transfer agent registered over that rank's KV
region. ``call_extension(payload)`` runs ``handle(payload)`` on every rank and
returns each rank's answer; calls must be short (post work, poll), since the group
runs no step meanwhile. A rank whose handler raised makes the call raise on rank 0,
after every rank answered, so the group never desynchronises.

Start-up is watched (``_StartupWatch``): each spawned rank reports over a pipe that it
*started* (imports done, rank extension resolved), then that it is *ready* (group
joined, model loaded, extension built), or why it *failed*. Rank 0 waits for each
stage while watching the processes, and joins the group on a helper thread so a rank
that dies during the rendezvous is noticed at once. A rank that fails or exits at any
stage makes the constructor tear the others down and raise ``RuntimeError`` naming
that rank and its error (or exit code) within a second or so, instead of waiting in
the rendezvous; the rendezvous itself is bounded by ``RENDEZVOUS_TIMEOUT``. The
common cause: a script that builds a TP engine at import time, without an
``if __name__ == "__main__":`` guard, since every spawned rank re-imports the main
module and dies before it starts.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import socket
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection, wait

import torch
import torch.distributed as dist

from .config import EngineConfig
from .model_runner import ModelOutput, ModelRunner, StepInputs
from .parallel import SINGLE, TPGroup

_CMD_STEP, _CMD_STOP, _CMD_EXT = 1, 2, 3
_NUM_FIELDS = len(StepInputs.__dataclass_fields__)
_GROUP_TIMEOUT = timedelta(minutes=10)
"""Collectives of a running group (a step on a large model can be slow)."""
RENDEZVOUS_TIMEOUT = timedelta(seconds=60)
"""Joining the group, once every rank reported that it started."""
START_TIMEOUT_S = 120.0
"""A spawned rank's interpreter start and imports (torch), up to its first report."""
READY_TIMEOUT_S = 1800.0
"""Loading the weights and building the rank extension (a large checkpoint from a slow disk)."""
_STARTED, _READY, _FAILED = b"started", b"ready", b"failed "
_STAGES = (b"", _STARTED, _READY)


def _extension_factory(config: EngineConfig):
    """The rank extension's factory, or None (resolved before joining the group, so a bad
    name fails every rank's start-up instead of one rank's, mid-rendezvous)."""
    if not config.rank_extension:
        return None
    module, _, name = config.rank_extension.partition(":")
    return getattr(importlib.import_module(module), name)


def _load_extension(config: EngineConfig, runner: ModelRunner, tp: TPGroup, factory=None):
    factory = factory or _extension_factory(config)
    return None if factory is None else factory(runner, tp, config.rank_extension_config)


def _handle(extension, payload: bytes) -> bytes:
    """One rank's answer: a status byte (0 ok, 1 error) then the handler's bytes or message."""
    try:
        return b"\x00" + extension.handle(payload)
    except Exception as e:  # noqa: BLE001 - reported to rank 0, never desyncs the group
        return b"\x01" + f"{type(e).__name__}: {e}".encode()


def _unwrap(answers: list[bytes]) -> list[bytes]:
    errors = [f"rank {r}: {a[1:].decode(errors='replace')}" for r, a in enumerate(answers) if a[:1] != b"\x00"]
    if errors:
        raise RuntimeError("rank extension failed: " + "; ".join(errors))
    return [a[1:] for a in answers]


class LocalExecutor:
    def __init__(self, config: EngineConfig, num_blocks: int) -> None:
        self.runner = ModelRunner(config, num_blocks, SINGLE)
        self.extension = _load_extension(config, self.runner, SINGLE)

    def execute(self, inputs: StepInputs) -> ModelOutput:
        return self.runner.run(inputs)

    def call_extension(self, payload: bytes) -> list[bytes]:
        if self.extension is None:
            raise RuntimeError("no rank extension configured")
        return _unwrap([_handle(self.extension, payload)])

    def shutdown(self) -> None:
        if self.extension is not None:
            self.extension.close()
            self.extension = None
        self.runner.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(config: EngineConfig) -> str:
    return config.parallel.backend or ("nccl" if config.device.startswith("cuda") else "gloo")


def _prepare_rank(config: EngineConfig, rank: int) -> None:
    """This process's threads and device (on the thread that will run the model)."""
    size = config.parallel.tensor_parallel_size
    if config.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    elif config.device == "cuda" and torch.cuda.device_count() > 1:
        # One GPU per rank, in the order CUDA_VISIBLE_DEVICES lists them (the launcher
        # sets it to the TP group's GPUs); "cuda" then means this rank's GPU.
        torch.cuda.set_device(rank % torch.cuda.device_count())


def _join_group(config: EngineConfig, rank: int, port: int) -> TPGroup:
    """The rendezvous: rank 0 serves the store, every rank waits for the others at most
    ``RENDEZVOUS_TIMEOUT``."""
    size = config.parallel.tensor_parallel_size
    store = dist.TCPStore("127.0.0.1", port, size, is_master=rank == 0, timeout=RENDEZVOUS_TIMEOUT)
    dist.init_process_group(_backend(config), store=store, rank=rank, world_size=size, timeout=_GROUP_TIMEOUT)
    return TPGroup(rank, size)


def _send_header(cmd: int, inputs: StepInputs | None, device: str) -> None:
    header = torch.full((1 + 2 * _NUM_FIELDS,), -1, dtype=torch.long)
    header[0] = cmd
    if inputs is not None:
        for i, t in enumerate(inputs.tensors()):
            header[1 + 2 * i : 1 + 2 * i + t.dim()] = torch.tensor(t.shape)
    dist.broadcast(header.to(device), src=0)


def _worker_main(config: EngineConfig, num_blocks: int, rank: int, port: int, status: Connection) -> None:
    try:
        factory = _extension_factory(config)
        status.send_bytes(_STARTED)
        _prepare_rank(config, rank)
        tp = _join_group(config, rank, port)
        runner = ModelRunner(config, num_blocks, tp)
        extension = _load_extension(config, runner, tp, factory)
    except BaseException as e:
        status.send_bytes(_FAILED + "".join(traceback.format_exception_only(e)).strip().encode(errors="replace"))
        raise  # the traceback goes to this rank's stderr; the exit code to rank 0
    status.send_bytes(_READY)
    status.close()
    device = config.device
    try:
        while True:
            header = torch.empty(1 + 2 * _NUM_FIELDS, dtype=torch.long, device=device)
            dist.broadcast(header, src=0)
            header = header.cpu()
            cmd = int(header[0])
            if cmd == _CMD_STOP:
                break
            if cmd == _CMD_EXT:
                payload = torch.empty(int(header[1]), dtype=torch.uint8)
                dist.broadcast(payload, src=0)
                _gather_bytes(_handle(extension, payload.numpy().tobytes()), tp.size)
                continue
            tensors = []
            for i in range(_NUM_FIELDS):
                shape = [d for d in header[1 + 2 * i : 3 + 2 * i].tolist() if d >= 0]
                t = torch.empty(shape, dtype=torch.long, device=device)
                if t.numel():
                    dist.broadcast(t, src=0)
                tensors.append(t)
            runner.run(StepInputs.from_tensors(tensors))  # rank 0 alone keeps the results
    finally:
        if extension is not None:
            extension.close()
        runner.close()
        dist.destroy_process_group()


def _gather_bytes(data: bytes, size: int) -> list[bytes]:
    """Every rank's ``data``, on every rank (lengths first, then padded bytes)."""
    n = torch.tensor([len(data)], dtype=torch.long)
    lengths = [torch.empty_like(n) for _ in range(size)]
    dist.all_gather(lengths, n)
    width = max(int(x) for x in lengths)
    mine = torch.zeros(width, dtype=torch.uint8)
    if data:
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = [torch.empty(width, dtype=torch.uint8) for _ in range(size)]
    dist.all_gather(parts, mine)
    return [p[: int(k)].numpy().tobytes() for p, k in zip(parts, lengths)]


class _StartupWatch:
    """Rank 0's view of the spawned ranks' start-up reports (one pipe per rank)."""

    def __init__(self, procs: list[mp.process.BaseProcess], pipes: list[Connection]) -> None:
        self.procs = dict(zip(range(1, len(procs) + 1), procs))
        self.pipes = dict(zip(range(1, len(pipes) + 1), pipes))
        self.stage = dict.fromkeys(self.procs, 0)
        """Rank -> index in ``_STAGES`` of its last report."""

    def wait(self, stage: bytes, timeout_s: float, busy: threading.Thread | None = None) -> None:
        """Return once every rank reported ``stage`` or a later one (and ``busy``, if given,
        ended); raise RuntimeError as soon as a rank fails or exits, or when ``timeout_s`` passes."""
        target = _STAGES.index(stage)
        deadline = time.monotonic() + timeout_s
        while any(s < target for s in self.stage.values()) or (busy is not None and busy.is_alive()):
            left = deadline - time.monotonic()
            if left <= 0:
                late = [r for r, s in self.stage.items() if s < target]
                what = f"ranks {late} did not report {stage.decode()!r}" if late else "rank 0 did not join the group"
                raise RuntimeError(f"tensor-parallel start-up timed out after {timeout_s:g} s: {what}")
            waiting = [self.pipes[r] for r, s in self.stage.items() if s < target and not self.pipes[r].closed]
            # A sentinel is ready once its process exited; poll when a thread is what we wait for.
            wait([*waiting, *(p.sentinel for p in self.procs.values())], min(left, 0.1 if busy else left))
            for rank in self.procs:
                self._read(rank)
            for rank, p in self.procs.items():
                if p.exitcode is not None:
                    self._read(rank)  # its last words, if it had time to say them
                    raise RuntimeError(self._exited(rank, p.exitcode))

    def _read(self, rank: int) -> None:
        pipe = self.pipes[rank]
        try:
            while not pipe.closed and pipe.poll():
                msg = pipe.recv_bytes()
                if msg.startswith(_FAILED):
                    raise RuntimeError(f"tensor-parallel rank {rank} failed during start-up: "
                                       f"{msg[len(_FAILED):].decode(errors='replace')}")
                self.stage[rank] = _STAGES.index(msg)
        except (EOFError, OSError):
            pipe.close()  # it exited; its sentinel says how

    def _exited(self, rank: int, code: int) -> str:
        if self.stage[rank] == 0:
            return (f"tensor-parallel rank {rank} exited with code {code} before it started (its error is on "
                    f"stderr). A script that builds a tensor-parallel engine must do so under "
                    f"`if __name__ == \"__main__\":`, since each rank process re-imports the main module.")
        return f"tensor-parallel rank {rank} exited with code {code} during start-up (see its stderr)"


class MultiprocExecutor:
    def __init__(self, config: EngineConfig, num_blocks: int) -> None:
        self.config = config
        self._closed = False
        self.procs: list[mp.process.BaseProcess] = []
        self.extension = None
        size = config.parallel.tensor_parallel_size
        factory = _extension_factory(config)  # a bad name fails here, before any process starts
        port = _free_port()
        ctx = mp.get_context("spawn")
        pipes = []
        try:
            for rank in range(1, size):
                reader, writer = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_worker_main, args=(config, num_blocks, rank, port, writer), daemon=True,
                                name=f"pdserve-tp{rank}")
                pipes.append(reader)
                p.start()
                self.procs.append(p)
                writer.close()
            watch = _StartupWatch(self.procs, pipes)
            watch.wait(_STARTED, START_TIMEOUT_S)
            _prepare_rank(config, 0)
            self.tp = self._join(watch, port)
            self.runner = ModelRunner(config, num_blocks, self.tp)
            self.extension = _load_extension(config, self.runner, self.tp, factory)
            watch.wait(_READY, READY_TIMEOUT_S)
        except BaseException:
            self._abandon()
            raise
        finally:
            for pipe in pipes:
                pipe.close()

    def _join(self, watch: _StartupWatch, port: int) -> TPGroup:
        """Join the group on a helper thread, watching the other ranks meanwhile."""
        result: list = []

        def join() -> None:
            try:
                result.append(_join_group(self.config, 0, port))
            except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
                result.append(e)

        thread = threading.Thread(target=join, name="pdserve-tp-rendezvous", daemon=True)
        thread.start()
        # NOTE: if a rank dies meanwhile we raise at once; the abandoned thread ends when its
        # rendezvous times out (the store's RENDEZVOUS_TIMEOUT, or the group timeout if the
        # rank died after reaching the store), having joined nothing.
        watch.wait(_STARTED, RENDEZVOUS_TIMEOUT.total_seconds() + 5, busy=thread)
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def _abandon(self) -> None:
        """Start-up failed: stop every rank process and leave no group behind."""
        self._closed = True
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)
        if self.extension is not None:
            self.extension.close()
        if dist.is_initialized():
            dist.destroy_process_group()

    def execute(self, inputs: StepInputs) -> ModelOutput:
        self._check_ranks()
        _send_header(_CMD_STEP, inputs, self.config.device)
        for t in inputs.tensors():
            if t.numel():
                dist.broadcast(t.to(self.config.device), src=0)
        return self.runner.run(inputs)

    def call_extension(self, payload: bytes) -> list[bytes]:
        """``handle(payload)`` on every rank; their answers in rank order."""
        if self.extension is None:
            raise RuntimeError("no rank extension configured")
        self._check_ranks()
        header = torch.full((1 + 2 * _NUM_FIELDS,), -1, dtype=torch.long)
        header[0], header[1] = _CMD_EXT, len(payload)
        dist.broadcast(header, src=0)
        # NOTE: control bytes travel on the step group; on CUDA (NCCL) this needs a gloo side group.
        dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8), src=0)
        return _unwrap(_gather_bytes(_handle(self.extension, payload), self.tp.size))

    def _check_ranks(self) -> None:
        dead = [f"{p.name} (exit code {p.exitcode})" for p in self.procs if not p.is_alive()]
        if dead:
            raise RuntimeError(f"tensor-parallel ranks exited: {', '.join(dead)}")

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.extension is not None:
            self.extension.close()
        try:
            if all(p.is_alive() for p in self.procs):
                _send_header(_CMD_STOP, None, self.config.device)
        finally:
            self.runner.close()  # the other ranks leave the pool meanwhile
            for p in self.procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
            dist.destroy_process_group()


def make_executor(config: EngineConfig, num_blocks: int):
    if config.parallel.tensor_parallel_size == 1:
        return LocalExecutor(config, num_blocks)
    return MultiprocExecutor(config, num_blocks)
