"""Ray Serve request router that sends each request to the vattn replica with the most KV pages left
for it: free pages less what its queue needs, and no more than its budget less what its requests
will hold at their ``max_tokens`` (the *headroom*, the rule in ``cluster.routing``), weighed
against the prompt's expected prefix-cache hit pages there (the prefix score, same module). Within
a stats period the router corrects the replicas' reports with what it sent since: pages sent count
as taken (``discounted``), and prompts sent count as cached there for ``max_age_s`` seconds
(``credited``), so a burst spreads while requests over the same new prefix stay together.

The policy lives in ``cluster.routing`` (pure, unit-tested); this module adapts it to Ray Serve
2.60's
custom request router API. Serve cloudpickles this module's router class *by value* into the
deployment config and rebuilds it in every process that holds a handle to the deployment (driver,
HTTP proxy, ingress replicas), so ``cluster.routing`` must be importable there.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Sequence

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from cluster import routing
from cluster.protocol import GenerateRequest
from replica.engine_stats import RoutingStats
from replica.kv.prefix import summary_chain

log = logging.getLogger(__name__)

ROUTER_PATH = "cluster.router:FreePageRouter"


class FreePageRouter(RequestRouter):
    """Rank replicas by KV headroom (``cluster.routing``) relative to the request's need; else power
    of two choices.

    Not FIFOMixin: with it, a replica picked for one request's size may be handed to whichever
    request heads the queue. Serve's default matching gives the chosen replica to the request it
    was chosen for; routing tasks still take requests from the queue in arrival order.
    """

    decisions = routing.SharedDecisions()
    """Process-wide ``routing.RoutingDecisions`` (reason -> count, replica -> count, last pages)."""

    max_age_s: float = 2.0
    hold_s: float = 0.0
    prefix: bool = True

    def initialize_state(
        self, max_age_s: float = 2.0, hold_s: float = 0.0, prefix: bool = True, **kwargs: object
    ) -> None:
        """Called by Serve with ``RequestRouterConfig.request_router_kwargs``: stats older than
        ``max_age_s`` fall back to power of two; a request that no replica has room for waits
        here up to ``hold_s`` (then goes to the replica with the most headroom); without
        ``prefix`` the replicas' prefix summaries are ignored (headroom alone, for comparison)."""
        self.max_age_s = float(max_age_s)
        self.hold_s = float(hold_s)
        self.prefix = bool(prefix)
        self.routed: dict[str, tuple[float, int]] = {}
        self.sent_keys: dict[str, dict[int, float]] = {}

    def discounted(self, replica_id: str, stats: RoutingStats | None) -> RoutingStats | None:
        """Stats less the pages this router has sent the replica since they were taken: a burst
        inside one stats period spreads instead of piling onto the replica that looked freest.
        Newer stats count what was sent, as used pages once admitted or as ``queued_pages`` while
        it waits, so the discount restarts with them."""
        if stats is None:
            return None
        taken_at, pages = getattr(self, "routed", {}).get(replica_id, (stats.timestamp, 0))
        if taken_at != stats.timestamp:
            return stats  # newer stats already count what was sent
        return dataclasses.replace(
            stats,
            available_pages=max(stats.available_pages - pages, 0),
            committed_pages=stats.committed_pages + pages,
        )

    def remember(self, replica_id: str, stats: RoutingStats | None, pages: int) -> None:
        if stats is None:
            return
        routed = self.__dict__.setdefault("routed", {})
        taken_at, sent = routed.get(replica_id, (stats.timestamp, 0))
        routed[replica_id] = (stats.timestamp, (sent if taken_at == stats.timestamp else 0) + pages)

    def credited(
        self, replica_id: str, stats: RoutingStats | None, now: float
    ) -> RoutingStats | None:
        """Stats whose prefix summary also holds the summary keys of the prompts this router sent
        the replica in the last ``max_age_s`` seconds: a replica reports a prefix only once it has
        computed it and its next stats were taken, so without this a conversation started
        within a stats period of another one over the same new system prompt would be sent
        elsewhere and compute the prompt again (the replica's scheduler holds it until the
        first one's prefill has indexed the prompt). Expired keys are dropped here."""
        sent = getattr(self, "sent_keys", {}).get(replica_id)
        if stats is None or not sent:
            return stats
        for key in [k for k, expires in sent.items() if expires <= now]:
            del sent[key]
        if not sent or not stats.prefix_tokens_per_block:
            return stats
        return dataclasses.replace(stats, prefix_keys=stats.prefix_keys | frozenset(sent))

    def remember_prompt(
        self, replica_id: str, stats: RoutingStats | None, prompt: Sequence[int], now: float
    ) -> None:
        """Records the summary keys of ``prompt``, sent to the replica, until ``now +
        max_age_s`` (``credited``)."""
        if stats is None or not stats.prefix_tokens_per_block or not prompt:
            return
        chain = summary_chain(prompt, stats.prefix_root, stats.prefix_tokens_per_block)
        sent = self.__dict__.setdefault("sent_keys", {}).setdefault(replica_id, {})
        for _, key in chain:
            sent[key] = now + self.max_age_s

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # Retry with exponential backoff (RequestRouterConfig) once every rank was full,
            # instead of re-running this method in a tight loop.
            pending_request.routing_context.should_backoff = True
        try:
            return self._ranked(candidate_replicas, pending_request)
        except Exception:  # a request whose ranking fails is routed, never left hanging
            log.exception("ranking failed; routing this request by power of two choices")
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]

    def _ranked(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        reported = {rid: routing.reported(r.routing_stats) for rid, r in by_id.items()}
        now = time.time()
        pairs = [(rid, self.discounted(rid, s)) for rid, s in reported.items()]
        if self.prefix:
            pairs = [(rid, self.credited(rid, s, now)) for rid, s in pairs]
        need = None
        request = _request_of(pending_request)
        tpps = [s.tokens_per_page for _, s in pairs if s is not None]
        if request is not None and tpps:
            need = routing.pages_needed(request, min(tpps))
        prompt = request.prompt_token_ids if request is not None and self.prefix else None
        chains = routing.prompt_chains(prompt, pairs)
        known = [(rid, s) for rid, s in pairs if s is not None] if chains else []
        hits = {rid: routing.hit_pages(s, chains) for rid, s in known} if chains else None
        host = {rid: routing.host_hit_pages(s, chains) for rid, s in known} if chains else None
        waited = now - pending_request.created_at if pending_request is not None else 0.0
        choice = routing.rank_replicas(
            pairs,
            need,
            now,
            self.max_age_s,
            hold=waited < self.hold_s,
            hit_pages=hits,
            host_hit_pages=host,
        )
        routing.DECISIONS.record(choice)
        if choice.reason == routing.HOLD:
            return []  # Serve retries with backoff; fresh stats or finished requests make room
        if choice.reason == routing.MOST_FREE_PAGES:
            first = choice.ranks[0][0]
            # Serve takes the first rank with room; the pages it adds there (its hit is cached).
            self.remember(first, reported[first], (need or 0) - choice.hit_pages.get(first, 0))
            if prompt:
                self.remember_prompt(first, reported[first], prompt, now)
            return [[by_id[rid] for rid in rank] for rank in choice.ranks]
        # Power of two choices: one rank of two random replicas; Serve takes the shorter queue.
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]


