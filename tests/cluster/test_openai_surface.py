"""The OpenAI surface of the live app, with the real `openai` client (and raw HTTP where a client
cannot send the body): invalid Unicode (and 1,000 random strings: never a 500), request limits,
refused / ignored / unknown fields, include_usage, logprobs, the default max_tokens,
``/v1/models/{id}``, penalties and logit_bias, n choices, structured outputs and tool calls
(named and required on SmolLM2; auto on a scripted Qwen-style model at ``/qwen``).

Three apps: the embedded SmolLM2 at ``/`` with a 1,024-token context (small limits, quick default
generations), at ``/big`` a small random Llama with the embedded tokenizer and a 65,536-token
context, whose biggest acceptable prompts take the ingress a while to tokenize, and at ``/qwen`` a
Qwen-style model whose greedy reply is a scripted tool call.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from ray import serve

from cluster.app import AppOptions, build_app
from replica.model import embedded_model_dir
from replica.model.source import load_tokenizer
from tests.byte_tokenizer import save_scripted_qwen
from tests.cluster.conftest import BASE_URL
from tests.models import save_random_llama

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
CONTEXT = 1024
BIG_CONTEXT = 65536
SEA = [{"role": "user", "content": "Write one sentence about the sea."}]
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def served(ray_session: None) -> Iterator[openai.OpenAI]:
    options = AppOptions(model="embedded", max_running=8, replica_cpus=1, max_model_len=CONTEXT)
    serve.run(build_app(options), name="openai-surface", route_prefix="/")
    try:
        yield openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        serve.delete("openai-surface")


@pytest.fixture(scope="module")
def big(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = save_random_llama(
        tmp_path_factory.mktemp("big-context"),
        0,
        vocab_size=49152,
        max_position_embeddings=BIG_CONTEXT,
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(embedded_model_dir() / name, path / name)
    options = AppOptions(model=str(path), max_running=2, replica_cpus=1, max_model_len=BIG_CONTEXT)
    serve.run(build_app(options), name="openai-surface-big", route_prefix="/big")
    try:
        yield f"{BASE_URL}/big"
    finally:
        serve.delete("openai-surface-big")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer(embedded_model_dir())


def post_raw(path: str, raw: str | bytes, base: str = BASE_URL, **kwargs: Any) -> httpx.Response:
    content = raw.encode() if isinstance(raw, str) else raw
    headers = {"content-type": "application/json"}
    return httpx.post(f"{base}{path}", content=content, headers=headers, timeout=120, **kwargs)


def openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["type"] == "invalid_request_error"
    return error


def still_answers(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    assert reply.usage.completion_tokens == 2


# ---- 1. invalid Unicode --------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/v1/completions", r'{"prompt": "a\ud800b", "max_tokens": 2', "prompt"),
        (
            "/v1/chat/completions",
            r'{"messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 2',
            "messages.0.content",
        ),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field_not_a_500(
    served: openai.OpenAI, path: str, raw: str, param: str, stream: bool
) -> None:
    body = raw + (', "stream": true}' if stream else "}")
    error = openai_error(post_raw(path, body), 400)
    assert error["param"] == param and "lone UTF-16 surrogate" in error["message"]
    still_answers(served)


# ---- 2. request limits ---------------------------------------------------------------------------
def test_health_answers_while_a_big_prompt_is_being_tokenized(big: str, tokenizer: Any) -> None:
    # 5 M characters fit 65,536 tokens of up to 81 bytes by their length, not once tokenized.
    prompt = "word " * 1_000_000
    started = time.perf_counter()
    tokens = len(tokenizer.encode(prompt))
    tokenize_s = time.perf_counter() - started
    assert tokens > BIG_CONTEXT and tokenize_s > 0.2, (tokens, tokenize_s)
    assert httpx.get(f"{big}/v1/models", timeout=60).status_code == 200  # the limits are known
    outcome: dict[str, Any] = {}

    def send() -> None:
        body = {"prompt": prompt, "max_tokens": 1}
        outcome["response"] = httpx.post(f"{big}/v1/completions", json=body, timeout=120)

    big_request = threading.Thread(target=send)
    big_request.start()
    latencies = []
    while big_request.is_alive():  # /health, again and again, until the big request is answered
        sent = time.perf_counter()
        assert httpx.get(f"{big}/health", timeout=60).json() == {"status": "ok"}
        latencies.append(time.perf_counter() - sent)
    big_request.join()
    # The big prompt was tokenized (its token count is in the error), and meanwhile /health kept
    # answering: had tokenizing held the event loop, one /health would have waited for all of it.
    error = openai_error(outcome["response"], 400)
    assert f"prompt ({tokens} tokens)" in error["message"]
    assert error["code"] == "context_length_exceeded"
    assert len(latencies) >= 3 and max(latencies) < tokenize_s / 2, (latencies, tokenize_s)


def test_a_prompt_with_more_characters_than_the_context_holds_is_a_400(
    served: openai.OpenAI,
) -> None:
    limit = CONTEXT * 81  # the embedded tokenizer's longest token: a newline and 80 spaces
    with pytest.raises(openai.BadRequestError) as refused:
        served.completions.create(model=MODEL, prompt="x" * (limit + 1), max_tokens=1)
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "prompt"
    assert f"has {limit + 1} characters" in refused.value.message
    messages = [{"role": "user", "content": "y" * limit}, {"role": "user", "content": "y"}]
    with pytest.raises(openai.BadRequestError) as refused:
        served.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert refused.value.param == "messages" and "characters" in refused.value.message


def test_a_body_bigger_than_any_prompt_that_fits_is_a_413(served: openai.OpenAI) -> None:
    limit = 6 * CONTEXT * 81 + (1 << 20)
    big_body = json.dumps({"prompt": "x" * (limit + 1), "max_tokens": 1})
    error = openai_error(post_raw("/v1/completions", big_body), 413)
    assert error["code"] == "request_too_large" and f"{CONTEXT} tokens" in error["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(limit // 65536 + 1):
            yield b"x" * 65536
        yield b'"}'

    openai_error(post_raw("/v1/completions", chunks()), 413)
    still_answers(served)


# ---- 3. refused, ignored and unknown fields ------------------------------------------------------
REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("functions", {"functions": [{"name": "f", "parameters": {}}]}),
    ("modalities", {"modalities": ["text", "audio"]}),
    ("reasoning_effort", {"reasoning_effort": "low"}),
]


@pytest.mark.parametrize(("field", "extra"), REFUSED, ids=[f for f, _ in REFUSED])
def test_an_unsupported_chat_field_is_a_400_naming_it(
    served: openai.OpenAI, field: str, extra: dict[str, Any]
) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            served.chat.completions.create(
                model=MODEL, messages=FRANCE, max_tokens=4, stream=stream, **extra
            )
        assert refused.value.param == field and refused.value.code == "unsupported_parameter"
        assert f"{field} is not supported yet" in refused.value.message


@pytest.mark.parametrize(
    ("field", "extra"),
    [("best_of", {"best_of": 2}), ("echo", {"echo": True}), ("suffix", {"suffix": "!"})],
    ids=["best_of", "echo", "suffix"],
)
def test_an_unsupported_completions_field_is_a_400_naming_it(
    served: openai.OpenAI, field: str, extra: dict[str, Any]
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        served.completions.create(model=MODEL, prompt="Hi", max_tokens=2, **extra)
    assert refused.value.param == field and "not supported yet" in refused.value.message


def test_neutral_values_and_ignored_metadata_change_nothing(served: openai.OpenAI) -> None:
    plain = served.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    dressed = served.chat.completions.create(
        model=MODEL,
        messages=FRANCE,
        temperature=0,
        presence_penalty=0,
        frequency_penalty=0,
        logit_bias={},
        n=1,
        tool_choice="none",
        response_format={"type": "text"},
        user="ada",
        metadata={"team": "tests"},
        store=False,
        service_tier="auto",
        safety_identifier="hash",
        prompt_cache_key="k",
    )
    assert dressed.choices[0].message.content == plain.choices[0].message.content
    assert "Paris" in plain.choices[0].message.content


def test_an_unknown_field_is_a_400_naming_it(served: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        served.chat.completions.create(
            model=MODEL, messages=FRANCE, max_tokens=2, extra_body={"typical_p": 0.9}
        )
    assert refused.value.param == "typical_p" and refused.value.code == "unknown_parameter"


@pytest.mark.parametrize("chat", [True, False])
def test_include_usage_ends_the_stream_with_the_usage_and_no_choices(
    served: openai.OpenAI, chat: bool
) -> None:
    options = {"include_usage": True}
    if chat:
        kwargs = {"messages": FRANCE, "max_tokens": 20, "temperature": 0}
        whole = served.chat.completions.create(model=MODEL, **kwargs)
        stream = served.chat.completions.create(
            model=MODEL, stream=True, stream_options=options, **kwargs
        )
    else:
        kwargs = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
        whole = served.completions.create(model=MODEL, **kwargs)
        stream = served.completions.create(
            model=MODEL, stream=True, stream_options=options, **kwargs
        )
    chunks = list(stream)
    *content, last = chunks
    assert last.choices == [] and last.usage == whole.usage
    assert all(c.usage is None and len(c.choices) == 1 for c in content)
    assert content[-1].choices[0].finish_reason == whole.choices[0].finish_reason


# ---- 4. logprobs ---------------------------------------------------------------------------------
def assert_greedy_entries(entries: list[Any], top: int) -> None:
    """Greedy: each token is the likeliest, with the likeliest's logprob; alternatives sorted."""
    for entry in entries:
        assert len(entry.top_logprobs) == top
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert entry.bytes == list(entry.top_logprobs[0].bytes)
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)


