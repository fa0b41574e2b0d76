"""The replica deployment: one Serve replica = one engine (a tensor-parallel group of ranks).

It streams ``RequestOutput`` deltas back to the caller, reports what the free-page router needs
(free KV pages, the pages its queue will take and the pages its requests will hold at their
``max_tokens``) through ``record_routing_stats``, and pushes its
Prometheus metrics to the metrics hub about once a second (``cluster.metrics_hub``; the ingress
serves them on ``/metrics``). A caller that stops iterating (client disconnect) cancels the stream,
which aborts the request and frees its slot.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

from cluster.metrics import ReplicaSnapshot, take_snapshot
from cluster.metrics_hub import MetricsPusher
from cluster.protocol import GenerateRequest, ModelInfo
from replica.async_engine import AsyncLLMEngine
from replica.engine import LLMEngine
from replica.engine_config import EngineConfig
from replica.engine_stats import EngineStats
from replica.request import RequestOutput

log = logging.getLogger(__name__)


def served_model_name(model: str) -> str:
    if model == "embedded":
        return "SmolLM2-135M-Instruct"
    if model == "synthetic":
        return "synthetic-llama"
    return Path(model).name


@serve.deployment(max_ongoing_requests=256, health_check_period_s=10)
class VattnReplica:
    def __init__(self, engine_config: dict[str, Any], metrics_period_s: float = 1.0) -> None:
        self.config = EngineConfig(**engine_config)
        self.name = served_model_name(self.config.model)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.engine = AsyncLLMEngine(
            self.config, engine=make_engine(self.config, (self.name, self.replica_id, metrics_period_s)))
        self.metrics = MetricsPusher(self._metrics_snapshot, metrics_period_s)
        self.metrics.start()
        log.info("vattn replica %s ready (pid %d)", self.name, os.getpid())

    def __del__(self) -> None:  # Serve calls it when it stops the replica
        pusher = getattr(self, "metrics", None)
        if pusher is not None:
            pusher.stop()

    def _metrics_snapshot(self) -> ReplicaSnapshot:
        """Gauges, counters and the latency samples since the last call: it drains the engine's
        latency log and map latencies, so the pusher is its only caller."""
        return self.engine.call(lambda engine: take_snapshot(self.name, self.replica_id, engine))

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        async for output in self.engine.generate(list(request.prompt_token_ids), request.params, request.request_id):
            yield dataclasses.replace(output, replica=self.replica_id)

    def model_info(self) -> ModelInfo:
        kv = self.engine.engine.kv.config
        limit = min(self.config.max_model_len, self.engine.engine.model_config.max_position_embeddings)
        return ModelInfo(self.name, limit, tokens_per_physical_page(kv))

    async def record_routing_stats(self) -> dict[str, Any]:
        """What ``cluster.routing.ReplicaStats`` reads: free pages now, the pages the waiting
        requests need to be admitted (``queued_pages``) and the pages every request would hold at
        its ``max_tokens`` (``committed_pages``), taken together between two engine steps. Async,
        as the other methods that read the engine: Serve runs a plain method on the event loop
        that streams the tokens, which would stall while the engine finishes its step."""
        stats, queued, committed = await self.engine.call_async(lambda engine: (
            engine.stats(), engine.scheduler.waiting_pages(), engine.scheduler.committed_pages()))
        kv = self.engine.engine.kv.config
        return {
            # A broken replica (a rank gone) fits nothing: the router ranks it last.
            "free_pages": 0 if self.engine.engine.broken else stats.kv.pages_available,
            "queued_pages": queued,
            "committed_pages": committed,
            "total_pages": stats.kv.pages_total,
            "tokens_per_page": tokens_per_physical_page(kv),
            "running": stats.running,
            "waiting": stats.waiting,
            "timestamp": time.time(),
        }

    async def stats(self) -> EngineStats:
        return await self.engine.call_async(LLMEngine.stats)

    async def stats_dict(self) -> dict[str, Any]:
        """The engine's stats as plain data, with this replica's id under ``"replica"``."""
        return {**dataclasses.asdict(await self.stats()), "replica": self.replica_id}

    def check_health(self) -> None:
        if self.engine.engine.broken:
            raise RuntimeError(f"a tensor-parallel rank failed: {self.engine.engine.broken}")
        if not self.engine.alive():
            raise RuntimeError("the engine loop has stopped")


def make_engine(config: EngineConfig, metrics: tuple[str, str, float] | None = None) -> LLMEngine:
    """Rank 0 of the replica's tensor-parallel group runs here; ranks 1.. are Ray actors in the
    replica's placement group (one bundle per rank), each pushing its own cache's metrics
    (``metrics`` = model name, replica id, period)."""
    if config.tensor_parallel_size == 1:
        return LLMEngine(config)
    from cluster.rank_actors import RayRankRuntime

    gpus = 1.0 if config.torch_device().type == "cuda" else 0.0
    return LLMEngine(config, tp_runtime=RayRankRuntime(gpus_per_rank=gpus, metrics=metrics))


def tokens_per_physical_page(kv: Any) -> float:
    """Tokens one physical page holds, counting every range a token occupies (K and V, and every
    layer's range in the per_layer layout): a request of T tokens needs about T / this many pages."""
    return float(kv.page_size / (kv.bytes_per_token * kv.num_ranges))
