"""Structured outputs in the engine: every kind of grammar, with sampling, on the tiny
random-weight model (only the grammar can make its output match), n > 1, P -> D, abort,
and the compile cache. Every test ends with every KV block and every matcher back."""

from __future__ import annotations

import json
import re

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.sampling_params import StructuredOutput
from pdserve.engine.structured_output import GrammarConstraint, Grammars, check
from pdserve.engine.tiny_model import make_tiny_model
from pdserve.engine.tokenizer import Tokenizer

pytestmark = pytest.mark.integration

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


def person_ok(obj) -> bool:
    return (isinstance(obj, dict) and set(obj) == {"name", "age", "tags", "ok"} and isinstance(obj["name"], str)
            and len(obj["name"]) <= 10 and isinstance(obj["age"], int) and 0 <= obj["age"] <= 150
            and all(t in "abc" for t in obj["tags"]) and len(obj["tags"]) <= 3 and isinstance(obj["ok"], bool))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("so") / "tiny-llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    with LLM(str(model_dir), num_kv_blocks=256) as llm:
        yield llm


def all_back(engine: LLMEngine) -> bool:
    s = engine.kv_cache_stats()
    return s.num_free_blocks == s.num_total_blocks and (engine._grammars is None or engine._grammars.num_open == 0)


PROMPTS = ["Hello there", "The answer is", "def f(x):", "Once upon a time"]


def test_json_schema_output_parses_and_validates_for_every_seed(llm):
    so = StructuredOutput("json", json.dumps(PERSON))
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=s, structured_output=so) for s in range(6)]
    outs = llm.generate(PROMPTS[:3] * 2, params)
    for o in outs:
        assert o.finish_reason == "stop", o.text
        assert person_ok(json.loads(o.text)), o.text
        assert " " not in o.text.replace('" "', "").split('"name"')[0]  # compact: no whitespace between tokens
    assert all_back(llm.engine)


def test_unconstrained_output_does_not_parse(llm):
    """The control: without the grammar the random model does not write JSON."""
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=30, temperature=1.0, seed=0))
    for o in outs:
        with pytest.raises(ValueError):
            json.loads(o.text)


@pytest.mark.parametrize("kind,spec,ok", [
    ("regex", r"[a-z]{2,5}-[0-9]{2}", lambda t: re.fullmatch(r"[a-z]{2,5}-[0-9]{2}", t)),
    ("choice", json.dumps(["yes", "no", "maybe so", "naïve ✓"]), lambda t: t in {"yes", "no", "maybe so", "naïve ✓"}),
    ("grammar", 'root ::= "(" [0-9] [0-9]? ("+" [0-9])? ")"', lambda t: re.fullmatch(r"\(\d\d?(\+\d)?\)", t)),
    ("grammar", 'start: "x" NUM ("," NUM)?\nNUM: /[0-9]{1,3}/', lambda t: re.fullmatch(r"x\d{1,3}(,\d{1,3})?", t)),
    ("json_object", "", lambda t: isinstance(json.loads(t), dict)),
], ids=["regex", "choice", "gbnf", "lark", "json_object"])
def test_every_kind_constrains_sampled_output(llm, kind, spec, ok):
    so = StructuredOutput(kind, spec)
    params = [SamplingParams(max_tokens=60, temperature=1.0, top_p=0.95, seed=s, structured_output=so)
              for s in range(4)]
    outs = llm.generate(PROMPTS, params)
    for o in outs:
        if kind == "json_object" and o.finish_reason == "length":
            continue  # an object may be unbounded; a cut one is still a prefix
        assert o.finish_reason == "stop" and ok(o.text), (o.finish_reason, o.text)
    assert all_back(llm.engine)


def test_greedy_and_penalties_compose_with_the_grammar(llm):
    so = StructuredOutput("regex", r"(ab|cd|ef){3,6}")
    params = [SamplingParams(max_tokens=30, temperature=0.0, structured_output=so),
              SamplingParams(max_tokens=30, temperature=0.8, seed=2, presence_penalty=2.0, logit_bias={5: 50.0},
                             structured_output=so)]
    for o in llm.generate(PROMPTS[:2], params):
        assert o.finish_reason == "stop" and re.fullmatch(r"(ab|cd|ef){3,6}", o.text), o.text


def test_max_tokens_cuts_with_length(llm):
    so = StructuredOutput("json", json.dumps(PERSON))
    (o,) = llm.generate(["x"], SamplingParams(max_tokens=5, temperature=1.0, seed=1, structured_output=so))
    assert o.finish_reason == "length" and len(o.token_ids) == 5 and o.text.startswith('{"name":"')
    assert all_back(llm.engine)


def test_ignore_eos_still_ends_when_the_grammar_does(llm):
    so = StructuredOutput("choice", json.dumps(["alpha", "beta"]))
    (o,) = llm.generate(["x"], SamplingParams(max_tokens=50, ignore_eos=True, temperature=1.0, seed=4,
                                              structured_output=so))
    assert o.finish_reason == "stop" and o.text in ("alpha", "beta")


def test_n_siblings_each_follow_their_own_matcher(llm):
    so = StructuredOutput("json", json.dumps(PERSON))
    (out,) = llm.generate(["Hello"], SamplingParams(n=4, max_tokens=120, temperature=1.0, seed=9, structured_output=so))
    texts = [c.text for c in out.outputs]
    assert all(c.finish_reason == "stop" and person_ok(json.loads(c.text)) for c in out.outputs), texts
    assert len(set(texts)) > 1  # distinct draws, each valid
    assert all_back(llm.engine)


