"""The OpenAI surface without a server: the request models (every field honoured, refused or
ignored; invalid Unicode refused), the ingress's validation errors, its request limits (body size,
prompt characters, the context), tokenizing off the event loop, the default max_tokens, and the
shapes of logprobs, usage chunks and model cards, checked against the `openai` package's types."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

import httpx
import pydantic
import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types import Completion, Model
from openai.types import completion_create_params as openai_completion_params
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.chat import completion_create_params as openai_chat_params

from cluster import api_errors, ingress, request_guards
from cluster.openai.fields import IGNORED
from cluster.openai.limits import RequestLimits
from cluster.openai.logprobs import Logprobs, TokenStrings
from cluster.openai.requests import ChatCompletionRequest, CompletionRequest, SamplingFields
from cluster.openai.responses import (
    Body,
    ChatLogprobs,
    Delta,
    ToolCall,
    chat_choice,
    chat_chunk,
    completion_choice,
    model_card,
    reply_body,
    usage_chunk,
)
from cluster.openai.tool_calls import (
    ToolCallStream,
    emits_hermes_tool_calls,
    merge_deltas,
    parse_tool_calls,
)
from cluster.protocol import ModelInfo
from replica import cli as replica_cli
from replica.model.source import load_tokenizer, resolve_model_dir
from tests.helpers import wait_until_async

USER = [{"role": "user", "content": "hi"}]
OpenAIBody = TypeVar("OpenAIBody", bound=pydantic.BaseModel)
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    """The request models behind the ingress's validation-error handler, echoing what passed."""
    test_app = FastAPI()
    test_app.add_exception_handler(RequestValidationError, api_errors.answer_validation_error)  # type: ignore[arg-type]

    @test_app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict[str, Any]:
        return body.model_dump(exclude_unset=True)

    @test_app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> dict[str, Any]:
        return body.model_dump(exclude_unset=True)

    with TestClient(test_app) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer(resolve_model_dir("embedded"))


@pytest.fixture(scope="module")
def strings(tokenizer: Any) -> TokenStrings:
    return TokenStrings(tokenizer)


def wire(body: Body) -> Any:
    """A response body as a client reads it: its JSON, parsed."""
    return json.loads(body.to_json())


def as_openai(kind: type[OpenAIBody], body: Body) -> OpenAIBody:
    """A response body as the ``openai`` client reads it: its JSON, as one of the package's
    types (which refuses a body that lacks a field it needs or holds one of the wrong type)."""
    return kind.model_validate_json(body.to_json())


def error_of(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and isinstance(error["message"], str)
    return error


# ---- 1. invalid Unicode --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/v1/completions", r'{"prompt": "a\ud800b"}', "prompt"),
        ("/v1/completions", r'{"prompt": "a\ud800b", "stream": true}', "prompt"),
        ("/v1/completions", r'{"prompt": ["\udfff"]}', "prompt"),
        ("/v1/completions", r'{"prompt": "hi", "stop": ["ok", "\ud800"]}', "stop"),
        (
            "/v1/chat/completions",
            r'{"messages": [{"role": "user", "content": "\ud800"}]}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            r'{"messages": [{"role": "user", "content": "\ud800"}], "stream": true}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "x\udbff"}]}]}',
            "messages.0.content",
        ),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(
    client: TestClient, path: str, raw: str, param: str
) -> None:
    error = error_of(client.post(path, content=raw.encode(), headers=JSON))
    assert error["param"] == param
    assert "lone UTF-16 surrogate" in error["message"] and param in error["message"]


def test_a_field_named_by_a_lone_surrogate_is_still_a_well_formed_400(client: TestClient) -> None:
    raw = r'{"prompt": "hi", "\ud800": 1}'
    error = error_of(client.post("/v1/completions", content=raw.encode(), headers=JSON))
    assert "valid string" in error["message"]


# ---- 3. every field honoured, refused or ignored -------------------------------------------------
REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("functions", {"functions": [{"name": "f"}]}),
    ("function_call", {"function_call": {"name": "f"}}),
    ("modalities", {"modalities": ["text", "audio"]}),
    ("audio", {"audio": {"voice": "alloy", "format": "wav"}}),
    ("prediction", {"prediction": {"type": "content", "content": "x"}}),
    ("reasoning_effort", {"reasoning_effort": "low"}),
    ("verbosity", {"verbosity": "low"}),
    ("web_search_options", {"web_search_options": {}}),
    ("moderation", {"moderation": {"model": "x"}}),
]
REFUSED_COMPLETIONS: list[tuple[str, dict[str, Any]]] = [
    ("best_of", {"best_of": 3}),
    ("echo", {"echo": True}),
    ("suffix", {"suffix": "end"}),
    ("best_of", {"best_of": 2, "n": 3}),
]


@pytest.mark.parametrize(("field", "extra"), REFUSED, ids=[f"chat-{f}" for f, _ in REFUSED])
def test_an_unsupported_chat_field_is_a_400_naming_it(
    client: TestClient, field: str, extra: dict[str, Any]
) -> None:
    response = client.post("/v1/chat/completions", json={"messages": USER, **extra})
    error = error_of(response)
    assert error["param"] == field and error["code"] == "unsupported_parameter"
    assert error["message"].startswith(f"{field} is not supported yet")


