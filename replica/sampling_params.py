"""How one request chooses its tokens and when it stops: ``SamplingParams``, validated on
construction. A light module (no torch): the serving layer builds these from request bodies."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_LOGPROBS = 20
# Below this temperature a row is sampled greedily: dividing logits by ~0 overflows to inf/NaN, and
# the tempered distribution is already one-hot to float32 precision.
GREEDY_TEMPERATURE = 1e-5
# torch.Generator.manual_seed accepts exactly this range.
_SEED_MIN = -(1 << 63)
_SEED_MAX = (1 << 64) - 1


def _is_int(value: Any) -> bool:
    # bool is an int subclass; `"max_tokens": true` in a request body is a client bug, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"invalid {name}={value!r}: {why}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens and when it stops.

    ``temperature`` 0 means greedy. ``top_k`` 0 or -1 disables top-k (-1 is stored as 0).
    ``logprobs`` = n returns the chosen token's logprob plus the n most likely alternatives
    (None: no logprobs). ``stop`` strings are excluded from the output text; ``stop_token_ids``
    end generation like EOS does. Invalid values raise ``ValueError`` naming the field.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise _bad("max_tokens", self.max_tokens, "must be an integer >= 1")

        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise _bad("temperature", t, "must be a finite number >= 0")
        object.__setattr__(self, "temperature", float(t))

        if not _is_int(self.top_k) or self.top_k < -1:
            raise _bad("top_k", self.top_k, "must be an integer >= 1, or 0 / -1 to disable")
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)

        p = self.top_p
        # `not (0 < p <= 1)` also rejects NaN.
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise _bad("top_p", p, "must be a number in (0, 1]")
        object.__setattr__(self, "top_p", float(p))

        if self.seed is not None and (
            not _is_int(self.seed) or not _SEED_MIN <= self.seed <= _SEED_MAX
        ):
            raise _bad("seed", self.seed, f"must be an integer in [{_SEED_MIN}, {_SEED_MAX}]")

        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise _bad("stop", self.stop, "must be a non-empty string or a list of them")
        object.__setattr__(self, "stop", tuple(stop))

        ids = () if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
            raise _bad("stop_token_ids", self.stop_token_ids, "must be a list of integers >= 0")
        object.__setattr__(self, "stop_token_ids", tuple(ids))

        if not isinstance(self.ignore_eos, bool):
            raise _bad("ignore_eos", self.ignore_eos, "must be a boolean")

        lp = self.logprobs
        if lp is not None and (not _is_int(lp) or not 0 <= lp <= MAX_LOGPROBS):
            raise _bad("logprobs", lp, f"must be an integer in [0, {MAX_LOGPROBS}] or null")

    @property
    def greedy(self) -> bool:
        """Whether this request takes the argmax (temperature 0, or too small to divide by)."""
        return self.temperature < GREEDY_TEMPERATURE
