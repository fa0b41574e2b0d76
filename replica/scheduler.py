"""Continuous batching with chunked prefill, FCFS, admission and preemption by KV pages.

Each step gets a token budget. Running requests go first (decodes take one token, prefills a
chunk), then waiting requests are admitted in arrival order while the budget, the slot count and
the allocator's pages allow: a request is admitted when its whole prompt and expected growth fit
beside ``watermark_pages`` spare and the pages the running requests will need for the rest of
their prompts and their expected growth (``replica.growth_reserve``: a ratio of their remaining
``max_tokens`` learnt from this replica's preemptions). When a running request cannot get its
pages, the most recently admitted request is preempted by recompute: its slot is released and it
waits at the head of the queue. KVCacheOutOfMemory never escapes this class.

When a step's token budget is spent, the requests that would be admitted next (up to one more
step's budget) are admitted *ahead*: they get their slot now and their first chunk's pages are
mapped in the background while this step computes, so next step's prefill does not wait for the
mapping. They run from the next step on, in arrival order as before.

With asynchronous scheduling the engine schedules a step while the previous one still runs on the
device (``in_flight``: each launched step's requests). Nothing is unmapped under a running step: a
slot dropped while its request is in flight is released by ``step_completed``, and a step that
would have to preempt is not scheduled (``schedule(preempt=False)`` returns None and sets
``blocked``) until the engine has completed the step in flight. Requests whose last token is in
flight are not scheduled.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from replica.growth_reserve import GrowthReserve
from replica.kv.base import KVCache, KVCacheOutOfMemory
from replica.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledStep:
    """The step's sequences ordered by slot, with the new tokens each feeds."""

    requests: tuple[Request, ...]
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]


