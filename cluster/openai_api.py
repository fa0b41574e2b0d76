"""OpenAI-compatible request and response bodies, OpenAI-style errors, and logprobs' shapes.

Every field of a request is honoured, refused or ignored, each list in one place:

* honoured: the fields the request models below declare (OpenAI's, plus vLLM's ``top_k``,
  ``min_p``, ``repetition_penalty``, ``stop_token_ids`` and ``ignore_eos``), less those of
  ``UNSUPPORTED``;
* ``UNSUPPORTED``: OpenAI fields vattn does not implement yet. They are accepted only at the value
  that asks for nothing (e.g. ``presence_penalty`` 0, ``n`` 1) or null; any other value is a 400
  that names the field and says it is not supported yet;
* ``IGNORED``: metadata that changes nothing in what is generated (``user``, ``metadata``,
  ``store``, ...), accepted and dropped;
* any other field is a 400 naming it (an unknown field).

Text that is not valid Unicode (a lone UTF-16 surrogate such as ``"\\ud800"``, which JSON can
escape) is a 400 naming the field rather than reaching the tokenizer.
"""

from __future__ import annotations

import codecs
import json
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from replica.sampling_params import MAX_LOGPROBS, GuidedDecoding, SamplingParams

#: Fields of OpenAI's API that change nothing in what vattn generates: accepted and ignored, by
#: where they appear. The README's "The HTTP API" lists the same.
IGNORED: dict[str, frozenset[str]] = {
    "completions": frozenset({"user"}),
    "chat": frozenset(
        {
            "user",
            "metadata",
            "store",
            "service_tier",
            "safety_identifier",
            "prompt_cache_key",
            "prompt_cache_retention",
            "prompt_cache_options",
            # Calls are as many as the model makes (auto) or asks the schema (required).
            "parallel_tool_calls",
        }
    ),
    "message": frozenset({"name"}),
    "stream_options": frozenset(),
    "tool": frozenset(),
    "function": frozenset(),
    "tool_choice": frozenset(),
    "response_format": frozenset(),
    "json_schema": frozenset(),
}

#: The most choices one request may ask for (``n``).
MAX_CHOICES = 16

#: OpenAI fields vattn does not implement yet -> the values that ask for nothing (null is always
#: one). At those values a field is accepted; at any other it is refused with a 400 naming it.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    # completions and chat
    "include_obfuscation": (False,),  # in stream_options: vattn sends no obfuscation field
    # completions
    "echo": (False,),  # echo's prompt logprobs are not computed
    "suffix": ("",),
    # chat
    "functions": ([],),
    "function_call": ("none", "auto"),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "verbosity": (),
    "moderation": (),
    "web_search_options": (),
    # chat messages
    "refusal": (),
}

#: The most UTF-8 bytes one character of a request body can take as JSON: a control character
#: escaped as ``\u0000`` is 6 bytes for 1 byte of text.
JSON_BYTES_PER_TEXT_BYTE = 6
#: What a body may hold besides its prompt (other fields, message framing, whitespace).
BODY_SLACK_BYTES = 1 << 20
#: A token's bytes at most, for a model without a tokenizer (its prompts are token ids).
DEFAULT_TOKEN_BYTES = 16
#: The logprob OpenAI reports for an impossible token (JSON has no -Infinity).
MIN_LOGPROB = -9999.0


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


def field_error(field: str, message: str, kind: str = "field_error") -> PydanticCustomError:
    """A validation error about ``field``, a path relative to where it is raised (a model
    validator: the model; a field validator: the field), with ``message`` as it is."""
    return PydanticCustomError(kind, message, {"field": field})


def _is_neutral(value: Any, neutrals: tuple[Any, ...]) -> bool:
    if value is None:
        return True
    return any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in neutrals)


def unsupported_message(field: str) -> str:
    neutrals = UNSUPPORTED[field]
    accepted = " or ".join(f"{field} = {json.dumps(v)}" for v in neutrals)
    return f"{field} is not supported yet: only {accepted + ' or ' if accepted else ''}null works"


