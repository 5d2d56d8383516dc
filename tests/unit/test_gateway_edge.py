"""The gateway's HTTP edge against a fake decode worker: formats, errors, limits, cancellation.

Everything runs in this process and fast: an embedded control-plane server, a fake
``Decode`` servicer (plain gRPC, scripted by the prompt's first token id), a byte-level
tokenizer written here, and the app under uvicorn on a loopback port. The real
workers are exercised in tests/integration/test_gateway.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
import uvicorn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from pdserve.deploy.store import ControlPlaneServer
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import Tokenizer as EngineTokenizer
from pdserve.proto import PROTOCOL_VERSION, convert
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.router.app import ServerThread, create_app
from pdserve.router.gateway import GatewayConfig

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
BOS = 256
CONTEXT_LEN = 128
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
                 "{{ m['content'] }}<|eot_id|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{% endif %}")
# The fake worker's script: the first prompt token id picks the behaviour.
FAIL_INVALID, FAIL_UNAVAILABLE, FAIL_MIDWAY, SLOW = 1, 2, 3, 4
KEY = "sk-test-key"


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]

def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table, so token id == byte value."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def make_model_dir(path: Path) -> Path:
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(_byte_chars())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIALS[0]} $A", special_tokens=[(SPECIALS[0], BOS)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "chat_template": CHAT_TEMPLATE}))
    (path / "config.json").write_text(json.dumps({"max_position_embeddings": CONTEXT_LEN, "vocab_size": 261}))
    return path


class FakeDecode(pb_grpc.DecodeServicer):
    """Streams ``max_tokens`` steps of tokens ``A, B, C, ...`` for every choice."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self.step_s = 0.0

    def Generate(self, request, context):
        self.requests.append(request)
        p = request.sampling_params
        first = request.prompt_token_ids[0] if request.prompt_token_ids[0] != BOS else request.prompt_token_ids[1]
        if first == FAIL_INVALID:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens 7 is too many for the fake")
        if first == FAIL_UNAVAILABLE:
            context.abort(grpc.StatusCode.UNAVAILABLE, "fake worker is down")
        step_s = 0.05 if first == SLOW else self.step_s
        for step in range(p.max_tokens):
            if step_s:
                time.sleep(step_s)
            if not context.is_active():
                self.cancelled.append(request.request_id)
                return
            for i in range(p.n or 1):
                if first == FAIL_MIDWAY and step == 2:
                    yield pb.GenerateResponse(request_id=request.request_id, index=i, finish_reason=pb.ERROR,
                                              error=pb.Error(code="internal", message="boom"))
                    return
                tok = ord("A") + (step + i) % 26
                last = step == p.max_tokens - 1
                msg = pb.GenerateResponse(request_id=request.request_id, index=i, token_ids=[tok], text=chr(tok),
                                          finish_reason=pb.LENGTH if last else pb.FINISH_REASON_UNSPECIFIED)
                if last and i == (p.n or 1) - 1:  # the request's last message: its usage
                    num_prompt = len(request.prompt_token_ids)
                    msg.usage.CopyFrom(pb.Usage(prompt_tokens=num_prompt, completion_tokens=p.max_tokens * (p.n or 1),
                                                cached_tokens=cached_tokens(num_prompt)))
                if p.HasField("logprobs"):
                    msg.logprobs.append(pb.TokenLogprobs(token_ids=[tok] + [tok + 1 + k for k in range(p.logprobs)],
                                                         logprobs=[-0.5] + [-1.0 - k for k in range(p.logprobs)]))
                yield msg
        self.finished.append(request.request_id)

    def Stats(self, request, context):
        return pb.StatsResponse(worker_id="d0", num_kv_blocks_total=64, num_kv_blocks_free=64)


def cached_tokens(num_prompt_tokens: int) -> int:
    """What the fake reports as prefix-cache hits: the full 16-token blocks but the last token's."""
    return (num_prompt_tokens - 1) // 16 * 16


