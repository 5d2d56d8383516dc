"""KVPoolConfig validation and the master's missing-binary error (no Mooncake needed)."""

from __future__ import annotations

import importlib.util

import pytest

from pdserve.deploy import kvpool as deploy_kvpool
from pdserve.kvtransfer.kvpool import KVPoolConfig


def test_defaults_are_valid_and_loopback():
    cfg = KVPoolConfig(master_address="127.0.0.1:50051")
    assert cfg.master_host_port == ("127.0.0.1", 50051)
    assert (cfg.protocol, cfg.metadata_server, cfg.local_hostname) == ("tcp", "P2PHANDSHAKE", "127.0.0.1")
    assert KVPoolConfig(master_address="[::1]:50051").master_host_port == ("::1", 50051)


@pytest.mark.parametrize("field, value", [
    ("master_address", "no-port"), ("master_address", "host:0"), ("master_address", ":50051"),
    ("metadata_server", "localhost:8080"), ("protocol", "udp"), ("local_hostname", ""),
    ("segment_size", -1), ("local_buffer_size", 0), ("max_block_bytes", 0),
    ("retry_interval_s", 0), ("connect_timeout_s", -1.0),
])
def test_invalid_field_is_named(field, value):
    kwargs = {"master_address": "127.0.0.1:50051", field: value}
    with pytest.raises(ValueError, match=field):
        KVPoolConfig(**kwargs)


def test_missing_master_binary_names_it_and_the_fix(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(FileNotFoundError, match=r"mooncake_master not found.*pdserve\[kvpool\]"):
        deploy_kvpool.find_master_binary()
