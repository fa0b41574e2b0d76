"""Unit tests of the free-page routing policy (cluster.routing), no Ray involved."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import cluster.routing
from cluster.protocol import GenerateRequest
from cluster.routing import (
    DECISIONS,
    FALLBACK,
    HOLD,
    MOST_FREE_PAGES,
    RankedChoice,
    RoutingDecisions,
    available_after_queue,
    headroom,
    hit_pages,
    host_hit_pages,
    pages_needed,
    prefix_score,
    prompt_chains,
    rank_replicas,
    reported,
)
from replica import KVCacheAllocator, KVCacheConfig, open_device
from replica.engine_stats import RoutingStats
from replica.kv.prefix import expected_hit_tokens, summary_chain
from replica.sampling_params import SamplingParams

NOW = 1_000.0


def stats(
    free: int,
    running: int = 0,
    waiting: int = 0,
    age: float = 0.1,
    queued: int = 0,
    committed: int = 0,
    total: int = 1000,
) -> RoutingStats:
    return RoutingStats(
        available_pages=free,
        queued_pages=queued,
        committed_pages=committed,
        total_pages=total,
        tokens_per_page=16.0,
        running=running,
        waiting=waiting,
        timestamp=NOW - age,
    )


def make_request(prompt_tokens: int = 100, max_tokens: int = 60, prompt=None) -> GenerateRequest:
    """A request as the ingress sends it (default: ceil(160 / 16) = 10 pages)."""
    ids = tuple(prompt) if prompt is not None else tuple(range(prompt_tokens))
    return GenerateRequest("r", ids, SamplingParams(max_tokens=max_tokens))


def ids(choice: RankedChoice) -> list[str]:
    return [rank[0] for rank in choice.ranks]


def rank(cands, need=10, max_age_s=2.0) -> RankedChoice:
    return rank_replicas(cands, need, NOW, max_age_s)


def test_replica_near_budget_loses_to_one_with_room():
    c = rank([("a", stats(12)), ("b", stats(400))])
    assert c.reason == MOST_FREE_PAGES
    assert ids(c) == ["b", "a"]
    assert c.headroom_pages == 400 and c.first == "b"


def test_replica_that_cannot_fit_goes_last_even_if_idle():
    busy = stats(30, running=40, waiting=9)
    idle_full = stats(9)  # needs 10, has 9; no requests at all
    c = rank([("idle", idle_full), ("busy", busy), ("mid", stats(11, running=3))])
    assert ids(c) == ["busy", "mid", "idle"]


def test_replicas_that_cannot_fit_ordered_by_free_pages():
    c = rank([("x", stats(1)), ("y", stats(5)), ("z", stats(50))], need=60)
    assert c.reason == MOST_FREE_PAGES
    assert ids(c) == ["z", "y", "x"]
    assert c.headroom_pages == 50


def test_exact_fit_counts_as_fitting():
    c = rank([("exact", stats(10)), ("short", stats(9, running=0))], need=10)
    assert ids(c) == ["exact", "short"]


@pytest.mark.parametrize(
    "cands",
    [
        [("a", stats(100)), ("b", None)],
        [("a", stats(100)), ("b", stats(50, age=2.5))],
        [("a", stats(100, age=10.0))],
    ],
    ids=["missing", "one-stale", "all-stale"],
)
def test_missing_or_stale_stats_fall_back(cands):
    c = rank(cands)
    assert c.reason == FALLBACK
    assert c.ranks == [] and c.headroom_pages is None and c.first is None


def test_unknown_need_falls_back():
    c = rank([("a", stats(100)), ("b", stats(5))], need=None)
    assert c.reason == FALLBACK


def test_age_exactly_at_limit_is_fresh_and_reported():
    c = rank([("a", stats(100, age=2.0)), ("b", stats(5, age=0.5))], max_age_s=2.0)
    assert c.reason == MOST_FREE_PAGES
    assert c.oldest_stats_age_s == pytest.approx(2.0)


def test_ties_are_deterministic():
    cands = [
        ("r2", stats(64, running=1, waiting=1)),
        ("r1", stats(64, running=2, waiting=0)),
        ("r0", stats(64, running=3)),
        ("r3", stats(64, running=0, waiting=1)),
    ]
    expected = ["r3", "r1", "r2", "r0"]  # fewer running+waiting, then id
    for perm in itertools.permutations(cands):
        assert ids(rank(list(perm))) == expected


def test_long_queue_ranks_after_fewer_free_pages_without_queue():
    queued = stats(400, running=2, waiting=6, queued=350)  # 50 effective
    idle = stats(100)
    c = rank([("queued", queued), ("idle", idle)])
    assert ids(c) == ["idle", "queued"]
    assert c.headroom_pages == 100
    c = rank([("queued", queued), ("less", stats(60, running=1))])
    assert ids(c) == ["less", "queued"] and c.headroom_pages == 60


def test_queue_decides_who_can_fit():
    # 40 free but 35 queued: 5 effective, cannot fit 10; 12 free and no queue can.
    c = rank([("a", stats(40, waiting=3, queued=35)), ("b", stats(12))], need=10)
    assert ids(c) == ["b", "a"]


def test_queue_beyond_free_pages_counts_as_zero():
    deep = stats(50, waiting=9, queued=500)  # effective 0, not -450
    assert available_after_queue(deep) == 0
    c = rank([("deep", deep), ("tight", stats(5, running=1))], need=10)
    assert ids(c) == ["tight", "deep"]  # neither fits: ordered by effective free pages
    assert c.headroom_pages == 5


def test_saturated_queues_tie_at_zero_and_break_on_fewer_requests():
    cands = [
        ("r0", stats(80, running=4, waiting=6, queued=200)),
        ("r1", stats(10, running=2, waiting=1, queued=30)),
        ("r2", stats(0, running=3, waiting=5, queued=90)),
    ]
    for perm in itertools.permutations(cands):
        c = rank(list(perm))
        assert ids(c) == ["r1", "r2", "r0"] and c.headroom_pages == 0


def test_no_queue_ranks_as_before():
    cands = [("a", stats(12)), ("b", stats(400)), ("c", stats(90, running=5))]
    with_zero = [
        (rid, stats(s.available_pages, s.running, s.waiting, queued=0)) for rid, s in cands
    ]
    assert ids(rank(cands)) == ids(rank(with_zero)) == ["b", "c", "a"]


def test_one_replica_per_rank():
    c = rank([(f"r{i}", stats(10 * i)) for i in range(6)])
    assert all(len(r) == 1 for r in c.ranks)
    assert len(c.ranks) == 6 and len(set(ids(c))) == 6


def test_headroom_counts_what_running_requests_will_grow_into():
    # a: 500 free now, but its requests will hold 950 of its 1000 pages: 50 left for a newcomer.
    # b: 200 free and 300 committed: 200 left.
    a, b = stats(500, running=8, committed=950), stats(200, running=3, committed=300)
    assert (headroom(a), headroom(b)) == (50, 200)
    c = rank([("a", a), ("b", b)])
    assert ids(c) == ["b", "a"] and c.headroom_pages == 200
    # Both over-committed: the less over-committed first, even with more requests.
    c = rank(
        [("x", stats(30, running=2, committed=1300)), ("y", stats(10, running=9, committed=1100))]
    )
    assert ids(c) == ["y", "x"] and c.headroom_pages == -100
    # The queue still counts: headroom is never above the effective free pages.
    assert headroom(stats(300, queued=250, committed=100)) == 50


def test_hold_leaves_out_replicas_without_free_pages_for_the_request():
    # a has promised all but 5 pages but has 50 free now; b has 5 free now. Neither fits by
    # headroom; holding goes by what is free now, so a takes it and b is left out.
    a, b = stats(50, running=4, committed=995), stats(5)
    assert (headroom(a), headroom(b)) == (5, 5)
    assert ids(rank([("a", a), ("b", b)], need=10)) == [
        "b",
        "a",
    ]  # equal headroom: fewer requests first
    c = rank_replicas([("a", a), ("b", b)], 10, NOW, 2.0, hold=True)
    assert c.reason == MOST_FREE_PAGES and ids(c) == ["a"]
    c = rank_replicas([("a", stats(3)), ("b", stats(40, queued=35))], 10, NOW, 2.0, hold=True)
    assert c.reason == HOLD and c.ranks == [] and c.first is None
    # Stale stats still fall back, hold or not.
    assert rank_replicas([("a", stats(400, age=9.0))], 10, NOW, 2.0, hold=True).reason == FALLBACK


def test_pages_needed():
    assert pages_needed(make_request(100, 60), 16.0) == 10
    assert pages_needed(make_request(100, 61), 16.0) == 11
    assert pages_needed(make_request(15, 1), 16.0) == 1
    assert pages_needed(make_request(), 0) is None
    assert pages_needed(make_request(), float("nan")) is None


def test_the_router_reads_a_replicas_own_frozen_stats_and_nothing_else():
    """What crosses from a replica is its ``RoutingStats``, unparsed; anything else (Serve's
    empty placeholder before the first poll) is no stats."""
    s = stats(10)
    assert reported(s) is s
    assert reported({}) is None and reported(None) is None
    assert reported(dataclasses.asdict(s)) is None  # a dict is not the wire type


def test_routing_decisions_tally():
    d = RoutingDecisions()
    d.record(rank([("a", stats(12)), ("b", stats(400))]))
    d.record(rank([("a", stats(12)), ("b", None)]))
    d.record(rank([("a", stats(300)), ("b", stats(20))]))
    snap = d.snapshot()
    assert snap["by_reason"] == {MOST_FREE_PAGES: 2, FALLBACK: 1}
    assert snap["by_replica"] == {"a": 1, "b": 1}
    assert snap["last_headroom_pages"] == 300 and snap["last_replica"] == "a"
    assert snap["last_headrooms"] == {"a": 300, "b": 20}  # every candidate of the last ranking

    def hammer():
        for _ in range(1000):
            d.record(rank([("a", stats(12))]))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert d.snapshot()["by_replica"]["a"] == 4001
    d.reset()
    assert d.snapshot()["by_reason"] == {}


# FreePageRouter.choose_replicas with fake replicas (needs ray installed, not a running cluster).


def _replica(rid: str, free: int | None, queued: int = 0, committed: int = 0) -> SimpleNamespace:
    """A replica as Serve shows it to the router: its latest ``RoutingStats`` (Serve's ``{}``
    before its first report), stamped now: the router is imported first (its first import, of
    Ray Serve, can take longer than the stats' 2 s life)."""
    _router()
    routing_stats: RoutingStats | dict = (
        {}
        if free is None
        else dataclasses.replace(
            stats(free, queued=queued, committed=committed), timestamp=time.time()
        )
    )
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid), routing_stats=routing_stats)


