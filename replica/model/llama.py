"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) with attention supplied by the engine.

The model never sees sequences, only the flat list of ``T`` tokens scheduled in this step (prefill
chunks and decode tokens of many sequences packed together) and their absolute positions. Which
token belongs to which sequence, the KV cache, and the causal structure are all the engine's
business, expressed through the ``attention`` callable passed to :meth:`LlamaForCausalLM.forward`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .config import ModelConfig
from .layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SwiGLUMLP,
    VocabParallelEmbedding,
)

AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``attention(layer_index, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> out [T, Hq, D]``.

``Hq``/``Hkv`` are this rank's heads. q and k already carry RoPE; q, k and v are strided views into
the fused qkv output (each head's ``D`` values contiguous). The softmax scale is ``head_dim **
-0.5``
(:attr:`LlamaForCausalLM.attn_scale`). The callable stores k/v in its cache and attends causally.
"""


class LlamaAttention(nn.Module):
    """Fused-qkv projection, (Qwen3) per-head q/k RMSNorm, RoPE, engine attention, row-parallel
    output projection."""

    def __init__(
        self,
        config: ModelConfig,
        layer_index: int,
        rank: int,
        world_size: int,
        process_group: dist.ProcessGroup | None,
    ) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.head_dim = config.head_dim
        self.num_heads = config.num_heads // world_size
        self.num_kv_heads = config.num_kv_heads // world_size
        d = config.head_dim
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size,
            [config.num_heads * d, config.num_kv_heads * d, config.num_kv_heads * d],
            config.attention_bias,
            rank,
            world_size,
        )
        self.o_proj = RowParallelLinear(
            config.num_heads * d,
            config.hidden_size,
            config.o_proj_bias,
            rank,
            world_size,
            process_group,
        )
        # Qwen3: one RMSNorm weight of head_dim shared by every query (key) head, replicated.
        self.q_norm = RMSNorm(d, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(d, config.rms_norm_eps) if config.qk_norm else None

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        rotary: RotaryEmbedding,
        attention: AttentionFn,
    ) -> torch.Tensor:
        """positions ``[T]``, hidden ``[T, hidden]`` -> ``[T, hidden]``."""
        t, d = hidden.shape[0], self.head_dim
        q, k, v = self.qkv_proj(hidden).split(
            [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1
        )
        q, k = q.view(t, self.num_heads, d), k.view(t, self.num_kv_heads, d)
        if self.q_norm is not None and self.k_norm is not None:
            # [T, H, D] -> [T * H, D]: each head's vector normed (a copy of the strided views).
            q = self.q_norm(q.reshape(-1, d))[0].view(t, self.num_heads, d)
            k = self.k_norm(k.reshape(-1, d))[0].view(t, self.num_kv_heads, d)
        rotary(positions, q, k)  # in place
        out = attention(self.layer_index, q, k, v.view(t, self.num_kv_heads, d))
        return self.o_proj(out.reshape(t, self.num_heads * d))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; the residual stream is threaded through so norms can fuse the add."""

    def __init__(
        self,
        config: ModelConfig,
        layer_index: int,
        rank: int,
        world_size: int,
        process_group: dist.ProcessGroup | None,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_index, rank, world_size, process_group)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLUMLP(
            config.hidden_size,
            config.intermediate_size,
            config.mlp_bias,
            rank,
            world_size,
            process_group,
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rotary: RotaryEmbedding,
        attention: AttentionFn,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(block_output [T, hidden], residual [T, hidden])``; their sum is the stream."""
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, rotary, attention)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and final norm (parameter names follow the HF checkpoint)."""

    def __init__(
        self,
        config: ModelConfig,
        rank: int,
        world_size: int,
        process_group: dist.ProcessGroup | None,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, rank, world_size, process_group
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rank, world_size, process_group)
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Tensor-parallel Llama-family causal LM; rank ``rank`` of ``world_size`` holds its shard.

    Parameters are created uninitialised with the ambient default dtype/device; fill them with
    :func:`replica.model.weights.load_hf_weights` or ``init_synthetic_weights`` (or use
    :func:`replica.model.weights.load_model`).
    """

    def __init__(
        self,
        config: ModelConfig,
        rank: int = 0,
        world_size: int = 1,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        for what, n in (
            ("num_heads", config.num_heads),
            ("num_kv_heads", config.num_kv_heads),
            ("intermediate_size", config.intermediate_size),
        ):
            if n % world_size:
                raise ValueError(
                    f"{what} ({n}) must be divisible by the tensor-parallel world_size "
                    f"({world_size})"
                )
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.num_local_heads = config.num_heads // world_size
        self.num_local_kv_heads = config.num_kv_heads // world_size
        self.attn_scale = config.head_dim**-0.5
        self.model = LlamaModel(config, rank, world_size, process_group)
        self.rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            rank,
            world_size,
            process_group,
            tie_to=self.model.embed_tokens if config.tie_word_embeddings else None,
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionFn
    ) -> torch.Tensor:
        """input_ids ``[T]`` (long), positions ``[T]`` (long, absolute within each sequence)
        -> final-normed hidden states ``[T, hidden]`` (replicated on every rank).

        Positions must be below ``config.max_position_embeddings`` (size of the rope cache).
        """
        hidden = self.model.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.model.layers:
            hidden, residual = layer(positions, hidden, residual, self.rotary, attention)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``[N, hidden]`` (typically the last token of each sequence) -> float32 logits
        ``[N, vocab_size]``, full vocabulary on every rank."""
        return self.lm_head(hidden)
