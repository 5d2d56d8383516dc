"""Tests for pdserve.router.tools (validation, forced choices) and pdserve.router.tool_parsers
(forced outputs, the auto parsers, streaming)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from typing import Any

import pytest

from pdserve.router.errors import APIError
from pdserve.router.tool_parsers import (
    TOOL_PARSERS,
    ToolCall,
    ToolStream,
    calls_from_forced_output,
    get_tool_parser,
    new_call_id,
    parse_output,
    tool_stream,
)
from pdserve.router.tools import (
    MAX_TOOLS,
    ChoiceMode,
    Tool,
    ToolChoice,
    forced_schema,
    parse_tool_choice,
    parse_tools,
    tool_calls_for_template,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
NO_ARGS = {"type": "function", "function": {"name": "now"}}


def fn(name: str, **extra: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **extra}}


def api_error(call: Any, *args: Any, **kwargs: Any) -> APIError:
    with pytest.raises(APIError) as info:
        call(*args, **kwargs)
    assert info.value.status == 400
    return info.value


# -- validation -----------------------------------------------------------------------


def test_parse_tools_normalizes() -> None:
    tools = parse_tools([WEATHER, NO_ARGS, {"function": {"name": "x-Y_9", "strict": True}}])
    assert [t.name for t in tools] == ["get_weather", "now", "x-Y_9"]
    assert tools[0].description == "Weather of a city" and tools[1].description is None
    assert tools[1].parameters == {"type": "object", "properties": {}}
    assert tools[2].strict is True and tools[0].strict is None
    assert tools[0].to_template() == WEATHER
    assert tools[1].to_template() == {"type": "function", "function": {
        "name": "now", "parameters": {"type": "object", "properties": {}}}}
    assert parse_tools(None) == []


@pytest.mark.parametrize("tools, param", [
    ({"type": "function"}, "tools"),
    ([], "tools"),
    ([fn(f"f{i}") for i in range(MAX_TOOLS + 1)], "tools"),
    ([NO_ARGS, "get_weather"], "tools[1]"),
    ([{"type": "custom", "function": {"name": "a"}}], "tools[0].type"),
    ([{"type": "function"}], "tools[0].function"),
    ([{"type": "function", "function": "a"}], "tools[0].function"),
    ([fn("has space")], "tools[0].function.name"),
    ([fn("")], "tools[0].function.name"),
    ([fn("a" * 65)], "tools[0].function.name"),
    ([fn("é")], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": 5}}], "tools[0].function.name"),
    ([NO_ARGS, WEATHER, NO_ARGS], "tools[2].function.name"),
    ([fn("a", description=3)], "tools[0].function.description"),
    ([fn("a", parameters=[])], "tools[0].function.parameters"),
    ([fn("a", parameters={"type": "string"})], "tools[0].function.parameters"),
    ([fn("a", strict="yes")], "tools[0].function.strict"),
])
def test_parse_tools_errors_name_the_param(tools: Any, param: str) -> None:
    assert api_error(parse_tools, tools).param == param


def test_parse_tools_bounds() -> None:
    assert len(parse_tools([fn(f"f{i}") for i in range(MAX_TOOLS)])) == MAX_TOOLS
    assert len(parse_tools([fn("a" * 64)])[0].name) == 64
    err = api_error(parse_tools, [NO_ARGS, NO_ARGS])
    assert "duplicate" in err.message and "'now'" in err.message


def test_parse_tool_choice() -> None:
    tools = parse_tools([WEATHER, NO_ARGS])
    assert parse_tool_choice(None, tools) == ToolChoice(ChoiceMode.AUTO)
    assert parse_tool_choice(None, []) == ToolChoice(ChoiceMode.NONE)
    assert parse_tool_choice("none", []) == ToolChoice(ChoiceMode.NONE)
    assert parse_tool_choice("none", tools).mode is ChoiceMode.NONE
    assert parse_tool_choice("auto", tools).mode is ChoiceMode.AUTO
    required = parse_tool_choice("required", tools)
    assert required.mode is ChoiceMode.REQUIRED and required.is_forced
    named = parse_tool_choice({"type": "function", "function": {"name": "now"}}, tools)
    assert named == ToolChoice(ChoiceMode.NAMED, "now") and named.is_forced
    assert not parse_tool_choice("auto", tools).is_forced


@pytest.mark.parametrize("choice", [
    "any", "named", "", 5, True, [], {"type": "function"}, {"type": "function", "function": {}},
    {"type": "function", "function": {"name": 3}}, {"type": "allowed_tools", "function": {"name": "now"}},
    {"type": "function", "function": {"name": "missing"}},
])
def test_parse_tool_choice_errors(choice: Any) -> None:
    err = api_error(parse_tool_choice, choice, parse_tools([WEATHER, NO_ARGS]))
    assert err.param == "tool_choice"


@pytest.mark.parametrize("choice", ["auto", "required", {"type": "function", "function": {"name": "now"}}])
def test_tool_choice_needs_tools(choice: Any) -> None:
    err = api_error(parse_tool_choice, choice, [])
    assert err.param == "tool_choice" and "tools" in err.message


def test_unknown_parser_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="hermes.*llama3_json.*mistral"):
        get_tool_parser("qwen")
    assert sorted(TOOL_PARSERS) == ["hermes", "llama3_json", "mistral"]
    assert all(get_tool_parser(name).name == name for name in TOOL_PARSERS)


def test_call_ids_and_openai_shape() -> None:
    ids = {new_call_id() for _ in range(100)}
    assert len(ids) == 100 and all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)
    call = ToolCall("call_x", "f", '{"a":1}')
    assert call.to_openai() == {"id": "call_x", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}


# -- forced choices --------------------------------------------------------------------


def test_forced_schema_shapes() -> None:
    tools = parse_tools([WEATHER, NO_ARGS])
    assert forced_schema(tools, ToolChoice(ChoiceMode.NONE)) is None
    assert forced_schema(tools, ToolChoice(ChoiceMode.AUTO)) is None
    assert forced_schema(tools, ToolChoice(ChoiceMode.NAMED, "get_weather")) == WEATHER["function"]["parameters"]
    schema = forced_schema(tools, ToolChoice(ChoiceMode.REQUIRED), parallel_tool_calls=True)
    assert schema is not None
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    items = schema["items"]["anyOf"]
    assert [i["properties"]["name"] for i in items] == [{"const": "get_weather"}, {"const": "now"}]
    assert items[0]["properties"]["parameters"] == WEATHER["function"]["parameters"]
    assert all(i["required"] == ["name", "parameters"] and i["additionalProperties"] is False for i in items)
    one = forced_schema(tools[:1], ToolChoice(ChoiceMode.REQUIRED), parallel_tool_calls=False)
    assert one is not None and one["maxItems"] == 1 and one["items"]["properties"]["name"] == {"const": "get_weather"}


def test_forced_schema_hoists_definitions() -> None:
    point = {"type": "object", "properties": {"x": {"type": "number"}}}
    a = fn("a", parameters={"type": "object", "properties": {"p": {"$ref": "#/$defs/Point"}}, "$defs": {"Point": point}})
    b = fn("b", parameters={"type": "object", "properties": {"q": {"$ref": "#/$defs/Point"}}, "$defs": {"Point": point}})
    tools = parse_tools([a, b])
    schema = forced_schema(tools, ToolChoice(ChoiceMode.REQUIRED))
    assert schema is not None and schema["$defs"] == {"Point": point}
    assert all("$defs" not in i["properties"]["parameters"] for i in schema["items"]["anyOf"])
    assert "$defs" in tools[0].parameters  # the request's schema is left as it was
    clash = fn("c", parameters={"type": "object", "$defs": {"Point": {"type": "string"}}})
    assert api_error(forced_schema, parse_tools([a, clash]), ToolChoice(ChoiceMode.REQUIRED)).param == "tools"


def test_forced_schemas_compile_and_constrain(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The engine's grammar accepts the required array with the name first, and nothing else."""
    from pdserve.engine.sampling_params import StructuredOutput
    from pdserve.engine.structured_output import Grammars, check
    from pdserve.engine.tiny_model import ensure_tiny_model
    from pdserve.engine.tokenizer import Tokenizer

    model_dir = ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny_model")
    tok = Tokenizer.from_dir(model_dir)
    assert tok is not None
    grammars = Grammars((model_dir / "tokenizer.json").read_text(), tok.vocab_size, tok.eos_token_ids)
    tools = parse_tools([WEATHER, NO_ARGS])
    required = StructuredOutput("json", json.dumps(forced_schema(tools, ToolChoice(ChoiceMode.REQUIRED))))
    check(required)
    check(StructuredOutput("json", json.dumps(forced_schema(tools, ToolChoice(ChoiceMode.NAMED, "now")))))

    def accepts(text: str) -> bool:
        constraint = grammars.constraint(required)
        try:
            for token_id in tok.encode(text, add_special_tokens=False):
                constraint.accept_token(token_id)
            return True
        except ValueError:
            return False
        finally:
            constraint.close()

    good = '[{"name":"get_weather","parameters":{"city":"Paris"}},{"name":"now","parameters":{}}]'
    assert accepts(good)
    calls = calls_from_forced_output(good, tools, ToolChoice(ChoiceMode.REQUIRED))
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city":"Paris"}'), ("now", "{}")]
    assert not accepts('[{"parameters":{},"name":"now"}]')
    assert not accepts('[{"name":"later","parameters":{}}]')
    assert not accepts('[{"name":"get_weather","parameters":{"city":3}}]')