def _router():
    pytest.importorskip("ray.serve")
    from cluster.router import FreePageRouter

    router = FreePageRouter.__new__(FreePageRouter)  # skip Serve's metrics / queue set-up
    router.initialize_state(max_age_s=2.0)
    return router


def _choose(replicas, request, router=None, waited_s: float = 0.0) -> list[list[str]]:
    router = router or _router()
    ctx = SimpleNamespace(should_backoff=False)
    pending = SimpleNamespace(
        args=[request], kwargs={}, routing_context=ctx, created_at=time.time() - waited_s
    )
    out = asyncio.run(router.choose_replicas(replicas, pending))
    assert ctx.should_backoff is True
    return [[r.replica_id.unique_id for r in rank] for rank in out]


def test_router_ranks_by_free_pages_one_per_rank():
    reps = [_replica("a", 3), _replica("b", 90), _replica("c", 40)]
    assert _choose(reps, make_request()) == [["b"], ["c"], ["a"]]


def test_router_falls_back_to_two_random_choices():
    reps = [_replica("a", None), _replica("b", 90), _replica("c", 40)]
    out = _choose(reps, make_request())
    assert len(out) == 1 and len(set(out[0])) == 2 and set(out[0]) <= {"a", "b", "c"}
    out = _choose(reps[1:], object())  # a call that carries no GenerateRequest -> fallback
    assert len(out) == 1 and sorted(out[0]) == ["b", "c"]


