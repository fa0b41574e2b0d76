"""Ray Serve LLM's prefix-affinity router over vattn replicas, as a baseline for
``benchmarks.bench_router`` (``AppOptions.router="prefix-affinity"``).

``PrefixCacheAffinityRouter`` (``ray.llm``) keeps an approximate record of what it sent where: a
prefix tree of every routed prompt's text, per replica, in a shared actor. A request goes to the
replicas whose record matches the longest part of its prompt (then the shorter queue of them), to
the replicas with the smallest record when no match reaches 10% of the prompt, and by power of
two choices only when queue lengths differ by more than ``imbalanced_threshold`` (by default
never). It never looks at free memory: that is the difference with ``cluster.router``'s score.

Two adaptations, nothing else changed: vattn's replicas take token ids (``GenerateRequest``), so the
prompt's text is one character per token id (``token_text``: a character prefix is a token
prefix); and the tree's actor is created with ``num_cpus=0`` (Ray's asks for a CPU to be scheduled,
which a small host with its replicas placed may not have left).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray
from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import (
    PrefixCacheAffinityRouter,
)
from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTreeActor
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest

from cluster.protocol import GenerateRequest

ROUTER_PATH = "cluster.affinity_router:PrefixAffinityRouter"
_SURROGATES = 0xD800  # code points U+D800..U+DFFF are not characters: token ids skip them
_BASE = 0x100


def token_text(token_ids: Sequence[int]) -> str:
    """One character per token id (the same id, the same character), so that two prompts share a
    character prefix exactly when they share a token prefix."""
    return "".join(
        chr(t + _BASE if t + _BASE < _SURROGATES else t + _BASE + 0x800) for t in token_ids
    )


class PrefixAffinityRouter(PrefixCacheAffinityRouter):
    """``PrefixCacheAffinityRouter`` reading a ``GenerateRequest``'s token ids (see the module)."""

    def initialize_state(self, **kwargs: Any) -> None:
        if kwargs.get("tree_actor") is None:
            kwargs["tree_actor"] = self._tree_actor_of_deployment()
        super().initialize_state(**kwargs)

    def _tree_actor_of_deployment(self) -> Any:
        """The deployment's shared tree, named as Ray's router names it (every process routing
        to the deployment finds the same one), without a CPU of its own; removed with Serve."""
        deployment = getattr(self, "_deployment_id", None)
        namespace = "::".join(
            [SERVE_NAMESPACE]
            + ([deployment.app_name, deployment.name] if deployment is not None else [])
        )
        actor = PrefixTreeActor.options(
            name="LlmPrefixTreeActor",
            namespace=namespace,
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
        ).remote()
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        ray.get(controller._register_shutdown_cleanup_actor.remote(actor))
        return actor

    def _extract_text_from_request(self, pending_request: PendingRequest) -> str:
        for arg in (*pending_request.args, *pending_request.kwargs.values()):
            if isinstance(arg, GenerateRequest):
                return token_text(arg.prompt_token_ids)
        return super()._extract_text_from_request(pending_request)


def affinity_router_config(period_s: float = 0.5) -> RequestRouterConfig:
    """RequestRouterConfig with Ray Serve LLM's defaults (no eviction of the tree, prefix matching
    whatever the queue lengths); ``period_s``: how often Serve polls the replicas' stats (this
    router does not read them)."""
    return RequestRouterConfig(
        request_router_class=ROUTER_PATH, request_routing_stats_period_s=period_s
    )
