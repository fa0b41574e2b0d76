"""Faults on a live cluster: a whole replica is killed while it serves requests. Its in-flight
requests end with a clean error (no retry: generation is not idempotent for sampled requests): a
streamed one with an OpenAI-style error event and ``data: [DONE]`` after the tokens it had, a whole
one with a 503 and an OpenAI-style error body; never a hang, a 500 or a cut stream. The other
replica's requests finish, Serve brings a new replica up, the new one serves, and its allocator
starts clean. (Killing a tensor-parallel rank actor: test_serve_tp.py.)"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
import ray
from ray import serve

from cluster.app import build_app
from tests.cluster.conftest import BASE_URL
from tests.cluster.helpers import (
    HANG_S,
    replica_actors,
    replica_loads,
    replica_stats,
    streaming_in_flight,
)
from tests.helpers import wait_until
from tests.models import save_random_llama

pytestmark = pytest.mark.integration
APP = "faults"
MAX_TOKENS = 1000  # of 1,024 (max_model_len): long enough to be in flight when the replica dies
STREAMS, WHOLE = 6, 2


@pytest.fixture(scope="module")
def two_replicas(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    path = save_random_llama(
        tmp_path_factory.mktemp("fault-model"),
        5,
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        max_position_embeddings=2048,
    )
    serve.run(
        build_app(
            {
                "model": str(path),
                "replicas": 2,
                "max_model_len": 1024,
                "max_running": 16,
                "kv_cache_bytes": 64 << 20,
                "replica_cpus": 0.5,
                "routing_stats_period_s": 0.2,
            }
        ),
        name=APP,
        route_prefix="/",
    )
    try:
        yield
    finally:
        serve.delete(APP)


def complete(max_tokens: int) -> httpx.Response:
    return httpx.post(
        f"{BASE_URL}/v1/completions",
        timeout=HANG_S,
        json={
            "prompt": [7, 8, 9, 10],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        },
    )


def holding(count: int) -> dict[str, int] | None:
    """Each replica's load, once the two hold ``count`` requests between them."""
    loads = replica_loads(APP, 2)
    return loads if sum(loads.values()) == count else None


def test_a_killed_replica_fails_in_flight_requests_and_is_replaced(two_replicas: None) -> None:
    before = replica_actors(APP)
    assert len(before) == 2
    # In flight: every stream has had tokens, and the replicas hold every request.
    requests = streaming_in_flight([7, 8, 9], MAX_TOKENS, STREAMS, WHOLE)
    streams = requests[:STREAMS]
    loads = wait_until(
        lambda: holding(len(requests)), 60, f"the replicas to hold all {len(requests)} requests"
    )
    victim_id = max(sorted(loads), key=loads.__getitem__)  # the replica holding the most of them
    in_flight = loads[victim_id]
    assert not any(r.ended.is_set() for r in requests), (
        "a request ended before the kill: nothing was tested"
    )
    ray.kill(ray.get_actor(before[victim_id], namespace="serve"), no_restart=True)

    for request in requests:
        request.join(timeout=HANG_S * 3)
    assert not any(r.is_alive() for r in requests), "a request hung after the kill"
    failed = [r for r in requests if not r.completed()]
    assert len(failed) == in_flight >= 1, (in_flight, [r.describe() for r in requests])
    # Exactly the victim's streams failed (a stream names its replica; a 503 names none).
    assert [s for s in streams if s.replica == victim_id] == [s for s in failed if s.stream], (
        victim_id
    )
    for request in failed:  # a clean error: the OpenAI shape, the reason, and nothing cut off
        assert request.failure is None, request.describe()
        if request.stream:
            assert request.status == 200 and request.chunks >= 1, request.describe()
            assert request.done and request.after_done == 0 and request.finish_reason is None, (
                request.describe()
            )
            error = request.error
        else:
            assert request.status == 503, request.describe()
            error = request.body["error"]
        assert error is not None and error["type"] == "server_error", request.describe()
        assert "died" in error["message"], request.describe()
    assert all(r.replica != victim_id for r in requests if not r.stream and r.completed())

    # Serve replaces the dead replica; afterwards every request succeeds, none goes to the dead one,
    # and the new one serves too (a concurrent burst spreads over both: the router counts what it
    # sent since the last stats).
    wait_until(
        lambda: victim_id not in (a := replica_actors(APP)) and len(a) == 2,
        120,
        "Serve to replace the killed replica",
    )
    after = replica_actors(APP)
    [fresh] = set(after) - set(before)
    served: list[str] = []

    def burst() -> bool:
        replies: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: replies.append(complete(8))) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for response in replies:
            assert response.status_code == 200, response.text
            served.append(response.headers["x-vattn-replica"])
        return fresh in served

    wait_until(burst, 60, f"the new replica {fresh} to serve a request", interval=0)
    assert victim_id not in served and set(served) <= set(after), served

    def fresh_at_rest() -> bool:
        """The new replica has served and, like any allocator, keeps consistent books; its last
        slot may be released a step after its last reply (asynchronous scheduling)."""
        stats = replica_stats(APP, 2)
        assert set(stats) == set(after)
        kv = stats[fresh]["kv"]
        assert stats[fresh]["generation_tokens_total"] > 0
        assert kv["pages_free"] + kv["pages_cached"] + kv["pages_in_use"] == kv["pages_created"]
        return kv["slots_running"] == 0

    wait_until(fresh_at_rest, 30, "the new replica to be at rest")
