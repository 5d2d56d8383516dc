"""The OpenAI gateway in front of a real prefill worker and decode worker.

An embedded control-plane server, one prefill and one decode worker as processes
(NIXL transfer) on the tiny model, and the app under uvicorn on a loopback port in a
thread. Clients are the official ``openai`` package and raw httpx. Greedy output
must equal the single-process engine token for token, on both the local-prefill
and the remote-prefill path; a client that goes away must leave every KV block free
on both workers.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from pdserve.deploy.processes import WorkerProcess, wait_all_free
from pdserve.engine.hashing import block_hashes, cache_salt_keys
from pdserve.deploy.store.embedded import ControlPlaneServer
from pdserve.engine import LLM, SamplingParams
from pdserve.engine.tiny_model import make_tiny_model
from pdserve.engine.tokenizer import Tokenizer
from pdserve.router.app import ServerThread, create_app
from pdserve.router.gateway import GatewayConfig

pytestmark = pytest.mark.integration

NUM_BLOCKS = 64
DISAGG_THRESHOLD = 32  # prompts of >= 32 uncached tokens prefill on the prefill worker
KEY = "sk-gateway-test"
SHORT = "The quick brown fox"
LONG = ("Return a new list containing all items from the iterable in ascending order. A custom key function "
        "can be supplied to customize the sort order, and the reverse flag can be set to request the result "
        "in descending order.")


def Worker(role: str, model_dir, store_url: str, worker_id: str) -> WorkerProcess:
    """A worker process (not yet waited for: start several, then ``wait_ready`` each)."""
    return WorkerProcess(role, ["--model", str(model_dir), "--store", store_url, "--worker-id", worker_id,
                                "--num-kv-blocks", str(NUM_BLOCKS), "--transfer-backend", "nixl",
                                "--heartbeat-ttl", "5", "--prefill-timeout", "10", "--log-level", "WARNING"])


class Cluster:
    def __init__(self, model_dir, store, prefill: Worker, decode: Worker):
        self.model_dir, self.store, self.p, self.d = model_dir, store, prefill, decode
        self.model = model_dir.name
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self._servers: list[ServerThread] = []
        self.apps = []
        self.url = self.gateway()

    def gateway(self, **overrides) -> str:
        cfg = dict(store_url=self.store.url, model_dir=str(self.model_dir), disagg_threshold_tokens=DISAGG_THRESHOLD)
        self.apps.append(create_app(GatewayConfig(**{**cfg, **overrides})))
        srv = ServerThread(self.apps[-1])
        self._servers.append(srv)
        return srv.url

    def client(self, url: str | None = None, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=(url or self.url) + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def wait_all_free(self, timeout=10.0) -> bool:
        return wait_all_free([self.d, self.p], timeout)

    def stop(self):
        for srv in self._servers:
            srv.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("gateway") / "tiny-llama")
    store = ControlPlaneServer()
    store.start()
    workers = [Worker("prefill", model_dir, store.url, "p0"), Worker("decode", model_dir, store.url, "d0")]
    c = None
    try:
        for w in workers:
            w.wait_ready()
        c = Cluster(model_dir, store, *workers)
        yield c
    finally:
        if c is not None:
            c.stop()
        for w in reversed(workers):
            w.stop()
        store.stop()


@pytest.fixture(scope="module")
def llm(cluster):
    with LLM(cluster.model_dir, num_kv_blocks=NUM_BLOCKS) as engine:
        yield engine


def reference(llm, prompt_ids, **kw):
    return llm.generate([prompt_ids], SamplingParams(**kw))[0]


def metric(url: str, line_prefix: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(line_prefix))


def test_completions_greedy_equals_engine_on_both_prefill_paths(cluster, llm):
    client = cluster.client()
    local0 = metric(cluster.url, 'pdserve_gateway_routing_decisions_total{prefill="local"}')
    remote0 = metric(cluster.url, 'pdserve_gateway_routing_decisions_total{prefill="remote"}')
    for prompt in (SHORT, LONG):
        ids = cluster.tokenizer.encode(prompt)
        ref = reference(llm, ids, temperature=0.0, max_tokens=12, ignore_eos=True)
        out = client.completions.create(model=cluster.model, prompt=prompt, max_tokens=12, temperature=0,
                                        logprobs=1, extra_body={"ignore_eos": True})
        choice = out.choices[0]
        assert choice.text == ref.text and choice.finish_reason == "length"
        # Token for token: each position's token string is the reference token's.
        assert choice.logprobs.tokens == [cluster.tokenizer.decode([t], skip_special_tokens=False)
                                          for t in ref.token_ids]
        assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 12
    assert len(cluster.tokenizer.encode(SHORT)) < DISAGG_THRESHOLD <= len(cluster.tokenizer.encode(LONG))
    assert metric(cluster.url, 'pdserve_gateway_routing_decisions_total{prefill="local"}') == local0 + 1
    assert metric(cluster.url, 'pdserve_gateway_routing_decisions_total{prefill="remote"}') == remote0 + 1
    assert cluster.wait_all_free()


def test_penalties_bias_and_min_tokens_through_the_gateway_on_both_prefill_paths(cluster, llm):
    """The openai client's presence/frequency penalties and logit_bias, with vLLM's
    repetition_penalty and min_tokens, reach the workers (the prefill worker's first token
    included) and give the engine's own output, seeded sampling too."""
    client = cluster.client()
    eos = sorted(llm.engine.eos_token_ids)[0]
    for prompt in (SHORT, LONG):
        ids = cluster.tokenizer.encode(prompt)
        for temperature, seed in ((0.0, None), (0.9, 7)):
            kw = dict(temperature=temperature, max_tokens=12, presence_penalty=0.6, frequency_penalty=0.4)
            extra = {"repetition_penalty": 1.3, "min_tokens": 4}
            bias = {ids[-1]: 3.0, eos: 20.0}  # EOS pushed up: min_tokens must hold it back
            ref = reference(llm, ids, seed=seed, logit_bias=bias, **kw, **extra)
            assert 4 <= len(ref.token_ids) < 12  # EOS came right after min_tokens
            out = client.completions.create(model=cluster.model, prompt=prompt, seed=seed,
                                            logit_bias={str(k): v for k, v in bias.items()}, extra_body=extra, **kw)
            assert out.choices[0].text == ref.text and out.choices[0].finish_reason == ref.finish_reason
            assert out.usage.completion_tokens == len(ref.token_ids)
    assert cluster.wait_all_free()


