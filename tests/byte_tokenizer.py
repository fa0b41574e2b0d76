"""A small byte-level BPE tokenizer trained in memory and a random Llama of its vocabulary, saved
together as a real Hugging Face directory: an offline model with text (chat template and
structured outputs need a tokenizer; the tiny model of tests/models.py has none)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from tests.models import save_random_llama

CORPUS = [
    '{"answer": "yes", "ok": true, "count": 3}',
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    "The quick brown fox jumps over the lazy dog. [1, 2, 3] null false",
]
TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def save_llama_with_tokenizer(path: Path, seed: int = 0, **shape: Any) -> Path:
    """A random 2-layer Llama whose vocabulary is a 320-token byte-level BPE (EOS ``</s>``);
    ``shape`` overrides tests.models.TINY's config fields (e.g. a head size FlashInfer compiles)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=320, special_tokens=["<s>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", chat_template=TEMPLATE
    )
    tokenizer.save_pretrained(path)
    save_random_llama(
        path,
        seed,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **shape,
    )
    return path
