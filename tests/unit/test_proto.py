"""The checked-in stubs are current, and messages round-trip without pickle."""

import subprocess
import sys

import pytest

from pdserve.proto import PROTOCOL_VERSION
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc


def test_generated_code_is_current():
    """Runs the check as a developer would, in its own process.

    NOTE: loading grpc_tools' protoc in a process that already loaded NIXL's bundled
    native libraries segfaults (a library clash), so it must not run in-process here.
    """
    pytest.importorskip("grpc_tools")
    proc = subprocess.run([sys.executable, "-m", "pdserve.proto.generate", "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + "\nrun `python -m pdserve.proto.generate` and commit the result"


def test_protocol_version_is_a_positive_int():
    assert isinstance(PROTOCOL_VERSION, int) and PROTOCOL_VERSION >= 1


def test_sampling_params_survive_the_wire_exactly():
    sent = pb.SamplingParams(n=2, temperature=0.7, top_p=0.95, min_p=0.05, seed=2**62, max_tokens=9, stop=["\n\n"])
    got = pb.SamplingParams.FromString(sent.SerializeToString())
    assert got.temperature == 0.7 and got.top_p == 0.95 and got.seed == 2**62 and list(got.stop) == ["\n\n"]
    assert not pb.SamplingParams().HasField("seed")  # "no seed" is distinguishable from seed 0


def test_kv_event_oneof():
    ev = pb.KVEvent(seq=5, worker_id="d0", stored=pb.BlocksStored(block_hashes=[2**64 - 1], token_ids=[1, 2], block_size=2))
    got = pb.KVEvent.FromString(ev.SerializeToString())
    assert got.WhichOneof("event") == "stored" and got.stored.block_hashes[0] == 2**64 - 1


def test_services_exist():
    for name in ("PrefillStub", "DecodeStub", "ControlPlaneStub", "add_PrefillServicer_to_server"):
        assert hasattr(pb_grpc, name)
