"""ClusterSpec: validation, YAML round trip, and flags the worker runner accepts."""

from __future__ import annotations

import dataclasses

import pytest

from pdserve.deploy.cluster import MANAGED_FLAGS, ClusterSpec, PoolSpec
from pdserve.deploy.runner import build_parser

STORE = "grpc://127.0.0.1:50051"


def spec(**kw) -> ClusterSpec:
    base = dict(
        model="/models/tiny",
        pools=(PoolSpec("prefill", count=2, tp_size=2), PoolSpec("decode", count=1, resources={"GPU": 1, "CPU": 2},
                                                                 num_kv_blocks=512, extra_args=("--max-num-seqs", "8"))),
        dtype="bfloat16", block_size=32, kv_cache_memory=1 << 28, transfer_backend="torch_dist", heartbeat_ttl=2.5,
        extra_args=("--log-level", "WARNING"),
    )
    base.update(kw)
    return ClusterSpec(**base)


def test_worker_args_parse_with_the_runner_parser_for_every_worker():
    s = spec(pools=(PoolSpec("prefill", count=2, tp_size=2), PoolSpec("decode", num_kv_blocks=512),
                    PoolSpec("both", name="mixed", extra_args=("--prefill-timeout", "5"))))
    seen = []
    for pool, i in s.workers():
        argv = s.worker_args(pool, i, store_url=STORE)
        args = build_parser(pool.role).parse_args(argv)  # argparse exits on a flag it does not know
        seen.append(args.worker_id)
        assert args.model == "/models/tiny" and args.store == STORE
        assert args.tensor_parallel_size == pool.tp_size and args.dtype == "bfloat16" and args.block_size == 32
        assert args.transfer_backend == "torch_dist" and args.heartbeat_ttl == 2.5 and args.log_level == "WARNING"
        if pool.name == "decode":  # the pool's KV size replaces the cluster's
            assert args.num_kv_blocks == 512 and args.kv_cache_memory == build_parser("decode").get_default("kv_cache_memory")
        else:
            assert args.num_kv_blocks is None and args.kv_cache_memory == 1 << 28
        if pool.name == "mixed":
            assert args.prefill_timeout == 5.0
    assert seen == ["prefill-0", "prefill-1", "decode-0", "mixed-0"]
    assert s.num_workers() == 4


def test_worker_args_by_name_position_and_store_from_spec():
    s = spec(store="redis://10.0.0.2:6379")
    assert s.worker_args("decode", 0) == s.worker_args(1, 0) == s.worker_args(s.pools[1], 0)
    assert s.worker_args("decode", 0)[s.worker_args("decode", 0).index("--store") + 1] == "redis://10.0.0.2:6379"
    assert "grpc://h:1" in s.worker_args("decode", 0, store_url="grpc://h:1")  # the launcher's URL wins
    with pytest.raises(ValueError, match="store"):
        spec().worker_args("decode", 0)
    with pytest.raises(KeyError, match="nope"):
        spec().worker_args("nope", 0, store_url=STORE)
    with pytest.raises(ValueError, match="-1"):
        spec().worker_args("decode", -1, store_url=STORE)


def test_bundles_and_total_resources():
    s = spec()
    assert s.pools[0].bundles() == [{"CPU": 1}, {"CPU": 1}]
    assert s.pools[1].bundles() == [{"GPU": 1, "CPU": 2}]
    assert s.total_resources() == {"CPU": 2 * 2 * 1 + 2, "GPU": 1}


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(model=""), "model"),
        (dict(pools=()), "pools must not be empty"),
        (dict(pools=(PoolSpec("prefill"),)), "decode"),
        (dict(pools=(PoolSpec("decode", count=0),)), "decode"),
        (dict(pools=(PoolSpec("decode"), PoolSpec("decode"))), "unique.*'decode'"),
        (dict(dtype="fp8"), "'fp8'"),
        (dict(block_size=0), "block_size.*0"),
        (dict(block_size=True), "block_size.*True"),
        (dict(num_kv_blocks=-3, kv_cache_memory=None), "num_kv_blocks.*-3"),
        (dict(num_kv_blocks=64), "not both"),
        (dict(kv_cache_memory=1.5), "kv_cache_memory.*1.5"),
        (dict(transfer_backend="rdma"), "'rdma'"),
        (dict(heartbeat_ttl=0), "heartbeat_ttl.*0"),
        (dict(store="localhost:6379"), "'localhost:6379'"),
        (dict(extra_args=("--no-such-flag",)), "--no-such-flag"),
        (dict(extra_args=("--max-num-seqs", "many")), "many"),
        (dict(extra_args=("--model", "/other")), "--model"),
        (dict(extra_args=("--tp=4",)), "--tp"),
        (dict(extra_args=("--port", "9000")), "--port"),
        (dict(extra_args="--log-level DEBUG"), "list of strings"),
        (dict(extra_args=("--max-num-seqs", 8)), "8"),
    ],
)
def test_cluster_validation_names_the_bad_value(kw, match):
    with pytest.raises(ValueError, match=match):
        spec(**kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(role="router"), "'router'"),
        (dict(role="decode", count=-1), "count.*-1"),
        (dict(role="decode", count=1.0), "count.*1.0"),
        (dict(role="decode", tp_size=0), "tp_size.*0"),
        (dict(role="decode", resources={}), "resources"),
        (dict(role="decode", resources={"GPU": 0}), "'GPU'.*0"),
        (dict(role="decode", resources={"GPU": "one"}), "'one'"),
        (dict(role="decode", name="a b"), "'a b'"),
        (dict(role="decode", num_kv_blocks=8, kv_cache_memory=1024), "not both"),
        (dict(role="decode", extra_args=("--worker-id", "x")), "--worker-id"),
    ],
)
def test_pool_validation_names_the_bad_value(kw, match):
    with pytest.raises(ValueError, match=match):
        PoolSpec(**kw)


