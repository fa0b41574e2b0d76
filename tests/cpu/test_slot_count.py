"""How many slots the vAttention cache reserves (``replica.kv.slot_count``), and that the extra
ones keep more conversations cached than run at once."""

from __future__ import annotations

import pytest

from replica import EngineConfig, LLMEngine, SamplingParams
from replica.kv.slot_count import MAX_TOKEN_ROWS, MAX_VIRTUAL_BYTES, cache_slots
from replica.model import ModelConfig

TOKEN = 128 << 10  # Llama-3-8B's K and V of every layer, bf16


def test_the_rule_counts_short_conversations_within_4x_running_and_the_address_space() -> None:
    h100 = cache_slots(None, 256, True, 60 << 30, TOKEN, 4096)
    assert h100 == 1024  # 60 GiB holds 1,920 conversations of 256 tokens: 4x the running
    assert cache_slots(None, 256, True, 4 << 30, TOKEN, 4096) == 256  # 128 fit: max_running
    assert cache_slots(None, 16, True, 1 << 30, TOKEN, 4096) == 32  # the budget's 32
    long_slots = cache_slots(None, 256, True, 60 << 30, TOKEN, 128 << 10)  # 16 GiB a slot
    assert long_slots == 256 and 64 * (128 << 10) * TOKEN == MAX_VIRTUAL_BYTES
    assert cache_slots(None, 256, False, 60 << 30, TOKEN, 4096) == 256  # nothing to keep
    tiny = cache_slots(None, 256, True, 60 << 30, 256, 4 << 20)  # 256-byte tokens, 4M a slot
    assert tiny == 511 and (tiny + 1) * (4 << 20) > MAX_TOKEN_ROWS  # int32 token rows
    assert cache_slots(300, 256, True, 60 << 30, TOKEN, 4096) == 300
    with pytest.raises(ValueError, match="at least max_running"):
        cache_slots(8, 16, True, 1 << 30, TOKEN, 4096)
    with pytest.raises(ValueError, match="at least max_running"):
        EngineConfig(kv_slots=8, max_running=16)


def test_extra_slots_keep_more_conversations_cached_than_run_at_once() -> None:
    """Eight conversations take turns through two running slots: with eight slots each one's
    next turn continues in its own slot (its history found whole, nothing taken over); with two,
    every new conversation takes over a slot holding another's history."""
    hits = {}
    for slots in (2, 8):
        engine = LLMEngine(
            EngineConfig(
                model="synthetic",
                synthetic=ModelConfig.tiny(),
                max_running=2,
                kv_slots=slots,
                max_model_len=256,
                page_size=4096,
                kv_cache_bytes=256 * 4096,
            )
        )
        assert engine.kv.max_slots == slots
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        histories = {c: [3] * 32 + [5 + c] * 24 for c in range(8)}  # a shared system prompt
        for turn in range(2):
            for c, history in histories.items():
                engine.add_request(f"{c}-{turn}", history, params)
            outputs = {}
            while engine.has_work():
                outputs |= {o.request_id: o for o in engine.step() if o.finished}
            for c in histories:
                histories[c] = [*histories[c], *outputs[f"{c}-{turn}"].token_ids, 7 + c]
        stats = engine.kv.stats()
        hits[slots] = (stats.prefix_hits_tokens, stats.prefix_takeovers)
    assert hits[8][1] == 0 < hits[2][1]
    assert hits[8][0] > hits[2][0]
