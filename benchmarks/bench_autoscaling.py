"""Autoscaling benchmark: vattn's KV-pressure policy against Ray Serve's ongoing-requests policy.

    python -m benchmarks.bench_autoscaling            # CPU: 1-3 replicas of a tiny random Llama
    python -m benchmarks.bench_autoscaling --capacity-check   # first: do 1, 2, 3 replicas add
                                                      # throughput on this host? (with
                                                      # --policies "": that check alone)
    python -m benchmarks.bench_autoscaling --smoke    # a tiny run (CI)
    python -m benchmarks.bench_autoscaling --gpu      # 1-3 replicas of Llama-3-8B shapes
                                                      # (synthetic bf16) sharing one GPU (0.33 each)
    python -m benchmarks.bench_autoscaling --gpu-small   # the same with a small random Llama
                                                      # whose replicas are bound by their host
                                                      # work (where 8B ones add no capacity)

One seeded open-loop schedule is replayed against the same app deployed once per policy
(``AppOptions.autoscaler``), both between 1 and 3 replicas with the same delays and push interval:
a quiet phase of short requests, then a *memory-heavy step*: long prompts arriving slowly (few
requests at once, so the ongoing-requests count stays low while they fill a replica's KV pages),
then short requests again while the deployment scales back down. Both policies get comparable
targets: Serve's ``target_ongoing_requests`` is about 0.8 of the long requests one replica's KV
holds, the KV policy's ``target_kv_utilization`` (0.8 of its pages). On the CPU the model is a
2-layer, 64-wide random Llama (:data:`SMALL_LLAMA`) whose decode steps cost about the same for one
request or several, with a KV budget of one long request beside a few short ones, so a replica's
throughput is bounded by the requests its KV holds rather than by its compute
(``--capacity-check`` measures whether more replicas then add throughput on the host: it saves
1, 2 and 3 fixed replicas under a closed loop of the step's long requests). Every request is a
streaming ``/v1/completions`` call with a token-id prompt and ``ignore_eos``. Measured per policy:

* replicas over time (Serve's running and starting replicas, sampled every 0.25 s) and
  replica-seconds (running replicas integrated from the first arrival to the last reply), the time
  from the step's start to the first scale-up (a replica starting) and the largest count;
* from the client: p50 / p99 TTFT and end-to-end latency, failed requests;
* preemptions: each replica's ``vattn_preemptions_total`` from ``/metrics``, its largest value
  seen (replicas that stopped push their last books), summed.

The host's load (1-minute load average, idle cores over 3 s) is saved at the start.
Results go to ``benchmarks/results/autoscaling-<device>-<date>.json`` and a plot of replicas and
requests in flight over time beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.load_test import Outcome, outcome_summary, send

MiB = 1 << 20
POLICIES = ("kv-pressure", "ongoing-requests")


@dataclass(frozen=True)
class Workload:
    """Phases in seconds; sizes in tokens (inclusive ranges); rates in requests/s."""

    quiet_s: float = 10.0
    step_s: float = 40.0
    tail_s: float = 30.0
    short_rate: float = 0.5
    long_rate: float = 2.0
    short_prompt: tuple[int, int] = (16, 48)
    short_output: tuple[int, int] = (8, 16)
    long_prompt: tuple[int, int] = (352, 480)
    long_output: tuple[int, int] = (32, 48)
    seed: int = 0


@dataclass(frozen=True)
class Deployment:
    """The app each policy gets (``cluster.app.AppOptions`` fields; ``model`` None: the small random
    Llama, :data:`SMALL_LLAMA`, written to a temporary directory)."""

    model: str | None = None
    min_replicas: int = 1
    max_replicas: int = 3
    replica_cpus: float = 0.5
    replica_gpus: float = 1.0
    # 576 tokens of the small Llama (1 KiB a token): a long request expects ~436 of them at
    # admission (its prompt and half its max_tokens), so one runs at a time beside a few short
    # ones; the KV policy's 0.8 of the pages is about one long request (1.06), as is Serve's
    # target of 1 ongoing request per replica below.
    kv_cache_bytes: int = 576 * 1024
    page_size: int | None = 16 * 1024
    max_model_len: int = 576
    max_running: int = 8
    autoscaling_metrics_interval_s: float = 0.5
    upscale_delay_s: float = 1.0
    downscale_delay_s: float = 10.0
    target_ongoing_requests: float = 1.0
    device: str = "cpu"
    #: The host KV tier per replica; None: the engine's default (on a GPU a quarter of the node's
    #: host memory shared by its replicas' GPUs, off on a CPU). Results record what each pinned.
    kv_offload_bytes: int | None = None

    def app_args(self, model: str, policy: str) -> dict[str, Any]:
        args = {k: v for k, v in asdict(self).items() if v is not None}
        return {**args, "model": model, "autoscaler": policy, "routing_stats_period_s": 0.25}


FULL = (Workload(), Deployment())
SMOKE = (
    Workload(quiet_s=2, step_s=8, tail_s=4, long_rate=0.5, long_output=(16, 24)),
    Deployment(max_replicas=2, downscale_delay_s=2.0),
)
# Three replicas of the small GPU Llama (SMALL_GPU_LLAMA, below) share one GPU, two CPUs each: the
# issue's switch where 8B-shaped replicas add no capacity. A KV budget of 16 pages (2,048 tokens)
# holds one long request (1-1.5K prompt tokens, 64-128 out) beside a few short ones, as the CPU
# configuration's does; the step's load is several replicas' worth of long requests.
GPU_SMALL = (
    Workload(
        quiet_s=5,
        step_s=45,
        tail_s=20,
        short_rate=1.0,
        long_rate=4.0,
        short_prompt=(16, 64),
        short_output=(8, 16),
        long_prompt=(1024, 1536),
        long_output=(64, 128),
    ),
    Deployment(
        replica_cpus=2.0,
        replica_gpus=0.33,
        kv_cache_bytes=32 * MiB,
        page_size=None,
        max_model_len=2048,
        max_running=8,
        device="cuda",
    ),
)
# Three replicas of Llama-3-8B shapes share one H200 (16 GB of weights each), each with a 2 GiB KV
# budget (16,384 tokens): a long request of 7-11K tokens takes most of one. Sized so that both
# policies run in one command of under 10 minutes.
GPU = (
    Workload(
        quiet_s=5,
        step_s=45,
        tail_s=20,
        short_rate=2.0,
        long_rate=1.0,
        short_prompt=(64, 256),
        short_output=(32, 128),
        long_prompt=(6144, 10240),
        long_output=(512, 1024),
    ),
    Deployment(
        model="synthetic",
        replica_cpus=2.0,
        replica_gpus=0.33,
        kv_cache_bytes=2048 * MiB,
        page_size=None,
        max_model_len=12288,
        max_running=64,
        target_ongoing_requests=2.0,  # Serve's default (a replica's KV holds ~1.8 long requests)
        device="cuda",
    ),
)


@dataclass(frozen=True)
class Arrival:
    at_s: float
    kind: str  # "short" or "long"
    prompt: tuple[int, ...]
    max_tokens: int


def schedule(workload: Workload, vocab_size: int) -> list[Arrival]:
    """Poisson arrivals: shorts throughout, longs during the step only; seeded."""
    rng = random.Random(workload.seed)
    end = workload.quiet_s + workload.step_s + workload.tail_s
    arrivals = []
    for kind, rate, start, stop in (
        ("short", workload.short_rate, 0.0, end),
        ("long", workload.long_rate, workload.quiet_s, workload.quiet_s + workload.step_s),
    ):
        prompt_range = workload.long_prompt if kind == "long" else workload.short_prompt
        output_range = workload.long_output if kind == "long" else workload.short_output
        at = start + rng.expovariate(rate)
        while at < stop:
            prompt = tuple(rng.randrange(10, vocab_size) for _ in range(rng.randint(*prompt_range)))
            arrivals.append(Arrival(at, kind, prompt, rng.randint(*output_range)))
            at += rng.expovariate(rate)
    return sorted(arrivals, key=lambda a: a.at_s)


class Sampler(threading.Thread):
    """Every 0.25 s: Serve's running and starting replicas and the client's requests in flight;
    every second: each replica's preemptions (the largest seen) and host tier bytes from
    ``/metrics``."""

    def __init__(self, app_name: str, base_url: str, model: str, flight: list[int]) -> None:
        super().__init__(daemon=True)
        self.app_name, self.base_url, self.model, self.flight = app_name, base_url, model, flight
        self.start_time = time.perf_counter()
        self.samples: list[dict[str, float]] = []
        self.preemptions: dict[str, float] = {}
        self.host_tier_bytes: dict[str, float] = {}  # rank 0's, by replica
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        from ray import serve

        scraped = 0.0
        while not self.done.wait(0.25):
            now = time.perf_counter() - self.start_time
            states = serve.status().applications[self.app_name].deployments["VattnReplica"]
            counts = {str(s): n for s, n in states.replica_states.items()}
            self.samples.append(
                {
                    "t_s": round(now, 2),
                    "running": counts.get("RUNNING", 0),
                    "starting": counts.get("STARTING", 0),
                    "in_flight": self.flight[0],
                }
            )
            if now - scraped >= 1.0:
                scraped = now
                self._scrape()

    def _scrape(self) -> None:
        try:
            text = httpx.get(f"{self.base_url}/metrics", timeout=5).text
        except httpx.HTTPError:
            return
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.labels.get("model") != self.model:
                    continue
                replica = s.labels.get("replica", "")
                if s.name == "vattn_preemptions_total":
                    self.preemptions[replica] = max(self.preemptions.get(replica, 0), s.value)
                elif s.name == "vattn_kv_host_tier_bytes" and s.labels.get("rank") == "0":
                    self.host_tier_bytes[replica] = s.value


def request_body(model: str, arrival: Arrival) -> dict[str, Any]:
    """The streaming ``/v1/completions`` body of an arrival: its token-id prompt, greedy, every
    ``max_tokens`` token generated (``ignore_eos``)."""
    return {
        "model": model,
        "prompt": list(arrival.prompt),
        "max_tokens": arrival.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }


async def replay(
    base_url: str, model: str, arrivals: list[Arrival], flight: list[int]
) -> tuple[list[tuple[Arrival, Outcome]], float]:
    """Sends each arrival at its time; (arrival, outcome) pairs and the wall time to the last
    reply."""
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        start = time.perf_counter()

        async def one(arrival: Arrival) -> tuple[Arrival, Outcome]:
            await asyncio.sleep(max(0.0, arrival.at_s - (time.perf_counter() - start)))
            flight[0] += 1
            try:
                return arrival, await send(client, "/v1/completions", request_body(model, arrival))
            finally:
                flight[0] -= 1

        pairs = await asyncio.gather(*(one(a) for a in arrivals))
        return list(pairs), time.perf_counter() - start


def run_policy(
    policy: str,
    deployment: Deployment,
    model_dir: str,
    workload: Workload,
    arrivals: list[Arrival],
    base_url: str,
) -> dict[str, Any]:
    """Deploys the app with ``policy``, replays ``arrivals``, waits for the scale-down, deletes
    the app."""
    from ray import serve

    from cluster.app import build_app
    from cluster.protocol import served_model_name

    app_name, model = f"bench-autoscaling-{policy}", served_model_name(model_dir)
    serve.run(build_app(deployment.app_args(model_dir, policy)), name=app_name, route_prefix="/")
    flight = [0]
    sampler = Sampler(app_name, base_url, model, flight)
    try:
        asyncio.run(replay(base_url, model, arrivals[:1], flight))  # warm: one request
        sampler.start_time = time.perf_counter()  # the replay's clock from here
        pairs, wall = asyncio.run(replay(base_url, model, arrivals, flight))
        deadline = time.perf_counter() + deployment.downscale_delay_s * 4 + 60
        while time.perf_counter() < deadline:  # back to the minimum (or give up)
            if sampler.samples and sampler.samples[-1]["running"] <= deployment.min_replicas:
                break
            time.sleep(0.5)
        time.sleep(1.5)  # a last /metrics scrape after the stopped replicas' final push
    finally:
        sampler.done.set()
        sampler.join(10)
        serve.delete(app_name)
    outcomes = [o for _, o in pairs]
    samples = [s for s in sampler.samples if s["t_s"] >= 0]
    busy = [s for s in samples if s["t_s"] <= wall]
    replica_seconds = sum(0.25 * s["running"] for s in busy)
    up = next(
        (s["t_s"] for s in samples if s["running"] + s["starting"] > deployment.min_replicas),
        None,
    )
    by_kind = {}
    for kind in ("short", "long"):
        mine = [o for a, o in pairs if a.kind == kind]
        by_kind[kind] = outcome_summary(mine, wall, 0) if mine else {}
    return {
        **outcome_summary(outcomes, wall, max((s["in_flight"] for s in samples), default=0)),
        "by_kind": {k: {"ttft_s": v.get("ttft_s"), "ok": v.get("ok")} for k, v in by_kind.items()},
        "replica_seconds": round(replica_seconds, 2),
        "max_replicas_seen": max((s["running"] for s in samples), default=0),
        "min_replicas_seen": min((s["running"] for s in busy), default=0),
        "first_scale_up_after_step_s": None if up is None else round(up - workload.quiet_s, 2),
        "preemptions": int(sum(sampler.preemptions.values())),
        "preemptions_by_replica": sampler.preemptions,
        "host_tier_bytes_by_replica": sampler.host_tier_bytes,
        "replicas_over_time": samples,
    }


async def closed_loop(
    base_url: str, model: str, requests: list[Arrival], concurrency: int, duration_s: float
) -> tuple[list[Outcome], float]:
    """``concurrency`` clients, each sending the next of ``requests`` (cycled) as soon as its last
    one finished, until ``duration_s``; the outcomes and the wall time to the last reply."""
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        start, index = time.perf_counter(), 0

        async def client_loop() -> None:
            nonlocal index
            while time.perf_counter() - start < duration_s:
                arrival = requests[index % len(requests)]
                index += 1
                outcomes.append(await send(client, "/v1/completions", request_body(model, arrival)))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        return outcomes, time.perf_counter() - start


def capacity_check(
    deployment: Deployment,
    model_dir: str,
    arrivals: list[Arrival],
    base_url: str,
    replicas: tuple[int, ...] = (1, 2, 3),
    concurrency: int = 8,
    duration_s: float = 20.0,
) -> list[dict[str, Any]]:
    """Whether more replicas add throughput on this host: the step's long requests from
    ``concurrency`` closed-loop clients for ``duration_s`` against each fixed replica count (no
    autoscaling), enough to fill three replicas' KV and queue behind them."""
    from ray import serve

    from cluster.app import build_app
    from cluster.protocol import served_model_name

    model = served_model_name(model_dir)
    longs = [a for a in arrivals if a.kind == "long"]
    args = deployment.app_args(model_dir, POLICIES[0])
    for key in ("min_replicas", "max_replicas", "autoscaler"):
        args.pop(key)
    rows = []
    for n in replicas:
        app_name = f"bench-autoscaling-fixed-{n}"
        serve.run(build_app({**args, "replicas": n}), name=app_name, route_prefix="/")
        try:
            asyncio.run(replay(base_url, model, longs[:1], [0]))  # warm: one request
            outcomes, wall = asyncio.run(
                closed_loop(base_url, model, longs, concurrency, duration_s)
            )
        finally:
            serve.delete(app_name)
        summary = outcome_summary(outcomes, wall, concurrency)
        rows.append(
            {
                "replicas": n,
                **{k: summary[k] for k in ("ok", "errors", "wall_s", "requests_per_s")},
                **{k: summary[k] for k in ("output_tokens_per_s", "ttft_s", "e2e_s")},
            }
        )
        print("capacity", json.dumps(rows[-1]))
    base = rows[0]["requests_per_s"]
    for row in rows:
        row["speedup_over_one"] = round(row["requests_per_s"] / base, 2) if base else None
    return rows


