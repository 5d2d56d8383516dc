"""OpenAI tool calling at the gateway, request side: what a chat request's ``tools`` and
``tool_choice`` say, and what the prompt and the engine are given from them.

1. ``parse_tools`` and ``parse_tool_choice`` validate ``tools`` and ``tool_choice``
   (400 naming the param). ``Tool.to_template`` is what the chat template lists; earlier
   assistant turns' ``tool_calls`` go through ``tool_calls_for_template``.
2. A forced choice ("required", or one named function) becomes a JSON schema
   (``forced_schema``) that the engine applies as a token mask, as vLLM does, so the
   output is well formed by construction. "auto" leaves the model free; "none" is plain
   text.

Reading the calls out of the model's output (streamed or whole) is ``tool_parsers``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .errors import invalid

MAX_TOOLS = 128
"""Entries of ``tools`` (OpenAI documents 128)."""
TOOL_NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Tool:
    """One validated function of ``tools``."""

    name: str
    description: str | None
    parameters: dict[str, Any]
    """A JSON schema of type object (``{"type": "object", "properties": {}}`` when the request had none)."""
    strict: bool | None = None

    def to_template(self) -> dict[str, Any]:
        """The tool as chat templates (and transformers' ``tools=``) take it: OpenAI's shape."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


class ChoiceMode(Enum):
    NONE = "none"
    AUTO = "auto"
    REQUIRED = "required"
    NAMED = "named"


@dataclass(frozen=True)
class ToolChoice:
    mode: ChoiceMode
    name: str | None = None
    """The function of a NAMED choice."""

    @property
    def is_forced(self) -> bool:
        """Whether the output is constrained by ``forced_schema``."""
        return self.mode in (ChoiceMode.REQUIRED, ChoiceMode.NAMED)


def parse_tools(tools: Sequence[Any] | None) -> list[Tool]:
    """Validate OpenAI's ``tools``; None is no tools. Raises ``APIError`` (400) naming the param."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise invalid(f"tools must be an array, got {_short(tools)}", param="tools")
    if not tools:
        raise invalid("tools must not be an empty array; leave it out instead", param="tools")
    if len(tools) > MAX_TOOLS:
        raise invalid(f"tools has {len(tools)} entries; at most {MAX_TOOLS} are allowed", param="tools")
    out: list[Tool] = []
    names: set[str] = set()
    for i, entry in enumerate(tools):
        p = f"tools[{i}]"
        if not isinstance(entry, dict):
            raise invalid(f"{p} must be an object, got {_short(entry)}", param=p)
        if entry.get("type", "function") != "function":
            raise invalid(f"{p}.type must be 'function', got {_short(entry.get('type'))}", param=f"{p}.type")
        fn = entry.get("function")
        if not isinstance(fn, dict):
            raise invalid(f"{p}.function must be an object, got {_short(fn)}", param=f"{p}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME_RE.fullmatch(name):
            raise invalid(f"{p}.function.name must match ^[a-zA-Z0-9_-]{{1,64}}$, got {_short(name)}",
                          param=f"{p}.function.name")
        if name in names:
            raise invalid(f"{p}.function.name: duplicate function name {name!r}", param=f"{p}.function.name")
        names.add(name)
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise invalid(f"{p}.function.description must be a string, got {_short(description)}",
                          param=f"{p}.function.description")
        parameters = fn.get("parameters")
        if parameters is None:  # no arguments
            parameters = {"type": "object", "properties": {}}
        elif not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise invalid(f"{p}.function.parameters must be a JSON schema of type 'object', got {_short(parameters)}",
                          param=f"{p}.function.parameters")
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise invalid(f"{p}.function.strict must be a boolean, got {_short(strict)}", param=f"{p}.function.strict")
        out.append(Tool(name, description, parameters, strict))
    return out


def parse_tool_choice(tool_choice: Any, tools: Sequence[Tool]) -> ToolChoice:
    """Validate ``tool_choice`` against the parsed ``tools``; None is OpenAI's default
    ("auto" with tools, "none" without)."""
    if tool_choice is None:
        return ToolChoice(ChoiceMode.AUTO if tools else ChoiceMode.NONE)
    usage = 'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise invalid(f"{usage}, got {_short(tool_choice)}", param="tool_choice")
        choice = ToolChoice(ChoiceMode(tool_choice))
    elif isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise invalid(f"{usage}, got {_short(tool_choice)}", param="tool_choice")
        if tools and name not in {t.name for t in tools}:
            raise invalid(f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
        choice = ToolChoice(ChoiceMode.NAMED, name)
    else:
        raise invalid(f"{usage}, got {_short(tool_choice)}", param="tool_choice")
    if choice.mode is not ChoiceMode.NONE and not tools:
        raise invalid("tool_choice is only allowed when tools are specified", param="tool_choice")
    return choice


def find_tool(tools: Sequence[Tool], name: str | None) -> Tool:
    """The tool called ``name``; ValueError if there is none."""
    for t in tools:
        if t.name == name:
            return t
    raise ValueError(f"no tool named {name!r}")


_DEFS_KEYS = ("$defs", "definitions")


def forced_schema(tools: Sequence[Tool], choice: ToolChoice, parallel_tool_calls: bool = True) -> dict[str, Any] | None:
    """The JSON schema the output must match under a forced ``choice`` (None otherwise).

    NAMED: the function's ``parameters``; the whole output is the arguments object.
    REQUIRED: an array of ``{"name": <one of the tools>, "parameters": <its schema>}``, at
    least one, at most one unless ``parallel_tool_calls``. Definitions (``$defs``) of the
    functions' schemas move to the root, where their ``#/$defs/...`` references point;
    two functions defining one name differently are a 400.
    """
    if choice.mode is ChoiceMode.NAMED:
        return find_tool(tools, choice.name).parameters
    if choice.mode is not ChoiceMode.REQUIRED:
        return None
    hoisted: dict[str, dict[str, Any]] = {}
    items = []
    for t in tools:
        parameters = dict(t.parameters)
        for key in _DEFS_KEYS:
            defs = parameters.pop(key, None)
            if not isinstance(defs, dict):
                continue
            into = hoisted.setdefault(key, {})
            for def_name, schema in defs.items():
                if def_name in into and into[def_name] != schema:
                    raise invalid(f"tools define {key}/{def_name} differently; tool_choice 'required' needs them to agree",
                                  param="tools")
                into[def_name] = schema
        items.append({"type": "object",
                      "properties": {"name": {"const": t.name}, "parameters": parameters},
                      "required": ["name", "parameters"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "items": items[0] if len(items) == 1 else {"anyOf": items},
                              "minItems": 1}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    schema.update(hoisted)
    return schema


def tool_calls_for_template(tool_calls: Any, *, param: str = "tool_calls") -> list[dict[str, Any]]:
    """An assistant message's OpenAI ``tool_calls`` (arguments as JSON text) in the form chat
    templates take: ``{"id", "type": "function", "function": {"name", "arguments": dict}}``.
    ``param`` prefixes the param of errors (e.g. ``messages[3].tool_calls``)."""
    if not isinstance(tool_calls, list):
        raise invalid(f"{param} must be an array, got {_short(tool_calls)}", param=param)
    out = []
    for j, call in enumerate(tool_calls):
        p = f"{param}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or call.get("type", "function") != "function":
            raise invalid(f"{p} must be an object {{\"type\": \"function\", \"function\": {{...}}}}, got {_short(call)}",
                          param=p)
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise invalid(f"{p}.function.name must be a non-empty string, got {_short(name)}", param=f"{p}.function.name")
        arguments = fn.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise invalid(f"{p}.function.arguments is not valid JSON: {e}", param=f"{p}.function.arguments") from None
        if not isinstance(arguments, dict):
            raise invalid(f"{p}.function.arguments must be a JSON object, got {_short(arguments)}",
                          param=f"{p}.function.arguments")
        entry: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if call.get("id") is not None:
            entry["id"] = call["id"]
        out.append(entry)
    return out