@pytest.mark.parametrize(
    ("field", "extra"), REFUSED_COMPLETIONS, ids=[f"cmpl-{f}" for f, _ in REFUSED_COMPLETIONS]
)
def test_an_unsupported_completions_field_is_a_400_naming_it(
    client: TestClient, field: str, extra: dict[str, Any]
) -> None:
    error = error_of(client.post("/v1/completions", json={"prompt": "hi", **extra}))
    assert error["param"] == field and "is not supported yet" in error["message"]


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"n": 17}, "n", "less than or equal to 16"),
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tool_choice",
            "'g', which tools lacks",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools.0.function.name",
            "pattern",
        ),
        (
            {"response_format": {"type": "json_schema"}},
            "response_format.json_schema",
            "json_schema",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "'text'"),
        (
            {
                "tools": [TOOL],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "response_format",
            "cannot be combined with tools",
        ),
        ({"logit_bias": {"x": 1}}, None, "logit_bias"),
        ({"presence_penalty": 3}, None, "presence_penalty"),
    ],
)
def test_bad_values_of_supported_fields_are_400s_naming_them(
    client: TestClient, extra: dict[str, Any], param: str | None, words: str
) -> None:
    response = client.post("/v1/chat/completions", json={"messages": USER, **extra})
    if param is None:  # checked when the sampling parameters are built (test_sampling.py)
        with pytest.raises(ValueError, match=words):
            ChatCompletionRequest.model_validate({"messages": USER, **extra}).sampling_params(
                None, 10
            )
        return
    error = error_of(response)
    assert error["param"] == param and words in error["message"], error


@pytest.mark.parametrize("token", [-1, 1 << 63, 2374254025051500686236823454744576])
def test_a_token_id_no_vocabulary_holds_is_a_400_naming_the_prompt(
    client: TestClient, token: int
) -> None:
    """Ids the replica would refuse anyway, and ids no 64-bit key carries (the router hashes the
    prompt's blocks before any replica sees it: a fuzzer's huge id once left the request
    hanging there), are refused at the ingress."""
    response = client.post("/v1/completions", json={"prompt": [*range(20), token, 5]})
    error = error_of(response)
    assert error["param"] == "prompt" and "[0, 2^63)" in error["message"], error


def test_tool_messages_reach_the_template_in_its_shape(client: TestClient) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    body = ChatCompletionRequest.model_validate({"messages": messages, "tools": [TOOL]})
    shaped = body.template_messages()
    assert shaped[1]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"x": 1}}
    assert shaped[2] == {"role": "tool", "content": "42", "tool_call_id": "c1"}
    assert body.template_tools() == [TOOL] and body.tool_mode() == "auto"
    broken = {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}
    error = error_of(client.post("/v1/chat/completions", json={"messages": [broken]}))
    assert error["param"] == "messages.0.tool_calls.0.function"


def test_tool_modes_constrain_the_reply_to_the_calls_json() -> None:
    weather = {
        "type": "function",
        "function": {
            "name": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    named = ChatCompletionRequest.model_validate(
        {
            "messages": USER,
            "tools": [TOOL, weather],
            "tool_choice": {"type": "function", "function": {"name": "weather"}},
        }
    )
    guided = named.guided()
    assert guided is not None and json.loads(guided.spec or "") == weather["function"]["parameters"]
    required = ChatCompletionRequest.model_validate(
        {"messages": USER, "tools": [TOOL, weather], "tool_choice": "required"}
    ).guided()
    assert required is not None
    schema = json.loads(required.spec or "")
    assert schema["type"] == "array" and len(schema["items"]["anyOf"]) == 2
    assert wire(parse_tool_calls("named", '{"city": "Paris"}', "weather")[1][0].function) == {
        "name": "weather",
        "arguments": '{"city": "Paris"}',
    }
    content, calls = parse_tool_calls("required", '[{"name": "f", "arguments": {}}]')
    assert content == "" and calls[0].function.name == "f"
    call = '{"name": "weather", "arguments": {"city": "Oslo"}}'
    hermes = f"Let me look.\n<tool_call>\n{call}\n</tool_call>"
    content, calls = parse_tool_calls("auto", hermes)
    assert content == "Let me look." and json.loads(calls[0].function.arguments) == {"city": "Oslo"}
    assert parse_tool_calls("auto", "no call here") == ("no call here", [])
    assert parse_tool_calls("required", '[{"name": "f", "argu') == ('[{"name": "f", "argu', [])
    choice = chat_choice(0, content, "stop", None, calls)
    reply = as_openai(ChatCompletion, reply_body("chatcmpl-1", "m", True, [choice], 3, 9))
    assert reply.choices[0].finish_reason == "tool_calls"
    assert reply.choices[0].message.tool_calls[0].function.name == "weather"
    assert emits_hermes_tool_calls("{{ '<tool_call>' }}")
    assert not emits_hermes_tool_calls(None)


def test_response_format_becomes_a_grammar() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    body = ChatCompletionRequest.model_validate({"messages": USER, "response_format": fmt})
    params = body.sampling_params(None, 10, body.guided())
    assert params.guided is not None and json.loads(params.guided.spec or "") == schema
    plain = {"messages": USER, "response_format": {"type": "json_object"}}
    assert ChatCompletionRequest.model_validate(plain).guided().kind == "json_object"  # type: ignore[union-attr]


def test_n_choices_get_their_own_seeds() -> None:
    body = CompletionRequest.model_validate({"prompt": "hi", "n": 3, "seed": 5})
    assert [body.sampling_params(None, 10, None, i).seed for i in range(3)] == [5, 6, 7]


def test_content_parts_other_than_text_are_400s_naming_them(client: TestClient) -> None:
    image = [{"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {}}]
    body = {"messages": [{"role": "user", "content": image}]}
    error = error_of(client.post("/v1/chat/completions", json=body))
    assert error["param"] == "messages.0.content.1.type"
    assert "'image_url' is not supported yet" in error["message"]


NEUTRAL_CHAT = {
    "presence_penalty": 0,
    "frequency_penalty": 0.0,
    "logit_bias": {},
    "n": 1,
    "tools": [],
    "tool_choice": "none",
    "functions": None,
    "function_call": "auto",
    "response_format": {"type": "text"},
    "modalities": ["text"],
    "audio": None,
    "reasoning_effort": None,
}
NEUTRAL_COMPLETIONS = {"best_of": 1, "echo": False, "suffix": None, "n": None, "logit_bias": None}


def test_unsupported_fields_at_their_neutral_values_are_accepted(client: TestClient) -> None:
    chat = client.post("/v1/chat/completions", json={"messages": USER, **NEUTRAL_CHAT})
    assert chat.status_code == 200, chat.text
    completions = client.post("/v1/completions", json={"prompt": "hi", **NEUTRAL_COMPLETIONS})
    assert completions.status_code == 200, completions.text


def test_ignored_fields_are_accepted_and_dropped(client: TestClient) -> None:
    chat_extra = {name: {"any": ["value"]} for name in IGNORED["chat"]}
    messages = [{"role": "user", "content": "hi", "name": "ada"}]
    chat = client.post("/v1/chat/completions", json={"messages": messages, **chat_extra})
    assert chat.status_code == 200, chat.text
    assert chat.json() == {"messages": [{"role": "user", "content": "hi"}]}
    completions = client.post("/v1/completions", json={"prompt": "hi", "user": 5})
    assert completions.status_code == 200 and completions.json() == {"prompt": "hi"}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "hi", "typical_p": 0.9}, "typical_p"),
        ("/v1/chat/completions", {"messages": USER, "top_a": 0.1}, "top_a"),
        ("/v1/chat/completions", {"messages": [{**USER[0], "cache": 1}]}, "messages.0.cache"),
        (
            "/v1/completions",
            {"prompt": "hi", "stream": True, "stream_options": {"x": 1}},
            "stream_options.x",
        ),
    ],
)
def test_an_unknown_field_is_a_400_naming_it(
    client: TestClient, path: str, body: dict[str, Any], param: str
) -> None:
    error = error_of(client.post(path, json=body))
    assert error["param"] == param and error["code"] == "unknown_parameter"
    assert f"{param}: unknown field" in error["message"]


