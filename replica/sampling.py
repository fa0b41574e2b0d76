"""The batched token sampler (the parameters it reads: ``replica.sampling_params``).

Shapes: ``B`` rows (one per sequence sampled this step), ``V`` vocabulary entries.

``sample(logits[B, V], params[B], generators[B]) -> SampleResult`` picks one token per row:

* first the logits are adjusted (``_adjusted_logits``, only where some row asks): ``logit_bias``
  added at its (row, token) pairs, repetition / frequency / presence penalties from the tokens each
  row has seen (``TokenHistory``: counts kept on the device), a grammar's token bitmask;
* all rows greedy  -> ``argmax`` of the adjusted logits (one kernel);
* otherwise        -> temperature, min-p, top-k and top-p applied with per-row parameter tensors,
  then one draw per row by the exponential race ``argmax(probs / E)``, ``E ~ Exponential(1)``,
  which samples exactly from ``probs``; rows with a seed draw ``E`` from their own
  ``torch.Generator``.

Every adjustment is a batched tensor operation over per-row parameters: no Python loop touches the
vocabulary. Sampling runs eagerly after the model (CUDA graphs cover the model's forward only), and
``TokenHistory.record`` adds a step's sampled tokens on the device right behind it, so under
asynchronous scheduling the next step's penalties count a token the host has not read yet.

The sampler never reads a device value on the host; ``SampleResult.to_host`` is the step's single
synchronisation point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from replica.sampling_params import SamplingParams

#: Tokens per word of a grammar's token bitmask (xgrammar's layout: bit j of word w is token
#: 32 * w + j, set when the token is allowed).
BITMASK_WORD_BITS = 32

# Smallest exponential noise used in the race; exponential_ may return 0, and 0/0 would be NaN for
# masked tokens (argmax treats NaN as the maximum).
_TINY = 1e-30


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator for one seeded request, created once at request start and reused every step.

    It must live on the logits' device: CUDA ``exponential_`` rejects a CPU generator.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


@dataclass(frozen=True)
class HostSampleResult:
    """``SampleResult`` copied to Python values.

    ``top_logprobs[i]`` holds ``params[i].logprobs`` ``(token_id, logprob)`` pairs, best first.
    """

    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None


@dataclass(frozen=True)
class SampleResult:
    """One step's tokens, still on the logits' device.

    token_ids:    LongTensor[B]
    logprobs:     FloatTensor[B], log_softmax of the raw logits at ``token_ids``; None unless some
                  row asked for logprobs (then filled for every row)
    top_ids:      LongTensor[B, K] and
    top_logprobs: FloatTensor[B, K], the K = max requested most likely tokens of the raw
                  distribution; row i's first ``num_top[i]`` columns are the ones it asked for
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    num_top: tuple[int, ...] = ()

    def to_host(self) -> HostSampleResult:
        """Copy everything to the host with one synchronisation."""
        return self.to_host_async().wait()

    def to_host_async(self) -> HostCopy:
        """Starts copying everything to the host; ``wait()`` on the result is the step's one
        synchronisation (on CUDA the copies land in pinned memory behind the step's kernels)."""
        tensors = [
            t
            for t in (self.token_ids, self.logprobs, self.top_ids, self.top_logprobs)
            if t is not None
        ]
        event = None
        if self.token_ids.is_cuda:
            tensors = [t.to("cpu", non_blocking=True) for t in tensors]
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.token_ids.device))
        return HostCopy(self, tensors, event)


@dataclass(frozen=True)
class HostCopy:
    """A ``SampleResult`` on its way to the host (``SampleResult.to_host_async``)."""

    result: SampleResult
    tensors: list[torch.Tensor]
    event: torch.cuda.Event | None

    def wait(self) -> HostSampleResult:
        if self.event is not None:
            self.event.synchronize()
        values = [t.tolist() for t in self.tensors]
        token_ids = values.pop(0)
        logprobs = values.pop(0) if self.result.logprobs is not None else None
        top = None
        if self.result.top_ids is not None and self.result.top_logprobs is not None:
            ids, lps = values
            top = [list(zip(ids[i][:n], lps[i][:n])) for i, n in enumerate(self.result.num_top)]
        elif self.result.logprobs is not None:
            top = [[] for _ in token_ids]
        return HostSampleResult(token_ids, logprobs, top)


