"""Continuous batching with chunked prefill, FCFS, admission and preemption by KV pages.

Each step gets a token budget. Running requests go first (decodes take one token, prefills a
chunk), then waiting requests are admitted in arrival order while the budget, the slot count and
the allocator's pages allow: a request is admitted when its whole prompt and expected growth fit
beside ``watermark_pages`` spare and the pages the running requests will need for the rest of
their prompts and their expected growth (``replica.growth_reserve``: a ratio of their remaining
``max_tokens`` learnt from this replica's preemptions). When a running request cannot get its
pages, the most recently admitted request is preempted by recompute: its slot is released and it
waits at the head of the queue. KVCacheOutOfMemory never escapes this class, nor KVRestoreFailed
(a slot's deferred host-tier restore failed: the request's ``computed`` drops to what the slot
kept and it leaves the step, computing the blocks from a later one).

Prefix sharing: a request is admitted with its known tokens as the prompt, so the cache starts
its slot with the longest cached prefix (``computed`` starts there: prefill begins at the first
uncached token), and admission counts only the pages it adds. A slot is released with the tokens
whose K/V it holds, so a later turn of the conversation, or the request itself after preemption,
finds them.

Same-step arrivals (prefix holds): a running request's slot indexes its prompt's full blocks as
its steps write them (``KVCache.prefix_block_tokens``), so a waiting request whose prompt shares
blocks with a prefill still under way would compute them a second time if admitted beside it. It
is *held* instead: admission skips it, it keeps its place in the queue, and once the prefill has
written the shared blocks it is admitted and finds them cached. Invariants:

    a waiting request is held in a step only if a running request (its *producer*) was admitted
        with known tokens whose full blocks, beyond what the cache holds of the waiting prompt,
        start that prompt (whole blocks, never its last token), and has not computed them yet
    so a hold ends when the producer has written those blocks (running requests are scheduled
        before any admission, so at most one prefill of the producer), or when the producer leaves
        the running list (preempted, aborted, finished, failed): no hold outlives it (a preempted
        producer re-admitted ahead of it starts a new hold, for the rest of its own prefill)
    a held request takes no slot and no pages; the requests behind it are admitted as before
        (first come, first served among the requests not held)

Borrowed reads (``replica.kv.borrows``): where the attention backend reads a slot through a page
list, a hit aliased into a fresh slot is read from the slot holding it until its aliases are
mapped, so an admission waits only for the pages it writes; each ``schedule`` first ends the
borrows whose aliases are mapped (``KVCache.end_borrows``, recorded for the other ranks).

Admission makes a step wait on mapping for ``admission_map_wait_s`` at most: a request admitted
into a step whose aliases and first chunk are not mapped by then leaves it (keeping its slot and
its place among the running) and runs from a later step; a step of admissions alone waits for its
first one only. Deferring costs the request a step, so short waits (a few pages) are taken. On a
CPU the engine waits for every admission (host maps take microseconds): the same schedule as
before, independent of timing.
This is rank 0's timing, but only the step's composition depends on it: every rank replays the
same allocator calls, so the books never diverge.

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

import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from replica.growth_reserve import GrowthReserve
from replica.kv.base import KVCache, KVCacheOutOfMemory, KVRestoreFailed
from replica.kv.prefix import usable_blocks
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
        admission_map_wait_s: float = 0.005,
    ) -> None:
        self.kv = kv
        self.max_batch_tokens = max_batch_tokens
        self.max_running = min(max_running, kv.max_slots)
        self.watermark_pages = watermark_pages
        self.admission_map_wait_s = admission_map_wait_s
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
        # (request, slot, stored tokens) released once no step holds it
        self._deferred: list[tuple[Request, int, tuple[int, ...]]] = []
        #: Prompt tokens admitted requests found cached (prefix sharing), over all time.
        self.prefix_hits_tokens = 0
        #: Waiting requests held back for a running prefill's blocks, one per request and step.
        self.prefix_holds_total = 0
        #: Admitted requests that left their first step because their pages were still mapping.
        self.mapping_deferrals_total = 0
        #: Requests whose deferred host-tier restore failed (they computed the blocks instead).
        self.restore_failures_total = 0

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
        batch of requests that just started holds little and will need much more. Counted as the
        distinct pages the running slots map now (a prefix several of them alias counts once),
        plus what each running request maps beyond its slot's pages at its ``max_tokens``, plus
        every waiting request's prompt and ``max_tokens``."""
        if not self.running:
            return sum(self._pages(request.max_total_tokens) for request in self.waiting)
        grows = sum(
            max(self._pages(request.max_total_tokens) - self.kv.slot_pages(request.slot), 0)
            if request.slot is not None
            else self._pages(request.max_total_tokens)
            for request in self.running
        )
        waits = sum(self._pages(request.max_total_tokens) for request in self.waiting)
        return self.kv.stats().pages_in_use + grows + waits

    def schedule(self, preempt: bool = True) -> ScheduledStep | None:
        """The next step, or None when there is nothing to run, or (``blocked`` set) when it would
        have to preempt and ``preempt`` is False."""
        self.kv.end_borrows()  # hits whose aliases are mapped are read from their own slots now
        budget = self.max_batch_tokens
        chosen: dict[Request, int] = {}
        index = 0
        self.blocked = False
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            index += 1
            if request.out_of_tokens:
                continue  # finishes when its last token reaches the host
            tokens, computed = min(request.pending_tokens, budget), request.computed
            if not preempt and not self._fits(request, computed + tokens):
                self.blocked = True
                return None
            # Victims come from the tail (newest), never from the requests already chosen.
            if preempt and not self._back(request, computed + tokens):
                break  # it was the newest itself
            if request.computed < computed:
                continue  # its restore failed: it computes the blocks from the next step
            chosen[request] = tokens
            budget -= tokens
        held: set[Request] = set()  # waiting requests held for a prefix this step
        admitted: list[Request] = []
        while self.waiting and budget > 0:
            tokens = self._admit_next(budget, held=held)
            if not tokens:
                break
            admitted.append(self.running[-1])
            chosen[self.running[-1]] = tokens
            budget -= tokens
        self.prefix_holds_total += len(held)
        self._join_when_mapped(chosen, admitted)
        if not chosen:
            return None
        ahead = self.max_batch_tokens
        while budget <= 0 and self.waiting and ahead > 0:  # this step is full: admit the next ahead
            tokens = self._admit_next(ahead, held=held)
            if not tokens:
                break
            ahead -= tokens
        self.growth.stepped()
        order = sorted(chosen, key=lambda r: r.slot if r.slot is not None else -1)
        return ScheduledStep(
            requests=tuple(order),
            query_lens=tuple(chosen[r] for r in order),
            context_lens=tuple(r.computed for r in order),
        )

    def _join_when_mapped(self, chosen: dict[Request, int], admitted: list[Request]) -> None:
        """Requests admitted into this step whose pages (aliases and first chunk, submitted by
        ``_admit``) are still mapping after ``admission_map_wait_s`` leave the step and join a
        later one, so a burst of admissions' maps never holds a step back for long; a step of
        admissions alone waits for its first. inf: every admission is waited for. Every request
        kept makes a waited ``ensure``, which starts its slot's deferred restore (a failed one
        leaves the step too: ``_ensure``)."""
        alone = len(chosen) == len(admitted)
        always = math.isinf(self.admission_map_wait_s)
        deadline = time.perf_counter() + (0.0 if always else self.admission_map_wait_s)
        for position, request in enumerate(admitted):
            assert request.slot is not None
            tokens = request.computed + chosen[request]
            if not (always or (position == 0 and alone)):
                left = max(deadline - time.perf_counter(), 0.0)
                if not self.kv.ready(request.slot, tokens, timeout_s=left):
                    del chosen[request]
                    self.mapping_deferrals_total += 1
                    continue
            # Waits (its pages exist), or does not (mapped): recorded either way, so every rank
            # starts the slot's deferred restore at this call, never at the untimed ``ready``.
            if not self._ensure(request, tokens):
                del chosen[request]

    def _admit_next(self, budget: int, held: set[Request]) -> int:
        """Admits the first waiting request not held for a prefix (``_producer``), adding the
        ones it passes over to ``held`` (they keep their places); returns the tokens it computes
        this step, 0 if none was admitted (the first one not held does not fit)."""
        if len(self.running) >= self.max_running:
            return 0
        for request in self.waiting:  # returns before iterating on once it changes the queue
            if request in held:
                continue
            known = request.known_token_ids()
            cached = self.kv.cached_tokens(known)
            if self._producer(known, cached) is not None:
                held.add(request)
                continue
            return self._admit(request, known, cached, budget)
        return 0

    def _producer(self, known: tuple[int, ...], cached: int) -> Request | None:
        """A running request about to index more of ``known``'s usable blocks than the ``cached``
        tokens the prefix cache holds of it now: admitted with known tokens that start with those
        blocks, and not past them yet (the module's prefix holds); None if there is none."""
        block = self.kv.prefix_block_tokens
        if not block:
            return None
        usable = usable_blocks(len(known), block)
        first = cached // block + 1  # blocks up to the first one not cached
        if first > usable:
            return None
        for request in self.running:
            if request.computed >= min(request.admitted_tokens, usable * block):
                continue  # it has written every block the two could share
            tokens = (
                request.prompt_token_ids
                if request.admitted_tokens <= len(request.prompt_token_ids)
                else request.known_token_ids()
            )
            shared = min(usable, request.admitted_tokens // block)
            if shared < first or tokens[: first * block] != known[: first * block]:
                continue
            blocks = first
            while blocks < shared and (
                tokens[blocks * block : (blocks + 1) * block]
                == known[blocks * block : (blocks + 1) * block]
            ):
                blocks += 1
            if request.computed < blocks * block:
                return request
        return None

    def _admit(self, request: Request, known: tuple[int, ...], cached: int, budget: int) -> int:
        """Moves ``request`` (waiting; ``known`` its known tokens, ``cached`` of them found in the
        prefix cache) to running with a slot backing its cached prefix and its next ``budget``
        tokens at most, mapping in the background (``_join_when_mapped`` makes the waited
        ``ensure`` that starts a deferred restore); returns the tokens to compute this step, 0 if
        it does not fit."""
        tokens = min(request.num_tokens - cached, budget)
        spare = self.watermark_pages * self._page_group() + self.growth.pages(
            self.running, self._pages
        )
        # Its whole prompt and expected growth must fit beside the running requests'; alone, its
        # first chunk is enough (a request that fits the cache at all can always start). Cached
        # pages are the cache's already: only the pages it adds count.
        need = (
            self._pages(request.num_tokens + self.growth.expected_tokens(request))
            - self._pages(cached)
            if self.running
            else self._pages(tokens)
        )
        if not self.kv.can_allocate(tokens) or self.kv.reclaimable_pages() - spare < need:
            return 0
        slot = self.kv.acquire(tokens_hint=request.max_total_tokens, prompt=known)
        cached = self.kv.length(slot)  # what acquire found (the same, unless the cache moved)
        tokens = min(request.num_tokens - cached, budget)
        try:
            self.kv.ensure(slot, cached + tokens, wait=False)  # restores start at a waited one
        except KVCacheOutOfMemory:
            self.kv.release(slot, known[:cached])
            return 0
        self.waiting.remove(request)
        request.slot, request.status, request.computed = slot, RequestStatus.RUNNING, cached
        request.admitted_tokens = len(known)
        if request.preemptions == 0:
            request.cached_tokens = cached  # what its answer reports (OpenAI's cached_tokens)
        self.prefix_hits_tokens += cached
        self.running.append(request)
        return tokens

    def _pages(self, tokens: int) -> int:
        return self.kv.pages_for(tokens)

    def _page_group(self) -> int:
        """Physical pages a slot's growth takes at once (one per range of the vAttention cache)."""
        return self.kv.pages_for(1)

    def _fits(self, request: Request, tokens: int) -> bool:
        """Backs ``tokens`` of a running request without preempting; False if it cannot. A failed
        restore lowers its ``computed`` (``_ensure``): backed, but it leaves this step."""
        try:
            self._ensure(request, tokens)
            return True
        except KVCacheOutOfMemory:
            return False

    def _ensure(self, request: Request, tokens: int) -> bool:
        """``kv.ensure`` of a running request's ``tokens`` (waited); False where its slot's
        deferred host-tier restore failed: its ``computed`` drops to the tokens the slot kept, and
        it computes the rest from a later step (never wrong tokens)."""
        assert request.slot is not None
        try:
            self.kv.ensure(request.slot, tokens)
        except KVRestoreFailed as failed:
            request.computed = min(request.computed, failed.kept_tokens)
            self.restore_failures_total += 1
            return False
        return True

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
            # The tokens whose K/V the slot holds (a token dropped in flight is not among them).
            stored = request.known_token_ids()[: request.computed]
            if any(request in step for step in self.in_flight):
                # A running step still writes it.
                self._deferred.append((request, request.slot, stored))
            else:
                self.kv.release(request.slot, stored)  # at once: abort frees the slot immediately
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
        for request, slot, stored in self._deferred:
            if request not in held:
                self.kv.release(slot, stored)
        self._deferred = [entry for entry in self._deferred if entry[0] in held]

    def requests(self) -> Iterable[Request]:
        yield from self.running
        yield from self.waiting
