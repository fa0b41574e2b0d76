"""The request bodies of ``/v1/completions`` and ``/v1/chat/completions``: what each field means
and how it becomes the engine's ``SamplingParams`` (``SamplingFields.sampling_params``), a chat
template's messages and tools, and a grammar (``response_format``, tool calls). Which fields are
honoured, refused or ignored is ``cluster.openai.fields``'s policy, applied by the ``Strict`` base
every request object derives from.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from cluster.openai.fields import Strict, check_text, field_error
from replica.sampling_params import MAX_LOGPROBS, GuidedDecoding, SamplingParams

#: The most choices one request may ask for (``n``).
MAX_CHOICES = 16


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
            check_text(text)
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


#: Token ids are below this (the router hashes them as signed 64-bit integers).
TOKEN_ID_LIMIT = 1 << 63


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
        if isinstance(prompt, str):
            return check_text(prompt)
        # The replica checks ids against its vocabulary; what no vocabulary holds (and what a
        # 64-bit key cannot carry, as the router's prefix keys do) is refused here.
        bad = next((t for t in prompt if not 0 <= t < TOKEN_ID_LIMIT), None)  # type: ignore[operator]
        if bad is not None:
            raise ValueError(f"token id {bad} is outside [0, 2^63): no vocabulary holds it")
        return prompt  # type: ignore[return-value]


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
            return check_text(content)
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
            check_text(part["text"])
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