def worker_info(worker_id: str, role: int, address: str) -> pb.WorkerInfo:
    return pb.WorkerInfo(worker_id=worker_id, role=role, address=address, protocol_version=PROTOCOL_VERSION,
                         model=pb.ModelIdentity(name="fake", architecture="fake", vocab_size=261),
                         kv_layout=pb.KVLayout(layout="x", block_size=16, tp_size=1), num_kv_blocks=64)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory.mktemp("gw") / "fake")
    store = ControlPlaneServer()
    store.start()
    fake = FakeDecode()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_DecodeServicer_to_server(fake, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    store.store.register(worker_info("d0", pb.DECODE, f"127.0.0.1:{port}"), 3600)
    store.store.register(worker_info("p0", pb.PREFILL, "127.0.0.1:1"), 3600)
    servers = []

    def gateway(**overrides) -> str:
        cfg = dict(store_url=store.url, model_dir=str(model_dir), disagg_threshold_tokens=32, stats_interval_s=0)
        srv = ServerThread(create_app(GatewayConfig(**{**cfg, **overrides})))
        servers.append(srv)
        return srv.url

    try:
        yield fake, gateway, store, model_dir
    finally:
        for srv in servers:
            srv.stop()
        grpc_server.stop(0)
        store.stop()


@pytest.fixture(scope="module")
def url(cluster):
    return cluster[1]()


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=10, **kw)


def sse_events(text: str) -> list:
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [json.loads(e[6:]) for e in events[:-1]]


def test_completion_body_and_what_reaches_the_worker(cluster, url):
    fake = cluster[0]
    # Internal fields cannot come from a client: unknown (or refused) unless null.
    for name in ("prefill_worker_id", "request_id", "unknown_field"):
        r = post(url, "/v1/completions", {"model": "fake", "prompt": "hi", name: "mine"})
        assert check_error(r, 400, name)["message"].startswith(f"'{name}'" if name == "request_id" else "unknown")
    r = post(url, "/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 3, "temperature": 0,
                                      "prefill_worker_id": None, "request_id": None, "unknown_field": None})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "fake" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "ABC", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,  # BOS h i
                             "prompt_tokens_details": {"cached_tokens": 0}}
    sent = fake.requests[-1]
    assert sent.request_id == r.headers["x-request-id"] and len(sent.request_id) == 32 and sent.request_id != "mine"
    assert sent.prefill_worker_id == ""  # 3 tokens: below the threshold, whatever the client said
    assert list(sent.prompt_token_ids) == [BOS, ord("h"), ord("i")]
    assert sent.sampling_params.max_tokens == 3 and sent.sampling_params.temperature == 0
    assert _wait(lambda: sent.request_id in fake.finished) and sent.request_id not in fake.cancelled


def test_long_prompt_gets_a_remote_prefill_worker(cluster, url):
    fake = cluster[0]
    r = post(url, "/v1/completions", {"model": "fake", "prompt": list(range(10, 60)), "max_tokens": 1})
    assert r.status_code == 200
    assert fake.requests[-1].prefill_worker_id == "p0"