def _request_of(pending_request: PendingRequest | None) -> GenerateRequest | None:
    """The GenerateRequest: first positional argument, or a ``request=`` keyword (None for a call
    that carries none, e.g. ``model_info``)."""
    if pending_request is None:
        return None
    request = (
        pending_request.args[0] if pending_request.args else pending_request.kwargs.get("request")
    )
    return request if isinstance(request, GenerateRequest) else None


def router_config(
    period_s: float = 0.5, max_age_s: float | None = None, hold_s: float = 0.0, prefix: bool = True
) -> RequestRouterConfig:
    """RequestRouterConfig for vattn replica deployments.

    Replicas are polled for ``record_routing_stats()`` every ``period_s`` (x U(0.9, 1.1)); stats
    older than ``max_age_s`` (default ``max(4 * period_s + 1, 2)`` seconds) make the router fall
    back to power of two choices. With ``hold_s`` > 0 a request that no replica has free pages
    for waits at the router up to ``hold_s`` seconds, retried at most every ``period_s`` (off by
    default: on the CPU router benchmark it cut preemptions and the median TTFT under overload but
    lengthened the p99, see benchmarks/README.md). ``prefix=False`` ranks by headroom alone
    (the ``headroom-only`` router of ``benchmarks.bench_router``).
    """
    if max_age_s is None:
        max_age_s = max(4 * period_s + 1.0, 2.0)
    kwargs: dict[str, object] = {"max_age_s": max_age_s, "hold_s": hold_s}
    if not prefix:
        kwargs["prefix"] = False
    return RequestRouterConfig(
        request_router_class=ROUTER_PATH,
        request_router_kwargs=kwargs,
        request_routing_stats_period_s=period_s,
        request_routing_stats_timeout_s=max(4 * period_s, 1.0),
        max_backoff_s=period_s,
    )
