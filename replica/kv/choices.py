"""The names a configuration picks the KV cache's layout and element type by. A light module (no
torch): the engine's option declaration (replica.engine_config) imports it."""

from __future__ import annotations

from enum import Enum

#: What ``EngineConfig.kv_cache_dtype`` may name: "auto" stores K/V in the model's dtype, "fp8"
#: (or "fp8_e4m3") in float8_e4m3fn with a per-layer scale for K and V (replica.attention.fp8):
#: half the bytes per token, so a page holds twice the tokens.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


class KVLayout(str, Enum):
    PER_LAYER = "per_layer"
    INTERLEAVED = "interleaved"