def openai_fields(params: Any) -> set[str]:
    return set(params.CompletionCreateParamsBase.__annotations__) | {"stream"}


@pytest.mark.parametrize(
    ("params", "model", "scope"),
    [
        (openai_chat_params, ChatCompletionRequest, "chat"),
        (openai_completion_params, CompletionRequest, "completions"),
    ],
)
def test_every_field_of_the_openai_package_is_honoured_refused_or_ignored(
    params: Any, model: type[SamplingFields], scope: str
) -> None:
    fields = openai_fields(params)
    undecided = fields - set(model.model_fields) - IGNORED[scope]
    assert not undecided, f"decide whether vattn honours, refuses or ignores {undecided}"
    assert not (set(model.model_fields) & IGNORED[scope])


def test_stream_options_include_usage_is_accepted_with_stream_only(client: TestClient) -> None:
    options = {"include_usage": True}
    body = {"messages": USER, "stream": True, "stream_options": options}
    assert ChatCompletionRequest.model_validate(body).include_usage
    assert not ChatCompletionRequest.model_validate({**body, "stream_options": None}).include_usage
    error = error_of(client.post("/v1/chat/completions", json={**body, "stream": False}))
    assert error["param"] == "stream_options" and "stream: true" in error["message"]
    obfuscated = {**body, "stream_options": {"include_obfuscation": True}}
    error = error_of(client.post("/v1/chat/completions", json=obfuscated))
    assert error["param"] == "stream_options.include_obfuscation"


def test_top_logprobs_are_bounded_and_need_logprobs(client: TestClient) -> None:
    error = error_of(
        client.post("/v1/chat/completions", json={"messages": USER, "top_logprobs": 2})
    )
    assert error["param"] == "top_logprobs" and "logprobs: true" in error["message"]
    body = {"messages": USER, "logprobs": True, "top_logprobs": 21}
    assert error_of(client.post("/v1/chat/completions", json=body))["param"] == "top_logprobs"
    ok = ChatCompletionRequest.model_validate({**body, "top_logprobs": 20})
    assert ok.logprobs_asked() == 20
    assert ChatCompletionRequest.model_validate({"messages": USER}).logprobs_asked() is None
    assert (
        ChatCompletionRequest.model_validate({"messages": USER, "logprobs": True}).logprobs_asked()
        == 0
    )
    error = error_of(client.post("/v1/completions", json={"prompt": "hi", "logprobs": 21}))
    assert error["param"] == "logprobs"


# ---- 2. request limits ---------------------------------------------------------------------------
def test_the_token_alphabet_gives_each_tokens_exact_bytes(
    tokenizer: Any, strings: TokenStrings
) -> None:
    text = "Hé, 東京 \U0001f600 ok\n   indented\tcode <|im_end|>"
    ids = tokenizer.encode(text)
    assert b"".join(strings.bytes(i) or b"" for i in ids) == text.encode()
    assert strings.text(2) == "<|im_end|>" and strings.text(10**9) == "token_id:1000000000"
    longest = max(len(tokenizer.decode([i]).encode()) for i in range(len(tokenizer)))
    assert strings.max_bytes == longest == 81  # a newline and 80 spaces


def test_a_prompt_with_more_characters_than_the_context_can_hold_is_refused_unread() -> None:
    limits = RequestLimits(context_tokens=4096, max_token_bytes=81)
    assert limits.prompt_too_long(4096 * 81) is None
    reason = limits.prompt_too_long(4096 * 81 + 1)
    assert reason is not None and "exceeds the context limit of 4096 tokens" in reason
    assert limits.max_body_bytes == 6 * 4096 * 81 + (1 << 20)


class FakeIngress:
    """What ``VattnIngress`` keeps, without Serve: its class's methods run on this state."""

    cls = ingress.VattnIngress.func_or_class

    def __new__(cls, tokenizer: Any) -> Any:
        instance = object.__new__(FakeIngress.cls)
        instance.tokenizer = tokenizer
        return instance