def test_chat_logprobs_match_the_sampled_tokens_streaming_or_not(served: openai.OpenAI) -> None:
    kwargs = {"messages": SEA, "max_tokens": 12, "temperature": 0, "logprobs": True}
    whole = served.chat.completions.create(model=MODEL, top_logprobs=3, **kwargs)
    entries = whole.choices[0].logprobs.content
    assert len(entries) == whole.usage.completion_tokens == 12
    text = bytes(b for entry in entries for b in entry.bytes).decode()
    assert text == whole.choices[0].message.content
    assert_greedy_entries(entries, 3)
    chunks = list(
        served.chat.completions.create(model=MODEL, top_logprobs=3, stream=True, **kwargs)
    )
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-4)
    for chunk in chunks[1:]:  # each chunk carries the logprobs of the tokens it adds
        logprobs = chunk.choices[0].logprobs
        assert len(logprobs.content) == 1
    # logprobs without top_logprobs: the chosen tokens only.
    bare = served.chat.completions.create(model=MODEL, **kwargs).choices[0].logprobs.content
    assert [e.token for e in bare] == [e.token for e in entries]
    assert all(e.top_logprobs == [] for e in bare)


def test_logprobs_leave_out_the_stop_token_as_the_content_does(served: openai.OpenAI) -> None:
    """As OpenAI's: the token that ended the reply (``<|im_end|>``) is generated (and counted in
    the usage) but is in neither the content nor the logprobs, streamed or not."""
    kwargs = {"model": MODEL, "messages": FRANCE, "temperature": 0, "logprobs": True}
    reply = served.chat.completions.create(**kwargs)
    assert reply.choices[0].finish_reason == "stop"
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens - 1
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    chunks = list(served.chat.completions.create(stream=True, **kwargs))
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks)
        == reply.choices[0].message.content
    )
    # Completions too: a chat-templated prompt, so that the model ends its turn.
    prompt = load_tokenizer(embedded_model_dir()).apply_chat_template(
        FRANCE, tokenize=False, add_generation_prompt=True
    )
    completion = served.completions.create(model=MODEL, prompt=prompt, temperature=0, logprobs=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and "".join(choice.logprobs.tokens) == choice.text
    assert len(choice.logprobs.tokens) == completion.usage.completion_tokens - 1


def test_completion_logprobs_match_the_sampled_tokens_streaming_or_not(
    served: openai.OpenAI,
) -> None:
    kwargs = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    whole = served.completions.create(model=MODEL, logprobs=2, **kwargs)
    choice = whole.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == whole.usage.completion_tokens == 8
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(8)]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert top[token] == logprob == max(top.values())  # greedy: the likeliest
        assert 2 <= len(top) <= 3  # the 2 likeliest and the chosen one
    chunks = list(served.completions.create(model=MODEL, logprobs=2, stream=True, **kwargs))
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    assert tokens == logprobs.tokens and offsets == logprobs.text_offset


