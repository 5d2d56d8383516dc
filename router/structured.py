"""A request's structured-output fields -> one ``StructuredOutput``, checked at the edge.

Accepted forms, on both endpoints:

- OpenAI's ``response_format``: ``{"type": "text"}`` (nothing), ``{"type":
  "json_object"}``, ``{"type": "json_schema", "json_schema": {"name", "schema",
  "strict"?, "description"?}}``;
- vLLM's ``guided_json`` (a schema, as an object or a JSON string), ``guided_regex``,
  ``guided_choice`` (a list of strings), ``guided_grammar`` (Lark or GBNF/EBNF), and its
  newer ``structured_outputs`` object with one of ``json``, ``regex``, ``choice``,
  ``grammar``, ``json_object``.

At most one of them per request (two would have to be intersected; no client means
that). ``strict`` is accepted either way: the output always follows the schema exactly,
which is what strict asks for. The grammar is validated here with llguidance, without
a tokenizer (no torch in the gateway), so a broken schema, regex or grammar is a 400
naming its field before anything is routed; the worker compiles it against its
vocabulary and caches it.
"""

from __future__ import annotations

import json
from typing import Any

from pdserve.engine.sampling_params import StructuredOutput
from pdserve.engine.structured_output import check

from .schemas import invalid

_VLLM_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_STRUCTURED_OUTPUTS_KEYS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar",
                            "json_object": "json_object"}


def structured_output(req: Any) -> tuple[StructuredOutput | None, str | None]:
    """The request's structured output and the field it came from (None, None without one)."""
    try:
        found = _found(req)
    except ValueError as e:  # StructuredOutput's own bounds (spec length)
        raise invalid(str(e), param="response_format") from None
    if not found:
        return None, None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise invalid(f"only one structured-output field may be set per request, got {names}", param=found[1][0])
    param, so = found[0]
    validate(so, param)
    return so, param


def _found(req: Any) -> list[tuple[str, StructuredOutput]]:
    found: list[tuple[str, StructuredOutput]] = []
    response_format = getattr(req, "response_format", None)
    if response_format is not None:
        so = _from_response_format(response_format)
        if so is not None:
            found.append(("response_format", so))
    for name, kind in _VLLM_FIELDS.items():
        value = getattr(req, name, None)
        if value is not None:
            found.append((name, StructuredOutput(kind, _spec(kind, value, name))))
    outputs = getattr(req, "structured_outputs", None)
    if outputs is not None:
        found.append(("structured_outputs", _from_structured_outputs(outputs)))
    return found


def validate(so: StructuredOutput, param: str) -> None:
    try:
        check(so)
    except ValueError as e:
        raise invalid(f"{param}: {e}", param=param) from None


def _spec(kind: str, value: Any, param: str) -> str:
    """The spec text of ``value`` for ``kind`` (the StructuredOutput form)."""
    try:
        if kind == "json":
            if isinstance(value, str):
                return value  # a schema sent as a string; check() parses it
            if not isinstance(value, (dict, bool)):
                raise invalid(f"{param} must be a JSON schema (an object)", param=param)
            return json.dumps(value)
        if kind == "choice":
            if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
                raise invalid(f"{param} must be a non-empty list of non-empty strings", param=param)
            return json.dumps(value)
        if not isinstance(value, str) or not value:
            raise invalid(f"{param} must be a non-empty string", param=param)
        return value
    except (ValueError, RecursionError) as e:  # json.dumps of something odd
        raise invalid(f"{param}: {e}", param=param) from None


def _from_response_format(rf: Any) -> StructuredOutput | None:
    if not isinstance(rf, dict):
        raise invalid("response_format must be an object", param="response_format")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise invalid("response_format.json_schema must be an object with 'name' and 'schema'",
                          param="response_format")
        name = js.get("name")
        if not isinstance(name, str) or not name:
            raise invalid("response_format.json_schema.name must be a non-empty string", param="response_format")
        schema = js.get("schema", {})  # OpenAI: optional; absent means any JSON
        strict = js.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise invalid("response_format.json_schema.strict must be a boolean", param="response_format")
        return StructuredOutput("json", _spec("json", schema, "response_format"))
    raise invalid(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                  param="response_format")


def _from_structured_outputs(so: Any) -> StructuredOutput:
    if not isinstance(so, dict):
        raise invalid("structured_outputs must be an object", param="structured_outputs")
    set_keys = [k for k, v in so.items() if v is not None and v is not False]
    unknown = [k for k in set_keys if k not in _STRUCTURED_OUTPUTS_KEYS]
    if unknown:
        raise invalid(f"structured_outputs.{unknown[0]} is not supported by this server (supported: "
                      f"{', '.join(_STRUCTURED_OUTPUTS_KEYS)})", param="structured_outputs")
    if len(set_keys) != 1:
        raise invalid("structured_outputs must set exactly one of " + ", ".join(_STRUCTURED_OUTPUTS_KEYS),
                      param="structured_outputs")
    (key,) = set_keys
    kind = _STRUCTURED_OUTPUTS_KEYS[key]
    if kind == "json_object":
        if so[key] is not True:
            raise invalid("structured_outputs.json_object must be true", param="structured_outputs")
        return StructuredOutput("json_object")
    return StructuredOutput(kind, _spec(kind, so[key], "structured_outputs"))


__all__ = ["structured_output", "validate"]
