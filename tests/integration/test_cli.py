"""The `pdserve` command line, run as a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.engine.tiny_model import tiny_model_digest


def _pdserve() -> list[str]:
    """The console script of this interpreter's environment, else one on PATH, else ``-m``."""
    local = Path(sys.executable).parent / "pdserve"
    if local.is_file() and os.access(local, os.X_OK):
        return [str(local)]
    found = shutil.which("pdserve")
    if found:
        return [found]
    return [sys.executable, "-m", "pdserve.deploy.cli"]


def run_cli(*args: str, home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PDSERVE_HOME=str(home))
    return subprocess.run(
        [*_pdserve(), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pdserve_home")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, cli_home) -> Path:
    out = tmp_path_factory.mktemp("cli_model") / "tiny"
    res = run_cli("make-tiny-model", str(out), home=cli_home)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert str(out) in res.stdout
    return out


def test_make_tiny_model_writes_a_model(model_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (model_dir / name).is_file(), name


def test_generate_with_model(model_dir, cli_home):
    res = run_cli("generate", "--model", str(model_dir), "--prompt", "hello", "--max-tokens", "8", home=cli_home)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stdout.startswith("hello")
    assert len(res.stdout.strip()) > len("hello")

    # Same text as the offline API with the same (greedy) settings.
    from pdserve.engine import LLM, SamplingParams

    with LLM(model_dir, num_kv_blocks=16) as llm:
        expected = llm.generate("hello", SamplingParams(temperature=0.0, max_tokens=8))[0].text
    assert res.stdout == "hello" + expected + "\n"


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--max-tokens", "0"], ["max_tokens", "0"]),
        (["--temperature", "-1"], ["temperature", "-1"]),
        (["--top-p", "0"], ["top_p", "0"]),
    ],
    ids=["max-tokens-0", "negative-temperature", "top-p-0"],
)
def test_generate_bad_args_fail_cleanly(model_dir, cli_home, args, needles):
    res = run_cli("generate", "--model", str(model_dir), "--prompt", "hello", *args, home=cli_home)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith("pdserve: error:"), res.stderr
    for needle in needles:
        assert needle in res.stderr
    assert res.stdout == ""


def test_generate_missing_model_dir_fails_cleanly(tmp_path, cli_home):
    missing = tmp_path / "no-such-model"
    res = run_cli("generate", "--model", str(missing), "--prompt", "hello", home=cli_home)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert "pdserve: error:" in res.stderr and str(missing) in res.stderr


def test_filesystem_errors_fail_cleanly(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    res = run_cli("make-tiny-model", str(a_file), home=tmp_path)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert "pdserve: error:" in res.stderr and str(a_file) in res.stderr
    # PDSERVE_HOME that is a file: the default model cannot be written there.
    res = run_cli("generate", "--prompt", "hi", "--max-tokens", "2", home=a_file)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and "pdserve: error:" in res.stderr
    assert a_file.read_text() == "not a directory"


def test_argparse_errors(cli_home):
    res = run_cli("generate", "--max-tokens", "many", home=cli_home)
    assert res.returncode == 2
    assert "invalid int value" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(home=cli_home)
    assert res.returncode == 2 and "usage" in res.stderr


def test_generate_default_model_uses_pdserve_home(tmp_path, model_dir):
    home = tmp_path / "home"
    res = run_cli("generate", "--prompt", "hi", "--max-tokens", "4", home=home)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("hi")
    default = home / "tiny-llama"
    assert (default / "config.json").is_file()
    # The default model is the same deterministic tiny model make-tiny-model writes.
    assert tiny_model_digest(default) == tiny_model_digest(model_dir)
    # A second run reuses it.
    again = run_cli("generate", "--prompt", "hi", "--max-tokens", "4", home=home)
    assert again.returncode == 0 and again.stdout == res.stdout
    assert sorted(p.name for p in home.iterdir()) == ["tiny-llama"]
