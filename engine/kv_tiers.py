"""KV memory below the accelerator's KV region: the host tier.

A full block evicted from the KV region (its slot reused for new content) is copied to
a host-memory pool instead of being dropped; a prefix lookup that runs past the
region's cache continues in the host pool, and the blocks it finds there are copied
back into freshly allocated region blocks while the request waits (``LOADING_KV``),
then count as prefix-cache hits. Nothing is ever computed twice that either tier
still holds.

Two halves, as with the rest of the engine:

* :class:`TierIndex` -- rank 0's bookkeeping (pure Python): which block hash lives in
  which host slot, LRU order, pins for slots being read, and the KV events of the
  tier (``BlockStored`` / ``BlockRemoved`` with ``tier="host"``). The scheduler turns
  its decisions into copy operations, ``(region block id, host slot)`` pairs.
* :class:`HostKVCache` -- one rank's host pool and copy engine. Every rank holds its
  own shard of each block (tensor parallelism: heads split across ranks), so every
  rank applies the same copy operations to its own memory; they travel with the
  step's inputs (``StepInputs.kv_save_ops`` / ``kv_load_ops``).

Ordering, per step, on every rank (``ModelRunner.run``): wait for the previous step's
loads; run this step's saves (region -> host; synchronous, before the forward
overwrites the evicted blocks); start this step's loads (host -> region,
asynchronous: a copy thread on the CPU, a side stream on CUDA); run the forward. A
request whose blocks are loading is scheduled no earlier than the next step, whose
forward runs after the wait, so the engine loop never waits on a copy it could overlap.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import threading
from collections import OrderedDict
from pathlib import Path
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .block_pool import BlockRemoved, BlockStored


_U64 = (1 << 64) - 1


def as_int64(block_hash: int) -> int:
    """A 64-bit block hash as a signed int64 (tensors carry it; ``& _U64`` undoes it)."""
    return block_hash - (1 << 64) if block_hash >= 1 << 63 else block_hash


def tier_dtype(config) -> torch.dtype:
    """The element type the tiers copy and store: the cache's, except that an FP8 cache is
    moved as uint8 (same bytes; CPU torch has no float8 ``index_copy_``/``index_put_``)."""
    return torch.uint8 if config.kv_dtype == torch.float8_e4m3fn else config.kv_dtype


def layout_digest(config) -> str:
    """What a disk-tier file must match to be reused: the model's config, the cache dtype,
    block size, TP size and cache kind (another layout's bytes are never loaded)."""
    import hashlib  # noqa: PLC0415

    m = config.model
    h = hashlib.sha256((Path(m.model_dir) / "config.json").read_bytes())
    h.update(f"{config.kv_dtype}|{config.cache.block_size}|{config.parallel.tensor_parallel_size}|"
             f"{getattr(m, 'cache_kind', 'kv')}".encode())
    return h.hexdigest()[:32]


@dataclass
class _Entry:
    slot: int
    token_ids: tuple[int, ...]
    pins: int = 0


class TierIndex:
    """Which block hashes a tier holds and where (rank 0; no torch).

    ``lookup`` confirms the block's token ids (a 64-bit hash collision costs a miss, never
    a wrong block). ``insert`` takes a free slot or evicts the least recently used
    unpinned entry; pinned entries (a load from them is in flight) are never evicted.
    """

    def __init__(self, num_slots: int, block_size: int, tier: str = "host") -> None:
        if num_slots < 1:
            raise ValueError(f"a {tier} tier needs at least one block, got {num_slots}")
        self.num_slots = num_slots
        self.block_size = block_size
        self.tier = tier
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # LRU first
        self._free = list(range(num_slots - 1, -1, -1))
        self._events: list = []
        self._reserved: dict[int, tuple[int, tuple[int, ...]]] = {}
        """Slot -> (hash, token ids) reserved for a block not written yet (a KV pool fetch):
        neither free nor an entry, so no lookup finds it and no insert takes it."""
        self._reserved_hashes: set[int] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._entries

    def lookup(self, block_hash: int, token_ids: Sequence[int], touch: bool = True) -> int | None:
        e = self._entries.get(block_hash)
        if e is None or e.token_ids != tuple(token_ids):
            return None
        if touch:
            self._entries.move_to_end(block_hash)
        return e.slot

    def insert(self, block_hash: int, token_ids: Sequence[int]) -> tuple[int | None, tuple | None]:
        """(a slot for a new block, or None: already held, or every slot is pinned; the
        entry evicted to make room, ``(hash, token_ids, slot)``, or None)."""
        if block_hash in self._entries:
            self._entries.move_to_end(block_hash)
            return None, None
        slot, evicted = self._take_slot()
        if slot is not None:
            self._add(block_hash, tuple(token_ids), slot)
        return slot, evicted

    def reserve(self, block_hash: int, token_ids: Sequence[int]) -> tuple[int | None, tuple | None]:
        """Like ``insert``, but the slot stays invisible (no lookup finds it, nothing evicts
        it) until ``confirm`` publishes it or ``release`` frees it. None: already held, or
        every slot is pinned or reserved, or the hash is reserved already."""
        if block_hash in self._entries or block_hash in self._reserved_hashes:
            return None, None
        slot, evicted = self._take_slot()
        if slot is not None:
            self._reserved[slot] = (block_hash, tuple(token_ids))
            self._reserved_hashes.add(block_hash)
        return slot, evicted

    def confirm(self, slot: int) -> int | None:
        """The reserved slot now holds its block: an entry like any other (stored event
        published); returns its hash. None (slot freed) when meanwhile an entry for the
        hash appeared."""
        block_hash, token_ids = self._reserved.pop(slot)
        self._reserved_hashes.discard(block_hash)
        if block_hash in self._entries:
            self._free.append(slot)
            return None
        self._add(block_hash, token_ids, slot)
        return block_hash

    def release(self, slot: int) -> None:
        """Give a reserved slot back unused."""
        block_hash, _ = self._reserved.pop(slot)
        self._reserved_hashes.discard(block_hash)
        self._free.append(slot)

    @property
    def num_reserved(self) -> int:
        return len(self._reserved)

    def _take_slot(self) -> tuple[int | None, tuple | None]:
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((h for h, e in self._entries.items() if not e.pins), None)
            if victim is None:
                return None, None
            e = self._entries.pop(victim)
            slot = e.slot
            evicted = (victim, e.token_ids, slot)
            self._events.append(BlockRemoved((victim,), tier=self.tier))
        return slot, evicted

    def _add(self, block_hash: int, token_ids: tuple[int, ...], slot: int) -> None:
        self._entries[block_hash] = _Entry(slot, token_ids)
        self._events.append(BlockStored((block_hash,), None, token_ids, self.block_size, tier=self.tier))

    def restore(self, entries: Sequence[tuple[int, int, tuple[int, ...]]]) -> None:
        """Re-index what a tier already holds (a disk tier after a restart): ``(slot,
        hash, token_ids)`` each, oldest first; their stored events are published anew."""
        for slot, block_hash, token_ids in entries:
            if slot in self._free and block_hash not in self._entries:
                self._free.remove(slot)
                self._add(block_hash, tuple(token_ids), slot)

    def pin(self, block_hash: int) -> None:
        self._entries[block_hash].pins += 1

    def unpin(self, block_hash: int) -> None:
        e = self._entries.get(block_hash)
        if e is not None and e.pins > 0:
            e.pins -= 1

    @property
    def num_pinned(self) -> int:
        return sum(1 for e in self._entries.values() if e.pins)

    def take_events(self) -> list:
        events, self._events = self._events, []
        return events


class HostKVCache:
    """One rank's host pool: ``[num_slots, layers, planes, kv_heads, block_size, head_dim]``
    in the region's dtype (pinned memory on CUDA), and the copies between it and the
    region ``kv_cache`` (``[layers, blocks, planes, kv_heads, block_size, head_dim]``)."""

    def __init__(self, kv_cache: torch.Tensor, num_slots: int, disk: "DiskKVFiles | None" = None) -> None:
        self.kv_cache = kv_cache
        self.disk = disk
        self.is_cuda = kv_cache.device.type == "cuda"
        shape = (num_slots, kv_cache.shape[0], *kv_cache.shape[2:])
        self.host = torch.zeros(shape, dtype=kv_cache.dtype, pin_memory=self.is_cuda)
        self._thread: threading.Thread | None = None
        self._disk_thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._event = None
        self._stream = torch.cuda.Stream(kv_cache.device) if self.is_cuda else None
        self.num_saved = 0
        self.num_loaded = 0

    def save(self, ops: torch.Tensor) -> None:
        """Region -> host, before anything overwrites the blocks. ``ops``: [K, 2] (block id, slot)."""
        if not ops.shape[0]:
            return
        blocks, slots = ops[:, 0].to(self.kv_cache.device), ops[:, 1].cpu()
        data = self.kv_cache.index_select(1, blocks).transpose(0, 1)  # [K, L, planes, H, bs, D]
        self.host[slots] = data.to("cpu")  # waits on CUDA: the forward overwrites these blocks next
        self.num_saved += ops.shape[0]

    def spill(self, ops: torch.Tensor) -> None:
        """Host -> disk, before a save reuses the slots. ``ops``: [K, 3] (host slot, disk
        slot, block hash as int64)."""
        for slot, dslot, h in ops.tolist():
            self.disk.write(dslot, h & _U64, self.host[slot])

    def start_loads(self, ops: torch.Tensor, disk_ops: torch.Tensor | None = None) -> None:
        """Host -> region (``ops``: [K, 2] (slot, block id)) and disk -> region
        (``disk_ops``: [K, 3] (disk slot, block id, hash)), asynchronously. Call
        :meth:`wait` before anything reads those blocks (the next step's run does)."""
        if disk_ops is not None and disk_ops.shape[0]:
            self._start_disk_loads(disk_ops)
        if not ops.shape[0]:
            return
        slots, blocks = ops[:, 0].cpu(), ops[:, 1].to(self.kv_cache.device)
        if self.is_cuda:
            with torch.cuda.stream(self._stream):
                data = self.host[slots].pin_memory().to(self.kv_cache.device, non_blocking=True)
                self.kv_cache.index_copy_(1, blocks, data.transpose(0, 1))
                self._event = torch.cuda.Event()
                self._event.record(self._stream)
        else:
            def copy() -> None:
                try:
                    self.kv_cache.index_copy_(1, blocks, self.host[slots].transpose(0, 1))
                except BaseException as e:  # noqa: BLE001 - re-raised by wait()
                    self._error = e

            self._thread = threading.Thread(target=copy, name="pdserve-kv-load", daemon=True)
            self._thread.start()
        self.num_loaded += ops.shape[0]

    def _start_disk_loads(self, ops: torch.Tensor) -> None:
        """File reads block, so they run on their own thread on every device."""
        items = ops.tolist()
        device = self.kv_cache.device

        def read() -> None:
            try:
                for dslot, block, h in items:
                    data = self.disk.read(dslot, h & _U64)  # [L, planes, H, bs, D]
                    if self.is_cuda:
                        with torch.cuda.stream(self._stream):
                            self.kv_cache[:, block].copy_(data.pin_memory().to(device, non_blocking=True))
                        self._stream.synchronize()
                    else:
                        self.kv_cache[:, block].copy_(data)
            except BaseException as e:  # noqa: BLE001 - re-raised by wait()
                self._error = e

        self._disk_thread = threading.Thread(target=read, name="pdserve-kv-disk-load", daemon=True)
        self._disk_thread.start()
        self.num_loaded += len(items)

    def wait(self) -> None:
        """Every load started so far has landed (CUDA: the current stream waits for it)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._disk_thread is not None:
            self._disk_thread.join()
            self._disk_thread = None
        if self._event is not None:
            torch.cuda.current_stream(self.kv_cache.device).wait_event(self._event)
            self._event = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"loading KV blocks from the host tier failed: {error}") from error


HEADER_MAGIC = b"PDKVBLK2"
"""Format 2: the header padded to one 4 KiB page and the file to a multiple of 4 KiB (so
it can be read with ``O_DIRECT``); it also records the block's byte count. A format-1
file (``PDKVBLK1``: a 48-byte header, then the bytes) does not match and is ignored."""
ALIGN = 4096
HEADER_FIELDS = len(HEADER_MAGIC) + 32 + 8 + 8  # magic, layout digest, block hash, data bytes
HEADER_BYTES = ALIGN

log = logging.getLogger(__name__)


def _check_writable(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / ".write-probe"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"kv offload dir {d} is not writable: {e}") from None


def _round_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def _aligned_empty(nbytes: int) -> np.ndarray:
    """``nbytes`` of uninitialised, page-aligned memory (as ``O_DIRECT`` needs). From
    numpy's allocator (malloc), which reuses freed memory: a fresh anonymous map per read
    cost ~3 ms of page faults per 2 MiB block on the benchmark's VM (the read ~0.3 ms), and
    ``torch.empty`` ~30% of a hot 256 KiB read more than ``np.empty``."""
    a = np.empty(nbytes + ALIGN, dtype=np.uint8)
    off = -a.ctypes.data % ALIGN
    return a[off:off + nbytes]


def _supports_direct(d: Path) -> bool:
    """Whether files in ``d`` open with ``O_DIRECT`` and read a page with it (tmpfs before
    Linux 6.6, and some FUSE and network file systems, refuse: ``EINVAL``)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = d / ".direct-probe"
    try:
        probe.write_bytes(b"\0" * ALIGN)
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
        try:
            return os.preadv(fd, [_aligned_empty(ALIGN)], 0) == ALIGN
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


def _write_all(fd: int, bufs: list) -> None:
    views = [memoryview(b).cast("B") for b in bufs if len(b)]
    while views:
        n = os.writev(fd, views)
        if n <= 0:
            raise OSError(errno.EIO, "writev wrote nothing")
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(f, ctypes.c_uint64) for f in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted",
                                               "nr_recently_evicted")]


