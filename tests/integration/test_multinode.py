"""Workers placed on a multi-node Ray cluster, simulated on this machine.

``ray.cluster_utils.Cluster`` starts four real Ray nodes (one raylet each): a head
with no CPUs (like a head that only runs ``pdserve up`` and the gateway) and nodes
of 2, 2 and 1 logical CPUs. The spec: one prefill worker of TP=2 and two decode
workers of TP=1, one CPU per rank, real tiny-Llama workers, the store in a real
Redis. The launcher joins the cluster as ``pdserve up --ray-address auto`` does
(``RAY_ADDRESS`` names the simulated cluster, so no other Ray on the machine is found).

What the node sizes force, and what only spreading gives:

* prefill-0's two ranks share one 2-CPU node (STRICT_PACK);
* the decode workers land on two different nodes: the other 2-CPU node and the
  1-CPU node. Packing would put both on the free 2-CPU node; the launcher's
  spread planner picks the node with the fewest decode workers for decode-1;
* the head hosts nothing.

A CPU-less node added for a while on another IP (127.0.0.2) makes a loopback store
URL an error. The tests run in file order: after the launcher's shutdown (the cluster
stays up, its resources free), ``pdserve up --ray-address auto --redis-url ...`` runs
as a subprocess on the same cluster and serves a completion through its gateway.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

import hf_reference as H  # noqa: E402
from pdserve.deploy.cluster import ClusterSpec, PoolSpec  # noqa: E402
from pdserve.deploy.ray_launcher import RayLauncher, WorkerStartError  # noqa: E402
from pdserve.deploy.store import open_store  # noqa: E402
from pdserve.engine import SamplingParams  # noqa: E402
from pdserve.engine.tiny_model import make_tiny_model  # noqa: E402
from pdserve.proto import auth, convert  # noqa: E402
from pdserve.proto import pdserve_pb2 as pb  # noqa: E402
from pdserve.proto import pdserve_pb2_grpc as pb_grpc  # noqa: E402
from redis_server import redis_url  # noqa: E402,F401 - session fixture

pytestmark = pytest.mark.integration

NUM_BLOCKS = 32
#: The workers listen on the node IP, beyond loopback: every call to them is signed.
SECRET = auth.generate_secret()


@dataclass
class Sim:
    cluster: Cluster
    #: name ("head", "a", "b", "c") -> Ray node id
    nodes: dict[str, str]
    spec: ClusterSpec
    store: Any  # ControlPlaneStore over the Redis
    store_url: str
    launcher: RayLauncher
    handles: dict


@pytest.fixture(scope="module")
def sim(tmp_path_factory, redis_url):  # noqa: F811 - the fixture imported above
    # The tiny model has a tokenizer, which the gateway of the last test needs.
    model_dir = make_tiny_model(tmp_path_factory.mktemp("multinode") / "tiny-llama")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = {name: cluster.add_node(num_cpus=cpus).node_id for name, cpus in (("a", 2), ("b", 2), ("c", 1))}
    nodes["head"] = cluster.head_node.node_id
    cluster.wait_for_nodes()
    spec = ClusterSpec(
        model=str(model_dir),
        pools=(PoolSpec("prefill", tp_size=2, resources={"CPU": 1}),
               PoolSpec("decode", count=2, resources={"CPU": 1})),
        num_kv_blocks=NUM_BLOCKS, transfer_backend="torch_dist", heartbeat_ttl=2.0,
        extra_args=("--prefill-timeout", "20", "--log-level", "WARNING"),
    )
    store = open_store(redis_url)
    old_address = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = cluster.address
    launcher = None
    try:
        launcher = RayLauncher(spec, redis_url, ray_address="auto", cluster_secret=SECRET)
        handles = {h.worker_id: h for h in launcher.launch()}
        yield Sim(cluster, nodes, spec, store, redis_url, launcher, handles)
    finally:
        if launcher is not None:
            launcher.shutdown()
        if ray.is_initialized():
            ray.shutdown()
        if old_address is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old_address
        store.close()
        cluster.shutdown()


def test_tp_group_packed_and_pools_spread(sim):
    nodes, handles = sim.nodes, sim.handles
    placement = sim.launcher.placement()
    assert sorted(placement) == ["decode-0", "decode-1", "prefill-0"]
    prefill_nodes = placement["prefill-0"]
    assert len(prefill_nodes) == 2 and len(set(prefill_nodes)) == 1, placement  # one TP group, one node
    assert prefill_nodes[0] in (nodes["a"], nodes["b"])  # only the 2-CPU nodes hold 2 ranks
    other_big = nodes["b"] if prefill_nodes[0] == nodes["a"] else nodes["a"]
    decode_nodes = {placement["decode-0"][0], placement["decode-1"][0]}
    assert decode_nodes == {other_big, nodes["c"]}, placement
    assert nodes["head"] not in {n for ns in placement.values() for n in ns}
    for wid, h in handles.items():
        assert h.node_id == placement[wid][0]  # the actor runs in bundle 0
        table = ray.util.placement_group_table(h.placement_group)
        assert table["strategy"] == "STRICT_PACK" and table["state"] == "CREATED"


def test_workers_registered_with_their_node_address(sim):
    handles = sim.handles
    listed = {w.worker_id: w for w in sim.store.list_workers()}
    assert sorted(listed) == ["decode-0", "decode-1", "prefill-0"]
    assert listed["prefill-0"].role == pb.PREFILL and listed["prefill-0"].kv_layout.tp_size == 2
    assert len(listed["prefill-0"].transfer.ranks) == 2
    node_ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    for wid, h in handles.items():
        assert listed[wid].address == h.address
        # Bound to the node's IP, so the gateway and peers on other nodes reach it.
        assert h.address.rsplit(":", 1)[0] == node_ips[h.node_id], (wid, h.address)


def _generate(address: str, rid: str, prompt: list[int], prefill: str = "") -> tuple[list[int], int]:
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    req = pb.GenerateRequest(request_id=rid, prompt_token_ids=prompt, prefill_worker_id=prefill,
                             sampling_params=convert.sampling_message(params))
    tokens, finish = [], None
    with auth.insecure_channel(address, SECRET) as ch:
        for msg in pb_grpc.DecodeStub(ch).Generate(req, timeout=60):
            tokens.extend(msg.token_ids)
            finish = msg.finish_reason or finish
    return tokens, finish


def test_request_across_nodes(sim):
    """Prefill on the TP=2 node, KV written (torch_dist) into a decode worker on another
    node: the tokens equal the decode worker's own prefill of the same prompt."""
    handles = sim.handles
    prompt = H.random_prompts(1000, [23], seed=5)[0]
    for wid in ("decode-0", "decode-1"):
        local, finish = _generate(handles[wid].address, f"{wid}-local", prompt)
        assert len(local) == 6 and finish == pb.LENGTH
        remote, finish = _generate(handles[wid].address, f"{wid}-remote", prompt, prefill="prefill-0")
        assert remote == local and finish == pb.LENGTH, wid


