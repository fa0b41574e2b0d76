"""The replica deployment: one Serve replica = one engine (a tensor-parallel group of ranks).

It streams ``RequestOutput`` deltas back to the caller and reports what the free-page router
needs through ``record_routing_stats``. A caller that stops iterating (client disconnect) cancels
the stream, which aborts the request and frees its slot at once.
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

from cluster.protocol import GenerateRequest, ModelInfo
from replica.async_engine import AsyncLLMEngine
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
    def __init__(self, engine_config: dict[str, Any]) -> None:
        self.config = EngineConfig(**engine_config)
        self.engine = AsyncLLMEngine(self.config)
        self.name = served_model_name(self.config.model)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        log.info("vattn replica %s ready (pid %d)", self.name, os.getpid())

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        async for output in self.engine.generate(list(request.prompt_token_ids), request.params, request.request_id):
            yield dataclasses.replace(output, replica=self.replica_id)

    def model_info(self) -> ModelInfo:
        kv = self.engine.engine.kv.config
        limit = min(self.config.max_model_len, self.engine.engine.model_config.max_position_embeddings)
        return ModelInfo(self.name, limit, tokens_per_physical_page(kv))

    def record_routing_stats(self) -> dict[str, Any]:
        stats = self.engine.stats()
        kv = self.engine.engine.kv.config
        return {
            "free_pages": stats.kv.pages_available,
            "total_pages": stats.kv.pages_total,
            "tokens_per_page": tokens_per_physical_page(kv),
            "running": stats.running,
            "waiting": stats.waiting,
            "timestamp": time.time(),
        }

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def stats_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.engine.stats())

    def check_health(self) -> None:
        if not self.engine.alive():
            raise RuntimeError("the engine loop has stopped")


def tokens_per_physical_page(kv: Any) -> float:
    """Tokens one physical page holds, counting every range a token occupies (K and V, and every
    layer's range in the per_layer layout): a request of T tokens needs about T / this many pages."""
    return float(kv.page_size / (kv.bytes_per_token * kv.num_ranges))
