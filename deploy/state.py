"""Where a machine's pdserve state lives: the home directory, the default model, and the
record ``pdserve up`` leaves so ``pdserve scale`` can reach it.

Imported by ``cli``, ``up`` and ``scale`` alike, so none of them imports another for a
path (the commands' modules depend on this one, never on each other, except ``cli``,
which registers them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def home_dir() -> Path:
    """``$PDSERVE_HOME``, else ``~/.cache/pdserve``."""
    return Path(os.environ.get("PDSERVE_HOME", Path.home() / ".cache" / "pdserve"))


def default_model_dir() -> Path:
    """Where the embedded tiny model is written (``ensure_tiny_model``)."""
    return home_dir() / "tiny-llama"


def state_file() -> Path:
    """Where ``pdserve up`` records how to reach it (``store_url``, ``gateway_url``, ``pid``)."""
    return home_dir() / "up.json"


def write_state(store_url: str, gateway_url: str, model: str | None = None) -> Path:
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"store_url": store_url, "gateway_url": gateway_url, "pid": os.getpid(),
                               "model": model}))
    tmp.replace(path)
    return path


def running_up() -> dict:
    """The record of the ``pdserve up`` running on this machine (``store_url``,
    ``gateway_url``, ``model``, ``pid``); ValueError naming the file when there is none."""
    path = state_file()
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ValueError(f"no running `pdserve up` found ({path} is missing); pass --store URL") from None
    try:
        os.kill(int(state["pid"]), 0)
    except (OSError, KeyError, ValueError):
        raise ValueError(f"the `pdserve up` recorded in {path} is not running; pass --store URL") from None
    return state


def clear_state() -> None:
    """Remove the record if this process wrote it."""
    path = state_file()
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


__all__ = ["clear_state", "default_model_dir", "home_dir", "running_up", "state_file", "write_state"]
