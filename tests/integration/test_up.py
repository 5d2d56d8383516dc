"""`pdserve up` as a user runs it: one command, a working endpoint, Ctrl-C ends everything."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for child, parent in zip(out[::2], out[1::2]):
        children.setdefault(int(parent), []).append(int(child))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def _get(url: str, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def test_up_serves_and_stops_cleanly_on_ctrl_c(tmp_path):
    port = _free_port()
    env = {**os.environ, "PDSERVE_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "pdserve.deploy.cli", "up", "--port", str(port), "--transfer-backend", "torch_dist"]
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + 240
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = _get(f"http://127.0.0.1:{port}/ready")[0] == 200
            except OSError:
                pass
            if ready:
                break
            time.sleep(0.5)
        log.seek(0)
        assert ready, f"not ready: {''.join(lines)}\n{log.read()[-3000:]}"
        assert any(f"http://127.0.0.1:{port}" in line for line in lines) and any("curl" in line for line in lines)
        body = json.dumps({"model": "tiny-llama", "prompt": "Hello", "max_tokens": 8, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            out = json.loads(r.read())
        assert out["usage"]["completion_tokens"] == 8 and out["choices"][0]["finish_reason"] == "length"
        started = _descendants(proc.pid)
        assert started, "up started no processes?"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0
        deadline = time.monotonic() + 30
        alive = {p for p in started if os.path.exists(f"/proc/{p}")}
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = {p for p in alive if os.path.exists(f"/proc/{p}") and
                     open(f"/proc/{p}/stat").read().split()[2] != "Z"}
        assert not alive, f"processes left behind: {alive}"
        assert "pdserve: stopped" in "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
