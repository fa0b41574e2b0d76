"""A small byte-level BPE tokenizer trained in memory and a random Llama of its vocabulary, saved
together as a real Hugging Face directory: an offline model with text (chat template and
structured outputs need a tokenizer; the tiny model of tests/models.py has none)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

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


#: A Qwen2.5-Instruct-style chat template (Qwen's own, its tool parts whole): with tools, the
#: system turn lists them in <tools> and asks for Hermes-style <tool_call> blocks; an assistant's
#: earlier calls are rendered as such blocks and tool results as <tool_response> in a user turn.
QWEN_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501 - the template's own lines


def save_scripted_qwen(path: Path, reply: list[str], seed: int = 0) -> Path:
    """A Qwen-style model directory whose greedy reply to any chat is ``reply`` then EOS: a
    byte-level BPE with Qwen's special tokens (EOS ``<|im_end|>``), ``<tool_call>`` and
    ``</tool_call>`` as added tokens (as in Qwen2.5's vocabulary) and each piece of ``reply`` as
    one more, ``QWEN_TEMPLATE``, and a Llama whose layers add nothing (zero output projections),
    so its next token depends on the last one only: its unembedding maps the generation prompt's
    last token (the newline after ``<|im_start|>assistant``) to the first piece, each piece to
    the next and the last to EOS. Pieces must differ from each other."""
    bpe = ByteLevelBPETokenizer()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(CORPUS * 4, vocab_size=320, special_tokens=special)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN_TEMPLATE,
    )
    tokenizer.add_tokens(["<tool_call>", "</tool_call>", *reply])
    tokenizer.save_pretrained(path)
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
    )
    chain = [prompt[-1], *(tokenizer.convert_tokens_to_ids(piece) for piece in reply)]
    chain.append(tokenizer.eos_token_id)
    assert len(set(chain[:-1])) == len(chain) - 1, "a token would need two successors"
    save_random_llama(
        path,
        seed,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.eos_token_id,
        num_hidden_layers=1,
        max_position_embeddings=2048,  # the tools' system turn is long in a 320-token BPE
    )
    model = LlamaForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        unembed = model.lm_head.weight
        unembed.zero_()
        for before, after in zip(chain, chain[1:]):
            # The final norm scales the embedding to RMS 1: its own direction scores 10 x sqrt(d).
            unembed[after] = 10 * embed[before] / embed[before].norm()
    model.save_pretrained(path)
    return path
