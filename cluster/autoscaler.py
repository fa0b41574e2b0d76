"""Ray Serve's side of the KV-pressure autoscaler: the policy class Serve's controller calls, and
the ``autoscaling_config`` of a vattn replica deployment.

The rule lives in ``cluster.autoscaling`` (pure, unit-tested); this module adapts it to Ray Serve
2.60's custom autoscaling API. Each replica returns its ``record_autoscaling_stats()`` every
``autoscaling_config.metrics_interval_s`` (in Ray 2.60 that field, deprecated but still the one
read, is the push interval; the ``RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S`` variables its
deprecation note names are not read yet). Serve's controller keeps them per replica as time series
and, every control-loop tick (0.1 s), calls :class:`KVPressurePolicy` with an
``AutoscalingContext``; the policy reads each running replica's newest point from
``raw_metrics``. Serve wraps the policy: its answer is bounded by ``min_replicas`` /
``max_replicas`` and applied only once it has lasted ``upscale_delay_s`` (up) or
``downscale_delay_s`` (down).

Serve cloudpickles this module *by value* into the deployment config and instantiates the class
once (with ``policy_kwargs``) in its controller, so ``cluster.autoscaling`` and
``cluster.metrics_hub`` must be importable there (they are wherever vattn is installed).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from cluster import autoscaling
from cluster.metrics.snapshots import AutoscalerSnapshot

log = logging.getLogger(__name__)

POLICY_PATH = "cluster.autoscaler:KVPressurePolicy"
#: Serve's own policy (ongoing requests per replica), for comparison: ``AppOptions.autoscaler``.
AUTOSCALERS = ("kv-pressure", "ongoing-requests")


class KVPressurePolicy:
    """Serve's custom autoscaling policy: ``cluster.autoscaling.decide`` on the replicas' reports
    (through a ``DownscaleStreak``: a scale-down keeps what the whole delay needed).

    It also pushes what it saw and decided to the metrics hub (at most every ``report_period_s``,
    without waiting for an answer: the controller's loop must not block), where ``/metrics``
    exports it (``vattn_autoscaler_*``)."""

    def __init__(
        self,
        model: str = "",
        target_utilization: float = 0.8,
        downscale_utilization: float = 0.5,
        max_waiting_per_replica: float = 8.0,
        max_age_s: float = 10.0,
        report_period_s: float = 1.0,
    ) -> None:
        self.model = model
        self.target_utilization = target_utilization
        self.downscale_utilization = downscale_utilization
        self.max_waiting_per_replica = max_waiting_per_replica
        self.max_age_s = max_age_s  # reports older than this count as none
        self.report_period_s = report_period_s
        self.decisions: Counter[str] = Counter()
        self.last: autoscaling.Decision | None = None
        self.streak = autoscaling.DownscaleStreak()
        self._reported_at = 0.0
        self._hub: Any | None = None

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """``ctx``: Serve's ``AutoscalingContext``. Returns the replicas wanted and the policy's
        state (none: Serve keeps its own delay bookkeeping beside it)."""
        rule = autoscaling.ScalingRule(
            min_replicas=ctx.capacity_adjusted_min_replicas,
            max_replicas=max(ctx.capacity_adjusted_max_replicas, 1),
            target_utilization=self.target_utilization,
            downscale_utilization=self.downscale_utilization,
            max_waiting_per_replica=self.max_waiting_per_replica,
        )
        now = ctx.current_time if ctx.current_time is not None else time.time()
        loads = replica_loads(ctx.raw_metrics or {}, ctx.running_replicas, now, self.max_age_s)
        decision = self.streak.apply(autoscaling.decide(loads, ctx.target_num_replicas, rule))
        self.decisions[decision.reason] += 1
        self.last = decision
        self._report(ctx, decision, now)
        return decision.replicas, {}

    def _report(self, ctx: Any, decision: autoscaling.Decision, now: float) -> None:
        if now - self._reported_at < self.report_period_s:
            return
        self._reported_at = now
        snapshot = AutoscalerSnapshot(
            model=self.model or ctx.app_name or "",
            current=ctx.current_num_replicas,
            target=ctx.target_num_replicas,
            desired=decision.replicas,
            demand_pages=decision.demand_pages,
            budget_pages=decision.budget_pages,
            utilization=decision.utilization,
            waiting=decision.waiting,
            decisions=dict(self.decisions),
        )
        try:
            from cluster.metrics_hub import find_hub

            self._hub = self._hub or find_hub()
            if self._hub is not None:
                self._hub.push.remote(snapshot)  # fire and forget
        except Exception:  # metrics must never break scaling
            self._hub = None
            log.exception("pushing the autoscaler's metrics failed")


def replica_loads(
    raw_metrics: dict[str, dict[Any, list[Any]]],
    running_replicas: list[Any],
    now: float,
    max_age_s: float,
) -> list[autoscaling.ReplicaLoad]:
    """Each running replica's newest report (``raw_metrics``: metric name -> replica id -> time
    series of points with ``timestamp`` and ``value``), skipping replicas whose report is missing,
    malformed or older than ``max_age_s``."""
    loads = []
    for replica in running_replicas:
        newest: dict[str, float] = {}
        oldest = now
        for key in autoscaling.METRIC_KEYS:
            series = raw_metrics.get(key, {}).get(replica) or []
            if series:
                point = max(series, key=lambda p: p.timestamp)
                newest[key], oldest = point.value, min(oldest, point.timestamp)
        if len(newest) < len(autoscaling.METRIC_KEYS) or now - oldest > max_age_s:
            continue
        load = autoscaling.ReplicaLoad.from_metrics(newest)
        if load is not None:
            loads.append(load)
    return loads


def autoscaling_config(
    min_replicas: int,
    max_replicas: int,
    initial_replicas: int,
    policy: str = AUTOSCALERS[0],
    metrics_interval_s: float = 1.0,
    upscale_delay_s: float = 2.0,
    downscale_delay_s: float = 60.0,
    policy_kwargs: dict[str, Any] | None = None,
    target_ongoing_requests: float = 2.0,
) -> dict[str, Any]:
    """A vattn replica deployment's ``autoscaling_config``: the KV-pressure policy (or, for
    comparison, Serve's ongoing-requests policy at ``target_ongoing_requests``), replicas pushing
    every ``metrics_interval_s`` over a look-back window of four pushes, scale-up after
    ``upscale_delay_s`` and scale-down after ``downscale_delay_s``."""
    if policy not in AUTOSCALERS:
        raise ValueError(f"autoscaler must be one of {', '.join(AUTOSCALERS)}; got {policy!r}")
    config: dict[str, Any] = {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "initial_replicas": initial_replicas,
        "metrics_interval_s": metrics_interval_s,
        "look_back_period_s": 4 * metrics_interval_s,
        "upscale_delay_s": upscale_delay_s,
        "downscale_delay_s": downscale_delay_s,
        "target_ongoing_requests": target_ongoing_requests,
    }
    if policy == "kv-pressure":
        config["policy"] = {"policy_function": POLICY_PATH, "policy_kwargs": policy_kwargs or {}}
    return config
