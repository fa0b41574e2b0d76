"""OpenAI's response bodies as typed models, and the builders the ingress calls: whole replies,
stream chunks, usage, logprobs, tool calls, model cards and errors.

A body's JSON (``Body.to_json``) holds the fields its builder set, those set to None as null, and
leaves out those it left unset, so each body carries what OpenAI's does: a choice's ``logprobs``
and ``finish_reason`` are null when there are none, a delta holds only what it changes, a message
has ``tool_calls`` only when it makes calls, a chunk has ``usage`` only where the stream's usage
goes (``cluster.openai.streaming``).

NOTE: these are our own pydantic models, not the ``openai`` package's types: built and serialised,
they were the faster of the two (``benchmarks/bench_openai_serialize.py`` on a CPU: 18.6 against
21.9 µs a chat chunk, 57 against 65 with 5 top logprobs; the hand-built dicts they replace took 11
and 39), they keep our fields' order and extras (a model card's ``max_model_len``), and the
``openai`` package stays a test dependency. The tests read every body with the package's types.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel


class Body(BaseModel):
    """A response object: its fields in OpenAI's names, those left unset left out of its JSON."""

    def to_json(self) -> str:
        return self.model_dump_json(exclude_unset=True)


# ---- errors --------------------------------------------------------------------------------------
class ErrorBody(Body):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Body):
    error: ErrorBody


def _printable(text: str) -> str:
    """Text that encodes as UTF-8 (a lone surrogate becomes ``\\ud800``)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_payload(
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> ErrorResponse:
    """An OpenAI-style error body (``{"error": {message, type, param, code}}``)."""
    param = None if param is None else _printable(param)
    body = ErrorBody(message=_printable(message), type=kind, param=param, code=code)
    return ErrorResponse(error=body)


# ---- usage and logprobs --------------------------------------------------------------------------
class PromptTokensDetails(Body):
    cached_tokens: int


class Usage(Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(Body):
    """One token of chat's logprobs: its text, logprob and UTF-8 bytes (None: not known)."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Body):
    content: list[TokenLogprob]
    refusal: None


class CompletionLogprobs(Body):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


#: A choice's logprobs, in chat's or completions' shape.
LogprobsBody = ChatLogprobs | CompletionLogprobs


# ---- messages, deltas and tool calls -------------------------------------------------------------
class FunctionCall(Body):
    name: str
    arguments: str  # JSON text


class ToolCall(Body):
    id: str
    type: Literal["function"]
    function: FunctionCall


class FunctionDelta(Body):
    name: str | None = None
    arguments: str


class ToolCallDelta(Body):
    """A stream's piece of the tool call at ``index``: the first names it, the rest add to its
    arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class Delta(Body):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class Message(Body):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


# ---- choices and the bodies around them ----------------------------------------------------------
class CompletionChoice(Body):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class ChatChoice(Body):
    index: int
    message: Message
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChunkChoice(Body):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class Completion(Body):
    """A completions reply, or one chunk of its stream (OpenAI names both ``text_completion``)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatCompletion(Body):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(Body):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


Chunk = Completion | ChatCompletionChunk
Envelope = TypeVar("Envelope", Completion, ChatCompletion, ChatCompletionChunk)


class ModelCard(Body):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(Body):
    object: Literal["list"]
    data: list[ModelCard]


# ---- builders ------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    """OpenAI's usage; ``cached_tokens``: prompt tokens the prefix cache held (not computed)."""
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


def model_card(name: str, max_model_len: int) -> ModelCard:
    return ModelCard(
        id=name, object="model", created=0, owned_by="vattn", max_model_len=max_model_len
    )


def model_list(name: str, max_model_len: int) -> ModelList:
    """``GET /v1/models``: the one model served."""
    return ModelList(object="list", data=[model_card(name, max_model_len)])


def completion_choice(
    index: int, text: str, finish_reason: str | None, logprobs: LogprobsBody | None = None
) -> CompletionChoice:
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason)


def chat_choice(
    index: int,
    text: str,
    finish_reason: str | None,
    logprobs: LogprobsBody | None = None,
    tool_calls: list[ToolCall] | None = None,
) -> ChatChoice:
    """A reply's choice; with tool calls its content is the text around them (None if none) and
    a choice that stopped by itself finishes with ``tool_calls``."""
    message = Message(role="assistant", content=text)
    if tool_calls:
        message = Message(role="assistant", content=text or None, tool_calls=tool_calls)
        finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
    return ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=finish_reason)


@functools.cache
def _object_of(cls: type[Body]) -> str:
    """The ``object`` a body's class names it by (looked up once: pydantic's ``model_fields``
    costs microseconds, a stream pays it per chunk)."""
    return cls.model_fields["object"].default


def envelope(
    cls: type[Envelope], request_id: str, model: str, choices: list[Any], **extra: Any
) -> Envelope:
    """What every reply and chunk carries around its choices (its ``object`` is its class's)."""
    kind = _object_of(cls)
    return cls(
        id=request_id, object=kind, created=int(time.time()), model=model, choices=choices, **extra
    )


def reply_body(
    request_id: str,
    model: str,
    chat: bool,
    choices: Sequence[CompletionChoice | ChatChoice],
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
) -> Completion | ChatCompletion:
    """A whole reply: its choices (``completion_choice`` / ``chat_choice``) and the usage (the
    prompt counted once, every choice's tokens)."""
    counts = usage(prompt_tokens, completion_tokens, cached_tokens)
    kind = ChatCompletion if chat else Completion
    return envelope(kind, request_id, model, list(choices), usage=counts)


def completion_chunk(
    request_id: str,
    model: str,
    text: str,
    finish_reason: str | None,
    logprobs: LogprobsBody | None = None,
    index: int = 0,
) -> Completion:
    choice = completion_choice(index, text, finish_reason, logprobs)
    return envelope(Completion, request_id, model, [choice])


def chat_chunk(
    request_id: str,
    model: str,
    delta: Delta,
    finish_reason: str | None,
    logprobs: LogprobsBody | None = None,
    index: int = 0,
) -> ChatCompletionChunk:
    """A stream's chunk (a tool call's deltas: ``cluster.openai.tool_calls``)."""
    choice = ChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)
    return envelope(ChatCompletionChunk, request_id, model, [choice])


def usage_chunk(
    request_id: str,
    model: str,
    chat: bool,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
) -> Chunk:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    counts = usage(prompt_tokens, completion_tokens, cached_tokens)
    kind = ChatCompletionChunk if chat else Completion
    return envelope(kind, request_id, model, [], usage=counts)