_SYS_CACHESTAT = 451  # Linux 6.5+, the same number on every architecture
_libc = None


def _c():
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        _libc = libc
    return _libc


def _cachestat_pages(fd: int, size: int) -> int | None:
    cs = _CacheStat()
    if _c().syscall(_SYS_CACHESTAT, fd, ctypes.byref(_CacheStatRange(0, size)), ctypes.byref(cs), 0) != 0:
        return None  # ENOSYS before Linux 6.5
    return cs.nr_cache * mmap.PAGESIZE // ALIGN


def _mincore_pages(fd: int, size: int) -> int | None:
    libc = _c()
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        return None
    try:
        vec = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
        if libc.mincore(addr, size, vec) != 0:
            return None
        return sum(b & 1 for b in vec.raw) * mmap.PAGESIZE // ALIGN
    finally:
        libc.munmap(addr, size)


def cached_pages(fd: int, size: int) -> int:
    """How many 4 KiB pages of the file's first ``size`` bytes the page cache holds, with no
    I/O: ``cachestat`` (Linux 6.5+), else ``mincore`` on a mapping of the file that nothing
    touches; 0 when neither answers. (``preadv2(RWF_NOWAIT)`` is no such probe: on a miss
    it starts readahead before it fails, and the ``O_DIRECT`` read then races that I/O.)"""
    n = _cachestat_pages(fd, size)
    if n is None:
        n = _mincore_pages(fd, size)
    return n or 0


class DiskKVFiles:
    """One rank's disk tier: a file per slot, ``root/rank<r>/<slot>.kv``: a 4 KiB header
    page (magic, the KV layout's digest, the block hash, the byte count), then the block's
    bytes as the host tier holds them from offset 4096, zero-padded to a multiple of 4 KiB.

    I/O path, chosen by ``benchmarks/bench_disk_tier.py`` (figures: docs/benchmarks.md, 2
    MiB blocks, per block p50, every method interleaved block by block):

    * writes go through the page cache: the header page, then the block straight from
      the host tier's memory (no staging copy), under a temporary name then renamed, so a
      crash never leaves a torn block under a valid name. Spills are synchronous in the
      engine's step: a buffered write returns once the bytes are in memory (3.3 ms), an
      ``O_DIRECT`` one when the device has them (7.6 ms). Two writes, not one: a single
      ``writev`` of header and block from offset 0 took twice the CPU (7.1 ms).
    * reads go through the page cache too: the header's fields, checked, then the block
      into fresh memory. A block spilled recently is a memory copy (0.8 ms; ``O_DIRECT``
      2.4 ms), and on the benchmark's VM disk a cold block read this way (2.0 ms) was no
      slower than ``O_DIRECT`` (2.5-2.7 ms) or a single read of the file from offset 0
      (3.2 ms).
    * ``direct=True`` (or ``PDSERVE_KV_DISK_DIRECT=1``) reads a block the page cache does
      not hold entirely (:func:`cached_pages`, no I/O) with one ``O_DIRECT`` read into
      page-aligned memory: a little less CPU per cold block here (1.04 against 1.18 ms)
      and no page-cache churn, for hosts whose drives outrun their page cache (fast
      NVMe); measure there before turning it on. A file system that refuses
      ``O_DIRECT`` (tmpfs before Linux 6.6, some FUSE: the probe at start, or ``EINVAL``
      on a read) turns it off again.

    NIXL's POSIX file plugin (``nixl_cu12``) works on this build and was measured too; it
    is not used: per block it needs the file registered as FILE memory and a staged copy,
    and it was slower than the plain system calls in every phase.
    """

    def __init__(self, root: str | Path, rank: int, digest: str, block_shape: tuple[int, ...], dtype,
                 direct: bool | None = None) -> None:
        self.dir = Path(root) / f"rank{rank}"
        _check_writable(self.dir)
        self._dir = str(self.dir)
        self.digest = digest.encode()[:32].ljust(32, b" ")
        self.block_shape = tuple(block_shape)
        self.dtype = dtype
        self.data_bytes = int(torch.empty(block_shape, dtype=dtype).numel()) * torch.empty((), dtype=dtype).element_size()
        self.file_bytes = HEADER_BYTES + _round_up(self.data_bytes)
        self._pad = bytes(self.file_bytes - HEADER_BYTES - self.data_bytes)
        if direct is None:
            direct = os.environ.get("PDSERVE_KV_DISK_DIRECT", "") not in ("", "0")
        self.direct = bool(direct) and _supports_direct(self.dir)
        """Cold reads bypass the page cache with ``O_DIRECT`` (off by default: see above)."""
        self.num_written = 0
        self.num_read = 0
        self.num_direct_reads = 0
        """Reads that went to the device with ``O_DIRECT`` (only with ``direct``)."""

    def path(self, slot: int) -> Path:
        return self.dir / f"{slot:08d}.kv"

    def _fields(self, block_hash: int) -> bytes:
        """The header's fields (its first ``HEADER_FIELDS`` bytes) for this block."""
        return HEADER_MAGIC + self.digest + int(block_hash).to_bytes(8, "little") + self.data_bytes.to_bytes(8, "little")

    def header(self, block_hash: int) -> bytes:
        """The file's first page for this block and layout."""
        return self._fields(block_hash).ljust(HEADER_BYTES, b"\0")

    def write(self, slot: int, block_hash: int, data: torch.Tensor) -> None:
        payload = data.contiguous().view(torch.uint8).reshape(-1)
        if payload.numel() != self.data_bytes:
            raise ValueError(f"disk tier block of {payload.numel()} bytes, expected {self.data_bytes}")
        tmp = self.path(slot).with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, [self.header(block_hash)])  # two writes, not one (the class docstring)
            _write_all(fd, [payload.numpy(), self._pad])
        finally:
            os.close(fd)
        os.replace(tmp, self.path(slot))
        self.num_written += 1

    def holds(self, slot: int, block_hash: int) -> bool:
        """Whether the slot's file is this layout's block ``block_hash``, whole (a restart
        re-indexes only such files; other formats and layouts are ignored)."""
        try:
            fd = os.open(self.path(slot), os.O_RDONLY)
        except OSError:
            return False
        try:
            return (os.fstat(fd).st_size == self.file_bytes
                    and os.pread(fd, HEADER_FIELDS, 0) == self._fields(block_hash))
        except OSError:
            return False
        finally:
            os.close(fd)

    def read(self, slot: int, block_hash: int) -> torch.Tensor:
        """The block (``block_shape``, ``dtype``), in memory of its own. A file that is not
        this layout's block ``block_hash``, whole, raises RuntimeError."""
        fd = os.open(f"{self._dir}/{slot:08d}.kv", os.O_RDONLY)  # (a str: pathlib costs ~10% of a hot read)
        try:
            buf = None
            if self.direct and cached_pages(fd, self.file_bytes) != self.file_bytes // ALIGN:
                buf = self._read_direct(fd)
            if buf is not None:
                head = buf[:HEADER_FIELDS].tobytes()
                whole = len(buf) == self.file_bytes
                data = buf[HEADER_BYTES:HEADER_BYTES + self.data_bytes]
            else:
                head = os.pread(fd, HEADER_FIELDS, 0)
                data = np.empty(self.data_bytes, dtype=np.uint8)
                whole = os.preadv(fd, [data], HEADER_BYTES) == self.data_bytes
        finally:
            os.close(fd)
        if head != self._fields(block_hash):
            raise RuntimeError(f"disk tier file {self.path(slot)} does not hold block {block_hash:#x} of this layout")
        if not whole:
            raise RuntimeError(f"disk tier file {self.path(slot)} is short (torn)")
        self.num_read += 1
        return torch.from_numpy(data).view(self.dtype).view(self.block_shape)

    def _read_direct(self, fd: int) -> np.ndarray | None:
        """The whole file with one ``O_DIRECT`` read (the array is the bytes read), or None
        where that is refused (``direct`` is off from then on)."""
        buf = _aligned_empty(self.file_bytes)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
            n = os.preadv(fd, [buf], 0)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            log.warning("disk KV tier: %s refuses O_DIRECT reads (%s); reading through the page cache", self.dir, e)
            self.direct = False
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
            return None
        self.num_direct_reads += 1
        return buf[:n]


