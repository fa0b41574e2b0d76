"""Clients and probes the live-cluster tests share: completions that run in their own threads and
record exactly how they ended (for the fault tests, which kill what serves them), the Serve replica
actors of an app, each replica's load, and the ingress's router tally from ``/metrics``."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from tests.cluster.conftest import BASE_URL
from tests.helpers import wait_until

#: Longest silence a client accepts from a stream, or wait for a whole reply: past it, a hang.
HANG_S = 90.0


class Completion(threading.Thread):
    """One ``POST /v1/completions`` of a token-id prompt in a thread; ``stream`` says which way.

    ``status`` and ``replica`` (the ``x-vattn-replica`` header: set on a 200, streamed or not).
    Streamed: ``chunks`` counts the completion chunks received (``first`` is set at the first),
    ``error`` is the body of an error event, ``finish_reason`` and ``usage`` come from the last
    chunk, ``done`` says ``data: [DONE]`` closed the stream and ``after_done`` counts events after
    it. Whole: ``body``. Either way ``failure`` is an exception the client met (a read timeout is a
    hang) and ``ended`` is set when the thread is done.
    """

    def __init__(
        self,
        prompt: list[int],
        max_tokens: int,
        stream: bool,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.json = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": stream,
        }
        self.max_tokens, self.stream, self.headers = max_tokens, stream, headers or {}
        self.first, self.ended = threading.Event(), threading.Event()
        self.status: int | None = None
        self.body: Any = None
        self.replica: str | None = None
        self.chunks = self.after_done = 0
        self.error: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.done = False
        self.failure: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            if self.stream:
                self._stream()
            else:
                response = httpx.post(
                    f"{BASE_URL}/v1/completions",
                    json=self.json,
                    headers=self.headers,
                    timeout=HANG_S * 2,
                )
                self.status, self.replica = (
                    response.status_code,
                    response.headers.get("x-vattn-replica"),
                )
                self.body = response.json()
        except BaseException as error:  # noqa: BLE001 - recorded and asserted on by the test
            self.failure = error
        finally:
            self.ended.set()

    def _stream(self) -> None:
        with httpx.stream(
            "POST",
            f"{BASE_URL}/v1/completions",
            json=self.json,
            headers=self.headers,
            timeout=HANG_S,
        ) as response:
            self.status, self.replica = (
                response.status_code,
                response.headers.get("x-vattn-replica"),
            )
            if response.status_code != 200:
                self.body = json.loads(response.read())
                return
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if self.done:
                    self.after_done += 1
                elif data == "[DONE]":
                    self.done = True
                elif "error" in (event := json.loads(data)):
                    self.error = event["error"]
                else:
                    assert self.error is None, f"a chunk after the error event: {event}"
                    self.chunks += 1
                    self.finish_reason = event["choices"][0]["finish_reason"] or self.finish_reason
                    self.usage = event.get("usage") or self.usage
                    self.first.set()

    def completed(self) -> bool:
        """Ended as a whole reply of ``max_tokens`` tokens (streamed or not), and nothing else."""
        if self.failure is not None or self.status != 200:
            return False
        if not self.stream:
            return self.body["usage"]["completion_tokens"] == self.max_tokens
        return (
            self.done
            and self.after_done == 0
            and self.error is None
            and self.finish_reason == "length"
            and self.usage is not None
            and self.usage["completion_tokens"] == self.max_tokens
        )

    def describe(self) -> str:
        return (
            f"stream={self.stream} replica={self.replica} status={self.status} "
            f"failure={self.failure!r} chunks={self.chunks} error={self.error} "
            f"finish={self.finish_reason} usage={self.usage} done={self.done} "
            f"after_done={self.after_done} body={self.body}"
        )


def replica_actors(app: str) -> dict[str, str]:
    """Serve replica id -> actor name, for the app's VattnReplica deployment (named actors are
    listed by the GCS: no dashboard needed)."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return {
        a["name"].split("#")[-1]: a["name"]
        for a in named
        if a["namespace"] == "serve" and f"{app}#VattnReplica#" in a["name"]
    }


def replica_stats(app: str, replicas: int, timeout: float = 30) -> dict[str, dict[str, Any]]:
    """``stats_dict()`` of ``replicas`` distinct replicas (a handle call goes to one replica: it
    asks until it has heard from that many)."""
    handle = serve.get_deployment_handle("VattnReplica", app_name=app)
    seen: dict[str, dict[str, Any]] = {}

    def heard_all() -> bool:
        stats = handle.stats_dict.remote().result(timeout_s=30)
        seen[stats["replica"]] = stats
        return len(seen) >= replicas

    wait_until(
        heard_all,
        timeout,
        f"stats of {replicas} replicas of {app} (heard {sorted(seen)})",
        interval=0,
    )
    return seen


def replica_loads(app: str, replicas: int) -> dict[str, int]:
    """Requests each replica holds now (running or waiting), by replica id."""
    return {r: s["running"] + s["waiting"] for r, s in replica_stats(app, replicas).items()}


def router_decisions(model: str) -> dict[str, float]:
    """The ingress's router decisions by reason (``most_free_pages``: ranked on every replica's
    fresh stats; ``fallback``: some were missing or stale), from ``/metrics`` (no API key)."""
    text = httpx.get(f"{BASE_URL}/metrics", timeout=10).text
    return {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "vattn_router_decisions_total" and s.labels["model"] == model
    }


def streaming_in_flight(
    prompt: list[int], max_tokens: int, streams: int, whole: int
) -> list[Completion]:
    """Starts ``streams`` streamed and ``whole`` plain completions (prompt + one id each) and
    returns them once every stream has had a token and none has ended: requests in flight."""
    requests = [
        Completion([*prompt, 10 + i], max_tokens, stream=i < streams)
        for i in range(streams + whole)
    ]
    streamed = requests[:streams]
    wait_until(
        lambda: all(s.first.is_set() or s.ended.is_set() for s in streamed),
        60,
        "a first token on every stream",
    )
    assert all(s.chunks >= 1 and not s.ended.is_set() for s in streamed), [
        s.describe() for s in streamed
    ]
    return requests
