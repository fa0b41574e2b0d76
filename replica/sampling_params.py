"""How one request chooses its tokens and when it stops: ``SamplingParams``, validated on
construction. A light module (no torch): the serving layer builds these from request bodies."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_TOKENS = 1024
MAX_REPETITION_PENALTY = 10.0
# Below this temperature a row is sampled greedily: dividing logits by ~0 overflows to inf/NaN, and
# the tempered distribution is already one-hot to float32 precision.
GREEDY_TEMPERATURE = 1e-5
# torch.Generator.manual_seed accepts exactly this range.
_SEED_MIN = -(1 << 63)
_SEED_MAX = (1 << 64) - 1


def _is_int(value: Any) -> bool:
    # bool is an int subclass; `"max_tokens": true` in a request body is a client bug, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _stop_strings(value: Any) -> tuple[str, ...]:
    """``stop``: None, one string or a list of them -> a tuple of non-empty strings."""
    stop = value
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", value, "must be a non-empty string or a list of them")
    return tuple(stop)


def _stop_token_ids(value: Any) -> tuple[int, ...]:
    """``stop_token_ids``: None or a list of token ids -> a tuple of them."""
    ids = () if value is None else value
    if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
        raise _bad("stop_token_ids", value, "must be a list of integers >= 0")
    return tuple(ids)


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """``{token id: bias}`` (ids as ints or decimal strings, as JSON sends them) or pairs -> pairs
    sorted by id; biases in [-100, 100] as OpenAI allows."""
    if value is None:
        return ()
    pairs = value.items() if isinstance(value, dict) else value
    if not isinstance(pairs, (list, tuple, type({}.items()))):
        raise _bad("logit_bias", value, "must map token ids to biases")
    out: dict[int, float] = {}
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise _bad("logit_bias", value, "must map token ids to biases")
        token, bias = pair
        if isinstance(token, str) and token.strip().isdigit():
            token = int(token)
        if not _is_int(token) or token < 0:
            raise _bad("logit_bias", value, f"key {token!r} is not a token id (an integer >= 0)")
        if not _is_number(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise _bad("logit_bias", value, f"bias {bias!r} is not a number in [-100, 100]")
        out[token] = float(bias)
    if len(out) > MAX_LOGIT_BIAS_TOKENS:
        raise _bad("logit_bias", f"{len(out)} tokens", f"at most {MAX_LOGIT_BIAS_TOKENS}")
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class GuidedDecoding:
    """A grammar the output must follow: ``kind`` "json_object" (any JSON object) or
    "json_schema" (``spec``: the schema as JSON text). ``replica.grammar`` compiles it."""

    kind: str
    spec: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("json_object", "json_schema"):
            raise _bad("guided.kind", self.kind, 'must be "json_object" or "json_schema"')
        if (self.kind == "json_schema") != isinstance(self.spec, str):
            raise _bad("guided.spec", self.spec, "a json_schema needs its schema, nothing else")


def _bad(name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"invalid {name}={value!r}: {why}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens and when it stops.

    ``temperature`` 0 means greedy. ``top_k`` 0 or -1 disables top-k (-1 is stored as 0).
    ``logprobs`` = n returns the chosen token's logprob plus the n most likely alternatives
    (None: no logprobs). ``stop`` strings are excluded from the output text; ``stop_token_ids``
    end generation like EOS does. Invalid values raise ``ValueError`` naming the field.

    Logit adjustments, in the order the sampler applies them (OpenAI's and vLLM's meanings):
    ``logit_bias`` adds ``bias`` to token ``id`` (pairs, sorted by id; a dict is accepted);
    ``repetition_penalty`` r divides a positive logit by r and multiplies a negative one by r for
    every token of the prompt or the output so far; ``frequency_penalty`` subtracts f times the
    token's count in the output, ``presence_penalty`` subtracts p once if it occurs there; after
    the temperature, ``min_p`` drops tokens less likely than ``min_p`` times the most likely one.
    ``guided`` constrains the output to a grammar (``replica.grammar``).
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    guided: GuidedDecoding | None = None

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

        object.__setattr__(self, "stop", _stop_strings(self.stop))
        object.__setattr__(self, "stop_token_ids", _stop_token_ids(self.stop_token_ids))

        if not isinstance(self.ignore_eos, bool):
            raise _bad("ignore_eos", self.ignore_eos, "must be a boolean")

        lp = self.logprobs
        if lp is not None and (not _is_int(lp) or not 0 <= lp <= MAX_LOGPROBS):
            raise _bad("logprobs", lp, f"must be an integer in [0, {MAX_LOGPROBS}] or null")

        for name, low, high in (
            ("presence_penalty", -2.0, 2.0),
            ("frequency_penalty", -2.0, 2.0),
            ("min_p", 0.0, 1.0),
        ):
            self._number(name, low, high)
        r = self.repetition_penalty
        if not _is_number(r) or not (0 < r <= MAX_REPETITION_PENALTY):
            raise _bad(
                "repetition_penalty", r, f"must be a number in (0, {MAX_REPETITION_PENALTY}]"
            )
        object.__setattr__(self, "repetition_penalty", float(r))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))

        if self.guided is not None and not isinstance(self.guided, GuidedDecoding):
            raise _bad("guided", self.guided, "must be a GuidedDecoding")

    def _number(self, name: str, low: float, high: float) -> None:
        value = getattr(self, name)
        if not _is_number(value) or not low <= value <= high:  # also rejects NaN
            raise _bad(name, value, f"must be a number in [{low:g}, {high:g}]")
        object.__setattr__(self, name, float(value))

    @property
    def penalized(self) -> bool:
        """Whether a penalty reads the tokens seen so far (the sampler keeps their counts)."""
        return (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1
        )

    @property
    def greedy(self) -> bool:
        """Whether this request takes the argmax (temperature 0, or too small to divide by)."""
        return self.temperature < GREEDY_TEMPERATURE


def default_max_tokens(context_tokens: int, prompt_tokens: int) -> int:
    """A request's ``max_tokens`` when it sets none: the rest of the context (as OpenAI and vLLM
    do), for the HTTP API (cluster.ingress) and ``vattn generate`` (replica.cli) alike. Below 1
    when the prompt fills the context, which the caller refuses."""
    return context_tokens - prompt_tokens