class DiskTierMeta:
    """The engine's record of the disk tier (rank 0's process): per slot, the block hash
    and token ids (``root/meta/<slot>.meta``), written when a block is spilled, read back
    after a restart and checked against every rank's data file. A directory is one
    worker's: a lock file refuses a second worker on it."""

    def __init__(self, root: str | Path) -> None:
        self.dir = Path(root) / "meta"
        _check_writable(self.dir)
        self._lock = open(Path(root) / ".lock", "w")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(f"kv offload dir {root} is in use by another worker") from None

    def write(self, slot: int, block_hash: int, token_ids: Sequence[int]) -> None:
        body = int(block_hash).to_bytes(8, "little") + b"".join(int(t).to_bytes(4, "little") for t in token_ids)
        tmp = self.dir / f"{slot:08d}.tmp"
        tmp.write_bytes(body)
        tmp.replace(self.dir / f"{slot:08d}.meta")

    def scan(self, num_slots: int, rank_files: Sequence[DiskKVFiles]) -> list[tuple[int, int, tuple[int, ...]]]:
        """``(slot, hash, token_ids)`` of the blocks every rank's file holds, oldest first."""
        found = []
        for f in self.dir.glob("*.meta"):
            try:
                slot = int(f.stem)
                raw = f.read_bytes()
            except (ValueError, OSError):
                continue
            if slot >= num_slots or len(raw) < 8 or (len(raw) - 8) % 4:
                continue
            block_hash = int.from_bytes(raw[:8], "little")
            if all(r.holds(slot, block_hash) for r in rank_files):
                tokens = tuple(int.from_bytes(raw[i:i + 4], "little") for i in range(8, len(raw), 4))
                found.append((f.stat().st_mtime_ns, slot, block_hash, tokens))
        return [(slot, h, toks) for _, slot, h, toks in sorted(found)]

    def close(self) -> None:
        self._lock.close()


__all__ = ["DiskKVFiles", "DiskTierMeta", "HostKVCache", "TierIndex"]
