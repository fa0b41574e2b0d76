"""Which physical page ids exist and which are free: the elastic pool's policy.

Pages are created on demand up to ``budget_pages`` and, when more than ``max_idle_pages`` free
pages have sat unused for ``idle_seconds``, the surplus is released back to the device so another
process or model can use it. This class only decides; the caller turns its decisions into
``Op.create`` / ``Op.release`` operations for the mapping worker, in order.

Spare pages: while the pool is drawn on, ``spare`` names up to ``spare_pages`` pages (at most
``max_idle_pages``, which the idle release keeps) to create ahead of need, so a growth, an
admission or a restore that takes them only maps: creating a page is about a third of what a
fresh page costs the worker (H100, under load: 30-35 us of ~100 us). They are counted created and
free at once: the caller queues their ``Op.create`` before any operation that maps them.

Pages may be mapped at several places at once (prefix sharing aliases one physical page under
several slots): the pool counts the mappings of every handed-out id, and an id goes back to the
free list only when its last mapping is given back.

Invariants (``check_invariants``):
    len(free) + in_use == created <= budget_pages
    every created id is either free (0 mappings) or handed out (>= 1 mapping), never both
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from replica.kv.config import KVCacheConfig


@dataclass(frozen=True)
class Taken:
    """Ids handed out by ``take``; ``new_ids`` must be created before use."""

    ids: tuple[int, ...]
    new_ids: tuple[int, ...]


class PhysicalPagePool:
    def __init__(
        self,
        budget_pages: int,
        max_idle_pages: int,
        idle_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        spare_pages: int = 0,
    ) -> None:
        self.budget_pages = budget_pages
        self.max_idle_pages = max_idle_pages
        self.idle_seconds = idle_seconds
        self.spare_pages = min(spare_pages, max_idle_pages)
        self._drawn = False  # a take handed pages out since the last ``spare``
        self._clock = clock
        # Free ids in the order they became free (oldest first), with that time.
        self._free: OrderedDict[int, float] = OrderedDict()
        self._created: set[int] = set()
        # Handed-out id -> how many places map it (1 unless shared).
        self._mappings: dict[int, int] = {}
        # Ids below this were issued once; released ids are reused before new ones.
        self._next_id = 0
        self._released_ids: list[int] = []
        self.pages_released_total = 0

    @classmethod
    def of(cls, config: KVCacheConfig, clock: Callable[[], float]) -> PhysicalPagePool:
        """The pool of ``config``'s budget, idle release and spare pages."""
        return cls(
            config.budget_pages,
            config.max_idle_pages,
            config.idle_seconds,
            clock,
            spare_pages=config.spare_pages,
        )

    @property
    def created(self) -> int:
        return len(self._created)

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.created - self.free

    @property
    def available(self) -> int:
        """Pages that ``take`` can hand out now: free ones plus those still creatable."""
        return self.free + self.budget_pages - self.created

    def take(self, count: int) -> Taken | None:
        """Hands out ``count`` ids (free ones first, most recently freed first, then new ones),
        or None, changing nothing, if fewer are available."""
        if count > self.available:
            return None
        ids: list[int] = []
        while len(ids) < count and self._free:
            page_id, _ = self._free.popitem(last=True)
            ids.append(page_id)
        new_ids: list[int] = []
        while len(ids) + len(new_ids) < count:
            page_id = self._released_ids.pop() if self._released_ids else self._issue()
            self._created.add(page_id)
            new_ids.append(page_id)
        for page_id in ids + new_ids:
            self._mappings[page_id] = 1
        self._drawn = self._drawn or count > 0
        return Taken(tuple(ids + new_ids), tuple(new_ids))

    def share(self, ids: list[int] | tuple[int, ...]) -> None:
        """Counts one more mapping of each handed-out id (an alias of a shared page)."""
        for page_id in ids:
            if page_id not in self._mappings:
                raise RuntimeError(f"bug: page id {page_id} shared but not handed out")
            self._mappings[page_id] += 1

    def mappings(self, page_id: int) -> int:
        """Places that map ``page_id`` (0: free or not created)."""
        return self._mappings.get(page_id, 0)

    def give_back(self, ids: list[int] | tuple[int, ...]) -> list[int]:
        """Counts one mapping fewer of each id; ids left with none return to the free list and are
        returned (they must already be unmapped, or be unmapped by operations queued before any
        operation that maps them again)."""
        now = self._clock()
        freed = []
        for page_id in ids:
            count = self._mappings.get(page_id, 0)
            if count <= 0 or page_id not in self._created or page_id in self._free:
                raise RuntimeError(f"bug: page id {page_id} given back but not handed out")
            if count > 1:
                self._mappings[page_id] = count - 1
                continue
            del self._mappings[page_id]
            self._free[page_id] = now
            freed.append(page_id)
        return freed

    def spare(self) -> list[int]:
        """Ids to create now, ahead of need (counted created and free from here on): up to
        ``spare_pages`` free, within the budget, if a ``take`` handed pages out since the last
        call; none otherwise, so an idle pool (or one just shrunk) creates nothing."""
        if not self._drawn:
            return []
        self._drawn = False
        count = min(self.spare_pages - self.free, self.budget_pages - self.created)
        now, ids = self._clock(), []
        for _ in range(count):
            page_id = self._released_ids.pop() if self._released_ids else self._issue()
            self._created.add(page_id)
            self._free[page_id] = now
            ids.append(page_id)
        return ids

    def idle_surplus(self) -> list[int]:
        """Free ids to release now: beyond ``max_idle_pages``, oldest first, idle long enough."""
        surplus = self.free - self.max_idle_pages
        if surplus <= 0:
            return []
        deadline = self._clock() - self.idle_seconds
        chosen = []
        for page_id, freed_at in self._free.items():
            if len(chosen) == surplus or freed_at > deadline:
                break
            chosen.append(page_id)
        return self._release(chosen)

    def all_free(self) -> list[int]:
        """Every free id, to release at once (``shrink``)."""
        return self._release(list(self._free))

    def _release(self, ids: list[int]) -> list[int]:
        for page_id in ids:
            del self._free[page_id]
            self._created.discard(page_id)
            self._released_ids.append(page_id)
        self.pages_released_total += len(ids)
        return ids

    def _issue(self) -> int:
        page_id = self._next_id
        self._next_id += 1
        return page_id

    def check_invariants(self) -> None:
        assert self.free + self.in_use == self.created <= self.budget_pages, (
            f"free {self.free} + in use {self.in_use} != created {self.created} "
            f"or created > budget {self.budget_pages}"
        )
        assert set(self._free) <= self._created, "a free id was never created"
        assert not set(self._released_ids) & self._created, "a released id is still created"
        assert set(self._mappings) == self._created - set(self._free), "handed-out ids differ"
        assert all(count >= 1 for count in self._mappings.values()), "an id with no mapping"
