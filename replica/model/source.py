"""Where a model comes from: a Hugging Face directory, the embedded SmolLM2, or synthetic weights,
and its tokenizer. The engine and every tensor-parallel rank resolve a model name the same way."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from replica.model.config import ModelConfig
from replica.model.embedded import embedded_model_dir


def resolve_model_dir(model: str, progress: bool = False) -> Path | None:
    """The Hugging Face directory ``model`` names (None for "synthetic"); "embedded" is fetched
    and converted once (saying so, with ``progress``). Raises FileNotFoundError for a path without
    config.json."""
    if model == "synthetic":
        return None
    if model == "embedded":
        return embedded_model_dir(progress)
    path = Path(model).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{model!r} is not a Hugging Face model directory (no config.json)")
    return path


def model_source(model: str, synthetic: ModelConfig | None) -> tuple[Path | None, ModelConfig]:
    """The model directory (None for synthetic weights) and its config; synthetic weights take
    ``synthetic``'s shapes, Llama-3-8B's by default."""
    model_dir = resolve_model_dir(model)
    if model_dir is not None:
        return model_dir, ModelConfig.from_hf_dir(model_dir)
    return None, synthetic or ModelConfig.llama3_8b()


def load_tokenizer(model_dir: Path) -> Any:
    """The directory's tokenizer, or None when it ships none (token-id prompts only)."""
    if not any(
        (model_dir / name).exists()
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def apply_chat_template(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The prompt text of a conversation: the tokenizer's chat template, else role-prefixed
    lines."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so no chat template")
    if getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=True
            )
        )
    # A plain fallback for tokenizers without a template.
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"
