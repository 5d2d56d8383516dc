"""pdserve.kvtransfer: moving KV blocks from prefill ranks to decode ranks.

Scheduler side (pure, no torch needed): ``KVRegionLayout``, ``plan_transfer``,
``RankPairPlan``; ``lease`` (the decode side's transfer leases and hop-outcome rules).
Worker side: ``KVTransferAgent`` (see ``base`` for its invariants; ``handles`` for the
types it returns, ``frames`` for what agents tell each other) with two backends,
``"nixl"`` (NIXL/UCX one-sided WRITE after a claim; needs the ``nixl-cu12`` wheel) and
``"torch_dist"`` (gloo send/recv over per-pair process groups; needs only torch).
Backends are imported lazily by ``create_agent``; ``worker`` binds agents to an engine.
``kvpool`` (imported on its own): the cluster-shared KV pool client on Mooncake Store.
"""

from __future__ import annotations

from typing import Any

from .base import (KVTransferAgent, Notification, Refusal, TransferError, TransferHandle,
                   TransferMetrics, TransferRecord, TransferState, TransferStatus)
from .layout import (DTYPE_SIZES, KVRegionLayout, RankPairPlan, choose_sources, kv_head_shard,
                     merge_descriptors, plan_transfer)

BACKENDS = ("nixl", "torch_dist")

__all__ = [
    "BACKENDS", "DTYPE_SIZES", "KVRegionLayout", "KVTransferAgent", "Notification", "Refusal",
    "RankPairPlan", "TransferError", "TransferHandle", "TransferMetrics", "TransferRecord",
    "TransferState", "TransferStatus", "available_backends", "choose_sources", "create_agent",
    "kv_head_shard", "merge_descriptors", "plan_transfer",
]


def _backend_class(backend: str) -> type:
    if backend == "nixl":
        from .nixl_backend import NixlAgent
        return NixlAgent
    if backend == "torch_dist":
        from .torch_dist_backend import TorchDistAgent
        return TorchDistAgent
    raise ValueError(f"unknown KV transfer backend {backend!r}; choose from {BACKENDS}")


def create_agent(backend: str, name: str, region: Any, layout: KVRegionLayout, **kwargs: Any) -> Any:
    """A ``KVTransferAgent`` of the given backend for this rank's region."""
    return _backend_class(backend)(name, region, layout, **kwargs)


def available_backends() -> list[str]:
    """Backends whose dependencies import here."""
    out = []
    try:
        from .nixl_backend import nixl_available
        if nixl_available():
            out.append("nixl")
    except ImportError:
        pass
    try:
        import torch.distributed as dist
        if dist.is_available():
            out.append("torch_dist")
    except ImportError:
        pass
    return out