def test_calls_from_forced_output() -> None:
    tools = parse_tools([WEATHER, NO_ARGS])
    named = ToolChoice(ChoiceMode.NAMED, "get_weather")
    [call] = calls_from_forced_output('{ "city" : "Paris" }', tools, named)
    assert call.name == "get_weather" and call.arguments == '{"city":"Paris"}' and call.id.startswith("call_")
    # Cut by max_tokens: the arguments as far as they go.
    [call] = calls_from_forced_output('{"city": "Par', tools, named)
    assert call.arguments == '{"city": "Par'
    required = ToolChoice(ChoiceMode.REQUIRED)
    text = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "now", "parameters": {}}]'
    calls = calls_from_forced_output(text, tools, required)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"}), ("now", {})]
    assert len({c.id for c in calls}) == 2
    partial = calls_from_forced_output('[{"name":"now","parameters":{}},{"name":"get_weather","parameters":{"ci',
                                       tools, required)
    assert [(c.name, c.arguments) for c in partial] == [("now", "{}"), ("get_weather", '{"ci')]
    assert calls_from_forced_output("anything", tools, ToolChoice(ChoiceMode.AUTO)) == []
    assert parse_output(text, required, tools)[0] is None


# -- history ---------------------------------------------------------------------------


def test_tool_calls_for_template() -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": [1, "x"]}'}},
             {"type": "function", "function": {"name": "g", "arguments": "{}"}},
             {"id": "call_3", "function": {"name": "h", "arguments": {"already": "parsed"}}}]
    assert tool_calls_for_template(calls) == [
        {"type": "function", "function": {"name": "f", "arguments": {"a": [1, "x"]}}, "id": "call_1"},
        {"type": "function", "function": {"name": "g", "arguments": {}}},
        {"type": "function", "function": {"name": "h", "arguments": {"already": "parsed"}}, "id": "call_3"},
    ]
    assert tool_calls_for_template([]) == []


