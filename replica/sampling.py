"""The batched token sampler (the parameters it reads: ``replica.sampling_params``).

Shapes: ``B`` rows (one per sequence sampled this step), ``V`` vocabulary entries.

``sample(logits[B, V], params[B], generators[B]) -> SampleResult`` picks one token per row:

* all rows greedy  -> ``argmax`` (one kernel);
* otherwise        -> temperature, top-k and top-p applied with per-row parameter tensors, then one
  draw per row by the exponential race ``argmax(probs / E)``, ``E ~ Exponential(1)``, which samples
  exactly from ``probs``; rows with a seed draw ``E`` from their own ``torch.Generator``.

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


def _filtered_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """FloatTensor[B, V]: logits / temperature, with tokens cut by top-k / top-p set to -inf.

    Greedy rows are left at temperature 1 (their result is replaced by the argmax). Order follows
    the usual convention: temperature, then top-k, then top-p on the renormalised remainder.
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


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """FloatTensor[B, V]: the distribution ``sample`` draws each row from.

    Greedy rows are one-hot at the argmax of the raw logits.
    """
    probs = _filtered_logits(logits, params).softmax(dim=-1)
    greedy = [p.greedy for p in params]
    if any(greedy):
        one_hot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
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
    # Reported logprobs describe the model's distribution, not the temperature/top-k/top-p one.
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
) -> SampleResult:
    """Choose one token per row of ``logits`` [B, V] (any float dtype, CPU or CUDA).

    ``generators[i]`` is request i's ``make_generator`` result, or None to use the default RNG.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    if len(params) != batch or len(generators) != batch:
        raise ValueError(
            f"{batch} logit rows but {len(params)} params and {len(generators)} generators"
        )
    greedy = [p.greedy for p in params]
    if all(greedy):
        token_ids = logits.argmax(dim=-1)
    else:
        probs = _filtered_logits(logits, params).softmax(dim=-1)
        token_ids = _exponential_race(probs, params, generators)
        if any(greedy):
            is_greedy = to_device(greedy, torch.bool, logits.device)
            token_ids = torch.where(is_greedy, logits.argmax(dim=-1), token_ids)
    return _with_logprobs(logits, token_ids, params)
