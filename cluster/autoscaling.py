"""KV-pressure autoscaling policy for vattn replicas (pure Python, no Ray imports).

Rule: each replica reports its *demand*, the KV pages its requests are expected to hold at once
(pages in use, plus what its running requests still need for the rest of their prompts and their
expected growth, plus what its waiting requests need for their prompts and expected growth: the
admission's learnt ``growth_reserve`` ratio of their remaining ``max_tokens``), its KV budget, and
its waiting requests. Over the ``R`` replicas that reported, with ``n`` replicas targeted now:

    D = sum of demand_pages           B = mean budget_pages          W = sum of waiting

    need(u) = max(ceil(D / (u * B)), ceil(W / w))

    up   = need(target_utilization)            (replicas that keep each at or below u of its pages)
    down = need(downscale_utilization)         (downscale_utilization < target_utilization)

    desired = up                  if up > n                  reason "kv_pressure" or "queue"
              max(down, min)      elif down < n              reason "low_demand"
              n                   otherwise                  reason "steady"
    then clamped to [min_replicas, max_replicas]             reason "at_max" / "at_min"

``w`` is ``max_waiting_per_replica``: the queue term catches saturation that KV pages alone miss
(llm-d's observation: slots or compute full while memory is not). Scaling up jumps straight to
``up`` (a memory-heavy step load needs every replica at once); scaling down jumps to ``down``, and
only once the demand would fit the *lower* utilisation, so a load between the two thresholds
changes nothing (hysteresis): ``down >= up`` always, so no load both scales up and down, and a
decision applied and re-taken on the same load is ``steady``. Serve adds the time hysteresis on
top (``upscale_delay_s`` short, ``downscale_delay_s`` long: a decision must persist that long
before it is applied) and applies the last decision of the streak; :class:`DownscaleStreak` makes
that the *largest* ``down`` of the streak, so the replicas left fit every reading of the delay,
not only the last. (Going one replica per decision instead, as this policy first did, made a drop
from ``n`` to ``min`` take ``n - min`` downscale delays: in a CPU trial of
``benchmarks.bench_autoscaling`` with 10 s delays it let the third replica go 10 s and the second
20 s after the load ended, where Serve's policy let both go after 10 s; at the default 60 s, 3 to
1 took two minutes.) With no report at all (replicas still starting) or a zero budget the policy
keeps ``n`` (reason ``"no_metrics"``).

Replicas that have not reported yet count as no demand: their budget is unknown, so ``B`` comes
from those that did. ``cluster.autoscaler`` adapts this to Serve's ``AutoscalingContext``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

KV_PRESSURE = "kv_pressure"
QUEUE = "queue"
LOW_DEMAND = "low_demand"
STEADY = "steady"
AT_MAX = "at_max"
AT_MIN = "at_min"
NO_METRICS = "no_metrics"
#: Every reason a decision can carry (the ``reason`` label of the decisions counter).
REASONS = (KV_PRESSURE, QUEUE, LOW_DEMAND, STEADY, AT_MAX, AT_MIN, NO_METRICS)

#: The keys a replica's ``record_autoscaling_stats()`` returns (Serve wants a dict of floats).
DEMAND_PAGES = "kv_demand_pages"
BUDGET_PAGES = "kv_budget_pages"
WAITING = "waiting_requests"
METRIC_KEYS = (DEMAND_PAGES, BUDGET_PAGES, WAITING)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's report, in physical KV pages and requests (all >= 0)."""

    demand_pages: float
    budget_pages: float
    waiting: float

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> ReplicaLoad | None:
        """From ``record_autoscaling_stats()``'s keys; None if any is missing, negative or not a
        finite number (such a replica counts as not reporting)."""
        values = [metrics.get(key) for key in METRIC_KEYS]
        if not all(_finite(v) and v >= 0 for v in values):
            return None
        demand, budget, waiting = (float(v) for v in values)  # type: ignore[arg-type]
        return cls(demand, budget, waiting)