def _check_text(value: str) -> str:
    """Refuses text that is not valid Unicode (a field validator's: the error's place is the
    field's): the tokenizer cannot encode a lone surrogate."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        point = f"U+{ord(value[error.start]):04X}"
        message = f"contains a lone UTF-16 surrogate ({point}), which is not valid Unicode text"
        raise PydanticCustomError("invalid_unicode", message) from None
    return value


class Strict(BaseModel):
    """A request object: unknown fields are refused, ``IGNORED`` ones dropped, ``UNSUPPORTED``
    ones refused unless neutral."""

    model_config = ConfigDict(extra="forbid")
    scope: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, data: Any) -> Any:
        if isinstance(data, dict):
            ignored = IGNORED[cls.scope]
            return {k: v for k, v in data.items() if k not in ignored}
        return data

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> Strict:
        for name in type(self).model_fields:
            if name in UNSUPPORTED and not _is_neutral(getattr(self, name), UNSUPPORTED[name]):
                raise field_error(name, unsupported_message(name), "unsupported_field")
        return self


class StreamOptions(Strict):
    scope: ClassVar[str] = "stream_options"

    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class SamplingFields(Strict):
    """What completions and chat share."""

    model: str | None = None
    max_tokens: int | None = Field(
        default=None, description="tokens to generate (default: the rest of the context)"
    )
    max_completion_tokens: int | None = Field(default=None, description="max_tokens' newer name")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _valid_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        for text in [stop] if isinstance(stop, str) else stop or ():
            _check_text(text)
        return stop

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise field_error("stream_options", "stream_options is only allowed with stream: true")
        return self

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a chunk of usage and no choices (OpenAI's stream_options)."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens (chat's newer name) or max_tokens; None when neither is set."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def choices(self) -> int:
        return self.n or 1

    def sampling_params(
        self,
        logprobs: int | None,
        default_max_tokens: int,
        guided: GuidedDecoding | None = None,
        choice: int = 0,
    ) -> SamplingParams:
        """Raises ValueError naming the bad field (turned into a 400). Without max_tokens the
        request may generate ``default_max_tokens`` (the rest of the context). Choice i of a
        seeded request with ``n`` > 1 samples with seed + i (else the n choices would be equal)."""
        max_tokens = self.requested_max_tokens()
        seed = self.seed
        if seed is not None and choice:
            seed = (seed + choice) & ((1 << 63) - 1)
        return SamplingParams(
            max_tokens=default_max_tokens if max_tokens is None else max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k,
            seed=seed,
            stop=self.stop or (),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_p=self.min_p or 0.0,
            logit_bias=self.logit_bias,
            guided=guided,
        )


class CompletionRequest(SamplingFields):
    scope: ClassVar[str] = "completions"

    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _best_of_is_n(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.choices:
            message = (
                f"best_of is not supported yet unless it equals n: only best_of = "
                f"{self.choices} or null works (vattn returns every sample it draws)"
            )
            raise field_error("best_of", message, "unsupported_field")
        return self

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError("one prompt per request is supported")
            prompt = prompt[0]
        return _check_text(prompt) if isinstance(prompt, str) else prompt  # type: ignore[return-value]


class ToolCallFunction(Strict):
    scope: ClassVar[str] = "function"

    name: str
    arguments: str


class ToolCall(Strict):
    """A tool call of an earlier assistant message (``arguments``: JSON text, as OpenAI sends)."""

    scope: ClassVar[str] = "tool"

    id: str
    type: Literal["function"]
    function: ToolCallFunction

    def template_call(self) -> dict[str, Any]:
        try:
            arguments: Any = json.loads(self.function.arguments)
        except json.JSONDecodeError:
            arguments = self.function.arguments
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.function.name, "arguments": arguments},
        }


class ChatMessage(Strict):
    scope: ClassVar[str] = "message"

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    refusal: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(
        cls, content: str | list[dict[str, Any]] | None
    ) -> str | list[dict[str, Any]] | None:
        if isinstance(content, str):
            return _check_text(content)
        for i, part in enumerate(content or ()):
            kind = part.get("type")
            if kind != "text":
                shown = repr(kind)[:40] if isinstance(kind, str) else "missing"
                raise field_error(
                    f"{i}.type",
                    f"content part {i} of type {shown} is not supported yet: only text parts",
                    "unsupported_field",
                )
            if not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                raise field_error(
                    str(i), f'content part {i} must be {{"type": "text", "text": "..."}}'
                )
            _check_text(part["text"])
        return content

    def text(self) -> str:
        if isinstance(self.content, list):  # the parts format: text parts only
            return "".join(part["text"] for part in self.content)
        return self.content or ""

    def template_message(self) -> dict[str, Any]:
        """The message as chat templates read it (tool calls' arguments as objects, as the
        Hugging Face templates expect)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.template_call() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(Strict):
    scope: ClassVar[str] = "function"

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def arguments_schema(self) -> dict[str, Any]:
        return self.parameters or {"type": "object"}


