"""Tool calls: how a chat choice's text becomes OpenAI's ``tool_calls``, in each tool mode
(``ChatCompletionRequest.tool_mode``), streamed as deltas or whole in a reply. In the auto mode the
model writes Hermes-style ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks
(Qwen-family templates, and others that list tools); the named and required modes generate JSON
under a grammar (``ChatCompletionRequest.guided``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cluster.openai.responses import (
    Delta,
    FunctionCall,
    FunctionDelta,
    ToolCall,
    ToolCallDelta,
    new_id,
)

#: The Hermes-style tool-call markup (Qwen-family and other templates that list tools): a JSON
#: object ``{"name": ..., "arguments": {...}}`` between the two tags.
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class Tools:
    """How a chat reply's text becomes tool calls: its mode (named, required or auto) and, named,
    the function's name."""

    mode: str
    named: str | None


def tool_call_head(index: int, name: str) -> Delta:
    """A stream's first delta of a tool call, as OpenAI sends it: its id, type and name, and
    empty arguments (``tool_call_arguments`` deltas follow)."""
    function = FunctionDelta(name=name, arguments="")
    head = ToolCallDelta(index=index, id=new_id("call"), type="function", function=function)
    return Delta(tool_calls=[head])


def tool_call_arguments(index: int, arguments: str) -> Delta:
    """A stream's delta of more of a tool call's arguments (JSON text, in pieces)."""
    return Delta(
        tool_calls=[ToolCallDelta(index=index, function=FunctionDelta(arguments=arguments))]
    )


def emits_hermes_tool_calls(chat_template: str | dict[str, Any] | None) -> bool:
    """Whether a chat template tells the model to answer tools with ``<tool_call>`` blocks."""
    return bool(chat_template) and TOOL_CALL_START in str(chat_template)