@dataclass(frozen=True)
class ScalingRule:
    """The policy's parameters (module docstring). Invariants: ``0 < downscale_utilization <
    target_utilization <= 1``, ``max_waiting_per_replica > 0``, ``0 <= min_replicas <=
    max_replicas``, ``max_replicas >= 1``."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_utilization: float = 0.8
    downscale_utilization: float = 0.5
    max_waiting_per_replica: float = 8.0

    def __post_init__(self) -> None:
        if not 0 < self.downscale_utilization < self.target_utilization <= 1:
            raise ValueError(
                "need 0 < downscale_utilization < target_utilization <= 1, got "
                f"downscale_utilization={self.downscale_utilization}, "
                f"target_utilization={self.target_utilization}"
            )
        if not self.max_waiting_per_replica > 0:
            raise ValueError(
                f"max_waiting_per_replica must be > 0, got {self.max_waiting_per_replica}"
            )
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(
                "need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                f"min_replicas={self.min_replicas}, max_replicas={self.max_replicas}"
            )


@dataclass(frozen=True)
class Decision:
    """What the policy decided and what it saw: ``replicas`` (bounded), ``reason`` (one of
    :data:`REASONS`), ``current`` (the ``n`` it started from), the demand ``D``, the mean budget
    ``B`` and the queue ``W`` of the module's rule, and how many replicas reported."""

    replicas: int
    reason: str
    current: int
    demand_pages: float = 0.0
    budget_pages: float = 0.0
    waiting: float = 0.0
    reporting: int = 0

    @property
    def utilization(self) -> float:
        """Demand over the budget of the ``current`` replicas (0 without a budget)."""
        capacity = self.budget_pages * self.current
        return self.demand_pages / capacity if capacity > 0 else 0.0


def replicas_needed(
    demand_pages: float, budget_pages: float, waiting: float, utilization: float, rule: ScalingRule
) -> tuple[int, str]:
    """``need(u)`` of the module's rule, and which term set it (``kv_pressure`` or ``queue``)."""
    by_kv = math.ceil(demand_pages / (utilization * budget_pages))
    by_queue = math.ceil(waiting / rule.max_waiting_per_replica)
    return (by_kv, KV_PRESSURE) if by_kv >= by_queue else (by_queue, QUEUE)


def decide(loads: Sequence[ReplicaLoad], current: int, rule: ScalingRule) -> Decision:
    """The replicas to target given the reports ``loads`` and ``current`` targeted replicas."""
    if current < 0:
        raise ValueError(f"current replicas must be >= 0, got {current}")
    demand = sum(load.demand_pages for load in loads)
    waiting = sum(load.waiting for load in loads)
    budget = sum(load.budget_pages for load in loads) / len(loads) if loads else 0.0
    seen = dict(
        current=current,
        demand_pages=demand,
        budget_pages=budget,
        waiting=waiting,
        reporting=len(loads),
    )
    if not loads or budget <= 0:
        return _bounded(current, NO_METRICS, rule, seen)
    up, why = replicas_needed(demand, budget, waiting, rule.target_utilization, rule)
    if up > current:
        return _bounded(up, why, rule, seen)
    down, _ = replicas_needed(demand, budget, waiting, rule.downscale_utilization, rule)
    if down < current:
        # Not below min (at or below it already: the bound's reason, at_min).
        return _bounded(max(down, min(rule.min_replicas, current - 1)), LOW_DEMAND, rule, seen)
    return _bounded(current, STEADY, rule, seen)


class DownscaleStreak:
    """Serve applies a scale-down once the policy has asked for fewer replicas for
    ``downscale_delay_s`` without a break, and then applies its *last* answer. Fed every decision
    in order, :meth:`apply` answers, within a streak of ``low_demand`` decisions from the same
    ``current``, the largest count the streak has asked for: the replicas left then hold what every
    reading of the delay needed, not just the last (a momentary drop at its end). Any other
    decision, or a new ``current`` (the scale-down was applied), starts a new streak."""

    def __init__(self) -> None:
        self.current: int | None = None
        self.replicas = 0

    def apply(self, decision: Decision) -> Decision:
        if decision.reason != LOW_DEMAND:
            self.current = None
            return decision
        if self.current != decision.current:
            self.current, self.replicas = decision.current, decision.replicas
        else:
            self.replicas = max(self.replicas, decision.replicas)
        return replace(decision, replicas=self.replicas)


def _bounded(replicas: int, reason: str, rule: ScalingRule, seen: dict[str, Any]) -> Decision:
    if replicas > rule.max_replicas:
        replicas, reason = rule.max_replicas, AT_MAX
    elif replicas < rule.min_replicas:
        replicas, reason = rule.min_replicas, AT_MIN
    return Decision(replicas, reason, **seen)
