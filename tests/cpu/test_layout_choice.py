"""The "auto" KV layout rule (replica.kv.layout_choice): per-layer exactly while its page-group
rounding strands at most 5% of the KV budget."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replica.engine_config import EngineConfig
from replica.kv.config import KVLayout
from replica.kv.layout_choice import MAX_STRANDED_SHARE, choose_layout, host_page_size

MIB, GIB = 1 << 20, 1 << 30


def test_llama3_8b_on_an_h200_takes_per_layer_for_few_slots_and_interleaved_for_many() -> None:
    budget = 100 * GIB
    assert choose_layout("auto", 32, 4, 2 * MIB, budget) is KVLayout.PER_LAYER
    assert choose_layout("auto", 32, 40, 2 * MIB, budget) is KVLayout.PER_LAYER
    assert choose_layout("auto", 32, 41, 2 * MIB, budget) is KVLayout.INTERLEAVED
    assert choose_layout("auto", 32, 256, 2 * MIB, budget) is KVLayout.INTERLEAVED


def test_the_cpu_default_stays_interleaved() -> None:
    # The embedded model (30 layers), 64 slots, 1 GiB: per-layer would strand 7.4 GiB.
    assert choose_layout("auto", 30, 64, 2 * MIB, GIB) is KVLayout.INTERLEAVED


@pytest.mark.parametrize("named", ["interleaved", "per_layer"])
def test_a_named_layout_is_taken_as_named(named: str) -> None:
    assert choose_layout(named, 32, 1, 2 * MIB, 1000 * GIB) is KVLayout(named)
    assert choose_layout(KVLayout(named), 32, 4096, 2 * MIB, GIB) is KVLayout(named)


@given(
    layers=st.integers(1, 128),
    slots=st.integers(1, 1024),
    budget_pages=st.integers(1, 1 << 20),
)
def test_the_rule_is_the_stranded_share_bound(layers: int, slots: int, budget_pages: int) -> None:
    page = 2 * MIB
    stranded = slots * (2 * layers * page - page)
    chosen = choose_layout("auto", layers, slots, page, budget_pages * page)
    expected = stranded <= MAX_STRANDED_SHARE * budget_pages * page
    assert (chosen is KVLayout.PER_LAYER) == expected


def test_engine_config_defaults_to_auto_and_refuses_unknown_layouts() -> None:
    assert EngineConfig().kv_layout == "auto"
    assert EngineConfig(kv_layout="per_layer").kv_layout is KVLayout.PER_LAYER
    with pytest.raises(ValueError):
        EngineConfig(kv_layout="diagonal")


def test_the_host_page_holds_whole_tokens_of_a_model_no_2mib_page_divides() -> None:
    # SmolLM2-135M in float32, interleaved: 30 layers x K and V x 3 heads x 64 x 4 B = 46,080 B.
    page = host_page_size(46_080, 2 * MIB, os_page=4096)
    assert (page, page // 46_080) == (2_027_520, 44)
    # Tokens that divide 2 MiB keep it (Llama shapes; the tiny test model).
    assert host_page_size(128 * 1024, 2 * MIB, os_page=4096) == 2 * MIB
    assert host_page_size(3 * MIB, 2 * MIB, os_page=4096) == 3 * MIB  # one token: at least one


@given(token_bytes=st.integers(1, 1 << 22), os_page=st.sampled_from([4096, 16384, 65536]))
def test_the_host_page_is_whole_tokens_and_whole_os_pages_near_the_preferred_size(
    token_bytes: int, os_page: int
) -> None:
    page = host_page_size(token_bytes, 2 * MIB, os_page)
    assert page % token_bytes == 0 and (page == 2 * MIB or page % os_page == 0)
    unit = math.lcm(token_bytes, os_page)
    assert page <= max(2 * MIB, unit) and (page > 2 * MIB - unit or page == 2 * MIB)
