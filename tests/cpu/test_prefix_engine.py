"""Prefix sharing end to end on the tiny model: multi-turn conversations over a shared system
prompt give the same tokens with the prefix cache on and off (greedy and seeded sampling, both KV
modes, both layouts, with preemption), while the cache skips the prompt tokens it holds."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from replica import LLM, EngineConfig, LLMEngine, SamplingParams
from replica.attention import StepBatch
from replica.kv.base import KVCache
from replica.kv.paged import PagedKVCache
from replica.model import ModelConfig
from replica.request import Request, RequestStatus
from tests.models import tiny_llm

SYSTEM = [(7 * i) % 120 + 3 for i in range(40)]  # a shared system prompt
QUESTIONS = [[11, 12, 13], [21, 22], [31, 32, 33, 34], [41]]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)


def chat(llm: LLM, params: SamplingParams, turns: int = 3) -> tuple[list[list[int]], int]:
    """``turns`` turns of one conversation per question, each turn's prompt the whole history
    and a new message; returns every answer and the prompt tokens found cached."""
    histories = [[*SYSTEM, *question] for question in QUESTIONS]
    answers, cached = [], 0
    for turn in range(turns):
        completions = llm.generate(histories, params)
        for history, completion in zip(histories, completions):
            answers.append(list(completion.token_ids))
            cached += completion.cached_tokens
            history += [*completion.token_ids, 50 + turn, 51 + turn]
    return answers, cached


@pytest.mark.parametrize(
    "config",
    [
        {"kv_layout": "interleaved"},
        {"kv_layout": "per_layer"},
        {"kv_mode": "paged"},
        # A cache too small for every conversation at once: preemption and eviction.
        {"kv_layout": "interleaved", "kv_cache_bytes": 24 * 4096, "eager_pages": 0},
        # The budget mapped under the empty slots at start (the GPU default): hits copied.
        {"kv_layout": "per_layer", "kv_premap": True},
        # A cache pressed harder, with a host tier: evicted turns come back from host memory.
        {
            "kv_layout": "interleaved",
            "kv_cache_bytes": 14 * 4096,
            "eager_pages": 0,
            "kv_offload_bytes": 1 << 20,
        },
        {"kv_mode": "paged", "kv_cache_bytes": 14 * 4096, "kv_offload_bytes": 1 << 20},
        # Hits read from their holder's slot until their own aliases map (replica.kv.borrows).
        {"kv_layout": "interleaved", "prefix_borrow": True},
        {"kv_layout": "per_layer", "prefix_borrow": True},
        {
            "kv_layout": "interleaved",
            "kv_cache_bytes": 14 * 4096,
            "eager_pages": 0,
            "kv_offload_bytes": 1 << 20,
            "prefix_borrow": True,
        },
    ],
    ids=[
        "interleaved",
        "per_layer",
        "paged",
        "pressed",
        "premapped",
        "tiered",
        "paged-tiered",
        "borrowed",
        "borrowed-per_layer",
        "borrowed-tiered",
    ],
)
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_outputs_are_identical_with_the_prefix_cache_on_and_off(
    tiny_dir: Path, config: dict[str, object], params: SamplingParams
) -> None:
    off, cached_off = chat(tiny_llm(tiny_dir, prefix_cache=False, **config), params)
    on_llm = tiny_llm(tiny_dir, prefix_cache=True, **config)
    on, cached_on = chat(on_llm, params)
    assert on == off
    assert cached_off == 0 and cached_on > 0
    stats = on_llm.engine.stats().kv
    assert stats.prefix_hits_tokens >= cached_on
    assert stats.slots_running == 0 and stats.pages_in_use == 0
    if config.get("kv_premap"):
        assert stats.prefix_copied_bytes > 0  # hits landed in premapped pages
    if config.get("kv_offload_bytes"):
        assert stats.host_restored_bytes > 0 and stats.prefix_host_hits_tokens > 0
    if config.get("prefix_borrow"):
        assert stats.prefix_borrows > 0  # hits were read from their holder's slot
    on_llm.engine.kv.check_invariants(deep=True)


TIERED = {"kv_cache_bytes": 14 * 4096, "kv_offload_bytes": 1 << 20}


def scribble(kv: KVCache, located: Sequence[tuple[int, int]], start: int, count: int) -> None:
    """Wrong K/V (finite: masked rows must stay harmless) where a restore copies blocks
    ``start .. start + count`` of ``located``: what a copy that failed half-way leaves."""
    block = kv.prefix_block_tokens
    for layer in range(kv.config.num_layers):  # type: ignore[attr-defined]
        for tensor in (kv.k_cache(layer), kv.v_cache(layer)):
            for row, index in located[start : start + count]:
                if isinstance(kv, PagedKVCache):  # (0, block id)
                    tensor[index].fill_(100.0)
                else:  # (slot, block index in it)
                    tensor[row, index * block : (index + 1) * block].fill_(100.0)


@pytest.mark.parametrize(
    "config",
    [{**TIERED, "kv_layout": "interleaved", "eager_pages": 0}, {**TIERED, "kv_mode": "paged"}],
    ids=["vattention", "paged"],
)
@pytest.mark.parametrize("direction", ["restore", "offload"])
def test_a_failed_host_copy_costs_compute_never_tokens(
    tiny_dir: Path, config: dict[str, object], direction: str
) -> None:
    """Every other host-tier copy in ``direction`` raises, as torch does on a CUDA error; a
    failing restore first writes wrong K/V into its blocks (a copy that failed half-way). The
    requests whose restore failed (the vAttention cache's: at their first waited ensure, deferred)
    compute those blocks, a failed offload's blocks never come back, and every answer is the
    tier-off engine's; no request fails, the books hold."""
    off, _ = chat(tiny_llm(tiny_dir, prefix_cache=False, **config), GREEDY)
    llm = tiny_llm(tiny_dir, prefix_cache=True, **config)
    kv, faults = llm.engine.kv, llm.engine.kv.tier_faults
    assert faults is not None
    copies: list[bool] = []  # each copy in ``direction``: whether it raised
    restore = faults.tier.restore

    def inject(copy: str) -> None:
        if copy == direction == "offload":
            copies.append(len(copies) % 2 == 0)
            if copies[-1]:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def half_done(
        keys: Sequence[int],
        located: Sequence[tuple[int, int]],
        start: int,
        count: int,
        *stops: Iterable[int],
    ) -> None:
        restore(keys, located, start, count, *stops)
        copies.append(len(copies) % 2 == 0)
        if copies[-1]:
            scribble(kv, located, start, count)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    faults.inject = inject
    if direction == "restore":
        faults.tier.restore = half_done  # type: ignore[method-assign]
    on, cached = chat(llm, GREEDY)
    assert on == off and cached > 0
    assert faults.faults_total == sum(copies) > 0
    stats = kv.stats()
    assert stats.slots_running == 0
    if direction == "restore":  # the copies that went through restored their blocks
        assert stats.host_restored_bytes > 0 and len(copies) > 1
        # The vAttention cache's deferred copy failed inside a waited ensure: the scheduler
        # lowered the request's computed tokens to what its slot kept.
        failures = llm.engine.scheduler.restore_failures_total
        assert failures == (0 if config.get("kv_mode") == "paged" else sum(copies))
    kv.check_invariants(deep=True)


def test_later_turns_skip_their_history_and_the_system_prompt_is_shared(tiny_dir: Path) -> None:
    llm = tiny_llm(tiny_dir, prefix_cache=True)
    per_group = llm.engine.kv.config.tokens_per_group  # 8 tokens a page (interleaved)
    block = llm.engine.kv.prefix_block_tokens  # 16: a prefix block spans two pages here
    histories = [[*SYSTEM, *question] for question in QUESTIONS]
    first = llm.generate(histories[:1], GREEDY)[0]
    assert first.cached_tokens == 0
    # The others start like the first: the system prompt's whole blocks, their pages aliased.
    others = llm.generate(histories[1:], GREEDY)
    shared = len(SYSTEM) // block * block
    assert all(c.cached_tokens == shared for c in others)
    history = [*histories[0], *first.token_ids, 50, 51]
    second = llm.generate([history], GREEDY)[0]
    # The next turn finds the whole first turn but its last, partial block.
    stored = len(histories[0]) + len(first.token_ids) - 1  # the last token was never fed
    assert second.cached_tokens == stored // block * block
    # One physical copy of the system prompt's pages, mapped under every conversation's slot.
    assert llm.engine.stats().kv.pages_shared == shared // per_group
    # What the router reads: the summary predicts the next turn's hit.
    from replica.kv.prefix import expected_hit_tokens

    routing = llm.engine.routing_stats()
    assert routing.prefix_tokens_per_block == block and routing.prefix_keys
    keys = frozenset(routing.prefix_keys)
    assert expected_hit_tokens(history, routing.prefix_root, block, keys) >= len(SYSTEM) // 2


def test_a_model_whose_tokens_no_2mib_page_divides_shares_prefixes_on_the_cpu_by_default() -> None:
    """SmolLM2-135M's shape (30 layers, 3 KV heads of 64): a 46,080-byte token in float32, which
    no 2 MiB page holds whole. With no page size configured the host page becomes 44 tokens;
    prefix blocks are 16 tokens whatever the page, so the second prompt finds six of them."""
    shape = dataclasses.replace(
        ModelConfig.tiny(), hidden_size=192, num_layers=30, num_heads=3, num_kv_heads=3, head_dim=64
    )
    engine = LLMEngine(
        EngineConfig(
            model="synthetic",
            synthetic=shape,
            max_model_len=256,
            max_running=4,
            kv_cache_bytes=64 << 20,
            device="cpu",
        )
    )
    assert engine.kv.config.page_size == 2_027_520 and engine.kv.config.tokens_per_group == 44
    prompt = [(5 * i) % 250 + 3 for i in range(100)]  # six whole 16-token blocks and 4 tokens
    for request_id, tokens in (("first", prompt), ("second", [*prompt[:-1], 9])):
        engine.add_request(request_id, tokens, GREEDY)
        while engine.has_work():
            engine.step()
    assert engine.stats().kv.prefix_hits_tokens == 96


def test_openai_usage_reports_the_cached_prompt_tokens() -> None:
    """``usage.prompt_tokens_details.cached_tokens`` in a reply and a stream's usage chunk, in the
    shapes of the ``openai`` package's types."""
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    from cluster.openai.responses import chat_choice, reply_body, usage_chunk

    choice = chat_choice(0, "hi", "stop")
    body = reply_body("chatcmpl-1", "m", True, [choice], 40, 3, 32)
    usage = ChatCompletion.model_validate_json(body.to_json()).usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens) == (40, 32)
    chunk = ChatCompletionChunk.model_validate_json(
        usage_chunk("chatcmpl-1", "m", True, 40, 3, 32).to_json()
    )
    assert chunk.usage is not None and chunk.usage.prompt_tokens_details is not None
    assert chunk.usage.prompt_tokens_details.cached_tokens == 32