def test_streaming_completion_with_usage(url):
    r = post(url, "/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 3, "stream": True,
                                      "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    # One event per token, or fewer when deltas queued up behind a busy writer (merged).
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "ABC"
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]][-1] == "length"
    assert {e["choices"][0]["finish_reason"] for e in events[:-2]} <= {None}
    assert all(e["usage"] is None and e["object"] == "text_completion" for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3


def test_a_fast_stream_keeps_every_token_once_in_order(url):
    """The fake worker streams as fast as gRPC goes, faster than one SSE write per token:
    whatever queued up is merged, never lost, duplicated or reordered."""
    n = CONTEXT_LEN - 3  # BOS h i
    r = post(url, "/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": n, "n": 2, "stream": True,
                                      "logprobs": 1, "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    for i in range(2):
        choice = [e["choices"][0] for e in events[:-1] if e["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in choice) == "".join(chr(ord("A") + (s + i) % 26) for s in range(n))
        assert [t for c in choice for t in c["logprobs"]["tokens"]] == [chr(ord("A") + (s + i) % 26) for s in range(n)]
        assert [t for c in choice for t in c["logprobs"]["text_offset"]] == list(range(n))
        assert [c["finish_reason"] for c in choice][-1] == "length"
        assert {c["finish_reason"] for c in choice[:-1]} <= {None}
    assert events[-1]["usage"]["completion_tokens"] == 2 * n


def test_chat_stream_and_body(cluster, url):
    fake = cluster[0]
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "q"}]}]
    r = post(url, "/v1/chat/completions", {"model": "fake", "messages": msgs, "max_tokens": 2})
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "AB"}
    expected = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>s<|eot_id|>" \
               "<|start_header_id|>user<|end_header_id|>q<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
    tok = EngineTokenizer.from_dir(cluster[3])
    assert list(fake.requests[-1].prompt_token_ids) == tok.encode(expected, add_special_tokens=False)
    assert body["usage"]["prompt_tokens"] == len(fake.requests[-1].prompt_token_ids)
    r = post(url, "/v1/chat/completions", {"model": "fake", "messages": msgs, "max_completion_tokens": 2, "n": 2,
                                           "stream": True})
    events = sse_events(r.text)
    assert events[0]["object"] == "chat.completion.chunk"
    assert [(e["choices"][0]["index"], e["choices"][0]["delta"]) for e in events[:2]] == \
        [(0, {"role": "assistant", "content": ""}), (1, {"role": "assistant", "content": ""})]
    text = {0: "", 1: ""}
    for e in events[2:]:
        text[e["choices"][0]["index"]] += e["choices"][0]["delta"].get("content", "")
    assert text == {0: "AB", 1: "BC"}
    assert sum(e["choices"][0]["finish_reason"] == "length" for e in events) == 2


def test_top_k_beyond_the_vocabulary_means_no_top_k(cluster, url):
    r = post(url, "/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": 1, "top_k": 2**40})
    assert r.status_code == 200 and cluster[0].requests[-1].sampling_params.top_k == 0


def test_penalties_bias_and_token_lists_reach_the_worker(cluster, url):
    fake = cluster[0]
    extra = {"presence_penalty": 0.5, "frequency_penalty": -1.25, "repetition_penalty": 1.1, "min_tokens": 2,
             "logit_bias": {"65": -100, "260": 7.5}, "allowed_token_ids": [65, 66, 67]}
    r = post(url, "/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": 2, **extra})
    assert r.status_code == 200, r.text
    got = SamplingParams(**convert.sampling_kwargs(fake.requests[-1].sampling_params))
    assert got == SamplingParams(max_tokens=2, presence_penalty=0.5, frequency_penalty=-1.25, repetition_penalty=1.1,
                                 min_tokens=2, logit_bias={65: -100.0, 260: 7.5}, allowed_token_ids=(65, 66, 67))
    msgs = [{"role": "user", "content": "x"}]
    r = post(url, "/v1/chat/completions", {"model": "fake", "messages": msgs, "max_completion_tokens": 2, **extra})
    assert r.status_code == 200, r.text
    got_chat = SamplingParams(**convert.sampling_kwargs(fake.requests[-1].sampling_params))
    assert got_chat == got
    r = post(url, "/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": 1, "presence_penalty": None,
                                      "logit_bias": None, "repetition_penalty": None, "allowed_token_ids": None})
    assert r.status_code == 200, r.text
    sent = fake.requests[-1].sampling_params
    assert not sent.HasField("allowed_token_ids") and not sent.logit_bias
    assert not SamplingParams(**convert.sampling_kwargs(sent)).has_logits_processors


