"""Model hyper-parameters, read from a Hugging Face ``config.json``.

Only the decoder-only Llama family is supported (``llama``, ``mistral``, ``qwen2``, ``qwen3``); they
share one architecture and differ only in which projections carry a bias, in their rope settings,
and (Qwen3) in an RMSNorm of each query and key head before RoPE.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style frequency-dependent rope scaling (``rope_type == "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Llama-family decoder.

    ``eos_token_ids`` is a tuple because several checkpoints (Llama-3-Instruct) stop on more than
    one
    token. ``sliding_window`` is reported for checkpoints that use one (Mistral; Qwen2/3 with
    ``use_sliding_window``); attention is the engine's, which applies no window and so refuses a
    request longer than it (within the window, sliding and full attention are the same).
    ``qk_norm``: Qwen3's RMSNorm over each query and key head (``q_norm`` / ``k_norm``) before RoPE.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on the q/k/v projections
    o_proj_bias: bool = False  # Llama's ``attention_bias`` also covers o_proj; Qwen2's does not
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None
    qk_norm: bool = False
    checkpoint_dtype: str | None = None  # e.g. "bfloat16", as recorded in config.json

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def eos_token_id(self) -> int | None:
        """The first end-of-sequence id (what tokenizers call *the* eos), or None."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelConfig:
        """Read ``<path>/config.json``."""
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        return cls.from_dict(json.loads(config_path.read_text()))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a parsed HF config dict (old ``rope_theta``/``rope_scaling`` keys or the
        transformers>=5 ``rope_parameters`` block)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} (only silu / SwiGLU is implemented)")
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        rope_theta, rope_scaling = _parse_rope(cfg)
        if model_type == "qwen2":
            # Qwen2 always has q/k/v biases and never an o_proj bias.
            qkv_bias, o_bias = True, False
        else:  # Llama, Mistral and Qwen3: attention_bias covers q, k, v and o
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        eos = cfg.get("eos_token_id")
        eos_ids = (
            tuple(int(e) for e in eos)
            if isinstance(eos, list)
            else ((int(eos),) if eos is not None else ())
        )
        sliding = cfg.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            sliding = None
        bos = cfg.get("bos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_ids=eos_ids,
            sliding_window=int(sliding) if sliding else None,
            qk_norm=model_type == "qwen3",
            checkpoint_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        )

    @classmethod
    def llama3_8b(cls) -> ModelConfig:
        """Llama-3.1-8B shapes, for synthetic benchmarks (no weights needed)."""
        return cls(
            model_type="llama",
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling=RopeScaling(
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
            max_position_embeddings=131072,
            bos_token_id=128000,
            eos_token_ids=(128001, 128008, 128009),
            checkpoint_dtype="bfloat16",
        )

    @classmethod
    def qwen2_5_7b(cls) -> ModelConfig:
        """Qwen2.5-7B-Instruct shapes, for synthetic benchmarks: 28 layers, 28 q / 4 kv heads, qkv
        bias; a 57,344-byte bf16 token, which no 2 MiB page holds whole."""
        return cls(
            model_type="qwen2",
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_layers=28,
            num_heads=28,
            num_kv_heads=4,
            head_dim=128,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            max_position_embeddings=32768,
            attention_bias=True,
        )

    @classmethod
    def tiny(cls) -> ModelConfig:
        """A few-KB GQA model for unit tests."""
        return cls(
            model_type="llama",
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_ids=(2,),
        )


def _parse_rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Return ``(rope_theta, scaling)`` from either config layout; reject unimplemented types."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta, scaling = float(params["rope_theta"]), params
    else:
        theta, scaling = float(cfg.get("rope_theta", 10000.0)), cfg.get("rope_scaling")
    if not scaling:
        return theta, None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: llama3, none)")
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )
