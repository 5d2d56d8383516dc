"""Conformance of every KV transfer backend, between real processes.

Each rank is an agent in its own spawned process with a region of distinct random
bytes; metadata travels through the parent (as through a control-plane store).
Checked: exact destination bytes (the destination rank's heads of the source
blocks) and nothing else touched, for TP 1->1, 1->2, 2->1; layer subsets;
notifications; failures within their deadlines for a dead or frozen peer and for
an expectation nobody fulfils; a write the receiver did not expect (unknown id,
late, revoked) refused with nothing written; no transfer resources left behind.
"""

from __future__ import annotations

import itertools
import os
import signal
import time

import numpy as np
import pytest

from pdserve.kvtransfer import KVRegionLayout, available_backends, plan_transfer
from pdserve.kvtransfer.base import pack_metadata, unpack_metadata
from pdserve.kvtransfer.harness import AgentProcess

pytestmark = pytest.mark.integration

GEO = dict(num_layers=3, num_blocks=16, num_kv_heads=4, block_size=4, head_dim=8, dtype="bfloat16")
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(b not in available_backends(),
                                                      reason=f"{b} not installed"))
            for b in ("nixl", "torch_dist")]
_names = itertools.count()


def layouts(tp: int) -> list[KVRegionLayout]:
    return [KVRegionLayout.for_rank(**GEO, tp_rank=r, tp_size=tp) for r in range(tp)]


@pytest.fixture(scope="module")
def procs():
    ps = [AgentProcess() for _ in range(4)]
    ps[0].call("pid", timeout_s=120)  # wait until they are up
    yield ps
    for p in ps:
        p.shutdown()


@pytest.fixture
def victim():
    p = AgentProcess()
    yield p
    p.kill()


def make_group(backend, procs, layouts_, prefix, **kw):
    """One agent per rank, each in its own process; returns (names, metadata)."""
    names = [f"{prefix}{next(_names)}r{lay.tp_rank}" for lay in layouts_]
    for p, n, lay in zip(procs, names, layouts_):
        p.send("create", backend, n, lay.to_dict(), hash(n) & 0xFFFF, kw)
    return names, [p.result() for p in procs[:len(names)]]


def connect(src_procs, src_names, src_md, dst_procs, dst_names, dst_md):
    for p, n in zip(src_procs, src_names):
        for peer, md in zip(dst_names, dst_md):
            p.call("add_peer", n, peer, md)
    for p, n in zip(dst_procs, dst_names):
        for peer, md in zip(src_names, src_md):
            p.call("add_peer", n, peer, md)


def regions(procs, names):
    return [np.frombuffer(p.call("region", n), dtype=np.uint8).copy() for p, n in zip(procs, names)]


def expected_dst(src_lays, src_bytes, dst_lays, dst_bytes, pairs, layers):
    out = []
    for d, before in zip(dst_lays, dst_bytes):
        want = before.copy()
        for layer in layers:
            for sb, db in pairs:
                for kv in (0, 1):
                    for h in range(d.kv_head_start, d.kv_head_end):
                        s = next(i for i, x in enumerate(src_lays) if x.holds_head(h))
                        so = src_lays[s].head_offset(layer, sb, kv, h)
                        do = d.head_offset(layer, db, kv, h)
                        n = d.head_bytes
                        want[do:do + n] = src_bytes[s][so:so + n]
        out.append(want)
    return out