def test_a_ranking_that_fails_routes_the_request_by_two_random_choices(monkeypatch, caplog) -> None:
    """A request whose ranking raises (a fuzzer once sent a token id no 64-bit key holds, and
    the prefix keys overflowed) is routed anyway: Serve would otherwise leave it hanging."""

    def broken(*args: object, **kwargs: object) -> None:
        raise OverflowError("int too big to convert")

    monkeypatch.setattr(cluster.routing, "rank_replicas", broken)
    reps = [_replica("a", 90), _replica("b", 40)]
    with caplog.at_level("ERROR", logger="cluster.router"):
        out = _choose(reps, make_request())
    assert len(out) == 1 and sorted(out[0]) == ["a", "b"]
    assert "ranking failed" in caplog.text


def test_a_field_added_to_the_stats_reaches_the_routers_decision(monkeypatch) -> None:
    """The router hands the replica's typed stats on to the policy as they are (a discount or a
    credit copies them with ``dataclasses.replace``): a field a replica adds is in what
    ``rank_replicas`` weighs, with no parser to teach."""
    import cluster.routing

    Extended = dataclasses.make_dataclass(
        "Extended",
        [("hint", int, dataclasses.field(default=0))],
        bases=(RoutingStats,),
        frozen=True,
    )
    fresh = dataclasses.replace(stats(100), timestamp=time.time())
    replica = _replica("a", None)
    replica.routing_stats = Extended(**dataclasses.asdict(fresh), hint=42)
    seen: list[tuple[str, RoutingStats | None]] = []
    rank = cluster.routing.rank_replicas

    def recording(candidates, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.extend(candidates)
        return rank(candidates, *args, **kwargs)

    monkeypatch.setattr(cluster.routing, "rank_replicas", recording)
    router = _router()
    assert _choose([replica], make_request(), router) == [["a"]]
    assert seen[-1] == ("a", replica.routing_stats)  # as the replica sent it
    assert _choose([replica], make_request(), router) == [["a"]]
    [(_, discounted)] = seen[-1:]
    assert isinstance(discounted, Extended) and discounted.hint == 42
    assert discounted.available_pages == 90  # less the 10 pages sent since


def test_a_burst_within_one_stats_period_spreads_over_equal_replicas():
    router = _router()
    reps = [_replica("a", 100), _replica("b", 100)]
    request = make_request()  # 10 pages each
    firsts = [_choose(reps, request, router)[0][0] for _ in range(10)]
    assert firsts.count("a") == firsts.count("b") == 5  # the sent pages are discounted
    fresh = [_replica("a", 100), _replica("b", 100)]  # new stats reset the discount
    assert _choose(fresh, request, router)[0][0] == "a"


def test_router_ranks_by_free_pages_less_the_queue():
    reps = [_replica("a", 120, queued=100), _replica("b", 50), _replica("c", 40, queued=0)]
    assert _choose(reps, make_request()) == [["b"], ["c"], ["a"]]


def test_a_burst_discount_adds_to_the_queue():
    router = _router()
    reps = [_replica("a", 100, queued=40), _replica("b", 60)]  # 60 effective each
    request = make_request()  # 10 pages each
    firsts = [_choose(reps, request, router)[0][0] for _ in range(10)]
    assert firsts == ["a", "b"] * 5


def test_a_burst_discount_adds_to_the_commitments():
    router = _router()
    # 900 pages free each, but a has promised 850 of its 1000 and b 800: b has 50 more headroom.
    reps = [
        _replica("a", 900, queued=0, committed=850),
        _replica("b", 900, queued=0, committed=800),
    ]
    request = make_request()  # 10 pages each
    firsts = [_choose(reps, request, router)[0][0] for _ in range(12)]
    assert firsts == ["b"] * 5 + ["a", "b"] * 3 + ["a"]  # b's 50 pages, then turn about


def test_router_holds_a_request_no_replica_has_room_for_until_hold_s():
    router = _router()
    router.initialize_state(max_age_s=2.0, hold_s=5.0)
    full = [_replica("a", 3), _replica("b", 8)]
    request = make_request()  # 10 pages
    assert _choose(full, request, router) == []  # Serve retries with backoff
    assert _choose([_replica("a", 3), _replica("b", 80)], request, router) == [["b"]]
    assert _choose(full, request, router, waited_s=6.0) == [
        ["b"],
        ["a"],
    ]  # held long enough: best effort


# ---- the prefix score ----------------------------------------------------------------------------
def holding(prompt: list[int], free: int, blocks: int, total: int = 1000) -> RoutingStats:
    """Stats of a replica whose prefix summary holds the first ``blocks`` 16-token blocks of
    ``prompt`` (16 tokens a page)."""
    chain = summary_chain(prompt[: blocks * 16 + 1], ROOT, 16)
    return dataclasses.replace(
        stats(free, total=total),
        prefix_root=ROOT,
        prefix_tokens_per_block=16,
        prefix_keys=frozenset(k for _, k in chain),
    )


ROOT = 12345
PROMPT = list(range(1000, 1000 + 40 * 16))  # 40 blocks


def ranked(cands, need=50, **kw) -> RankedChoice:
    chains = prompt_chains(PROMPT, cands)
    hits = {rid: hit_pages(s, chains) for rid, s in cands}
    return rank_replicas(cands, need, NOW, 2.0, hit_pages=hits, **kw)


def test_expected_hits_come_from_the_deepest_reported_depth() -> None:
    chains = prompt_chains(PROMPT, [("a", holding(PROMPT, 500, 32))])
    assert hit_pages(holding(PROMPT, 500, 32), chains) == 32
    # 20 blocks are reported at depths 1..8 and 16: the estimate is within a factor of two.
    assert hit_pages(holding(PROMPT, 500, 20), chains) == 16
    assert hit_pages(holding(list(range(640)), 500, 39), chains) == 0  # another prompt
    assert hit_pages(stats(500), chains) == 0  # no summary


def test_the_replica_holding_the_prefix_wins_while_both_have_room() -> None:
    cands = [("a", stats(900)), ("b", holding(PROMPT, 400, 32))]
    choice = ranked(cands)
    assert ids(choice) == ["b", "a"] and choice.hit_pages == {"b": 32}
    assert choice.reason == MOST_FREE_PAGES


def test_a_holder_short_of_pages_loses_a_point_per_page_below_the_low_water_mark() -> None:
    # b adds 50 - 8 = 42 pages: 60 - 42 = 18 left, 82 below the 100-page mark: 8 - 82 < 0.
    cands = [("a", stats(900)), ("b", holding(PROMPT, 60, 8))]
    assert ids(ranked(cands)) == ["a", "b"]
    assert prefix_score(8, 18, 1000) == 8 - 82
    # A long enough hit still wins: b adds 50 - 32 = 18 pages, 42 left, 58 short: 32 - 58 < 0;
    # with a 5% mark only 8 short: 32 - 8 > 0.
    cands = [("a", stats(900)), ("b", holding(PROMPT, 60, 32))]
    assert ids(ranked(cands)) == ["a", "b"]
    assert ids(ranked(cands, low_water=0.05)) == ["b", "a"]


def test_a_hit_lets_a_replica_fit_what_it_otherwise_could_not() -> None:
    cands = [("a", stats(30)), ("b", holding(PROMPT, 30, 32))]  # 50 pages asked, 30 free
    choice = ranked(cands)
    assert ids(choice) == ["b", "a"]  # b adds only 18 pages; a cannot fit


def prefix_allocator(**overrides: Any) -> KVCacheAllocator:
    """A one-layer host-backend allocator with the prefix cache: 8 tokens a 4 KiB page."""
    settings: dict[str, Any] = dict(
        num_layers=1,
        num_kv_heads=1,
        head_dim=64,
        dtype=torch.float32,
        max_slots=2,
        max_tokens=1024,
        page_size=4096,
        budget_bytes=256 * 4096,
        prefix_cache=True,
    )
    return KVCacheAllocator(KVCacheConfig(**settings | overrides), open_device("host", 4096))


def in_host_tier(held: RoutingStats, blocks: int) -> RoutingStats:
    """``held`` whose host tier also holds the first ``blocks`` blocks of PROMPT."""
    chain = summary_chain(PROMPT[: blocks * 16 + 1], ROOT, 16)
    return dataclasses.replace(held, prefix_host_keys=frozenset(k for _, k in chain))


def test_host_tier_hits_count_beyond_the_device_hit_at_their_weight() -> None:
    both = in_host_tier(holding(PROMPT, 500, 8), 32)
    only_host = in_host_tier(dataclasses.replace(stats(500), prefix_root=ROOT), 32)
    only_host = dataclasses.replace(only_host, prefix_tokens_per_block=16)
    chains = prompt_chains(PROMPT, [("a", both), ("b", only_host)])
    assert (hit_pages(both, chains), host_hit_pages(both, chains)) == (8, 24)
    assert (hit_pages(only_host, chains), host_hit_pages(only_host, chains)) == (0, 32)
    # Equal room: the replica holding the prompt on the host beats one holding nothing ...
    cands = [("a", stats(500)), ("b", only_host)]
    host = {rid: host_hit_pages(s, chains) for rid, s in cands}
    assert ids(ranked(cands, host_hit_pages=host)) == ["b", "a"]
    # ... and loses to one holding as much on its device (no pages to add, no copy back).
    device = holding(PROMPT, 500, 32)
    cands = [("b", only_host), ("c", device)]
    host = {rid: host_hit_pages(s, prompt_chains(PROMPT, cands)) for rid, s in cands}
    assert ids(ranked(cands, host_hit_pages=host)) == ["c", "b"]


def test_a_replicas_host_tier_summary_predicts_what_its_acquire_restores() -> None:
    """The engine side: a conversation evicted from the device but held by the host tier shows
    in the summary's host keys, which the router reads as restorable pages."""
    cache = prefix_allocator(budget_bytes=80 * 4096, host_tier_bytes=64 * 2 * 4096)
    slot = cache.acquire(0, PROMPT[:257])
    cache.ensure(slot, 257)
    cache.release(slot, PROMPT[:257])  # 16 blocks written through
    other = cache.acquire(0, [7] * 640)
    cache.ensure(other, 640)  # every page: the conversation leaves the device
    cache.release(other, [])
    summary = cache.prefix_summary()
    assert summary is not None and cache.cached_tokens(PROMPT) == 0
    stats = RoutingStats(
        available_pages=80,
        queued_pages=0,
        committed_pages=0,
        total_pages=80,
        tokens_per_page=8,
        running=0,
        waiting=0,
        prefix_root=summary.root,
        prefix_tokens_per_block=16,
        prefix_keys=frozenset(summary.keys),
        prefix_host_keys=frozenset(summary.host_keys),
    )
    chains = prompt_chains(PROMPT, [("r", stats)])
    assert host_hit_pages(stats, chains) == 256 // 8
    restored = cache.acquire(0, PROMPT)
    assert cache.length(restored) == 256


def test_without_any_hit_the_order_is_the_headroom_rule() -> None:
    cands = [("a", stats(300)), ("b", stats(200, total=250))]
    assert ids(ranked(cands)) == ids(rank(cands, need=50)) == ["a", "b"]


def replicas_b_holding_the_prompt() -> list[SimpleNamespace]:
    """Replica a with the most room, b with 32 blocks of PROMPT cached."""
    held = holding(PROMPT, 400, 32)
    reps = [_replica("a", 900), _replica("b", 400)]
    reps[1].routing_stats = dataclasses.replace(
        reps[1].routing_stats,
        prefix_root=held.prefix_root,
        prefix_tokens_per_block=16,
        prefix_keys=held.prefix_keys,
    )
    return reps


def test_router_sends_a_conversation_to_the_replica_holding_its_prefix() -> None:
    reps = replicas_b_holding_the_prompt()
    request = make_request(max_tokens=160, prompt=PROMPT)
    before = DECISIONS.snapshot()["prefix_routed"]
    assert _choose(reps, request) == [["b"], ["a"]]
    assert DECISIONS.snapshot()["prefix_routed"] == before + 1


def test_a_new_prefix_sent_within_a_stats_period_counts_as_cached_where_it_went() -> None:
    """Two conversations over one new system prompt, within one stats period: the replicas'
    reports show it nowhere, but the router remembers where it sent the first (for max_age_s)."""
    reps = [_replica("a", 900), _replica("b", 900)]
    for rep in reps:
        rep.routing_stats = dataclasses.replace(
            rep.routing_stats, prefix_root=ROOT, prefix_tokens_per_block=16
        )
    request = make_request(max_tokens=16, prompt=PROMPT)
    router = _router()
    [[first], [second]] = _choose(reps, request, router)
    # Without the record the second would go to the other replica (the first one's pages are
    # discounted); with it, the first replica holds 40 blocks of the prompt.
    assert _choose(reps, request, router) == [[first], [second]]
    blind = _router()
    blind.initialize_state(max_age_s=2.0, prefix=False)
    assert _choose(reps, request, blind)[0] != _choose(reps, request, blind)[0]
    # The record expires after max_age_s.
    router.sent_keys[first] = {k: time.time() - 1 for k in router.sent_keys[first]}
    assert _choose(reps, request, router) == [[second], [first]]


def test_the_headroom_only_router_ignores_the_prefix_summary() -> None:
    reps = replicas_b_holding_the_prompt()
    request = make_request(max_tokens=160, prompt=PROMPT)
    router = _router()
    router.initialize_state(max_age_s=2.0, prefix=False)
    assert _choose(reps, request, router) == [["a"], ["b"]]  # the most headroom, as without hits


def test_the_affinity_router_sees_token_prefixes_as_text_prefixes() -> None:
    pytest.importorskip("ray.llm")
    from cluster.affinity_router import PrefixAffinityRouter, token_text

    ids = [0, 1, 0xD6FF, 0xD700, 0xD701, 128_255, 150_000]
    text = token_text(ids)
    assert len(text) == len(ids) == len(set(text))  # one character per id, distinct ids apart
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in text)  # no surrogates: encodable
    text.encode("utf-8")
    assert token_text(PROMPT[:100]) == token_text(PROMPT)[:100]
    assert not token_text([5, 6]).startswith(token_text([5, 7]))
    router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)
    pending = SimpleNamespace(args=[make_request(max_tokens=4, prompt=(7, 8, 9))], kwargs={})
    assert router._extract_text_from_request(pending) == token_text([7, 8, 9])


def test_a_replicas_summary_predicts_what_its_cache_finds() -> None:
    """The engine side: the allocator's summary, read as the router does, gives the cached
    tokens its acquire would find (here exactly: 32 blocks is a summary depth)."""
    cache = prefix_allocator(budget_bytes=256 * 4096)
    config = cache.config
    assert config.tokens_per_group == 8 and config.prefix_block_tokens == 16
    slot = cache.acquire(0, PROMPT[:257])
    cache.ensure(slot, 257)
    cache.release(slot, PROMPT[:257])
    summary = cache.prefix_summary()
    assert summary is not None and summary.tokens_per_block == 16
    keys = frozenset(summary.keys)
    assert expected_hit_tokens(PROMPT, summary.root, 16, keys) == cache.cached_tokens(PROMPT) == 256