# ---- 5. the default max_tokens -------------------------------------------------------------------
def test_a_plain_chat_call_is_not_cut_at_16_tokens(served: openai.OpenAI) -> None:
    reply = served.chat.completions.create(model=MODEL, messages=SEA, temperature=0)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 16
    assert reply.choices[0].message.content.endswith(".")


def test_without_max_tokens_a_completion_may_use_the_rest_of_the_context(
    served: openai.OpenAI,
) -> None:
    prompt = [(7 * i) % 4000 + 100 for i in range(CONTEXT - 5)]
    reply = served.completions.create(
        model=MODEL, prompt=prompt, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5 and reply.usage.total_tokens == CONTEXT
    with pytest.raises(openai.BadRequestError) as full:
        served.completions.create(model=MODEL, prompt=[100] * CONTEXT)
    assert full.value.code == "context_length_exceeded"


# ---- 6. /v1/models/{id} --------------------------------------------------------------------------
def test_models_retrieve_returns_the_model_and_another_id_is_a_404(served: openai.OpenAI) -> None:
    model = served.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model" and model.owned_by == "vattn"
    assert model.model_dump()["max_model_len"] == CONTEXT
    with pytest.raises(openai.NotFoundError) as missing:
        served.models.retrieve("gpt-9")
    assert missing.value.code == "model_not_found" and "gpt-9" in missing.value.message
    with pytest.raises(openai.NotFoundError):
        served.models.retrieve("org/" + MODEL)


# ---- 7. penalties, logit_bias, n -----------------------------------------------------------------
REPEAT = "Repeat the word 'yes' ten times: yes yes yes"


def completion_tokens(client: openai.OpenAI, **kwargs: Any) -> list[str]:
    reply = client.completions.create(model=MODEL, temperature=0, logprobs=0, **kwargs)
    return reply.choices[0].logprobs.tokens


def test_a_penalty_changes_a_repetitive_output(served: openai.OpenAI) -> None:
    plain = completion_tokens(served, prompt=REPEAT, max_tokens=12)
    assert plain == [" yes"] * 12  # greedy: the model repeats
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalized = completion_tokens(served, prompt=REPEAT, max_tokens=12, **penalty)
        assert penalized[0] == " yes" and penalized.count(" yes") == 1, penalty
    repeated = completion_tokens(
        served, prompt=REPEAT, max_tokens=12, extra_body={"repetition_penalty": 3.0}
    )
    assert " yes" not in repeated  # in the prompt: penalized from the first token


def test_logit_bias_removes_a_token_and_forces_another(
    served: openai.OpenAI, tokenizer: Any
) -> None:
    prompt = "The capital of France is"
    plain = completion_tokens(served, prompt=prompt, max_tokens=4)
    assert plain[0] == " Paris"
    paris, london = (tokenizer.encode(w)[0] for w in (" Paris", " London"))
    banned = completion_tokens(served, prompt=prompt, max_tokens=4, logit_bias={str(paris): -100})
    assert " Paris" not in banned
    forced = served.chat.completions.create(
        model=MODEL, messages=FRANCE, max_tokens=3, logit_bias={str(london): 100}, seed=1
    )
    assert forced.choices[0].message.content == " London" * 3


def test_n_choices_streaming_or_not(served: openai.OpenAI) -> None:
    kwargs = {"messages": SEA, "max_tokens": 6, "n": 3, "seed": 11, "temperature": 1.0}
    whole = served.chat.completions.create(model=MODEL, **kwargs)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = [c.message.content for c in whole.choices]
    assert len(set(texts)) > 1  # seeds seed, seed + 1, seed + 2
    assert whole.usage.completion_tokens == 3 * 6
    streamed = ["", "", ""]
    chunks = list(
        served.chat.completions.create(
            model=MODEL, stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    # The same counts; the streamed request may find the first one's prompt cached (16-token
    # prefix blocks), which only its prompt_tokens_details tells.
    usage = chunks[-1].usage
    assert streamed == texts and usage is not None and whole.usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
        whole.usage.total_tokens,
    )
    completions = served.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=4, n=2, best_of=2, seed=3
    )
    assert [c.index for c in completions.choices] == [0, 1]


# ---- 8. structured outputs and tools -------------------------------------------------------------
ANSWER = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "ok": {"type": "boolean"}},
    "required": ["answer", "ok"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def test_json_schema_output_validates_for_20_seeds(served: openai.OpenAI) -> None:
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER, "strict": True}}
    messages = [{"role": "user", "content": "Is the sea blue? Answer in JSON."}]
    for first in (0, 10):  # n is at most 16
        reply = served.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=20, n=10, seed=first, response_format=fmt
        )
        for choice in reply.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), ANSWER)
    plain = served.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=20,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert plain.choices[0].message.content.startswith("{")


