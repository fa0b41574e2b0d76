"""One rank's share of a replica: its model shard, its KV cache and its attention backend.

The engine (rank 0) decides; every rank's runner executes the same ``StepPlan``: it submits the
next step's pages to its mapping worker, plans attention once, runs the model, and returns the
logits of the rows that sample. On one CUDA device, decode steps replay CUDA graphs
(``replica.decode_graphs``) when the attention backend supports them and ``config.cuda_graphs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from replica.attention import AttentionBackend, StepBatch, make_attention_backend
from replica.attention.paged import make_paged_attention_backend
from replica.decode_graphs import DecodeGraphs
from replica.engine_config import DeviceFacts, EngineConfig
from replica.kv import KVCache, KVCacheAllocator, KVCacheConfig, PagedKVCache, PagedKVConfig
from replica.kv.config import resolve_kv_cache_dtype
from replica.kv.layout_choice import choose_layout
from replica.kv.slot_count import cache_slots
from replica.model import ModelConfig, load_model
from replica.sampling import to_device
from replica.vmm import open_device


@dataclass(frozen=True)
class StepPlan:
    """What every rank runs in one step (small, picklable: rank 0 broadcasts it under TP).
    Sequences are ordered by slot; ``sample_rows`` index the flattened tokens."""

    slots: tuple[int, ...]
    context_lens: tuple[int, ...]
    query_lens: tuple[int, ...]
    input_ids: tuple[int, ...]
    sample_rows: tuple[int, ...]

    @property
    def positions(self) -> list[int]:
        return [p for c, q in zip(self.context_lens, self.query_lens) for p in range(c, c + q)]


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_dir: Path | None,
        model_config: ModelConfig,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.device, None)
        #: The KV cache's element type (fp8 stores K/V quantized: replica.attention.fp8).
        self.kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        self.model = load_model(
            model_dir or "synthetic",
            self.dtype,
            self.device,
            config.rank,
            config.world_size,
            config=model_config,
            process_group=process_group,
            seed=config.seed,
            progress=False,
        )
        self.model_config = model_config
        #: Every default decided (EngineConfig.resolved): the engine reads its limits from here.
        self.config = config.resolved(self._device_facts())
        self._build_cache()

    def _build_cache(self) -> None:
        """The KV cache, the attention backend over it and the decode graphs over both; borrowed
        prefix reads where asked for and the attention backend reads them."""
        self.kv = self._make_kv_cache()
        self.attention = self._make_attention()
        self.graphs = self._make_graphs()
        granularity = self.attention.borrow_granularity
        if self.config.prefix_borrow and granularity:
            self.kv.enable_borrowed_reads(granularity)

    def _device_facts(self) -> DeviceFacts:
        """What the config's defaults depend on, now that the weights are loaded."""
        cuda = self.device.type == "cuda"
        return DeviceFacts(
            cuda=cuda,
            free_bytes=torch.cuda.mem_get_info(self.device)[0] if cuda else 0,
            layer_token_bytes=self._layer_token_bytes(),
            num_layers=self.model_config.num_layers,
        )

    def _layer_token_bytes(self) -> int:
        """One layer's K (or V) of one token on this rank (its KV heads)."""
        return self.model.num_local_kv_heads * self.model_config.head_dim * self.kv_dtype.itemsize

    def _make_graphs(self) -> DecodeGraphs | None:
        """Graphs on one CUDA device (under tensor parallelism the steps stay eager)."""
        config = self.config
        if not (config.cuda_graphs and self.device.type == "cuda" and config.world_size == 1):
            return None
        if not self.attention.supports_graphs:
            return None
        return DecodeGraphs(self.model, self.attention, config.max_running, self.device)

    def _make_attention(self) -> AttentionBackend:
        make_backend = (
            make_paged_attention_backend
            if isinstance(self.kv, PagedKVCache)
            else make_attention_backend
        )
        return make_backend(
            self.config.attention,
            self.kv,
            self.model.num_local_heads,
            self.model.num_local_kv_heads,  # type: ignore[arg-type]
            self.model_config.head_dim,
            self.dtype,
            self.device,
            self.config.prefill_kernel,
        )

    def rebuild_kv_cache(self, kv_cache_bytes: int) -> None:
        """Replaces the (still empty) KV cache by one of ``kv_cache_bytes``: the ranks of a
        tensor-parallel replica agree on the smallest budget so that their books stay identical."""
        self.config = replace(self.config, kv_cache_bytes=kv_cache_bytes)
        del (
            self.graphs,
            self.attention,
            self.kv,
        )  # first free the old cache (paged mode preallocates it)
        self._build_cache()

    @property
    def decoder_layers(self) -> Sequence[torch.nn.Module]:
        """The model's decoder layers, in order (fault injection hooks one under TP tests)."""
        return self.model.model.layers  # type: ignore[return-value]

    def _make_kv_cache(self) -> KVCache:
        config = self.config
        assert config.kv_cache_bytes is not None and config.page_size is not None  # resolved
        budget = max(config.kv_cache_bytes, 0)
        #: The KV budget this rank was built with (the ranks of a TP replica agree on the least).
        self.kv_budget_bytes = budget
        if config.kv_mode == "paged":  # the comparison mode: the same byte budget, preallocated
            return self._make_paged_cache(budget)
        return self._make_vattention_cache(budget)

    def _make_paged_cache(self, budget: int) -> PagedKVCache:
        config = self.config
        return PagedKVCache(
            PagedKVConfig(
                num_layers=self.model_config.num_layers,
                num_kv_heads=self.model.num_local_kv_heads,
                head_dim=self.model_config.head_dim,
                dtype=self.kv_dtype,
                max_slots=config.max_running,
                max_tokens=config.max_model_len,
                budget_bytes=budget,
                block_size=config.block_size,
                prefix_cache=config.prefix_cache,
                prefix_key=self._prefix_key(),
                host_tier_bytes=config.kv_offload_bytes or 0,
            ),
            self.device,
        )

    def _make_vattention_cache(self, budget: int) -> KVCacheAllocator:
        config = self.config
        page_size = config.page_size
        assert page_size is not None  # resolved
        vmm = open_device(
            "cuda" if self.device.type == "cuda" else "host",
            page_size,
            self.device.index or 0,
        )
        layers = self.model_config.num_layers
        kv_config = KVCacheConfig(
            num_layers=layers,
            num_kv_heads=self.model.num_local_kv_heads,
            head_dim=self.model_config.head_dim,
            dtype=self.kv_dtype,
            max_slots=cache_slots(
                config.kv_slots,
                config.max_running,
                config.prefix_cache,
                budget,
                2 * layers * self._layer_token_bytes(),  # K and V of every layer
                config.max_model_len,
            ),
            max_tokens=config.max_model_len,
            page_size=page_size,
            budget_bytes=budget,
            layout=choose_layout(
                config.kv_layout,
                self.model_config.num_layers,
                config.max_running,
                page_size,
                budget,
            ),
            eager_pages=config.eager_pages,
            eager_lookahead_tokens=config.eager_lookahead_tokens,
            prefix_cache=config.prefix_cache,
            prefix_key=self._prefix_key(),
            premap=bool(config.kv_premap),
            host_tier_bytes=config.kv_offload_bytes or 0,
        )
        return KVCacheAllocator(kv_config, vmm)

    def _prefix_key(self) -> str:
        """What a token's K/V depends on besides the tokens before it: the weights (the model, or
        the synthetic shapes and seed) and their dtype. Every rank keys alike (each indexes its own
        shard of the heads), so rank 0's keys stand for the replica."""
        config = self.config
        return f"{config.model}|{config.synthetic}|{config.seed}|{config.dtype}"

    def execute(
        self,
        plan: StepPlan,
        patches: tuple[tuple[int, int], ...] = (),
        previous_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Runs one step; returns float32 logits [len(sample_rows), vocab]. Each ``(row, source)``
        of ``patches`` sets input token ``row`` to ``previous_tokens[source]`` on the device (a
        token the previous step sampled and the host has not read: asynchronous scheduling)."""
        size = self.graphs.size_for(plan.query_lens) if self.graphs is not None else None
        borrows = self.kv.borrowed_reads()  # the same on every rank: ends are recorded
        if size is not None:
            assert self.graphs is not None
            patch = (lambda ids: self._patch(ids, patches, previous_tokens)) if patches else None
            logits = self.graphs.run(
                plan.slots, plan.context_lens, plan.input_ids, size, patch, borrows
            )
            self._map_next_step(plan)  # while the GPU replays the graph
            if plan.sample_rows == tuple(range(len(plan.slots))):
                return logits
            return logits[to_device(plan.sample_rows, torch.long, self.device)]
        batch = StepBatch.build(
            plan.slots, plan.context_lens, plan.query_lens, self.device, borrows
        )
        ids, positions, rows = (
            to_device(v, torch.long, self.device)
            for v in (plan.input_ids, plan.positions, plan.sample_rows)
        )
        self._patch(ids, patches, previous_tokens)
        with torch.inference_mode():
            self.attention.plan(batch)
            hidden = self.model(ids, positions, self.attention)
            self._map_next_step(plan)  # while the GPU runs the layers just launched
            return self.model.compute_logits(hidden[rows])

    def _patch(
        self, ids: torch.Tensor, patches: tuple[tuple[int, int], ...], previous: torch.Tensor | None
    ) -> None:
        if not patches:
            return
        assert previous is not None
        index = to_device(patches, torch.long, ids.device).T
        ids.index_copy_(0, index[0], previous.index_select(0, index[1]))

    def _map_next_step(self, plan: StepPlan) -> None:
        """Books each sequence's new length and submits the pages the next step needs to the
        mapping worker, which maps them while this step computes (this step's own pages were
        mapped before the step was planned)."""
        self.kv.step_async(
            {s: c + q for s, c, q in zip(plan.slots, plan.context_lens, plan.query_lens)}
        )
