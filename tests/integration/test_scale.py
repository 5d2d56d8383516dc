"""Live scaling under load: `pdserve scale` grows and shrinks a running `pdserve up`.

One `pdserve up` (local Ray, embedded store, tiny Llama, 1 prefill + 1 decode) with
three client threads sending requests back to back the whole time. The pools go
1P/1D -> 2P/2D -> 1P/1D -> 0P/1D, each step by the real `pdserve scale` command,
which returns once the registered workers match. Then:

- every request the clients sent completed: HTTP 200, all 12 tokens, finish "length"
  (none failed while workers joined or drained);
- the workers added in the scale-up served requests (their Stats show prompt tokens
  on the decode worker, KV transfers on the prefill worker);
- the workers removed (the highest-indexed) drained and exited: gone from the store;
- with no prefill worker left, requests still complete (the decode worker prefills);
- the remaining decode worker ends with every KV block free.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest

pytest.importorskip("ray")

from pdserve.deploy.credentials import client_secret  # noqa: E402
from pdserve.deploy.store import open_store  # noqa: E402
from pdserve.proto import auth  # noqa: E402
from pdserve.proto import pdserve_pb2 as pb  # noqa: E402
from pdserve.proto import pdserve_pb2_grpc as pb_grpc  # noqa: E402

from test_up import _free_port  # noqa: E402

pytestmark = pytest.mark.integration

MAX_TOKENS = 12


class Load:
    """Client threads sending completions back to back until stopped."""

    def __init__(self, url: str, num_threads: int = 3) -> None:
        self.url = url
        self.results: list[tuple[int, int, str | None]] = []  # (status, completion tokens, finish reason)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(num_threads)]
        for t in self._threads:
            t.start()

    def _run(self, i: int) -> None:
        k = 0
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                # 300-token prompts: above the gateway's disaggregation threshold (256), so
                # they take the prefill pool while it has workers. All different.
                prompt = [100 + (i * 1000 + k * 7 + j) % 3000 for j in range(300)]
                k += 1
                try:
                    r = client.post(self.url + "/v1/completions", json={
                        "model": "tiny-llama", "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True})
                except httpx.HTTPError as e:
                    self.errors.append(repr(e))
                    continue
                if r.status_code != 200:
                    self.errors.append(f"{r.status_code} {r.text}")
                    continue
                body = r.json()
                self.results.append((r.status_code, body["usage"]["completion_tokens"],
                                     body["choices"][0]["finish_reason"]))

    def count(self) -> int:
        return len(self.results) + len(self.errors)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(180)


def scale(env, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "pdserve.deploy.scale", *args, "--timeout", "240"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def stats(address: str) -> pb.StatsResponse:
    # Signed with the secret `pdserve up` left in $PDSERVE_HOME, as `pdserve scale` finds it.
    with auth.insecure_channel(address, client_secret()) as ch:
        return pb_grpc.DecodeStub(ch).Stats(pb.StatsRequest(), timeout=10)


def prefill_stats(address: str) -> pb.StatsResponse:
    with auth.insecure_channel(address, client_secret()) as ch:
        return pb_grpc.PrefillStub(ch).Stats(pb.StatsRequest(), timeout=10)


def serving(store) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"prefill": [], "decode": []}
    for w in store.list_workers():
        out[{pb.PREFILL: "prefill", pb.DECODE: "decode"}[w.role]].append(w.worker_id)
    return out


def test_scale_up_and_down_under_load(tmp_path, monkeypatch):
    port = _free_port()
    home = tmp_path / "home"
    monkeypatch.setenv("PDSERVE_HOME", str(home))  # this process finds `up`'s cluster secret there too
    env = {**os.environ, "PDSERVE_HOME": str(home)}
    cmd = [sys.executable, "-m", "pdserve.deploy.up", "--port", str(port), "--transfer-backend", "nixl",
           "--drain-timeout", "120"]
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(ln) for ln in proc.stdout], daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    load = store = None
    try:
        deadline = time.monotonic() + 300
        while not any("serving" in ln for ln in lines):
            assert proc.poll() is None and time.monotonic() < deadline, \
                f"up did not start: {''.join(lines)}\n{(log.seek(0), log.read()[-3000:])[1]}"
            time.sleep(0.5)
        state = json.loads((home / "up.json").read_text())
        assert state["gateway_url"] == url and state["pid"] == proc.pid
        store = open_store(state["store_url"])
        assert "prefill 1/1" in scale(env) and sorted(sum(serving(store).values(), [])) == ["decode-0", "prefill-0"]

        load = Load(url)
        while load.count() < 3:
            time.sleep(0.2)

        scale(env, "--prefill", "2", "--decode", "2")
        assert serving(store) == {"prefill": ["prefill-0", "prefill-1"], "decode": ["decode-0", "decode-1"]}
        new_decode = store.get_worker("decode-1").address
        new_prefill = store.get_worker("prefill-1").address
        deadline = time.monotonic() + 120
        while not (stats(new_decode).prefix_cache_query_tokens > 0 and prefill_stats(new_prefill).transfer_count > 0):
            assert time.monotonic() < deadline, "the added workers got no requests"
            time.sleep(0.2)

        scale(env, "--prefill", "1", "--decode", "1")
        assert serving(store) == {"prefill": ["prefill-0"], "decode": ["decode-0"]}

        scale(env, "--prefill", "0")
        assert serving(store) == {"prefill": [], "decode": ["decode-0"]}
        served = load.count()
        while load.count() < served + 3:
            time.sleep(0.2)
        load.stop()

        assert load.errors == [], load.errors[:5]
        assert len(load.results) >= 20
        assert all(r == (200, MAX_TOKENS, "length") for r in load.results)
        decode0 = store.get_worker("decode-0").address
        deadline = time.monotonic() + 10
        while (s := stats(decode0)).num_kv_blocks_free != s.num_kv_blocks_total and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s.num_kv_blocks_free == s.num_kv_blocks_total and s.num_running == 0
        # A scale request that cannot serve anything is refused.
        bad = subprocess.run([sys.executable, "-m", "pdserve.deploy.scale", "--decode", "0"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "decode" in bad.stderr
    finally:
        if load is not None:
            load.stop()
        if store is not None:
            store.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert proc.returncode == 0
    assert not (home / "up.json").exists()
