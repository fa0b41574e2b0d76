"""The real thing on CPU: Ray Serve + the embedded SmolLM2 model, called with the real `openai`
client and with raw HTTP for bad input."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from ray import serve

from cluster.app import AppOptions, build_app
from replica import LLM, SamplingParams
from tests.cluster.conftest import BASE_URL
from tests.helpers import wait_until

pytestmark = pytest.mark.integration
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def served(ray_session: None) -> Iterator[openai.OpenAI]:
    app = build_app(AppOptions(model="embedded", max_running=8, replica_cpus=1))
    serve.run(app, name="vattn", route_prefix="/")
    try:
        yield openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        serve.delete("vattn")


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM("embedded", max_running=4)


def test_chat_answers_sensibly_and_matches_the_offline_engine(
    served: openai.OpenAI, offline: LLM
) -> None:
    reply = served.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=QUESTION, max_tokens=30, temperature=0
    )
    text = reply.choices[0].message.content
    assert "Paris" in text
    assert reply.choices[0].finish_reason == "stop"
    [expected] = offline.chat([QUESTION], SamplingParams(max_tokens=30, temperature=0))
    assert text == expected.text
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.prompt_tokens == expected.prompt_tokens


def test_streamed_chat_equals_the_whole_reply(served: openai.OpenAI) -> None:
    stream = served.chat.completions.create(
        messages=QUESTION, model="SmolLM2-135M-Instruct", max_tokens=30, temperature=0, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = served.chat.completions.create(
        messages=QUESTION, model="SmolLM2-135M-Instruct", max_tokens=30, temperature=0
    )
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_completions_equal_the_offline_engine_streaming_or_not(
    served: openai.OpenAI, offline: LLM
) -> None:
    prompt = "Once upon a time"
    params = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.95, seed=42)
    [expected] = offline.generate([prompt], params)
    whole = served.completions.create(
        model="SmolLM2-135M-Instruct",
        prompt=prompt,
        max_tokens=20,
        temperature=0.8,
        top_p=0.95,
        seed=42,
    )
    streamed = "".join(
        c.choices[0].text
        for c in served.completions.create(
            model="SmolLM2-135M-Instruct",
            prompt=prompt,
            max_tokens=20,
            temperature=0.8,
            top_p=0.95,
            seed=42,
            stream=True,
        )
    )
    assert whole.choices[0].text == expected.text == streamed
    assert whole.usage.completion_tokens == len(expected.token_ids)


def test_models_and_health(served: openai.OpenAI) -> None:
    assert [m.id for m in served.models.list().data] == ["SmolLM2-135M-Instruct"]
    assert httpx.get(f"{BASE_URL}/health").json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('{"prompt": "hi", "max_tokens": ', "not valid JSON"),
        ('{"max_tokens": 5}', "prompt: Field required"),
        ('{"prompt": "hi", "max_tokens": -1}', "max_tokens"),
        ('{"prompt": "hi", "temperature": "hot"}', "temperature"),
        ('{"prompt": "hi", "n": 2, "best_of": 3}', "best_of"),
        ('{"prompt": "' + "word " * 5000 + '", "max_tokens": 10}', "exceeds the context limit"),
        ('{"prompt": "hi", "max_tokens": 100000}', "exceeds the context limit"),
        ('{"prompt": "", "max_tokens": 4}', "empty"),
    ],
)
def test_bad_input_is_a_400_with_an_openai_error_and_the_service_keeps_answering(
    served: openai.OpenAI, body: str, fragment: str
) -> None:
    response = httpx.post(
        f"{BASE_URL}/v1/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"
    ok = served.completions.create(
        model="SmolLM2-135M-Instruct", prompt="Hello", max_tokens=2, temperature=0
    )
    assert ok.usage.completion_tokens == 2


def test_unknown_model_is_a_404(served: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        served.completions.create(model="gpt-9", prompt="hi", max_tokens=2)


def test_client_disconnect_frees_the_slot(served: openai.OpenAI) -> None:
    handle = serve.get_deployment_handle("VattnReplica", app_name="vattn")
    with httpx.stream(
        "POST",
        f"{BASE_URL}/v1/completions",
        json={
            "prompt": "Count to one thousand:",
            "max_tokens": 2000,
            "ignore_eos": True,
            "stream": True,
        },
        timeout=60,
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # one chunk, then the client goes away

    # The slot is released with the abort, or once the step in flight is done (asynchronous
    # scheduling): the request can leave the books a step before its slot does.
    def released() -> bool:
        stats = handle.stats.remote().result()
        return stats.running == 0 and stats.waiting == 0 and stats.kv.slots_running == 0

    wait_until(released, 20, "the disconnected request's slot to be released", interval=0.2)
