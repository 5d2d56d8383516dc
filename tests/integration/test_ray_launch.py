"""Workers launched as Ray actors (real local Ray) from a ClusterSpec.

One module-scoped cluster: a ControlPlaneServer (embedded store over gRPC), a local
Ray instance, one prefill and one decode worker on the tiny Llama. The tests run in
file order and the last ones take the cluster down (kill, then shutdown).
"""

from __future__ import annotations

import os
import time

import pytest

ray = pytest.importorskip("ray")

import hf_reference as H  # noqa: E402
from pdserve.deploy.cluster import ClusterSpec, PoolSpec  # noqa: E402
from pdserve.deploy.ray_launcher import RayLauncher, WorkerStartError  # noqa: E402
from pdserve.deploy.scaler import PoolScaler  # noqa: E402
from pdserve.deploy.store.embedded import ControlPlaneServer  # noqa: E402
from pdserve.engine import LLM, SamplingParams  # noqa: E402
from pdserve.proto import auth, convert  # noqa: E402
from pdserve.proto import pdserve_pb2 as pb  # noqa: E402
from pdserve.proto import pdserve_pb2_grpc as pb_grpc  # noqa: E402

pytestmark = pytest.mark.integration

NUM_BLOCKS = 32
TTL = 1.0


@pytest.fixture(scope="module")
def cluster(hf_model_dir):
    model_dir = hf_model_dir("llama")
    spec = ClusterSpec(
        model=str(model_dir),
        pools=(PoolSpec("prefill", resources={"CPU": 1}), PoolSpec("decode", resources={"CPU": 1})),
        num_kv_blocks=NUM_BLOCKS, transfer_backend="torch_dist", heartbeat_ttl=TTL,
        extra_args=("--prefill-timeout", "20", "--log-level", "WARNING"),
    )
    server = ControlPlaneServer()
    server.start()
    # 3 logical CPUs: the two workers plus room for the failing-start test's worker.
    launcher = RayLauncher(spec, server.url, num_cpus=3)
    try:
        t0 = time.monotonic()
        handles = launcher.launch()
        launch_s = time.monotonic() - t0
        yield spec, server, launcher, {h.worker_id: h for h in handles}, launch_s
    finally:
        launcher.shutdown()
        server.stop()


def test_workers_register_with_roles_and_addresses(cluster):
    _, server, launcher, handles, launch_s = cluster
    assert sorted(handles) == ["decode-0", "prefill-0"]
    assert handles["prefill-0"].role == "prefill" and handles["decode-0"].role == "decode"
    listed = {w.worker_id: w for w in server.store.list_workers()}
    assert sorted(listed) == ["decode-0", "prefill-0"]
    assert listed["prefill-0"].role == pb.PREFILL and listed["decode-0"].role == pb.DECODE
    for wid, h in handles.items():
        assert listed[wid].address == h.address and h.address.startswith("127.0.0.1:")
        assert listed[wid].kv_layout.tp_size == 1 and listed[wid].num_kv_blocks == NUM_BLOCKS
        assert listed[wid].transfer.backend == pb.TORCH_DIST and len(listed[wid].transfer.ranks) == 1
        assert h.pid != os.getpid() and h.node_id
    assert launcher.alive() == {"prefill-0": True, "decode-0": True}
    print(f"launch took {launch_s:.1f} s")


def test_one_strict_pack_placement_group_per_worker(cluster):
    spec, _, _, handles, _ = cluster
    ids = set()
    for wid, h in handles.items():
        table = ray.util.placement_group_table(h.placement_group)
        assert table["strategy"] == "STRICT_PACK" and table["state"] == "CREATED"
        assert table["bundles"] == {0: {"CPU": 1.0}}  # tp_size bundles of the per-rank resources
        assert len(set(table["bundles_to_node_id"].values())) == 1
        assert wid in table["name"]
        ids.add(table["placement_group_id"])
    assert len(ids) == 2


def _generate(address: str, rid: str, prompt: list[int], params: SamplingParams, prefill: str = ""):
    req = pb.GenerateRequest(request_id=rid, prompt_token_ids=prompt, prefill_worker_id=prefill,
                             sampling_params=convert.sampling_message(params))
    tokens, final = [], None
    with auth.insecure_channel(address, auth.load_secret()) as ch:  # the workers' secret, if the environment has one
        for msg in pb_grpc.DecodeStub(ch).Generate(req, timeout=60):
            tokens.extend(msg.token_ids)
            if msg.finish_reason:
                final = msg
    return tokens, final


def test_generate_through_the_decode_worker(cluster):
    spec, _, _, handles, _ = cluster
    prompt = H.random_prompts(1000, [23], seed=5)[0]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    with LLM(spec.model, num_kv_blocks=NUM_BLOCKS) as llm:
        ref = llm.generate([prompt], params)[0].token_ids
    # Remote prefill: P computes the prompt and writes its KV into D's blocks (torch_dist).
    tokens, final = _generate(handles["decode-0"].address, "r-remote", prompt, params, prefill="prefill-0")
    assert tokens == ref and final.finish_reason == pb.LENGTH, final
    tokens, final = _generate(handles["decode-0"].address, "r-local", prompt, params)
    assert tokens == ref and final.finish_reason == pb.LENGTH


def test_worker_that_fails_to_start_reports_why(cluster, tmp_path):
    spec, server, launcher, _, _ = cluster
    bad = ClusterSpec(model=str(tmp_path / "no-such-model"), pools=(PoolSpec("decode", name="broken"),),
                      num_kv_blocks=NUM_BLOCKS, transfer_backend="torch_dist", heartbeat_ttl=TTL)
    other = RayLauncher(bad, server.url)  # Ray is up: the launcher joins it and leaves it running
    with pytest.raises(WorkerStartError, match="broken-0.*no-such-model"):
        other.launch()
    other.shutdown()
    assert ray.is_initialized() and other.workers == {}
    assert sorted(w.worker_id for w in server.store.list_workers()) == ["decode-0", "prefill-0"]