@pytest.mark.parametrize("calls, param", [
    ("x", "messages[2].tool_calls"),
    ([5], "messages[2].tool_calls[0]"),
    ([{"type": "function"}], "messages[2].tool_calls[0]"),
    ([{"type": "other", "function": {"name": "f", "arguments": "{}"}}], "messages[2].tool_calls[0]"),
    ([{"type": "function", "function": {"arguments": "{}"}}], "messages[2].tool_calls[0].function.name"),
    ([{"function": {"name": "f", "arguments": "{}"}}, {"function": {"name": "f", "arguments": "{'a': 1}"}}],
     "messages[2].tool_calls[1].function.arguments"),
    ([{"function": {"name": "f", "arguments": "[1]"}}], "messages[2].tool_calls[0].function.arguments"),
    ([{"function": {"name": "f"}}], "messages[2].tool_calls[0].function.arguments"),
])
def test_tool_calls_for_template_errors(calls: Any, param: str) -> None:
    assert api_error(tool_calls_for_template, calls, param="messages[2].tool_calls").param == param


# -- streaming machinery -----------------------------------------------------------------


def random_splits(text: str, rng: random.Random) -> list[list[str]]:
    """The text whole, in 1-character deltas, and in a few random splits."""
    splits = [[text], list(text)]
    for _ in range(3):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
        bounds = [0, *cuts, len(text)]
        splits.append([text[a:b] for a, b in zip(bounds, bounds[1:])])
    return splits