def compare(results: dict[str, dict[str, Any]], push_interval_s: float) -> dict[str, Any]:
    """The issue's targets, reported (not asserted): the KV policy reacts at least one push
    interval earlier, with >= 1.3x lower p99 TTFT at <= the same replica-seconds, no failures."""
    kv, ongoing = results.get("kv-pressure"), results.get("ongoing-requests")
    if not kv or not ongoing:
        return {}
    kv_up, ongoing_up = kv["first_scale_up_after_step_s"], ongoing["first_scale_up_after_step_s"]
    p99 = (kv["ttft_s"]["p99"], ongoing["ttft_s"]["p99"])
    ratio = p99[1] / p99[0] if p99[0] and p99[1] else None
    return {
        "kv_scale_up_after_step_s": kv_up,
        "ongoing_scale_up_after_step_s": ongoing_up,
        "kv_reacts_earlier_by_s": (
            None if kv_up is None or ongoing_up is None else round(ongoing_up - kv_up, 2)
        ),
        "p99_ttft_ongoing_over_kv": ratio,
        "replica_seconds_kv_over_ongoing": (
            kv["replica_seconds"] / ongoing["replica_seconds"]
            if ongoing["replica_seconds"]
            else None
        ),
        "failed": {"kv-pressure": kv["errors"], "ongoing-requests": ongoing["errors"]},
        "targets_met": {
            "reacts_one_push_earlier": kv_up is not None
            and (ongoing_up is None or ongoing_up - kv_up >= push_interval_s),
            "p99_ttft_ratio_1_3": ratio is not None and ratio >= 1.3,
            "replica_seconds_not_more": kv["replica_seconds"] <= ongoing["replica_seconds"],
            "no_failures": kv["errors"] == 0 and ongoing["errors"] == 0,
        },
    }