@pytest.mark.parametrize(
    "config",
    [{"kv_layout": "interleaved"}, {"kv_mode": "paged"}, {"async_scheduling": False}],
    ids=["interleaved", "paged", "sync"],
)
def test_requests_arriving_together_compute_a_shared_prefix_once(
    tiny_dir: Path, config: dict[str, object]
) -> None:
    """Four prompts over one uncached system prompt, in the same step: the first computes it, the
    others are held until its pages are indexed and then find them (same tokens as cache off)."""
    histories = [[*SYSTEM, *question] for question in QUESTIONS]
    off = tiny_llm(tiny_dir, prefix_cache=False, **config).generate(histories, GREEDY)
    llm = tiny_llm(tiny_dir, prefix_cache=True, **config)
    block = llm.engine.kv.prefix_block_tokens
    on = llm.generate(histories, GREEDY)
    assert [c.token_ids for c in on] == [c.token_ids for c in off]
    assert [c.cached_tokens for c in on] == [0] + [len(SYSTEM) // block * block] * 3
    assert llm.engine.scheduler.prefix_holds_total >= 3
    llm.engine.kv.check_invariants(deep=True)


def _prefilling_pair(tiny_dir: Path) -> tuple[LLMEngine, Request, Request, Request]:
    """A synchronous engine with 16-token steps, after one step of: ``a`` prefilling the system
    prompt, ``b`` sharing it (held), ``c`` sharing nothing (admitted past ``b``)."""
    engine = tiny_llm(tiny_dir, prefix_cache=True, max_batch_tokens=16, async_scheduling=False)
    engine = engine.engine
    engine.add_request("a", [*SYSTEM, 11, 12, 13], GREEDY)
    engine.add_request("b", [*SYSTEM, 21, 22], GREEDY)
    engine.add_request("c", [99, *SYSTEM[:5]], GREEDY)
    engine.step()
    a, b, c = (engine.requests[r] for r in "abc")
    return engine, a, b, c


def test_a_held_request_waits_one_prefill_of_the_request_computing_its_prefix(
    tiny_dir: Path,
) -> None:
    engine, a, b, c = _prefilling_pair(tiny_dir)
    assert a.status is RequestStatus.RUNNING and c.status is RequestStatus.RUNNING
    assert b.status is RequestStatus.WAITING  # held, and c was admitted behind it
    shared = len(SYSTEM) // engine.kv.prefix_block_tokens * engine.kv.prefix_block_tokens
    while a.computed < len(a.prompt_token_ids):
        assert b.status is RequestStatus.WAITING
        engine.step()
    engine.step()  # the step after a's prefill admits b
    assert b.status is RequestStatus.RUNNING and b.cached_tokens == shared


def test_a_hold_ends_when_the_request_computing_the_prefix_is_aborted(tiny_dir: Path) -> None:
    engine, a, b, _ = _prefilling_pair(tiny_dir)
    assert b.status is RequestStatus.WAITING and 0 < a.computed < len(SYSTEM)
    written = a.computed // engine.kv.prefix_block_tokens * engine.kv.prefix_block_tokens
    engine.abort("a")
    engine.step()
    assert b.status is RequestStatus.RUNNING
    assert b.cached_tokens == written  # the blocks a wrote before it left
    while engine.has_work():
        engine.step()
    engine.kv.check_invariants(deep=True)


def test_a_preempted_producer_readmitted_first_holds_again_for_one_prefill(tiny_dir: Path) -> None:
    """Preempted, ``a`` heads the queue: re-admitted first, it finds its own written blocks and
    computes the rest, and ``b``, held meanwhile, is admitted the step after and finds them all."""
    engine, a, b, _ = _prefilling_pair(tiny_dir)
    engine.scheduler.preempt(a)
    assert a.status is RequestStatus.WAITING
    engine.step()
    assert a.status is RequestStatus.RUNNING and b.status is RequestStatus.WAITING
    while a.computed < len(a.prompt_token_ids):
        assert b.status is RequestStatus.WAITING
        engine.step()
    engine.step()
    block = engine.kv.prefix_block_tokens
    assert b.status is RequestStatus.RUNNING and b.cached_tokens == len(SYSTEM) // block * block
    while engine.has_work():
        engine.step()
    engine.kv.check_invariants(deep=True)


@pytest.mark.parametrize("config", [{}, {"kv_mode": "paged"}], ids=["vattention", "paged"])
def test_a_prefix_running_requests_share_is_committed_once(
    tiny_dir: Path, config: dict[str, object]
) -> None:
    """The router's ``committed_pages``: two running requests aliasing one cached system prompt
    promise its pages once, not once each (else a replica holding a popular prefix looks full)."""
    llm = tiny_llm(tiny_dir, prefix_cache=True, async_scheduling=False, **config)
    engine = llm.engine
    llm.generate([[*SYSTEM, 9]], GREEDY)  # caches the system prompt
    for i, question in enumerate(QUESTIONS[:2]):
        engine.add_request(f"q{i}", [*SYSTEM, *question], GREEDY)
    engine.step()
    running = engine.scheduler.running
    assert len(running) == 2 and all(r.cached_tokens > 0 for r in running)
    pages = engine.kv.pages_for
    shared = pages(running[0].cached_tokens)
    each = sum(pages(r.max_total_tokens) for r in running)
    assert engine.scheduler.committed_pages() == each - shared


def test_a_burst_reads_the_shared_prompt_from_its_holder_before_its_aliases_map(
    tiny_dir: Path,
) -> None:
    """Conversations arriving together over one system prompt: the ones held for its prefill run
    their first step with the prompt read from the holder's slot while their own pages there are
    still unmapped (so nothing else could have been read), and answer as with sharing off."""
    llm = tiny_llm(tiny_dir, prefix_cache=True, prefix_borrow=True, kv_layout="interleaved")
    runner = llm.engine.runner
    kv, attention, plan = runner.kv, runner.attention, runner.attention.plan
    seen: list[tuple[int, int, list[int]]] = []  # (borrower, borrowed keys, its own page ids)

    def recording_plan(batch: StepBatch) -> None:
        per_slot = kv.config.pages_per_slot  # type: ignore[attr-defined]
        mapped = kv.reservations[0].page_ids()  # type: ignore[attr-defined]
        for slot, (_, keys) in zip(batch.slots, batch.borrows):
            if keys:
                pages = keys // kv.config.tokens_per_group  # type: ignore[attr-defined]
                seen.append((slot, keys, mapped[slot * per_slot : slot * per_slot + pages]))
        plan(batch)

    attention.plan = recording_plan  # type: ignore[method-assign]
    prompts = [[*SYSTEM, *question] for question in QUESTIONS]
    on = [c.token_ids for c in llm.generate(prompts, GREEDY)]
    off = [c.token_ids for c in tiny_llm(tiny_dir, prefix_cache=False).generate(prompts, GREEDY)]
    assert on == off
    assert any(all(page < 0 for page in own) for _, _, own in seen), seen
    assert {slot for slot, _, _ in seen} and all(keys >= 16 for _, keys, _ in seen)
    assert llm.engine.stats().kv.prefix_borrows == len(QUESTIONS) - 1
