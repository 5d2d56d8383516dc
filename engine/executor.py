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
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import EngineConfig
from .model_runner import ModelOutput, ModelRunner, StepInputs
from .parallel import SINGLE, TPGroup

_CMD_STEP, _CMD_STOP, _CMD_EXT = 1, 2, 3
_NUM_FIELDS = len(StepInputs.__dataclass_fields__)
_GROUP_TIMEOUT = timedelta(minutes=10)


def _load_extension(config: EngineConfig, runner: ModelRunner, tp: TPGroup):
    if not config.rank_extension:
        return None
    module, _, name = config.rank_extension.partition(":")
    factory = getattr(importlib.import_module(module), name)
    return factory(runner, tp, config.rank_extension_config)


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(config: EngineConfig) -> str:
    return config.parallel.backend or ("nccl" if config.device.startswith("cuda") else "gloo")


def _init_group(config: EngineConfig, rank: int, port: int) -> TPGroup:
    size = config.parallel.tensor_parallel_size
    if config.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    elif config.device == "cuda" and torch.cuda.device_count() > 1:
        # One GPU per rank, in the order CUDA_VISIBLE_DEVICES lists them (the launcher
        # sets it to the TP group's GPUs); "cuda" then means this rank's GPU.
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        _backend(config), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, timeout=_GROUP_TIMEOUT
    )
    return TPGroup(rank, size)


def _send_header(cmd: int, inputs: StepInputs | None, device: str) -> None:
    header = torch.full((1 + 2 * _NUM_FIELDS,), -1, dtype=torch.long)
    header[0] = cmd
    if inputs is not None:
        for i, t in enumerate(inputs.tensors()):
            header[1 + 2 * i : 1 + 2 * i + t.dim()] = torch.tensor(t.shape)
    dist.broadcast(header.to(device), src=0)


def _worker_main(config: EngineConfig, num_blocks: int, rank: int, port: int) -> None:
    tp = _init_group(config, rank, port)
    runner = ModelRunner(config, num_blocks, tp)
    extension = _load_extension(config, runner, tp)
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


class MultiprocExecutor:
    def __init__(self, config: EngineConfig, num_blocks: int) -> None:
        self.config = config
        size = config.parallel.tensor_parallel_size
        port = _free_port()
        ctx = mp.get_context("spawn")
        self.procs = [
            ctx.Process(target=_worker_main, args=(config, num_blocks, rank, port), daemon=True, name=f"pdserve-tp{rank}")
            for rank in range(1, size)
        ]
        for p in self.procs:
            p.start()
        self.tp = _init_group(config, 0, port)
        self.runner = ModelRunner(config, num_blocks, self.tp)
        self.extension = _load_extension(config, self.runner, self.tp)
        self._closed = False

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
        dead = [p.name for p in self.procs if not p.is_alive()]
        if dead:
            raise RuntimeError(f"tensor-parallel ranks exited: {dead}")

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
            for p in self.procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
            dist.destroy_process_group()


def make_executor(config: EngineConfig, num_blocks: int):
    if config.parallel.tensor_parallel_size == 1:
        return LocalExecutor(config, num_blocks)
    return MultiprocExecutor(config, num_blocks)
