"""The metric catalogue: every series family ``GET /metrics`` exports, declared once (name, type,
help, labels, what it is read from, histogram buckets). KV and mapping series carry ``model``,
``replica`` and ``rank`` (each rank has its own cache); engine series carry ``model`` and
``replica`` (rank 0 schedules); router and autoscaler series carry ``model`` (plus ``reason`` or
the chosen ``replica``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["gauge", "counter", "histogram"]
REPLICA_LABELS = ("model", "replica")
RANK_LABELS = ("model", "replica", "rank")
ROUTER_LABELS = ("model",)

#: Upper bounds (seconds) of the histogram buckets; +Inf is implied.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
MAP_BUCKETS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)


@dataclass(frozen=True)
class MetricDef:
    """One exported series family. ``source`` names what it is read from: a key of
    ``KVCacheStats.as_dict()``, an ``EngineMetrics`` field, a ``LatencySamples`` field (the key of
    ``EngineMetrics.latency``) or a key of ``RoutingDecisions.snapshot()``."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...]
    source: str = ""
    buckets: tuple[float, ...] = ()


def _kv(name: str, kind: Kind, source: str, help: str) -> MetricDef:
    return MetricDef(name, kind, help, RANK_LABELS, source)


def _replica(
    name: str, kind: Kind, source: str, help: str, buckets: tuple[float, ...] = ()
) -> MetricDef:
    return MetricDef(name, kind, help, REPLICA_LABELS, source, buckets)


def _model(name: str, kind: Kind, source: str, help: str) -> MetricDef:
    """A series labelled by ``model`` alone (the router's and the autoscaler's)."""
    return MetricDef(name, kind, help, ("model",), source)


