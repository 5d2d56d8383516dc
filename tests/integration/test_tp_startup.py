"""A tensor-parallel rank that fails during start-up makes the engine raise with that
rank's error within seconds, instead of leaving rank 0 in the rendezvous.

Failures are injected through rank extensions (``rank_ext_failing``): one that rank 1
cannot even resolve (before the rendezvous), one that raises on rank 1 and one that
exits rank 1 (after it). The classic cause, a script that builds a TP engine without
an ``if __name__ == "__main__":`` guard, runs as a real script. Every wait has a hang
guard; none is a performance threshold.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest
import torch.distributed as dist

from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig
from pdserve.engine.executor import make_executor

pytestmark = pytest.mark.integration

HANG_GUARD_S = 60


def _config(model_dir, extension: str | None) -> EngineConfig:
    return EngineConfig(model=ModelConfig.from_dir(model_dir), cache=CacheConfig(num_blocks=8),
                        parallel=ParallelConfig(2), rank_extension=extension, rank_extension_config=b"cfg")


def _start(config: EngineConfig):
    """``make_executor(config, 8)``'s executor or exception, under a hang guard."""
    result: list = []

    def run() -> None:
        try:
            result.append(make_executor(config, 8))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            result.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), "the executor's start-up hangs"
    return result[0]


@pytest.mark.parametrize("extension,error", [
    ("rank_ext_failing:only_in_the_parent",
     "rank 1 failed during start-up: AttributeError: module 'rank_ext_failing' has no attribute 'only_in_the_parent'"),
    ("rank_ext_failing:raise_on_rank_1", "rank 1 failed during start-up: ValueError: rank 1 cannot use 'cfg'"),
    ("rank_ext_failing:exit_on_rank_1", "rank 1 exited with code 3 during start-up"),
], ids=["before-rendezvous", "raises-after-rendezvous", "exits-after-rendezvous"])
def test_a_failing_rank_makes_start_up_raise_its_error(hf_model_dir, extension, error):
    model_dir = hf_model_dir("llama")
    out = _start(_config(model_dir, extension))
    assert isinstance(out, RuntimeError), out
    assert error in str(out)
    assert not dist.is_initialized()  # nothing left behind: a new group starts and works
    executor = _start(_config(model_dir, None))
    assert not isinstance(executor, BaseException), executor
    try:
        assert all(p.is_alive() for p in executor.procs)
    finally:
        executor.shutdown()


def test_a_script_without_a_main_guard_fails_instead_of_hanging(hf_model_dir, tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text(textwrap.dedent(f"""
        from pdserve.engine import LLM

        llm = LLM({str(hf_model_dir("llama"))!r}, tensor_parallel_size=2, num_kv_blocks=8)
        print("generated", llm.generate([[1, 2, 3]])[0].token_ids)
    """))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode != 0 and "generated" not in run.stdout
    assert "tensor-parallel rank 1 exited with code 1 before it started" in run.stderr
    assert 'if __name__ == "__main__":' in run.stderr
