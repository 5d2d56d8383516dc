"""Agent and JSON traffic through the official openai client, against a single decode
worker and against P/D (prefill worker + decode worker) on both transfer backends.

The model is the tiny random-weight Llama: its free output is never JSON, so a parsed
object or a valid tool call can only come from the grammar (sampled, several seeds).
Prompt scoring (echo + logprobs) must equal the engine's own prompt logprobs. A
schema-constrained stream the client abandons must leave every KV block and every
grammar matcher free on every worker.
"""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from pdserve.deploy.processes import WorkerProcess, wait_all_free
from pdserve.deploy.store.embedded import ControlPlaneServer
from pdserve.engine import LLM, SamplingParams
from pdserve.engine.tiny_model import make_tiny_model
from pdserve.engine.tokenizer import Tokenizer
from pdserve.router.app import ServerThread, create_app
from pdserve.router.gateway import GatewayConfig

pytestmark = pytest.mark.integration

NUM_BLOCKS = 96
# pd-torch_dist is in the heavy tier (pytest -m heavy) for time: the API-level behaviour is
# the transfer backend's no more than pd-nixl's, and torch_dist is covered end to end elsewhere.
MODES = ["single", "pd-nixl", pytest.param("pd-torch_dist", marks=pytest.mark.heavy)]


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=150)
    color: Literal["red", "green", "blue"]
    tags: list[Literal["a", "b", "c"]] = Field(max_length=3)


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 999}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]


def weather_ok(args: dict) -> bool:
    return set(args) == {"city", "unit"} and len(args["city"]) <= 16 and args["unit"] in ("c", "f")


def add_ok(args: dict) -> bool:
    return set(args) == {"a", "b"} and all(isinstance(v, int) and 0 <= v <= 999 for v in args.values())


CHECKS = {"get_weather": weather_ok, "add": add_ok}


class Cluster:
    def __init__(self, mode: str, model_dir, tmp):
        self.mode, self.model_dir = mode, model_dir
        self.model = model_dir.name
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.store = ControlPlaneServer()
        self.store.start()
        backend = mode.split("-")[1] if mode != "single" else "nixl"
        roles = ["decode"] if mode == "single" else ["prefill", "decode"]
        self.workers = [WorkerProcess(role, [
            "--model", str(model_dir), "--store", self.store.url, "--worker-id", f"{role[0]}0",
            "--num-kv-blocks", str(NUM_BLOCKS), "--transfer-backend", backend, "--heartbeat-ttl", "5",
            "--log-level", "WARNING"]) for role in roles]
        self.server = None
        for w in self.workers:
            w.wait_ready()
        # Threshold 0: under P/D every prompt is prefilled on the prefill worker.
        config = GatewayConfig(store_url=self.store.url, model_dir=str(model_dir), disagg_threshold_tokens=0,
                               tool_call_parser="hermes")
        self.server = ServerThread(create_app(config))
        self.client = openai.OpenAI(base_url=self.server.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def all_free(self) -> bool:
        return wait_all_free(self.workers, 20.0)

    def stop(self):
        if self.server is not None:
            self.server.stop()
        for w in reversed(self.workers):
            w.stop()
        self.store.stop()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("agent") / "tiny-llama")


@pytest.fixture(scope="module", params=MODES)
def cluster(request, model_dir, tmp_path_factory):
    c = Cluster(request.param, model_dir, tmp_path_factory)
    try:
        yield c
    finally:
        c.stop()


def test_parse_returns_a_parsed_object_on_every_seed(cluster):
    for seed in range(3):
        out = cluster.client.chat.completions.parse(
            model=cluster.model, messages=[{"role": "user", "content": "Describe someone."}], response_format=Person,
            temperature=1.0, top_p=0.95, seed=seed, max_completion_tokens=200)
        message = out.choices[0].message
        assert out.choices[0].finish_reason == "stop", message.content
        assert isinstance(message.parsed, Person), message.content
    # Control: the same request without the grammar does not parse.
    free = cluster.client.chat.completions.create(model=cluster.model, messages=[{"role": "user", "content": "x"}],
                                                  temperature=1.0, seed=0, max_completion_tokens=40)
    with pytest.raises(ValueError):
        Person.model_validate_json(free.choices[0].message.content)
    assert cluster.all_free()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("tool_choice", ["required", "get_weather", "add"])