def to_device(values: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a ``dtype`` tensor on ``device`` without a host sync (per-row sampling
    parameters, a step's token ids and positions).

    A blocking host->device copy synchronises the stream, so CUDA copies go through pinned memory.
    """
    cpu = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return cpu.pin_memory().to(device, non_blocking=True)
    return cpu.to(device)


class TokenHistory:
    """The tokens each penalized request has seen, on the device, by row:

        output_counts  IntTensor[R, V]   how often each token was generated so far
        in_prompt      BoolTensor[R, V]  whether it occurs in the prompt

    A row belongs to one request from ``add`` to ``release`` (only requests whose
    ``SamplingParams.penalized``; the others cost nothing). ``record`` adds a step's sampled tokens
    with one ``index_put_(accumulate=True)`` on the device, queued behind the sampler, so the
    counts never wait for the host. Capacity doubles when all rows are taken.

    Invariants: live rows are distinct and in range; live and free rows partition the capacity.
    """

    def __init__(self, vocab_size: int, device: torch.device | str, capacity: int = 8) -> None:
        self.vocab_size, self.device = vocab_size, torch.device(device)
        self.output_counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=self.device)
        self.in_prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=self.device)
        self.rows: dict[str, int] = {}
        self.free: list[int] = []
        self._grow(capacity)

    @property
    def capacity(self) -> int:
        return self.output_counts.shape[0]

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        counts = torch.zeros(capacity, self.vocab_size, dtype=torch.int32, device=self.device)
        prompt = torch.zeros(capacity, self.vocab_size, dtype=torch.bool, device=self.device)
        counts[:old], prompt[:old] = self.output_counts, self.in_prompt
        self.output_counts, self.in_prompt = counts, prompt
        self.free += range(capacity - 1, old - 1, -1)  # lowest row popped first

    def add(self, key: str, prompt_ids: Sequence[int]) -> int:
        """Gives request ``key`` a cleared row with its prompt's tokens marked; returns it."""
        if key in self.rows:
            raise ValueError(f"{key!r} already has a history row")
        if not self.free:
            self._grow(2 * self.capacity)
        row = self.free.pop()
        self.rows[key] = row
        self.output_counts[row].zero_()
        self.in_prompt[row].zero_()
        if prompt_ids:
            self.in_prompt[row, to_device(list(prompt_ids), torch.int64, self.device)] = True
        return row

    def release(self, key: str) -> None:
        """Frees the row of ``key`` (no-op without one). A step still in flight may record into it
        afterwards: ``add`` clears a row later in the device's stream order, so that is harmless."""
        row = self.rows.pop(key, None)
        if row is not None:
            self.free.append(row)

    def row(self, key: str) -> int | None:
        return self.rows.get(key)

    def record(self, history_rows: Sequence[int | None], token_ids: torch.Tensor) -> None:
        """Counts ``token_ids[i]`` (LongTensor[B], on the device) in row ``history_rows[i]`` for
        every batch row i that has one."""
        pairs = [(i, r) for i, r in enumerate(history_rows) if r is not None]
        if not pairs:
            return
        index = to_device(pairs, torch.int64, self.device).T  # [2, P]: batch rows, history rows
        tokens = token_ids.index_select(0, index[0])
        ones = torch.ones(tokens.shape, dtype=torch.int32, device=self.device)
        self.output_counts.index_put_((index[1], tokens), ones, accumulate=True)

    def check_invariants(self) -> None:
        live = list(self.rows.values())
        assert len(set(live)) == len(live), "two requests share a history row"
        assert sorted(live + self.free) == list(range(self.capacity)), "rows leaked or doubled"


def _adjusted_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    history: TokenHistory | None,
    history_rows: Sequence[int | None],
    bitmask: torch.Tensor | None,
) -> torch.Tensor:
    """FloatTensor[B, V]: the logits with every row's logit_bias, penalties and grammar mask
    applied (a float32 copy; ``logits`` itself when no row asks for any of them)."""
    biased = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias]
    penalized = [i for i, p in enumerate(params) if p.penalized]
    if not biased and not penalized and bitmask is None:
        return logits.float()
    device, vocab = logits.device, logits.shape[1]
    x = logits.to(torch.float32, copy=True)
    if biased:
        rows, tokens, biases = zip(*biased)
        index = to_device([rows, tokens], torch.int64, device)
        x.index_put_(
            (index[0], index[1]), to_device(biases, torch.float32, device), accumulate=True
        )
    if penalized:
        if history is None or len(history_rows) != len(params):
            raise ValueError("penalties need a TokenHistory row for every penalized row")
        missing = [i for i in penalized if history_rows[i] is None]
        if missing:
            raise ValueError(f"batch rows {missing} have penalties but no history row")
        index = to_device([penalized, [history_rows[i] for i in penalized]], torch.int64, device)
        counts = history.output_counts.index_select(0, index[1])  # [P, V]
        generated = counts > 0
        seen = history.in_prompt.index_select(0, index[1]) | generated
        columns = [
            [params[i].repetition_penalty for i in penalized],
            [params[i].frequency_penalty for i in penalized],
            [params[i].presence_penalty for i in penalized],
        ]
        repetition, frequency, presence = to_device(columns, torch.float32, device)[:, :, None]
        rows = x.index_select(0, index[0])  # [P, V]
        rows = torch.where(seen, torch.where(rows > 0, rows / repetition, rows * repetition), rows)
        rows = rows - frequency * counts - presence * generated
        x.index_copy_(0, index[0], rows)
    if bitmask is not None:
        if bitmask.shape != (x.shape[0], -(-vocab // BITMASK_WORD_BITS)):
            raise ValueError(f"bitmask of shape {tuple(bitmask.shape)} for logits {tuple(x.shape)}")
        bits = torch.arange(BITMASK_WORD_BITS, dtype=torch.int32, device=device)
        allowed = ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, :vocab]  # [B, V]
        x.masked_fill_(~allowed, -math.inf)
    return x


def all_allowed_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """IntTensor[B, ceil(V / 32)] on the CPU allowing every token (rows without a grammar)."""
    words = -(-vocab_size // BITMASK_WORD_BITS)
    return torch.full((batch, words), -1, dtype=torch.int32)


def _filtered_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """FloatTensor[B, V]: logits / temperature, with tokens cut by min-p / top-k / top-p set to
    -inf.

    Greedy rows are left at temperature 1 (their result is replaced by the argmax). Order follows
    the usual convention: temperature, min-p, then top-k, then top-p on the renormalised
    remainder.
    Top-k keeps every token tied with the k-th largest, so both code paths below (sort or topk,
    chosen by the whole batch) give a row the same mask: a seeded row's tokens must not depend on
    its neighbours.
    """
    device = logits.device
    vocab = logits.shape[1]
    x = logits.float()

    temps = [1.0 if p.greedy else p.temperature for p in params]
    if any(t != 1.0 for t in temps):
        x = x / to_device(temps, torch.float32, device)[:, None]

    min_ps = [0.0 if p.greedy else p.min_p for p in params]
    if any(min_ps):
        probs = x.softmax(dim=-1)
        floor = probs.amax(dim=-1, keepdim=True) * to_device(min_ps, torch.float32, device)[:, None]
        x = x.masked_fill(probs < floor, -math.inf)

    k_on = [0 < p.top_k < vocab for p in params]
    p_on = [p.top_p < 1.0 and not p.greedy for p in params]
    if any(p_on):
        sorted_x, order = x.sort(dim=-1, descending=True, stable=True)
        if any(k_on):
            ks = [p.top_k if on else vocab for p, on in zip(params, k_on)]
            kth = sorted_x.gather(1, to_device(ks, torch.int64, device)[:, None] - 1)
            sorted_x = sorted_x.masked_fill(sorted_x < kth, -math.inf)
        sorted_probs = sorted_x.softmax(dim=-1)
        # Mass strictly before each token; a token is kept while that is < p, which keeps exactly
        # the smallest prefix whose mass reaches p (the top token always, as its prefix mass is 0).
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # Rows without top-p get p = 2: rounding can push `before` to 1.0000001, never to 2.
        ps = [p.top_p if on else 2.0 for p, on in zip(params, p_on)]
        drop = before >= to_device(ps, torch.float32, device)[:, None]
        sorted_x = sorted_x.masked_fill(drop, -math.inf)
        x = torch.empty_like(x).scatter_(1, order, sorted_x)
    elif any(k_on):
        kmax = max(p.top_k for p, on in zip(params, k_on) if on)
        top_vals = x.topk(kmax, dim=-1).values  # [B, kmax]
        ks = [p.top_k if on else 1 for p, on in zip(params, k_on)]
        kth = top_vals.gather(1, to_device(ks, torch.int64, device)[:, None] - 1)
        kth = kth.masked_fill(~to_device(k_on, torch.bool, device)[:, None], -math.inf)
        x = x.masked_fill(x < kth, -math.inf)
    return x


def sampling_probs(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    history: TokenHistory | None = None,
    history_rows: Sequence[int | None] = (),
    bitmask: torch.Tensor | None = None,
) -> torch.Tensor:
    """FloatTensor[B, V]: the distribution ``sample`` draws each row from.

    Greedy rows are one-hot at the argmax of the adjusted logits.
    """
    adjusted = _adjusted_logits(logits, params, history, history_rows, bitmask)
    probs = _filtered_logits(adjusted, params).softmax(dim=-1)
    greedy = [p.greedy for p in params]
    if any(greedy):
        one_hot = torch.zeros_like(probs).scatter_(1, adjusted.argmax(dim=-1, keepdim=True), 1.0)
        is_greedy = to_device(greedy, torch.bool, logits.device)[:, None]
        probs = torch.where(is_greedy, one_hot, probs)
    return probs


def _exponential_race(
    probs: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """LongTensor[B]: one draw per row of ``probs`` [B, V].

    argmax(p_i / E_i) with i.i.d. E_i ~ Exp(1) picks i with probability p_i. Each seeded row's
    noise comes from its own generator, consuming exactly V draws per step, so its tokens depend
    only on its seed and its logits.
    """
    noise = torch.empty_like(probs)
    seeded = [
        i for i, (p, g) in enumerate(zip(params, generators)) if g is not None and not p.greedy
    ]
    if len(seeded) < len(params):
        noise.exponential_()
    for i in seeded:
        noise[i].exponential_(generator=generators[i])
    return probs.div_(noise.clamp_min_(_TINY)).argmax(dim=-1)


def _with_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, params: Sequence[SamplingParams]
) -> SampleResult:
    if all(p.logprobs is None for p in params):
        return SampleResult(token_ids)
    # Reported logprobs describe the model's distribution: before bias, penalties, grammar,
    # temperature, min-p, top-k and top-p (vLLM's default too).
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)
    vocab = logits.shape[1]
    num_top = tuple(min(p.logprobs or 0, vocab) for p in params)
    kmax = max(num_top)
    if kmax == 0:
        return SampleResult(token_ids, chosen, num_top=num_top)
    top = logprobs.topk(kmax, dim=-1)
    return SampleResult(token_ids, chosen, top.indices, top.values, num_top)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    history: TokenHistory | None = None,
    history_rows: Sequence[int | None] = (),
    bitmask: torch.Tensor | None = None,
) -> SampleResult:
    """Choose one token per row of ``logits`` [B, V] (any float dtype, CPU or CUDA).

    ``generators[i]`` is request i's ``make_generator`` result, or None to use the default RNG.
    ``history_rows[i]`` is row i's ``history`` row (needed where ``params[i].penalized``);
    ``bitmask`` (IntTensor[B, ceil(V / 32)] on the logits' device) allows each row's tokens.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    if len(params) != batch or len(generators) != batch:
        raise ValueError(
            f"{batch} logit rows but {len(params)} params and {len(generators)} generators"
        )
    adjusted = _adjusted_logits(logits, params, history, history_rows, bitmask)
    greedy = [p.greedy for p in params]
    if all(greedy):
        token_ids = adjusted.argmax(dim=-1)
    else:
        probs = _filtered_logits(adjusted, params).softmax(dim=-1)
        token_ids = _exponential_race(probs, params, generators)
        if any(greedy):
            is_greedy = to_device(greedy, torch.bool, logits.device)
            token_ids = torch.where(is_greedy, adjusted.argmax(dim=-1), token_ids)
    return _with_logprobs(logits, token_ids, params)
