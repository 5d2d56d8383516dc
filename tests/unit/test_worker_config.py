"""The worker's settings: every flag of ``build_parser`` is a WorkerConfig field (same
name), values are validated once, and credentials never come from flags."""

from __future__ import annotations

import dataclasses

import pytest

from pdserve.deploy.runner import WorkerConfig, build_parser, main


@pytest.mark.parametrize("role", [None, "prefill", "decode"])
def test_every_flag_is_a_field_and_defaults_agree(role):
    argv = ["--model", "m", "--store", "grpc://127.0.0.1:1"] + (["--role", "decode"] if role is None else [])
    args = build_parser(role).parse_args(argv)
    config = WorkerConfig.from_args(args)
    fields = {f.name: f for f in dataclasses.fields(WorkerConfig)}
    for name, value in vars(args).items():
        assert name in fields, name
        assert getattr(config, name) == value
        if fields[name].default is not dataclasses.MISSING:
            assert fields[name].default == build_parser("decode").get_default(name), name
    assert config.cluster_secret is None and "cluster_secret" not in {a.dest for a in build_parser(role)._actions}


def test_credentials_are_arguments_not_flags_and_stay_out_of_repr():
    args = build_parser("decode").parse_args(["--model", "m", "--store", "s"])
    config = WorkerConfig.from_args(args, cluster_secret=b"k" * 32, store_password="pw")
    assert config.cluster_secret == b"k" * 32 and "kkkk" not in repr(config) and "pw" not in repr(config)


@pytest.mark.parametrize("flag,value", [("--block-size", "0"), ("--max-num-seqs", "0"), ("--port", "-1"),
                                        ("--heartbeat-ttl", "0"), ("--max-waiting-requests", "-2")])
def test_bad_values_exit_2_naming_the_flag(flag, value, capsys):
    assert main("decode", ["--model", "m", "--store", "s", flag, value]) == 2
    assert flag in capsys.readouterr().err


def test_kv_pool_flags_reach_the_engine_and_need_the_host_tier(tmp_path):
    import json

    from pdserve.deploy.runner import engine_config

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}))
    base = dict(model=str(tmp_path), store="grpc://127.0.0.1:1", device="cpu", kv_pool_master="127.0.0.1:7000")
    pool = engine_config(WorkerConfig(**base, kv_offload_memory=1 << 20)).cache.kv_pool
    assert pool.master_address == "127.0.0.1:7000" and pool.local_hostname == "127.0.0.1"
    with pytest.raises(ValueError, match="--kv-offload-memory"):  # the pool fills the host tier
        engine_config(WorkerConfig(**base))
    assert engine_config(WorkerConfig(**{**base, "kv_pool_master": None})).cache.kv_pool is None


def test_pdserve_up_gives_pool_workers_a_host_tier_unless_the_spec_names_one(tmp_path):
    """`pdserve up --kv-pool` adds the master's address and, when the spec's extra_args name
    no host tier, a default one: the worker it starts then accepts the pool."""
    import json

    from pdserve.deploy.runner import build_parser, engine_config
    from pdserve.deploy.up import DEFAULT_POOL_HOST_TIER_BYTES, pool_worker_args

    extra = pool_worker_args(("--drain-timeout", "60"), "127.0.0.1:7000")
    assert extra == ("--kv-pool-master", "127.0.0.1:7000", "--kv-offload-memory", str(DEFAULT_POOL_HOST_TIER_BYTES))
    for named in (("--kv-offload-memory", "4096"), ("--kv-offload-memory=4096",)):
        assert pool_worker_args(named, "127.0.0.1:7000") == ("--kv-pool-master", "127.0.0.1:7000")
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}))
    args = build_parser("decode").parse_args(["--model", str(tmp_path), "--store", "grpc://127.0.0.1:1",
                                              "--device", "cpu", *extra])
    cache = engine_config(WorkerConfig(**vars(args))).cache
    assert cache.kv_pool.master_address == "127.0.0.1:7000"
    assert cache.offload_memory_bytes == DEFAULT_POOL_HOST_TIER_BYTES