def test_tokenize_refuses_a_prompt_too_long_by_its_characters_before_tokenizing() -> None:
    class Untouchable:
        def encode(self, text: str) -> list[int]:
            raise AssertionError("tokenized a prompt that cannot fit")

    fake = FakeIngress(Untouchable())
    limits = RequestLimits(context_tokens=10, max_token_bytes=4)
    with pytest.raises(api_errors.ApiError) as refused:
        asyncio.run(fake.tokenize("x" * 41, limits, "prompt"))
    assert refused.value.status == 400
    assert refused.value.payload.error.code == "context_length_exceeded"


def test_health_answers_while_a_prompt_is_being_tokenized() -> None:
    started, release = threading.Event(), threading.Event()

    class SlowTokenizer:
        def encode(self, text: str) -> list[int]:
            started.set()
            assert release.wait(30), "the test never released the tokenizer"
            return [7, 8, 9]

    fake = FakeIngress(SlowTokenizer())
    limits = RequestLimits(context_tokens=100, max_token_bytes=4)

    async def scenario() -> None:
        tokenizing = asyncio.create_task(fake.tokenize("a big prompt", limits, "prompt"))
        await wait_until_async(started.is_set, 30, "the tokenizer to start")
        # The tokenizer is blocked in its thread; the event loop still answers /health.
        assert await asyncio.wait_for(fake.health(), 5) == {"status": "ok"}
        assert not tokenizing.done()
        release.set()
        assert await tokenizing == (7, 8, 9)

    asyncio.run(scenario())


def test_a_chat_template_that_raises_is_a_400_naming_messages() -> None:
    from jinja2 import TemplateError

    class Alternating:
        chat_template = "{{ raise_exception('roles must alternate') }}"

        def apply_chat_template(self, *args: Any, **kwargs: Any) -> str:
            raise TemplateError("roles must alternate user/assistant")

    fake = FakeIngress(Alternating())
    fake._info = ModelInfo("m", 100, 16.0)
    fake.tokens = TokenStrings(None)
    body = ChatCompletionRequest.model_validate({"messages": USER * 2, "tools": [TOOL]})
    body = body.model_copy(update={"tool_choice": "none"})
    with pytest.raises(api_errors.ApiError) as refused:
        asyncio.run(fake.chat_completions(body))
    error = refused.value.payload.error
    assert refused.value.status == 400 and error.param == "messages"
    assert "roles must alternate" in error.message


def random_texts(count: int, seed: int) -> list[str]:
    """Seeded random strings from all over Unicode, lone surrogates included, 0-12 characters."""
    rng = random.Random(seed)
    planes = [(0x20, 0x7F), (0xA0, 0x2FFF), (0xD800, 0xDFFF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    texts = []
    for _ in range(count):
        low, high = rng.choice(planes)
        texts.append("".join(chr(rng.randint(low, high)) for _ in range(rng.randint(0, 12))))
    return texts


def test_1000_random_unicode_strings_never_give_a_500(tokenizer: Any) -> None:
    """The ingress's path from body to the replica's request (validation, chat template,
    tokenizer, limits, sampling parameters) on 1,000 random strings as prompts, messages and
    stop strings: each is a 200 or a 400, never an exception (TestClient re-raises those)."""
    fake = FakeIngress(tokenizer)
    limits = RequestLimits(context_tokens=1024, max_token_bytes=16)
    test_app = FastAPI()
    test_app.add_exception_handler(RequestValidationError, api_errors.answer_validation_error)  # type: ignore[arg-type]
    test_app.add_exception_handler(api_errors.ApiError, api_errors.answer_api_error)  # type: ignore[arg-type]

    @test_app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict[str, Any]:
        assert isinstance(body.prompt, str)
        ids = await fake.tokenize(body.prompt, limits, "prompt")
        return {"ids": fake.reply("cmpl", ids, body, None, limits, "prompt").requests[0].max_tokens}

    @test_app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> dict[str, Any]:
        ids = fake.chat_ids(body.template_messages(), body.template_tools())
        reply = fake.reply("chatcmpl", ids, body, None, limits, "messages", body.guided())
        return {"ids": reply.requests[0].max_tokens}

    statuses = []
    with TestClient(test_app) as test_client:
        for i, text in enumerate(random_texts(1000, seed=1000)):
            quoted = json.dumps(text)  # lone surrogates travel as \udXXX escapes
            if i % 3 == 0:
                raw = f'{{"prompt": {quoted}}}'
                response = test_client.post("/v1/completions", content=raw, headers=JSON)
            elif i % 3 == 1:
                raw = f'{{"messages": [{{"role": "user", "content": {quoted}}}]}}'
                response = test_client.post("/v1/chat/completions", content=raw, headers=JSON)
            else:
                raw = f'{{"prompt": "hi", "stop": [{quoted}]}}'
                response = test_client.post("/v1/completions", content=raw, headers=JSON)
            assert response.status_code in (200, 400), response.text
            statuses.append(response.status_code)
    assert statuses.count(200) > 500 and statuses.count(400) > 100


def test_the_app_as_serve_copies_it_still_reads_the_request_bodies() -> None:
    """``@serve.ingress`` copies the app (cloudpickle) for its replicas: there too each request
    model is the body (a model FastAPI cannot resolve in the copy would be a query parameter)."""
    from ray import cloudpickle

    copied = cloudpickle.loads(cloudpickle.dumps(ingress.app))
    copied.openapi_schema = None  # built again from the copy's routes
    paths = copied.openapi()["paths"]
    for path in ("/v1/completions", "/v1/chat/completions"):
        operation = paths[path]["post"]
        assert "requestBody" in operation and not operation.get("parameters"), path


def echo_app() -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})

    return app


