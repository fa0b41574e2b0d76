"""How many slots the vAttention cache reserves: the running requests' and the released
conversations' it keeps.

A released request's KV stays mapped in its slot (deferred reclamation) and is the prefix cache:
its next turn continues there, another prompt over the same prefix aliases its pages. So the
cache keeps at most ``slots - running`` conversations, however much memory is free, where the
paged mode keeps blocks while memory lasts. With as many slots as running requests, a chat whose
conversations outnumber them (people think between turns) cycles every slot: a new conversation
has no empty slot to alias its system prompt into and takes over one that holds another
conversation's history over that prompt, evicting it (on the CPU host, 64 conversations of 4
turns over 16 running slots, 2026-12-08: 64,512 hit tokens against the paged mode's 86,016, 240
take-overs; with 64 slots, 81,392 and none, and the run 1.13x faster).

A slot costs virtual address space only (its range of every reservation), never memory until
pages are mapped under it. Rule, with the prefix cache on (without it a released slot keeps
nothing worth a slot)::

    slots = max(max_running, min(budget // (CONVERSATION_TOKENS * token_bytes),
                                 SLOTS_PER_RUNNING * max_running,
                                 MAX_VIRTUAL_BYTES // (tokens_per_slot * token_bytes),
                                 MAX_TOKEN_ROWS // tokens_per_slot))

the short conversations (``CONVERSATION_TOKENS``) the KV budget holds, at most
``SLOTS_PER_RUNNING`` times the running requests (a released slot is looked at when a request is
admitted), within ``MAX_VIRTUAL_BYTES`` of virtual ranges (an H100 reserved 1 TiB in 17 us,
``shared/notes/h100-probe.md``) and within the token rows attention kernels number in 32 bits.
Llama-3-8B on an H100 (~60 GiB of KV, 256 running, 4K tokens a slot): 1,024 slots in 512 GiB of
ranges; with 4 GiB of KV, max_running (it holds 128 short conversations).
"""

from __future__ import annotations

#: The conversation length by which the budget is counted in conversations (a short chat's).
CONVERSATION_TOKENS = 256
#: The most slots per running request.
SLOTS_PER_RUNNING = 4
#: The most virtual address space the cache's ranges take together (per process).
MAX_VIRTUAL_BYTES = 1 << 40
#: Token rows (slots * tokens a slot) attention kernels can number: int32 in FlashInfer's
#: (``replica.attention.flashinfer_limits.MAX_ROWS``, which refuses a cache beyond it).
MAX_TOKEN_ROWS = (1 << 31) - 1


def cache_slots(
    requested: int | None,
    max_running: int,
    prefix_cache: bool,
    budget_bytes: int,
    token_bytes: int,
    tokens_per_slot: int,
) -> int:
    """The slots of a vAttention cache: ``requested`` where given (at least ``max_running``,
    else ValueError), else the module docstring's rule. ``token_bytes``: one token's K and V of
    every layer on this rank."""
    if requested is not None:
        if requested < max_running:
            raise ValueError(
                f"kv_slots ({requested}) must be at least max_running ({max_running}): "
                "every running request needs a slot"
            )
        return requested
    if not prefix_cache:
        return max_running
    by_memory = budget_bytes // (CONVERSATION_TOKENS * token_bytes)
    by_address = MAX_VIRTUAL_BYTES // (tokens_per_slot * token_bytes)
    by_rows = MAX_TOKEN_ROWS // tokens_per_slot
    return max(max_running, min(by_memory, SLOTS_PER_RUNNING * max_running, by_address, by_rows))
