"""How many KV pages admission keeps back for the growth of the requests already running.

A request admitted now holds pages for its first prompt chunk only; the rest of its prompt and
every token it generates later need more. Admitting on free pages alone fills the cache with
prompts and then preempts (by recompute: the prompt is computed twice) as soon as the batch grows.
So admission keeps back the pages each running request will need to reach the rest of its prompt
and the tokens it is expected to still generate,

    reserve = sum over running r of pages(r.num_tokens + ceil(ratio * r.remaining)) -
    pages(r.computed)

and admits a request only if the pages left cover its own prompt and expected growth.

``remaining`` is ``max_total_tokens - num_tokens`` (what ``max_tokens`` still allows). Few requests
use all of it (they stop at EOS or a stop string), so ``ratio`` is an estimate that learns from the
replica's own preemptions: each preemption raises it by ``raise_per_preemption`` (the estimate was
too low), and every scheduled step without one lowers it by ``decay_per_step`` (it may be too
high), never below ``minimum`` nor above 1. SGLang's scheduler keeps a ratio of the same kind for
the same reason.

Invariant: ``minimum <= ratio <= 1``. With ``initial == 0`` (``EngineConfig.growth_reserve=0``)
the ratio stays 0: only the prompts are reserved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol


class Growing(Protocol):
    """What the reserve reads of a running request."""

    @property
    def num_tokens(self) -> int: ...

    @property
    def computed(self) -> int: ...

    @property
    def max_total_tokens(self) -> int: ...


@dataclass
class GrowthReserve:
    initial: float = 0.5
    minimum: float = 0.1
    decay_per_step: float = 0.002  # from 1 down to 0.1 in 450 steps without a preemption
    raise_per_preemption: float = 0.25
    ratio: float = field(init=False)

    def __post_init__(self) -> None:
        if not 0 <= self.minimum <= self.initial <= 1:
            raise ValueError(
                f"GrowthReserve needs 0 <= minimum <= initial <= 1, got minimum={self.minimum}, "
                f"initial={self.initial}"
            )
        if self.decay_per_step < 0 or self.raise_per_preemption < 0:
            raise ValueError("GrowthReserve's decay_per_step and raise_per_preemption must be >= 0")
        self.ratio = self.initial

    @classmethod
    def from_config(cls, initial: float) -> GrowthReserve:
        """``EngineConfig.growth_reserve``: the initial ratio; 0 keeps it at 0 (prompts only)."""
        if initial == 0:
            return cls(initial=0.0, minimum=0.0, decay_per_step=0.0, raise_per_preemption=0.0)
        return cls(initial=initial, minimum=min(cls.minimum, initial))

    def expected_tokens(self, request: Growing) -> int:
        """The tokens ``request`` is expected to still generate."""
        return math.ceil(self.ratio * max(0, request.max_total_tokens - request.num_tokens))

    def pages(self, running: Iterable[Growing], pages_for: Callable[[int], int]) -> int:
        """Pages to keep back for ``running`` (the rest of their prompts and their expected
        growth); ``pages_for(tokens)`` is what a slot of that many tokens holds."""
        return sum(
            max(0, pages_for(r.num_tokens + self.expected_tokens(r)) - pages_for(r.computed))
            for r in running
        )

    def preempted(self) -> None:
        self.ratio = min(1.0, self.ratio + self.raise_per_preemption)

    def stepped(self) -> None:
        self.ratio = max(self.minimum, self.ratio - self.decay_per_step)
