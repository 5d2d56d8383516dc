"""What agents tell each other about a transfer (plain bytes, never pickle), and the
digest that names the destination bytes a transfer covers.

Every frame names its transfer id, its byte count and the *coverage digest* of its
destination: a 64-bit BLAKE2b of the destination byte ranges, sorted and merged
where adjacent. Two plans that write the same destination bytes have the same
digest however they split them into descriptors (a receiver plans its expectation
with placeholder source blocks, so its descriptors merge differently from the
writer's), and plans that differ in any destination byte differ in digest.

Kinds (``FrameKind``):

* ``CLAIM``  writer -> receiver: "may I write this transfer?" (NIXL, before posting);
* ``GRANT``  receiver -> writer: yes: a live expectation with that peer, id, byte
  count and coverage exists and was not granted before;
* ``REFUSE`` receiver -> writer: no, with the reason in ``message``;
* ``DONE``   writer -> receiver, after the data: the completion notification,
  carrying the caller's ``notify`` bytes in ``message``.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from typing import NamedTuple

import numpy as np

_MAGIC = b"PDKVF1"
_HEAD = struct.Struct("<cHQQ")  # kind, transfer id length, bytes, coverage digest


class FrameKind(bytes, enum.Enum):
    CLAIM = b"C"
    GRANT = b"G"
    REFUSE = b"R"
    DONE = b"D"


class Frame(NamedTuple):
    kind: FrameKind
    transfer_id: str
    num_bytes: int
    digest: int
    message: bytes = b""


def pack_frame(frame: Frame) -> bytes:
    tid = frame.transfer_id.encode()
    return (_MAGIC + _HEAD.pack(frame.kind.value, len(tid), frame.num_bytes, frame.digest) + tid
            + bytes(frame.message))


def unpack_frame(data: bytes) -> Frame | None:
    """The frame, or None for bytes that are not one of ours (e.g. a plain notification)."""
    data = bytes(data)
    start = len(_MAGIC) + _HEAD.size
    if not data.startswith(_MAGIC) or len(data) < start:
        return None
    kind, n, nbytes, digest = _HEAD.unpack_from(data, len(_MAGIC))
    try:
        kind = FrameKind(kind)
        tid = data[start:start + n].decode()
    except ValueError:
        return None
    return Frame(kind, tid, nbytes, digest, data[start + n:])


def coverage_digest(descs: np.ndarray) -> int:
    """Digest of the destination byte ranges of ``[n, 3]`` (src, dst, bytes) descriptors."""
    descs = np.asarray(descs, dtype=np.int64).reshape(-1, 3)
    if len(descs) == 0:
        runs = np.zeros((0, 2), dtype="<i8")
    else:
        d = descs[np.argsort(descs[:, 1], kind="stable")]
        starts, ends = d[:, 1], d[:, 1] + d[:, 2]
        new_run = np.ones(len(d), dtype=bool)
        new_run[1:] = starts[1:] != ends[:-1]
        first = np.flatnonzero(new_run)
        runs = np.stack([starts[first], np.maximum.reduceat(ends, first)], axis=1).astype("<i8")
    return int.from_bytes(hashlib.blake2b(runs.tobytes(), digest_size=8).digest(), "little")