class Tool(Strict):
    scope: ClassVar[str] = "tool"

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Strict):
    scope: ClassVar[str] = "function"

    name: str


class NamedToolChoice(Strict):
    scope: ClassVar[str] = "tool_choice"

    type: Literal["function"]
    function: FunctionName


class JsonSchema(Strict):
    scope: ClassVar[str] = "json_schema"
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    scope: ClassVar[str] = "response_format"

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_with_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise field_error(
                "json_schema", "json_schema is needed with, and only with, type json_schema"
            )
        return self

    def guided(self) -> GuidedDecoding | None:
        if self.type == "json_object":
            return GuidedDecoding("json_object")
        if self.type == "json_schema":
            assert self.json_schema is not None
            return GuidedDecoding("json_schema", json.dumps(self.json_schema.schema_))
        return None


class ChatCompletionRequest(SamplingFields):
    scope: ClassVar[str] = "chat"

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    moderation: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise field_error("top_logprobs", "top_logprobs needs logprobs: true")
        return self

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        names = [tool.function.name for tool in self.tools or ()]
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            message = f"tool_choice names function {choice.function.name!r}, which tools lacks"
            raise field_error("tool_choice", message)
        if choice == "required" and not names:
            raise field_error("tool_choice", "tool_choice required needs tools")
        if self.tool_mode() not in (None, "none") and self.guided_format() is not None:
            message = "response_format json_object / json_schema cannot be combined with tools"
            raise field_error("response_format", message, "unsupported_field")
        return self

    def logprobs_asked(self) -> int | None:
        """The engine's ``SamplingParams.logprobs``: alternatives per token, or None for none."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.template_message() for m in self.messages]

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates read them (OpenAI's shape), or None without tools."""
        if not self.tools:
            return None
        return [tool.model_dump(exclude_none=True, by_alias=True) for tool in self.tools]

    def tool_mode(self) -> str | None:
        """None without tools; else "none", "auto" (the default), "required" or "named"."""
        if not self.tools:
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def guided_format(self) -> GuidedDecoding | None:
        return self.response_format.guided() if self.response_format is not None else None

    def guided(self) -> GuidedDecoding | None:
        """The grammar the output follows: response_format's, or a tool call's JSON (named: its
        arguments; required: a list of calls, each a tool's name and arguments)."""
        mode = self.tool_mode()
        if mode == "named":
            assert isinstance(self.tool_choice, NamedToolChoice)
            schema = self.tool(self.tool_choice.function.name).function.arguments_schema()
            return GuidedDecoding("json_schema", json.dumps(schema))
        if mode == "required":
            calls = [
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": tool.function.name},
                        "arguments": tool.function.arguments_schema(),
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for tool in self.tools or ()
            ]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
            return GuidedDecoding("json_schema", json.dumps(schema))
        return self.guided_format()

    def tool(self, name: str) -> Tool:
        return next(t for t in self.tools or () if t.function.name == name)


# ---- limits -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestLimits:
    """How big a request can be and still fit the context: no token of the model spans more than
    ``max_token_bytes`` bytes of text (so more characters than ``context_tokens`` tokens of that
    size cannot fit), and no body needs more than ``JSON_BYTES_PER_TEXT_BYTE`` bytes of JSON per
    byte of that text, plus some slack for the other fields."""

    context_tokens: int
    max_token_bytes: int

    @property
    def max_prompt_chars(self) -> int:
        return self.context_tokens * self.max_token_bytes

    @property
    def max_body_bytes(self) -> int:
        return JSON_BYTES_PER_TEXT_BYTE * self.max_prompt_chars + BODY_SLACK_BYTES

    def prompt_too_long(self, chars: int) -> str | None:
        """Why a prompt of ``chars`` characters cannot fit, or None when it may."""
        if chars <= self.max_prompt_chars:
            return None
        return (
            f"the prompt has {chars} characters, more than {self.max_prompt_chars}: it exceeds "
            f"the context limit of {self.context_tokens} tokens (no token of this model spans "
            f"more than {self.max_token_bytes} bytes)"
        )

    def body_too_big(self) -> str:
        return (
            f"the request body has more than {self.max_body_bytes} bytes: its prompt cannot fit "
            f"the context limit of {self.context_tokens} tokens"
        )


# ---- token strings and logprobs ------------------------------------------------------------------
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in chars)
    for n, b in enumerate(extra):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


