"""Control-plane store pieces that need no server: compatibility rules, EmbeddedStore
with a fake clock, URL dispatch. The full contract runs in
tests/integration/test_store_contract.py against every backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.deploy.store import EmbeddedStore, IncompatibleWorkerError, RemoteStore, open_store
from pdserve.deploy.store.base import (
    COMPAT_FIELDS,
    check_compatible,
    compat_signature,
    event_payload,
    role_matches,
)
from pdserve.proto import PROTOCOL_VERSION
from pdserve.proto import pdserve_pb2 as pb


def worker(worker_id="d0", **kv) -> pb.WorkerInfo:
    layout = dict(layout="l,b,kv,h,t,d", num_layers=2, num_kv_heads=4, head_dim=16, block_size=16, dtype="float32", tp_size=1)
    layout.update(kv)
    return pb.WorkerInfo(
        worker_id=worker_id,
        role=pb.DECODE,
        protocol_version=PROTOCOL_VERSION,
        model=pb.ModelIdentity(name="m", architecture="LlamaForCausalLM", weights_digest="d", vocab_size=100),
        kv_layout=pb.KVLayout(**layout),
        started_at_ms=1,
    )


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_signature_ignores_tp_size_and_non_identity_fields():
    a, b = worker(tp_size=1), worker("other", tp_size=8)
    b.address, b.node_id, b.num_kv_blocks, b.started_at_ms = "h:1", "n1", 7, 99
    assert compat_signature(a) == compat_signature(b)
    check_compatible(a, [b])


@pytest.mark.parametrize("field", COMPAT_FIELDS)
def test_each_compat_field_changes_the_signature(field):
    a, b = worker(), worker("p0")
    msg, attr = b, field
    if "." in field:
        parent, attr = field.split(".")
        msg = getattr(b, parent)
    current = getattr(msg, attr)
    setattr(msg, attr, current + 1 if isinstance(current, int) else current + "x")
    assert compat_signature(a) != compat_signature(b)
    with pytest.raises(IncompatibleWorkerError) as info:
        check_compatible(b, [a])
    assert info.value.field == field and field in str(info.value)


def test_message_lists_every_mismatch():
    with pytest.raises(IncompatibleWorkerError) as info:
        check_compatible(worker("p0", block_size=32, dtype="bfloat16"), [worker("d0")])
    msg = str(info.value)
    assert "kv_layout.block_size is 32, registered worker has 16" in msg
    assert "kv_layout.dtype is 'bfloat16', registered worker has 'float32'" in msg
    assert "'p0'" in msg and "'d0'" in msg


def test_role_matches():
    assert role_matches(pb.BOTH, pb.PREFILL) and role_matches(pb.BOTH, pb.DECODE)
    assert not role_matches(pb.PREFILL, pb.DECODE) and not role_matches(pb.DECODE, pb.BOTH)
    assert role_matches(pb.PREFILL, None) and role_matches(pb.DECODE, pb.ROLE_UNSPECIFIED)


def test_event_payload_strips_seq_and_worker():
    raw = event_payload(pb.KVEvent(seq=5, worker_id="x", removed=pb.BlocksRemoved(block_hashes=[3])))
    back = pb.KVEvent.FromString(raw)
    assert back.seq == 0 and back.worker_id == "" and list(back.removed.block_hashes) == [3]
    with pytest.raises(ValueError):
        event_payload(pb.KVEvent(seq=1))


def test_embedded_ttl_on_fake_clock():
    clock = FakeClock()
    s = EmbeddedStore(clock=clock)
    s.register(worker("d0"), 10)
    clock.t += 9.9
    assert s.heartbeat("d0", 10)
    clock.t += 9.9
    assert [w.worker_id for w in s.list_workers()] == ["d0"]
    clock.t += 0.1  # deadline reached: expired
    assert s.reap_expired() == 1
    assert s.reap_expired() == 0
    assert s.list_workers() == [] and not s.heartbeat("d0", 10)
    events = s.read_kv_events(0, 10).events
    assert [(e.seq, e.worker_id, e.WhichOneof("event")) for e in events] == [(1, "d0", "cleared")]


def test_embedded_returns_copies():
    s = EmbeddedStore()
    w = worker("d0")
    s.register(w, 10)
    w.address = "mutated-after-register"
    got = s.get_worker("d0")
    got.address = "mutated-after-get"
    s.list_workers()[0].address = "mutated-after-list"
    assert s.get_worker("d0").address == ""
    s.publish_kv_events("d0", [pb.KVEvent(stored=pb.BlocksStored(block_hashes=[1]))])
    s.read_kv_events(0, 1).events[0].stored.block_hashes.append(2)
    assert list(s.read_kv_events(0, 1).events[0].stored.block_hashes) == [1]


def test_embedded_retention_is_exact_and_memory_bounded():
    s = EmbeddedStore(max_retained_events=3)
    ev = pb.KVEvent(stored=pb.BlocksStored(block_hashes=[1]))
    for i in range(5000):
        last = s.publish_kv_events("d0", [ev])
        batch = s.read_kv_events(0, 10)
        assert batch.last_seq == last == i + 1
        assert batch.first_available_seq == max(1, last - 2)
        assert [e.seq for e in batch.events] == list(range(max(1, last - 2), last + 1))
    assert len(s._events) <= 3 + 1025


def test_open_store_rejects_unknown_urls():
    with pytest.raises(ValueError, match="unknown control-plane store URL"):
        open_store("http://localhost:1")
    with pytest.raises(ValueError):
        RemoteStore("grpc://no-port")
    assert isinstance(open_store(None), EmbeddedStore)
    assert isinstance(open_store("embedded", max_retained_events=5), EmbeddedStore)


def test_store_code_never_pickles():
    src = Path(__file__).resolve().parents[2] / "deploy" / "store"
    for path in src.glob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "cloudpickle" not in text and "import json" not in text, path