def test_a_body_bigger_than_any_prompt_that_fits_is_a_413_before_it_is_parsed() -> None:
    limits = RequestLimits(context_tokens=1, max_token_bytes=1)  # 6 B + 1 MiB
    limit = limits.max_body_bytes

    async def limits_of_ingress() -> RequestLimits:
        return limits

    guarded = request_guards.BodyLimit(echo_app(), limits_of_ingress)

    async def post(path: str, content: Any) -> httpx.Response:
        transport = httpx.ASGITransport(app=guarded)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return await http.post(path, content=content)

    async def chunks(total: int) -> Any:  # no Content-Length: the size is counted as it comes
        for _ in range(total // 65536):
            yield b"x" * 65536

    fits = asyncio.run(post("/v1/completions", b"x" * limit))
    assert fits.status_code == 200 and fits.text == str(limit)  # replayed whole to the app
    for content in (b"x" * (limit + 1), chunks(limit + 65536)):
        error = error_of(asyncio.run(post("/v1/completions", content)), 413)
        assert error["code"] == "request_too_large" and "1 tokens" in error["message"]
    assert asyncio.run(post("/other", b"x" * (limit + 1))).status_code == 200  # only /v1/


# ---- 5. default max_tokens -----------------------------------------------------------------------
def test_without_max_tokens_a_request_may_generate_the_rest_of_the_context() -> None:
    limits = RequestLimits(context_tokens=100, max_token_bytes=4)
    plain = ChatCompletionRequest.model_validate({"messages": USER})

    def max_tokens(prefix: str, ids: tuple[int, ...], body: Any, logprobs: Any, param: str) -> int:
        reply = FakeIngress.cls.reply(prefix, ids, body, logprobs, limits, param)
        return reply.requests[0].max_tokens

    assert max_tokens("chatcmpl", (1,) * 30, plain, None, "messages") == 70
    newer = ChatCompletionRequest.model_validate({"messages": USER, "max_completion_tokens": 5})
    assert max_tokens("c", (1,) * 30, newer, None, "messages") == 5
    both = ChatCompletionRequest.model_validate(
        {"messages": USER, "max_tokens": 9, "max_completion_tokens": 5}
    )
    assert both.requested_max_tokens() == 5
    completion = CompletionRequest.model_validate({"prompt": [1, 2]})
    assert max_tokens("c", (1, 2), completion, 3, "prompt") == 98
    with pytest.raises(api_errors.ApiError) as full:
        max_tokens("c", (1,) * 100, completion, None, "prompt")
    assert "exceeds the context limit of 100 tokens" in full.value.payload.error.message
    three = CompletionRequest.model_validate({"prompt": [1, 2], "n": 3, "seed": 1})
    reply = FakeIngress.cls.reply("cmpl", (1, 2), three, None, limits, "prompt")
    assert len({r.request_id for r in reply.requests}) == 3
    assert [r.params.seed for r in reply.requests] == [1, 2, 3]
    assert full.value.payload.error.param == "prompt"


def test_vattn_generate_defaults_to_the_rest_of_the_context() -> None:
    parser = replica_cli.argparse.ArgumentParser()
    replica_cli.add_commands(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["generate", "hi"]).max_tokens is None
    assert parser.parse_args(["generate", "hi", "--max-tokens", "7"]).max_tokens == 7

    class Engine:
        context_limit = 50

        def tokenize(self, prompt: str) -> tuple[int, ...]:
            return tuple(range(len(prompt.split())))

    assert replica_cli.rest_of_context(Engine(), "three word prompt") == 47
    assert replica_cli.rest_of_context(Engine(), "w " * 80) == 1  # the engine refuses it


# ---- 4. logprobs' shapes -------------------------------------------------------------------------
def test_chat_logprobs_have_openais_shape(tokenizer: Any, strings: TokenStrings) -> None:
    ids = tokenizer.encode(" Paris 東")
    logprobs = Logprobs(strings, chat=True)
    tops = [((t, -0.25), (tokenizer.encode(" London")[0], -3.0)) for t in ids]
    logprobs.add(ids[:2], [-0.25, -0.5], tops[:2])
    first = logprobs.take()
    logprobs.add(ids[2:], [-0.75] * (len(ids) - 2), tops[2:])
    rest = logprobs.take()
    content = wire(first)["content"] + wire(rest)["content"]
    assert [e["token"] for e in content] == [strings.text(i) for i in ids]
    assert b"".join(bytes(e["bytes"]) for e in content) == " Paris 東".encode()
    assert content[0]["logprob"] == -0.25 and content[1]["logprob"] == -0.5
    assert [t["token"] for t in content[0]["top_logprobs"]] == [strings.text(ids[0]), " London"]
    assert set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert set(content[0]["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    whole = ChatLogprobs(content=first.content + rest.content, refusal=None)  # type: ignore[union-attr]
    reply = as_openai(
        ChatCompletion,
        reply_body("chatcmpl-1", "m", True, [chat_choice(0, " Paris 東", "stop", whole)], 3, 9),
    )
    assert reply.choices[0].logprobs.content[0].top_logprobs[1].logprob == -3.0
    chunk = as_openai(
        ChatCompletionChunk, chat_chunk("chatcmpl-1", "m", Delta(content=" Paris"), None, first)
    )
    assert chunk.choices[0].logprobs.content[1].token == strings.text(ids[1])


def test_completion_logprobs_have_openais_shape(tokenizer: Any, strings: TokenStrings) -> None:
    text = "ok 😀!"
    ids = tokenizer.encode(text)
    logprobs = Logprobs(strings, chat=False)
    other = tokenizer.encode(" no")[0]
    logprobs.add(ids, [-1.0] * len(ids), [((other, -0.5),)] * len(ids))
    taken = logprobs.take()
    shaped = wire(taken)
    assert set(shaped) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert shaped["tokens"] == [strings.text(i) for i in ids]
    assert shaped["token_logprobs"] == [-1.0] * len(ids)
    # The `logprobs` most likely tokens, and the chosen one.
    assert shaped["top_logprobs"][0] == {" no": -0.5, strings.text(ids[0]): -1.0}
    # Where each token's text starts in the completion; a token ending inside a character starts
    # where the character does.
    starts = [text.encode()[: sum(len(strings.bytes(j)) for j in ids[:i])] for i in range(len(ids))]
    assert shaped["text_offset"] == [len(s.decode(errors="ignore")) for s in starts]
    choice = completion_choice(0, text, "length", taken)
    reply = as_openai(Completion, reply_body("cmpl-1", "m", False, [choice], 1, 5))
    assert reply.choices[0].logprobs.text_offset == shaped["text_offset"]


def test_logprobs_json_can_carry() -> None:
    strings = TokenStrings(None)
    logprobs = Logprobs(strings, chat=True)
    logprobs.add((5,), (float("-inf"),), (((6, float("nan")),),))
    [entry] = wire(logprobs.take())["content"]
    assert entry == {
        "token": "token_id:5",
        "logprob": -9999.0,
        "bytes": None,
        "top_logprobs": [{"token": "token_id:6", "logprob": -9999.0, "bytes": None}],
    }
    json.dumps(entry, allow_nan=False)


def scripted_reply(tokenizer: Any, body: Any, text: str) -> list[Any]:
    """What the ingress answers ``body`` (streamed: its events' bodies, as JSON) when the replica
    generates ``text`` a token an output and then EOS, which ends the request and is not output."""
    ids = tokenizer.encode(text)
    outputs, out = [], ""
    for i, t in enumerate(ids):
        so_far = tokenizer.decode(ids[: i + 1])
        piece = "" if so_far.endswith("\ufffd") else so_far[len(out) :]  # a character's end
        out += piece
        outputs.append(ingress.RequestOutput("r", piece, (t,), False, None, 3, i + 1, (-0.5,)))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    n = len(ids) + 1
    outputs.append(
        ingress.RequestOutput("r", "", (eos,), True, "stop", 3, n, (-0.1,), stop_token=True)
    )
    accepted = ingress.RequestOutput("r", "", (), False, None, 3, 0)

    class Stream:
        async def __aiter__(self) -> Any:
            for output in outputs:
                yield output

        def cancel(self) -> None:
            pass

    async def start(request: Any) -> Any:
        return Stream(), accepted

    fake = FakeIngress(tokenizer)
    fake.tokens = TokenStrings(tokenizer)
    fake.start = start
    chat = isinstance(body, ChatCompletionRequest)
    logprobs = body.logprobs_asked() if chat else body.logprobs
    limits = RequestLimits(context_tokens=100, max_token_bytes=4)
    prefix = "chatcmpl" if chat else "cmpl"
    reply = FakeIngress.cls.reply(prefix, (1, 2, 3), body, logprobs, limits, "prompt")
    response = asyncio.run(fake.answer(reply, ModelInfo("m", 100, 16.0), body, logprobs))
    if not body.stream:
        return [json.loads(response.body)]

    async def read() -> list[str]:
        return [event async for event in response.body_iterator]

    events = asyncio.run(read())
    assert events[-1] == "data: [DONE]\n\n"
    return [json.loads(event[6:]) for event in events[:-1]]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_leave_out_the_stop_token_as_the_content_does(
    tokenizer: Any, stream: bool
) -> None:
    """OpenAI's logprobs never hold the token that ended the reply: joined, their tokens are the
    content, not the content and ``<|im_end|>``."""
    text = "The capital of France is Paris. 東京"
    body = ChatCompletionRequest.model_validate(
        {"messages": USER, "logprobs": True, "top_logprobs": 1, "stream": stream}
    )
    bodies = scripted_reply(tokenizer, body, text)
    if stream:
        chunks = [ChatCompletionChunk.model_validate(b) for b in bodies]
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        entries = [
            e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content
        ]
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert chunks[-1].choices[0].logprobs is None  # the stop token's chunk: none, as OpenAI's
        usage = chunks[-1].usage
    else:
        reply = ChatCompletion.model_validate(bodies[0])
        content = reply.choices[0].message.content or ""
        entries = reply.choices[0].logprobs.content  # type: ignore[union-attr]
        usage = reply.usage
    assert content == text
    assert b"".join(bytes(e.bytes or ()) for e in entries).decode() == text
    assert "<|im_end|>" not in "".join(e.token for e in entries)
    assert len(entries) == len(tokenizer.encode(text))
    assert usage is not None and usage.completion_tokens == len(entries) + 1  # EOS was generated


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_leave_out_the_stop_token_as_the_text_does(
    tokenizer: Any, stream: bool
) -> None:
    text = "Paris is the capital of France."
    body = CompletionRequest.model_validate({"prompt": "hi", "logprobs": 0, "stream": stream})
    bodies = scripted_reply(tokenizer, body, text)
    if not stream:
        Completion.model_validate(bodies[0])
    choices = [b["choices"][0] for b in bodies if b["choices"]]
    completed = "".join(c["text"] for c in choices)
    tokens = [t for c in choices if c["logprobs"] for t in c["logprobs"]["tokens"]]
    offsets = [o for c in choices if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert choices[-1]["finish_reason"] == "stop"
    assert completed == text and "".join(tokens) == text
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]


# ---- 3. include_usage, 6. model cards ------------------------------------------------------------
def test_the_usage_chunk_has_no_choices_and_the_usage() -> None:
    chunk = as_openai(ChatCompletionChunk, usage_chunk("chatcmpl-1", "m", True, 7, 3))
    assert chunk.choices == [] and chunk.usage.total_tokens == 10
    completion = as_openai(Completion, usage_chunk("cmpl-1", "m", False, 7, 3))
    assert completion.choices == [] and completion.usage.completion_tokens == 3


def test_the_model_card_is_an_openai_model() -> None:
    card = as_openai(Model, model_card("SmolLM2-135M-Instruct", 4096))
    assert card.id == "SmolLM2-135M-Instruct" and card.object == "model"


# ---- 7. tool calls: Hermes blocks into OpenAI's tool_calls ---------------------------------------
CALL = {"name": "weather", "arguments": {"city": "Oslo"}}
OSLO = ("weather", '{"city": "Oslo"}')


def hermes(call: Any) -> str:
    return f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>"


def streamed(mode: str, pieces: list[str], named: str | None = None) -> list[Delta]:
    stream = ToolCallStream(mode, named)
    deltas = [delta for piece in pieces for delta in stream.feed(piece)]
    return deltas + stream.finish()


def named_arguments(calls: list[ToolCall]) -> list[tuple[str, str]]:
    return [(call.function.name, call.function.arguments) for call in calls]


DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (f"Let me look.\n{hermes(CALL)}", "Let me look.", [OSLO]),
        (
            f"{hermes(CALL)}\n{hermes({'name': 'now', 'arguments': {}})}\n",
            "",
            [OSLO, ("now", "{}")],
        ),
        (f"{hermes(CALL)}\nDone.", "Done.", [OSLO]),
        (f"a {hermes(CALL)} b {hermes(CALL)} c", "a b c", [OSLO, OSLO]),
        (f"{hermes(CALL)}\n \n{hermes(CALL)}\n", "", [OSLO, OSLO]),
        ('<tool_call>{"name": "f"}</tool_call>', "", [("f", "{}")]),
        (
            '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>',
            "",
            [("f", '{"x": 1}')],
        ),
        (hermes({"name": "f", "arguments": {"q": "東京 😀"}}), "", [("f", '{"q": "東京 😀"}')]),
        # Malformed, cut off or not a call: the text stays content, markup and all.
        ("a <tool_call>{not json}</tool_call> b", "a <tool_call>{not json}</tool_call> b", []),
        ("<tool_call>[1]</tool_call>", "<tool_call>[1]</tool_call>", []),
        (
            '<tool_call>{"arguments": {}}</tool_call>',
            '<tool_call>{"arguments": {}}</tool_call>',
            [],
        ),
        (
            '<tool_call>{"name": "", "arguments": {}}</tool_call>',
            '<tool_call>{"name": "", "arguments": {}}</tool_call>',
            [],
        ),
        (
            '<tool_call>{"name": "f", "arguments": 3}</tool_call>',
            '<tool_call>{"name": "f", "arguments": 3}</tool_call>',
            [],
        ),
        (f"<tool_call>{DEEP}</tool_call>", f"<tool_call>{DEEP}</tool_call>", []),
        ('cut <tool_call>\n{"name": "f", "argu', 'cut <tool_call>\n{"name": "f", "argu', []),
        ("x < y and <tool_ca", "x < y and <tool_ca", []),
        ("</tool_call> first", "</tool_call> first", []),
        (f"ok {hermes(CALL)} then <tool_call>{{bad", "ok then <tool_call>{bad", [OSLO]),
        (f"{hermes(CALL)}\n<tool_call>{{bad}}</tool_call>", "<tool_call>{bad}</tool_call>", [OSLO]),
        ("no call here ", "no call here ", []),
    ],
)
def test_hermes_blocks_become_calls_and_the_rest_stays_content(
    text: str, content: str, calls: list[tuple[str, str]]
) -> None:
    got_content, got_calls = parse_tool_calls("auto", text)
    assert (got_content, named_arguments(got_calls)) == (content, calls)
    assert all(c.id.startswith("call-") and c.type == "function" for c in got_calls)
    assert len({c.id for c in got_calls}) == len(got_calls)
    choice = chat_choice(0, got_content, "stop", None, got_calls)
    reply = as_openai(ChatCompletion, reply_body("chatcmpl-1", "m", True, [choice], 3, 9))
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == ("tool_calls" if calls else "stop")
    assert message.content == (content or None if calls else content)
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls or ()] == calls
    # Streamed a character at a time: the same content and calls, and no call's markup as content.
    deltas = streamed("auto", list(text))
    assert named_arguments(merge_deltas(deltas)[1]) == calls
    assert "".join(d.content or "" for d in deltas) == content


