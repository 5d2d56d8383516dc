"""The checked-in stubs are current, and messages round-trip without pickle."""

import subprocess
import sys

import pytest

from pdserve.engine.sampling_params import SamplingParams, StructuredOutput
from pdserve.proto import PROTOCOL_VERSION, convert
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
    assert isinstance(PROTOCOL_VERSION, int) and PROTOCOL_VERSION >= 2  # 2: penalties, logit_bias, token lists


def test_sampling_params_survive_the_wire_exactly():
    sent = pb.SamplingParams(n=2, temperature=0.7, top_p=0.95, min_p=0.05, seed=2**62, max_tokens=9, stop=["\n\n"])
    got = pb.SamplingParams.FromString(sent.SerializeToString())
    assert got.temperature == 0.7 and got.top_p == 0.95 and got.seed == 2**62 and list(got.stop) == ["\n\n"]
    assert not pb.SamplingParams().HasField("seed")  # "no seed" is distinguishable from seed 0


ROUND_TRIP = [
    SamplingParams(),
    SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, seed=-(2**63), max_tokens=40, stop=("a", "bc"),
                   stop_token_ids=(2, 3), ignore_eos=True, logprobs=0, skip_special_tokens=False, cache_salt="t1",
                   presence_penalty=-2.0, frequency_penalty=0.1, repetition_penalty=0.85, min_tokens=40,
                   logit_bias={0: -100.0, 2**32 - 1: 0.1, 7: 0.0}, allowed_token_ids=(5, 1, 5),
                   banned_token_ids=(9, 0), prompt_logprobs=3, include_stop_str_in_output=True,
                   spaces_between_special_tokens=False),
    SamplingParams(structured_output=StructuredOutput("json", '{"type": "object"}'), prompt_logprobs=0),
    SamplingParams(structured_output=StructuredOutput("json_object", reasoning="open")),
    SamplingParams(repetition_penalty=1.0, logit_bias={}, allowed_token_ids=(0,)),  # neutral values, one id
]


@pytest.mark.parametrize("params", ROUND_TRIP, ids=["default", "all", "structured", "json_object", "edges"])
def test_sampling_params_round_trip_exactly(params):
    msg = pb.SamplingParams.FromString(convert.sampling_message(params).SerializeToString())
    got = SamplingParams(**convert.sampling_kwargs(msg))
    assert got == params
    assert (got.allowed_token_ids is None) == (params.allowed_token_ids is None)  # None is not ()
    assert got.logit_bias == params.logit_bias  # {} arrives as None, as SamplingParams stores it


def test_unset_fields_read_as_the_defaults():
    """An old sender's message (no new fields) means no penalties, not repetition_penalty 0."""
    old = pb.SamplingParams(temperature=1.0, top_p=1.0, max_tokens=4, skip_special_tokens=True)
    got = SamplingParams(**convert.sampling_kwargs(old))
    assert got == SamplingParams(max_tokens=4) and not got.has_logits_processors
    empty = pb.SamplingParams(temperature=1.0, top_p=1.0, max_tokens=4)
    empty.allowed_token_ids.SetInParent()  # set but empty: refused, not "every token"
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(**convert.sampling_kwargs(empty))


def test_kv_event_oneof():
    ev = pb.KVEvent(seq=5, worker_id="d0", stored=pb.BlocksStored(block_hashes=[2**64 - 1], token_ids=[1, 2], block_size=2))
    got = pb.KVEvent.FromString(ev.SerializeToString())
    assert got.WhichOneof("event") == "stored" and got.stored.block_hashes[0] == 2**64 - 1


def test_services_exist():
    for name in ("PrefillStub", "DecodeStub", "ControlPlaneStub", "add_PrefillServicer_to_server"):
        assert hasattr(pb_grpc, name)
