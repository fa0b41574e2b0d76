"""Prefix sharing on a live cluster: two replicas of a small random model behind the free-page
router; the second turn of a conversation (its whole history and a new message, through the
``openai`` client) lands on the replica that served the first, which reports the history's pages
as cached tokens."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from ray import serve

from cluster.app import build_app
from tests.cluster.conftest import BASE_URL
from tests.cluster.helpers import router_decisions
from tests.helpers import wait_until
from tests.models import save_random_llama

pytestmark = pytest.mark.integration
APP = "prefix"
PAGE = 64 * 1024
VOCAB = 2048


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_llama(
        tmp_path_factory.mktemp("prefix-model"),
        0,
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=2048,
    )


@pytest.fixture(scope="module")
def client(ray_session: None, model_dir: Path) -> Iterator[openai.OpenAI]:
    app = build_app(
        {
            "model": str(model_dir),
            "replicas": 2,
            "max_model_len": 1024,
            "max_running": 8,
            "kv_cache_bytes": 256 * PAGE,
            "page_size": PAGE,
            "routing_stats_period_s": 0.2,
            "replica_cpus": 1,
        }
    )
    serve.run(app, name=APP, route_prefix="/")
    try:
        yield openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        serve.delete(APP)


def turn(client: openai.OpenAI, model: str, prompt: list[int]) -> tuple[str, int]:
    """One completion: the replica that answered and the cached prompt tokens it reports."""
    raw = client.completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=64, temperature=0, extra_body={"ignore_eos": True}
    )
    usage = raw.parse().usage
    assert usage is not None and usage.prompt_tokens == len(prompt)
    details = usage.prompt_tokens_details
    cached = details.cached_tokens if details is not None and details.cached_tokens else 0
    return raw.headers["x-vattn-replica"], cached


def test_the_second_turn_finds_its_history_on_the_same_replica(
    client: openai.OpenAI, model_dir: Path
) -> None:
    model = model_dir.name
    rng = random.Random(0)

    def ranked() -> bool:
        """Requests are ranked on both replicas' stats (until then: power of two choices)."""
        turn(client, model, [5, 6, 7])
        return router_decisions(model).get("most_free_pages", 0) >= 1

    wait_until(ranked, 30, "a request ranked on both replicas' routing stats")

    def second_turn_follows_the_first() -> bool:
        """A fresh conversation: turn 1, then turn 2 with the whole history, ranked on the
        replicas' prefix summaries (the router counts it). The replica's routing stats show the
        prompt's pages from its prefill on, usually polls before turn 1 ends; a retry with a new
        conversation covers a poll that came late on a loaded machine."""
        routed = router_prefix_routed(model)
        # NOTE: the API returns text, not token ids, so turn 2 carries turn 1's prompt and a new
        # message (the answer's pages are cached too, but this client cannot send its ids).
        history = [rng.randrange(3, VOCAB) for _ in range(300)]
        first, cached = turn(client, model, history)
        assert cached == 0, "a fresh conversation found a cached prefix"
        follow_up = [*history, *(rng.randrange(3, VOCAB) for _ in range(8))]
        second, cached = turn(client, model, follow_up)
        print(f"turn 1 on {first}, turn 2 on {second} with {cached} cached tokens")
        return second == first and cached >= 256 and router_prefix_routed(model) > routed

    wait_until(
        second_turn_follows_the_first, 120, "a second turn routed to its history", interval=0
    )


def router_prefix_routed(model: str) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{BASE_URL}/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "vattn_router_prefix_routed_total" and s.labels["model"] == model
    )
