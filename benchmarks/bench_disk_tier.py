"""The disk KV tier's I/O path (engine/kv_tiers.py ``DiskKVFiles``): plain buffered files,
O_DIRECT, mmap and NIXL's POSIX file plugin, for the same blocks, in one run.

    python benchmarks/bench_disk_tier.py [--dir DIR] [--sizes 2097152,262144] [--blocks 128,384]
        [--methods buffered,buffered_1io,odirect,mmap,nixl,nixl_odirect,diskkvfiles,diskkvfiles_direct]
        [--repeat 1]
        [--drop-caches]

One file per block, as the tier keeps them: a header (magic, layout digest, block hash),
then the block's bytes; every method writes under a temporary name and renames, and every
read checks the header and lands in a destination tensor (the KV region's block, as
``HostKVCache`` copies it), so a zero-copy mmap read pays for its page faults there.
Default sizes: a Llama-3-8B block (32 layers x K,V x 8 KV heads x 16 tokens x 128 x 2
bytes = 2 MiB) and a 256 KiB one.

* ``buffered``: the tier as it was (format 1, the baseline of every ratio):
  ``write(header); write(data.tobytes())``, ``read(header); readinto(bytearray)``.
* ``buffered_1io``: the padded layout (header padded to 4,096 bytes, the block from offset
  4,096, the file a multiple of 4,096) through the page cache, one system call each way:
  one ``writev`` (header + the block's own memory, no staging copy), one ``preadv`` of the
  whole file into a page-aligned buffer.
* ``odirect``: ``O_DIRECT`` for both, the padded layout; writes from a page-aligned
  staging buffer.
* ``mmap``: ``ftruncate`` + ``mmap`` and a copy in; reads map the file and the
  destination copy reads the mapping.
* ``nixl`` / ``nixl_odirect``: NIXL's POSIX backend (``nixl_cu12``, its AIO queue): a
  registered page-aligned staging buffer (DRAM), the file registered as FILE memory
  (``(offset, length, fd)``) per block, one ``initialize_xfer`` WRITE/READ per block; the
  second with an ``O_DIRECT`` file descriptor. Skipped when NIXL or its POSIX plugin is
  missing.
* ``diskkvfiles``: the engine's class as it runs by default (the padded layout through the
  page cache: header then block, two system calls each way, no staging copy).
* ``diskkvfiles_direct``: the same with ``direct=True``: blocks the page cache does not
  hold entirely (``cachestat``) are read with one ``O_DIRECT`` read. Skipped where the
  directory refuses ``O_DIRECT``.
* ``hybrid_nowait`` (not in the default set): ``buffered_1io`` reads probing the cache with
  ``preadv2(RWF_NOWAIT)`` first, O_DIRECT on a miss: on a miss the kernel starts readahead
  before it returns EAGAIN, so the O_DIRECT read races that I/O (why the engine asks
  ``cachestat`` instead).

Every phase runs the methods interleaved block by block, the order rotating, so that a
busy machine's noise falls on all of them alike (each method has its own files).
Phases per block size: write every block (per call: what the engine's step waits for,
since spills are synchronous); read every block "hot" (just written: the page cache holds
it, as it holds a block spilled recently); ``fsync`` every file ("write + fsync": the
sustained write rate); evict the files (``posix_fadvise(DONTNEED)`` per file, or also
``/proc/sys/vm/drop_caches`` with ``--drop-caches``, root only); read every block "cold"
(as after a restart, or from a tier larger than the page cache), then "cold again" (the
page cache holds what the cold reads left there: nothing after an O_DIRECT read). The
page-cache fraction of the files before each read phase is measured (``mincore``) and
printed. Figures: GB/s (10^9 bytes/s of block bytes, over the method's own calls) with the
ratio to ``buffered`` in the same run; per block, wall p50 / p99 and CPU ms (user + sys
of the process: what the I/O takes from the cores the engine shares with it). Every read
is checked against what was written (outside the timing). ``--repeat N`` runs N rounds
and prints medians. The destination copies run on one torch thread.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import mmap
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ALIGN = 4096
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
MAGIC1 = b"PDKVBLK1"
MAGIC_PAD = b"PDKVBENC"  # the padded layout's header, for the bench's own methods
DIGEST = b"0123456789abcdef0123456789abcdef"
HDR = 8 + 32 + 8  # magic, digest, hash


def up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def aligned(n: int) -> memoryview:
    """A page-aligned, zero-filled, writable buffer (anonymous mmap)."""
    return memoryview(mmap.mmap(-1, up(n)))


def aligned_empty(n: int) -> np.ndarray:
    """A page-aligned buffer for one read, from numpy's allocator (malloc reuses freed
    memory; a fresh anonymous map per read pays its page faults on every read)."""
    a = np.empty(up(n) + ALIGN, dtype=np.uint8)
    off = -a.ctypes.data % ALIGN
    return a[off:off + up(n)]


def header(h: int) -> bytes:
    return DIGEST + int(h).to_bytes(8, "little")


# ---- methods: write(path, block_hash, data: torch.Tensor[uint8]); read(path, block_hash) -> tensor ----

class Buffered:
    """The disk tier's format-1 path, as ``DiskKVFiles`` had it."""

    name = "buffered"

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def write(self, path: Path, h: int, data: torch.Tensor) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC1 + header(h))
            f.write(data.contiguous().view(torch.uint8).numpy().tobytes())
        tmp.replace(path)

    def read(self, path: Path, h: int) -> torch.Tensor:
        with open(path, "rb") as f:
            if f.read(48) != MAGIC1 + header(h):
                raise RuntimeError("bad header")
            raw = bytearray(self.nbytes)
            if f.readinto(raw) != self.nbytes:
                raise RuntimeError("short")
        return torch.frombuffer(raw, dtype=torch.uint8)


