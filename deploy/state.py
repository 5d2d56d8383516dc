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


def write_state(store_url: str, gateway_url: str) -> Path:
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"store_url": store_url, "gateway_url": gateway_url, "pid": os.getpid()}))
    tmp.replace(path)
    return path


def clear_state() -> None:
    """Remove the record if this process wrote it."""
    path = state_file()
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


__all__ = ["clear_state", "default_model_dir", "home_dir", "state_file", "write_state"]
