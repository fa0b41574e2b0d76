"""Borrowed prefix reads: a request whose prefix hit is aliased into a fresh slot reads the hit
from the slot that holds it until its own aliases are mapped, so its first step waits only for
the pages it writes (``replica.kv.allocator`` starts and ends borrows; this module keeps them).

Why (one H100, 2026-12-08, ``bench_prefix``'s system-prompt burst): 124 requests released together
over four 1,024-token prompts aliased 64 pages each; the mapping worker ran the 7,749 maps one
after another (28-34 us a page) and the requests joined steps as their maps finished, +0.11 s mean
time to first token against the paged mode, which maps nothing. A kernel that reads a slot through
a page list (FlashInfer on 16-token virtual pages, ``replica.attention.kernel_pages``) can read
page j of the hit as page ``holder * pages_per_slot + j`` instead while the aliases map.

Life of a borrow:
    1. ``acquire`` aliases a hit into a fresh slot: its leading groups map *late* (``SlotMaps``)
       and, where a slot that does not borrow itself (the *holder*) maps all of them at the same
       page indices, the borrow starts: the holder's pages [0, late) are pinned
       (``SlotCopies.pin``) by the borrow's fence, pending while the borrow lasts. Without a
       holder, or where the run's tokens are no multiple of what the attention backend reads
       (``enable``), the late run is promoted: an ordinary alias.
    2. ``ensure`` and ``ready`` of the borrower wait for its groups after the run and for the
       holder's (``ticket``), never for the late run; ``send_late`` (each ``step_async``) sends
       the late runs behind the step's growth, one batch in flight at a time, sized to a step.
    3. ``end_ready`` ends the borrows whose run has been mapped (the caller records which, so
       every rank of a tensor-parallel replica ends the same ones: a rank's next ``ensure`` of
       the slot waits for its own run). A borrow also ends when its slot is released, and when the
       holder's pinned pages are to be unmapped or rewritten: waiting on the fence ends it first
       (``forced``). Ending records a stream fence behind the steps launched so far, which may
       still read the holder's pages: the pin holds them until those steps have run.

Invariants (``check_invariants``): a borrower is running; its late run is its first ``late``
groups, the ones its holder maps at [0, late); a holder does not borrow; only borrowers have a
late run waiting; a borrow's fence is pending.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from replica.kv.config import KVCacheConfig
from replica.kv.copies import CopyFence, SlotCopies
from replica.kv.slots import Group, SlotMaps, SlotState
from replica.kv.stats import WaitCause

#: A batch of late runs is sized to the last step's time (between two ``step_async``) at this many
#: seconds a page (maps cost 28-34 us a page under load on the H100), so the worker can finish it
#: within a step like it and the next step's growth, queued behind at most one batch, rarely waits;
#: between these many pages (one run at least: a slot's run is never split).
LATE_PAGE_SECONDS = 40e-6
LATE_BATCH_PAGES = (64, 2048)


class BorrowFence:
    """A borrow's pin fence: pending while the borrow lasts, then the stream fence recorded when
    it ended. Waiting on it, or ordering a stream behind it, ends a borrow still on first."""

    def __init__(self, end: Callable[[], None]) -> None:
        self._end = end
        self.ended: CopyFence | None = None

    def done(self) -> bool:
        return self.ended is not None and self.ended.done()

    def wait(self) -> None:
        self._ended().wait()

    def order(self) -> None:
        self._ended().order()

    def _ended(self) -> CopyFence:
        if self.ended is None:
            self._end()
        assert self.ended is not None, "bug: a borrow's end recorded no fence"
        return self.ended


@dataclass(frozen=True)
class Borrow:
    holder: int  # the slot whose pages [0, late) the borrower reads in place of its late run
    fence: BorrowFence


class SlotBorrows:
    """The running borrows of one ``SlotMaps``; ``enabled`` by the engine where its attention
    backend reads a borrower's prefix from its holder (``enable``)."""

    def __init__(self, config: KVCacheConfig, maps: SlotMaps, copies: SlotCopies) -> None:
        self._config, self._maps, self._copies = config, maps, copies
        self._borrows: dict[int, Borrow] = {}
        self._late_ticket = 0  # the last batch of late runs sent
        self._stepped_at = time.perf_counter()  # the last ``send_late``: a step's end
        self._granularity = 1  # tokens a borrow is a multiple of (``enable``)
        self.started = 0  # borrows started, over all time
        self.forced = 0  # of which ended early: the holder's pages were to be unmapped or rewritten

    def enable(self, granularity: int) -> bool:
        """Borrows of a multiple of ``granularity`` tokens (what the attention backend reads);
        False where a token straddles pages (the aliased pages end inside a token)."""
        if granularity < 1:
            raise ValueError(f"a borrow granularity of {granularity} tokens")
        self._granularity = granularity
        return self._config.prefix_cache and self._config.tokens_per_group > 0

    def start(self, slot_index: int) -> None:
        """After ``acquire`` took a hit into the slot: the borrow of its late run, or the run
        promoted where no holder maps it."""
        if slot_index not in self._maps.late_ops:
            return
        slot = self._maps.slots[slot_index]
        tokens = slot.late * self._config.tokens_per_group
        holder = self._holder(slot_index, slot.groups[: slot.late])
        if holder is None or tokens % self._granularity:
            self._maps.promote(slot_index)
            return
        fence = BorrowFence(lambda: self._force(slot_index))
        self._borrows[slot_index] = Borrow(holder, fence)
        self._copies.pin(holder, range(slot.late), fence)
        self.started += 1

    def _holder(self, slot_index: int, groups: list[Group]) -> int | None:
        """A slot other than ``slot_index``, not borrowing, that maps ``groups`` at [0, n)."""
        first = groups[0]
        for index, other in enumerate(self._maps.slots):
            if (  # the first group's test is cheap: most slots fail it
                other.groups
                and other.groups[0] == first
                and index != slot_index
                and index not in self._borrows
                and other.groups[: len(groups)] == groups
            ):
                return index
        return None

    def ticket(self, slot_index: int, need: int) -> int:
        """The worker's batch to wait for before the slot's first ``need`` groups can be read (a
        borrower's late run is read from its holder's pages)."""
        if not need:
            return 0
        slot = self._maps.slots[slot_index]
        late = min(slot.late, need)
        own = slot.tickets[need - 1] if need > late else 0  # tickets ascend after the run
        if not late:
            return own
        borrow = self._borrows.get(slot_index)
        if borrow is None:
            return max(own, slot.tickets[0])
        holder = self._maps.slots[borrow.holder].tickets
        return max(own, holder[0], holder[late - 1])  # the holder may have a late run of its own

    def send_late(self) -> None:
        """At a step's end: sends the next batch of late runs behind what is queued, once the last
        has run, of as many pages as the worker maps in a step's time (``LATE_PAGE_SECONDS``).
        Timing decides only when runs map, never the books: ranks may differ here."""
        now, stepped = time.perf_counter(), self._stepped_at
        self._stepped_at = now
        if self._maps.late_ops and self._maps.done(self._late_ticket):
            least, most = LATE_BATCH_PAGES
            pages = min(max(least, int((now - stepped) / LATE_PAGE_SECONDS)), most)
            self._late_ticket = self._maps.flush_late(pages)

    def end_ready(self) -> tuple[int, ...]:
        """Ends the borrows whose late run has been mapped; returns their slots."""
        slots = self._maps.slots
        ready = tuple(i for i in self._borrows if self._maps.done(slots[i].tickets[0]))
        for slot_index in ready:
            self.end(slot_index)
        return ready

    def end_listed(self, slot_indices: tuple[int, ...]) -> tuple[int, ...]:
        """Ends the borrows of ``slot_indices`` (another rank's ``end_ready``); returns them."""
        if missing := [i for i in slot_indices if i not in self._borrows]:
            raise ValueError(f"slots {missing} borrow nothing")
        for slot_index in slot_indices:
            self.end(slot_index)
        return slot_indices

    def end(self, slot_index: int, wait: bool = False) -> None:
        """Ends the slot's borrow, if any: its late run is sent, waited for if ``wait`` (its own
        pages are read next, e.g. by an offload), and the pin's fence put behind the steps
        launched so far."""
        borrow = self._borrows.pop(slot_index, None)
        if borrow is None:
            return
        self._maps.promote(slot_index)
        self._maps.flush()
        if wait:
            self._maps.wait(self._maps.slots[slot_index].tickets[0], WaitCause.STEP)
        borrow.fence.ended = self._copies.fence()

    def _force(self, slot_index: int) -> None:
        self.forced += 1
        self.end(slot_index)

    def reads(self) -> Mapping[int, tuple[int, int]]:
        """Borrower slot -> (holder slot, leading tokens read from the holder)."""
        slots, per_group = self._maps.slots, self._config.tokens_per_group
        return {i: (b.holder, slots[i].late * per_group) for i, b in self._borrows.items()}

    def check_invariants(self) -> None:
        slots = self._maps.slots
        for index, borrow in self._borrows.items():
            slot, holder = slots[index], slots[borrow.holder]
            assert slot.state is SlotState.RUNNING, f"borrower {index} is {slot.state.value}"
            assert slot.late and borrow.holder not in self._borrows, borrow
            assert holder.groups[: slot.late] == slot.groups[: slot.late], (
                f"holder {borrow.holder} no longer maps borrower {index}'s pages"
            )
            assert borrow.fence.ended is None, f"borrow {index} ended but kept"
        assert set(self._maps.late_ops) <= set(self._borrows), "a late run outlived its borrow"