def test_killed_worker_expires_from_the_store(cluster):
    _, server, launcher, handles, _ = cluster
    pid = launcher.ping("prefill-0")["pid"]
    launcher.kill_worker("prefill-0")
    assert "prefill-0" not in launcher.alive() and "prefill-0" not in launcher.workers
    # No deregistration happened: the entry lives until its TTL lapses without heartbeats.
    deadline = time.monotonic() + TTL + 10
    while any(w.worker_id == "prefill-0" for w in server.store.list_workers()):
        assert time.monotonic() < deadline, "killed worker still registered long after its TTL"
        time.sleep(0.1)
    assert [w.worker_id for w in server.store.list_workers()] == ["decode-0"]
    assert _actor_state(handles["prefill-0"].actor) == "DEAD"
    _wait_gone(pid)
    # The decode worker keeps heartbeating through all that.
    time.sleep(TTL)
    assert launcher.alive() == {"decode-0": True}
    assert [w.worker_id for w in server.store.list_workers()] == ["decode-0"]


def test_replacement_worker_then_graceful_stop(cluster):
    _, server, launcher, _, _ = cluster
    h = launcher.launch_worker("prefill", 0)  # same id as the killed one: a restart
    assert h.worker_id == "prefill-0" and launcher.alive() == {"decode-0": True, "prefill-0": True}
    assert server.store.get_worker("prefill-0").address == h.address
    pid = h.pid
    assert launcher.stop_worker("prefill-0") is True
    # Deregistered by the worker itself: gone at once, not after a TTL.
    assert [w.worker_id for w in server.store.list_workers()] == ["decode-0"]
    assert _actor_state(h.actor) == "DEAD" and launcher.alive() == {"decode-0": True}
    assert ray.util.placement_group_table(h.placement_group)["state"] == "REMOVED"
    _wait_gone(pid)


def test_pool_scaler_follows_targets_and_replaces_dead_workers(cluster):
    """The reconcile loop of `pdserve up` (deploy/scaler.py), one round at a time."""
    spec, server, launcher, _, _ = cluster
    scaler = PoolScaler(launcher, server.store, spec)
    scaler.publish_spec_targets()  # 1 prefill, 1 decode; prefill-0 was stopped above
    scaler.reconcile()
    assert sorted(launcher.workers) == ["decode-0", "prefill-1"]  # a fresh index, never a reused id
    # decode-0 crashes (its actor dies; the launcher did not do it): released and replaced.
    ray.kill(launcher.workers["decode-0"].actor, no_restart=True)
    deadline = time.monotonic() + 30
    while launcher.alive()["decode-0"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    scaler.reconcile()
    assert sorted(launcher.workers) == ["decode-1", "prefill-1"]
    assert server.store.get_worker("decode-1") is not None
    # Fewer prefill workers: the extra one drains and leaves.
    server.store.set_pool_targets(pb.PoolTargets(num_prefill=0, num_decode=1))
    scaler.reconcile()
    assert scaler.members(scaler.pools["prefill"]) == []
    scaler.stop(wait_drains=True)
    assert sorted(launcher.workers) == ["decode-1"]
    assert [w.worker_id for w in server.store.list_workers()] == ["decode-1"]


def test_shutdown_deregisters_and_leaves_no_actors(cluster, monkeypatch):
    _, server, launcher, handles, _ = cluster
    pids = [launcher.ping(w)["pid"] for w in launcher.workers]
    assert pids
    seen = {}
    real_shutdown = ray.shutdown

    def shutdown_spy(*a, **kw):
        from ray._private import state

        job = ray.get_runtime_context().get_job_id()
        seen["actors"] = {k: v["State"] for k, v in state.actors().items() if v["JobID"] == job}
        seen["pgs"] = {k: v["state"] for k, v in ray.util.placement_group_table().items()}
        return real_shutdown(*a, **kw)

    monkeypatch.setattr(ray, "shutdown", shutdown_spy)
    launcher.shutdown()
    assert "actors" in seen, "ray.shutdown() was not called"
    assert seen["actors"] and set(seen["actors"].values()) == {"DEAD"}, seen
    assert set(seen["pgs"].values()) == {"REMOVED"}, seen
    assert not ray.is_initialized() and launcher.workers == {}
    # Graceful stop deregistered at once (no waiting for a TTL).
    assert server.store.list_workers() == []
    for pid in pids:
        _wait_gone(pid)
    launcher.shutdown()  # idempotent


def test_unplaceable_spec_fails_fast_and_cleans_up(hf_model_dir):
    spec = ClusterSpec(model=str(hf_model_dir("llama")), pools=(PoolSpec("decode", resources={"GPU": 1}),),
                       num_kv_blocks=NUM_BLOCKS, transfer_backend="torch_dist")
    launcher = RayLauncher(spec, "grpc://127.0.0.1:1", placement_timeout_s=2, num_cpus=1)
    try:
        with pytest.raises(WorkerStartError, match="GPU"):
            launcher.launch()
        assert launcher.workers == {}
        pgs = ray.util.placement_group_table()
        assert all(p["state"] == "REMOVED" for p in pgs.values()), pgs
    finally:
        launcher.shutdown()
    assert not ray.is_initialized()


def _actor_state(actor) -> str:
    from pdserve.deploy.ray_launcher import _actor_state as state

    return state(actor)


def _wait_gone(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # A zombie is gone for our purposes.
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return
        except FileNotFoundError:
            return
        assert time.monotonic() < deadline, f"process {pid} still running"
        time.sleep(0.1)