def test_a_streams_tool_call_deltas_are_shaped_as_openais() -> None:
    """Each call: a delta with its index, id, type, name and empty arguments, then its arguments;
    the `openai` package's stream accumulator rebuilds the reply from the chunks."""
    from openai.lib.streaming.chat import ChatCompletionStreamState

    text = f"Looking.\n{hermes(CALL)}\n{hermes({'name': 'now', 'arguments': {}})}"
    deltas = streamed("auto", [text[:20], text[20:50], text[50:]])
    shown = [wire(delta) for delta in deltas]
    assert shown[0] == {"content": "Looking."}
    heads = [d["tool_calls"][0] for d in shown if "id" in d.get("tool_calls", [{}])[0]]
    assert [(h["index"], h["type"], h["function"]) for h in heads] == [
        (0, "function", {"name": "weather", "arguments": ""}),
        (1, "function", {"name": "now", "arguments": ""}),
    ]
    assert {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]} in shown
    state = ChatCompletionStreamState()
    for i, delta in enumerate([Delta(role="assistant"), *deltas]):
        reason = "tool_calls" if i == len(deltas) else None
        state.handle_chunk(as_openai(ChatCompletionChunk, chat_chunk("c-1", "m", delta, reason)))
    final = state.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and final.message.content == "Looking."
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == [
        OSLO,
        ("now", "{}"),
    ]