def run_transfer(backend, procs, p, d, transfers, layers=None):
    """``transfers``: list of block-pair lists, each one transfer (all in flight at once)."""
    src_lays, dst_lays = layouts(p), layouts(d)
    src_procs, dst_procs = procs[:p], procs[2:2 + d]
    src_names, src_md = make_group(backend, src_procs, src_lays, "src", default_timeout_s=20)
    dst_names, dst_md = make_group(backend, dst_procs, dst_lays, "dst", default_timeout_s=20)
    connect(src_procs, src_names, src_md, dst_procs, dst_names, dst_md)
    src_before, dst_before = regions(src_procs, src_names), regions(dst_procs, dst_names)

    jobs = []  # (transfer id, plan)
    for t, pairs in enumerate(transfers):
        dst_blocks = [b for _, b in pairs]
        plans = plan_transfer(src_lays, dst_lays, [a for a, _ in pairs], dst_blocks, layers)
        # The receiver plans its side with placeholder source blocks (it does not know the
        # writer's), as the decode worker does: the same destination bytes are admitted.
        expected = plan_transfer(src_lays, dst_lays, list(range(len(pairs))), dst_blocks, layers)
        for pl, ex in zip(plans, expected, strict=True):
            tid = f"req{t}/{pl.src_rank}->{pl.dst_rank}"
            dst_procs[pl.dst_rank].call("expect", dst_names[pl.dst_rank], tid, src_names[pl.src_rank], ex.descs, None)
            jobs.append((tid, pl))

    for tid, pl in jobs:
        src_procs[pl.src_rank].call("write", src_names[pl.src_rank], tid, dst_names[pl.dst_rank],
                                    pl.descs, tid.encode(), None)
    for r, (proc, name) in enumerate(zip(src_procs, src_names)):
        res = proc.call("wait", name, [(tid, "write") for tid, pl in jobs if pl.src_rank == r])
        assert [s for s, *_ in res] == ["done"] * len(res), res
    for r, (proc, name) in enumerate(zip(dst_procs, dst_names)):
        res = proc.call("wait", name, [(tid, "expect") for tid, pl in jobs if pl.dst_rank == r])
        assert [s for s, *_ in res] == ["done"] * len(res), res
        got = proc.call("notifications", name)
        want = [(src_names[pl.src_rank], tid.encode()) for tid, pl in jobs if pl.dst_rank == r]
        assert sorted(got) == sorted(want)

    all_pairs = [pair for pairs in transfers for pair in pairs]
    lay_range = layers if layers is not None else range(GEO["num_layers"])
    want = expected_dst(src_lays, src_before, dst_lays, dst_before, all_pairs, lay_range)
    got = regions(dst_procs, dst_names)
    for r in range(d):
        changed = np.flatnonzero(got[r] != want[r])
        assert changed.size == 0, f"dst rank {r}: {changed.size} bytes differ, first at {changed[:5]}"
    assert all(np.array_equal(a, b) for a, b in zip(regions(src_procs, src_names), src_before))

    for proc, name in [*zip(src_procs, src_names), *zip(dst_procs, dst_names)]:
        assert proc.call("pending", name) == 0
    total = sum(pl.num_bytes for _, pl in jobs)
    sent = sum(pr.call("metrics", n)["bytes_written"] for pr, n in zip(src_procs, src_names))
    recv = sum(pr.call("metrics", n)["bytes_received"] for pr, n in zip(dst_procs, dst_names))
    assert sent == recv == total
    for proc, name in [*zip(src_procs, src_names), *zip(dst_procs, dst_names)]:
        proc.call("close", name)
    return jobs


