"""The warm-up traffic that has an engine capture its decode CUDA graphs before it serves
(``LLMEngine.warm_up``): for every batch size, and every variant of its attention plan
(``AttentionBackend.warm_up_shapes``), that many throw-away requests decode two tokens, half
greedy and half sampled with logprobs (so the sampler's kernels are loaded too: CUDA loads a
kernel's code into device memory at its first launch). It uses the engine's public calls only, as
any client does, and leaves the KV cache as empty as it found it (``KVCache.shrink``): its slots,
released with a few pages mapped, would otherwise be every slot the first requests could take, and
a prefix hit landing in a slot that maps pages is copied into them rather than aliased (the
per-layer layout copied each request's whole first 1,024-token group: private copies that decode
reads one by one where aliases are read once; H100, ``prefix_burst``, 2026-12-08)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from replica.sampling_params import SamplingParams

if TYPE_CHECKING:
    from replica.engine import LLMEngine

GREEDY = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


def sampled(seed: int) -> SamplingParams:
    """A warm-up request that takes every sampling path: top-k, top-p, a seed and logprobs."""
    return SamplingParams(
        max_tokens=3, temperature=0.8, top_k=50, top_p=0.9, seed=seed, logprobs=2, ignore_eos=True
    )


def decode_every_graph(engine: LLMEngine, sizes: Sequence[int]) -> None:
    """Runs the warm-up requests of every graph size (and attention variant) to their end."""
    bos = engine.model_config.bos_token_id
    token = bos if bos is not None and bos < engine.model_config.vocab_size else 0
    # Every graph variant of each size: e.g. FlashInfer sees small pages at long context.
    sizes = [size for size in sizes if size <= engine.scheduler.max_running]
    shapes = engine.runner.attention.warm_up_shapes(sizes, engine.context_limit - GREEDY.max_tokens)
    for size, kv_len in shapes:
        # The first sequence has kv_len keys, the others few (uneven lengths, as in traffic).
        prompts = [[token] * max(kv_len, 2)] + [[token] * 2] * (size - 1)
        pages = sum(engine.kv.pages_for(len(p) + GREEDY.max_tokens) for p in prompts)
        if pages > engine.kv.budget_pages:
            continue  # a cache this small never runs such a batch
        for i in range(size):
            params = GREEDY if i % 2 == 0 else sampled(i)
            engine.add_request(f"vattn-warm-up-{kv_len}-{size}-{i}", prompts[i], params)
        while engine.has_work():
            engine.step()
    engine.kv.shrink()  # nor is what they cached: every slot empty, as in a new engine
