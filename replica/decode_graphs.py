"""CUDA graphs of the whole decode step: embedding, every layer, final norm and logits.

A decode step at batch 64 launches ~30 kernels per layer, each a few microseconds of GPU work, so
launching them from Python takes longer than running them. A captured graph replays them all with
one launch. Capture is valid across steps because nothing the kernels touch moves: the weights, the
vAttention cache (its virtual addresses are fixed for the engine's life; pages are mapped under
them, never moved) and the static buffers below, which are refilled in place before each replay.

    static per graph size B:  input ids [B], positions [B], the attention backend's plan (cache
                              rows of the new tokens, kernel index buffers: ``plan_graph``)
    shared by all graphs:     logits [max B, vocab] (float32), one memory pool

A batch of n sequences runs in the graph of the smallest size >= n (``graph_sizes``) and of its
attention plan's variant (``AttentionBackend.graph_variant``: e.g. the page size FlashInfer sees,
chosen per step): one graph per (size, variant). The padding
rows repeat the last sequence (same token, position, slot and length), so they compute what it
computes and write the same K/V to the same cache row; their logits are dropped.

Graphs are captured lazily, the first time a size is needed: that step runs eagerly on the static
buffers (which warms up every kernel with valid, mapped addresses), then is captured for replay;
a batch reading a borrowed prefix (``replica.kv.borrows``: small pages for a few steps of a burst)
replays a graph of its variant where one was captured, else runs eagerly, never capturing. The
caller must consume the returned logits before the next step (they are a view of the shared
buffer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from replica.attention import AttentionBackend, StepBatch
from replica.model.llama import LlamaForCausalLM


def graph_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to ``max_batch`` (and ``max_batch`` itself)."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch, 8)) + [max_batch]
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        attention: AttentionBackend,
        max_batch: int,
        device: torch.device,
    ) -> None:
        if not attention.supports_graphs:
            raise ValueError(f"the {attention.name} attention backend cannot run in CUDA graphs")
        self.model, self.attention, self.device = model, attention, device
        self.sizes = graph_sizes(max_batch)
        largest = self.sizes[-1]
        self.inputs = torch.zeros(
            2, largest, dtype=torch.long, device=device
        )  # token ids, positions
        self.input_ids, self.positions = self.inputs[0], self.inputs[1]
        self.logits = torch.empty(
            largest, model.config.vocab_size, dtype=torch.float32, device=device
        )
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (size, attention variant)
        self.pool = torch.cuda.graph_pool_handle()
        self.replays = 0

    def size_for(self, query_lens: tuple[int, ...]) -> int | None:
        """The graph size a step with these query lengths runs in, or None when it runs eagerly
        (not a pure decode step, or larger than the largest graph)."""
        if len(query_lens) > self.sizes[-1] or any(q != 1 for q in query_lens):
            return None
        return next(s for s in self.sizes if s >= len(query_lens))

    def run(
        self,
        slots: tuple[int, ...],
        context_lens: tuple[int, ...],
        input_ids: tuple[int, ...],
        size: int,
        patch: Callable[[torch.Tensor], None] | None = None,
        borrows: Mapping[int, tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """Runs a decode step (sequences in ``slots``, one new token each, ``input_ids`` in their
        order) in the graph of ``size``; returns float32 logits [n, vocab], a view valid until the
        next step. ``patch(ids)`` may then rewrite the step's input ids on the device (tokens the
        host does not know yet). ``borrows``: ``StepBatch.build``'s."""
        n = len(slots)
        padded = StepBatch.build_padded(slots, context_lens, size, self.device, borrows)
        extra = size - n
        host = torch.tensor(
            [input_ids + input_ids[-1:] * extra, context_lens + context_lens[-1:] * extra],
            dtype=torch.long,
            pin_memory=True,
        )
        self.inputs[:, :size].copy_(host, non_blocking=True)
        if patch is not None:
            patch(self.input_ids[:n])
            if extra:  # padding repeats the last sequence's token, patched or not
                self.input_ids[n:size].copy_(self.input_ids[n - 1 : n].expand(extra))
        self.attention.plan_graph(padded)
        key = (size, self.attention.planned_variant)
        graph = self.graphs.get(key)
        if graph is None:
            self._forward(size)  # this step, eagerly on the static buffers: also the warm-up
            if not padded.borrows:  # a borrowing batch (brief: replica.kv.borrows) runs eagerly
                self._capture(key)  # rather than pay a capture while serving
        else:
            graph.replay()
            self.replays += 1
        return self.logits[:n]

    def _forward(self, size: int) -> None:
        with torch.inference_mode():
            hidden = self.model(self.input_ids[:size], self.positions[:size], self.attention)
            self.logits[:size].copy_(self.model.compute_logits(hidden))

    def _capture(self, key: tuple[int, int]) -> None:
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._forward(key[0])
        self.graphs[key] = graph
