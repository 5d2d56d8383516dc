"""KV transfer bandwidth between two processes, per backend, against a memory copy.

    python benchmarks/bench_kvtransfer.py [--backends nixl,torch_dist] [--sizes 1,8,64]

One request's KV (1, 8 and 64 MiB by default) moves from a prefill rank's region
to a decode rank's region, TP 1 -> 1, each rank in its own spawned process, in two
block placements: ``contiguous`` (consecutive block ids on both sides: one
descriptor per layer) and ``scattered`` (random block ids: one descriptor per
(layer, block)). Each transfer is timed on the writer from ``write`` to DONE
(the bytes are in the peer's region). References measured in the same run: a
plain torch copy of the same number of bytes in one process, and the same
descriptors copied one by one within one process. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import numpy as np

from pdserve.kvtransfer import KVRegionLayout, available_backends, plan_transfer
from pdserve.kvtransfer.harness import AgentProcess

MiB = 1 << 20
# a small Llama-like model: 16 layers, 8 KV heads of 64, 16-token blocks, bf16:
# one block = 32 KiB per layer, 512 KiB across layers
GEO = dict(num_layers=16, num_kv_heads=8, block_size=16, head_dim=64, dtype="bfloat16")


def iters_for(nbytes: int) -> int:
    return max(5, min(50, (256 * MiB) // max(nbytes, 1)))


def cma_ceiling_gb_s(nbytes: int, iters: int = 10) -> float | None:
    """GB/s of the kernel's cross-process copy (process_vm_writev, what UCX's CMA transport
    uses) from this process into a forked child: the ceiling for any CMA transport."""
    import ctypes
    import os

    class Iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        writev = libc.process_vm_writev
    except (OSError, AttributeError):
        return None
    writev.restype = ctypes.c_ssize_t
    r, w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child only owns a destination buffer
        dst = np.zeros(nbytes, dtype=np.uint8)
        os.write(w, dst.ctypes.data.to_bytes(8, "little"))
        os.read(done_r, 1)
        os._exit(0)
    addr = int.from_bytes(os.read(r, 8), "little")
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    times = []
    try:
        for _ in range(iters):
            local, remote = Iovec(src.ctypes.data, nbytes), Iovec(addr, nbytes)
            t0 = time.perf_counter()
            if writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) != nbytes:
                return None
            times.append(time.perf_counter() - t0)
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
    return nbytes / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default=",".join(available_backends()))
    ap.add_argument("--sizes", default="1,8,64", help="MiB of KV per request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()

    sizes = [float(s) for s in args.sizes.split(",")]
    probe = KVRegionLayout.for_rank(num_blocks=1, **GEO)
    block_all_layers = probe.num_layers * probe.block_bytes
    max_blocks = max(1, int(max(sizes) * MiB // block_all_layers))
    lay = KVRegionLayout.for_rank(num_blocks=2 * max_blocks + 8, **GEO)
    rng = random.Random(args.seed)

    a, b = AgentProcess(), AgentProcess()
    rows = []
    try:
        backends = [x for x in args.backends.split(",") if x]
        print(f"model: {GEO}, region {lay.region_bytes / MiB:.0f} MiB per rank, "
              f"{block_all_layers // 1024} KiB per block (all layers)")
        for backend in backends:
            src_md = a.call("create", backend, f"src-{backend}", lay.to_dict(), 1, {})
            dst_md = b.call("create", backend, f"dst-{backend}", lay.to_dict(), 2, {})
            a.call("add_peer", f"src-{backend}", f"dst-{backend}", dst_md)
            b.call("add_peer", f"dst-{backend}", f"src-{backend}", src_md)
            for size in sizes:
                nblocks = max(1, int(size * MiB // block_all_layers))
                for placement in ("contiguous", "scattered"):
                    if placement == "contiguous":
                        sb, db = list(range(nblocks)), list(range(max_blocks, max_blocks + nblocks))
                    else:
                        sb = rng.sample(range(lay.num_blocks), nblocks)
                        db = rng.sample(range(lay.num_blocks), nblocks)
                        while any(y == x + 1 for x, y in zip(sb, sb[1:])):  # keep them apart
                            sb = rng.sample(range(lay.num_blocks), nblocks)
                    [plan] = plan_transfer([lay], [lay], sb, db)
                    n = iters_for(plan.num_bytes)
                    # every write needs the receiver's expectation first (kvtransfer.base, invariant 6)
                    tids = [f"{backend}-{size}-{placement}-{i}" for i in range(n + 2)]
                    b.call("expect_many", f"dst-{backend}", f"src-{backend}", plan.descs, tids, 600.0)
                    a.call("bench_write", f"src-{backend}", f"dst-{backend}", plan.descs, 2, 5e-5, tids[:2])  # warm up
                    times = a.call("bench_write", f"src-{backend}", f"dst-{backend}", plan.descs, n, 5e-5, tids[2:],
                                   timeout_s=600)
                    b.call("notifications", f"dst-{backend}")  # drop what accumulated
                    copy = a.call("memcpy", plan.num_bytes, n)
                    copy1 = a.call("memcpy1", plan.num_bytes, n)
                    local = a.call("descs_memcpy", f"src-{backend}", plan.descs, n)
                    med = statistics.median(times)
                    rows.append({
                        "backend": backend, "size_mib": plan.num_bytes / MiB, "placement": placement,
                        "descriptors": plan.num_descriptors, "iters": n, "median_ms": 1e3 * med,
                        "p90_ms": 1e3 * sorted(times)[int(0.9 * (len(times) - 1))],
                        "gb_s": plan.num_bytes / med / 1e9,
                        "memcpy_gb_s": plan.num_bytes / statistics.median(copy1) / 1e9,
                        "torch_copy_gb_s": plan.num_bytes / statistics.median(copy) / 1e9,
                        "desc_copy_gb_s": plan.num_bytes / statistics.median(local) / 1e9,
                    })
                    r = rows[-1]
                    print(f"  {backend:<11}{r['size_mib']:>6.0f} MiB {placement:<11}"
                          f"{r['descriptors']:>6} descs {r['median_ms']:>9.2f} ms {r['gb_s']:>6.2f} GB/s",
                          flush=True)
            a.call("close", f"src-{backend}")
            b.call("close", f"dst-{backend}")
    finally:
        a.shutdown()
        b.shutdown()

    print()
    hdr = (f"{'backend':<12}{'MiB':>5} {'placement':<11}{'descs':>6}{'median ms':>11}{'p90 ms':>9}"
           f"{'GB/s':>8}{'memcpy GB/s':>13}{'torch copy GB/s':>17}{'desc-copy GB/s':>16}{'vs memcpy':>11}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['backend']:<12}{r['size_mib']:>5.0f} {r['placement']:<11}{r['descriptors']:>6}"
              f"{r['median_ms']:>11.2f}{r['p90_ms']:>9.2f}{r['gb_s']:>8.2f}{r['memcpy_gb_s']:>13.2f}"
              f"{r['torch_copy_gb_s']:>17.2f}"
              f"{r['desc_copy_gb_s']:>16.2f}{r['gb_s'] / r['memcpy_gb_s']:>10.0%}")
    print("GB/s = KV bytes moved / median time from write() to DONE on the writer (10^9 bytes/s);"
          " memcpy = memcpy(3) of the same bytes on one thread (numpy.copyto), the baseline of"
          " 'vs memcpy'; torch copy = torch's copy_, which splits over all intra-op threads;"
          " desc-copy = the same descriptors copied one by one inside one process.")
    largest = max(r["size_mib"] for r in rows) if rows else 64
    ceiling = cma_ceiling_gb_s(int(largest * MiB))
    if ceiling is not None:
        copy = statistics.median(r["memcpy_gb_s"] for r in rows) if rows else float("nan")
        print(f"kernel cross-process copy (process_vm_writev, {largest:.0f} MiB): {ceiling:.2f} GB/s "
              f"= {ceiling / copy:.0%} of memcpy: the ceiling for UCX's CMA transport")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"geometry": GEO, "rows": rows, "time": time.time()}, f, indent=1)


if __name__ == "__main__":
    main()