class ODirect:
    name = "odirect"

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.size = ALIGN + up(nbytes)
        self.wbuf = aligned(self.size)
        self.wnp = np.frombuffer(self.wbuf, dtype=np.uint8)

    def write(self, path: Path, h: int, data: torch.Tensor) -> None:
        tmp = path.with_suffix(".tmp")
        self.wbuf[:HDR] = MAGIC_PAD + header(h)
        self.wnp[ALIGN:ALIGN + self.nbytes] = data.contiguous().view(torch.uint8).numpy()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            if os.write(fd, self.wbuf) != self.size:
                raise RuntimeError("short write")
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def read(self, path: Path, h: int) -> torch.Tensor:
        buf = aligned_empty(self.size)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            n = os.readv(fd, [buf])
        finally:
            os.close(fd)
        if n != self.size or buf[:HDR].tobytes() != MAGIC_PAD + header(h):
            raise RuntimeError("bad block")
        return torch.from_numpy(buf[ALIGN:ALIGN + self.nbytes])


class Buffered1IO:
    """The padded layout (header padded to 4,096, file to a multiple of 4,096) through the
    page cache: one ``writev`` straight from the block's memory (no staging copy), one
    ``preadv`` into a page-aligned buffer."""

    name = "buffered_1io"

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.size = ALIGN + up(nbytes)
        self.pad = bytes(up(nbytes) - nbytes)

    def write(self, path: Path, h: int, data: torch.Tensor) -> None:
        tmp = path.with_suffix(".tmp")
        head = (MAGIC_PAD + header(h)).ljust(ALIGN, b"\0")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            bufs = [head, data.contiguous().view(torch.uint8).reshape(-1).numpy()] + ([self.pad] if self.pad else [])
            if os.writev(fd, bufs) != self.size:
                raise RuntimeError("short write")
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _read_into(self, fd: int, buf: np.ndarray) -> int:
        return os.preadv(fd, [buf], 0)

    def read(self, path: Path, h: int) -> torch.Tensor:
        buf = aligned_empty(self.size)
        fd = os.open(path, os.O_RDONLY)
        try:
            n = self._read_into(fd, buf)
        finally:
            os.close(fd)
        if n != self.size or buf[:HDR].tobytes() != MAGIC_PAD + header(h):
            raise RuntimeError("bad block")
        return torch.from_numpy(buf[ALIGN:ALIGN + self.nbytes])


