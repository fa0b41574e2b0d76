"""Filling a :class:`LlamaForCausalLM` with weights: HF safetensors checkpoints or random ones.

Checkpoint tensors are opened lazily (``safe_open(...).get_slice``) and every module's
``weight_loader`` reads just the rows/columns its rank owns, so a tensor-parallel rank reads about
``1 / world_size`` of the checkpoint and never holds a full matrix.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm.auto import tqdm

from .config import ModelConfig
from .layers import RMSNorm
from .llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"

# Our merged parameters and the HF projections stacked into them, in stacking order.
_MERGED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
# Checkpoint entries that are legitimately unused (recomputed buffers, tied heads).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


class MissingWeightsError(LookupError):
    """The checkpoint lacks tensors the model needs."""


def checkpoint_names(param_name: str) -> list[tuple[str, int | None]]:
    """HF tensor names feeding one of our parameters, with the merged-shard index of each.

    ``model.layers.3.self_attn.qkv_proj.weight`` -> ``[(...q_proj.weight, 0), (...k_proj..., 1),
    (...v_proj..., 2)]``; unmerged parameters map to themselves with shard ``None``.
    """
    for merged, parts in _MERGED.items():
        token = f".{merged}."
        if token in param_name:
            return [(param_name.replace(token, f".{part}."), i) for i, part in enumerate(parts)]
    return [(param_name, None)]


def _weight_map(model_dir: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name (relative to ``model_dir``)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    mapping: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            mapping.update(dict.fromkeys(handle.keys(), f.name))
    return mapping


def _check_names(
    model: LlamaForCausalLM, model_dir: Path, wanted: set[str], weight_map: dict[str, str]
) -> None:
    """Raises :class:`MissingWeightsError` naming every tensor the model wants and the checkpoint
    lacks; warns of the checkpoint's tensors the model does not use."""
    missing = sorted(hf for hf in wanted if hf not in weight_map)
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" ... ({len(missing)} in all)" if len(missing) > 8 else ""
        )
        raise MissingWeightsError(f"checkpoint {model_dir} is missing weights: {shown}")
    unused = [
        n
        for n in weight_map
        if n not in wanted
        and not n.endswith(_IGNORED_SUFFIXES)
        and not (n == "lm_head.weight" and model.config.tie_word_embeddings)
    ]
    if unused:
        logger.warning(
            "ignoring %d checkpoint tensors not used by the model: %s",
            len(unused),
            ", ".join(sorted(unused)[:8]),
        )


def load_hf_weights(
    model: LlamaForCausalLM,
    model_dir: str | Path,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> None:
    """Load an HF safetensors checkpoint into ``model`` (already built for ``rank``/``world_size``).

    ``rank``/``world_size`` default to the model's and, if given, must agree with it (the shard
    layout is fixed when the model is built). Raises :class:`MissingWeightsError` naming every
    absent tensor before reading anything.
    """
    rank = model.rank if rank is None else rank
    world_size = model.world_size if world_size is None else world_size
    if (rank, world_size) != (model.rank, model.world_size):
        raise ValueError(
            f"model was built for rank {model.rank}/{model.world_size}, "
            f"asked to load rank {rank}/{world_size}"
        )
    model_dir = Path(model_dir)
    weight_map = _weight_map(model_dir)
    params = list(model.named_parameters())  # tied lm_head is deduplicated away
    wanted = {hf for name, _ in params for hf, _ in checkpoint_names(name)}
    _check_names(model, model_dir, wanted, weight_map)
    with contextlib.ExitStack() as stack:
        handles: dict[str, object] = {}
        bar = tqdm(
            params,
            desc=f"loading {model_dir.name} (rank {rank})",
            unit="tensor",
            disable=not progress or rank != 0,
        )
        for name, param in bar:
            module = model.get_submodule(name.rpartition(".")[0])
            for hf_name, shard_id in checkpoint_names(name):
                file = weight_map[hf_name]
                if file not in handles:
                    handles[file] = stack.enter_context(
                        safe_open(str(model_dir / file), framework="pt", device="cpu")
                    )
                source = handles[file].get_slice(hf_name)  # type: ignore[attr-defined]
                module.weight_loader(param, source, shard_id)


@torch.no_grad()
def init_synthetic_weights(model: LlamaForCausalLM, seed: int = 0) -> None:
    """Random weights of a sane scale: matrices ~ N(0, 0.02), norm weights 1, biases 0.

    Replicated parameters (norms, biases) are constants, so every rank agrees on them; sharded
    matrices are drawn per rank, so the function of the model depends on ``world_size`` (fine for
    throughput benchmarks, which is what synthetic weights are for).
    """
    gen: torch.Generator | None = None
    for name, param in model.named_parameters():
        if gen is None or gen.device != param.device:
            gen = torch.Generator(device=param.device)
            gen.manual_seed(seed * 1_000_003 + model.rank)
        owner = model.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, RMSNorm):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=gen)


def resolve_dtype(dtype: torch.dtype | str, config: ModelConfig) -> torch.dtype:
    """``torch.dtype`` or a name; ``"auto"`` means the checkpoint's dtype, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = config.checkpoint_dtype or "float32"
    try:
        return _DTYPES[dtype.removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(
    source: str | Path,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    config: ModelConfig | None = None,
    process_group: dist.ProcessGroup | None = None,
    seed: int = 0,
    progress: bool = True,
) -> LlamaForCausalLM:
    """Build this rank's shard of a model directly in ``dtype`` on ``device`` and fill it.

    ``source`` is an HF model directory or ``"synthetic"`` (random weights; ``config`` defaults to
    :meth:`ModelConfig.llama3_8b` there, and to the directory's ``config.json`` otherwise).
    Returns the model in eval mode with ``requires_grad=False`` parameters.
    """
    synthetic = str(source) == SYNTHETIC
    if config is None:
        config = ModelConfig.llama3_8b() if synthetic else ModelConfig.from_hf_dir(source)
    torch_dtype = resolve_dtype(dtype, config)
    # Allocating under the target dtype/device avoids a transient float32 CPU copy of the model.
    with _default_dtype(torch_dtype), torch.device(device):
        model = LlamaForCausalLM(config, rank, world_size, process_group)
    if synthetic:
        init_synthetic_weights(model, seed)
    else:
        load_hf_weights(model, source, rank, world_size, progress=progress)
    return model.eval()
