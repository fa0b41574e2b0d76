"""The messages of a tensor-parallel replica, and the checks that come before one is started.

Rank 0 owns the scheduler. Each step it sends every other rank one :class:`StepMessage`: the
:class:`~replica.model_runner.StepPlan` all ranks execute, plus the *page plan*, the allocator calls
its scheduler made since the previous message. Each other rank replays the page plan on its own
allocator, then executes the plan, and answers with a :class:`RankStatus`.

Invariants:
    * messages are numbered 0, 1, 2, ... without gaps; a rank executes them in that order;
    * after replaying message ``n``, every rank's allocator has made exactly the calls rank 0's
      made, so slots and page patterns are identical on all ranks (the policy is deterministic
      and every rank's cache has the same geometry and budget);
    * a rank whose status is ``BROKEN`` no longer shares rank 0's state: the replica must restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from replica.kv.recording import AllocatorCall
from replica.model import ModelConfig
from replica.model_runner import StepPlan


class StatusCode(IntEnum):
    """Ordered by severity: the replica's outcome of a step is the maximum over its ranks."""

    OK = 0
    #: This step failed before the model ran; the rank's state is intact (the replica goes on).
    STEP_FAILED = 1
    #: The rank's state may differ from rank 0's, or it cannot talk to the others any more.
    BROKEN = 2


@dataclass(frozen=True)
class StepMessage:
    """What rank 0 sends the other ranks, once per step (and for ``TensorParallelDriver.sync``)."""

    step: int
    #: None: replay ``page_plan`` only (no model step, no collective).
    plan: StepPlan | None
    page_plan: tuple[AllocatorCall, ...]


@dataclass(frozen=True)
class Shutdown:
    """Tells a rank's loop to leave its process group and return."""


@dataclass(frozen=True)
class RankStatus:
    """A rank's answer to a message (``step == -1``: it has started and is ready)."""

    rank: int
    step: int
    code: StatusCode
    #: ``kv.reclaimable_pages()`` after the step: what a new request could get on this rank.
    reclaimable_pages: int
    error: str | None = None
    #: A digest of the KV books after the step (:func:`books`); rank 0 compares it with its own.
    books: tuple[int, ...] = ()
    #: Host-tier blocks this rank dropped on its own (its offload copy raised where rank 0's did
    #: not, ``replica.kv.tier_faults``): rank 0 drops them on every rank with its next message.
    host_dropped: tuple[int, ...] = ()


def books(allocator: Any) -> tuple[int, ...]:
    """What must be equal on every rank after the same calls: slots running and cached, pages in
    use and cached (not created or free pages: idle pages go back to the device on a timer), pages
    shared and prefix tokens found (every rank aliases the same pages)."""
    stats = allocator.stats()
    return (
        stats.slots_running,
        stats.slots_cached,
        stats.pages_in_use,
        stats.pages_cached,
        stats.pages_shared,
        stats.prefix_hits_tokens,
    )


class StepFailed(RuntimeError):
    """A step of a tensor-parallel replica failed on some rank. With ``broken`` False the step's
    requests fail and the replica goes on; with ``broken`` True every request fails and the replica
    must be restarted."""

    def __init__(self, message: str, broken: bool) -> None:
        super().__init__(message)
        self.broken = broken


def tp_sizes(model_config: ModelConfig) -> list[int]:
    """The tensor-parallel sizes this model can be split into (each rank holds whole KV heads)."""
    sizes = (model_config.num_heads, model_config.num_kv_heads, model_config.intermediate_size)
    return [tp for tp in range(1, model_config.num_kv_heads + 1) if all(n % tp == 0 for n in sizes)]


def check_tensor_parallel(model_config: ModelConfig, tp: int) -> None:
    """Raises ValueError, naming the numbers, unless ``tp`` ranks can each hold an equal share.

    KV heads are never replicated: tp above the KV-head count is refused rather than giving several
    ranks copies of one head (which would make their caches no longer a disjoint shard).
    """
    kv, heads = model_config.num_kv_heads, model_config.num_heads
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    valid = ", ".join(map(str, tp_sizes(model_config)))
    if tp > kv:
        raise ValueError(
            f"tensor_parallel_size={tp} exceeds the model's {kv} KV heads: every rank must hold at "
            f"least one whole KV head (KV heads are not replicated); valid sizes: {valid}"
        )
    if kv % tp:
        raise ValueError(
            f"tensor_parallel_size={tp} does not divide the model's {kv} KV heads "
            f"({heads} query heads): every rank must hold the same number of whole KV heads; "
            f"valid sizes: {valid}"
        )
    for what, n in (("query heads", heads), ("intermediate size", model_config.intermediate_size)):
        if n % tp:
            raise ValueError(
                f"tensor_parallel_size={tp} does not divide the model's {what} ({n}); "
                f"valid sizes: {valid}"
            )