def run_stream(stream: ToolStream, deltas: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """Content and calls from the events, checking OpenAI's delta protocol on the way."""
    content: list[str] = []
    calls: list[dict[str, Any]] = []
    events = [e for d in deltas for e in stream.feed(d)] + stream.finish()
    for event in events:
        if isinstance(event, str):
            assert event, "empty content events are noise"
            content.append(event)
            continue
        index = event["index"]
        if "id" in event:  # the first delta of a call: id, type, name, empty arguments
            assert index == len(calls), "calls are announced once each, in order"
            assert event["type"] == "function" and event["function"]["arguments"] == ""
            assert set(event) == {"index", "id", "type", "function"} and event["id"].startswith("call_")
            calls.append({"id": event["id"], "name": event["function"]["name"], "arguments": ""})
        else:
            assert set(event) == {"index", "function"} and set(event["function"]) == {"arguments"}
            assert index == len(calls) - 1, "fragments belong to the latest call"
            assert event["function"]["arguments"]
            calls[index]["arguments"] += event["function"]["arguments"]
    assert [(c["id"], c["name"], c["arguments"]) for c in calls] == [(c.id, c.name, c.arguments) for c in stream.calls]
    return "".join(content), calls


def check_stream_matches_whole(make_stream: Any, text: str, content: str | None, calls: list[ToolCall],
                               rng: random.Random) -> None:
    for deltas in random_splits(text, rng):
        streamed_content, streamed_calls = run_stream(make_stream(), deltas)
        assert streamed_content == (content or ""), deltas
        assert [c["name"] for c in streamed_calls] == [c.name for c in calls]
        assert [json.loads(c["arguments"]) for c in streamed_calls] == [json.loads(c.arguments) for c in calls]


TRICKY_STRINGS = ["", "plain", 'quote " and \\ backslash', "}]{[ brackets", "</tool_call>", "<tool_call>",
                  "[TOOL_CALLS]", "; semi; colons", "ünïcödé 🙂", "new\nline\ttab", "\\u00e9 escaped", ",:"]


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.choice(["str", "num", "lit", "list", "dict"] if depth < 3 else ["str", "num", "lit"])
    if kind == "str":
        return rng.choice(TRICKY_STRINGS)
    if kind == "num":
        return rng.choice([0, -1, 3.25, 1e-7, 12345678901234])
    if kind == "lit":
        return rng.choice([True, False, None])
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return random_args(rng, depth + 1)


def random_args(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    return {rng.choice(TRICKY_STRINGS[1:]) + str(i): random_json(rng, depth) for i in range(rng.randint(0, 3))}


def dumps(value: Any, rng: random.Random) -> str:
    """JSON as different models and grammars write it."""
    style = rng.randrange(3)
    if style == 0:
        return json.dumps(value, ensure_ascii=False)
    if style == 1:
        return json.dumps(value, separators=(",", ":"))
    return json.dumps(value, indent=2, ensure_ascii=False)


def call_object(name: str, args_key: str, args: dict[str, Any], rng: random.Random) -> str:
    """A call object, the name first or (sometimes) last, sometimes with an extra member."""
    members = [("name", name), (args_key, args)]
    if rng.random() < 0.25:
        members.reverse()
    if rng.random() < 0.2:
        members.insert(rng.randrange(3), ("type", "function"))
    return dumps(dict(members), rng)


NAMES = ["get_weather", "now", "search-web", "f_1"]
CONTENTS = ["", "", "Let me check.\n\n", "I'll call < and <tool the tools:\n", "  ", "[TOOL", "{not a call} "]


def expected(rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    return [(rng.choice(NAMES), random_args(rng)) for _ in range(rng.randint(0, 3))]


def render(parser: str, prefix: str, calls: list[tuple[str, dict[str, Any]]], rng: random.Random) -> tuple[str, str]:
    """An output of ``parser``'s family and its expected content."""
    if parser == "hermes":
        blocks = [f"<tool_call>\n{call_object(n, 'arguments', a, rng)}\n</tool_call>" for n, a in calls]
        text = prefix + rng.choice(["\n", "\n\n", ""]).join(blocks) + rng.choice(["", "\n"])
        return text, text if not calls else prefix if prefix.strip() else ""
    if parser == "mistral":
        if not calls:
            return prefix, prefix
        items = [call_object(n, "arguments", a, rng) for n, a in calls]
        text = prefix + "[TOOL_CALLS]" + rng.choice(["", " "]) + "[" + ", ".join(items) + "]"
        return text, prefix if prefix.strip() else ""
    assert parser == "llama3_json"
    if not calls:
        return prefix, prefix
    key = rng.choice(["parameters", "parameters", "arguments"])
    text = rng.choice(["", "<|python_tag|>", " "]) + "; ".join(call_object(n, key, a, rng) for n, a in calls)
    return text, ""


@pytest.mark.parametrize("parser_name", sorted(TOOL_PARSERS))
def test_auto_parsers_whole_and_streamed(parser_name: str) -> None:
    rng = random.Random(parser_name)
    parser = get_tool_parser(parser_name)
    for _ in range(60):
        calls = expected(rng)
        prefix = rng.choice(CONTENTS) if parser_name != "llama3_json" else ""
        if parser_name == "mistral" and calls and prefix == "[TOOL":
            prefix = ""
        text, content = render(parser_name, prefix, calls, rng)
        got_content, got_calls = parser.extract(text)
        assert got_content == (content or None), text
        assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls, text
        for c in got_calls:  # compact JSON, as the wire carries it
            assert c.arguments == json.dumps(json.loads(c.arguments), ensure_ascii=False, separators=(",", ":"))
        assert len({c.id for c in got_calls}) == len(got_calls)
        check_stream_matches_whole(parser.stream, text, got_content, got_calls, rng)
        choice = ToolChoice(ChoiceMode.AUTO)
        assert [c.name for c in parse_output(text, choice, [], parser)[1]] == [n for n, _ in calls]


@pytest.mark.parametrize("parser_name", sorted(TOOL_PARSERS))
def test_plain_text_is_content(parser_name: str) -> None:
    rng = random.Random(1)
    parser = get_tool_parser(parser_name)
    for text in ["", "Hello!", "  spaced  ", "a < b and [T] and {x}", "<tool", "[TOOL_CALLS", "<|python",
                 "{\"answer\": 42}", "{", "{\"name\": 3, \"parameters\": {}}", "<|python_tag|>brave_search.call(q=1)"]:
        content, calls = parser.extract(text)
        assert (content, calls) == (text or None, []), text
        check_stream_matches_whole(parser.stream, text, content, calls, rng)


def test_forced_streams_match_whole() -> None:
    rng = random.Random(7)
    tools = parse_tools([fn(n) for n in NAMES])
    for _ in range(60):
        name, args = rng.choice(NAMES), random_args(rng)
        named = ToolChoice(ChoiceMode.NAMED, name)
        text = dumps(args, rng)
        calls = calls_from_forced_output(text, tools, named)
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [(name, args)]
        check_stream_matches_whole(lambda: tool_stream(named, tools), text, None, calls, rng)
        required = ToolChoice(ChoiceMode.REQUIRED)
        wanted = [(rng.choice(NAMES), random_args(rng)) for _ in range(rng.randint(1, 3))]
        text = "[" + rng.choice([",", ", "]).join(call_object(n, "parameters", a, rng) for n, a in wanted) + "]"
        calls = calls_from_forced_output(text, tools, required)
        assert [(c.name, json.loads(c.arguments)) for c in calls] == wanted
        check_stream_matches_whole(lambda: tool_stream(required, tools), text, None, calls, rng)


def test_none_and_parserless_auto_are_plain() -> None:
    tools = parse_tools([WEATHER])
    text = '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    for choice in (ToolChoice(ChoiceMode.NONE), ToolChoice(ChoiceMode.AUTO)):
        assert parse_output(text, choice, tools) == (text, [])
        assert run_stream(tool_stream(choice, tools), list(text)) == (text, [])


def test_named_stream_announces_first() -> None:
    tools = parse_tools([WEATHER])
    stream = tool_stream(ToolChoice(ChoiceMode.NAMED, "get_weather"), tools)
    first = stream.feed('{"ci')
    assert first[0]["function"]["name"] == "get_weather" and first[1] == {"index": 0, "function": {"arguments": '{"ci'}}
    assert stream.feed("") == [] and stream.finish() == []
    empty = tool_stream(ToolChoice(ChoiceMode.NAMED, "get_weather"), tools)
    assert [e["function"]["name"] for e in empty.finish()] == ["get_weather"]  # even with no text


def test_required_stream_sends_parameters_as_they_arrive() -> None:
    stream = tool_stream(ToolChoice(ChoiceMode.REQUIRED), parse_tools([WEATHER]))
    assert stream.feed('[{"name":"get_wea') == []
    [announce] = stream.feed('ther",')
    assert announce["function"] == {"name": "get_weather", "arguments": ""}
    assert stream.feed('"parameters":{"city":"Pa') == [{"index": 0, "function": {"arguments": '{"city":"Pa'}}]
    assert stream.feed('ris"}}') == [{"index": 0, "function": {"arguments": 'ris"}'}}]  # not the item's "}"
    assert stream.feed("]") == [] and stream.finish() == [] and not stream.failed


def test_hermes_holds_back_marker_prefixes() -> None:
    stream = get_tool_parser("hermes").stream()
    assert stream.feed("Hello <tool") == ["Hello "]
    assert stream.feed("s> ok <") == ["<tools> ok "]
    assert stream.feed("tool_call>\n{") == []
    assert stream.feed('"name": "f", "arguments": {"a"')[0]["function"]["name"] == "f"
    assert stream.feed(": 1}}\n</tool_") == [{"index": 0, "function": {"arguments": ': 1}'}}]
    assert stream.feed("call>\n\n") == []
    assert stream.finish() == []  # trailing whitespace after a call is not content


def test_hermes_blocks_edge_cases() -> None:
    hermes = get_tool_parser("hermes")
    call = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    # A block whose JSON is broken before the name is known stays content, tags included.
    bad = "<tool_call>\nnot json\n</tool_call>"
    content, calls = hermes.extract(bad + "\n" + call)
    assert content == bad + "\n" and [c.name for c in calls] == ["f"]
    # An unclosed last block counts when its object is complete (cut at the end tag).
    for cut in ("", "\n", "\n</tool_c"):
        content, calls = hermes.extract(call[:call.index("\n</tool_call>")] + cut)
        assert content is None and [c.arguments for c in calls] == ['{"a":1}']
    # Text between and after calls is content; whitespace alone is a separator.
    content, calls = hermes.extract("A" + call + "\n  \n" + call + " B\n")
    assert content == "A B\n" and len(calls) == 2
    # A call without arguments gets an empty object.
    assert hermes.extract('<tool_call>{"name": "now"}</tool_call>')[1][0].arguments == "{}"


def test_malformed_after_the_name_is_content_when_whole() -> None:
    """Once a call's name is streamed it cannot be taken back; a whole output whose call
    then turns out broken is plain content (as vLLM answers it)."""
    cases = {
        "hermes": '<tool_call>\n{"name": "f", "arguments": {"a": 1}} trailing\n</tool_call>',
        "llama3_json": '{"name": "f", "parameters": {"a": 1}} and some prose',
        "mistral": '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}',
    }
    for parser_name, text in cases.items():
        parser = get_tool_parser(parser_name)
        assert parser.extract(text) == (text, []), parser_name
        stream = parser.stream()
        content, calls = run_stream(stream, [text])
        assert stream.failed and [c["name"] for c in calls] == ["f"] and content == ""
    # Arguments the scanner accepts but JSON does not.
    text = '<tool_call>{"name": "f", "arguments": {"a": }}</tool_call>'
    assert get_tool_parser("hermes").extract(text) == (text, [])


def test_llama3_and_mistral_edges() -> None:
    llama = get_tool_parser("llama3_json")
    stream = llama.stream()
    assert stream.feed("  ") == [] and stream.feed("<|py") == []
    assert stream.feed("thon_tag|>{") == []
    assert stream.feed('"name": "f"')[0]["function"]["name"] == "f"
    content, calls = llama.extract(' \n{"name": "f", "parameters": {}};{"name": "g", "arguments": {"x": []}} ;')
    assert content is None and [(c.name, c.arguments) for c in calls] == [("f", "{}"), ("g", '{"x":[]}')]
    assert llama.extract("  hello") == ("  hello", [])
    mistral = get_tool_parser("mistral")
    stream = mistral.stream()
    assert stream.feed("Sure. [TOOL") == ["Sure. "]
    assert stream.feed("_CALLS] [") == []
    assert mistral.extract("[TOOL_CALLS] []") == (None, [])
    assert mistral.extract("[TOOL_CALLS] [] and text") == ("[TOOL_CALLS] [] and text", [])


def test_router_modules_never_import_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "import pdserve.router.tools, pdserve.router.tool_parsers, pdserve.router.reasoning\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_tool_dataclass_is_frozen() -> None:
    tool = parse_tools([WEATHER])[0]
    assert isinstance(tool, Tool)
    with pytest.raises(AttributeError):
        tool.name = "x"  # type: ignore[misc]