#: The CPU model: a 2-layer random Llama 64 wide (1,024-token vocabulary). Its steps cost little
#: compute (a decode step of one request or four takes about as long), and its K and V take 1 KiB a
#: token in float32, so a replica's throughput is bounded by how many requests its KV budget holds.
SMALL_LLAMA = {
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}


#: The small Llama on a GPU (``--gpu-small``): small enough that a replica's steps are bound by
#: its host work (so replicas sharing one GPU add capacity, where 8B-shaped ones share its memory
#: bandwidth), wide enough that a 2 MiB page holds 128 tokens (16 KiB a bf16 token) and a KV
#: budget of a few pages is a few requests.
SMALL_GPU_LLAMA = {
    "vocab_size": 1024,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
}


def small_llama(directory: Path, shape: dict[str, int] = SMALL_LLAMA) -> str:
    """``shape`` (:data:`SMALL_LLAMA` or :data:`SMALL_GPU_LLAMA`) with random weights, saved as a
    HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(directory)
    return str(directory)


def plot(payload: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workload = payload["settings"]["workload"]
    results = payload["results"]
    fig, axes = plt.subplots(len(results), 1, figsize=(8, 2.6 * len(results)), sharex=True)
    for ax, (policy, result) in zip(list(getattr(axes, "flat", [axes])), results.items()):
        samples = result["replicas_over_time"]
        t = [s["t_s"] for s in samples]
        ax.step(t, [s["running"] for s in samples], where="post", label="replicas running")
        ax.step(
            t,
            [s["running"] + s["starting"] for s in samples],
            where="post",
            linestyle="--",
            label="running + starting",
        )
        ax.set_ylabel("replicas")
        ax.set_ylim(0, payload["settings"]["deployment"]["max_replicas"] + 0.5)
        load = ax.twinx()
        load.plot(t, [s["in_flight"] for s in samples], color="grey", alpha=0.5, label="in flight")
        load.set_ylabel("requests in flight")
        start, stop = workload["quiet_s"], workload["quiet_s"] + workload["step_s"]
        ax.axvspan(start, stop, color="orange", alpha=0.1, label="long-prompt step")
        ax.set_title(
            f"{policy}: p99 TTFT {result['ttft_s']['p99'] or 0:.2f} s, "
            f"{result['replica_seconds']:.0f} replica-s, {result['preemptions']} preemptions",
            fontsize=9,
        )
        ax.legend(loc="upper left", fontsize=7)
    axes_list = list(getattr(axes, "flat", [axes]))
    axes_list[-1].set_xlabel("seconds since the first arrival")
    fig.suptitle(f"Autoscaling on {payload['environment']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def idle_cores(seconds: float = 3.0) -> float | None:
    """Cores idle over ``seconds`` (Linux's /proc/stat), or None where it cannot be read."""

    def times() -> list[int]:
        with open("/proc/stat") as stat:
            return [int(v) for v in stat.readline().split()[1:]]

    try:
        before = times()
        time.sleep(seconds)
        after = times()
    except (OSError, ValueError):
        return None
    delta = [b - a for a, b in zip(before, after)]
    idle = delta[3] + (delta[4] if len(delta) > 4 else 0)  # idle + iowait
    return round((os.cpu_count() or 1) * idle / max(sum(delta), 1), 2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    size.add_argument("--gpu", action="store_true", help="3 replicas of 8B shapes sharing a GPU")
    size.add_argument(
        "--gpu-small",
        action="store_true",
        help="3 replicas of a small Llama sharing a GPU, each bound by its host work",
    )
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated, in order")
    parser.add_argument("--model", help="a HF directory, 'embedded' or 'synthetic' instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--out", type=Path, help="results directory (default benchmarks/results)")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument(
        "--capacity-check",
        action="store_true",
        help="first measure 1, 2 and 3 fixed replicas' throughput under the step's long requests",
    )
    parser.add_argument("--note", default="", help="a note saved with the results")
    args = parser.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    if unknown := set(policies) - set(POLICIES):
        parser.error(f"unknown policies {sorted(unknown)}; known: {', '.join(POLICIES)}")
    workload, deployment = (
        SMOKE if args.smoke else GPU if args.gpu else GPU_SMALL if args.gpu_small else FULL
    )
    gpu = args.gpu or args.gpu_small
    workload = replace(workload, seed=args.seed)
    if args.model:
        deployment = replace(deployment, model=args.model)

    import ray
    from ray import serve

    from benchmarks.environment import describe_device, save
    from benchmarks.results_io import plot_path
    from replica.model import ModelConfig
    from replica.model.source import resolve_model_dir

    load_at_start = round(os.getloadavg()[0], 2)
    idle_at_start = idle_cores()
    owned = not ray.is_initialized()  # in tests the session's Ray and Serve are used as they are
    if owned:
        ray.init(num_cpus=max(os.cpu_count() or 1, 8), include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    scratch = tempfile.TemporaryDirectory(prefix="bench-autoscaling-")
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        if gpu and gpus < 1:
            raise SystemExit("--gpu and --gpu-small need a GPU")
        shape = SMALL_GPU_LLAMA if args.gpu_small else SMALL_LLAMA
        model = deployment.model or small_llama(Path(scratch.name) / "small-llama", shape)
        model_dir = resolve_model_dir(model)
        vocab = ModelConfig.from_hf_dir(model_dir).vocab_size if model_dir else 32000
        arrivals = schedule(workload, vocab)
        base_url = f"http://127.0.0.1:{args.port}"
        capacity = (
            capacity_check(deployment, model, arrivals, base_url) if args.capacity_check else None
        )
        results = {}
        for policy in policies:
            results[policy] = run_policy(policy, deployment, model, workload, arrivals, base_url)
            shown = ("ok", "errors", "ttft_s", "replica_seconds", "preemptions")
            extra = ("first_scale_up_after_step_s", "max_replicas_seen")
            print(policy, json.dumps({k: results[policy][k] for k in shown + extra}))
            for sample in results[policy]["error_samples"][:3]:
                print("  failed:", json.dumps(sample))
        comparison = compare(results, deployment.autoscaling_metrics_interval_s)
        print(json.dumps(comparison, indent=2))
    finally:
        scratch.cleanup()
        if owned:
            serve.shutdown()
            ray.shutdown()
    import ray as ray_module

    payload = {
        "environment": describe_device("cuda" if gpu else "cpu")
        | {"host_cpus": os.cpu_count(), "gpus": gpus, "ray": ray_module.__version__}
        | {"load_average_1m_at_start": load_at_start, "idle_cores_at_start": idle_at_start}
        | {"load_average_1m_at_end": round(os.getloadavg()[0], 2)},
        "settings": {
            "smoke": args.smoke,
            "gpu": args.gpu,
            "gpu_small": args.gpu_small,
            "policies": policies,
            "workload": asdict(workload),
            "deployment": asdict(deployment)
            | {"model": deployment.model or "small random Llama", "small_shape": shape},
            "schedule": {
                "requests": len(arrivals),
                "long": sum(a.kind == "long" for a in arrivals),
                "prompt_tokens": sum(len(a.prompt) for a in arrivals),
            },
        },
        "results": results,
        "comparison": comparison,
    }
    if capacity is not None:
        payload["capacity_check"] = capacity
    if args.note:
        payload["note"] = args.note
    if not args.no_save:
        path = save("autoscaling", payload, args.out)
        print("saved", path)
        if results:  # `--policies ""` runs the capacity check alone: nothing to plot
            print("plotted", plot(payload, plot_path(path, "replicas")))


if __name__ == "__main__":
    main()
