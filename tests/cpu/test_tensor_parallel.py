"""Tensor parallelism on CPU: a replica of 2 (or 3) gloo ranks, rank 0 in the test process.

Checks: tp=2 gives the same greedy tokens as tp=1 and as transformers, with and without
preemption; every rank's KV books stay identical (the page plan replays exactly); impossible tp
sizes are refused before anything starts; a rank failing before the model fails only that step's
requests, one failing inside the model breaks the replica without hanging rank 0; a host-tier copy
failing on rank 0 fails alike on every rank (the requests compute the blocks), an offload failing on
another rank only leaves every rank's tier, a restore failing there only breaks the replica.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from replica import (
    LLM,
    KVCacheAllocator,
    KVCacheConfig,
    KVCacheOutOfMemory,
    LLMEngine,
    SamplingParams,
    open_device,
)
from replica.errors import ReplicaBroken
from replica.kv.base import KVRestoreFailed
from replica.kv.recording import RecordingKVCache, ReplayMismatch, replay
from replica.kv.tier_faults import TierFaults
from replica.request import RequestOutput
from replica.tp import check_tensor_parallel
from replica.tp.plan import books
from tests.cpu.test_engine import PROMPTS, hf_greedy
from tests.models import SMALL_KV

GREEDY = SamplingParams(max_tokens=12, temperature=0)
LONG = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


@pytest.fixture(autouse=True)
def one_thread_per_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Ranks share 2 cores: one torch thread each (rank 0 included), a bounded collective
    timeout."""
    monkeypatch.setenv("VATTN_TP_TIMEOUT_S", "30")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    assert not dist.is_initialized(), "a test left its tensor-parallel group running"


@contextmanager
def llm(model: str, **config: object) -> Iterator[LLM]:
    engine = LLM(model, **config)
    try:
        yield engine
    finally:
        engine.shutdown()