def test_several_prompts_times_n_choices(url):
    r = post(url, "/v1/completions", {"model": "fake", "prompt": ["a", "b"], "n": 2, "max_tokens": 1})
    body = r.json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "A"), (1, "B"), (2, "A"), (3, "B")]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_logprobs_formats(url):
    r = post(url, "/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": 2, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["A", "B"] and lp["token_logprobs"] == [-0.5, -0.5] and lp["text_offset"] == [0, 1]
    assert lp["top_logprobs"][0] == {"A": -0.5, "B": -1.0}
    r = post(url, "/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "x"}],
                                           "max_tokens": 1, "logprobs": True, "top_logprobs": 1})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert content == [{"token": "A", "logprob": -0.5, "bytes": [65],
                        "top_logprobs": [{"token": "A", "logprob": -0.5, "bytes": [65]}]}]


BAD = [
    # (body or raw bytes, status, param)
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"model": "fake", "prompt": "x", "temperature": NaN}', 400, None),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "other", "prompt": "x"}, 404, "model"),
    ({"model": "fake"}, 400, "prompt"),
    ({"model": "fake", "prompt": ""}, 400, "prompt"),
    ({"model": "fake", "prompt": []}, 400, "prompt"),
    ({"model": "fake", "prompt": [[]]}, 400, "prompt"),
    ({"model": "fake", "prompt": ["a", 1]}, 400, "prompt"),
    ({"model": "fake", "prompt": [5, 9999]}, 400, "prompt"),
    ({"model": "fake", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "fake", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "fake", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": "fake", "prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ({"model": "fake", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "fake", "prompt": "x", "top_k": -2}, 400, "top_k"),
    ({"model": "fake", "prompt": "x", "min_p": 1.5}, 400, "min_p"),
    ({"model": "fake", "prompt": "x", "n": 17}, 400, "n"),
    ({"model": "fake", "prompt": "x", "n": 0}, 400, "n"),
    ({"model": "fake", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "fake", "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"model": "fake", "prompt": "x", "seed": 2**64}, 400, "seed"),
    ({"model": "fake", "prompt": "x", "stop": ["s"] * 17}, 400, "stop"),
    ({"model": "fake", "prompt": "x", "stop": [""]}, 400, "stop"),
    ({"model": "fake", "prompt": "x", "echo": True, "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    ({"model": "fake", "prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"model": "fake", "prompt": "x", "frequency_penalty": -2.5}, 400, "frequency_penalty"),
    ({"model": "fake", "prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"model": "fake", "prompt": "x", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"model": "fake", "prompt": "x", "logit_bias": {"261": 1}}, 400, "logit_bias"),
    ({"model": "fake", "prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"model": "fake", "prompt": "x", "min_tokens": 17}, 400, "min_tokens"),
    ({"model": "fake", "prompt": "x", "allowed_token_ids": [261]}, 400, "allowed_token_ids"),
    ({"model": "fake", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": "fake", "prompt": "x", "max_tokens": CONTEXT_LEN}, 400, "max_tokens"),
    ({"model": "fake", "prompt": "y" * CONTEXT_LEN}, 400, "prompt"),
    ({"model": "fake", "prompt": "y" * 100_000}, 400, "prompt"),  # validated off the event loop
    ({"model": "fake", "prompt": ["x"] * 33}, 400, "prompt"),
]

BAD_CHAT = [
    ({"model": "fake", "messages": []}, 400, "messages"),
    ({"model": "fake", "messages": "hi"}, 400, "messages"),
    ({"model": "fake", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"model": "fake", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": "fake", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 500}, 400,
     "max_completion_tokens"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400,
     "tools[0].function"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema",
      "json_schema": {"name": "x", "schema": {"type": "frob"}}}}, 400, "response_format"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "guided_regex": "a(", "guided_choice": ["a"]},
     400, "guided_choice"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS}, 400, "tool_choice"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": "required",
      "response_format": {"type": "json_object"}}, 400, "tool_choice"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"messages": []}},
     400, "chat_template_kwargs"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "guided_json": {"type": "object"},
      "min_tokens": 2}, 400, "min_tokens"),
    ({"model": "fake", "messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, 400,
     "messages[0].tool_calls[0].function.arguments"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "structured_outputs": {"regex": "a",
      "choice": ["b"]}}, 400, "structured_outputs"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "presence_penalty": -2.5}, 400,
     "presence_penalty"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"1.5": 1}}, 400,
     "logit_bias"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2,
      "min_tokens": 3}, 400, "min_tokens"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "allowed_token_ids": []}, 400,
     "allowed_token_ids"),
]