def _loads(text: str) -> Any:
    """JSON text's value, or ``_loads`` itself when it is not JSON (deep nesting included)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _loads


def _is_unicode(text: str) -> bool:
    """Whether ``text`` is valid Unicode (JSON's ``\\ud800`` escape decodes to a lone surrogate,
    which no response can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_text(text: str) -> str:
    """JSON text with a lone surrogate in its strings escaped (``\\ud800``): the same value, and
    valid Unicode for the response."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_name(name: Any) -> bool:
    """Whether ``name`` can name a call: a non-empty string of valid Unicode."""
    return isinstance(name, str) and bool(name) and _is_unicode(name)


def _as_call(name: Any, arguments: Any) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of a call's parts, or None when they are not a call's: a
    name (``_is_name``) and an object ``arguments`` (or JSON text of one)."""
    if not _is_name(name):
        return None
    if isinstance(arguments, str) and isinstance(_loads(arguments), dict):
        return name, _json_text(arguments)
    if not isinstance(arguments, dict):
        return None
    return name, _json_text(json.dumps(arguments, ensure_ascii=False))


def hermes_call(block: str) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of the text between a block's tags, or None when it is not
    a call: a JSON object with a non-empty string ``name`` and an object ``arguments`` (or JSON
    text of one; absent: ``{}``)."""
    call = _loads(block)
    if not isinstance(call, dict):
        return None
    return _as_call(call.get("name"), call.get("arguments", {}))


def _may_start_block(text: str) -> int:
    """Where the end of ``text`` that a tool-call block may start from begins: a proper prefix
    of ``<tool_call>`` at its very end, and the whitespace before it (dropped if a block follows);
    ``len(text)`` when nothing there can be."""
    start = len(text)
    for size in range(min(len(TOOL_CALL_START) - 1, len(text)), 0, -1):
        if TOOL_CALL_START.startswith(text[-size:]):
            start = len(text) - size
            break
    while start and text[start - 1].isspace():
        start -= 1
    return start


class ToolCallStream:
    """One choice's text in a tool mode (``ChatCompletionRequest.tool_mode``), fed as it is
    generated, as OpenAI's deltas: ``Delta(content=...)`` and ``Delta(tool_calls=[one entry])``.

    * named: the text is the function's arguments (generated under its schema): a head delta
      (id, type, name), then the text as it comes as argument deltas;
    * required: the text is a JSON list of ``{name, arguments}`` (generated under that schema),
      held until the end; calls when it parses, else content;
    * auto: Hermes ``<tool_call>{...}</tool_call>`` blocks in free text. Text goes out as content
      as it comes except from where a block may start (a ``<`` that may begin the tag, and the
      whitespace before it), held until the block closes: a block that parses
      (``hermes_call``) becomes a call's head and arguments deltas, the whitespace around it
      dropped; a malformed or unclosed one goes out as content, markup and all;
    * none: all content.

    Each call's deltas carry its ``index``; ``calls`` counts them. Fed a whole text at once, the
    deltas are a reply's (``parse_tool_calls``), so a stream and a reply agree."""

    def __init__(self, mode: str | None, named: str | None = None) -> None:
        self.mode, self.named = mode, named
        self.calls = 0
        self._held = ""  # text not sent yet
        self._content = ""  # auto: content to send with this feed's deltas
        self._said = False  # auto: whether any content was sent
        self._after_call = False  # auto: no content since the last call

    def feed(self, text: str) -> list[Delta]:
        if self.mode == "named":
            deltas = [] if self.calls else [self._head(self.named or "")]
            if text:
                deltas.append(tool_call_arguments(0, text))
            return deltas
        if self.mode in ("required", "auto"):
            self._held += text
            return self._auto(final=False) if self.mode == "auto" else []
        return [Delta(content=text)] if text else []

    def finish(self) -> list[Delta]:
        """The deltas of what is still held, at the end of the choice."""
        if self.mode == "named" and not self.calls:
            return [self._head(self.named or "")]
        if self.mode == "auto":
            return self._auto(final=True)
        if self.mode != "required" or not self._held:
            return []
        text, self._held = self._held, ""
        items = _loads(text)
        calls = [
            (item["name"], _json_text(json.dumps(item["arguments"], ensure_ascii=False)))
            for item in (items if isinstance(items, list) else ())
            if isinstance(item, dict) and "arguments" in item and _is_name(item.get("name"))
        ]
        if not calls:
            return [Delta(content=text)]
        return [delta for name, arguments in calls for delta in self._call(name, arguments)]

    def _head(self, name: str) -> Delta:
        self.calls += 1
        return tool_call_head(self.calls - 1, name)

    def _call(self, name: str, arguments: str) -> list[Delta]:
        head = self._head(name)
        return [head, tool_call_arguments(self.calls - 1, arguments)]

    def _say(self, text: str) -> None:
        """Adds content; right after a call its leading whitespace goes unless content came
        before the call (it then separates the two)."""
        if self._after_call:
            if not self._said:
                text = text.lstrip()
            if not text.strip():
                return
            self._after_call = False
        self._content += text
        self._said = self._said or bool(text)

    def _auto(self, final: bool) -> list[Delta]:
        deltas: list[Delta] = []
        while self._held:
            held = self._held
            start = held.find(TOOL_CALL_START)
            if start < 0:  # no block: all goes but what may begin one
                cut = len(held) if final else _may_start_block(held)
                self._say(held[:cut])
                self._held = held[cut:]
                break
            end = held.find(TOOL_CALL_END, start + len(TOOL_CALL_START))
            if end < 0:  # a block not closed (yet)
                cut = len(held) if final else len(held[:start].rstrip())
                self._say(held[:cut])
                self._held = held[cut:]
                break
            call = hermes_call(held[start + len(TOOL_CALL_START) : end])
            if call is None:
                self._say(held[: end + len(TOOL_CALL_END)])
            else:
                self._say(held[:start].rstrip())
                if self._content:
                    deltas.append(Delta(content=self._content))
                    self._content = ""
                deltas += self._call(*call)
                self._after_call = True
            self._held = held[end + len(TOOL_CALL_END) :]
        if self._content:
            deltas.append(Delta(content=self._content))
            self._content = ""
        return deltas


def merge_deltas(deltas: list[Delta]) -> tuple[str, list[ToolCall]]:
    """A choice's deltas (``ToolCallStream``) as a reply holds them: its content and its whole
    tool calls (``id``, ``type``, ``function: {name, arguments}``)."""
    content = "".join(delta.content or "" for delta in deltas)
    calls: list[ToolCall] = []
    for delta in deltas:
        for part in delta.tool_calls or ():
            if part.id is not None:
                function = FunctionCall(name=part.function.name or "", arguments="")
                calls.append(ToolCall(id=part.id, type="function", function=function))
            calls[part.index].function.arguments += part.function.arguments
    return content, calls


def parse_tool_calls(
    mode: str | None, text: str, named: str | None = None
) -> tuple[str, list[ToolCall]]:
    """(content, tool calls) of a whole reply generated in a tool mode (``ToolCallStream``): the
    text that is not a call stays content (e.g. JSON cut by max_tokens, a malformed block)."""
    stream = ToolCallStream(mode, named)
    return merge_deltas(stream.feed(text) + stream.finish())