def test_an_invalid_schema_is_a_400(served: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nope"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        served.chat.completions.create(
            model=MODEL, messages=FRANCE, max_tokens=4, response_format=fmt
        )
    assert refused.value.param == "response_format" and "nope" in refused.value.message


def test_a_named_tool_call_parses_into_its_schema(served: openai.OpenAI) -> None:
    import jsonschema

    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    kwargs = {"messages": messages, "tools": [WEATHER], "max_tokens": 40, "temperature": 0}
    reply = served.chat.completions.create(model=MODEL, tool_choice=choice, **kwargs)
    [call] = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    chunks = list(
        served.chat.completions.create(model=MODEL, tool_choice=choice, stream=True, **kwargs)
    )
    calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or ()]
    # OpenAI's shape: the call's id, type and name with empty arguments, then its arguments.
    head = calls[0]
    assert head.id and head.type == "function" and head.function.name == "get_weather"
    assert head.function.arguments == ""
    assert {t.index for t in calls} == {0} and all(t.id is None for t in calls[1:])
    assert "".join(t.function.arguments for t in calls) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    required = served.chat.completions.create(model=MODEL, tool_choice="required", **kwargs)
    calls = required.choices[0].message.tool_calls
    assert calls and all(c.function.name == "get_weather" for c in calls)
    # This model's template has no <tool_call> format: "auto" (the default) says what works.
    with pytest.raises(openai.BadRequestError) as refused:
        served.chat.completions.create(model=MODEL, **kwargs)
    assert refused.value.param == "tool_choice" and '"required"' in refused.value.message