def check_error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("body,status,param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_completion_requests(url, body, status, param):
    if isinstance(body, bytes):
        r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = post(url, "/v1/completions", body)
    check_error(r, status, param)
    assert post(url, "/v1/completions", {"model": "fake", "prompt": "ok", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("body,status,param", BAD_CHAT, ids=[str(i) for i in range(len(BAD_CHAT))])
def test_bad_chat_requests(url, body, status, param):
    check_error(post(url, "/v1/chat/completions", body), status, param)
    good = {"model": "fake", "messages": [{"role": "user", "content": "ok"}], "max_tokens": 1}
    assert post(url, "/v1/chat/completions", good).status_code == 200


def test_context_error_names_the_limit(url):
    err = check_error(post(url, "/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": 127}), 400,
                      "max_tokens")
    assert err["code"] == "context_length_exceeded" and "128" in err["message"]


def test_body_size_limits(url):
    big = {"model": "fake", "prompt": "x" * (1 << 20)}
    check_error(post(url, "/v1/completions", big), 413, None)

    def chunks():  # no Content-Length: the bytes read are counted
        yield b'{"model": "fake", "prompt": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}'

    r = httpx.post(url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    check_error(r, 413, None)
    assert post(url, "/v1/completions", {"model": "fake", "prompt": "ok", "max_tokens": 1}).status_code == 200


def test_unknown_route_and_method_use_the_envelope(url):
    check_error(httpx.get(url + "/v1/nothing"), 404, None)
    check_error(httpx.get(url + "/v1/completions"), 405, None)


def test_worker_errors(url):
    r = post(url, "/v1/completions", {"model": "fake", "prompt": [FAIL_INVALID], "max_tokens": 2})
    assert "fake" in check_error(r, 400, None)["message"]
    r = post(url, "/v1/completions", {"model": "fake", "prompt": [FAIL_UNAVAILABLE], "max_tokens": 2})
    check_error(r, 503, None)
    assert r.headers["retry-after"] == "1"
    r = post(url, "/v1/completions", {"model": "fake", "prompt": [FAIL_MIDWAY], "max_tokens": 5})
    err = check_error(r, 500, None)
    assert "boom" not in err["message"] and r.headers.get("x-request-id") is None
    # After the stream started: an error event, then [DONE].
    r = post(url, "/v1/completions", {"model": "fake", "prompt": [FAIL_MIDWAY], "max_tokens": 5, "stream": True})
    assert r.status_code == 200
    events = sse_events(r.text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "AB"  # in one or two chunks
    assert events[-1]["error"]["code"] == "generation_failed"
    assert post(url, "/v1/completions", {"model": "fake", "prompt": "ok", "max_tokens": 1}).status_code == 200


def test_auth(cluster):
    gw = cluster[1](api_key=KEY)
    body = {"model": "fake", "prompt": "x", "max_tokens": 1}
    check_error(post(gw, "/v1/completions", body), 401, None)
    check_error(post(gw, "/v1/completions", body, headers={"Authorization": "Bearer nope"}), 401, None)
    check_error(httpx.get(gw + "/v1/models"), 401, None)
    # Auth comes before reading the body: an oversized anonymous body is still 401.
    check_error(post(gw, "/v1/completions", {"x": "y" * (2 << 20)}), 401, None)
    assert post(gw, "/v1/completions", body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(gw + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(gw + "/health").status_code == 200 and httpx.get(gw + "/ready").status_code == 200


def test_overload_is_503_with_retry_after(cluster):
    gw = cluster[1](max_inflight=1)
    slow = threading.Thread(target=post, args=(gw, "/v1/completions",
                                               {"model": "fake", "prompt": [SLOW], "max_tokens": 20}))
    slow.start()
    time.sleep(0.3)
    r = post(gw, "/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": 1})
    check_error(r, 503, None)
    assert r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"] == "1"
    slow.join()
    assert post(gw, "/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": 1}).status_code == 200


def test_timeout_is_504(cluster):
    gw = cluster[1](request_timeout_s=0.3)
    r = post(gw, "/v1/completions", {"model": "fake", "prompt": [SLOW], "max_tokens": 40})
    assert check_error(r, 504, None)["code"] == "timeout"


def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def test_client_disconnect_cancels_the_worker_call(cluster, url):
    fake = cluster[0]
    body = {"model": "fake", "prompt": [SLOW], "max_tokens": 100, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=10) as r:
        next(r.iter_lines())
        rid = r.headers["x-request-id"]
    assert _wait(lambda: rid in fake.cancelled)
    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=0.5)
    rid = fake.requests[-1].request_id
    assert _wait(lambda: rid in fake.cancelled)
    assert rid not in fake.finished


def test_no_workers(tmp_path):
    with ControlPlaneServer() as empty:
        model_dir = str(make_model_dir(tmp_path / "fake"))
        srv = ServerThread(create_app(GatewayConfig(store_url=empty.url, model_dir=model_dir, stats_interval_s=0)))
        try:
            r = post(srv.url, "/v1/completions", {"model": "fake", "prompt": "x"})
            assert check_error(r, 503, None)["code"] == "no_workers" and r.headers["retry-after"] == "1"
            r = httpx.get(srv.url + "/ready")
            assert r.status_code == 503 and r.json()["decode"] == 0
            assert httpx.get(srv.url + "/health").status_code == 200
        finally:
            srv.stop()


def test_models_ready_and_metrics(url):
    models = httpx.get(url + "/v1/models").json()
    assert models["data"][0]["id"] == "fake" and models["object"] == "list"
    assert httpx.get(url + "/ready").json() == {"ready": True, "prefill": 1, "decode": 1}
    text = httpx.get(url + "/metrics").text
    for name in ("pdserve_gateway_requests_total{endpoint=\"completions\",outcome=\"success\"}",
                 "pdserve_gateway_time_to_first_token_seconds_bucket", "pdserve_gateway_inter_token_latency_seconds",
                 "pdserve_gateway_e2e_request_latency_seconds", "pdserve_gateway_prompt_tokens_total",
                 "pdserve_gateway_completion_tokens_total",
                 "pdserve_gateway_routing_decisions_total{prefill=\"local\"}",
                 "pdserve_gateway_routing_kv_hit_tokens_total", "pdserve_gateway_workers{role=\"decode\"} 1.0"):
        assert name in text, name
    success = [ln for ln in text.splitlines() if ln.startswith(
        'pdserve_gateway_requests_total{endpoint="completions",outcome="success"}')]
    assert float(success[0].split()[-1]) > 0


def test_config_validation(tmp_path):
    model_dir = str(make_model_dir(tmp_path))
    with pytest.raises(ValueError, match="nowhere"):
        GatewayConfig(store_url="grpc://x:1", model_dir="/nowhere")
    with pytest.raises(ValueError, match="max_inflight"):
        GatewayConfig(store_url="grpc://x:1", model_dir=model_dir, max_inflight=0)
    assert GatewayConfig(store_url="grpc://x:1", model_dir=model_dir).model_name == Path(model_dir).name


def test_router_package_never_imports_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import pdserve.router, pdserve.router.app, pdserve.router.gateway, pdserve.router.schemas, "
            "pdserve.router.metrics, pdserve.router.policy, pdserve.router.events\n"
            "from pdserve.router import create_app, GatewayConfig, serve\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_serve_warns_beyond_loopback_without_a_key(tmp_path, monkeypatch, caplog):
    from pdserve.router import app as app_module

    runs = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: runs.append(kw))
    cfg = GatewayConfig(store_url="grpc://127.0.0.1:1", model_dir=str(make_model_dir(tmp_path / "fake")))
    with caplog.at_level("WARNING", logger="pdserve.gateway"):
        app_module.serve(cfg)
        app_module.serve(cfg, host="0.0.0.0", port=9000)
        app_module.serve(GatewayConfig(**{**cfg.__dict__, "api_key": KEY}), host="0.0.0.0")
    assert [r.getMessage() for r in caplog.records if "without an API key" in r.getMessage()] == [
        "the gateway listens on 0.0.0.0 without an API key: anyone who can reach it can use it (set --api-key)"]
    assert [(kw["host"], kw["port"]) for kw in runs] == [("127.0.0.1", 8000), ("0.0.0.0", 9000), ("0.0.0.0", 8000)]


def test_a_reasoning_gateway_lets_the_grammar_start_after_the_thinking(cluster):
    """With --reasoning-parser, structured outputs (and forced tool calls) are sent with the
    parser's grammar mode, so the model may think before the constrained answer."""
    fake, gateway, _, _ = cluster
    base = gateway(reasoning_parser="qwen3", tool_call_parser="hermes")
    plain = gateway()
    body = {"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
            "response_format": {"type": "json_object"}}
    for url, mode in ((base, "optional"), (plain, "")):
        assert post(url, "/v1/chat/completions", body).status_code == 200
        sent = SamplingParams(**convert.sampling_kwargs(fake.requests[-1].sampling_params))
        assert sent.structured_output.kind == "json_object" and sent.structured_output.reasoning == mode
    forced = {**body, "response_format": None, "tools": TOOLS, "tool_choice": "required"}
    assert post(base, "/v1/chat/completions", forced).status_code == 200
    sent = SamplingParams(**convert.sampling_kwargs(fake.requests[-1].sampling_params))
    assert sent.structured_output.kind == "json" and sent.structured_output.reasoning == "optional"
    # Completions have no reasoning parser: the grammar starts at the first token.
    assert post(base, "/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": 2,
                                          "guided_regex": "[a-z]+"}).status_code == 200
    assert SamplingParams(**convert.sampling_kwargs(fake.requests[-1].sampling_params)).structured_output.reasoning == ""


def test_chat_template_kwargs_documents_and_add_generation_prompt_reach_the_template(cluster, tmp_path):
    _, gateway, _, model_dir = cluster
    thinking = tmp_path / "thinking"
    shutil.copytree(model_dir, thinking)
    config = json.loads((thinking / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if documents %}[{{ documents | length }} docs]{% endif %}"
        "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
        "{% if add_generation_prompt %}>{% endif %}")
    (thinking / "tokenizer_config.json").write_text(json.dumps(config))
    url = gateway(model_dir=str(thinking))
    tok = EngineTokenizer.from_dir(thinking)

    def rendered(**extra) -> str:
        r = post(url, "/tokenize", {"messages": [{"role": "user", "content": "hi"}], **extra})
        assert r.status_code == 200, r.text
        return tok.decode(r.json()["tokens"], skip_special_tokens=False)

    assert rendered() == "hi>"
    assert rendered(chat_template_kwargs={"enable_thinking": False}) == "hi<think></think>>"
    assert rendered(documents=[{"text": "a"}, {"text": "b"}], add_generation_prompt=False) == "hi[2 docs]"
