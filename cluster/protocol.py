"""What the ingress sends a replica, and what the replica reports to the router."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from replica.sampling_params import SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    """One generation, already tokenized by the ingress. The router reads ``prompt_tokens`` and
    ``max_tokens`` to size the request in KV pages."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens


@dataclass(frozen=True)
class ModelInfo:
    """What the ingress needs to know about the served model (from a replica, once)."""

    name: str
    max_model_len: int
    tokens_per_page: float


def served_model_name(model: str) -> str:
    """The model name the OpenAI API shows for an EngineConfig.model."""
    if model == "embedded":
        return "SmolLM2-135M-Instruct"
    if model == "synthetic":
        return "synthetic-llama"
    return Path(model).name