def test_pool_extra_args_are_checked_against_the_pool_role_parser():
    with pytest.raises(ValueError, match="pool 'decode'.*--bogus"):
        spec(pools=(PoolSpec("decode", extra_args=("--bogus",)),))


def test_spec_is_frozen_and_hashable_with_readonly_resources():
    s = spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.dtype = "float32"  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.pools[0].resources["CPU"] = 4  # type: ignore[index]
    assert hash(s) == hash(spec()) and s == spec()
    assert dataclasses.replace(s, block_size=16).block_size == 16
    with pytest.raises(ValueError, match="block_size"):
        dataclasses.replace(s, block_size=-1)


def test_yaml_round_trip(tmp_path):
    s = spec(store="redis://10.0.0.2:6379")
    path = tmp_path / "cluster.yaml"
    s.to_yaml(path)
    back = ClusterSpec.from_yaml(path)
    assert back == s
    assert back.to_dict() == s.to_dict()
    for pool, i in s.workers():
        assert back.worker_args(pool.name, i) == s.worker_args(pool.name, i)


def test_yaml_minimal_relative_model_and_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: ./tiny\npools:\n  - {role: prefill}\n  - {role: decode, count: 2, tp_size: 2, resources: {GPU: 1}}\n")
    s = ClusterSpec.from_yaml(path)
    assert s.model == str(tmp_path / "tiny")
    assert [(p.name, p.count, p.tp_size, dict(p.resources)) for p in s.pools] == [
        ("prefill", 1, 1, {"CPU": 1}), ("decode", 2, 2, {"GPU": 1})
    ]
    assert (s.dtype, s.block_size, s.transfer_backend, s.heartbeat_ttl) == ("float32", 16, "nixl", 10.0)
    argv = s.worker_args("decode", 1, store_url=STORE)
    defaults = build_parser("decode").parse_args(["--model", "m", "--store", STORE])
    got = build_parser("decode").parse_args(argv)
    # A spec that says nothing about a setting leaves the runner's default in place.
    assert got.kv_cache_memory == defaults.kv_cache_memory and got.num_kv_blocks is None
    assert got.heartbeat_ttl == defaults.heartbeat_ttl and got.max_num_seqs == defaults.max_num_seqs


@pytest.mark.parametrize(
    "text, match",
    [
        ("model: m\npools: [{role: decode}]\ncolour: blue\n", "colour"),
        ("model: m\npools: [{role: decode, gpus: 1}]\n", "gpus"),
        ("pools: [{role: decode}]\n", "'model'"),
        ("model: m\n", "'pools'"),
        ("model: m\npools: {role: decode}\n", "pools must be a list"),
        ("model: m\npools: [{count: 1}]\n", "role"),
        ("- just\n- a list\n", "mapping"),
        ("model: m\npools: [{role: decode, count: two}]\n", "'two'"),
        ("model: [unclosed\n", "YAML"),
    ],
)
def test_yaml_errors_name_the_problem_and_the_file(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        ClusterSpec.from_yaml(path)
    assert str(path) in str(e.value)


def test_managed_flags_exist_in_the_runner():
    known = set(build_parser("decode")._option_string_actions) | {"--role"}
    assert MANAGED_FLAGS <= known
