"""The tensor-parallel group as the model sees it: a rank, a size, two collectives.

Model code calls ``tp.all_reduce``/``tp.all_gather`` and never torch.distributed
directly; with ``size == 1`` both are no-ops, so single-device runs need no process
group at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_reduce_min(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise minimum over the ranks (in place)."""
        if self.size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MIN)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dimension."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` (the same shape everywhere) along the first dimension."""
        if self.size == 1:
            return x
        out = x.new_empty((self.size * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(out, x.contiguous())
        return out

    def all_to_all(self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Rows ``x[sum(send_counts[:r]) : ...]`` go to rank r; returns the rows every rank
        sent here, in rank order (``recv_counts[r]`` from rank r)."""
        if self.size == 1:
            return x
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts)
        return out

    def shard(self, total: int) -> tuple[int, int]:
        """(start, size) of this rank's even share of ``total`` items."""
        if total % self.size:
            raise ValueError(f"{total} is not divisible by tensor_parallel_size={self.size}")
        n = total // self.size
        return self.rank * n, n

    def kv_head_shard(self, num_kv_heads: int) -> tuple[int, int]:
        """(first KV head, KV heads on this rank); heads are replicated when tp > num_kv_heads."""
        if self.size <= num_kv_heads:
            return self.shard(num_kv_heads)
        return self.rank * num_kv_heads // self.size, 1


SINGLE = TPGroup()