#: The scripted Qwen-style model's greedy reply (tests/byte_tokenizer.save_scripted_qwen): some
#: words, then a Hermes tool call whose tags are split over tokens, as a stream meets them.
QWEN_REPLY = [
    "Let me check.",
    "\n<tool",
    '_call>\n{"name": "get_weather", ',
    '"arguments": {"city": "Oslo"}}',
    "\n</tool_",
    "call>",
]
OSLO = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def qwen(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    path = save_scripted_qwen(tmp_path_factory.mktemp("scripted-qwen"), QWEN_REPLY)
    options = AppOptions(model=str(path), max_running=4, replica_cpus=1, max_model_len=2048)
    serve.run(build_app(options), name="openai-surface-qwen", route_prefix="/qwen")
    try:
        yield openai.OpenAI(
            base_url=f"{BASE_URL}/qwen/v1", api_key="unused", max_retries=0, timeout=120
        )
    finally:
        serve.delete("openai-surface-qwen")


def test_auto_tool_calls_parse_from_a_qwen_templates_reply(qwen: openai.OpenAI) -> None:
    model = qwen.models.list().data[0].id
    kwargs: dict[str, Any] = {"model": model, "messages": OSLO, "temperature": 0}
    for choice in ({}, {"tool_choice": "auto"}):  # auto is the default with tools
        reply = qwen.chat.completions.create(tools=[WEATHER], **choice, **kwargs)
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "tool_calls"
        assert message.content == "Let me check."
        [call] = message.tool_calls
        assert call.type == "function" and call.id and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Oslo"}
    # Streamed: the words as content, never the markup; the call as OpenAI's deltas.
    chunks = list(qwen.chat.completions.create(tools=[WEATHER], stream=True, **kwargs))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert [d.content for d in deltas if d.content] == ["Let me check."]
    calls = [t for d in deltas for t in d.tool_calls or ()]
    assert (
        calls[0].id and calls[0].function.name == "get_weather" and {t.index for t in calls} == {0}
    )
    assert json.loads("".join(t.function.arguments or "" for t in calls)) == {"city": "Oslo"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The call and its result go back through the template; the model calls again.
    history = [
        *OSLO,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "12 C, cloudy"},
    ]
    again = qwen.chat.completions.create(tools=[WEATHER], **{**kwargs, "messages": history})
    assert again.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_without_auto_tools_or_cut_short_the_markup_is_content(qwen: openai.OpenAI) -> None:
    model = qwen.models.list().data[0].id
    kwargs: dict[str, Any] = {"model": model, "messages": OSLO, "temperature": 0}
    for extra in ({}, {"tools": [WEATHER], "tool_choice": "none"}):
        reply = qwen.chat.completions.create(**extra, **kwargs)
        assert reply.choices[0].message.content == "".join(QWEN_REPLY)
        assert reply.choices[0].message.tool_calls is None
        assert reply.choices[0].finish_reason == "stop"
    # max_tokens ends the reply inside the block: it is not a call, and all of it is content.
    cut = {"tools": [WEATHER], "max_tokens": 4, **kwargs}
    reply = qwen.chat.completions.create(**cut)
    assert reply.choices[0].message.content == "".join(QWEN_REPLY[:4])
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "length"
    chunks = list(qwen.chat.completions.create(stream=True, **cut))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(QWEN_REPLY[:4]) and chunks[-1].choices[0].finish_reason == "length"


# ---- 9. random text never gives a 500 ------------------------------------------------------------
@pytest.mark.slow
def test_random_unicode_strings_never_give_a_500(served: openai.OpenAI) -> None:
    """100 of them end to end (generating a token each); tests/cpu/test_openai_surface.py sends
    1,000 through the ingress's own path (validation, chat template, tokenizer, limits). Slow (~30
    s on two cores): tests/cluster/test_reliability.py sends 1,000 end to end by default, as
    prompts, messages, stop strings and model names, lone surrogates included."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.cpu.test_openai_surface import random_texts

    bodies = []
    for i, text in enumerate(random_texts(100, seed=18)):
        content = json.dumps(text)  # escapes lone surrogates as \udXXX, as a client's JSON may
        if i % 2:
            raw = f'{{"prompt": {content}, "max_tokens": 1}}'
            bodies.append(("/v1/completions", raw))
        else:
            raw = f'{{"messages": [{{"role": "user", "content": {content}}}], "max_tokens": 1}}'
            bodies.append(("/v1/chat/completions", raw))
    with httpx.Client(base_url=BASE_URL, timeout=120) as client, ThreadPoolExecutor(8) as pool:
        headers = {"content-type": "application/json"}
        responses = list(
            pool.map(lambda b: client.post(b[0], content=b[1].encode(), headers=headers), bodies)
        )
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 400}, [r.text for r in responses if r.status_code >= 500][:3]
    assert statuses.count(200) > 50 and statuses.count(400) > 5  # surrogates are refused
    for response in responses:
        assert ("error" in response.json()) == (response.status_code == 400)
