"""The disk KV tier's files (engine/kv_tiers.py ``DiskKVFiles``, ``DiskTierMeta.scan``):
bit-exact round trips through the page cache and through ``O_DIRECT``, files that must be
ignored (another layout, another block, truncated, the old format), and the fall-back to
buffered reads where ``O_DIRECT`` is refused."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from pdserve.engine import kv_tiers
from pdserve.engine.kv_tiers import HEADER_BYTES, DiskKVFiles, DiskTierMeta

SHAPE = (3, 2, 2, 16, 12)  # [layers, planes, kv heads, block size, head dim]: 4,608 bytes in bf16, not page-sized
H = 0xF00D_CAFE_0000_0001  # above 2**63: stored unsigned


def block(seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


def files(root: Path, direct: bool | None = None, digest: str = "layout-a", dtype=torch.bfloat16) -> DiskKVFiles:
    return DiskKVFiles(root, 0, digest, SHAPE, dtype, direct=direct)


@pytest.fixture
def no_page_cache(monkeypatch):
    """Every file looks uncached: reads take the ``O_DIRECT`` path (where it is on)."""
    monkeypatch.setattr(kv_tiers, "cached_pages", lambda fd, size: 0)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("direct", [True, False])
def test_round_trip_is_bit_exact(tmp_path, direct, dtype):
    f = files(tmp_path, direct=direct, dtype=dtype)
    data = [block(i, dtype) for i in range(3)]
    for slot, x in enumerate(data):
        f.write(slot, H + slot, x)
    assert f.num_written == 3
    assert f.path(0).stat().st_size == f.file_bytes and f.file_bytes % 4096 == 0
    for slot, x in enumerate(data):
        assert f.holds(slot, H + slot)
        assert same(f.read(slot, H + slot), x)
    assert f.num_read == 3
    f.write(1, H + 7, data[0])  # a slot reused for another block
    assert same(f.read(1, H + 7), data[0]) and not f.holds(1, H + 1)


def test_direct_reads_are_off_unless_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("PDSERVE_KV_DISK_DIRECT", raising=False)
    assert files(tmp_path).direct is False
    monkeypatch.setenv("PDSERVE_KV_DISK_DIRECT", "1")
    assert files(tmp_path).direct is kv_tiers._supports_direct(tmp_path)
    assert files(tmp_path, direct=False).direct is False


def test_cold_reads_use_o_direct(tmp_path, no_page_cache):
    f = files(tmp_path, direct=True)
    if not f.direct:
        pytest.skip(f"{tmp_path} refuses O_DIRECT")
    x = block(1)
    f.write(5, H, x)
    got = f.read(5, H)
    assert same(got, x) and f.num_direct_reads == 1 and f.direct
    assert got.data_ptr() % 4096 == 0  # the block's page of the aligned buffer
    del got  # the aligned buffer goes with its last view
    assert same(f.read(5, H), x) and f.num_direct_reads == 2


def test_cached_pages_counts_without_io(tmp_path):
    f = files(tmp_path, direct=True)
    f.write(0, H, block(0))
    pages = f.file_bytes // 4096
    fd = os.open(f.path(0), os.O_RDONLY)
    try:
        for probe in (kv_tiers._cachestat_pages, kv_tiers._mincore_pages):
            got = probe(fd, f.file_bytes)
            assert got is None or got == pages, probe  # None: cachestat before Linux 6.5
        assert kv_tiers.cached_pages(fd, f.file_bytes) == pages  # just written: all cached
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        evicted = kv_tiers.cached_pages(fd, f.file_bytes)
        assert evicted == kv_tiers._mincore_pages(fd, f.file_bytes)
        assert evicted == kv_tiers.cached_pages(fd, f.file_bytes)  # asking reads nothing in
    finally:
        os.close(fd)
    if fs_type(tmp_path) in ("tmpfs", "ramfs"):
        return  # memory is the file: nothing to evict
    assert evicted == 0
    assert same(f.read(0, H), block(0)) and f.num_direct_reads == (1 if f.direct else 0)  # cold: O_DIRECT
    # an O_DIRECT read leaves the page cache alone: the block is still cold
    assert same(f.read(0, H), block(0)) and f.num_direct_reads == (2 if f.direct else 0)


def fs_type(path: Path) -> str:
    """The type of the file system holding ``path`` (/proc/self/mounts, longest prefix)."""
    best, kind = "", "?"
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        if str(path.resolve()).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


def test_warm_reads_come_from_the_page_cache(tmp_path):
    f = files(tmp_path, direct=True)
    x = block(2)
    f.write(0, H, x)  # just written: the page cache holds it (dirty or clean)
    assert same(f.read(0, H), x) and f.num_direct_reads == 0


def test_other_layout_or_block_is_ignored(tmp_path):
    f = files(tmp_path, direct=True)
    f.write(0, H, block(0))
    other_layout = files(tmp_path, digest="layout-b")
    assert not other_layout.holds(0, H)
    with pytest.raises(RuntimeError, match="does not hold block"):
        other_layout.read(0, H)
    assert not f.holds(0, H + 1)
    with pytest.raises(RuntimeError, match="does not hold block"):
        f.read(0, H + 1)
    assert not f.holds(1, H)  # no file
    with pytest.raises(FileNotFoundError):
        f.read(1, H)
    other_shape = DiskKVFiles(tmp_path, 0, "layout-a", (3, 2, 2, 16, 8), torch.bfloat16)
    assert not other_shape.holds(0, H)
    with pytest.raises(RuntimeError, match="does not hold block"):  # the header has the byte count
        other_shape.read(0, H)


@pytest.mark.parametrize("direct", [True, False])
def test_truncated_or_old_format_file_is_ignored(tmp_path, direct, no_page_cache):
    f = files(tmp_path, direct=direct)
    f.write(0, H, block(0))
    with open(f.path(0), "r+b") as fh:
        fh.truncate(f.file_bytes - 4096)
    assert not f.holds(0, H)
    with pytest.raises(RuntimeError, match="is short"):
        f.read(0, H)
    f.write(0, H, block(0))
    with open(f.path(0), "r+b") as fh:
        fh.truncate(HEADER_BYTES + 100)  # torn mid-block (not a multiple of the page)
    assert not f.holds(0, H)
    with pytest.raises(RuntimeError, match="is short"):
        f.read(0, H)
    with open(f.path(0), "r+b") as fh:
        fh.truncate(10)  # not even a header
    assert not f.holds(0, H)
    with pytest.raises(RuntimeError, match="does not hold block"):
        f.read(0, H)
    # format 1: "PDKVBLK1", digest, hash, then the bytes (a file a previous version left)
    old = b"PDKVBLK1" + f.digest + H.to_bytes(8, "little") + block(0).view(torch.uint8).numpy().tobytes()
    f.path(0).write_bytes(old)
    assert not f.holds(0, H)
    with pytest.raises(RuntimeError, match="does not hold block"):
        f.read(0, H)


def test_write_rejects_a_block_of_another_size(tmp_path):
    f = files(tmp_path)
    with pytest.raises(ValueError, match="bytes, expected"):
        f.write(0, H, torch.zeros(10, dtype=torch.bfloat16))
    assert not f.path(0).exists()


def test_probe_falls_back_where_o_direct_is_refused(tmp_path, monkeypatch):
    """tmpfs before Linux 6.6 (and some FUSE file systems): open(O_DIRECT) -> EINVAL."""
    real = os.open

    def open_(path, flags, *a, **k):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument (test)")
        return real(path, flags, *a, **k)

    monkeypatch.setattr(kv_tiers.os, "open", open_)
    f = files(tmp_path, direct=True)
    assert f.direct is False
    x = block(3)
    f.write(0, H, x)
    assert same(f.read(0, H), x) and f.num_direct_reads == 0


def test_read_falls_back_when_o_direct_fails_at_run_time(tmp_path, monkeypatch, no_page_cache):
    real = kv_tiers.fcntl.fcntl

    def fcntl_(fd, cmd, arg=0):
        if cmd == kv_tiers.fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument (test)")
        return real(fd, cmd, arg)

    monkeypatch.setattr(kv_tiers.fcntl, "fcntl", fcntl_)
    f = files(tmp_path, direct=True)
    x, y = block(4), block(5)
    f.write(0, H, x)
    f.write(1, H + 1, y)
    assert same(f.read(0, H), x)
    assert f.direct is False and f.num_direct_reads == 0
    assert same(f.read(1, H + 1), y)


def test_tmpfs_round_trip():
    """A real tmpfs (/dev/shm): whichever path the probe picks there, blocks round-trip."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    import tempfile

    with tempfile.TemporaryDirectory(dir=shm) as d:
        for direct in (False, True):
            f = files(Path(d), direct=direct)
            x = block(6 + direct)
            f.write(0, H, x)
            assert same(f.read(0, H), x) and f.holds(0, H)


def test_meta_scan_keeps_only_blocks_every_rank_holds(tmp_path):
    meta = DiskTierMeta(tmp_path)
    try:
        ranks = [DiskKVFiles(tmp_path, r, "layout-a", SHAPE, torch.bfloat16) for r in range(2)]
        for slot in range(3):
            meta.write(slot, H + slot, [slot, 1, 2])
            for r in ranks:
                r.write(slot, H + slot, block(slot))
        ranks[1].path(1).unlink()  # rank 1 lost slot 1
        ranks[0].path(2).write_bytes(b"junk")  # rank 0's slot 2 is torn
        assert meta.scan(8, ranks) == [(0, H, (0, 1, 2))]
        assert meta.scan(8, [files(tmp_path, digest="layout-b")]) == []  # another layout: nothing
    finally:
        meta.close()
