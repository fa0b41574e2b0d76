"""The scheduler alone, against a fake cache that implements the one KV-cache interface (no model,
no extension): admission by pages, chunked prefill, preemption of the newest request by
recompute, and slots held back while a step that writes them is in flight."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pytest
import torch

from replica.kv.base import KVCache, KVCacheOutOfMemory, StepTicket
from replica.kv.stats import KVCacheStats
from replica.request import Request, RequestStatus
from replica.sampling_params import SamplingParams
from replica.scheduler import Scheduler

TOKENS_PER_PAGE = 4


class FakeKVCache(KVCache):
    """Pages are counters: a slot holding n tokens holds ceil(n / 4) pages, out of ``budget``.
    ``shared``: a cached prefix (whole pages, held once) that a prompt starting with it gets."""

    def __init__(
        self, slots: int, budget: int, tokens_per_slot: int = 64, shared: Sequence[int] = ()
    ) -> None:
        self._slots, self._budget, self._tokens = slots, budget, tokens_per_slot
        self.lengths: dict[int, int] = {}  # running slots
        self.released: list[int] = []
        self.released_tokens: list[tuple[int, ...]] = []
        self.shared = tuple(shared)
        self.base: dict[int, int] = {}  # running slot -> tokens of it that are the shared prefix
        #: Slow mapping: slots whose ``ensure(wait=False)`` leaves them mapping until an ensure
        #: that waits (the background worker has not got to them yet).
        self.slow_mapping = False
        self.mapping: set[int] = set()
        self.waited: list[int] = []  # slots an ensure had to wait for

    @property
    def max_slots(self) -> int:
        return self._slots

    @property
    def tokens_per_slot(self) -> int:
        return self._tokens

    @property
    def budget_pages(self) -> int:
        return self._budget

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // TOKENS_PER_PAGE)

    def _used(self) -> int:
        own = sum(self.pages_for(n) - self.pages_for(self.base[s]) for s, n in self.lengths.items())
        return own + self.pages_for(len(self.shared))

    def cached_tokens(self, prompt: Sequence[int]) -> int:
        hit = len(self.shared) and tuple(prompt[: len(self.shared)]) == self.shared
        return len(self.shared) if hit and len(prompt) > len(self.shared) else 0

    def acquire(self, tokens_hint: int = 0, prompt: Sequence[int] = ()) -> int:
        free = [s for s in range(self._slots) if s not in self.lengths]
        if not free:
            raise KVCacheOutOfMemory(tokens_hint, 0, 0, 0, "all slots are running")
        self.lengths[free[0]] = self.base[free[0]] = self.cached_tokens(prompt)
        return free[0]

    def release(self, slot_index: int, token_ids: Sequence[int] = ()) -> None:
        del self.lengths[slot_index], self.base[slot_index]
        self.mapping.discard(slot_index)
        self.released.append(slot_index)
        self.released_tokens.append(tuple(token_ids))

    def length(self, slot_index: int) -> int:
        return self.lengths[slot_index]

    def ensure(self, slot_index: int, tokens: int, wait: bool = True) -> None:
        self.check_tokens(slot_index, tokens)
        more = self.pages_for(tokens) - self.pages_for(self.lengths[slot_index])
        if more > self._budget - self._used():
            raise KVCacheOutOfMemory(tokens, more, self._budget - self._used(), 0)
        self.lengths[slot_index] = max(tokens, self.lengths[slot_index])
        if wait and slot_index in self.mapping:
            self.mapping.discard(slot_index)
            self.waited.append(slot_index)
        elif not wait and self.slow_mapping:
            self.mapping.add(slot_index)

    def ready(self, slot_index: int, tokens: int, timeout_s: float = 0.0) -> bool:
        return slot_index not in self.mapping  # slow mapping: never done within a timeout

    def step_async(self, lengths: Mapping[int, int]) -> StepTicket:
        self.lengths.update(lengths)
        return StepTicket(0, ())

    def wait(self, ticket: StepTicket | int) -> tuple[int, ...]:
        return ()

    def done(self, ticket: StepTicket | int) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def reclaimable_pages(self) -> int:
        return self._budget - self._used()

    def can_allocate(self, tokens: int) -> bool:
        return (
            len(self.lengths) < self._slots and self.pages_for(tokens) <= self.reclaimable_pages()
        )

    def shrink(self) -> int:
        return 0

    def stats(self) -> KVCacheStats:
        used = self._used()
        return KVCacheStats(
            page_size_bytes=1,
            tokens_per_page=float(TOKENS_PER_PAGE),
            pages_total=self._budget,
            pages_created=used,
            pages_free=0,
            pages_in_use=used,
            pages_cached=0,
            pages_available=self._budget - used,
            wasted_bytes=0,
            slots_running=len(self.lengths),
            slots_cached=0,
            map_calls=0,
            pages_mapped_total=0,
            map_seconds=0.0,
            wait_seconds=0.0,
            pages_released_total=0,
        )

    def check_invariants(self, deep: bool = False) -> None:
        assert self._used() <= self._budget

    def k_cache(self, layer: int) -> torch.Tensor:
        return torch.empty(self._slots, self._tokens, 0, 0)  # pages are counters: no memory

    def v_cache(self, layer: int) -> torch.Tensor:
        return self.k_cache(layer)


def request(name: str, prompt: int, max_tokens: int) -> Request:
    return Request(name, list(range(prompt)), SamplingParams(max_tokens=max_tokens), None, None)


def run_step(scheduler: Scheduler, kv: FakeKVCache) -> list[Request]:
    """Schedules a step, 'computes' it (prefill chunks advance; decodes produce a token) and
    returns the requests it ran."""
    step = scheduler.schedule()
    assert step is not None
    scheduler.launched(step.requests)
    for r, query in zip(step.requests, step.query_lens):
        r.computed += query
        if r.computed == r.num_tokens:
            r.output_token_ids.append(0)
    scheduler.step_completed()
    kv.check_invariants()
    return list(step.requests)


def test_a_long_prompt_is_prefilled_in_chunks_of_the_token_budget() -> None:
    kv = FakeKVCache(slots=4, budget=100)
    scheduler = Scheduler(kv, max_batch_tokens=16, max_running=4)
    long = request("long", 40, 4)
    scheduler.add(long)
    chunks = []
    while long.computed < 40:
        run_step(scheduler, kv)
        chunks.append(long.computed)
    assert chunks == [16, 32, 40]
    assert kv.lengths[long.slot] == 40  # type: ignore[index]


def test_admission_waits_for_pages_and_slots() -> None:
    kv = FakeKVCache(slots=2, budget=12)  # 48 tokens
    scheduler = Scheduler(kv, max_batch_tokens=64, max_running=8)
    assert scheduler.max_running == 2  # bounded by the cache's slots
    a, b, c = request("a", 24, 4), request("b", 12, 4), request("c", 4, 4)
    for r in (a, b, c):
        scheduler.add(r)
    # a's whole prompt is kept back until its step has run (it counts as still to compute), so b
    # waits a step although a's pages are already held; then the two slots are full.
    assert run_step(scheduler, kv) == [a]
    assert run_step(scheduler, kv) == [a, b] and c.status is RequestStatus.WAITING
    scheduler.finish(a, "stop")
    assert kv.released == [0]
    assert c in run_step(scheduler, kv)


def test_out_of_pages_preempts_the_newest_request_by_recompute() -> None:
    kv = FakeKVCache(slots=4, budget=6)  # 24 tokens
    scheduler = Scheduler(kv, max_batch_tokens=64, max_running=4)
    old, new = request("old", 11, 20), request("new", 11, 20)
    scheduler.add(old)
    run_step(scheduler, kv)
    scheduler.add(new)
    for _ in range(12):
        run_step(scheduler, kv)
        if scheduler.preemptions_total:
            break
    assert scheduler.preemptions_total == 1 and new.preemptions == 1 and old.preemptions == 0
    assert new.status is RequestStatus.WAITING and new.computed == 0 and new.slot is None
    assert scheduler.waiting[0] is new  # at the head of the queue, its output kept
    assert len(new.output_token_ids) >= 1


def test_a_slot_dropped_under_a_step_in_flight_is_released_when_the_step_completes() -> None:
    kv = FakeKVCache(slots=2, budget=20)
    scheduler = Scheduler(kv, max_batch_tokens=64, max_running=2)
    r = request("r", 4, 8)
    scheduler.add(r)
    step = scheduler.schedule()
    assert step is not None
    scheduler.launched(step.requests)
    slot = r.slot
    scheduler.finish(r, "abort")
    assert slot in kv.lengths and kv.released == []  # the running step still writes it
    scheduler.step_completed()
    assert kv.released == [slot]


def test_the_fake_cache_keeps_the_interface_contracts() -> None:
    kv = FakeKVCache(slots=1, budget=4)
    slot = kv.acquire()
    with pytest.raises(ValueError):
        kv.ensure(slot, 2.5)  # type: ignore[arg-type]
    assert kv.tokens_per_page == TOKENS_PER_PAGE and kv.token_capacity() == 16


def test_a_cached_prefix_is_not_computed_again_and_costs_no_pages() -> None:
    """Admission counts only the pages a request adds; prefill starts at the first uncached token;
    the slot is released with the tokens whose K/V it holds."""
    shared = tuple(range(16))  # 4 pages, held once
    kv = FakeKVCache(slots=4, budget=10, shared=shared)
    scheduler = Scheduler(kv, max_batch_tokens=64, max_running=4)
    first, second = request("a", 18, 2), request("b", 18, 2)
    for r in (first, second):
        scheduler.add(r)
    step = scheduler.schedule()
    assert step is not None
    # 18 + 2 tokens hold 5 pages: the shared 4 and 5 + 5 of their own would not fit 10 pages;
    # each adds 1 page beyond the shared 4, so both are admitted.
    assert step.requests == (first, second)
    assert step.context_lens == (16, 16) and step.query_lens == (2, 2)
    assert first.cached_tokens == second.cached_tokens == 16
    assert scheduler.prefix_hits_tokens == 32
    scheduler.launched(step.requests)
    for r in step.requests:
        r.computed += 2
        r.output_token_ids.append(99)
    scheduler.step_completed()
    scheduler.finish(first, "stop")
    assert kv.released_tokens == [(*range(18),)]  # the computed tokens, not the unfed output


def test_admissions_still_mapping_join_a_later_step_instead_of_making_it_wait() -> None:
    kv = FakeKVCache(slots=4, budget=100)
    scheduler = Scheduler(kv, max_batch_tokens=64, max_running=4)
    running = request("running", 8, 8)
    scheduler.add(running)
    run_step(scheduler, kv)  # its prefill
    kv.slow_mapping = True
    late = [request("a", 8, 4), request("b", 8, 4)]
    for r in late:
        scheduler.add(r)
    # Both get slots, but their pages are still mapping: the decode runs without them.
    assert run_step(scheduler, kv) == [running]
    assert all(r.status is RequestStatus.RUNNING and r.computed == 0 for r in late)
    assert scheduler.mapping_deferrals_total == 2 and kv.waited == []
    # The next step backs them like any running request (waiting if still mapping) and runs them.
    assert run_step(scheduler, kv) == [running, *late]
    assert sorted(kv.waited) == sorted(r.slot for r in late)


def test_a_step_of_admissions_alone_waits_for_the_first_only() -> None:
    kv = FakeKVCache(slots=4, budget=100)
    scheduler = Scheduler(kv, max_batch_tokens=64, max_running=4)
    kv.slow_mapping = True
    first, second = request("first", 8, 4), request("second", 8, 4)
    scheduler.add(first)
    scheduler.add(second)
    assert run_step(scheduler, kv) == [first]
    assert kv.waited == [first.slot] and scheduler.mapping_deferrals_total == 1
    assert second.status is RequestStatus.RUNNING and second.computed == 0
    assert run_step(scheduler, kv) == [first, second]


def test_admissions_already_mapped_run_in_their_first_step() -> None:
    kv = FakeKVCache(slots=4, budget=100)
    scheduler = Scheduler(kv, max_batch_tokens=64, max_running=4)
    for name in "ab":
        scheduler.add(request(name, 8, 4))
    assert len(run_step(scheduler, kv)) == 2 and scheduler.mapping_deferrals_total == 0


def test_with_no_admission_wait_limit_every_admission_is_waited_for() -> None:
    kv = FakeKVCache(slots=4, budget=100)
    scheduler = Scheduler(kv, max_batch_tokens=64, max_running=4, admission_map_wait_s=math.inf)
    kv.slow_mapping = True
    late = [request(name, 8, 4) for name in "ab"]
    for r in late:
        scheduler.add(r)
    assert run_step(scheduler, kv) == late and scheduler.mapping_deferrals_total == 0
    assert sorted(kv.waited) == sorted(r.slot for r in late)
