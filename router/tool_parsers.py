"""OpenAI tool calling at the gateway, output side: the tool calls in a completion's text.

Every ``tool_choice`` mode has one streaming interface, ``ToolStream`` (``tool_stream``):
text deltas in, content text and OpenAI's tool-call deltas out. Forced choices read the
JSON that ``tools.forced_schema`` made the engine write (``NamedStream``, ``RequiredStream``;
``calls_from_forced_output`` for a whole output); "auto" uses the parser of the model's
family (``TOOL_PARSERS``: hermes, llama3_json, mistral), which finds the calls among
content by their markers; "none" is plain content. ``parse_output`` reads a whole output
by feeding the same machine in one piece, so streamed and whole answers agree. All of
them share one incremental JSON scanner (``_CallScanner``).

A call's arguments are streamed as the raw text of its arguments object as the model
wrote it; a whole output's calls carry the same JSON re-serialized compactly.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Union

from .tools import ChoiceMode, Tool, ToolChoice, find_tool

Event = Union[str, dict[str, Any]]
"""What a ``ToolStream`` emits: content text (``str``), or one tool-call delta in OpenAI's
streaming shape: ``{"index", "id", "type": "function", "function": {"name", "arguments": ""}}``
first for each call, then ``{"index", "function": {"arguments": fragment}}``."""


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """OpenAI's form: "call_" and 24 random alphanumerics."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    """JSON text of the arguments object."""
    type: str = "function"

    def to_openai(self) -> dict[str, Any]:
        """The entry of a response message's ``tool_calls``."""
        return {"id": self.id, "type": self.type, "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class _Call:
    """A call as it streams: announced once its name is known, arguments appended."""

    index: int
    name: str
    id: str = field(default_factory=new_call_id)
    argument_parts: list[str] = field(default_factory=list)

    @property
    def arguments(self) -> str:
        return "".join(self.argument_parts)

    def announce(self) -> dict[str, Any]:
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": ""}}

    def fragment(self, text: str) -> dict[str, Any]:
        self.argument_parts.append(text)
        return {"index": self.index, "function": {"arguments": text}}


def _whole_call(call: _Call) -> ToolCall:
    """The finished call; parseable arguments re-serialized compactly, others as written."""
    try:
        arguments = _compact(json.loads(call.arguments))
    except json.JSONDecodeError:
        arguments = call.arguments
    return ToolCall(call.id, call.name, arguments)


class _Layout(Enum):
    ONE = "one"  # a single object (hermes: inside its tags)
    ARRAY = "array"  # [obj, obj, ...] (required, mistral)
    SEMICOLON = "semicolon"  # obj; obj (llama3_json)


_WS = " \t\n\r"
_STRING_SPECIAL = re.compile(r'["\\]')
_CLOSER = {"}": "{", "]": "["}

# Scanner states outside a call object, then inside one.
_OPEN, _FIRST_ITEM, _ITEM, _AFTER_ITEM, _CLOSED = "open", "first_item", "item", "after_item", "closed"
_MEMBER_OR_END, _MEMBER, _KEY, _COLON, _VALUE_START, _VALUE, _AFTER_VALUE = (
    "member_or_end", "member", "key", "colon", "value_start", "value", "after_value")


class _CallScanner:
    """Reads call objects ``{"name": "f", "<args key>": {...}}`` from JSON text as it arrives.

    Emits a call's id and name once its "name" value is complete, then the raw text of its
    arguments object as fragments (text of the arguments seen before the name is held
    until then). A call object without arguments gets "{}". It tracks string and escape
    state, bracket nesting and the members of each call object, not the full grammar:
    ``failed`` is set at the first character that cannot belong to such calls, and the
    arguments' own JSON is checked by whoever needs it. Calls are appended to the list it
    is given, so several scanners can number calls in one sequence.
    """

    def __init__(self, layout: _Layout, args_keys: tuple[str, ...], calls: list[_Call]) -> None:
        self.layout = layout
        self.args_keys = args_keys
        self.calls = calls
        self.failed = False
        self.num_announced = 0
        self._state = _OPEN
        self._reset_object()

    def _reset_object(self) -> None:
        self._name: str | None = None
        self._has_args = False
        self._call: _Call | None = None
        self._pending_args: list[str] = []
        self._key_parts: list[str] = []
        self._member: str | None = None  # "name", "args" or None (skipped)
        self._value_parts: list[str] = []
        self._stack: list[str] = []
        self._in_string = False
        self._escape = False

    @property
    def closed(self) -> bool:
        """The container is complete (ONE: the object; ARRAY: the array)."""
        return self._state == _CLOSED

    @property
    def is_complete(self) -> bool:
        """The text so far is a complete sequence of calls."""
        if self.failed:
            return False
        if self.layout is _Layout.SEMICOLON:
            return self._state == _AFTER_ITEM or (self._state == _OPEN and self.num_announced > 0)
        return self.closed

    def feed(self, text: str, out: list[Event]) -> int:
        """Scan ``text``; returns how many characters belong to the calls: all of them, or
        up to the end of the container (ONE, ARRAY) or the first that fails."""
        i, n = 0, len(text)
        while i < n and not self.failed and self._state != _CLOSED:
            state = self._state
            if state == _VALUE:
                i = self._value(text, i, out)
                continue
            if state == _KEY:
                i = self._key(text, i)
                continue
            c = text[i]
            if c in _WS:
                i += 1
                continue
            if state == _VALUE_START:
                if self._member == "args" and c != "{":
                    self.failed = True
                    break
                self._state = _VALUE  # the value's first character is scanned as part of it
                continue
            if not self._step(state, c, out):
                self.failed = True
                break
            i += 1
        return i

    def _step(self, state: str, c: str, out: list[Event]) -> bool:
        """One structural character outside strings and values; False if it cannot be there."""
        array = self.layout is _Layout.ARRAY
        if state == _OPEN and c == ("[" if array else "{"):
            if array:
                self._state = _FIRST_ITEM
            else:
                self._begin_object()
        elif state in (_FIRST_ITEM, _ITEM) and c == "{":
            self._begin_object()
        elif state == _FIRST_ITEM and c == "]":
            self._state = _CLOSED
        elif state == _AFTER_ITEM and array and c in ",]":
            self._state = _ITEM if c == "," else _CLOSED
        elif state == _AFTER_ITEM and self.layout is _Layout.SEMICOLON and c == ";":
            self._state = _OPEN
        elif state in (_MEMBER_OR_END, _MEMBER) and c == '"':
            self._key_parts = []
            self._state = _KEY
        elif state == _COLON and c == ":":
            self._state = _VALUE_START
        elif state == _AFTER_VALUE and c == ",":
            self._state = _MEMBER
        elif state in (_MEMBER_OR_END, _AFTER_VALUE) and c == "}":
            return self._end_object(out)
        else:
            return False
        return True

    def _begin_object(self) -> None:
        self._reset_object()
        self._state = _MEMBER_OR_END

    def _key(self, text: str, i: int) -> int:
        n = len(text)
        while i < n:
            if self._escape:
                self._escape = False
                self._key_parts.append(text[i])
                i += 1
                continue
            m = _STRING_SPECIAL.search(text, i)
            end = n if m is None else m.start()
            self._key_parts.append(text[i:end])
            if m is None:
                return n
            i = end + 1
            if text[end] == "\\":
                self._escape = True
                self._key_parts.append("\\")
                continue
            try:
                key = json.loads('"' + "".join(self._key_parts) + '"')
            except json.JSONDecodeError:
                self.failed = True
                return i
            if key == "name" and self._name is None:
                self._member = "name"
            elif key in self.args_keys and not self._has_args:
                self._member = "args"
                self._has_args = True
            else:
                self._member = None
            self._value_parts = []
            self._state = _COLON
            return i
        return i

    def _value(self, text: str, i: int, out: list[Event]) -> int:
        """Scan a member's value from ``i``; returns where scanning stopped."""
        start, n = i, len(text)
        stack = self._stack
        done = False
        while i < n:
            if self._in_string:
                if self._escape:
                    self._escape = False
                    i += 1
                    continue
                m = _STRING_SPECIAL.search(text, i)
                if m is None:
                    i = n
                    break
                i = m.end()
                if m.group() == "\\":
                    self._escape = True
                    continue
                self._in_string = False
                if not stack:
                    done = True
                    break
                continue
            c = text[i]
            if c == '"':
                self._in_string = True
            elif c in "{[":
                stack.append(c)
            elif c in "}]":
                if not stack:  # ends a scalar; the object's "}" is not part of the value
                    done = True
                    break
                if stack.pop() != _CLOSER[c]:
                    self.failed = True
                    return i
                if not stack:
                    i += 1
                    done = True
                    break
            elif not stack and (c == "," or c in _WS):
                done = True
                break
            i += 1
        self._capture(text[start:i], out)
        if done:
            self._end_value(out)
        return i

    def _capture(self, chunk: str, out: list[Event]) -> None:
        if not chunk:
            return
        if self._member == "name":
            self._value_parts.append(chunk)
        elif self._member == "args":
            if self._call is not None:
                out.append(self._call.fragment(chunk))
            else:
                self._pending_args.append(chunk)

    def _end_value(self, out: list[Event]) -> None:
        self._state = _AFTER_VALUE
        if self._member != "name":
            return
        try:
            name = json.loads("".join(self._value_parts))
        except json.JSONDecodeError:
            name = None
        if not isinstance(name, str):
            self.failed = True
            return
        self._name = name
        self._call = _Call(len(self.calls), name)
        self.calls.append(self._call)
        self.num_announced += 1
        out.append(self._call.announce())
        if self._pending_args:
            out.append(self._call.fragment("".join(self._pending_args)))

    def _end_object(self, out: list[Event]) -> bool:
        if self._call is None:
            return False
        if not self._has_args:
            out.append(self._call.fragment("{}"))
        self._state = _CLOSED if self.layout is _Layout.ONE else _AFTER_ITEM
        return True


def _held_suffix_len(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that may be the start of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class _Content:
    """Content text around tool calls. Whitespace that starts a stretch of text is held:
    text after it makes it content; a call after it drops it (the separator between
    calls). At the end it is content only if no call came."""

    def __init__(self) -> None:
        self._held = ""
        self._has_text = False

    def text(self, s: str, out: list[Event]) -> None:
        if self._has_text:
            if s:
                out.append(s)
        elif s.strip(_WS):
            out.append(self._held + s)
            self._held = ""
            self._has_text = True
        else:
            self._held += s

    def call(self) -> None:
        self._held = ""
        self._has_text = False

    def finish(self, out: list[Event], num_calls: int) -> None:
        if self._held and not num_calls:
            out.append(self._held)
        self._held = ""


class ToolStream(ABC):
    """One completion's text in, content text and tool-call deltas out (see ``Event``).

    Call ``feed`` with each text delta, then ``finish`` once. Concatenating the content
    events gives the content, and each call's argument fragments its arguments, whatever
    the split of the text into deltas. Text that may begin a tool-call marker is held
    until it is known not to be one.
    """

    def __init__(self) -> None:
        self._calls: list[_Call] = []
        self.failed = False
        """A call already streamed turned out malformed or truncated (it cannot be taken back;
        ``parse_output`` answers such an output as plain content, as vLLM does)."""

    @abstractmethod
    def feed(self, delta: str) -> list[Event]: ...

    @abstractmethod
    def finish(self) -> list[Event]: ...

    @property
    def calls(self) -> list[ToolCall]:
        """The calls streamed so far, arguments as streamed."""
        return [ToolCall(c.id, c.name, c.arguments) for c in self._calls]

    @property
    def num_calls(self) -> int:
        return len(self._calls)


class PlainStream(ToolStream):
    """tool_choice "none" (or no parser): everything is content."""

    def feed(self, delta: str) -> list[Event]:
        return [delta] if delta else []

    def finish(self) -> list[Event]:
        return []


class NamedStream(ToolStream):
    """A named forced function: the whole output is its arguments."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    def _start(self, out: list[Event]) -> _Call:
        if not self._calls:
            self._calls.append(_Call(0, self._name))
            out.append(self._calls[0].announce())
        return self._calls[0]

    def feed(self, delta: str) -> list[Event]:
        out: list[Event] = []
        call = self._start(out)
        if delta:
            out.append(call.fragment(delta))
        return out

    def finish(self) -> list[Event]:
        out: list[Event] = []
        self._start(out)
        return out


class RequiredStream(ToolStream):
    """tool_choice "required": the output is a JSON array of {"name", "parameters"}."""

    def __init__(self) -> None:
        super().__init__()
        self._scanner = _CallScanner(_Layout.ARRAY, ("parameters",), self._calls)

    def feed(self, delta: str) -> list[Event]:
        out: list[Event] = []
        used = self._scanner.feed(delta, out)
        if self._scanner.closed and delta[used:].strip(_WS):
            self._scanner.failed = True
        return out

    def finish(self) -> list[Event]:
        self.failed = not self._scanner.is_complete
        return []


class _MarkedStream(ToolStream):
    """Content, then a marker, then JSON calls (mistral's ``[TOOL_CALLS]``, llama3's
    ``<|python_tag|>``). The marker and the text after it are held until a call is
    announced; if the text fails before that, all of it is content after all."""

    marker: str
    layout: _Layout
    args_keys: tuple[str, ...]

    def __init__(self) -> None:
        super().__init__()
        self._content = _Content()
        self._buf = ""
        self._raw: list[str] | None = None  # marker and call text, until a call is announced
        self._scanner: _CallScanner | None = None
        self._plain = False  # the calls failed before any was announced: the rest is content

    def _find_start(self, out: list[Event], final: bool) -> None:
        """Text state: stream content up to the marker."""
        j = self._buf.find(self.marker)
        if j < 0:
            keep = 0 if final else _held_suffix_len(self._buf, self.marker)
            self._content.text(self._buf[:len(self._buf) - keep], out)
            self._buf = self._buf[len(self._buf) - keep:]
            return
        self._content.text(self._buf[:j], out)
        self._buf = self._buf[j + len(self.marker):]
        self._start_calls(self.marker)

    def _start_calls(self, raw: str) -> None:
        self._raw = [raw]
        self._scanner = _CallScanner(self.layout, self.args_keys, self._calls)

    def _scan(self, out: list[Event]) -> None:
        scanner = self._scanner
        assert scanner is not None
        before = scanner.num_announced
        events: list[Event] = []
        used = scanner.feed(self._buf, events)
        if before == 0 and scanner.num_announced:
            self._content.call()
        if self._raw is not None:
            self._raw.append(self._buf[:used])
            if scanner.num_announced:
                self._raw = None
        rest = self._buf[used:]
        self._buf = ""
        out.extend(events)
        if scanner.closed and not scanner.failed and rest.strip(_WS):
            scanner.failed = True
        if scanner.failed:
            self._fail(rest, out)

    def _fail(self, rest: str, out: list[Event]) -> None:
        if self._raw is not None:  # nothing announced: it was content all along
            self._plain = True
            self._content.text("".join(self._raw) + rest, out)
            self._raw = None
        else:
            self.failed = True

    def _finish_calls(self, out: list[Event]) -> None:
        scanner = self._scanner
        if scanner is None or scanner.failed:
            return
        if scanner.is_complete:
            self._raw = None
        else:
            self._fail("", out)


class MistralStream(_MarkedStream):
    marker = "[TOOL_CALLS]"
    layout = _Layout.ARRAY
    args_keys = ("arguments",)

    def feed(self, delta: str) -> list[Event]:
        out: list[Event] = []
        if self._plain:
            self._content.text(delta, out)
            return out
        if self.failed:
            return out
        self._buf += delta
        if self._scanner is None:
            self._find_start(out, final=False)
        if self._scanner is not None and self._buf:
            self._scan(out)
        return out

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self._scanner is None:
            self._find_start(out, final=True)
        self._finish_calls(out)
        self._content.finish(out, self.num_calls)
        return out


class Llama3JsonStream(_MarkedStream):
    """The output is calls or content from its first character (after whitespace): calls
    when it begins with ``<|python_tag|>`` or "{"."""

    marker = "<|python_tag|>"
    layout = _Layout.SEMICOLON
    args_keys = ("parameters", "arguments")

    def feed(self, delta: str) -> list[Event]:
        out: list[Event] = []
        if self._plain:
            self._content.text(delta, out)
            return out
        if self.failed:
            return out
        self._buf += delta
        if self._scanner is None:
            self._decide(out, final=False)
        if self._scanner is not None and self._buf:
            self._scan(out)
        return out

    def _decide(self, out: list[Event], final: bool) -> None:
        body = self._buf.lstrip(_WS)
        if not body or (not final and len(body) < len(self.marker) and self.marker.startswith(body)):
            return
        lead = self._buf[:len(self._buf) - len(body)]
        self._content.text(lead, out)
        if body.startswith(self.marker):
            self._buf = body[len(self.marker):]
            self._start_calls(self.marker)
        elif body.startswith("{"):
            self._buf = body
            self._start_calls("")
        else:
            self._plain = True
            self._content.text(body, out)
            self._buf = ""

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self._scanner is None and not self._plain:
            self._decide(out, final=True)
        if self._scanner is None and self._buf:
            self._content.text(self._buf, out)
            self._buf = ""
        self._finish_calls(out)
        self._content.finish(out, self.num_calls)
        return out


class HermesStream(ToolStream):
    """Content with ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks. A
    block that fails before its call is announced is content, tags included."""

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._content = _Content()
        self._buf = ""
        self._scanner: _CallScanner | None = None  # the open block's
        self._raw: list[str] = []  # the open block's text
        self._closing = False  # the block's object is complete; its end tag must follow

    def feed(self, delta: str) -> list[Event]:
        out: list[Event] = []
        self._buf += delta
        while self._buf:
            if self._scanner is None:
                j = self._buf.find(self.START)
                if j < 0:
                    keep = _held_suffix_len(self._buf, self.START)
                    self._content.text(self._buf[:len(self._buf) - keep], out)
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                self._content.text(self._buf[:j], out)
                self._buf = self._buf[j + len(self.START):]
                self._scanner = _CallScanner(_Layout.ONE, ("arguments",), self._calls)
                self._raw = [self.START]
                self._closing = False
            elif not self._block(out):
                break
        return out

    def _block(self, out: list[Event]) -> bool:
        """Advance the open block; False when it needs more text."""
        scanner = self._scanner
        assert scanner is not None
        if not scanner.failed and not self._closing:
            before = scanner.num_announced
            used = scanner.feed(self._buf, out)
            if scanner.num_announced > before:
                self._content.call()
            self._raw.append(self._buf[:used])
            self._buf = self._buf[used:]
            if scanner.closed:
                self._closing = True
            elif not scanner.failed:
                return False
        if not scanner.failed:  # after the object: whitespace, then the end tag
            body = self._buf.lstrip(_WS)
            self._raw.append(self._buf[:len(self._buf) - len(body)])
            self._buf = body
            if body.startswith(self.END):
                self._buf = body[len(self.END):]
                self._end_block(True, out)
                return True
            if self.END.startswith(body):
                return False
            scanner.failed = True
        j = self._buf.find(self.END)  # a failed block ends at the next end tag
        if j < 0:
            keep = _held_suffix_len(self._buf, self.END)
            self._raw.append(self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        self._raw.append(self._buf[:j + len(self.END)])
        self._buf = self._buf[j + len(self.END):]
        self._end_block(False, out)
        return True

    def _end_block(self, ok: bool, out: list[Event]) -> None:
        assert self._scanner is not None
        if not ok:
            if self._scanner.num_announced:
                self.failed = True
            else:
                self._content.text("".join(self._raw), out)
        self._scanner = None
        self._raw = []

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self._scanner is not None:  # an unclosed block: a call if its object is complete
            self._raw.append(self._buf)
            ok = self._closing and not self._scanner.failed  # (then the rest is a part of the end tag)
            self._buf = ""
            self._end_block(ok, out)
        elif self._buf:
            self._content.text(self._buf, out)
            self._buf = ""
        self._content.finish(out, self.num_calls)
        return out


class ToolParser(ABC):
    """Finds tool calls in the free ("auto") output of one model family."""

    name: str

    @abstractmethod
    def stream(self) -> ToolStream:
        """A fresh streaming parser for one completion."""

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole output. Malformed calls (bad JSON, truncated) give no
        calls and the whole text as content."""
        return _parse_whole(self.stream(), text)


class HermesParser(ToolParser):
    """Qwen 2.5/3, Hermes: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``."""

    name = "hermes"

    def stream(self) -> ToolStream:
        return HermesStream()


class Llama3JsonParser(ToolParser):
    """Llama 3.1/3.2 JSON calls: ``{"name": ..., "parameters": {...}}``, several joined by "; ",
    optionally after ``<|python_tag|>`` (a special token: it reaches the parser only when
    the output is detokenized with special tokens)."""

    name = "llama3_json"

    def stream(self) -> ToolStream:
        return Llama3JsonStream()


class MistralParser(ToolParser):
    """Mistral: ``[TOOL_CALLS]`` then a JSON array of ``{"name", "arguments"}`` (the marker is a
    special token too)."""

    name = "mistral"

    def stream(self) -> ToolStream:
        return MistralStream()


TOOL_PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}


def get_tool_parser(name: str) -> ToolParser:
    """The parser registered as ``name``; ValueError listing the known ones otherwise."""
    cls = TOOL_PARSERS.get(name)
    if cls is None:
        raise ValueError(f"unknown tool parser {name!r}; known: {sorted(TOOL_PARSERS)}")
    return cls()


def tool_stream(choice: ToolChoice, tools: Sequence[Tool], parser: ToolParser | None = None) -> ToolStream:
    """The streaming parser of one completion under ``choice``: "auto" uses ``parser``
    (without one, the output is plain content), forced choices read ``tools.forced_schema``'s shape."""
    if choice.mode is ChoiceMode.NAMED:
        return NamedStream(find_tool(tools, choice.name).name)
    if choice.mode is ChoiceMode.REQUIRED:
        return RequiredStream()
    if choice.mode is ChoiceMode.AUTO and parser is not None:
        return parser.stream()
    return PlainStream()


def calls_from_forced_output(text: str, tools: Sequence[Tool], choice: ToolChoice) -> list[ToolCall]:
    """The calls of a whole output produced under ``tools.forced_schema``: NAMED, the text is the
    arguments; REQUIRED, the array's items. A truncated output (``length``) gives what it
    holds: the calls begun so far, the last with its arguments as far as they go."""
    stream = tool_stream(choice, tools)
    stream.feed(text)
    stream.finish()
    return [_whole_call(c) for c in stream.calls]


def parse_output(text: str, choice: ToolChoice, tools: Sequence[Tool],
                 parser: ToolParser | None = None) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole output under ``choice``, as its stream would give them."""
    if choice.is_forced:
        return None, calls_from_forced_output(text, tools, choice)
    return _parse_whole(tool_stream(choice, tools, parser), text)


def _parse_whole(stream: ToolStream, text: str) -> tuple[str | None, list[ToolCall]]:
    events = stream.feed(text) + stream.finish()
    if stream.failed:
        return text or None, []
    calls = []
    for call in stream._calls:
        try:
            arguments = json.loads(call.arguments)
        except json.JSONDecodeError:
            return text or None, []
        if not isinstance(arguments, dict):
            return text or None, []
        calls.append(ToolCall(call.id, call.name, _compact(arguments)))
    content = "".join(e for e in events if isinstance(e, str))
    return content or None, calls