def test_worker_that_fits_no_node_is_refused_clearly(sim):
    too_big = ClusterSpec(model=sim.spec.model, pools=(PoolSpec("decode", name="big", tp_size=3),),
                          num_kv_blocks=NUM_BLOCKS, transfer_backend="torch_dist")
    busy = ClusterSpec(model=sim.spec.model, pools=(PoolSpec("decode", name="late", tp_size=2),),
                       num_kv_blocks=NUM_BLOCKS, transfer_backend="torch_dist")
    for bad, why in ((too_big, "no node of the cluster is that large"), (busy, "busy")):
        other = RayLauncher(bad, sim.store_url, placement_timeout_s=2)  # joins the driver's connection
        with pytest.raises(WorkerStartError, match=f"needs {bad.pools[0].tp_size} x") as err:
            other.launch()
        assert why in str(err.value) and "ONE node" in str(err.value), err.value
        other.shutdown()
        assert ray.is_initialized() and other.workers == {}
    assert sorted(w.worker_id for w in sim.store.list_workers()) == ["decode-0", "decode-1", "prefill-0"]


def test_loopback_store_refused_once_a_node_is_elsewhere(sim):
    """A node on another IP (127.0.0.2 here) could never reach a store on loopback."""
    far = sim.cluster.add_node(num_cpus=0, node_ip_address="127.0.0.2")
    sim.cluster.wait_for_nodes()
    try:
        other = RayLauncher(sim.spec, sim.store_url)  # joins the driver's connection
        with pytest.raises(ValueError, match=r"on loopback.*127\.0\.0\.2.*--redis-url"):
            other.launch()
        other.shutdown()
        assert other.workers == {} and ray.is_initialized()
    finally:
        sim.cluster.remove_node(far)
        sim.cluster.wait_for_nodes()


