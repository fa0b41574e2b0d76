"""Load test of the HTTP API: many concurrent streaming clients for a bounded time.

    python -m benchmarks.load_test                      # deploys the embedded model, 2 replicas,
    200 clients, 60 s
    python -m benchmarks.load_test --model /path/to/hf-dir --concurrency 400 --duration 120
    python -m benchmarks.load_test --url http://host:8000 --api-key KEY   # an app already running

``concurrency`` clients each send streaming requests (completions and chat, mixed) one after
another until ``duration`` has passed; prompt lengths and ``max_tokens`` come from a seeded RNG,
so a run is repeatable. Requests in flight at the deadline run to completion. A request counts as
ok when it is a 200 whose stream ends with ``data: [DONE]`` and carries no error event; a 429 or
503 with an OpenAI error body counts as shed (load shedding, which vattn does not do today);
anything else is an error. Reported: requests/s, output tokens/s, p50/p99 of time to first token
and of end-to-end latency, the peak number of requests in flight.

After the load, when this script can reach the Ray cluster (it deployed the app, or ``--address``),
every replica's KV books are read (``replica_stats``) and must be back at rest: no request running
or waiting, no slot running, and free + cached pages == created pages.

Results go to ``benchmarks/results/load-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

WORDS = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "pack",
    "boxes",
    "of",
    "liquor",
    "and",
    "jam",
    "near",
    "old",
    "river",
    "bank",
    "under",
    "pale",
    "winter",
    "sky",
    "école",
    "naïve",
    "日本",
    "🙂",
)
SHED = (429, 503)


@dataclass(frozen=True)
class LoadConfig:
    concurrency: int = 200
    duration_s: float = 60.0
    #: Stop after this many requests in all (None: only the duration bounds the run).
    max_requests: int | None = None
    prompt_words: tuple[int, int] = (4, 160)  # inclusive range, drawn per request
    max_tokens: tuple[int, int] = (1, 96)
    chat_fraction: float = 0.5
    seed: int = 0
    api_key: str | None = None
    model: str | None = None
    timeout_s: float = 600.0


@dataclass(frozen=True)
class Outcome:
    kind: str  # "ok", "shed" or "error"
    status: int  # HTTP status (0: no response)
    ttft_s: float | None
    e2e_s: float
    completion_tokens: int
    detail: str = ""


def request_body(config: LoadConfig, index: int) -> tuple[str, dict[str, Any]]:
    """Request ``index`` of a run: (path, body), the same for a given seed and index."""
    rng = random.Random(config.seed * 1_000_003 + index)
    words = rng.randint(*config.prompt_words)
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    body: dict[str, Any] = {
        "max_tokens": rng.randint(*config.max_tokens),
        "temperature": 0,
        "stream": True,
    }
    if config.model:
        body["model"] = config.model
    if rng.random() < config.chat_fraction:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}
    return "/v1/completions", {**body, "prompt": text}


async def send(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> Outcome:
    """One streaming request; time to first token is the first chunk after the chat role chunk."""
    start = time.perf_counter()
    ttft, tokens, done, error = None, 0, False, ""
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                raw = (await response.aread()).decode(errors="replace")
                kind = "shed" if response.status_code in SHED and _is_openai_error(raw) else "error"
                return Outcome(
                    kind, response.status_code, None, time.perf_counter() - start, 0, raw[:300]
                )
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = json.dumps(chunk["error"])[:300]
                    continue
                choice = chunk["choices"][0]
                if ttft is None and "role" not in choice.get("delta", {}):
                    ttft = time.perf_counter() - start
                if "usage" in chunk:
                    tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return Outcome(
            "error", 0, ttft, time.perf_counter() - start, tokens, f"{type(exc).__name__}: {exc}"
        )
    e2e = time.perf_counter() - start
    if error or not done or ttft is None:
        return Outcome(
            "error", 200, ttft, e2e, tokens, error or "the stream ended without [DONE] or tokens"
        )
    return Outcome("ok", 200, ttft, e2e, tokens)


def _is_openai_error(raw: str) -> bool:
    try:
        error = json.loads(raw)["error"]
        return isinstance(error["message"], str) and isinstance(error["type"], str)
    except (ValueError, KeyError, TypeError):
        return False


@dataclass
class _Run:
    config: LoadConfig
    next_index: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    outcomes: list[Outcome] = field(default_factory=list)

    def take(self, deadline: float) -> int | None:
        limit = self.config.max_requests
        if time.perf_counter() >= deadline or (limit is not None and self.next_index >= limit):
            return None
        self.next_index += 1
        return self.next_index - 1


async def run_load(base_url: str, config: LoadConfig) -> dict[str, Any]:
    """Runs the load and returns its summary (see ``summarize``)."""
    run = _Run(config)
    headers = {"authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(
        max_connections=config.concurrency, max_keepalive_connections=config.concurrency
    )
    async with httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        limits=limits,
        timeout=httpx.Timeout(config.timeout_s, connect=60.0),
    ) as client:
        start = time.perf_counter()
        deadline = start + config.duration_s

        async def client_loop() -> None:
            while (index := run.take(deadline)) is not None:
                run.in_flight += 1
                run.peak_in_flight = max(run.peak_in_flight, run.in_flight)
                try:
                    run.outcomes.append(await send(client, *request_body(config, index)))
                finally:
                    run.in_flight -= 1

        await asyncio.gather(*(client_loop() for _ in range(config.concurrency)))
        wall = time.perf_counter() - start
    return summarize(run.outcomes, wall, run.peak_in_flight, config)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def summarize(
    outcomes: list[Outcome], wall_s: float, peak_in_flight: int, config: LoadConfig
) -> dict[str, Any]:
    return {
        "config": asdict(config) | {"api_key": "<set>" if config.api_key else None},
        **outcome_summary(outcomes, wall_s, peak_in_flight),
    }


def outcome_summary(outcomes: list[Outcome], wall_s: float, peak_in_flight: int) -> dict[str, Any]:
    """Counts, throughput over ``wall_s`` and TTFT / end-to-end percentiles of the ok requests."""
    ok = [o for o in outcomes if o.kind == "ok"]
    errors = [o for o in outcomes if o.kind == "error"]
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    e2e = [o.e2e_s for o in ok]
    tokens = sum(o.completion_tokens for o in ok)
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "shed": sum(o.kind == "shed" for o in outcomes),
        "errors": len(errors),
        "error_samples": [asdict(o) for o in errors[:10]],
        "peak_in_flight": peak_in_flight,
        "wall_s": round(wall_s, 3),
        "requests_per_s": round(len(ok) / wall_s, 3),
        "output_tokens_per_s": round(tokens / wall_s, 2),
        "completion_tokens": tokens,
        "ttft_s": {
            "p50": percentile(ttft, 50),
            "p99": percentile(ttft, 99),
            "max": max(ttft, default=None),
        },
        "e2e_s": {
            "p50": percentile(e2e, 50),
            "p99": percentile(e2e, 99),
            "max": max(e2e, default=None),
        },
    }


# ---- the replicas' books -------------------------------------------------------------------------
def replica_stats(
    app_name: str, deployment: str = "VattnReplica", timeout_s: float = 30.0
) -> dict[str, dict[str, Any]]:
    """Every running replica's ``stats_dict()``, by replica id.

    A handle call goes to one replica (the free-page router falls back to power of two choices for
    calls that carry no request), so this calls until it has seen as many distinct replica ids as
    ``serve.status()`` reports running replicas.
    """
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app_name)
    deadline = time.monotonic() + timeout_s
    seen: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        status = serve.status().applications[app_name].deployments[deployment]
        expected = status.replica_states.get("RUNNING", 0)
        stats = handle.stats_dict.remote().result()
        seen[stats["replica"]] = stats
        if expected and len(seen) >= expected:
            return seen
    raise TimeoutError(f"saw replicas {sorted(seen)} of {app_name}/{deployment} in {timeout_s} s")


def at_rest(stats: dict[str, Any]) -> bool:
    """No request running or waiting, no slot running, every created page free or cached."""
    kv = stats["kv"]
    return (
        stats["running"] == 0
        and stats["waiting"] == 0
        and kv["slots_running"] == 0
        and kv["pages_in_use"] == 0
        and kv["pages_free"] + kv["pages_cached"] == kv["pages_created"]
    )


def wait_at_rest(app_name: str, timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
    """The replicas' stats once all are at rest (or the last ones read, when ``timeout_s``
    passed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = replica_stats(app_name)
        if all(at_rest(s) for s in stats.values()) or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def _books(stats: dict[str, Any]) -> dict[str, Any]:
    engine = (
        "running",
        "waiting",
        "preemptions_total",
        "prompt_tokens_total",
        "generation_tokens_total",
    )
    kv = (
        "pages_created",
        "pages_free",
        "pages_cached",
        "pages_in_use",
        "slots_running",
        "slots_cached",
    )
    return {
        **{k: stats[k] for k in engine},
        **{k: stats["kv"][k] for k in kv},
        "at_rest": at_rest(stats),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="an app already serving (default: deploy one locally)")
    parser.add_argument("--address", help="Ray cluster of --url's app, to read its replicas' books")
    parser.add_argument("--app-name", default="vattn-load")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-running", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--max-requests", type=int)
    parser.add_argument("--prompt-words", type=int, nargs=2, default=(4, 160))
    parser.add_argument("--max-tokens", type=int, nargs=2, default=(1, 96))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key")
    parser.add_argument("--out", type=Path, help="results directory (default benchmarks/results)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from benchmarks.environment import describe_device, save
    from cluster.app import build_app
    from cluster.protocol import served_model_name

    url, books_app = args.url, None
    if url is None:
        # Logical CPUs for every replica (one each) and the ingress, however few cores the host has.
        ray.init(
            num_cpus=max(os.cpu_count() or 1, args.replicas + 1),
            include_dashboard=False,
            log_to_driver=False,
        )
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        serve.run(
            build_app(
                {
                    "model": args.model,
                    "replicas": args.replicas,
                    "max_running": args.max_running,
                    "api_key": args.api_key,
                }
            ),
            name=args.app_name,
            route_prefix="/",
        )
        url, books_app = "http://127.0.0.1:8000", args.app_name
    elif args.address:
        ray.init(address=args.address, namespace="serve", log_to_driver=False)
        books_app = args.app_name
    config = LoadConfig(
        concurrency=args.concurrency,
        duration_s=args.duration,
        max_requests=args.max_requests,
        prompt_words=tuple(args.prompt_words),
        max_tokens=tuple(args.max_tokens),
        seed=args.seed,
        api_key=args.api_key,
        model=served_model_name(args.model) if args.url is None else None,
    )
    before = {rid: _books(s) for rid, s in replica_stats(books_app).items()} if books_app else None
    load_before = os.getloadavg()  # other work on the host skews the figures: recorded with them
    summary = asyncio.run(run_load(url, config))
    load_after = os.getloadavg()
    after = {rid: _books(s) for rid, s in wait_at_rest(books_app).items()} if books_app else None
    print(
        json.dumps(
            {k: v for k, v in summary.items() if k not in ("config", "error_samples")}, indent=2
        )
    )
    if after is not None:
        print("replicas at rest after the load:", all(b["at_rest"] for b in after.values()))
    if not args.no_save:
        backend = (
            "cuda" if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
        )
        payload = {
            "environment": describe_device(backend),
            "setup": {
                "model": args.model,
                "replicas": args.replicas,
                "max_running": args.max_running,
                "url": url,
                "host_cpus": os.cpu_count(),
                "host_load_avg_1_5_15m": {"before": load_before, "after": load_after},
            },
            "load": summary,
            "replicas_before": before,
            "replicas_after": after,
        }
        print("saved", save("load", payload, args.out))
    if books_app and args.url is None:
        serve.delete(args.app_name)


if __name__ == "__main__":
    main()