def run(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, prefix: str = "r"
) -> dict[str, list[RequestOutput]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{prefix}{i}", prompt, params)
    outputs: dict[str, list[RequestOutput]] = defaultdict(list)
    while engine.has_work():
        for output in engine.step():
            outputs[output.request_id].append(output)
    return outputs


def tokens(outputs: dict[str, list[RequestOutput]]) -> list[list[int]]:
    return [[t for o in outputs[k] for t in o.token_ids] for k in sorted(outputs)]


def assert_books_agree(engine: LLMEngine) -> None:
    """Every rank's pages equal rank 0's once the pending releases have been replayed."""
    assert engine.tp is not None
    engine.tp.sync()
    assert set(engine.tp.rank_pages.values()) == {engine.kv.reclaimable_pages()}
    engine.kv.check_invariants(deep=True)


# ---- the page plan, without processes ------------------------------------------------------------
def make_allocator(
    budget_pages: int = 24, prefix_cache: bool = False, host_tier_bytes: int = 0
) -> KVCacheAllocator:
    config = KVCacheConfig(
        num_layers=2,
        num_kv_heads=1,
        head_dim=64,
        dtype=torch.float32,
        max_slots=6,
        max_tokens=8 * 16,
        page_size=4096,
        budget_bytes=budget_pages * 4096,
        eager_pages=1,
        prefix_cache=prefix_cache,
        host_tier_bytes=host_tier_bytes,
    )
    return KVCacheAllocator(config, open_device("host", 4096))


@pytest.mark.parametrize("cache", ["off", "prefix", "tiered", "faulty", "borrowed"])
def test_replaying_the_page_plan_reproduces_the_books(cache: str) -> None:
    """With the prefix cache, prompts share starts, and both ranks book the same steps (which
    index the prompts' pages): every rank aliases, copies and takes over the same pages, and with
    a host tier writes through and restores the same blocks; with rank 0's tier copies failing
    at random (``faulty``) every rank takes the same fallbacks; with borrowed reads every rank
    starts the same borrows and ends those rank 0's timing ended."""
    rng = random.Random(7)
    prefix_cache = cache != "off"
    tier = (64 << 10) if cache in ("tiered", "faulty") else 0
    leader, follower = (
        make_allocator(prefix_cache=prefix_cache, host_tier_bytes=tier),
        make_allocator(prefix_cache=prefix_cache, host_tier_bytes=tier),
    )
    if cache == "faulty":
        faults_of(leader).inject = failing_at_random(random.Random(3), 0.3)
    if cache == "borrowed":
        assert leader.enable_borrowed_reads() and follower.enable_borrowed_reads()
    recorder = RecordingKVCache(leader)
    ended = 0  # borrows rank 0 ended (their aliases mapped there), replayed on the follower
    running: list[int] = []
    prompts: dict[int, list[int]] = {}
    stems = [[rng.randrange(3) for _ in range(100)] for _ in range(3)]
    for step in range(400):
        choice = rng.random()
        try:
            if choice < 0.3 and len(running) < 6:
                prompt = rng.choice(stems)[: rng.randrange(1, 100)] + [7]
                slot = recorder.acquire(rng.randrange(1, 128), prompt)
                running.append(slot)
                prompts[slot] = prompt
                recorder.ensure(slot, len(prompt))
            elif choice < 0.7 and running:
                slot = rng.choice(running)
                recorder.ensure(slot, min(128, leader.length(slot) + rng.randrange(1, 40)))
            elif choice < 0.95 and running:
                slot = running.pop(rng.randrange(len(running)))
                recorder.release(slot, prompts[slot][: leader.length(slot)])
            else:
                recorder.shrink()
        except (KVCacheOutOfMemory, KVRestoreFailed):
            pass  # a failed deferred restore: the slot runs on, its ensure complete
        if step % 17 == 0:  # a "step": the follower catches up, both runners book it
            ended += len(recorder.end_borrows())  # a schedule's first call
            replay(follower, recorder.drain())
            assert books(follower) == books(leader)
            assert follower.borrowed_reads() == leader.borrowed_reads()
            lengths = {  # a slot whose restore waits for its waited ensure is in no step
                s: leader.length(s)
                for s in running
                if leader.length(s) < 128 and not leader.restoring_tokens(s)
            }
            unbacked = leader.wait(leader.step_async(lengths))
            assert follower.wait(follower.step_async(lengths)) == unbacked
            for slot in unbacked:  # preempted, as the scheduler does
                running.remove(slot)
                recorder.release(slot, prompts[slot][: leader.length(slot)])
            if cache == "borrowed":  # the next schedule, once this step's late runs mapped
                leader.wait(leader._maps.last_ticket)
                ended += len(recorder.end_borrows())
    replay(follower, recorder.drain())
    assert list(follower.slot_states()) == list(leader.slot_states())
    assert [follower.length(s) for s in running] == [leader.length(s) for s in running]
    assert follower.reclaimable_pages() == leader.reclaimable_pages()
    assert books(follower) == books(leader)
    assert not prefix_cache or leader.stats().prefix_hits_tokens > 0
    # Copy, alias and take-over decisions follow the books alone: every rank makes the same ones.
    lead, follow = leader.stats(), follower.stats()
    assert not prefix_cache or lead.prefix_copied_bytes + lead.prefix_takeovers > 0
    assert (follow.prefix_copied_bytes, follow.prefix_takeovers) == (
        lead.prefix_copied_bytes,
        lead.prefix_takeovers,
    )
    assert not tier or lead.host_restored_bytes > 0
    assert (follow.host_offloaded_bytes, follow.host_restored_bytes) == (
        lead.host_offloaded_bytes,
        lead.host_restored_bytes,
    )
    assert follow.host_tier_used_bytes == lead.host_tier_used_bytes
    assert follow.prefix_borrows == lead.prefix_borrows
    assert (cache == "borrowed") == (lead.prefix_borrows > 0) == (ended > 0)
    if cache == "faulty":  # rank 0's faults were mirrored, none of the follower's own
        assert faults_of(leader).faults_total > 0 == faults_of(follower).faults_total
    follower.check_invariants(deep=True)


def faults_of(allocator: KVCacheAllocator) -> TierFaults:
    assert allocator.tier_faults is not None
    return allocator.tier_faults


def failing_at_random(rng: random.Random, chance: float) -> Callable[[str], None]:
    def inject(direction: str) -> None:
        if rng.random() < chance:
            raise RuntimeError(f"injected {direction} fault")

    return inject


def failing(direction: str) -> Callable[[str], None]:
    def inject(copy: str) -> None:
        if copy == direction:
            raise RuntimeError(f"CUDA error: injected {direction} fault")

    return inject


def written_through(recorder: RecordingKVCache, prompt: list[int]) -> None:
    """A request over ``prompt`` that ends: its full blocks are written through to the tier."""
    slot = recorder.acquire(len(prompt), prompt)
    recorder.ensure(slot, len(prompt))
    recorder.release(slot, prompt)


def evict_device(recorder: RecordingKVCache) -> None:
    """A request that grows into every page (reclaiming every released slot's), then ends."""
    slot = recorder.acquire(96, [99] * 96)
    recorder.ensure(slot, 96)
    recorder.release(slot, [])


HISTORY = list(range(37))  # two full 16-token blocks
TURN = [*HISTORY, 1]


def tiered_pair() -> tuple[KVCacheAllocator, KVCacheAllocator, RecordingKVCache]:
    """Rank 0 (recorded) and a follower with the same books, each tier holding HISTORY's two
    blocks and neither device any of it."""
    leader, follower = (make_allocator(prefix_cache=True, host_tier_bytes=64 << 10) for _ in "ab")
    recorder = RecordingKVCache(leader)
    written_through(recorder, HISTORY)
    evict_device(recorder)
    assert replay(follower, recorder.drain()) == ()
    assert leader.cached_tokens(TURN) == 0 and len(faults_of(follower).tier) == 2
    return leader, follower, recorder


def test_a_restore_failing_on_rank_0_fails_alike_on_every_rank() -> None:
    leader, follower, recorder = tiered_pair()
    faults_of(leader).inject = failing("restore")
    slot = recorder.acquire(len(TURN), TURN)
    with pytest.raises(KVRestoreFailed) as raised:  # the deferred restore copies here
        recorder.ensure(slot, len(TURN))
    assert raised.value.kept_tokens == 0  # computed, not restored
    calls = recorder.drain()
    assert [c.op for c in calls[-2:]] == ["acquire", "ensure"] and not calls[-2].tier_faults
    assert [f.direction for f in calls[-1].tier_faults] == ["restore"]
    assert len(calls[-1].tier_faults[0].keys) == 2
    assert replay(follower, calls) == ()  # it failed the same copy: the same slot and length
    assert follower.length(slot) == len(TURN) and books(follower) == books(leader)
    for rank in (leader, follower):
        assert len(faults_of(rank).tier) == 0 and rank.cached_tokens(TURN) == 0
        rank.check_invariants(deep=True)
    assert faults_of(follower).faults_total == 0  # mirrored, not its own


def test_an_offload_failing_on_rank_0_fails_alike_on_every_rank() -> None:
    leader, follower, recorder = tiered_pair()
    faults_of(leader).inject = failing("offload")
    written_through(recorder, [5] * 37)
    calls = recorder.drain()
    assert [(f.direction, len(f.keys)) for f in calls[-1].tier_faults] == [("offload", 2)]
    assert replay(follower, calls) == ()
    assert [len(faults_of(rank).tier) for rank in (leader, follower)] == [2, 2]  # HISTORY's
    assert books(follower) == books(leader)
    follower.check_invariants(deep=True)


def test_an_offload_failing_on_another_rank_leaves_every_ranks_tier() -> None:
    """The follower's own failed offload: its keys stay booked (its tier makes rank 0's choices)
    but in doubt, replay reports them, and rank 0's drop takes them out of every tier."""
    leader, follower, recorder = tiered_pair()
    faults_of(follower).inject = failing("offload")
    written_through(recorder, [5] * 37)
    dropped = replay(follower, recorder.drain())
    assert len(dropped) == 2 and faults_of(follower).faults_total == 1
    assert len(faults_of(follower).tier) == len(faults_of(leader).tier) == 4
    recorder.drop_host_blocks(dropped)  # what the driver does with the rank's status
    assert replay(follower, recorder.drain()) == ()
    assert [len(faults_of(rank).tier) for rank in (leader, follower)] == [2, 2]
    faults_of(follower).inject = lambda copy: None
    evict_device(recorder)
    slot = recorder.acquire(38, [5] * 38)  # the dropped blocks come back on no rank
    assert leader.length(slot) == 0
    replay(follower, recorder.drain())
    assert books(follower) == books(leader)
    follower.check_invariants(deep=True)


@pytest.mark.parametrize("cause", ["restore", "offload"])
def test_a_restore_failing_on_another_rank_only_is_a_mismatch(cause: str) -> None:
    """The follower's restore fails where rank 0's did not (its copy raised, or would read
    blocks whose offload failed there): its blocks would differ from rank 0's, so the replay
    raises (the rank is broken) rather than let it compute with them."""
    leader, follower, recorder = tiered_pair()
    if cause == "offload":
        faults_of(follower).inject = failing("offload")
        written_through(recorder, [5] * 37)
        evict_device(recorder)
        slot = recorder.acquire(38, [5] * 38)  # rank 0 restores what the follower holds in doubt
        recorder.ensure(slot, 38)  # the copy
    else:
        faults_of(follower).inject = failing("restore")
        slot = recorder.acquire(len(TURN), TURN)
        recorder.ensure(slot, len(TURN))
    with pytest.raises(ReplayMismatch, match="this rank's host-tier restore failed"):
        replay(follower, recorder.drain())


def test_replay_detects_divergence_and_unrecorded_calls() -> None:
    leader = make_allocator()
    recorder = RecordingKVCache(leader)
    recorder.acquire(16)
    diverged = make_allocator()
    diverged.acquire(16)  # this rank already holds slot 0
    with pytest.raises(ReplayMismatch, match="gave slot 1 with 0 cached tokens, rank 0 got slot 0"):
        replay(diverged, recorder.drain())
    slot = recorder.acquire(16)
    with pytest.raises(KVCacheOutOfMemory):
        recorder.ensure(slot, 128)  # 8 tokens a page: 16 groups x 2 ranges > 24 pages
    bigger = make_allocator(budget_pages=400)
    bigger.acquire(16)  # the same books as rank 0 before these calls, but a larger budget
    with pytest.raises(ReplayMismatch, match="ran out of memory on rank 0 only"):
        replay(bigger, recorder.drain())
    recorder.step_async({slot: 0})  # every rank's runner makes this call itself: not recorded
    assert recorder.drain() == ()


def test_impossible_tp_sizes_are_refused_up_front() -> None:
    with pytest.raises(
        ValueError,
        match=r"tensor_parallel_size=2 does not divide the model's 3 KV heads.*valid sizes: 1, 3",
    ):
        LLM("embedded", tp=2)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 exceeds the model's 3 KV heads"):
        LLM("embedded", tp=4)
    from replica.model import ModelConfig

    check_tensor_parallel(ModelConfig.llama3_8b(), 8)
    with pytest.raises(ValueError, match="tensor_parallel_size must be positive|must be >= 1"):
        LLM("embedded", tp=0)
    assert not dist.is_initialized()


# ---- whole replicas ------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_mode", ["vattention", "paged"])
def test_tp2_greedy_matches_tp1_and_transformers(tiny_dir: Path, kv_mode: str) -> None:
    expected = hf_greedy(tiny_dir, PROMPTS, GREEDY.max_tokens)
    with llm(str(tiny_dir), **SMALL_KV) as single:
        one = [list(o.token_ids) for o in single.generate(PROMPTS, GREEDY)]
    with llm(str(tiny_dir), tp=2, kv_mode=kv_mode, **SMALL_KV) as pair:
        engine = pair.engine
        assert engine.runner.kv.config.num_kv_heads == 1  # rank 0 holds half of the 2 KV heads
        two = [list(o.token_ids) for o in pair.generate(PROMPTS, GREEDY)]
        assert_books_agree(engine)
        assert engine.stats().kv.pages_available == engine.tp.min_available_pages_over_ranks() > 0  # type: ignore[union-attr]
    assert two == one == expected


@pytest.mark.parametrize("kv_mode", ["vattention", "paged", "borrowed"])
def test_tp2_prefix_sharing_aliases_alike_on_every_rank(tiny_dir: Path, kv_mode: str) -> None:
    """Multi-turn chat over a shared system prompt: tp=2 with the prefix cache gives tp=1's tokens
    without it, and both ranks' books (shared pages, prefix hits included) agree; ``borrowed``:
    hits read from their holder until aliased, the borrows rank 0 ends replayed on rank 1."""
    from tests.cpu.test_prefix_engine import GREEDY as CHAT_GREEDY
    from tests.cpu.test_prefix_engine import chat

    borrowed = kv_mode == "borrowed"
    mode = {"kv_mode": "vattention", "prefix_borrow": True} if borrowed else {"kv_mode": kv_mode}
    with llm(str(tiny_dir), prefix_cache=False, **SMALL_KV) as single:
        expected, _ = chat(single, CHAT_GREEDY, turns=2)
    with llm(str(tiny_dir), tp=2, prefix_cache=True, **mode, **SMALL_KV) as pair:
        answers, cached = chat(pair, CHAT_GREEDY, turns=2)
        assert cached > 0
        assert_books_agree(pair.engine)
        stats = pair.engine.stats().kv
        assert stats.prefix_hits_tokens >= cached
        assert (stats.prefix_borrows > 0) == borrowed
    assert answers == expected


#: Each rank's cache pressed hard enough that a conversation's second turn comes back from the
#: host tier (rank 0 holds 1 of the 2 KV heads: 7 pages of 32 tokens).
TIERED_TP = {**SMALL_KV, "kv_cache_bytes": 7 * 4096, "eager_pages": 0, "kv_offload_bytes": 1 << 20}


def chat_expected(tiny_dir: Path) -> list[list[int]]:
    from tests.cpu.test_prefix_engine import GREEDY as CHAT_GREEDY
    from tests.cpu.test_prefix_engine import chat

    with llm(str(tiny_dir), prefix_cache=False, **SMALL_KV) as single:
        return chat(single, CHAT_GREEDY, turns=2)[0]


@pytest.mark.parametrize("direction", ["restore", "offload"])
def test_tp2_host_copies_failing_on_rank_0_fail_alike_on_every_rank(
    tiny_dir: Path, direction: str
) -> None:
    """Rank 0's host-tier copies in ``direction`` raise: its page plan carries the faults, every
    rank fails the same copies, the requests compute those blocks on every rank and get tp=1's
    tokens; the replica goes on and the ranks' books agree."""
    from tests.cpu.test_prefix_engine import GREEDY as CHAT_GREEDY
    from tests.cpu.test_prefix_engine import chat

    expected = chat_expected(tiny_dir)
    with llm(str(tiny_dir), tp=2, prefix_cache=True, **TIERED_TP) as pair:
        faults = pair.engine.kv.tier_faults
        assert faults is not None
        faults.inject = failing(direction)
        answers, _ = chat(pair, CHAT_GREEDY, turns=2)
        assert faults.faults_total > 0 and pair.engine.broken is None
        assert pair.engine.stats().kv.host_restored_bytes == 0
        assert_books_agree(pair.engine)
    assert answers == expected


def test_tp2_offloads_failing_on_rank_1_leave_every_ranks_tier(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1's offloads raise from its first message on: it reports the blocks, rank 0 drops
    them on every rank, nothing comes back from a tier, the tokens are tp=1's and the replica
    goes on."""
    from tests.cpu.test_prefix_engine import GREEDY as CHAT_GREEDY
    from tests.cpu.test_prefix_engine import chat

    expected = chat_expected(tiny_dir)
    monkeypatch.setenv("VATTN_TP_FAULT", "1:0:offload")
    with llm(str(tiny_dir), tp=2, kv_mode="paged", prefix_cache=True, **TIERED_TP) as pair:
        answers, _ = chat(pair, CHAT_GREEDY, turns=2)
        assert_books_agree(pair.engine)  # the last releases reach rank 1: it reports their blocks
        stats = pair.engine.stats().kv
        assert pair.engine.broken is None and stats.host_offloaded_bytes > 0
        assert stats.host_tier_used_bytes == stats.host_restored_bytes == 0
        assert pair.engine.kv.pending  # their drop, for rank 1 with the next message
        assert_books_agree(pair.engine)
    assert answers == expected


def test_tp2_a_restore_failing_on_rank_1_only_fails_the_requests_never_their_tokens(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1's restores raise: its K/V of blocks rank 0 restored would differ, so its replay
    reports a mismatch, the replica breaks and its requests fail with the error (no wrong
    token, no hang)."""
    from tests.cpu.test_prefix_engine import GREEDY as CHAT_GREEDY
    from tests.cpu.test_prefix_engine import chat

    monkeypatch.setenv("VATTN_TP_FAULT", "1:0:restore")
    with llm(str(tiny_dir), tp=2, prefix_cache=True, **TIERED_TP) as pair:
        with pytest.raises(RuntimeError, match="this rank's host-tier restore failed"):
            chat(pair, CHAT_GREEDY, turns=2)  # the first turn restores nothing
        assert pair.engine.broken is not None and not pair.engine.has_work()
        assert not dist.is_initialized()


@pytest.mark.parametrize("kv_mode", ["vattention", "paged"])
def test_tp2_fp8_kv_matches_tp1_fp8_with_half_the_bytes_a_token(
    tiny_dir: Path, kv_mode: str
) -> None:
    """An fp8 KV cache sharded over 2 ranks: each rank quantizes its own heads, so tp=2 gives
    tp=1-fp8's greedy tokens and both ranks' books agree."""
    with llm(str(tiny_dir), kv_cache_dtype="fp8", kv_mode=kv_mode, **SMALL_KV) as single:
        one = [list(o.token_ids) for o in single.generate(PROMPTS, GREEDY)]
    with llm(str(tiny_dir), tp=2, kv_mode=kv_mode, kv_cache_dtype="fp8", **SMALL_KV) as pair:
        engine = pair.engine
        assert engine.runner.kv_dtype == torch.float8_e4m3fn
        two = [list(o.token_ids) for o in pair.generate(PROMPTS, GREEDY)]
        assert_books_agree(engine)
    assert two == one


def test_tp2_preemption_keeps_outputs_identical(tiny_dir: Path) -> None:
    with llm(str(tiny_dir), **SMALL_KV) as single:
        expected = [o.token_ids for o in single.generate(PROMPTS, LONG)]
    # Each rank holds 1 KV head: 32 tokens a page, 2 ranges; 6 pages back 96 tokens in all.
    with llm(
        str(tiny_dir),
        tp=2,
        **{**SMALL_KV, "kv_cache_bytes": 6 * 4096, "max_batch_tokens": 8, "eager_pages": 0},
    ) as pair:
        outputs = pair.generate(PROMPTS, LONG)
        assert pair.engine.stats().preemptions_total > 0
        assert_books_agree(pair.engine)
    assert [o.token_ids for o in outputs] == expected


def test_embedded_smollm2_tp3_matches_tp1() -> None:
    small = {"max_running": 2, "max_model_len": 256, "kv_cache_bytes": 64 << 20}
    params = SamplingParams(max_tokens=8, temperature=0)
    with llm("embedded", **small) as single:
        prompt = single.tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            add_generation_prompt=True,
            tokenize=False,
        )
        expected = single.generate([prompt], params)[0]
    with llm("embedded", tp=3, **small) as triple:
        got = triple.generate([prompt], params)[0]
    assert "Paris" in expected.text
    assert got.token_ids == expected.token_ids and got.text == expected.text


def test_rank_failing_before_the_model_fails_only_that_step(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with llm(str(tiny_dir), **SMALL_KV) as single:
        expected = [list(o.token_ids) for o in single.generate(PROMPTS[:2], GREEDY)]
    monkeypatch.setenv("VATTN_TP_FAULT", "1:2:prepare")  # rank 1 raises at message 2
    with llm(str(tiny_dir), tp=2, **SMALL_KV) as pair:
        engine = pair.engine
        failed = run(engine, PROMPTS[:2], GREEDY, "a")
        for outputs in failed.values():
            assert len(outputs) == 3  # two tokens, then the failure
            last = outputs[-1]
            assert last.finished and last.finish_reason == "abort" and last.token_ids == ()
            assert last.error is not None and "rank 1 failed preparing: InjectedFault" in last.error
        assert engine.broken is None and engine.stats().kv.slots_running == 0
        assert tokens(run(engine, PROMPTS[:2], GREEDY, "b")) == expected  # the replica goes on
        assert_books_agree(engine)


def test_rank_failing_inside_the_model_breaks_the_replica_without_a_hang(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VATTN_TP_FAULT", "1:2:model")
    with llm(str(tiny_dir), tp=2, **SMALL_KV) as pair:
        engine = pair.engine
        started = time.monotonic()
        outputs = run(engine, PROMPTS, GREEDY)
        assert time.monotonic() - started < 20  # not the 30 s collective timeout
        errors = {k: v[-1].error for k, v in outputs.items()}
        assert len(errors) == len(PROMPTS)
        assert all(
            e is not None and "rank 1 failed running the model: InjectedFault" in e
            for e in errors.values()
        )
        assert engine.broken is not None and not engine.has_work()
        with pytest.raises(ReplicaBroken):
            engine.add_request("late", PROMPTS[0], GREEDY)
        assert not dist.is_initialized()  # rank 0 has left the group: the replica can be rebuilt
