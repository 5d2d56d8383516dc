"""Which node each worker's placement group should land on: spread every pool.

A worker is one tensor-parallel group in one ``STRICT_PACK`` placement group, so its
ranks always share a node. Which node is Ray's choice, and Ray tends to fill a node
before the next: two decode workers could then share a node, and that node's failure
would take the whole pool down. So before creating a group the launcher asks a
:class:`SpreadPlanner` for a *soft* target node (``placement_group(...,
_soft_target_node_id=...)``): among the live nodes whose free resources fit the whole
group, the one hosting the fewest workers of the same pool, then the fewest workers
of any pool, then the one with the most free units of what the group needs (node id
breaks the last tie, so a plan is deterministic). The hint is soft: if that node fills
up meanwhile, Ray places the group elsewhere; if no node fits right now the planner
names none and Ray waits for resources (or for an autoscaler to add a node).

The planner keeps its own ledger of what it already handed out, because Ray's
per-node availability lags the groups created a moment ago.

The planning is pure (:class:`NodeView` snapshots in, node ids out); only
:func:`live_nodes` talks to Ray.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping

from .cluster import PoolSpec


@dataclass(frozen=True)
class NodeView:
    """One live Ray node: its id, the IP workers on it bind to, and its resources."""

    node_id: str
    address: str
    total: Mapping[str, float] = field(hash=False)
    available: Mapping[str, float] = field(hash=False)

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError(f"node_id must be a non-empty hex id, got {self.node_id!r}")
        object.__setattr__(self, "total", MappingProxyType(dict(self.total)))
        object.__setattr__(self, "available", MappingProxyType(dict(self.available)))


def group_resources(pool: PoolSpec) -> dict[str, float]:
    """What one worker of ``pool`` reserves on its node: ``tp_size`` x the per-rank resources."""
    return {k: v * pool.tp_size for k, v in pool.resources.items()}


def fits(need: Mapping[str, float], free: Mapping[str, float]) -> bool:
    # A tiny epsilon: Ray keeps fractional resources in fixed point, sums drift.
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


class SpreadPlanner:
    """Soft target nodes for a batch of workers, given the workers already placed.

    ``placed`` is ``(pool name, node id)`` per running worker. :meth:`choose` books the
    node it returns, so a batch is planned as if the earlier groups were already there.
    """

    def __init__(self, nodes: Iterable[NodeView], placed: Iterable[tuple[str, str]] = ()) -> None:
        self.nodes = sorted(nodes, key=lambda n: n.node_id)
        self._free = {n.node_id: dict(n.available) for n in self.nodes}
        self._pool_counts: Counter[tuple[str, str]] = Counter()
        self._node_counts: Counter[str] = Counter()
        for pool_name, node_id in placed:
            self._book(pool_name, node_id, None)

    def choose(self, pool: PoolSpec) -> str | None:
        """The node to aim ``pool``'s next worker at, or None when no node fits it now."""
        need = group_resources(pool)
        candidates = [n for n in self.nodes if fits(need, self._free[n.node_id])]
        if not candidates:
            return None
        best = min(candidates, key=lambda n: (
            self._pool_counts[(pool.name, n.node_id)],
            self._node_counts[n.node_id],
            -sum(self._free[n.node_id].get(k, 0.0) for k in need),
            n.node_id,
        ))
        self._book(pool.name, best.node_id, need)
        return best.node_id

    def can_ever_fit(self, pool: PoolSpec) -> bool:
        """Whether some live node's *total* resources hold one whole worker of ``pool``."""
        need = group_resources(pool)
        return any(fits(need, n.total) for n in self.nodes)

    def _book(self, pool_name: str, node_id: str, need: Mapping[str, float] | None) -> None:
        self._pool_counts[(pool_name, node_id)] += 1
        self._node_counts[node_id] += 1
        if need is not None and node_id in self._free:
            free = self._free[node_id]
            for k, v in need.items():
                free[k] = free.get(k, 0.0) - v


def live_nodes() -> list[NodeView]:
    """The live nodes of the connected Ray cluster with their total and free resources."""
    import ray  # noqa: PLC0415 - the pure planner above needs no Ray
    from ray._private import state as ray_state  # noqa: PLC0415 - per-node availability is a developer API

    available = ray_state.available_resources_per_node()
    return [
        NodeView(node_id=n["NodeID"], address=n["NodeManagerAddress"], total=plain_resources(n["Resources"]),
                 available=plain_resources(available.get(n["NodeID"], {})))
        for n in ray.nodes() if n.get("Alive")
    ]


def plain_resources(resources: Mapping[str, float]) -> dict[str, float]:
    """Resources without Ray's per-placement-group and per-node bookkeeping entries."""
    return {k: v for k, v in sorted(resources.items()) if "_group_" not in k and not k.startswith("node:")}