def test_bad_specs_are_value_errors_naming_the_problem(llm):
    cases = [("json", "{", "not valid JSON"), ("json", '{"type": "frob"}', "frob"), ("json", "[1]", "object"),
             ("regex", "a(b", "unclosed group"), ("grammar", "root ::= (", "GBNF"),
             ("choice", "[]", "non-empty"), ("choice", '["a", 3]', "strings")]
    for kind, spec, message in cases:
        so = StructuredOutput(kind, spec)
        with pytest.raises(ValueError, match=re.escape(message)):
            llm.generate(["x"], SamplingParams(structured_output=so))
        with pytest.raises(ValueError, match=re.escape(message)):
            check(so)  # the gateway's check, without a tokenizer, says the same
    assert llm.engine.request_ids() == [] and all_back(llm.engine)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_output=StructuredOutput("json_object"))


def test_abort_mid_generation_frees_blocks_and_matchers(model_dir):
    engine = LLMEngine(EngineConfig(model=ModelConfig.from_dir(model_dir), cache=CacheConfig(num_blocks=64)),
                       Tokenizer.from_dir(model_dir))
    so = StructuredOutput("json", json.dumps({"type": "array", "items": {"type": "integer"}}))
    engine.add_request("a", "Hello there", SamplingParams(n=3, max_tokens=200, temperature=1.0, seed=1,
                                                          structured_output=so))
    engine.add_request("b", "Hi", SamplingParams(max_tokens=200, temperature=1.0, seed=2, structured_output=so))
    for _ in range(4):
        engine.step()
    assert engine.grammars.num_open == 4
    engine.abort_request("a")
    engine.abort_request("b")
    assert all_back(engine)
    engine.shutdown()


def test_prefill_worker_first_token_is_constrained_and_decode_resumes(model_dir):
    """P -> D in one process: the prefill engine samples the first token under the
    grammar, the decode engine's matcher accepts it and goes on: the output equals a
    single engine's, token for token (seeded sampling)."""
    from test_disagg_engine import Pair  # noqa: PLC0415 - the in-process P -> D harness

    so = StructuredOutput("json", json.dumps(PERSON))
    params = SamplingParams(n=2, max_tokens=120, temperature=1.0, seed=21, structured_output=so)
    with LLM(str(model_dir), num_kv_blocks=64) as llm:
        ref = llm.generate(PROMPTS[:2], params)
    pair = Pair(model_dir)
    pair.p.tokenizer = pair.d.tokenizer = Tokenizer.from_dir(model_dir)
    pair.run_prompts(PROMPTS[:2], params)
    for i, out in enumerate(ref):
        for j, c in enumerate(out.outputs):
            assert pair.tokens(f"{i}#{j}", j) == c.token_ids
            assert person_ok(json.loads(c.text))
    assert all_back(pair.p) and all_back(pair.d)


def test_compile_cache_and_batched_masks(model_dir):
    tok = Tokenizer.from_dir(model_dir)
    grammars = Grammars(tok.to_json(), 8192, tok.eos_token_ids)
    so = StructuredOutput("json", json.dumps(PERSON))
    first = grammars._compiled(so)
    assert grammars._compiled(StructuredOutput("json", json.dumps(PERSON))) is first  # compiled once
    constraints = [grammars.constraint(so) for _ in range(5)]
    prefix = tok.encode('{"name":"ab', add_special_tokens=False)
    for c in constraints[::2]:
        c.catch_up(prefix)
    one = torch.zeros(5, 256, dtype=torch.int32)
    for row, c in enumerate(constraints):
        c.fill_bitmask(one[row])
    batch = torch.zeros(5, 256, dtype=torch.int32)
    GrammarConstraint.fill_bitmasks([(c, row) for row, c in enumerate(constraints)], batch)
    assert torch.equal(one, batch) and not torch.equal(one[0], one[1])
    for c in constraints:
        c.close()
    assert grammars.num_open == 0


@pytest.mark.parametrize("mode,accepted,refused", [
    ("optional", ['<think>\nsome thought\n</think>\n\n{"a":5}', '{"a":5}', "<think>x</think>{\"a\":1}"],
     ['thought</think>{"a":1}', '<think>x</think>nope']),
    ("open", ['some thought\n</think>\n\n{"a":5}', '<think>x</think>{"a":2}'],
     ['{"a":5', 'x</think>{"a":"no"}']),
], ids=["qwen3-optional", "r1-open"])
def test_reasoning_modes_let_the_model_think_before_the_grammar(model_dir, mode, accepted, refused):
    tok = Tokenizer.from_dir(model_dir)
    grammars = Grammars(tok.to_json(), 8192, tok.eos_token_ids)
    so = StructuredOutput("json", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                                              "required": ["a"], "additionalProperties": False}), reasoning=mode)
    check(so)
    for text in accepted:
        c = grammars.constraint(so)
        c.catch_up(tok.encode(text, add_special_tokens=False))
        assert c.matcher.is_accepting(), text
        c.close()
    for text in refused:
        c = grammars.constraint(so)
        ids = tok.encode(text, add_special_tokens=False)
        with pytest.raises(ValueError):
            c.catch_up(ids)
            if not c.matcher.is_accepting():  # a prefix the grammar allows but cannot end on
                raise ValueError("not accepting")
        c.close()
    # The plain grammar is a different cache entry: no thinking allowed there.
    plain = grammars.constraint(StructuredOutput("json", so.spec))
    with pytest.raises(ValueError):
        plain.catch_up(tok.encode("<think>", add_special_tokens=False))
    plain.close()
    assert grammars.num_open == 0
