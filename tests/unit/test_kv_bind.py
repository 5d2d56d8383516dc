"""The KV transfer agents listen on their host's address, not on every interface.

torch_dist binds its TCPStore itself (``master_listen_fd``); NIXL restricts UCX to the
interface holding the host (``UCX_NET_DEVICES``) unless the user chose devices.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from pdserve.kvtransfer import KVRegionLayout, available_backends, create_agent

LAY = KVRegionLayout.for_rank(num_layers=1, num_blocks=2, num_kv_heads=1, block_size=4, head_dim=8, dtype="float32")


def _listening() -> set[str]:
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    return {ln.split()[3] for ln in out.splitlines()}


@pytest.mark.skipif(shutil.which("ss") is None or "torch_dist" not in available_backends(), reason="needs ss, gloo")
def test_torch_dist_store_binds_its_host(monkeypatch):
    monkeypatch.delenv("PDSERVE_KV_HOST", raising=False)
    agent = create_agent("torch_dist", "bind-check", torch.zeros(LAY.shape), LAY)
    try:
        mine = {a for a in _listening() if a.rsplit(":", 1)[1] == str(agent.port)}
        assert mine == {"127.0.0.1:" + str(agent.port)}, mine  # not *:port
    finally:
        agent.close()


@pytest.mark.skipif("nixl" not in available_backends(), reason="NIXL not installed")
def test_nixl_restricts_ucx_to_the_host_interface(monkeypatch):
    from pdserve.kvtransfer.nixl_backend import interface_addresses, ucx_net_devices

    loopback = next(name for name, iface in interface_addresses() if iface.ip.is_loopback)
    assert ucx_net_devices("127.0.0.1").split(",")[0] == loopback
    assert ucx_net_devices("0.0.0.0") is None and ucx_net_devices("203.0.113.77") is None  # held by no interface
    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    monkeypatch.delenv("PDSERVE_KV_HOST", raising=False)
    before = _listening() if shutil.which("ss") else set()
    agent = create_agent("nixl", "bind-check", torch.zeros(LAY.shape), LAY)
    try:
        assert "UCX_NET_DEVICES" not in os.environ  # set only while the agent was created
        if shutil.which("ss"):
            new = _listening() - before
            assert new and all(a.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]") for a in new), new
    finally:
        agent.close()
