"""Admission's growth reserve (replica.growth_reserve): the pages kept back for the running
requests' expected growth, the ratio it learns from preemptions, and the engine with it on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replica import EngineConfig, SamplingParams
from replica.growth_reserve import GrowthReserve
from tests.models import tiny_llm

from .test_engine import PROMPTS


@dataclass(frozen=True)
class Running:
    num_tokens: int
    max_total_tokens: int
    computed: int


def pages_of_8(tokens: int) -> int:
    return -(-tokens // 8)


def test_reserve_counts_the_rest_of_each_prompt_and_its_expected_growth_in_whole_pages() -> None:
    reserve = GrowthReserve(initial=0.5)
    running = [Running(8, 40, 8), Running(10, 12, 10), Running(30, 30, 30), Running(20, 28, 8)]
    # 8 + ceil(0.5 * 32) = 24 tokens: 3 pages, 1 held -> 2; 10 + 1 = 11: 2 pages, 2 held -> 0;
    # done -> 0; a prompt of 20 computed to 8: 20 + 4 = 24 tokens: 3 pages, 1 held -> 2
    assert reserve.pages(running, pages_of_8) == 4
    assert [reserve.expected_tokens(r) for r in running] == [16, 1, 0, 4]
    assert (
        GrowthReserve.from_config(0.0).pages(running, pages_of_8) == 2
    )  # the rest of the prompt only


@given(st.floats(0.0, 1.0), st.lists(st.booleans(), max_size=300))
def test_ratio_stays_within_bounds_rises_on_preemption_and_decays_otherwise(
    initial: float, events: list[bool]
) -> None:
    reserve = GrowthReserve.from_config(initial)
    for preempted in events:
        before = reserve.ratio
        reserve.preempted() if preempted else reserve.stepped()
        assert reserve.minimum <= reserve.ratio <= 1.0
        assert reserve.ratio >= before if preempted else reserve.ratio <= before
    if initial == 0:
        assert reserve.ratio == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="minimum <= initial"):
        GrowthReserve(initial=0.05, minimum=0.1)
    with pytest.raises(ValueError, match="growth_reserve must be in"):
        EngineConfig(growth_reserve=1.5)


def test_reserving_growth_preempts_less_and_changes_no_output(tiny_dir: Path) -> None:
    """Four requests that each grow by 40 tokens into a cache of 10 pages of 8 tokens: admitting on
    free pages alone fills it with prompts and preempts; reserving the growth admits fewer at
    once."""
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    runs = {}
    for reserve in (0.0, 1.0):
        llm = tiny_llm(
            tiny_dir,
            kv_cache_bytes=10 * 4096,
            max_batch_tokens=8,
            eager_pages=0,
            growth_reserve=reserve,
        )
        outputs = llm.generate(PROMPTS, params)
        runs[reserve] = ([o.token_ids for o in outputs], llm.engine.stats().preemptions_total)
        assert llm.engine.stats().kv.pages_in_use == 0
        llm.engine.kv.check_invariants(deep=True)
    assert runs[1.0][0] == runs[0.0][0]
    assert runs[1.0][1] < runs[0.0][1], runs
