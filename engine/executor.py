"""Runs a step on every rank of the tensor-parallel group.

``LocalExecutor`` is the group of one. ``MultiprocExecutor`` spawns ranks
1..tp-1 as processes; rank 0 (this process) broadcasts each step's inputs —
a header of shapes, then the tensors — and every rank runs the same forward,
joining the all-reduces inside the model. Workers leave on a STOP header or when
the group breaks.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import EngineConfig
from .model_runner import ModelRunner, StepInputs
from .parallel import SINGLE, TPGroup

_CMD_STEP, _CMD_STOP = 1, 2
_NUM_FIELDS = len(StepInputs.__dataclass_fields__)
_GROUP_TIMEOUT = timedelta(minutes=10)


class LocalExecutor:
    def __init__(self, config: EngineConfig, num_blocks: int) -> None:
        self.runner = ModelRunner(config, num_blocks, SINGLE)

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        return self.runner.execute(inputs)

    def shutdown(self) -> None:
        pass


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
    device = config.device
    try:
        while True:
            header = torch.empty(1 + 2 * _NUM_FIELDS, dtype=torch.long, device=device)
            dist.broadcast(header, src=0)
            header = header.cpu()
            if int(header[0]) == _CMD_STOP:
                break
            tensors = []
            for i in range(_NUM_FIELDS):
                shape = [d for d in header[1 + 2 * i : 3 + 2 * i].tolist() if d >= 0]
                t = torch.empty(shape, dtype=torch.long, device=device)
                if t.numel():
                    dist.broadcast(t, src=0)
                tensors.append(t)
            runner.execute(StepInputs.from_tensors(tensors))
    finally:
        dist.destroy_process_group()


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
        self._closed = False

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        dead = [p.name for p in self.procs if not p.is_alive()]
        if dead:
            raise RuntimeError(f"tensor-parallel ranks exited: {dead}")
        _send_header(_CMD_STEP, inputs, self.config.device)
        for t in inputs.tensors():
            if t.numel():
                dist.broadcast(t.to(self.config.device), src=0)
        return self.runner.execute(inputs)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
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
