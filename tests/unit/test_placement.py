"""The spread planner: which node each worker's placement group is aimed at (no Ray)."""

from __future__ import annotations

import pytest

from pdserve.deploy.cluster import PoolSpec
from pdserve.deploy.placement import NodeView, SpreadPlanner, fits, group_resources, plain_resources


def node(node_id: str, **free: float) -> NodeView:
    return NodeView(node_id=node_id, address=f"10.0.0.{ord(node_id[-1]) % 250}", total=dict(free), available=free)


def test_group_resources_is_tp_times_per_rank():
    assert group_resources(PoolSpec("prefill", tp_size=4, resources={"GPU": 1, "CPU": 2})) == {"GPU": 4, "CPU": 8}


def test_fits_treats_missing_resources_as_zero():
    assert fits({"GPU": 2}, {"GPU": 2.0, "CPU": 1})
    assert not fits({"GPU": 2}, {"CPU": 8})
    assert fits({"CPU": 0.3}, {"CPU": 0.1 + 0.2})  # fixed-point drift of fractional resources


def test_pool_spreads_before_doubling_up():
    planner = SpreadPlanner([node("n1", GPU=8), node("n2", GPU=8), node("n3", GPU=8)])
    decode = PoolSpec("decode", count=4, resources={"GPU": 1})
    chosen = [planner.choose(decode) for _ in range(4)]
    assert sorted(chosen[:3]) == ["n1", "n2", "n3"]  # one per node first
    assert chosen[3] in ("n1", "n2", "n3")


def test_tp_group_only_goes_where_it_fits_whole():
    planner = SpreadPlanner([node("n1", GPU=2), node("n2", GPU=4)])
    prefill = PoolSpec("prefill", tp_size=4, resources={"GPU": 1})
    assert planner.choose(prefill) == "n2"
    assert planner.choose(prefill) is None  # n2 is booked; n1 can never hold 4 ranks
    assert planner.can_ever_fit(prefill)
    assert not planner.can_ever_fit(PoolSpec("prefill", tp_size=8, resources={"GPU": 1}))


def test_fewest_workers_overall_breaks_a_pool_tie():
    # n1 already runs a prefill worker: a new decode pool starts on n2.
    planner = SpreadPlanner([node("n1", GPU=4), node("n2", GPU=4)], placed=[("prefill", "n1")])
    assert planner.choose(PoolSpec("decode", resources={"GPU": 1})) == "n2"


def test_workers_already_running_count_for_their_pool():
    planner = SpreadPlanner([node("n1", CPU=4), node("n2", CPU=1)],
                            placed=[("decode", "n1"), ("decode", "n1")])
    assert planner.choose(PoolSpec("decode", resources={"CPU": 1})) == "n2"
    # n2 is now full for this batch; the next one doubles up on n1 rather than failing.
    assert planner.choose(PoolSpec("decode", resources={"CPU": 1})) == "n1"


def test_most_free_then_node_id_make_the_plan_deterministic():
    planner = SpreadPlanner([node("n2", CPU=2), node("n1", CPU=2), node("n3", CPU=3)])
    pool = PoolSpec("decode", resources={"CPU": 1})
    assert planner.choose(pool) == "n3"  # most free CPUs
    planner = SpreadPlanner([node("n2", CPU=2), node("n1", CPU=2)])
    assert planner.choose(pool) == "n1"  # equal: lowest node id


def test_plain_resources_drops_ray_bookkeeping():
    got = plain_resources({"CPU": 2, "node:10.0.0.1": 1, "CPU_group_0_abc": 1, "bundle_group_abc": 1000, "GPU": 1})
    assert got == {"CPU": 2, "GPU": 1}


def test_node_view_needs_an_id():
    with pytest.raises(ValueError, match="node_id"):
        NodeView(node_id="", address="10.0.0.1", total={}, available={})
