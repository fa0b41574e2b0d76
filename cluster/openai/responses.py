"""OpenAI's response bodies and the builders the ingress calls: whole replies, stream chunks,
usage, model cards and errors."""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel


def _printable(text: str) -> str:
    """Text that encodes as UTF-8 (a lone surrogate becomes ``\\ud800``)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class ErrorBody(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


def error_payload(
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    param = None if param is None else _printable(param)
    body = ErrorBody(message=_printable(message), type=kind, param=param, code=code)
    return {"error": body.model_dump()}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage; ``cached_tokens``: prompt tokens the prefix cache held (not computed)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def model_card(name: str, max_model_len: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "vattn",
        "max_model_len": max_model_len,
    }


def envelope(
    request_id: str, kind: str, model: str, choices: list[Any], **extra: Any
) -> dict[str, Any]:
    """What every response body and chunk carries around its choices (``kind``: its object)."""
    return {
        "id": request_id,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        **extra,
    }


def completion_choice(
    index: int, text: str, finish_reason: str | None, logprobs: Any = None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(
    index: int,
    text: str,
    finish_reason: str | None,
    logprobs: Any = None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A reply's choice; with tool calls its content is the text around them (None if none) and
    a choice that stopped by itself finishes with ``tool_calls``."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message = {"role": "assistant", "content": text or None, "tool_calls": tool_calls}
        finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
    return {
        "index": index,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def reply_body(
    request_id: str,
    model: str,
    chat: bool,
    choices: list[dict[str, Any]],
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
) -> dict[str, Any]:
    """A whole reply: its choices (``completion_choice`` / ``chat_choice``) and the usage (the
    prompt counted once, every choice's tokens)."""
    kind = "chat.completion" if chat else "text_completion"
    counts = usage(prompt_tokens, completion_tokens, cached_tokens)
    return envelope(request_id, kind, model, choices, usage=counts)


def completion_chunk(
    request_id: str,
    model: str,
    text: str,
    finish_reason: str | None,
    logprobs: Any = None,
    index: int = 0,
) -> dict[str, Any]:
    choice = completion_choice(index, text, finish_reason, logprobs)
    return envelope(request_id, "text_completion", model, [choice])


def chat_chunk(
    request_id: str,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None,
    logprobs: Any = None,
    index: int = 0,
) -> dict[str, Any]:
    """A stream's chunk (a tool call's deltas: ``tool_call_head``, ``tool_call_arguments``)."""
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return envelope(request_id, "chat.completion.chunk", model, [choice])


def usage_chunk(
    request_id: str,
    model: str,
    chat: bool,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
) -> dict[str, Any]:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    counts = usage(prompt_tokens, completion_tokens, cached_tokens)
    return envelope(request_id, kind, model, [], usage=counts)
