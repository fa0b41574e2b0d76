"""The host side of decode CUDA graphs (the graphs themselves: tests/gpu/test_decode_graphs.py):
which graph size a batch runs in, how a batch is padded to it, that CPU engines run eagerly, and
the warm-up traffic that captures the graphs."""

from __future__ import annotations

import pytest
import torch

from replica import EngineConfig, LLMEngine, SamplingParams
from replica.attention import StepBatch
from replica.decode_graphs import graph_sizes
from replica.model import ModelConfig
from replica.warm_up import decode_every_graph

CPU = torch.device("cpu")


def test_graph_sizes_cover_every_batch() -> None:
    assert graph_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert graph_sizes(5) == [1, 2, 4, 5]
    assert graph_sizes(1) == [1]


def test_padding_repeats_the_last_sequence() -> None:
    batch = StepBatch.build([1, 4, 6], [10, 3, 7], [1, 1, 1], CPU)
    padded = batch.padded(5, CPU)
    assert padded.slots == (1, 4, 6, 6, 6)
    assert padded.context_lens == (10, 3, 7, 7, 7) and padded.kv_lens == (11, 4, 8, 8, 8)
    assert padded.token_positions_t.tolist() == [10, 3, 7, 7, 7]
    assert padded.cu_query_t.tolist() == [0, 1, 2, 3, 4, 5]
    assert batch.padded(3, CPU).slots == batch.slots


def test_only_decode_batches_pad() -> None:
    with pytest.raises(ValueError, match="only a decode batch pads"):
        StepBatch.build([0, 1], [0, 5], [3, 1], CPU).padded(4, CPU)
    with pytest.raises(ValueError, match="only a decode batch pads"):
        StepBatch.build([0, 1], [2, 5], [1, 1], CPU).padded(1, CPU)


def tiny_engine(**config: object) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model="synthetic",
            synthetic=ModelConfig.tiny(),
            max_running=4,
            max_model_len=256,
            **config,  # type: ignore[arg-type]
        )
    )


def test_cpu_engines_run_eagerly() -> None:
    llm = tiny_engine()
    assert llm.runner.graphs is None and llm.warm_up() == 0


def test_the_warm_up_traffic_runs_every_size_up_to_max_running_to_its_end() -> None:
    """``replica.warm_up`` (which a CPU engine never runs: it captures no graphs): batches of 1, 2
    and 4 requests (not 8: over max_running) decode their tokens and leave nothing behind."""
    engine = tiny_engine()
    decode_every_graph(engine, [1, 2, 4, 8])
    assert not engine.has_work() and engine.requests == {}
    assert engine.generation_tokens_total == (1 + 2 + 4) * 3


@pytest.mark.parametrize("layout", ["interleaved", "per_layer"])
def test_the_warm_up_leaves_every_slot_empty_so_a_shared_prefix_is_aliased_not_copied(
    layout: str,
) -> None:
    """The warm-up's requests are released like any (their slots cached, pages mapped); it empties
    them, so traffic after it finds the cache of a new engine: the first requests over a shared
    prompt alias the holder's pages into empty slots instead of copying them into the warm-up's."""
    engine = tiny_engine(
        prefix_cache=True, kv_layout=layout, page_size=4096, kv_cache_bytes=256 * 4096
    )
    decode_every_graph(engine, [1, 2, 4])
    stats = engine.kv.stats()
    assert {state.value for state in engine.kv.slot_states()} == {"free"}
    assert (stats.pages_in_use, stats.pages_cached, stats.prefix_copied_bytes) == (0, 0, 0)
    group = engine.kv.config.tokens_per_group
    shared = [5 + i % 97 for i in range(2 * group)]
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    engine.add_request("holder", [*shared, 7, 8], params)
    engine.step()  # its prefill indexes the shared prompt
    for i in range(3):
        engine.add_request(f"follower-{i}", [*shared, 9 + i, 10], params)
    while engine.has_work():
        engine.step()
    stats = engine.kv.stats()
    assert stats.prefix_hits_tokens == 3 * 2 * group and stats.prefix_copied_bytes == 0
    assert engine.kv.mapping_breakdown().pages("map", "alias") == 3 * 2 * engine.kv.pages_for(1)