def test_named_and_required_modes_stream_as_calls() -> None:
    deltas = streamed("named", ['{"city"', ': "Paris"}'], named="weather")
    assert named_arguments(merge_deltas(deltas)[1]) == [("weather", '{"city": "Paris"}')]
    assert len(deltas) == 3 and wire(deltas[0])["tool_calls"][0]["function"]["arguments"] == ""
    pieces = ['[{"name": "f", "arg', 'uments": {}}]']
    assert named_arguments(merge_deltas(streamed("required", pieces))[1]) == [("f", "{}")]
    for broken in ("5", "{}", '[{"name": "f"}]', '[{"name": "f", "argu'):
        assert parse_tool_calls("required", broken) == (broken, [])
    assert parse_tool_calls("none", hermes(CALL)) == (hermes(CALL), [])


def test_a_call_whose_json_escapes_a_lone_surrogate_still_serialises() -> None:
    """JSON text may escape a lone surrogate (``\\ud800``), which no response can carry as a
    character: in arguments it stays escaped (the same JSON value); a name with one is no call."""
    escaped = '<tool_call>{"name": "f", "arguments": {"q": "a\\ud800b"}}</tool_call>'
    for mode, text in (("auto", escaped), ("required", '[{"name": "f", "arguments": "\\udfff"}]')):
        content, calls = parse_tool_calls(mode, text)
        reply = as_openai(
            ChatCompletion,
            reply_body("c-1", "m", True, [chat_choice(0, content, "stop", None, calls)], 3, 9),
        )
        [call] = reply.choices[0].message.tool_calls or []
        assert json.loads(call.function.arguments) in ({"q": "a\ud800b"}, "\udfff")
    nameless = '<tool_call>{"name": "\\ud800", "arguments": {}}</tool_call>'
    assert parse_tool_calls("auto", nameless) == (nameless, [])