class HybridNowait(Buffered1IO):
    """``diskkvfiles``' read path with the page cache probed by ``preadv2(RWF_NOWAIT)``
    instead of ``cachestat``: on a miss the kernel starts readahead before it returns
    EAGAIN, so the O_DIRECT read that follows races that I/O (why the engine does not)."""

    name = "hybrid_nowait"

    def _read_into(self, fd: int, buf: np.ndarray) -> int:
        try:
            n = os.preadv(fd, [buf], 0, os.RWF_NOWAIT)
            if n == self.size:
                return n
        except BlockingIOError:
            pass
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        return os.preadv(fd, [buf], 0)


class MMap:
    name = "mmap"

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.size = ALIGN + up(nbytes)

    def write(self, path: Path, h: int, data: torch.Tensor) -> None:
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, self.size)
            mm = mmap.mmap(fd, self.size)
            try:
                mm[:HDR] = MAGIC_PAD + header(h)
                view = np.frombuffer(mm, dtype=np.uint8)
                view[ALIGN:ALIGN + self.nbytes] = data.contiguous().view(torch.uint8).numpy()
                del view  # the map cannot close while an array exports it
            finally:
                mm.close()
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def read(self, path: Path, h: int) -> torch.Tensor:
        fd = os.open(path, os.O_RDONLY)
        try:
            mm = mmap.mmap(fd, self.size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        mm.madvise(mmap.MADV_SEQUENTIAL)
        if mm[:HDR] != MAGIC_PAD + header(h):
            raise RuntimeError("bad header")
        # zero-copy: the caller's copy into the destination faults the pages in
        return torch.from_numpy(np.frombuffer(mm, dtype=np.uint8, count=self.nbytes, offset=ALIGN))


class Nixl:
    name = "nixl"
    direct = False

    def __init__(self, nbytes: int) -> None:
        from pdserve.kvtransfer.nixl_backend import import_nixl

        api = import_nixl()
        self.nbytes = nbytes
        self.size = ALIGN + up(nbytes)
        self.agent_name = f"bench-disk-{os.getpid()}-{self.name}-{nbytes}"
        self.agent = api.nixl_agent(self.agent_name, api.nixl_agent_config(
            enable_prog_thread=False, enable_listen_thread=False, backends=[]))
        if "POSIX" not in self.agent.get_plugin_list():
            raise RuntimeError(f"no POSIX plugin; plugins: {self.agent.get_plugin_list()}")
        self.agent.create_backend("POSIX", {})
        self.buf = aligned(self.size)
        self.np = np.frombuffer(self.buf, dtype=np.uint8)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        self.dram = self.agent.register_memory([(self.addr, self.size, 0, "")], "DRAM", backends=["POSIX"])
        self.local = self.agent.get_xfer_descs([(self.addr, self.size, 0)], "DRAM")

    def _xfer(self, op: str, fd: int) -> None:
        reg = self.agent.register_memory([(0, self.size, fd, "")], "FILE", backends=["POSIX"])
        try:
            remote = self.agent.get_xfer_descs([(0, self.size, fd)], "FILE")
            x = self.agent.initialize_xfer(op, self.local, remote, self.agent_name, backends=["POSIX"])
            state = self.agent.transfer(x)
            while state == "PROC":
                state = self.agent.check_xfer_state(x)
            self.agent.release_xfer_handle(x)
            if state != "DONE":
                raise RuntimeError(f"NIXL {op}: {state}")
        finally:
            self.agent.deregister_memory(reg, backends=["POSIX"])

    def _open(self, path: Path, flags: int) -> int:
        return os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o644)

    def write(self, path: Path, h: int, data: torch.Tensor) -> None:
        tmp = path.with_suffix(".tmp")
        self.buf[:HDR] = MAGIC_PAD + header(h)
        self.np[ALIGN:ALIGN + self.nbytes] = data.contiguous().view(torch.uint8).numpy()
        fd = self._open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            os.ftruncate(fd, self.size)
            self._xfer("WRITE", fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def read(self, path: Path, h: int) -> torch.Tensor:
        fd = self._open(path, os.O_RDONLY)
        try:
            self._xfer("READ", fd)
        finally:
            os.close(fd)
        if bytes(self.buf[:HDR]) != MAGIC_PAD + header(h):
            raise RuntimeError("bad header")
        return torch.from_numpy(self.np[ALIGN:ALIGN + self.nbytes].copy())  # the staging buffer is reused

    def close(self) -> None:
        self.agent.deregister_memory(self.dram, backends=["POSIX"])


class NixlODirect(Nixl):
    name = "nixl_odirect"
    direct = True


class Engine:
    """``DiskKVFiles`` itself, as the engine runs it (its own file names and checks)."""

    name = "diskkvfiles"
    direct = False

    def __init__(self, nbytes: int, root: Path) -> None:
        from pdserve.engine.kv_tiers import DiskKVFiles

        self.files = DiskKVFiles(root, 0, DIGEST.decode(), (nbytes,), torch.uint8, direct=self.direct)
        if self.direct and not self.files.direct:
            raise RuntimeError(f"{root} refuses O_DIRECT")
        self.nbytes = nbytes
        self.slot: dict[Path, int] = {}

    def write(self, path: Path, h: int, data: torch.Tensor) -> None:
        self.files.write(self.slot[path], h, data)

    def read(self, path: Path, h: int) -> torch.Tensor:
        return self.files.read(self.slot[path], h)  # uint8 blocks of shape (nbytes,)

    def path(self, i: int) -> Path:
        p = self.files.path(i)
        self.slot[p] = i
        return p


class EngineDirect(Engine):
    """``DiskKVFiles(direct=True)``: O_DIRECT for the blocks the page cache does not hold."""

    name = "diskkvfiles_direct"
    direct = True


DEFAULT_METHODS = ("buffered", "buffered_1io", "odirect", "mmap", "nixl", "nixl_odirect", "diskkvfiles",
                   "diskkvfiles_direct")
METHODS = {"buffered": Buffered, "buffered_1io": Buffered1IO, "odirect": ODirect, "hybrid_nowait": HybridNowait, "mmap": MMap, "nixl": Nixl,
           "nixl_odirect": NixlODirect, "diskkvfiles": Engine, "diskkvfiles_direct": EngineDirect}


# ---- page cache ---------------------------------------------------------------------------------



def resident_fraction(paths: list[Path]) -> float:
    """Of the files' pages, the fraction in the page cache (mincore on a private map)."""
    page = os.sysconf("SC_PAGE_SIZE")
    have = total = 0
    for p in paths:
        size = p.stat().st_size
        if not size:
            continue
        with open(p, "rb") as f, mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE,
                                           prot=mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            n = -(-size // page)
            vec = ctypes.create_string_buffer(n)
            addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            if _libc.mincore(addr, size, vec) != 0:
                return float("nan")
            have += sum(b & 1 for b in vec.raw)
            total += n
    return have / max(total, 1)


def evict(paths: list[Path], drop_caches: bool) -> None:
    """Drop the (clean: fsynced) files from the page cache."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if drop_caches:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")


# ---- measuring -----------------------------------------------------------------------------------

PHASES = ("write", "hot", "cold", "again")  # (and "fsync", folded into write_sync)


def make(name: str, nbytes: int, root: Path):
    """(method, its block paths' directory) for ``name``: NIXL's fail here when absent."""
    d = root / f"{name}-{nbytes}"
    d.mkdir()
    cls = METHODS[name]
    return (cls(nbytes, d) if issubclass(cls, Engine) else cls(nbytes)), d


def run_size(methods: list[str], nbytes: int, nblocks: int, root: Path, drop_caches: bool,
             skipped: dict[str, str]) -> dict[str, dict]:
    """Every phase with the methods interleaved block by block (the order rotating), so a
    busy machine's noise falls on all of them alike. Per method and phase ``(GB/s over its
    own calls, p50 ms, p99 ms, CPU ms per block)``; ``write_sync``: GB/s of writes + fsyncs;
    ``resident``: the page-cache fraction of its files before each read phase."""
    ms, paths = {}, {}
    for name in methods:
        if name in skipped:
            continue
        try:
            ms[name], d = make(name, nbytes, root)
        except (ImportError, RuntimeError, OSError) as e:
            skipped[name] = str(e)
            continue
        paths[name] = [ms[name].path(i) if isinstance(ms[name], Engine) else d / f"{i:08d}.kv" for i in range(nblocks)]
    names = list(ms)
    g = torch.Generator().manual_seed(nbytes)
    srcs = [torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g) for _ in range(8)]
    dest = torch.empty(nbytes, dtype=torch.uint8)
    out: dict[str, dict] = {n: {"resident": {}} for n in names}

    def phase(key: str, op, check=None) -> dict[str, float]:
        lat = {n: [] for n in names}
        cpu = dict.fromkeys(names, 0.0)
        for i in range(nblocks):
            for j in range(len(names)):
                n = names[(i + j) % len(names)]
                t, c = time.perf_counter(), time.process_time()
                op(n, i)
                lat[n].append(time.perf_counter() - t)
                cpu[n] += time.process_time() - c
                if check is not None:
                    check(n, i)  # not timed
        for n in names:
            x = np.array(lat[n])
            out[n][key] = (nblocks * nbytes / x.sum() / 1e9, np.percentile(x, 50) * 1e3, np.percentile(x, 99) * 1e3,
                           cpu[n] / nblocks * 1e3)
        return {n: float(np.sum(lat[n])) for n in names}

    def read(n: str, i: int) -> None:
        dest.copy_(ms[n].read(paths[n][i], 0xABC0 + i))

    def check(n: str, i: int) -> None:
        if not torch.equal(dest, srcs[i % len(srcs)]):
            raise RuntimeError(f"{n}: block {i} read back differs")

    def fsync(n: str, i: int) -> None:
        fd = os.open(paths[n][i], os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def resident(key: str) -> None:
        for n in names:
            out[n]["resident"][key] = resident_fraction(paths[n])

    try:
        writes = phase("write", lambda n, i: ms[n].write(paths[n][i], 0xABC0 + i, srcs[i % len(srcs)]))
        resident("hot")
        phase("hot", read, check)
        syncs = phase("fsync", fsync)
        for n in names:
            out[n]["write_sync"] = nblocks * nbytes / (writes[n] + syncs[n]) / 1e9
        evict([p for n in names for p in paths[n]], drop_caches)
        resident("cold")
        phase("cold", read, check)
        resident("again")
        phase("again", read, check)
    finally:
        for n in names:
            if hasattr(ms[n], "close"):
                ms[n].close()
        for name in methods:
            shutil.rmtree(root / f"{name}-{nbytes}", ignore_errors=True)
    return out


def fs_type(d: Path) -> str:
    try:
        return subprocess.run(["df", "-T", str(d)], capture_output=True, text=True, check=True).stdout.splitlines()[1].split()[1]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "?"


def median_result(runs: list[dict]) -> dict:
    """Per figure, the median over the rounds."""
    out = {"write_sync": float(np.median([r["write_sync"] for r in runs])),
           "resident": {k: float(np.median([r["resident"][k] for r in runs])) for k in runs[0]["resident"]}}
    for key in PHASES:
        out[key] = tuple(float(np.median([r[key][i] for r in runs])) for i in range(4))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory in /var/tmp)")
    ap.add_argument("--sizes", default=f"{2 << 20},{256 << 10}", help="block sizes in bytes")
    ap.add_argument("--blocks", default="128,384", help="blocks per size (one value: every size)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"of {', '.join(METHODS)}")
    ap.add_argument("--repeat", type=int, default=1, help="rounds (methods interleaved); medians are printed")
    ap.add_argument("--drop-caches", action="store_true", help="also echo 1 > /proc/sys/vm/drop_caches (root)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the destination copies: one thread (OpenMP on 2 busy vCPUs only adds noise)
    sizes = [int(s) for s in args.sizes.split(",")]
    blocks = [int(b) for b in args.blocks.split(",")]
    blocks = blocks * len(sizes) if len(blocks) == 1 else blocks
    methods = args.methods.split(",")
    base = Path(args.dir) if args.dir else Path("/var/tmp")
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-disk-tier-", dir=base))
    print(f"dir {root} ({fs_type(root)}), uid {os.getuid()}, {os.cpu_count()} CPUs, eviction before cold reads: "
          f"fsync + fadvise(DONTNEED) per file" + (" + drop_caches" if args.drop_caches else ""))
    runs: dict[tuple[int, str], list[dict]] = {}
    skipped: dict[str, str] = {}
    t0 = time.perf_counter()
    try:
        for _ in range(args.repeat):
            for nbytes, nblocks in zip(sizes, blocks):
                for name, r in run_size(methods, nbytes, nblocks, root, args.drop_caches, skipped).items():
                    runs.setdefault((nbytes, name), []).append(r)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for name, why in skipped.items():
        print(f"  {name}: skipped: {why}")
    print(f"{time.perf_counter() - t0:.1f} s; {args.repeat} round(s), medians; methods interleaved block by block; "
          "ratios against buffered in this run")

    results = {(nbytes, nblocks): {name: median_result(runs[nbytes, name]) for name in methods if (nbytes, name) in runs}
               for nbytes, nblocks in zip(sizes, blocks)}
    print()
    print("Throughput, GB/s (10^9 B/s of block bytes), and against `buffered` in this run:")
    print()
    print("| block | method | write | write + fsync | hot read | cold read | cold again |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (nbytes, nblocks), res in results.items():
        b = res.get("buffered")
        for name, r in res.items():
            cells = []
            for key in ("write", "write_sync", "hot", "cold", "again"):
                x = r[key] if key == "write_sync" else r[key][0]
                y = None if b is None else (b[key] if key == "write_sync" else b[key][0])
                cells.append(f"{x:.2f} ({x / y:.2f}x)" if y else f"{x:.2f}")
            print(f"| {nbytes >> 10} KiB x {nblocks} | {name} | " + " | ".join(cells) + " |")
    print()
    print("Per block, ms: wall p50 / p99 / CPU (user + sys of the process; what the I/O costs the")
    print("cores the engine shares with it); the page-cache fraction of the files before each read phase:")
    print()
    print("| block | method | write | hot read | cold read | cold again | cached: hot / cold / again |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (nbytes, nblocks), res in results.items():
        for name, r in res.items():
            lat = " | ".join(f"{r[k][1]:.2f} / {r[k][2]:.2f} / {r[k][3]:.2f}" for k in PHASES)
            cached = " / ".join(f"{r['resident'][k]:.0%}" for k in ("hot", "cold", "again"))
            print(f"| {nbytes >> 10} KiB x {nblocks} | {name} | {lat} | {cached} |")


if __name__ == "__main__":
    main()
