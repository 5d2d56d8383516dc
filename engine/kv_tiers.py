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

import threading
from collections import OrderedDict
from pathlib import Path
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .block_pool import BlockRemoved, BlockStored


_U64 = (1 << 64) - 1


def as_int64(block_hash: int) -> int:
    """A 64-bit block hash as a signed int64 (tensors carry it; ``& _U64`` undoes it)."""
    return block_hash - (1 << 64) if block_hash >= 1 << 63 else block_hash


def layout_digest(config) -> str:
    """What a disk-tier file must match to be reused: the model's config, the cache dtype,
    block size, TP size and cache kind (another layout's bytes are never loaded)."""
    import hashlib  # noqa: PLC0415

    m = config.model
    h = hashlib.sha256((Path(m.model_dir) / "config.json").read_bytes())
    h.update(f"{config.dtype}|{config.cache.block_size}|{config.parallel.tensor_parallel_size}|"
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
        self._add(block_hash, tuple(token_ids), slot)
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


HEADER_MAGIC = b"PDKVBLK1"
HEADER_BYTES = len(HEADER_MAGIC) + 32 + 8


def _check_writable(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / ".write-probe"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"kv offload dir {d} is not writable: {e}") from None


class DiskKVFiles:
    """One rank's disk tier: a file per slot, ``root/rank<r>/<slot>.kv``: a header
    (magic, the KV layout's digest, the block hash) then the block's bytes as the host
    tier holds them. Plain buffered files written under a temporary name and renamed, so
    a crash never leaves a torn block under a valid name; the page cache absorbs writes
    and serves recent reads."""

    def __init__(self, root: str | Path, rank: int, digest: str, block_shape: tuple[int, ...], dtype) -> None:
        self.dir = Path(root) / f"rank{rank}"
        _check_writable(self.dir)
        self.digest = digest.encode()[:32].ljust(32, b" ")
        self.block_shape = block_shape
        self.dtype = dtype
        self.data_bytes = int(torch.empty(block_shape, dtype=dtype).numel()) * torch.empty((), dtype=dtype).element_size()
        self.num_written = 0
        self.num_read = 0

    def path(self, slot: int) -> Path:
        return self.dir / f"{slot:08d}.kv"

    def header(self, block_hash: int) -> bytes:
        return HEADER_MAGIC + self.digest + int(block_hash).to_bytes(8, "little")

    def write(self, slot: int, block_hash: int, data: torch.Tensor) -> None:
        tmp = self.path(slot).with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(self.header(block_hash))
            f.write(data.contiguous().view(torch.uint8).numpy().tobytes())
        tmp.replace(self.path(slot))
        self.num_written += 1

    def holds(self, slot: int, block_hash: int) -> bool:
        try:
            with open(self.path(slot), "rb") as f:
                ok = f.read(HEADER_BYTES) == self.header(block_hash)
            return ok and self.path(slot).stat().st_size == HEADER_BYTES + self.data_bytes
        except OSError:
            return False

    def read(self, slot: int, block_hash: int) -> torch.Tensor:
        with open(self.path(slot), "rb") as f:
            if f.read(HEADER_BYTES) != self.header(block_hash):
                raise RuntimeError(f"disk tier file {self.path(slot)} does not hold block {block_hash:#x}")
            raw = bytearray(self.data_bytes)
            if f.readinto(raw) != self.data_bytes:
                raise RuntimeError(f"disk tier file {self.path(slot)} is short")
        self.num_read += 1
        return torch.frombuffer(raw, dtype=torch.uint8).view(self.dtype).view(self.block_shape)


class DiskTierMeta:
    """The engine's record of the disk tier (rank 0's process): per slot, the block hash
    and token ids (``root/meta/<slot>.meta``), written when a block is spilled, read back
    after a restart and checked against every rank's data file. A directory is one
    worker's: a lock file refuses a second worker on it."""

    def __init__(self, root: str | Path) -> None:
        self.dir = Path(root) / "meta"
        _check_writable(self.dir)
        import fcntl  # noqa: PLC0415 - POSIX only, like the rest of the worker

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