class Scheduler:
    def __init__(
        self,
        kv: KVCache,
        max_batch_tokens: int,
        max_running: int,
        watermark_pages: int = 0,
        growth: GrowthReserve | None = None,
    ) -> None:
        self.kv = kv
        self.max_batch_tokens = max_batch_tokens
        self.max_running = min(max_running, kv.max_slots)
        self.watermark_pages = watermark_pages
        self.growth = growth or GrowthReserve.from_config(
            0.0
        )  # default: no growth reserve, whole prompts only
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.preemptions_total = 0
        #: The requests of each step launched and not yet completed, oldest first.
        self.in_flight: deque[frozenset[Request]] = deque()
        #: The last ``schedule(preempt=False)`` stopped where it would have had to preempt.
        self.blocked = False
        self._deferred: list[
            tuple[Request, int]
        ] = []  # (request, slot) released once no step holds it

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def waiting_pages(self) -> int:
        """Physical pages the waiting requests need to be admitted: each one's prompt plus the
        tokens it already generated (a preempted request re-prefills both). The router counts
        them against the free pages, since waiting requests hold none yet."""
        return sum(self._pages(request.num_tokens) for request in self.waiting)

    def committed_pages(self) -> int:
        """Physical pages the running and waiting requests would hold if each ran to its
        ``max_tokens``: what this replica has promised. Free pages only say what is held now; a
        batch of requests that just started holds little and will need much more."""
        return sum(self._pages(request.max_total_tokens) for request in self.requests())

    def schedule(self, preempt: bool = True) -> ScheduledStep | None:
        """The next step, or None when there is nothing to run, or (``blocked`` set) when it would
        have to preempt and ``preempt`` is False."""
        budget = self.max_batch_tokens
        chosen: dict[Request, int] = {}
        index = 0
        self.blocked = False
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            index += 1
            if request.out_of_tokens:
                continue  # finishes when its last token reaches the host
            tokens = min(request.pending_tokens, budget)
            if not preempt and not self._fits(request, request.computed + tokens):
                self.blocked = True
                return None
            # Victims come from the tail (newest), never from the requests already chosen.
            if preempt and not self._back(request, request.computed + tokens):
                break  # it was the newest itself
            chosen[request] = tokens
            budget -= tokens
        while self.waiting and budget > 0:
            tokens = min(self.waiting[0].pending_tokens, budget)
            if not self._admit(tokens, wait=True):
                break
            chosen[self.running[-1]] = tokens
            budget -= tokens
        if not chosen:
            return None
        ahead = self.max_batch_tokens
        while budget <= 0 and self.waiting and ahead > 0:  # this step is full: admit the next ahead
            tokens = min(self.waiting[0].pending_tokens, ahead)
            if not self._admit(tokens, wait=False):
                break
            ahead -= tokens
        self.growth.stepped()
        order = sorted(chosen, key=lambda r: r.slot if r.slot is not None else -1)
        return ScheduledStep(
            requests=tuple(order),
            query_lens=tuple(chosen[r] for r in order),
            context_lens=tuple(r.computed for r in order),
        )

    def _admit(self, tokens: int, wait: bool) -> bool:
        """Moves the head of the queue to running with a slot backing its first ``tokens`` (their
        pages mapped by return, or in the background without ``wait``); False if it does not fit."""
        if len(self.running) >= self.max_running:
            return False
        request = self.waiting[0]
        spare = self.watermark_pages * self._page_group() + self.growth.pages(
            self.running, self._pages
        )
        # Its whole prompt and expected growth must fit beside the running requests'; alone, its
        # first chunk is enough (a request that fits the cache at all can always start).
        need = (
            self._pages(request.num_tokens + self.growth.expected_tokens(request))
            if self.running
            else self._pages(tokens)
        )
        if not self.kv.can_allocate(tokens) or self.kv.reclaimable_pages() - spare < need:
            return False
        slot = self.kv.acquire(tokens_hint=request.max_total_tokens)
        try:
            self.kv.ensure(slot, tokens, wait=wait)
        except KVCacheOutOfMemory:
            self.kv.release(slot)
            return False
        self.waiting.popleft()
        request.slot, request.status = slot, RequestStatus.RUNNING
        self.running.append(request)
        return True

    def _pages(self, tokens: int) -> int:
        return self.kv.pages_for(tokens)

    def _page_group(self) -> int:
        """Physical pages a slot's growth takes at once (one per range of the vAttention cache)."""
        return self.kv.pages_for(1)

    def _fits(self, request: Request, tokens: int) -> bool:
        """Backs ``tokens`` of a running request without preempting; False if it cannot."""
        assert request.slot is not None
        try:
            self.kv.ensure(request.slot, tokens)
            return True
        except KVCacheOutOfMemory:
            return False

    def _back(self, request: Request, tokens: int) -> bool:
        """Backs ``tokens`` of a running request, preempting the newest requests as needed.
        False if ``request`` itself had to be preempted."""
        while not self._fits(request, tokens):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is request:
                return False
        return True

    def preempt(self, request: Request) -> None:
        """Recompute later: free the slot now, keep the output, wait at the head of the queue."""
        assert not request.in_flight, "preempting a request whose token is still on the device"
        self._drop(request)
        request.computed = 0
        request.status = RequestStatus.WAITING
        request.preemptions += 1
        self.preemptions_total += 1
        self.growth.preempted()
        self.waiting.appendleft(request)

    def finish(self, request: Request, reason: str) -> None:
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        elif request.status is RequestStatus.RUNNING:
            self._drop(request)
        request.status, request.finish_reason = RequestStatus.FINISHED, reason

    def _drop(self, request: Request) -> None:
        self.running.remove(request)
        if request.slot is not None:
            if any(request in step for step in self.in_flight):
                self._deferred.append((request, request.slot))  # a running step still writes it
            else:
                self.kv.release(request.slot)  # at once: abort frees the slot immediately
            request.slot = None

    def launched(self, requests: Iterable[Request]) -> None:
        """A step with ``requests`` runs on the device (their slots are not released under it)."""
        self.in_flight.append(frozenset(requests))

    def step_completed(self) -> None:
        """The oldest step in flight has finished on the device: release the slots that only it
        held back."""
        self.in_flight.popleft()
        if not self._deferred:  # the common step: nothing held back
            return
        held = frozenset().union(*self.in_flight)
        for request, slot in self._deferred:
            if request not in held:
                self.kv.release(slot)
        self._deferred = [(request, slot) for request, slot in self._deferred if request in held]

    def requests(self) -> Iterable[Request]:
        yield from self.running
        yield from self.waiting
