"""The replica deployment: one Serve replica = one engine (a tensor-parallel group of ranks).

It streams ``RequestOutput`` deltas back to the caller, reports what the free-page router needs
(free KV pages, the pages its queue will take and the pages its requests will hold at their
``max_tokens``) through ``record_routing_stats``, what the KV-pressure autoscaler needs (the pages
its requests are expected to hold, its budget, its queue: ``cluster.autoscaling``) through
``record_autoscaling_stats``, and pushes its
Prometheus metrics to the metrics hub about once a second (``cluster.metrics_hub``; the ingress
serves them on ``/metrics``). A caller that stops iterating (client disconnect) cancels the stream,
which aborts the request and frees its slot.

Stopping (scale-down, redeploy, delete) loses no request: Serve first stops routing to the replica,
then waits until its ongoing requests finish (``graceful_shutdown_timeout_s``, sized by
``cluster.app`` for a long generation), then calls ``__del__``, which stops the engine and gives
its KV pages back to the device.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from cluster import autoscaling
from cluster.metrics.snapshots import ReplicaSnapshot, take_snapshot
from cluster.metrics_hub import MetricsPusher
from cluster.node_share import ray_gpu_share
from cluster.protocol import GenerateRequest, ModelInfo, served_model_name
from replica.async_engine import AsyncLLMEngine
from replica.engine import LLMEngine
from replica.engine_config import EngineConfig
from replica.engine_stats import EngineStats, RoutingStats
from replica.request import RequestOutput

log = logging.getLogger(__name__)


@serve.deployment(max_ongoing_requests=256, health_check_period_s=10)
class VattnReplica:
    def __init__(self, engine_config: dict[str, Any], metrics_period_s: float = 1.0) -> None:
        # The host tier's default is this replica's share of its node (the GPUs Ray gave it); its
        # rank actors, one GPU each as it holds, take rank 0's tier size (replica.tp.driver).
        self.config = EngineConfig(**{**engine_config, "node_share": ray_gpu_share()})
        self.name = served_model_name(self.config.model)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.engine = AsyncLLMEngine(
            self.config,
            engine=make_engine(self.config, (self.name, self.replica_id, metrics_period_s)),
        )
        self.metrics = MetricsPusher(self._metrics_snapshot, metrics_period_s)
        self.metrics.start()
        log.info("vattn replica %s ready (pid %d)", self.name, os.getpid())

    def __del__(self) -> None:
        """Serve calls it when it stops the replica, once its requests have finished: the engine
        stops and its KV pages go back to the device (a scaled-down replica leaves nothing
        mapped)."""
        pusher = getattr(self, "metrics", None)
        if pusher is not None:
            pusher.stop()
        engine = getattr(self, "engine", None)
        if engine is not None and engine.alive():
            released = engine.release_kv_memory()
            if pusher is not None:
                try:  # the books at the end (nothing created, nothing in use) reach /metrics
                    pusher.push_once()
                except Exception:
                    log.exception("the last metrics push failed")
            engine.shutdown()  # the other tensor-parallel ranks, if any, then the engine's loop
            log.info("vattn replica %s stopped; released %d KV pages", self.replica_id, released)

    def _metrics_snapshot(self) -> ReplicaSnapshot:
        """Gauges, counters and the latency samples since the last call: it drains the engine's
        latency log and map latencies, so the pusher is its only caller."""
        return take_snapshot(self.name, self.replica_id, self.engine.snapshot())

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """The request's deltas; the first, empty, says the engine accepted it (``announce``)."""
        outputs = self.engine.generate(
            request.prompt_token_ids, request.params, request.request_id, announce=True
        )
        accepted = await anext(outputs)
        yield dataclasses.replace(accepted, replica=self.replica_id)  # names the replica once
        async for output in outputs:
            yield output

    async def model_info(self) -> ModelInfo:
        stats = await asyncio.to_thread(self.engine.routing_stats)
        return ModelInfo(self.name, self.engine.context_limit, stats.tokens_per_page)

    async def record_routing_stats(self) -> RoutingStats:
        """What the router weighs (``cluster.routing``): pages available now, the pages the
        waiting requests need, the pages every request would hold at its max_tokens, the prefix
        summary, taken together between two engine steps and stamped with the time. Serve hands
        this frozen ``RoutingStats`` to the router as it is. Async, as the other methods that read
        the engine (in a worker thread): Serve runs a plain method on the event loop that streams
        the tokens, which would stall while the engine finishes its step."""
        return await asyncio.to_thread(self.engine.routing_stats)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What the KV-pressure autoscaler weighs (``cluster.autoscaling``): the pages this
        replica's requests are expected to hold, its page budget, its waiting requests. Serve
        calls it every ``autoscaling_config.metrics_interval_s`` and sends the values to its
        controller, where ``cluster.autoscaler.KVPressurePolicy`` reads them."""
        stats = await asyncio.to_thread(self.engine.routing_stats)
        return {
            autoscaling.DEMAND_PAGES: float(stats.demand_pages),
            autoscaling.BUDGET_PAGES: float(stats.total_pages),
            autoscaling.WAITING: float(stats.waiting),
        }

    async def stats(self) -> EngineStats:
        return await asyncio.to_thread(self.engine.stats)

    async def stats_dict(self) -> dict[str, Any]:
        """The engine's stats as plain data, with this replica's id under ``"replica"``."""
        return {**dataclasses.asdict(await self.stats()), "replica": self.replica_id}

    def check_health(self) -> None:
        broken = self.engine.broken()
        if broken is not None:
            raise RuntimeError(f"a tensor-parallel rank failed: {broken}")
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
