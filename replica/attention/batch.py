"""One step's batch as the attention backends see it, built once per step for all layers.

Sequences are ordered by slot (ascending): kernels that take the cache as one flat token array
(PyTorch FA2) need each sequence's keys to start after the previous one's.

    sequence i:  slot s_i, context c_i tokens already cached, q_i new tokens this step
    new tokens of i sit at positions [c_i, c_i + q_i) of slot s_i; kv_len_i = c_i + q_i
    queries flattened: tokens of sequence i are rows [cu_query[i], cu_query[i + 1])
    borrowed prefix (``replica.kv.borrows``): with borrows[i] = (h_i, b_i), b_i > 0, sequence i
        reads keys [0, b_i) from slot h_i at the same positions, the rest from its own slot
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepBatch:
    slots: tuple[int, ...]
    context_lens: tuple[int, ...]
    query_lens: tuple[int, ...]
    # Device tensors (int32 unless noted)
    slots_t: torch.Tensor  # [B]
    kv_lens_t: torch.Tensor  # [B]
    cu_query_t: torch.Tensor  # [B + 1]
    token_slots_t: torch.Tensor  # [T] int64, slot of each new token
    token_positions_t: torch.Tensor  # [T] int64, position of each new token
    # Host copies (CPU int32) for kernels whose planning runs on the host (FlashInfer's plan()),
    # so planning never copies device tensors back (a device sync per step).
    kv_lens_host: torch.Tensor  # [B]
    cu_query_host: torch.Tensor  # [B + 1]
    # Per sequence (holder slot, keys read from it), () when no sequence borrows.
    borrows: tuple[tuple[int, int], ...] = ()

    @property
    def num_sequences(self) -> int:
        return len(self.slots)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token (the decode kernels apply)."""
        return all(n == 1 for n in self.query_lens)

    @property
    def kv_lens(self) -> tuple[int, ...]:
        return tuple(c + q for c, q in zip(self.context_lens, self.query_lens))

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @property
    def max_kv_len(self) -> int:
        return max(self.kv_lens)

    @staticmethod
    def build(
        slots: Sequence[int],
        context_lens: Sequence[int],
        query_lens: Sequence[int],
        device: torch.device,
        borrows: Mapping[int, tuple[int, int]] | None = None,
    ) -> StepBatch:
        """``borrows``: slot -> (holder slot, keys read from it) (``KVCache.borrowed_reads``)."""
        if list(slots) != sorted(slots) or len(set(slots)) != len(slots):
            raise ValueError(f"a step's slots must be distinct and ascending, got {list(slots)}")
        if any(q <= 0 for q in query_lens):
            raise ValueError(f"every sequence adds at least one token, got {list(query_lens)}")
        return StepBatch._make(slots, context_lens, query_lens, device, borrows)

    def padded(self, size: int, device: torch.device) -> StepBatch:
        """This decode batch grown to ``size`` sequences (``build_padded``)."""
        if not self.is_decode:
            raise ValueError(
                f"only a decode batch pads, to at least its {self.num_sequences} sequences"
            )
        borrows = dict(zip(self.slots, self.borrows))
        return StepBatch.build_padded(self.slots, self.context_lens, size, device, borrows)

    @staticmethod
    def build_padded(
        slots: Sequence[int],
        context_lens: Sequence[int],
        size: int,
        device: torch.device,
        borrows: Mapping[int, tuple[int, int]] | None = None,
    ) -> StepBatch:
        """A decode batch (one new token per sequence) grown to ``size`` sequences by repeating its
        last one (same slot, length and position): the fixed-size batch a CUDA graph replays. The
        repeats attend exactly like the last sequence and write the same K/V to the same row."""
        if list(slots) != sorted(slots) or len(set(slots)) != len(slots):
            raise ValueError(f"a step's slots must be distinct and ascending, got {list(slots)}")
        if size < len(slots):
            raise ValueError(f"only a decode batch pads, to at least its {len(slots)} sequences")
        extra = size - len(slots)
        return StepBatch._make(
            tuple(slots) + tuple(slots[-1:]) * extra,
            tuple(context_lens) + tuple(context_lens[-1:]) * extra,
            (1,) * size,
            device,
            borrows,
        )

    @staticmethod
    def _make(
        slots: Sequence[int],
        context_lens: Sequence[int],
        query_lens: Sequence[int],
        device: torch.device,
        borrows: Mapping[int, tuple[int, int]] | None = None,
    ) -> StepBatch:
        kv_lens = [c + q for c, q in zip(context_lens, query_lens)]
        borrowed = tuple(borrows.get(s, (s, 0)) for s in slots) if borrows else ()
        for (holder, keys), kv_len, slot in zip(borrowed, kv_lens, slots):
            if keys and (holder == slot or keys > kv_len):
                raise ValueError(f"slot {slot}: {keys} of its {kv_len} keys borrowed from {holder}")
        token_slots = [s for s, q in zip(slots, query_lens) for _ in range(q)]
        token_positions = [p for c, q in zip(context_lens, query_lens) for p in range(c, c + q)]
        cu_query = [0]
        for q in query_lens:
            cu_query.append(cu_query[-1] + q)

        pinned = device.type == "cuda"

        def host(values: Sequence[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, pin_memory=pinned)

        def tensor(values: Sequence[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
            return host(values, dtype).to(device, non_blocking=True)

        kv_lens_host, cu_query_host = host(kv_lens), host(cu_query)

        return StepBatch(
            slots=tuple(slots),
            context_lens=tuple(context_lens),
            query_lens=tuple(query_lens),
            slots_t=tensor(slots),
            kv_lens_t=kv_lens_host.to(device, non_blocking=True),
            cu_query_t=cu_query_host.to(device, non_blocking=True),
            token_slots_t=tensor(token_slots, torch.int64),
            token_positions_t=tensor(token_positions, torch.int64),
            kv_lens_host=kv_lens_host,
            cu_query_host=cu_query_host,
            borrows=borrowed if any(keys for _, keys in borrowed) else (),
        )