def _is_byte_level(decoder: dict[str, Any] | None) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "Sequence":
        return any(_is_byte_level(d) for d in decoder.get("decoders", ()))
    return decoder.get("type") == "ByteLevel"


class TokenStrings:
    """Token ids -> each token's own UTF-8 bytes and text, as OpenAI's logprobs show them: a
    token that holds part of a character has text like ``"\\xe2\\x80"`` and its exact bytes.
    Byte-level BPE pieces (GPT-2, Llama 3, Qwen, SmolLM) map back through their alphabet,
    SentencePiece ones through ``▁`` and ``<0xNN>``. Without a tokenizer a token reads
    ``token_id:N`` and has no bytes."""

    def __init__(self, tokenizer: Any | None) -> None:
        self._bytes: list[bytes | None] = []
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            self.max_bytes = DEFAULT_TOKEN_BYTES
            return
        decoder = json.loads(backend.to_str()).get("decoder")
        alphabet = _byte_level_alphabet() if _is_byte_level(decoder) else None
        added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        size = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        for token_id in range(size):
            piece = added.get(token_id)
            if piece is not None:
                self._bytes.append(piece.encode("utf-8", "backslashreplace"))
            else:
                self._bytes.append(self._piece_bytes(backend.id_to_token(token_id), alphabet))
        self.max_bytes = max((len(b) for b in self._bytes if b is not None), default=1)

    @staticmethod
    def _piece_bytes(piece: str | None, alphabet: dict[str, int] | None) -> bytes | None:
        if piece is None:
            return None
        if alphabet is not None and all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("▁", " ").encode("utf-8", "backslashreplace")

    def bytes(self, token_id: int) -> bytes | None:
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else None

    def text(self, token_id: int) -> str:
        raw = self.bytes(token_id)
        return f"token_id:{token_id}" if raw is None else raw.decode("utf-8", "backslashreplace")

    def entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        """Chat's ``{token, logprob, bytes}`` of one token."""
        raw = self.bytes(token_id)
        return {
            "token": self.text(token_id),
            "logprob": finite(logprob),
            "bytes": None if raw is None else list(raw),
        }


def finite(logprob: float) -> float:
    """A logprob JSON can carry: -inf (and NaN) become OpenAI's -9999.0."""
    return logprob if math.isfinite(logprob) and logprob > MIN_LOGPROB else MIN_LOGPROB


TopPairs = Sequence[tuple[int, float]]


class Logprobs:
    """One request's logprobs in OpenAI's shapes, built as its tokens come in.

    Chat: ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}],
    "refusal": None}``, the ``top_logprobs`` most likely tokens at each position. Completions:
    ``{tokens, token_logprobs, top_logprobs, text_offset}``, each ``top_logprobs`` dict holding
    the ``logprobs`` most likely tokens and the chosen one (so up to ``logprobs`` + 1), each
    ``text_offset`` where the token's text starts in the completion (a token that ends inside a
    character starts where that character does). There is one entry per generated token, the
    stop token included. ``take()`` returns those of the tokens added since the last take: a
    stream's chunk, or the whole reply when taken once.
    """

    def __init__(self, strings: TokenStrings, chat: bool) -> None:
        self.strings, self.chat = strings, chat
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._offset = 0
        self._pending: list[tuple[int, float, TopPairs]] = []

    def add(
        self,
        token_ids: Sequence[int],
        logprobs: Sequence[float] | None,
        top_logprobs: Sequence[TopPairs] | None,
    ) -> None:
        for i, token_id in enumerate(token_ids):
            logprob = logprobs[i] if logprobs is not None and i < len(logprobs) else -math.inf
            top = top_logprobs[i] if top_logprobs is not None and i < len(top_logprobs) else ()
            self._pending.append((token_id, logprob, top))

    def take(self) -> dict[str, Any]:
        pending, self._pending = self._pending, []
        if self.chat:
            content = [
                {
                    **self.strings.entry(token_id, logprob),
                    "top_logprobs": [self.strings.entry(t, lp) for t, lp in top],
                }
                for token_id, logprob, top in pending
            ]
            return {"content": content, "refusal": None}
        shaped: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for token_id, logprob, top in pending:
            text = self.strings.text(token_id)
            alternatives = {self.strings.text(t): finite(lp) for t, lp in top}
            alternatives.setdefault(text, finite(logprob))
            shaped["tokens"].append(text)
            shaped["token_logprobs"].append(finite(logprob))
            shaped["top_logprobs"].append(alternatives)
            shaped["text_offset"].append(self._offset)
            raw = self.strings.bytes(token_id)
            self._offset += len(self._decoder.decode(raw if raw is not None else text.encode()))
        return shaped


