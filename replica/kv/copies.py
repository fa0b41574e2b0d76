"""Copies of K/V between slots of the vAttention cache, and the pins that keep them safe.

A prefix hit can be served by copying the holder's K/V into pages the new slot already maps
instead of unmapping them and aliasing the holder's (``replica.kv.allocator`` decides which).
This module is the mechanism: it issues the copies and remembers, until each copy has run, which
pages of which slots it reads and writes.

Ordering contract (every copy between slots, and the host tier's after it):
    1. The source was written first. Copies are enqueued on the engine's current stream, the
       stream every step runs on, when ``acquire`` decides them; a block is indexed only once the
       step writing it was launched, so stream order puts the copy after its producer and before
       the step that reads the destination.
    2. Source and destination are mapped before the copy is enqueued: the caller waits for the
       mapping worker's tickets of both (``SlotCopies.copy`` takes the pages' tickets as given).
    3. Both stay mapped until the copy's fence completes: the mapping worker unmaps on its own
       thread, in no order with the stream, so a caller about to unmap a slot's pages from page
       index ``i`` on first calls ``settle(slot, i)``, which waits on the host for the fences of
       the copies pinning them. Rewriting them needs no host wait: the stream that rewrites them
       (the engine's) waits for those fences on the device (``order(slot, i)``), which matters for
       the host tier's offloads, on a side stream, and costs nothing for copies on the engine's own
       stream (a host wait would drain the steps queued ahead of the copy).
    4. On the host backend a copy is synchronous: its fence is complete when it returns.

Costs that drive the allocator's rule (one H100, 2026-12-07, ``../shared/notes/h100-probe.md``):
``cuMemMap`` ~22 us a page at the driver's floor (27-59 us in the engine under load) and an unmap
about as much, while copying a 2 MiB page device-to-device takes ~1.5 us of copy bandwidth.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from replica.kv.slots import Group


class CopyFence(Protocol):
    """Completion of the copies enqueued before it."""

    def done(self) -> bool: ...

    def wait(self) -> None: ...

    def order(self) -> None:
        """Makes the current stream wait for the copies on the device; the host does not wait."""


class MapsPages(Protocol):
    """A slot's books as far as copies care: what it maps at each page index."""

    groups: list[Group]


class _Complete:
    """The fence of synchronous (host) copies."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None

    def order(self) -> None:
        return None


def wait_for(fence: CopyFence) -> float:
    """Waits for ``fence``; the seconds the caller waited (0 where it was done)."""
    if fence.done():
        return 0.0
    started = time.perf_counter()
    fence.wait()
    return time.perf_counter() - started


class _StreamFence:
    """A CUDA event recorded on the current stream after the copies."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(device))

    def done(self) -> bool:
        return bool(self._event.query())

    def wait(self) -> None:
        self._event.synchronize()

    def order(self) -> None:
        torch.cuda.current_stream(self._device).wait_event(self._event)


def order_all(fences: Iterable[CopyFence]) -> None:
    """Puts the current stream behind each of ``fences`` on the device, once a fence however often
    it comes (a copy's pins, an offload's blocks, share one)."""
    for fence in {id(f): f for f in fences}.values():
        fence.order()


def stream_fence(device: torch.device) -> CopyFence:
    """The fence of copies just enqueued on ``device``'s current stream."""
    return _StreamFence(device) if device.type == "cuda" else _Complete()