def test_token_id_prompts_and_several_prompts(cluster, llm):
    ids = [cluster.tokenizer.encode(SHORT), cluster.tokenizer.encode(LONG)]
    refs = [reference(llm, p, temperature=0.0, max_tokens=6, ignore_eos=True).text for p in ids]
    out = cluster.client().completions.create(model=cluster.model, prompt=ids, max_tokens=6, temperature=0,
                                              extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == refs
    assert out.usage.prompt_tokens == len(ids[0]) + len(ids[1]) and out.usage.completion_tokens == 12


def test_streaming_completion_equals_non_streaming(cluster, llm):
    ref = reference(llm, cluster.tokenizer.encode(LONG), temperature=0.0, max_tokens=10, ignore_eos=True)
    stream = cluster.client().completions.create(model=cluster.model, prompt=LONG, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_chat_equals_engine_streaming_and_not(cluster, llm):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": LONG}]
    ids = cluster.tokenizer.encode_chat(messages)
    ref = reference(llm, ids, temperature=0.0, max_tokens=10, ignore_eos=True)
    client = cluster.client()
    out = client.chat.completions.create(model=cluster.model, messages=messages, max_completion_tokens=10,
                                         temperature=0, extra_body={"ignore_eos": True}, logprobs=True,
                                         top_logprobs=2)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert [e.token for e in choice.logprobs.content] == [
        cluster.tokenizer.decode([t], skip_special_tokens=False) for t in ref.token_ids]
    assert all(len(e.top_logprobs) == 2 for e in choice.logprobs.content)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 10
    stream = client.chat.completions.create(model=cluster.model, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_choices_with_seed_are_reproducible(cluster, llm):
    client = cluster.client()

    def run():
        out = client.completions.create(model=cluster.model, prompt=SHORT, n=3, max_tokens=8, temperature=1.0,
                                        seed=1234, extra_body={"ignore_eos": True})
        assert sorted(c.index for c in out.choices) == [0, 1, 2]
        assert out.usage.completion_tokens == 24
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    first = run()
    assert run() == first and len(set(first)) > 1
    ref = llm.generate([cluster.tokenizer.encode(SHORT)],
                       SamplingParams(n=3, temperature=1.0, seed=1234, max_tokens=8, ignore_eos=True))[0]
    assert [o.text for o in ref.outputs] == first


def test_stop_strings(cluster, llm):
    ids = cluster.tokenizer.encode(SHORT)
    full = reference(llm, ids, temperature=0.0, max_tokens=16, ignore_eos=True).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    ref = reference(llm, ids, temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop])
    out = cluster.client().completions.create(model=cluster.model, prompt=SHORT, max_tokens=16, temperature=0,
                                              stop=stop, extra_body={"ignore_eos": True})
    assert out.choices[0].text == ref.text == full[:full.find(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_bad_requests_get_their_status_and_the_server_keeps_serving(cluster):
    client, url = cluster.client(), cluster.url
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=cluster.model, prompt="x", temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=cluster.model, prompt="x", max_tokens=5000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=cluster.model, messages=[])
    for raw, status in ((b"{", 400), (b'{"model": 1}', 400), (json.dumps({"model": cluster.model, "prompt": ""}), 400),
                        (json.dumps({"model": cluster.model, "prompt": "x" * (2 << 20)}), 413)):
        r = httpx.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    out = client.completions.create(model=cluster.model, prompt="still here", max_tokens=2)
    assert out.usage.completion_tokens >= 1
    assert cluster.wait_all_free()


def test_client_disconnect_frees_blocks_on_both_workers(cluster):
    cancelled0 = metric(cluster.url, 'pdserve_gateway_requests_total{endpoint="completions",outcome="cancelled"}')
    remote0 = metric(cluster.url, 'pdserve_gateway_routing_decisions_total{prefill="remote"}')
    # Fresh 64-token prompts: nothing cached, so both take the remote prefill path.
    body = {"model": cluster.model, "prompt": list(range(1000, 1064)), "max_tokens": 900, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # NOTE: keep a reference; a collected iterator closes the connection
        assert next(lines).startswith("data: {")  # tokens flow: prefill and transfer are done
        assert cluster.d.stats().num_running == 1
    assert cluster.wait_all_free(timeout=8)
    body.update(stream=False, prompt=list(range(2000, 2064)))
    done = threading.Event()

    def send():
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(cluster.url + "/v1/completions", json=body, timeout=3)
        done.set()

    t = threading.Thread(target=send)
    t.start()
    deadline = time.monotonic() + 10
    while cluster.d.stats().num_running == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.d.stats().num_running == 1
    t.join(10)
    assert done.is_set() and cluster.wait_all_free(timeout=8)
    cancelled = metric(cluster.url, 'pdserve_gateway_requests_total{endpoint="completions",outcome="cancelled"}')
    assert cancelled == cancelled0 + 2
    assert metric(cluster.url, 'pdserve_gateway_routing_decisions_total{prefill="remote"}') == remote0 + 2


def test_failure_after_streaming_started_ends_with_an_error_event(cluster):
    url = cluster.gateway(request_timeout_s=2.0)
    body = {"model": cluster.model, "prompt": LONG, "max_tokens": 900, "ignore_eos": True, "stream": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200
    events = r.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    error = json.loads(events[-3].removeprefix("data: "))
    assert error["error"]["code"] == "timeout"
    assert sum(1 for e in events if '"text"' in e) >= 1  # tokens came before the failure
    stream = cluster.client(url).completions.create(model=cluster.model, prompt=LONG, max_tokens=900, stream=True,
                                                    extra_body={"ignore_eos": True})
    with pytest.raises(openai.APIError):  # the openai client surfaces the error event
        for _ in stream:
            pass
    assert cluster.wait_all_free()
    out = cluster.client(url).completions.create(model=cluster.model, prompt=SHORT, max_tokens=2)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_health_ready_models_metrics(cluster):
    url = cluster.url
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    r = httpx.get(url + "/ready")
    assert r.status_code == 200 and r.json() == {"ready": True, "prefill": 1, "decode": 1}
    models = cluster.client().models.list()
    assert [m.id for m in models.data] == [cluster.model]
    text = httpx.get(url + "/metrics").text
    for name in ("pdserve_gateway_time_to_first_token_seconds_count",
                 "pdserve_gateway_inter_token_latency_seconds_count",
                 "pdserve_gateway_e2e_request_latency_seconds_count", "pdserve_gateway_prompt_tokens_total",
                 "pdserve_gateway_completion_tokens_total"):
        assert metric(url, name) > 0, name
    assert metric(url, 'pdserve_gateway_requests_total{endpoint="completions",outcome="success"}') > 0
    assert metric(url, 'pdserve_gateway_requests_total{endpoint="completions",outcome="invalid"}') > 0
    assert "pdserve_gateway_routing_kv_hit_tokens_total" in text


def test_api_key(cluster):
    url = cluster.gateway(api_key=KEY)
    with pytest.raises(openai.AuthenticationError):
        cluster.client(url).completions.create(model=cluster.model, prompt="x", max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        cluster.client(url, api_key="wrong").models.list()
    out = cluster.client(url, api_key=KEY).completions.create(model=cluster.model, prompt="x", max_tokens=1)
    assert out.usage.completion_tokens == 1
    assert httpx.get(url + "/health").status_code == 200


def test_overload_answers_503_with_retry_after(cluster):
    url = cluster.gateway(max_inflight=1)
    body = {"model": cluster.model, "prompt": SHORT, "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")  # the one slot is taken
        with pytest.raises(openai.APIStatusError) as e:
            cluster.client(url).completions.create(model=cluster.model, prompt=SHORT, max_tokens=1)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        assert e.value.body["code"] == "overloaded"
    assert cluster.wait_all_free()
    out = cluster.client(url).completions.create(model=cluster.model, prompt=SHORT, max_tokens=1)
    assert out.usage.completion_tokens == 1


def test_metrics_targets_serve_prometheus_discovery(cluster):
    """GET /metrics/targets lists every worker's metrics endpoint (http_sd_configs form);
    each one scrapes, and names the worker it belongs to."""
    targets = httpx.get(cluster.url + "/metrics/targets").json()
    by_id = {t["labels"]["worker_id"]: t for t in targets}
    assert sorted(by_id) == ["d0", "p0"]
    assert by_id["p0"]["labels"]["role"] == "prefill" and by_id["d0"]["labels"]["role"] == "decode"
    for wid, t in by_id.items():
        (netloc,) = t["targets"]
        body = httpx.get(f"http://{netloc}{t['labels']['__metrics_path__']}").text
        assert f'worker_id="{wid}"' in body and "pdserve_kv_blocks_total" in body
    # It names internal addresses: behind the API key when one is set.
    guarded = cluster.gateway(api_key="k3y")
    assert httpx.get(guarded + "/metrics/targets").status_code == 401
    ok = httpx.get(guarded + "/metrics/targets", headers={"Authorization": "Bearer k3y"})
    assert ok.status_code == 200 and len(ok.json()) == 2


def test_vllm_text_fields_through_the_openai_client_equal_the_engine(cluster, llm):
    """stop_token_ids, include_stop_str_in_output, skip_special_tokens and
    spaces_between_special_tokens, truncate_prompt_tokens: the workers' text is the
    engine's own, streamed or not."""
    client, tok = cluster.client(), cluster.tokenizer
    ids = tok.encode(SHORT)
    greedy = dict(temperature=0.0, max_tokens=12, ignore_eos=True)
    base = reference(llm, ids, **greedy)
    stop_id = base.token_ids[5]
    stop = base.text[len(base.text) // 2: len(base.text) // 2 + 3]
    specials = sorted(t for t in llm.engine.tokenizer.special_token_ids if t not in llm.engine.eos_token_ids)[:2]
    mix = dict(temperature=1.0, seed=5, max_tokens=16, ignore_eos=True,
               allowed_token_ids=tok.encode(" a b", add_special_tokens=False) + specials)
    cases = [dict(greedy, stop_token_ids=[stop_id]), dict(greedy, stop_token_ids=[stop_id], include_stop_str_in_output=True),
             dict(greedy, stop=[stop], include_stop_str_in_output=True),
             dict(mix, skip_special_tokens=False), dict(mix, skip_special_tokens=False, spaces_between_special_tokens=False)]
    for kw in cases:
        ref = reference(llm, ids, **kw)
        extra = {k: v for k, v in kw.items() if k not in ("temperature", "max_tokens", "seed", "stop")}
        out = client.completions.create(model=cluster.model, prompt=SHORT, temperature=kw["temperature"],
                                        max_tokens=kw["max_tokens"], seed=kw.get("seed"), stop=kw.get("stop"),
                                        extra_body=extra)
        assert out.choices[0].text == ref.text and out.choices[0].finish_reason == ref.finish_reason, kw
        chunks = list(client.completions.create(model=cluster.model, prompt=SHORT, temperature=kw["temperature"],
                                                max_tokens=kw["max_tokens"], seed=kw.get("seed"), stop=kw.get("stop"),
                                                stream=True, extra_body=extra))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text, kw
    assert " <|" in reference(llm, ids, **cases[3]).text  # the mix did set special tokens apart
    # truncate_prompt_tokens: the last 8 tokens of the prompt, on both prefill paths' worth of prompt.
    long_ids = tok.encode(LONG)
    ref = reference(llm, long_ids[-8:], **greedy)
    out = client.completions.create(model=cluster.model, prompt=LONG, extra_body={"truncate_prompt_tokens": 8,
                                                                               "ignore_eos": True},
                                    temperature=0, max_tokens=12)
    assert out.choices[0].text == ref.text and out.usage.prompt_tokens == 8
    assert cluster.wait_all_free()


def test_usage_details_continuous_stats_and_neutral_openai_fields(cluster):
    client = cluster.client()
    stream = client.chat.completions.create(
        model=cluster.model, messages=[{"role": "developer", "content": "terse"}, {"role": "user", "content": SHORT}],
        max_completion_tokens=6, temperature=0, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        store=False, service_tier="auto", metadata={"team": "a"}, user="u1", safety_identifier="s1",
        prompt_cache_key="k", modalities=["text"], parallel_tool_calls=True)
    chunks = list(stream)
    assert all(c.usage is not None for c in chunks)  # continuous: every chunk has the usage so far
    assert [c.usage.completion_tokens for c in chunks if c.choices][0] == 0  # the role chunk
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens % 16 == 0  # whole blocks (see the next test)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=cluster.model, messages=[{"role": "user", "content": "x"}], store=True)
    assert e.value.body["param"] == "store" and e.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=cluster.model, prompt="x", extra_body={"frobnicate": 1})
    assert e.value.body["param"] == "frobnicate"


def test_cached_tokens_are_the_prefix_cache_hits_of_the_workers(cluster):
    """usage.prompt_tokens_details.cached_tokens: 0 for a new prompt, whole blocks for the
    same prompt again (whichever worker computed it), the prompt once for n > 1, and the
    sum over several prompts, streamed or not."""
    client = cluster.client()
    prompt = "Cached tokens through the gateway. " + LONG  # remote prefill the first time
    other = "Another prompt for the cached token count. " + LONG
    num_prompt = len(cluster.tokenizer.encode(prompt))
    assert num_prompt >= DISAGG_THRESHOLD

    def cached(p, temperature=0.0, **kw) -> int:
        out = client.completions.create(model=cluster.model, prompt=p, max_tokens=2, temperature=temperature, **kw)
        return out.usage.prompt_tokens_details.cached_tokens

    assert cached(prompt) == 0
    hit = cached(prompt)
    assert 0 < hit < num_prompt and hit % 16 == 0
    assert cached(prompt, n=3, seed=5, temperature=1.0) == hit
    assert cached([prompt, other]) == hit  # `other` is new
    hit_other = cached(other)
    assert hit_other > 0 and hit_other % 16 == 0
    stream = client.completions.create(model=cluster.model, prompt=[other, prompt], max_tokens=2, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    assert list(stream)[-1].usage.prompt_tokens_details.cached_tokens == hit + hit_other
    assert cluster.wait_all_free()


def test_cache_salt_keeps_tenants_apart_on_the_worker_and_in_the_router_index(cluster):
    """Same prompt, two salts: no prefix hit across salts, a hit within one; and the
    router's index, fed by the worker's KV events, finds the block only under its salt."""
    prompt = list(range(3000, 3020))  # one full block, below the remote-prefill threshold
    index = cluster.apps[0].state.gateway.router.index
    body = {"model": cluster.model, "prompt": prompt, "max_tokens": 1}

    def hits() -> int:
        return cluster.d.stats().prefix_cache_hit_tokens

    def run(salt: str | None) -> int:
        before = hits()
        r = httpx.post(cluster.url + "/v1/completions", json={**body, "cache_salt": salt}, timeout=30)
        assert r.status_code == 200, r.text
        return hits() - before

    assert run("tenant-a") == 0
    assert run("tenant-b") == 0 and run(None) == 0
    assert run("tenant-a") == 16 and run("tenant-b") == 16 and run(None) == 16

    def indexed(salt: str | None) -> dict:
        return index.match(block_hashes(prompt, 16, cache_salt_keys(salt)), precise_only=True)

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(indexed(s) for s in ("tenant-a", "tenant-b", None)):
        time.sleep(0.05)
    assert indexed("tenant-a") == indexed("tenant-b") == indexed(None) == {"d0": 1}
    assert indexed("tenant-c") == {}
    assert cluster.wait_all_free()


def test_tokenize_and_detokenize_with_the_real_tokenizer(cluster):
    url, tok = cluster.url, cluster.tokenizer
    r = httpx.post(url + "/tokenize", json={"model": cluster.model, "prompt": SHORT, "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode(SHORT) and r["count"] == len(r["tokens"])
    assert r["token_strs"][1:] == [tok.convert_ids_to_tokens([t])[0] for t in r["tokens"][1:]]
    messages = [{"role": "user", "content": SHORT}]
    r = httpx.post(url + "/tokenize", json={"messages": messages}).json()
    assert r["tokens"] == tok.encode_chat(messages) and r["max_model_len"] > r["count"]
    back = httpx.post(url + "/detokenize", json={"tokens": tok.encode(SHORT)}).json()["prompt"]
    assert back == tok.decode(tok.encode(SHORT), skip_special_tokens=False)
