"""Rank extensions that break a tensor-parallel group's start-up on rank 1 (for
tests/integration/test_tp_startup.py); rank 0 gets a harmless one."""

import multiprocessing
import os


class Nothing:
    def handle(self, payload: bytes) -> bytes:
        return payload

    def close(self) -> None:
        pass


def raise_on_rank_1(runner, tp, config: bytes) -> Nothing:
    if tp.rank == 1:
        raise ValueError(f"rank 1 cannot use {config.decode()!r}")
    return Nothing()


def exit_on_rank_1(runner, tp, config: bytes) -> Nothing:
    if tp.rank == 1:
        os._exit(3)
    return Nothing()


if multiprocessing.parent_process() is None:
    # Only the test process has this factory: a rank process fails to resolve it, before
    # it joins the group (a configuration only one rank gets wrong).
    def only_in_the_parent(runner, tp, config: bytes) -> Nothing:
        return Nothing()