@dataclass(frozen=True)
class SlotCopy:
    """Bytes ``[start, stop)`` of slot ``source``'s region copied to the same offsets of slot
    ``target``'s, in every range (a token's bytes sit at the same offset in every slot)."""

    source: int
    target: int
    start: int
    stop: int

    def pages(self, page_size: int) -> range:
        """The page indices (of a slot) the copy reads in ``source`` and writes in ``target``."""
        return range(self.start // page_size, -(-self.stop // page_size))


@dataclass
class _Pin:
    slots: tuple[int, ...]  # the slots whose pages a copy reads or writes
    pages: range  # page indices of those slots
    fence: CopyFence
    held: tuple[tuple[object, ...], ...]  # per slot, what it mapped at those pages when pinned


class SlotCopies:
    """Issues page copies between slots of the reserved ranges and pins their pages.

    ``ranges``: one byte tensor per reserved range, [max_slots, slot bytes]. ``make_fence`` makes
    the fence of the copies just enqueued (a test passes one it completes by hand).
    ``slots``: the slots' books, each mapping ``groups[i]`` at page index ``i``.

    Invariant (``check_invariants``): every pin's fence is the fence of its copy; a slot's pages
    under a pin are not unmapped until ``settle`` saw the fence complete (while it is pending the
    slot maps at those indices what it mapped when pinned), nor rewritten before ``order`` put the
    fence ahead of the rewriting stream.
    """

    def __init__(
        self,
        ranges: Sequence[torch.Tensor],
        page_size: int,
        slots: Sequence[MapsPages],
        make_fence: Callable[[], CopyFence] | None = None,
    ) -> None:
        self._ranges = list(ranges)
        self._page_size = page_size
        self._slots = slots
        device = self._ranges[0].device if self._ranges else torch.device("cpu")
        self._make_fence = make_fence or (lambda: stream_fence(device))
        self._pins: list[_Pin] = []
        self.bytes_copied = 0  # bytes copied, every range counted
        self.wait_seconds = 0.0  # callers waiting in settle for copies to complete

    def copy(self, copies: Sequence[SlotCopy]) -> None:
        """Enqueues ``copies`` (every range; one batched launch) and pins their pages until the
        fence recorded after them completes."""
        if not copies:
            return
        targets, sources = [], []
        for c in copies:
            for view in self._ranges:
                targets.append(view[c.target, c.start : c.stop])
                sources.append(view[c.source, c.start : c.stop])
        # NOTE: one multi-tensor launch for every range (per_layer has 64 ranges): a copy call
        # per range would cost more host time than the copies themselves.
        torch._foreach_copy_(targets, sources, non_blocking=True)
        fence = self._make_fence()
        size = self._page_size
        for c in copies:
            self._add_pin((c.source, c.target), c.pages(size), fence)
        self.bytes_copied += sum(c.stop - c.start for c in copies) * len(self._ranges)

    def fence(self) -> CopyFence:
        """The fence of the work enqueued so far on the current stream (a borrow's end)."""
        return self._make_fence()

    def pin(self, slot: int, pages: range, fence: CopyFence) -> None:
        """Pins the slot's ``pages`` until ``fence`` completes (a copy to or from the host tier,
        ``replica.kv.host_tier``): ``settle`` waits for it like for a copy between slots."""
        if pages:
            self._add_pin((slot,), pages, fence)

    def _add_pin(self, slots: tuple[int, ...], pages: range, fence: CopyFence) -> None:
        held = tuple(tuple(self._slots[s].groups[pages.start : pages.stop]) for s in slots)
        self._pins.append(_Pin(slots, pages, fence, held))

    def settle(self, slot: int, first: int = 0) -> None:
        """Waits for every copy reading or writing the slot's pages from ``first`` on: call it
        before unmapping or rewriting them."""
        self._retire()
        for pin in self._pins:
            if slot in pin.slots and pin.pages.stop > first:
                self.wait_seconds += wait_for(pin.fence)
        self._retire()

    def order(self, slot: int, first: int = 0) -> None:
        """Makes the current stream wait, on the device, for every copy reading or writing the
        slot's pages from ``first`` on: call it before that stream rewrites them (the host does
        not wait; an unmap needs ``settle``)."""
        self._retire()
        order_all(p.fence for p in self._pins if slot in p.slots and p.pages.stop > first)

    def settle_all(self) -> None:
        self._retire()
        for pin in self._pins:
            pin.fence.wait()
        self._pins.clear()

    def _retire(self) -> None:
        self._pins = [pin for pin in self._pins if not pin.fence.done()]

    def check_invariants(self) -> None:
        for pin in self._pins:
            assert len(set(pin.slots)) == len(pin.slots) and pin.pages, f"bad pin {pin}"
            if pin.fence.done():
                continue
            for slot, held in zip(pin.slots, pin.held, strict=True):
                now = tuple(self._slots[slot].groups[pin.pages.start : pin.pages.stop])
                assert now == held, (
                    f"slot {slot}'s pages {pin.pages} were unmapped before their copy's fence "
                    f"completed: {held} then, {now} now"
                )