def test_shutdown_frees_the_cluster_and_leaves_it_running(sim, monkeypatch):
    seen = {}
    real_shutdown = ray.shutdown

    def shutdown_spy(*a, **kw):
        # Ray frees a disconnected job's actors itself; check the launcher did it first.
        deadline = time.monotonic() + 15
        while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        seen["available"] = ray.available_resources().get("CPU", 0)
        seen["pgs"] = {v["state"] for v in ray.util.placement_group_table().values()}
        return real_shutdown(*a, **kw)

    monkeypatch.setattr(ray, "shutdown", shutdown_spy)
    sim.launcher.shutdown()
    monkeypatch.undo()
    assert seen["available"] == 5 and seen["pgs"] == {"REMOVED"}, seen
    assert not ray.is_initialized() and sim.launcher.workers == {}
    assert sim.store.list_workers() == []  # deregistered by the workers themselves
    # The launcher only disconnected: the cluster it joined is still up.
    ray.init(address=sim.cluster.address, log_to_driver=False)
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert alive == set(sim.nodes.values())
    assert ray.available_resources().get("CPU") == 5


def test_pdserve_up_joins_the_cluster_and_leaves_it_running(sim, tmp_path):
    """The operator's command on the head: `pdserve up --ray-address auto --redis-url ...`."""
    spec_path = tmp_path / "spec.yaml"
    sim.spec.to_yaml(spec_path)
    port = _free_port()
    env = {**os.environ, "RAY_ADDRESS": sim.cluster.address, "PDSERVE_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "pdserve.deploy.cli", "up", "--spec", str(spec_path), "--ray-address", "auto",
           "--redis-url", sim.store_url, "--port", str(port), "--api-key", "k-multinode"]
    with open(tmp_path / "up.log", "w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_ready(proc, port, log)
            body = json.dumps({"model": "tiny-llama", "prompt": "Hello", "max_tokens": 4, "temperature": 0}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body, headers={
                "Content-Type": "application/json", "Authorization": "Bearer k-multinode"})
            with urllib.request.urlopen(req, timeout=60) as r:
                assert json.loads(r.read())["usage"]["completion_tokens"] == 4
            groups = {t["name"].split("-", 2)[2]: t  # pdserve-<tag>-<worker_id>
                      for t in ray.util.placement_group_table().values() if t["state"] == "CREATED"}
            assert sorted(groups) == ["decode-0", "decode-1", "prefill-0"], groups
            decode_nodes = {groups[w]["bundles_to_node_id"][0] for w in ("decode-0", "decode-1")}
            assert len(decode_nodes) == 2  # spread
            proc.send_signal(signal.SIGINT)
            assert proc.wait(120) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert sim.store.list_workers() == []
    assert {n["NodeID"] for n in ray.nodes() if n["Alive"]} == set(sim.nodes.values())  # the cluster stays
    deadline = time.monotonic() + 15
    while ray.available_resources().get("CPU") != 5:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, port: int, log, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    log.seek(0)
    raise AssertionError(f"pdserve up not ready (exit code {proc.poll()}):\n{log.read()[-3000:]}")
