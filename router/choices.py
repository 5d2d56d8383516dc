"""A chat choice's output text -> the assistant message: reasoning, content, tool calls.

The text a worker streams is raw model output. With a reasoning parser
(``--reasoning-parser``) its thinking becomes ``reasoning_content``; what follows goes
through the request's tool stream (``tool_parsers.tool_stream``: the forced choices'
JSON, or the ``--tool-call-parser`` family's markers under "auto"), which turns it into
content and OpenAI tool-call deltas. Streamed (``ChatChoiceStream``) and whole
(``chat_message``) answers are the same machine, so they agree. Nothing here imports
torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .reasoning import ReasoningParser
from .tool_parsers import ToolParser, parse_output, tool_stream
from .tools import ChoiceMode, Tool, ToolChoice


@dataclass(frozen=True)
class ChatOutput:
    """How a request's chat choices are read (one per request)."""

    tools: list[Tool] = field(default_factory=list)
    choice: ToolChoice = ToolChoice(ChoiceMode.NONE)
    tool_parser: ToolParser | None = None
    reasoning: ReasoningParser | None = None
    include_reasoning: bool = True
    """False: the reasoning is parsed out and dropped (vLLM's ``include_reasoning``)."""

    @property
    def is_plain(self) -> bool:
        """The text is the content as it is."""
        return self.reasoning is None and (self.choice.mode is ChoiceMode.NONE
                                           or (self.choice.mode is ChoiceMode.AUTO and self.tool_parser is None))


class ChatChoiceStream:
    """One streamed choice: ``feed`` each text delta, ``finish`` once; each returns the
    OpenAI ``delta`` objects to send (``{"content"}``, ``{"reasoning_content"}``,
    ``{"tool_calls": [...]}``), consecutive content merged."""

    def __init__(self, spec: ChatOutput) -> None:
        self.spec = spec
        self._reasoning = spec.reasoning.stream() if spec.reasoning is not None else None
        self._tools = tool_stream(spec.choice, spec.tools, spec.tool_parser)

    @property
    def has_tool_calls(self) -> bool:
        return self._tools.num_calls > 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self._reasoning is None:
            return self._content(self._tools.feed(text) if text else [])
        reasoning, content = self._reasoning.feed(text)
        return self._merge(reasoning, self._tools.feed(content) if content else [])

    def finish(self) -> list[dict[str, Any]]:
        reasoning, content = self._reasoning.finish() if self._reasoning is not None else ("", "")
        events = self._tools.feed(content) if content else []
        return self._merge(reasoning, events + self._tools.finish())

    def _merge(self, reasoning: str, events: list) -> list[dict[str, Any]]:
        out = [{"reasoning_content": reasoning}] if reasoning and self.spec.include_reasoning else []
        return out + self._content(events)

    @staticmethod
    def _content(events: list) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for e in events:
            if isinstance(e, str):
                if out and "content" in out[-1]:
                    out[-1]["content"] += e
                elif e:
                    out.append({"content": e})
            elif out and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(e)
            else:
                out.append({"tool_calls": [e]})
        return out


def chat_message(spec: ChatOutput, text: str) -> dict[str, Any]:
    """The whole assistant message of a choice whose output is ``text``."""
    reasoning = None
    content: str | None = text
    if spec.reasoning is not None:
        reasoning, content = spec.reasoning.split(text)
    message: dict[str, Any] = {"role": "assistant"}
    calls: list = []
    if not spec.is_plain and content is not None:
        content, calls = parse_output(content, spec.choice, spec.tools, spec.tool_parser)
    message["content"] = content if content is not None or calls else ""
    if spec.reasoning is not None and spec.include_reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [c.to_openai() for c in calls]
    return message


__all__ = ["ChatChoiceStream", "ChatOutput", "chat_message"]
