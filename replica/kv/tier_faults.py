"""A host-tier copy that raises: never wrong tokens, books that still add up, and under tensor
parallelism the same outcome on every rank.

A copy to or from the host tier (``replica.kv.host_tier``) can raise when it is enqueued: torch
reports a CUDA error, or a pinned-memory problem. Both caches make their tier's copies through
:class:`TierFaults`, which answers a failure so:

    restore (inside the paged mode's ``acquire``; the vAttention cache's deferred restore copies
        at the slot's first waited ``ensure``, which then raises ``KVRestoreFailed``): the request
        *computes* the blocks instead. ``restore`` returns False; the cache gives the slot its
        device hit only, never indexes the blocks whose copy raised, and their keys leave the
        tier (a key whose copy failed once is not trusted again, and a lasting fault does not fail
        every later restore of it).
    offload (inside ``release``): the keys the copy claimed leave the tier, never left claimed as
        stored; the release completes.
    both: one warning; the device is drained (every stream synchronized) before anything the copy
        touched is reused, as part of it may have been enqueued; the caches' ``check_invariants``
        hold afterwards.

NOTE: recompute rather than fail the request: the tier is a cache, and a miss costs a request
time, never its answer. Failing it would turn a cache's fault into an error the user sees, while
computing the blocks gives the tokens the tier-off engine gives (vLLM's KV connectors recompute a
failed load likewise). A fault that leaves the device unusable fails the next step anyway,
through the engine's error path.

Only RuntimeError counts as a copy fault (torch's errors, CUDA's included); any other exception out
of the tier is a bug and propagates. So does ``VmmError``: a piecewise restore waits for its pages'
maps between pieces (``HostTier.restore``'s ``stops``), and a failed map is the mapping's failure,
which the cache's waits raise as they would without the tier.

Tensor parallelism (``replica.kv.recording``): each rank's cache has its own tier and makes its own
copies, and every rank must keep the books rank 0 keeps. So rank 0's faults are part of its page
plan (``AllocatorCall.tier_faults``, from :meth:`TierFaults.drain`), and a replaying rank
:meth:`~TierFaults.mirror`\\ s them: its copy fails at the same point (``MirroredFault``), so its
tier and the slot take rank 0's path; the keys each drops are compared. A rank's own fault that
rank 0 did not have:

    offload: the rank reports the keys (``RankStatus.host_dropped``) and rank 0 drops them on
        every rank with its next message (``KVCache.drop_host_blocks``), before any later acquire.
        Until then the rank keeps them booked but *in doubt*, so that its tier makes rank 0's
        choices (a block freed early would spare an eviction rank 0 makes); they are never read:
        restoring one is this rank's own failed restore;
    restore: the rank's blocks are in doubt where rank 0's books call them valid, so no book it
        could keep is both rank 0's and true: its replay raises ``ReplayMismatch``, the replica
        is broken and every request on it fails with the error (the engine's path for a rank
        whose state diverged).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from replica.kv.host_tier import HostTier, Located
from replica.vmm import VmmError

log = logging.getLogger(__name__)

Direction = Literal["offload", "restore"]
#: Faults kept until drained: each recorded or replayed call drains its own (a call makes at most
#: one copy), so a cache whose calls nobody records keeps only the latest few.
KEPT_FAULTS = 64


@dataclass(frozen=True)
class TierFault:
    """A tier copy that raised: its direction and the keys that left the tier because of it.
    ``error`` says why; it is not compared (a mirrored fault's is rank 0's)."""

    direction: Direction
    keys: tuple[int, ...]
    error: str = field(default="", compare=False)


class MirroredFault(RuntimeError):
    """Raised in place of a copy that failed on rank 0 (``TierFaults.mirror``)."""


@dataclass(frozen=True)
class MirrorOutcome:
    """What a replayed call's copies did against rank 0's: ``mirrored``, rank 0's faults repeated
    here; ``own``, this rank's faults that rank 0 did not have; ``missed``, rank 0's faults whose
    copy this rank never made."""

    mirrored: tuple[TierFault, ...]
    own: tuple[TierFault, ...]
    missed: tuple[TierFault, ...]


class TierFaults:
    """Makes a cache's host-tier copies; a copy that raises drops the keys in doubt, is logged
    once and is kept (for ``drain``). ``device``: the cache's (drained after a fault).

    ``inject(direction)`` runs before every copy, after any mirrored fault: raising RuntimeError
    fails that copy (the seam for tests and ``replica.tp.worker``'s fault hook).

    Invariants: when ``offload`` or ``restore`` returns, every key whose copy raised in it has
    left the tier, or (a replaying rank's own failed offload) is in doubt until ``drop``; a key in
    doubt is never restored; a mirrored fault fails exactly one copy, of its direction, in the
    order given.
    """

    def __init__(self, tier: HostTier, device: torch.device) -> None:
        self.tier = tier
        self._device = device
        self.inject: Callable[[str], None] = lambda direction: None
        self._mirroring: deque[TierFault] = deque()  # rank 0's faults the coming copies repeat
        self._faults: deque[tuple[TierFault, bool]] = deque(maxlen=KEPT_FAULTS)  # (fault, mirrored)
        self._replaying = False  # between mirror and end_mirror
        self._in_doubt: set[int] = set()  # booked keys whose offload failed here only
        self.faults_total = 0  # this rank's own faults, over all time
        tier.before_copy = self._before_copy

    # ---- copies --------------------------------------------------------------------------------
    def restore(
        self,
        keys: Sequence[int],
        located: Sequence[Located],
        start: int,
        count: int,
        stops: Iterable[int] = (),
    ) -> bool:
        """``HostTier.restore``; False if the copy raised: the blocks ``keys[start : start +
        count]`` were not restored (the caller computes them) and have left the tier."""
        in_doubt = self._in_doubt.intersection(keys[start : start + count])
        try:
            if in_doubt:
                raise RuntimeError(
                    f"{len(in_doubt)} blocks are in doubt: their offload failed here"
                )
            self.tier.restore(keys, located, start, count, stops)
        except VmmError:  # a wait for the pages' maps (module docstring): not the copy's fault
            raise
        except RuntimeError as error:
            self._failed("restore", keys[start : start + count], error)
            return False
        return True

    def offload(self, keys: Sequence[int], located: Sequence[Located], limit: int) -> None:
        """``HostTier.offload``; if the copy raised, the keys it claimed have left the tier."""
        stored_before = {key for key in keys[:limit] if key in self.tier}
        try:
            self.tier.offload(keys, located, limit)
        except RuntimeError as error:
            claimed = [key for key in keys[:limit] if key in self.tier and key not in stored_before]
            if self._replaying and not isinstance(error, MirroredFault):
                self._in_doubt.update(claimed)  # booked until rank 0's drop (module docstring)
                self._record("offload", claimed, error, "are in doubt until rank 0 drops them")
            else:
                self._failed("offload", claimed, error)

    def drop(self, keys: Sequence[int]) -> list[int]:
        """Drops ``keys`` from the tier (a rank's copy of them failed); returns those it held."""
        self._in_doubt.difference_update(keys)
        return self.tier.discard(keys)

    def _before_copy(self, direction: str) -> None:
        if self._mirroring and self._mirroring[0].direction == direction:
            fault = self._mirroring.popleft()
            raise MirroredFault(f"rank 0's {direction} copy failed: {fault.error}")
        self.inject(direction)

    def _failed(self, direction: Direction, keys: Sequence[int], error: RuntimeError) -> None:
        self._in_doubt.difference_update(keys)
        fate = "leave the tier" + (", the request computes them" if direction == "restore" else "")
        self._record(direction, self.tier.discard(keys), error, fate)

    def _record(
        self, direction: Direction, keys: Sequence[int], error: RuntimeError, fate: str
    ) -> None:
        mirrored = isinstance(error, MirroredFault)
        self._faults.append((TierFault(direction, tuple(keys), str(error)), mirrored))
        if mirrored:  # raised before anything was enqueued: nothing to drain
            log.info("host KV tier: %s of %d blocks failed as on rank 0", direction, len(keys))
            return
        self._drain_device()
        self.faults_total += 1
        log.warning(
            "host KV tier: a %s copy raised (%s: %s); its %d blocks %s",
            direction,
            type(error).__name__,
            error,
            len(keys),
            fate,
        )

    def _drain_device(self) -> None:
        """Waits for every stream of the device: part of the failed copy may have been enqueued,
        and what it touches (pages, blocks, host blocks) is reused once the call returns."""
        if self._device.type != "cuda":
            return  # host copies are synchronous
        try:
            torch.cuda.synchronize(self._device)
        except RuntimeError:  # the device is gone: the next step fails through the engine's path
            log.exception("host KV tier: the device could not be drained after a failed copy")

    # ---- outcomes ------------------------------------------------------------------------------
    def drain(self) -> tuple[TierFault, ...]:
        """The faults since the last drain (or ``end_mirror``), oldest first; kept no more."""
        faults = tuple(fault for fault, _ in self._faults)
        self._faults.clear()
        return faults

    def mirror(self, faults: Sequence[TierFault]) -> None:
        """The coming copies repeat rank 0's outcomes: those that failed there (``faults``, in
        order) fail here at the same point, so this rank's books take rank 0's path."""
        self._faults.clear()
        self._mirroring, self._replaying = deque(faults), True

    def end_mirror(self) -> MirrorOutcome:
        """What the copies since ``mirror`` did; no fault is mirrored any more."""
        faults = list(self._faults)
        self._faults.clear()
        missed, self._mirroring, self._replaying = tuple(self._mirroring), deque(), False
        return MirrorOutcome(
            tuple(fault for fault, mirrored in faults if mirrored),
            tuple(fault for fault, mirrored in faults if not mirrored),
            missed,
        )