def test_forced_tool_calls_then_a_tool_result_turn(cluster, tool_choice, stream):
    choice = tool_choice if tool_choice == "required" else {"type": "function", "function": {"name": tool_choice}}
    kw = dict(model=cluster.model, messages=QUESTION, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False,
              temperature=1.0, seed=7, max_completion_tokens=120)
    if stream:
        calls: dict[int, dict] = {}
        finish = None
        for chunk in cluster.client.chat.completions.create(stream=True, **kw):
            c = chunk.choices[0]
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                if tc.index not in calls:  # OpenAI's order: id and name first, then arguments
                    assert tc.id and tc.function.name and tc.type == "function"
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                else:
                    assert tc.id is None and not tc.function.name
                calls[tc.index]["arguments"] += tc.function.arguments or ""
        tool_calls = [calls[i] for i in sorted(calls)]
    else:
        out = cluster.client.chat.completions.create(**kw)
        finish = out.choices[0].finish_reason
        message = out.choices[0].message
        assert message.content is None
        tool_calls = [{"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments}
                      for tc in message.tool_calls]
    assert finish == "tool_calls" and len(tool_calls) == 1, tool_calls
    call = tool_calls[0]
    if tool_choice != "required":
        assert call["name"] == tool_choice
    assert call["id"].startswith("call_") and CHECKS[call["name"]](json.loads(call["arguments"])), call
    # The tool's answer goes back through the template; the model answers in text.
    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "21 degrees"}]
    after = cluster.client.chat.completions.create(model=cluster.model, messages=history, tools=TOOLS,
                                                   tool_choice="none", max_completion_tokens=8, temperature=0)
    assert after.choices[0].message.tool_calls is None and after.usage.prompt_tokens > 0
    assert cluster.all_free()


def test_echo_logprobs_equal_the_engines_prompt_logprobs(cluster):
    prompt = "Return a new list containing all items from the iterable in ascending order."
    ids = cluster.tokenizer.encode(prompt)
    with LLM(str(cluster.model_dir), num_kv_blocks=64) as llm:
        (ref,) = llm.generate([ids], SamplingParams(prompt_logprobs=2, max_tokens=1, temperature=0))
    out = cluster.client.completions.create(model=cluster.model, prompt=prompt, echo=True, logprobs=2, max_tokens=1,
                                            temperature=0)
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(prompt) and len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(ref.prompt_logprobs[i][ids[i]], abs=1e-4)
        assert lp.tokens[i] == cluster.tokenizer.decode([ids[i]], skip_special_tokens=False)
    # vLLM's prompt_logprobs field carries the same numbers.
    raw = cluster.client.completions.with_raw_response.create(
        model=cluster.model, prompt=prompt, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 2}).http_response
    plp = raw.json()["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for i in range(1, len(ids)):
        assert plp[i][str(ids[i])]["logprob"] == pytest.approx(ref.prompt_logprobs[i][ids[i]], abs=1e-4)
    assert cluster.all_free()


def test_schema_constrained_stream_aborted_mid_way_frees_blocks_and_matchers(cluster):
    schema = {"type": "array", "minItems": 200, "items": {"type": "integer"}}
    stream = cluster.client.chat.completions.create(
        model=cluster.model, messages=[{"role": "user", "content": "Count."}], stream=True, temperature=1.0, seed=3,
        max_completion_tokens=1500, response_format={"type": "json_schema", "json_schema": {"name": "n",
                                                                                            "schema": schema}})
    seen = ""
    for i, chunk in enumerate(stream):
        seen += chunk.choices[0].delta.content or "" if chunk.choices else ""
        if i == 6:
            break
    stream.close()
    assert seen.startswith("[")
    assert cluster.all_free()


def test_p_d_modes_really_prefilled_remotely(cluster):
    if cluster.mode == "single":
        pytest.skip("one worker")
    before = cluster.workers[0].stats().transfer_count
    cluster.client.chat.completions.create(model=cluster.model, messages=QUESTION, max_completion_tokens=4,
                                           response_format={"type": "json_object"}, temperature=0)
    prefill = cluster.workers[0].stats()
    assert prefill.transfer_count > before and prefill.transfer_failures == 0