# non-contiguous and contiguous block pairs, sent as two concurrent transfers
PAIRS = [[(3, 10), (4, 11), (5, 12)], [(9, 2), (0, 7), (15, 0)]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p,d", [(1, 1), (1, 2), (2, 1)])
def test_transfer_between_tp_groups(backend, procs, p, d):
    jobs = run_transfer(backend, procs, p, d, PAIRS)
    if (p, d) == (1, 1):  # contiguous runs merge: one descriptor per (layer, run)
        assert [pl.num_descriptors for _, pl in jobs] == [3 * 1, 3 * 3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_subset(backend, procs):
    run_transfer(backend, procs, 1, 2, PAIRS[:1], layers=range(0, 2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["dead", "frozen"])
def test_write_to_lost_peer_fails_within_timeout(backend, procs, victim, how):
    lay = layouts(1)
    (src,), (src_md,) = make_group(backend, procs[:1], lay, "src")
    (dst,), (dst_md,) = make_group(backend, [victim], lay, "victim")
    procs[0].call("add_peer", src, dst, dst_md)
    victim.call("add_peer", dst, src, src_md)
    descs = plan_transfer(lay, lay, [1, 2], [3, 4])[0].descs
    victim.call("expect", dst, "t-lost", src, descs, 30.0)
    if how == "dead":
        victim.kill()
    else:
        victim.stop()
    timeout = 1.5
    t0 = time.monotonic()
    procs[0].call("write", src, "t-lost", dst, descs, b"x", timeout)
    [(state, msg, _, _)] = procs[0].call("wait", src, [("t-lost", "write")])
    elapsed = time.monotonic() - t0
    assert state == "failed" and msg, msg
    assert elapsed < 30.0  # the write's own timeout ended it, not the receiver's 30-s expect
    victim.kill()  # a frozen peer's sockets close now; its connection must be let go
    assert procs[0].call("pending", src, 10.0) == 0
    m = procs[0].call("metrics", src)
    assert m["writes_failed"] == 1 and m["writes_done"] == 0
    procs[0].call("close", src)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expect_nobody_fulfils_fails_within_timeout(backend, procs):
    lay = layouts(1)
    names, mds = make_group(backend, procs[:2], [lay[0], lay[0]], "quiet")
    procs[1].call("add_peer", names[1], names[0], mds[0])
    descs = plan_transfer(lay, lay, [1], [2])[0].descs
    t0 = time.monotonic()
    procs[1].call("expect", names[1], "never", names[0], descs, 1.0)
    [(state, msg, _, _)] = procs[1].call("wait", names[1], [("never", "expect")])
    assert state == "failed" and "timed out" in msg
    assert time.monotonic() - t0 >= 1.0  # not before its deadline (the failure message says it timed out)
    assert procs[1].call("pending", names[1]) == 0
    # a write arriving after the receiver gave up is refused and counted, never notified,
    # and writes nothing: torch_dist's receiver copies nothing, NIXL's writer asked first
    procs[0].call("add_peer", names[0], names[1], mds[1])
    before = procs[1].call("region", names[1])
    procs[0].call("write", names[0], "never", names[1], descs, b"late", 5.0)
    [(state, msg, _, _)] = procs[0].call("wait", names[0], [("never", "write")])
    assert state == "failed" and "refused" in msg and "expired" in msg, msg
    assert procs[1].call("notifications", names[1]) == []
    assert procs[1].call("refusals", names[1]) == [(names[0], "never", "transfer expired")]
    assert procs[1].call("region", names[1]) == before
    # so is one nobody expected, and one revoked before the writer came
    procs[0].call("write", names[0], "made-up", names[1], descs, b"", 5.0)
    assert procs[0].call("wait", names[0], [("made-up", "write")])[0][0] == "failed"
    procs[1].call("expect", names[1], "revoked", names[0], descs, 30.0)
    assert procs[1].call("cancel", names[1], "revoked", "expect") is False  # nothing had started
    procs[0].call("write", names[0], "revoked", names[1], descs, b"", 5.0)
    assert procs[0].call("wait", names[0], [("revoked", "write")])[0][0] == "failed"
    assert [r[2] for r in procs[1].call("refusals", names[1])] == ["no such transfer expected", "transfer cancelled"]
    assert procs[1].call("region", names[1]) == before
    assert procs[1].call("metrics", names[1])["refused"] == 3
    for p, n in zip(procs, names):
        p.call("close", n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_and_close(backend, procs):
    lay = layouts(1)
    names, mds = make_group(backend, procs[:2], [lay[0], lay[0]], "args")
    procs[0].call("add_peer", names[0], names[1], mds[1])
    with pytest.raises(Exception, match="unknown peer"):
        procs[0].call("write", names[0], "t", "nobody", [[0, 0, 16]], b"", None)
    with pytest.raises(Exception, match="outside"):
        procs[0].call("write", names[0], "t", names[1], [[lay[0].region_bytes - 8, 0, 16]], b"", None)
    header, blob = unpack_metadata(mds[1])
    header["backend"] = "torch_dist" if backend == "nixl" else "nixl"
    with pytest.raises(Exception, match="backend"):
        procs[0].call("add_peer", names[0], names[1], pack_metadata(header, blob))
    with pytest.raises(Exception, match="metadata is for"):
        procs[0].call("add_peer", names[0], "someone-else", mds[1])
    # an empty transfer still notifies (the receiver answers claims: it knows the writer)
    procs[1].call("add_peer", names[1], names[0], mds[0])
    procs[1].call("expect", names[1], "empty", names[0], np.zeros((0, 3), np.int64), None)
    procs[0].call("write", names[0], "empty", names[1], np.zeros((0, 3), np.int64), b"e", None)
    assert procs[0].call("wait", names[0], [("empty", "write")])[0][0] == "done"
    deadline = time.monotonic() + 5
    got = []
    while not got and time.monotonic() < deadline:
        got = procs[1].call("notifications", names[1])
    assert got == [(names[0], b"e")]
    # close fails what is pending and is idempotent
    procs[1].call("expect", names[1], "pending", names[0], [[0, 0, 16]], 30.0)
    procs[1].call("close", names[1])
    procs[0].call("close", names[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_recovers_after_a_stalled_peer(backend, procs, victim):
    """A peer frozen past a write's deadline fails that write; once it runs again,
    the next write to it succeeds (a broken connection is replaced)."""
    lay = layouts(1)
    (src,), (src_md,) = make_group(backend, procs[:1], lay, "src")
    (dst,), (dst_md,) = make_group(backend, [victim], lay, "stall")
    procs[0].call("add_peer", src, dst, dst_md)
    victim.call("add_peer", dst, src, src_md)
    descs = plan_transfer(lay, lay, [1, 2], [3, 4])[0].descs
    for tid in ("warm", "stalled"):
        victim.call("expect", dst, tid, src, descs, 30.0)
    procs[0].call("write", src, "warm", dst, descs, b"w", 5.0)  # connection established
    assert procs[0].call("wait", src, [("warm", "write")])[0][0] == "done"
    victim.stop()
    procs[0].call("write", src, "stalled", dst, descs, b"s", 1.0)
    assert procs[0].call("wait", src, [("stalled", "write")])[0][0] == "failed"
    os.kill(victim.pid, signal.SIGCONT)
    descs2 = plan_transfer(lay, lay, [7], [9])[0].descs
    victim.call("expect", dst, "after", src, descs2, 30.0)
    procs[0].call("write", src, "after", dst, descs2, b"a", 10.0)
    assert procs[0].call("wait", src, [("after", "write")])[0][0] == "done"
    got = np.frombuffer(victim.call("region", dst), np.uint8)
    want = np.frombuffer(procs[0].call("region", src), np.uint8)
    for so, do, n in descs2.tolist():
        assert np.array_equal(got[do:do + n], want[so:so + n])
    assert procs[0].call("pending", src, 10.0) == 0
    procs[0].call("close", src)