# ---- response bodies -----------------------------------------------------------------------------
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


def tool_call_head(index: int, name: str) -> dict[str, Any]:
    """A stream's first delta of a tool call, as OpenAI sends it: its id, type and name, and
    empty arguments (``tool_call_arguments`` deltas follow)."""
    return {
        "index": index,
        "id": new_id("call"),
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }


def tool_call_arguments(index: int, arguments: str) -> dict[str, Any]:
    """A stream's delta of more of a tool call's arguments (JSON text, in pieces)."""
    return {"index": index, "function": {"arguments": arguments}}


#: The Hermes-style tool-call markup (Qwen-family and other templates that list tools): a JSON
#: object ``{"name": ..., "arguments": {...}}`` between the two tags.
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"


def emits_hermes_tool_calls(chat_template: str | dict[str, Any] | None) -> bool:
    """Whether a chat template tells the model to answer tools with ``<tool_call>`` blocks."""
    return bool(chat_template) and TOOL_CALL_START in str(chat_template)


def _loads(text: str) -> Any:
    """JSON text's value, or ``_loads`` itself when it is not JSON (deep nesting included)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _loads


def hermes_call(block: str) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of the text between a block's tags, or None when it is not
    a call: a JSON object with a non-empty string ``name`` and an object ``arguments`` (or JSON
    text of one; absent: ``{}``)."""
    call = _loads(block)
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str) and isinstance(_loads(arguments), dict):
        return call["name"], arguments
    if not isinstance(arguments, dict):
        return None
    return call["name"], json.dumps(arguments, ensure_ascii=False)


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
    generated, as OpenAI's deltas: ``{"content": ...}`` and ``{"tool_calls": [one entry]}``.

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

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self.mode == "named":
            deltas = [] if self.calls else [self._head(self.named or "")]
            if text:
                deltas.append({"tool_calls": [tool_call_arguments(0, text)]})
            return deltas
        if self.mode in ("required", "auto"):
            self._held += text
            return self._auto(final=False) if self.mode == "auto" else []
        return [{"content": text}] if text else []

    def finish(self) -> list[dict[str, Any]]:
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
            (item["name"], json.dumps(item["arguments"], ensure_ascii=False))
            for item in (items if isinstance(items, list) else ())
            if isinstance(item, dict) and isinstance(item.get("name"), str) and "arguments" in item
        ]
        if not calls:
            return [{"content": text}]
        return [delta for name, arguments in calls for delta in self._call(name, arguments)]

    def _head(self, name: str) -> dict[str, Any]:
        self.calls += 1
        return {"tool_calls": [tool_call_head(self.calls - 1, name)]}

    def _call(self, name: str, arguments: str) -> list[dict[str, Any]]:
        head = self._head(name)
        return [head, {"tool_calls": [tool_call_arguments(self.calls - 1, arguments)]}]

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

    def _auto(self, final: bool) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
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
                    deltas.append({"content": self._content})
                    self._content = ""
                deltas += self._call(*call)
                self._after_call = True
            self._held = held[end + len(TOOL_CALL_END) :]
        if self._content:
            deltas.append({"content": self._content})
            self._content = ""
        return deltas


def merge_deltas(deltas: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """A choice's deltas (``ToolCallStream``) as a reply holds them: its content and its whole
    tool calls (``id``, ``type``, ``function: {name, arguments}``)."""
    content = "".join(delta.get("content", "") for delta in deltas)
    calls: list[dict[str, Any]] = []
    for delta in deltas:
        for part in delta.get("tool_calls", ()):
            if "id" in part:
                calls.append({**part, "function": dict(part["function"])})
                del calls[-1]["index"]
            else:
                calls[part["index"]]["function"]["arguments"] += part["function"]["arguments"]
    return content, calls


def parse_tool_calls(
    mode: str | None, text: str, named: str | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """(content, tool calls) of a whole reply generated in a tool mode (``ToolCallStream``): the
    text that is not a call stays content (e.g. JSON cut by max_tokens, a malformed block)."""
    stream = ToolCallStream(mode, named)
    return merge_deltas(stream.feed(text) + stream.finish())


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


def sse_event(payload: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON chunk."""
    return f"data: {json.dumps(payload)}\n\n"
