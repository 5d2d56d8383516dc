"""NIXL moves KV blocks into GPU memory of another process, byte for byte.

Skipped without CUDA or without the NIXL wheel. Two spawned processes each own one
KV region (the engine's layout) and a NIXL agent over it; UCX picks its CUDA
transports itself (cuda_ipc between processes on one GPU, cuda_copy for host
memory). One request's blocks (every layer, scattered block ids, reversed on the
destination) are written with per-(layer, block) descriptors; the destination's
bytes must equal the source's, the notification must arrive, and bytes outside the
written blocks must stay untouched.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time

import pytest
import torch

from pdserve.kvtransfer import KVRegionLayout
from pdserve.kvtransfer.nixl_backend import nixl_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not nixl_available(), reason="needs the nixl-cu12 wheel"),
]

LAYOUT = KVRegionLayout.for_rank(num_layers=4, num_blocks=64, num_kv_heads=8, block_size=16, head_dim=128, dtype="bfloat16")


def _peer(conn, name: str, device: str, seed: int) -> None:
    """One process: a region on ``device`` (random bytes when seed, else zeros) and its agent."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    from pdserve.kvtransfer import create_agent

    region = torch.zeros(LAYOUT.shape, dtype=torch.bfloat16, device=device)
    if seed:
        g = torch.Generator(device=device).manual_seed(seed)
        region.view(torch.uint8).random_(generator=g)
    agent = create_agent("nixl", name, region, LAYOUT)
    flat = region.view(-1).view(torch.uint8)
    conn.send(agent.metadata())
    try:
        while True:
            cmd, args = conn.recv()
            if cmd == "exit":
                break
            if cmd == "add_peer":
                agent.add_peer(*args)
                conn.send(None)
            elif cmd == "write":
                st = agent.wait(agent.write("req-1", args[0], args[1], b"kv-ready"))
                conn.send((st.done, st.message))
            elif cmd == "expect":  # a receiver admits only what it expects (kvtransfer.base, 6)
                agent.expect("req-1", args[0], args[1], timeout_s=60)
                conn.send(None)
            elif cmd == "notifications":  # waits up to 10 s for the first one
                deadline = time.monotonic() + 10.0
                notes = agent.take_notifications()
                while not notes and time.monotonic() < deadline:
                    time.sleep(0.01)
                    notes = agent.take_notifications()
                conn.send([(n.peer, n.message) for n in notes])
            elif cmd == "digest":
                h = hashlib.sha256()
                for off, n in args[0]:
                    h.update(flat[off : off + n].cpu().numpy().tobytes())
                conn.send(h.hexdigest())
    finally:
        agent.close()


def _start(ctx, name: str, device: str, seed: int):
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_peer, args=(child, name, device, seed), daemon=True)
    proc.start()
    return parent, proc


def _ask(conn, cmd: str, *args, timeout_s: float = 60.0):
    conn.send((cmd, args))
    assert conn.poll(timeout_s), f"peer gave no answer to {cmd!r} in {timeout_s}s"
    return conn.recv()


@pytest.mark.parametrize("src_device", ["cuda", "cpu"])
def test_nixl_writes_into_vram_of_another_process(src_device):
    ctx = mp.get_context("spawn")
    src, src_proc = _start(ctx, "src", src_device, seed=1234)
    dst, dst_proc = _start(ctx, "dst", "cuda", seed=0)
    try:
        md = {"src": src.recv(), "dst": dst.recv()}
        _ask(src, "add_peer", "dst", md["dst"])
        _ask(dst, "add_peer", "src", md["src"])
        blocks = [5, 17, 3, 40, 41, 63, 0]
        dst_blocks = list(reversed(blocks))
        descs = [(LAYOUT.offset(l, s), LAYOUT.offset(l, d), LAYOUT.block_bytes)
                 for l in range(LAYOUT.num_layers) for s, d in zip(blocks, dst_blocks)]
        _ask(dst, "expect", "src", descs)
        done, message = _ask(src, "write", "dst", descs)
        assert done, f"NIXL write failed: {message}"
        assert ("src", b"kv-ready") in _ask(dst, "notifications")
        assert _ask(src, "digest", [(s, n) for s, _, n in descs]) == _ask(dst, "digest", [(d, n) for _, d, n in descs])
        untouched = [b for b in range(LAYOUT.num_blocks) if b not in blocks]
        zeros = hashlib.sha256(bytes(LAYOUT.block_bytes * len(untouched))).hexdigest()
        assert _ask(dst, "digest", [(LAYOUT.offset(0, b), LAYOUT.block_bytes) for b in untouched]) == zeros
    finally:
        for conn, proc in ((src, src_proc), (dst, dst_proc)):
            try:
                conn.send(("exit", ()))
            except (BrokenPipeError, OSError):
                pass
            proc.join(30)
            if proc.is_alive():
                proc.kill()