KV_METRICS = (
    _kv(
        "vattn_kv_pages_budget",
        "gauge",
        "pages_total",
        "Physical KV pages this rank may create (its budget).",
    ),
    _kv(
        "vattn_kv_pages_created",
        "gauge",
        "pages_created",
        "Physical KV pages created (free + in use + cached).",
    ),
    _kv("vattn_kv_pages_free", "gauge", "pages_free", "Created KV pages mapped nowhere."),
    _kv(
        "vattn_kv_pages_mapped",
        "gauge",
        "pages_mapped",
        "KV pages mapped under slots (in use + cached).",
    ),
    _kv(
        "vattn_kv_pages_in_use",
        "gauge",
        "pages_in_use",
        "KV pages mapped under running requests' slots.",
    ),
    _kv(
        "vattn_kv_pages_cached",
        "gauge",
        "pages_cached",
        "KV pages still mapped under released slots (reclaimed when needed).",
    ),
    _kv(
        "vattn_kv_pages_available",
        "gauge",
        "pages_available",
        "KV pages a new request could get now (free, creatable, cached, eager surplus).",
    ),
    _kv("vattn_kv_page_size_bytes", "gauge", "page_size_bytes", "Bytes of one physical KV page."),
    _kv(
        "vattn_kv_page_size_tokens",
        "gauge",
        "tokens_per_page",
        "Tokens one physical KV page holds, counting every range a token occupies.",
    ),
    _kv(
        "vattn_kv_cache_usage_ratio",
        "gauge",
        "usage_ratio",
        "KV pages in use over the budget (0..1).",
    ),
    _kv(
        "vattn_kv_wasted_bytes",
        "gauge",
        "wasted_bytes",
        "Bytes mapped under running slots that hold no token.",
    ),
    _kv(
        "vattn_kv_released_bytes_total",
        "counter",
        "bytes_released_total",
        "Physical KV bytes the elastic pool returned to the device.",
    ),
    _kv(
        "vattn_kv_map_calls_total",
        "counter",
        "map_calls",
        "Map calls (runs of pages, one access grant each).",
    ),
    _kv(
        "vattn_kv_map_pages_total",
        "counter",
        "pages_mapped_total",
        "KV pages mapped by the mapping worker.",
    ),
    _kv(
        "vattn_kv_map_wait_seconds_total",
        "counter",
        "wait_seconds",
        "Seconds the engine waited for the mapping worker.",
    ),
    _kv(
        "vattn_prefix_cache_queries_tokens_total",
        "counter",
        "prefix_queries_tokens",
        "Prompt tokens looked up in the prefix cache.",
    ),
    _kv(
        "vattn_prefix_cache_hits_tokens_total",
        "counter",
        "prefix_hits_tokens",
        "Prompt tokens found in the prefix cache (not computed again).",
    ),
    _kv(
        "vattn_kv_pages_shared",
        "gauge",
        "pages_shared",
        "KV pages mapped under more than one slot (prefix sharing).",
    ),
    _kv(
        "vattn_prefix_cache_evicted_pages_total",
        "counter",
        "prefix_evicted_pages",
        "Indexed prefix pages dropped from the prefix cache (reclaimed or overwritten).",
    ),
    _kv(
        "vattn_prefix_cache_borrows_total",
        "counter",
        "prefix_borrows",
        "Prefix hits read from the slot holding them while their pages mapped (--prefix-borrow).",
    ),
    _kv("vattn_kv_host_tier_bytes", "gauge", "host_tier_bytes", "Host memory of the KV host tier."),
    _kv("vattn_kv_host_tier_used_bytes", "gauge", "host_tier_used_bytes", "Host tier bytes held."),
    _kv(
        "vattn_kv_host_offloaded_bytes_total",
        "counter",
        "host_offloaded_bytes",
        "KV bytes written through to the host tier at release.",
    ),
    _kv(
        "vattn_kv_host_restored_bytes_total",
        "counter",
        "host_restored_bytes",
        "KV bytes copied back from the host tier on a prefix hit.",
    ),
    _kv(
        "vattn_kv_copy_wait_seconds_total",
        "counter",
        "copy_wait_seconds",
        "Seconds the engine waited on the host for KV copies before unmapping their pages.",
    ),
    _kv(
        "vattn_kv_host_tier_wait_seconds_total",
        "counter",
        "host_tier_wait_seconds",
        "Seconds the engine waited for host-tier copies before reusing their host blocks.",
    ),
    _kv(
        "vattn_prefix_cache_host_hits_tokens_total",
        "counter",
        "prefix_host_hits_tokens",
        "Prompt tokens restored from the host tier (counted in the prefix cache hits too).",
    ),
)
MAP_LATENCY = MetricDef(
    "vattn_kv_map_latency_seconds",
    "histogram",
    "Latency of one map call (a run of pages).",
    RANK_LABELS,
    "map_latencies",
    MAP_BUCKETS,
)