FRAGMENTS = st.sampled_from(
    [
        "<tool_call>",
        "</tool_call>",
        hermes(CALL),
        '{"name": "f", "arguments": {}}',
        "<",
        "<tool",
        "_call>",
        "</tool_",
        "{",
        "\n",
        " ",
        "hi",
        "é東😀",
        "\u202e\u0301",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    text=st.lists(st.one_of(FRAGMENTS, st.text(max_size=4)), max_size=12).map("".join),
    cuts=st.lists(st.integers(0, 200), max_size=8),
)
def test_a_stream_cut_anywhere_gives_the_whole_replys_content_and_calls(
    text: str, cuts: list[int]
) -> None:
    points = sorted({min(cut, len(text)) for cut in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]
    deltas = streamed("auto", pieces)
    content, calls = merge_deltas(deltas)
    whole_content, whole_calls = parse_tool_calls("auto", text)
    assert (content, named_arguments(calls)) == (whole_content, named_arguments(whole_calls))
    if not calls:
        assert content == text
    for delta in deltas:
        shown = wire(delta)
        assert len(shown) == 1 and (shown.get("content") or shown.get("tool_calls"))
        as_openai(ChatCompletionChunk, chat_chunk("c-1", "m", delta, None))


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=6))
CALLS = st.builds(
    lambda name, arguments: {"name": name, "arguments": arguments},
    st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True),
    st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=3),
).filter(lambda call: "</tool_call>" not in json.dumps(call, ensure_ascii=False))
PROSE = st.text(max_size=12).filter(lambda text: "<tool_call>" not in text)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(first=PROSE, rest=st.lists(st.tuples(CALLS, PROSE), max_size=4))
def test_calls_come_back_with_the_prose_between_them(
    first: str, rest: list[tuple[dict[str, Any], str]]
) -> None:
    text = first + "".join(hermes(call) + prose for call, prose in rest)
    content, calls = parse_tool_calls("auto", text)
    expected = [(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c, _ in rest]
    assert named_arguments(calls) == expected
    said = ""  # the whitespace before a call goes, and after it unless it separates content
    for i, prose in enumerate([first, *(p for _, p in rest)]):
        prose = prose.rstrip() if i < len(rest) else prose
        if i and not said:
            prose = prose.lstrip()
        said += "" if i and not prose.strip() else prose
    assert content == said


def test_a_tool_mode_stream_holds_back_only_what_may_be_markup() -> None:
    """The ingress's SSE on a scripted choice: the text before the call streams as it comes, the
    markup never does, logprobs of held tokens come with the next chunk, and the last chunk
    finishes with tool_calls."""
    fake = FakeIngress(None)
    fake.tokens = TokenStrings(None)
    pieces = ["Let me", " check.", "\n<tool", '_call>\n{"name": "weather", ', '"arguments": ']
    pieces += ['{"city": "Oslo"}}\n</tool_', "call>", ""]

    class Stream:
        async def __aiter__(self) -> Any:
            for i, piece in enumerate(pieces):
                done = i == len(pieces) - 1
                yield ingress.RequestOutput(
                    "r", piece, (i,), done, "stop" if done else None, 3, i + 1, (-0.5,)
                )

        def cancel(self) -> None:
            pass

    body = ChatCompletionRequest.model_validate({"messages": USER, "stream": True})
    limits = RequestLimits(context_tokens=100, max_token_bytes=4)
    reply = FakeIngress.cls.reply("chatcmpl", (1, 2, 3), body, 0, limits, "messages")
    accepted = ingress.RequestOutput("r", "", (), False, None, 3, 0)
    logprobs = [Logprobs(fake.tokens, chat=True)]
    tools = ingress.Tools("auto", None)
    response = fake.sse(
        reply, [Stream()], accepted, ModelInfo("m", 100, 16.0), logprobs, False, tools
    )

    async def read() -> list[str]:
        return [event async for event in response.body_iterator]  # type: ignore[misc]

    events = asyncio.run(read())
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [ChatCompletionChunk.model_validate_json(e[6:]) for e in events[:-1]]
    deltas = [c.choices[0].delta for c in chunks]
    assert [d.content for d in deltas if d.content] == ["Let me", " check."]
    calls = [t for d in deltas for t in d.tool_calls or ()]
    assert calls[0].function.name == "weather" and calls[0].id
    assert "".join(t.function.arguments or "" for t in calls) == '{"city": "Oslo"}'
    tokens = [
        e.token for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert tokens == [f"token_id:{i}" for i in range(len(pieces))]
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(pieces)
