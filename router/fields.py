"""What the gateway does with each field of a request body: honour it, refuse it, or
call it unknown; and the bounds on the decoded JSON itself.

Every request model (``schemas.py``) subclasses :class:`Body` and declares, in its
``FIELDS`` table, a policy for each of its fields (a model whose fields and table
disagree fails at import):

- ``HONOURED``: the server acts on it (or, like ``user``, validates it and needs nothing
  more);
- ``Refused(neutral...)``: known to OpenAI or vLLM, not acted on here. Accepted at null
  and at its neutral values (its default: ``use_beam_search: false``,
  ``service_tier: "auto"``), so clients that send every field at its default keep
  working; any other value is a 400 naming the field. Honouring it later is a one-line
  change: its entry becomes ``HONOURED``.

A field a model does not declare is unknown: accepted as null (clients send explicit
nulls), a 400 ``unknown field 'x'`` otherwise. Nested bodies (``stream_options``,
``messages[i]``, their content parts) are checked the same way, their names given in
full (``messages[0].content[1].cache_control``).

``check_json`` bounds a decoded body before any model sees it: nesting depth, and no
unpaired UTF-16 surrogates (``"\\ud800"`` is valid JSON but no valid text: it could not
be tokenized, nor written back into an error message).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from .errors import invalid

MAX_JSON_DEPTH = 64
"""Deepest nesting of a request body (objects and arrays); OpenAI's bodies need about 8."""


class _Honoured:
    def __repr__(self) -> str:
        return "HONOURED"


HONOURED: Any = _Honoured()
"""The policy of a field the server acts on."""


@dataclass(frozen=True, init=False)
class Refused:
    """The policy of a known field the server does not act on: null and ``neutral``
    values pass, anything else is a 400 saying ``'<field>' <reason>``."""

    neutral: tuple[Any, ...]
    reason: str

    def __init__(self, *neutral: Any, reason: str = "is not supported by this server") -> None:
        object.__setattr__(self, "neutral", neutral)
        object.__setattr__(self, "reason", reason)

    def accepts(self, value: Any) -> bool:
        return value is None or any(_same(value, n) for n in self.neutral)

    def message(self, name: str) -> str:
        accepted = " or ".join(json.dumps(n) for n in (None, *self.neutral))
        return f"'{name}' {self.reason} (accepted: {accepted})"

    def describe(self) -> str:
        """For the OpenAPI document."""
        accepted = ", ".join(json.dumps(n) for n in (None, *self.neutral))
        return f"Not supported by this server: only {accepted} accepted."


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):  # True == 1, but true is no 1
        return a is b
    return a == b


class Body(BaseModel):
    """A request body (or a nested object of one) whose fields all have a policy."""

    model_config = ConfigDict(strict=True, extra="allow", use_attribute_docstrings=True,
                              json_schema_extra={"additionalProperties": False})
    FIELDS: ClassVar[Mapping[str, Any]] = {}
    """Field name -> ``HONOURED`` or ``Refused(...)``, for every field of the model."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        declared, listed = set(cls.model_fields), set(cls.FIELDS)
        if declared != listed:
            raise TypeError(f"{cls.__name__}: fields without a policy {sorted(declared - listed)}, "
                            f"policies without a field {sorted(listed - declared)}")
        bad = [n for n, p in cls.FIELDS.items() if p is not HONOURED and not isinstance(p, Refused)]
        if bad:
            raise TypeError(f"{cls.__name__}: policies must be HONOURED or Refused, not {bad}")

    def check_values(self, where: str) -> None:
        """Model-specific checks, run before the field policies (``where``: the prefix
        naming this object in the body, ``""`` at the top)."""

    def check(self, where: str = "") -> None:
        """Raise a 400 for the first unknown or refused field, here or nested."""
        self.check_values(where)
        for name, value in (self.model_extra or {}).items():
            if value is not None:
                raise invalid(f"unknown field '{where}{name}'", param=f"{where}{name}", code="unknown_parameter")
        for name, policy in self.FIELDS.items():
            if isinstance(policy, Refused) and not policy.accepts(getattr(self, name)):
                raise invalid(policy.message(f"{where}{name}"), param=f"{where}{name}", code="unsupported_parameter")
        for name in self.FIELDS:
            value = getattr(self, name)
            if isinstance(value, Body):
                value.check(f"{where}{name}.")
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, Body):
                        item.check(f"{where}{name}[{i}].")


def check_json(data: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """400 when a decoded body nests deeper than ``max_depth`` or holds a string (key or
    value) with an unpaired surrogate. Iterative: no depth can overflow the stack."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise invalid(f"the request body nests objects and arrays deeper than {max_depth} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key)
                if isinstance(item, (dict, list)):
                    stack.append((item, depth + 1))
                elif isinstance(item, str):
                    _check_text(item)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, (dict, list)):
                    stack.append((item, depth + 1))
                elif isinstance(item, str):
                    _check_text(item)
        elif isinstance(value, str):
            _check_text(value)


def _check_text(text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid("the request body holds a string with an unpaired UTF-16 surrogate (not valid text)") from None


def openapi_schemas(models: Iterable[type[Body]]) -> dict[str, Any]:
    """``components.schemas`` for ``models`` and every model they nest, each refused
    field described as such."""
    out: dict[str, Any] = {}
    seen: dict[str, type[Body]] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
        seen[model.__name__] = model
        for field in model.model_fields.values():
            for nested in _nested_bodies(field.annotation):
                seen.setdefault(nested.__name__, nested)
    for name, model in seen.items():
        props = out.get(name, {}).get("properties", {})
        for field, policy in model.FIELDS.items():
            if isinstance(policy, Refused) and field in props:
                props[field]["description"] = policy.describe()
    return out


def _nested_bodies(annotation: Any) -> list[type[Body]]:
    if isinstance(annotation, type) and issubclass(annotation, Body):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _nested_bodies(arg)]


__all__ = ["HONOURED", "MAX_JSON_DEPTH", "Body", "Refused", "check_json", "openapi_schemas"]