ENGINE_METRICS = (
    _replica("vattn_requests_running", "gauge", "running", "Requests running (holding a KV slot)."),
    _replica("vattn_requests_waiting", "gauge", "waiting", "Requests waiting for admission."),
    _replica(
        "vattn_preemptions_total",
        "counter",
        "preemptions_total",
        "Requests preempted (by recompute) for KV pages.",
    ),
    _replica(
        "vattn_prompt_tokens_total",
        "counter",
        "prompt_tokens_total",
        "Prompt tokens prefilled (recomputed ones again).",
    ),
    _replica(
        "vattn_generation_tokens_total", "counter", "generation_tokens_total", "Tokens generated."
    ),
    _replica(
        "vattn_admission_growth_reserve_ratio",
        "gauge",
        "growth_reserve_ratio",
        "Share of the running requests' remaining max_tokens admission keeps KV pages for "
        "(rises on preemptions, decays without).",
    ),
)
LATENCY_METRICS = (
    _replica(
        "vattn_time_to_first_token_seconds",
        "histogram",
        "ttft",
        "Arrival to first token.",
        TTFT_BUCKETS,
    ),
    _replica(
        "vattn_inter_token_latency_seconds",
        "histogram",
        "itl",
        "Time between two tokens of a request.",
        ITL_BUCKETS,
    ),
    _replica(
        "vattn_e2e_request_latency_seconds",
        "histogram",
        "e2e",
        "Arrival to last token.",
        E2E_BUCKETS,
    ),
    _replica(
        "vattn_request_queue_time_seconds",
        "histogram",
        "queue",
        "Arrival to first scheduled.",
        TTFT_BUCKETS,
    ),
)
ROUTER_DECISIONS = MetricDef(
    "vattn_router_decisions_total",
    "counter",
    "Routing decisions of the free-page router, by reason.",
    (*ROUTER_LABELS, "reason"),
    "by_reason",
)
ROUTER_REQUESTS = MetricDef(
    "vattn_router_requests_total",
    "counter",
    "Requests the free-page router ranked this replica first for.",
    (*ROUTER_LABELS, "replica"),
    "by_replica",
)
ROUTER_HEADROOM = MetricDef(
    "vattn_router_last_headroom_pages",
    "gauge",
    "KV headroom in pages (available pages less its queue's, capped by the budget less its "
    "requests' max_tokens) of the replica chosen by the last ranked decision.",
    ROUTER_LABELS,
    "last_headroom_pages",
)
ROUTER_STATS_AGE = MetricDef(
    "vattn_router_last_stats_age_seconds",
    "gauge",
    "Age of the oldest replica stats at the last decision.",
    ROUTER_LABELS,
    "last_stats_age_s",
)
ROUTER_PREFIX = MetricDef(
    "vattn_router_prefix_routed_total",
    "counter",
    "Ranked decisions whose first choice holds part of the prompt in its prefix cache.",
    ROUTER_LABELS,
    "prefix_routed",
)
ROUTER_METRICS = (
    ROUTER_DECISIONS,
    ROUTER_REQUESTS,
    ROUTER_HEADROOM,
    ROUTER_STATS_AGE,
    ROUTER_PREFIX,
)

#: The KV-pressure autoscaler's series (``cluster.autoscaler``; ``source``: an
#: :class:`AutoscalerSnapshot` field), present while a deployment of the model autoscales with it.
AUTOSCALER_LABELS = ("model",)
AUTOSCALER_METRICS = (
    _model(
        "vattn_autoscaler_current_replicas",
        "gauge",
        "current",
        "Replicas running when the autoscaling policy last ran.",
    ),
    _model(
        "vattn_autoscaler_target_replicas",
        "gauge",
        "target",
        "Replicas Serve targeted when the autoscaling policy last ran.",
    ),
    _model(
        "vattn_autoscaler_desired_replicas",
        "gauge",
        "desired",
        "Replicas the KV-pressure policy asks for (within min/max; Serve applies a change once "
        "it has lasted its upscale or downscale delay).",
    ),
    _model(
        "vattn_autoscaler_kv_demand_pages",
        "gauge",
        "demand_pages",
        "Policy input: KV pages the replicas' requests are expected to hold, summed.",
    ),
    _model(
        "vattn_autoscaler_kv_budget_pages",
        "gauge",
        "budget_pages",
        "Policy input: the KV page budget of one replica (mean over those reporting).",
    ),
    _model(
        "vattn_autoscaler_kv_demand_ratio",
        "gauge",
        "utilization",
        "Policy input: demand over the targeted replicas' budget (scale-up above the target "
        "utilisation).",
    ),
    _model(
        "vattn_autoscaler_waiting_requests",
        "gauge",
        "waiting",
        "Policy input: requests waiting for admission, summed over replicas.",
    ),
)
AUTOSCALER_DECISIONS = MetricDef(
    "vattn_autoscaler_decisions_total",
    "counter",
    "Decisions of the KV-pressure autoscaling policy (one per Serve control-loop tick), by reason.",
    (*AUTOSCALER_LABELS, "reason"),
    "decisions",
)

METRICS: tuple[MetricDef, ...] = (
    *KV_METRICS,
    MAP_LATENCY,
    *ENGINE_METRICS,
    *LATENCY_METRICS,
    *ROUTER_METRICS,
    *AUTOSCALER_METRICS,
    AUTOSCALER_DECISIONS,
)
"""Every series family /metrics exports."""
