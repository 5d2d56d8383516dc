"""The gateway's side of mid-stream migration, against two fake decode workers.

The fakes (plain gRPC, one servicer behind two ports registered as d0 and d1) stream
choice ``i``'s token at output position ``p`` as ``chr(ord("A") + (p + i) % 26)``, one
character each, and honour ``GenerateRequest.resume``: a resumed call starts at
position ``len(resume.token_ids)`` with the seed of completion ``resume.index``. A
scripted failure breaks a call after some messages. What the client reads must be the
uninterrupted sequence; what reached the second worker must say exactly where to resume.
The real engine's side is tests/unit/test_engine_resume.py; real workers killed under
a real stream are tests/integration/test_migration.py.
"""

from __future__ import annotations

import json
import threading
from concurrent import futures

import grpc
import httpx
import pytest

from pdserve.deploy.store import ControlPlaneServer
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.router.app import ServerThread, create_app
from pdserve.router.gateway import GatewayConfig
from test_gateway_edge import BOS, make_model_dir, worker_info


def token(position: int, index: int) -> int:
    return ord("A") + (position + index) % 26


class BreakingDecode(pb_grpc.DecodeServicer):
    """``fail``: how a call fails after ``after`` messages: "unavailable" (an abort, as a
    dying worker's stream reads), "end" (the stream just ends), None (it does not).
    ``fail_resumed``: resumed calls fail the same way too."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []
        self.fail: str | None = "unavailable"
        self.fail_resumed = False
        self.after = 3
        self.lock = threading.Lock()

    def Generate(self, request, context):
        with self.lock:
            self.requests.append(request)
        p = request.sampling_params
        resume = request.resume if request.HasField("resume") else None
        if resume is not None:
            assert p.n == 1 and len(resume.token_ids) == resume.text_len  # one character per token
            indices, start = [resume.index], len(resume.token_ids)
        else:
            indices, start = list(range(p.n or 1)), 0
        fails = self.fail if resume is None or self.fail_resumed else None
        num_sent = 0
        for position in range(start, p.max_tokens):
            for k, i in enumerate(indices):
                if fails and num_sent == self.after:
                    if fails == "unavailable":
                        context.abort(grpc.StatusCode.UNAVAILABLE, "the worker went away")
                    return
                tok = token(position, i)
                last = position == p.max_tokens - 1
                msg = pb.GenerateResponse(request_id=request.request_id, index=k, token_ids=[tok], text=chr(tok),
                                          finish_reason=pb.LENGTH if last else pb.FINISH_REASON_UNSPECIFIED)
                if last and k == len(indices) - 1:
                    num_prompt = len(request.prompt_token_ids) + start
                    msg.usage.CopyFrom(pb.Usage(prompt_tokens=num_prompt, cached_tokens=num_prompt - 1))
                if p.HasField("logprobs"):
                    msg.logprobs.append(pb.TokenLogprobs(token_ids=[tok], logprobs=[-0.25 * position]))
                yield msg
                num_sent += 1

    def Stats(self, request, context):
        return pb.StatsResponse(num_kv_blocks_total=64, num_kv_blocks_free=64)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory.mktemp("gw-migration") / "fake")
    store = ControlPlaneServer()
    store.start()
    fake = BreakingDecode()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_DecodeServicer_to_server(fake, grpc_server)
    for wid in ("d0", "d1"):
        store.store.register(worker_info(wid, pb.DECODE, f"127.0.0.1:{grpc_server.add_insecure_port('127.0.0.1:0')}"),
                             3600)
    grpc_server.start()
    servers = []

    def gateway(**overrides) -> str:
        cfg = dict(store_url=store.url, model_dir=str(model_dir), stats_interval_s=0, unavailable_backoff_s=0.0)
        servers.append(ServerThread(create_app(GatewayConfig(**{**cfg, **overrides}))))
        return servers[-1].url

    try:
        yield fake, gateway
    finally:
        for srv in servers:
            srv.stop()
        grpc_server.stop(0)
        store.stop()


@pytest.fixture()
def fake(cluster):
    f = cluster[0]
    f.requests.clear()
    f.fail, f.fail_resumed, f.after = "unavailable", False, 3
    return f


def stream(url: str, body: dict) -> tuple[dict[int, str], dict[int, list[float]], list[dict]]:
    """Text and logprobs per choice, and the other events (usage, errors)."""
    r = httpx.post(url + "/v1/completions", json={"model": "fake", "stream": True, **body}, timeout=10)
    assert r.status_code == 200, r.text
    events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e and e != "data: [DONE]"]
    text: dict[int, str] = {}
    logprobs: dict[int, list[float]] = {}
    for e in events:
        for c in e.get("choices", ()):
            text[c["index"]] = text.get(c["index"], "") + c["text"]
            if c["logprobs"]:
                logprobs.setdefault(c["index"], []).extend(c["logprobs"]["token_logprobs"])
    return text, logprobs, [e for e in events if not e.get("choices")]


def metric(url: str, prefix: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(prefix))


def test_a_broken_stream_resumes_exactly_where_the_client_is(cluster, fake):
    url = cluster[1]()
    text, logprobs, rest = stream(url, {"prompt": "hi", "max_tokens": 8, "seed": 5, "logprobs": 0,
                                        "stream_options": {"include_usage": True}})
    assert text == {0: "ABCDEFGH"}
    assert logprobs == {0: [-0.25 * p for p in range(8)]}  # the resumed tokens' logprobs once, then the new ones
    first, resumed = fake.requests
    assert not first.HasField("resume")
    assert list(resumed.resume.token_ids) == [ord(c) for c in "ABC"]
    assert resumed.resume.index == 0 and resumed.resume.text_len == 3
    assert list(resumed.prompt_token_ids) == list(first.prompt_token_ids) == [BOS, ord("h"), ord("i")]
    assert resumed.sampling_params.seed == 5 and resumed.request_id == f"{first.request_id}-c0-m1"
    (usage,) = [e["usage"] for e in rest if e.get("usage")]
    # Completion tokens are the client's; the prompt once, and only its cache hits (the
    # resumed call reported hits on its output tokens too).
    assert usage == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11,
                     "prompt_tokens_details": {"cached_tokens": 3}}
    assert metric(url, 'pdserve_gateway_migrations_total{outcome="resumed",reason="unavailable"}') == 1


def test_n2_resumes_each_unfinished_completion_as_its_own_request(cluster, fake):
    url = cluster[1]()
    fake.after = 5  # choice 0 got 3 tokens, choice 1 got 2
    text, _, _ = stream(url, {"prompt": "hi", "max_tokens": 6, "n": 2, "seed": 9})
    assert text == {0: "ABCDEF", 1: "BCDEFG"}
    first, *resumed = fake.requests
    assert first.sampling_params.n == 2
    by_index = {r.resume.index: r for r in resumed}
    assert sorted(by_index) == [0, 1]
    assert [len(by_index[i].resume.token_ids) for i in (0, 1)] == [3, 2]
    assert all(r.sampling_params.n == 1 and r.sampling_params.seed == 9 for r in resumed)


def test_a_stream_that_ends_early_resumes_and_a_whole_answer_too(cluster, fake):
    url = cluster[1]()
    fake.fail = "end"
    text, _, _ = stream(url, {"prompt": "hi", "max_tokens": 7})
    assert text == {0: "ABCDEFG"}
    r = httpx.post(url + "/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 7}, timeout=10)
    assert r.json()["choices"][0]["text"] == "ABCDEFG" and r.json()["usage"]["completion_tokens"] == 7
    assert metric(url, 'pdserve_gateway_migrations_total{outcome="resumed",reason="ended"}') == 2


def test_migrations_are_bounded(cluster, fake):
    url = cluster[1](max_migrations=2)
    fake.fail_resumed, fake.after = True, 2
    text, _, rest = stream(url, {"prompt": "hi", "max_tokens": 20})
    assert text == {0: "ABCDEF"}  # 2 tokens from the first call and from each of 2 migrations
    assert rest[-1]["error"]["code"] == "migrations_exhausted"
    assert len(fake.requests) == 3
    assert metric(url, 'pdserve_gateway_migrations_total{outcome="exhausted",reason="unavailable"}') == 1
    # max_migrations=0: the first break ends the stream; nothing resumes.
    url = cluster[1](max_migrations=0)
    text, _, rest = stream(url, {"prompt": "hi", "max_tokens": 20})
    assert text == {0: "AB"} and rest[-1]["error"]["code"] == "migrations_exhausted"


def test_max_migrations_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match="max_migrations"):
        GatewayConfig(store_url="grpc://x", model_dir=str(make_model_dir(tmp_path / "m")), max_migrations=-1)


def test_pdserve_up_flag():
    import argparse

    from pdserve.deploy.up import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args([]).max_migrations == GatewayConfig.max_migrations == 3
    assert p.parse_args(["--max-migrations", "0"]).max_migrations == 0
