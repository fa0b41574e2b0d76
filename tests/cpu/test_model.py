"""replica.model against Hugging Face transformers on tiny random checkpoints (CPU, float32).

The engine's attention is stood in for by :class:`RefAttention`: a dense per-sequence K/V list and
causal SDPA over it. Steps pack several sequences (prefills of different lengths, decodes, and a
prefill arriving mid-generation), as the engine does.

Run as a script (``python test_model.py --tp-worker ...``) it is one rank of the gloo TP test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # so the --tp-worker subprocess finds `replica`
    sys.path.insert(0, str(REPO))

from replica.model import (  # noqa: E402 - after the sys.path entry above
    LlamaForCausalLM,
    MissingWeightsError,
    ModelConfig,
    embedded_model_dir,
    init_synthetic_weights,
    load_model,
)

# Prompt lengths; the last prompt arrives at decode step ARRIVAL (packed with decodes).
PROMPT_LENS = (5, 11, 3)
ARRIVAL = 2
NEW_TOKENS = 6
VOCAB = 131  # odd, so vocab-parallel padding is exercised at world_size 2

_BASE = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
HF_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama_gqa_tied": ("llama", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "llama_untied_bias": (
        "llama",
        {
            "num_key_value_heads": 4,
            "tie_word_embeddings": False,
            "attention_bias": True,
            "mlp_bias": True,
        },
    ),
    "llama3_rope_mqa": (
        "llama",
        {
            "num_key_value_heads": 1,
            "head_dim": 32,
            "rope_theta": 10000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "qwen2_bias": ("qwen2", {"num_key_value_heads": 2, "tie_word_embeddings": False}),
    "mistral": ("mistral", {"num_key_value_heads": 2, "sliding_window": None}),
    # Qwen3: per-head q/k RMSNorm before RoPE; head_dim 32 with 4 heads on hidden 64 (q is wider
    # than the residual stream, as in Qwen3's own checkpoints).
    "qwen3_qk_norm": (
        "qwen3",
        {"num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": True},
    ),
    "qwen3_bias_untied": (
        "qwen3",
        {"num_key_value_heads": 1, "attention_bias": True, "tie_word_embeddings": False},
    ),
}


def _hf_classes(kind: str) -> tuple[type, type]:
    import transformers as tf

    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }[kind]


def make_hf_checkpoint(name: str, path: Path) -> torch.nn.Module:
    """Save a random HF model to ``path``; returns it (eval, float32, eager attention)."""
    kind, extra = HF_CONFIGS[name]
    config_cls, model_cls = _hf_classes(kind)
    torch.manual_seed(0)
    model = model_cls(config_cls(**_BASE, **extra, attn_implementation="eager")).eval()
    with torch.no_grad():
        # HF init leaves norms at 1 and biases at 0, which would hide loading bugs; logits need
        # some spread too, or greedy argmax would hinge on rounding noise.
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    return model


class RefAttention:
    """Engine stand-in: per-(sequence, layer) dense K/V lists, causal attention over them."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.layout: list[tuple[int, int]] = []  # (seq_id, tokens in this step), packing order

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        outs, off = [], 0
        for seq, n in self.layout:
            k_new, v_new = k[off : off + n], v[off : off + n]
            k_old, v_old = self.kv.get((seq, layer), (k_new[:0], v_new[:0]))
            keys, values = torch.cat([k_old, k_new]), torch.cat([v_old, v_new])
            self.kv[(seq, layer)] = (keys, values)
            total, past = keys.shape[0], keys.shape[0] - n
            rep = q.shape[1] // k.shape[1]
            mask = torch.arange(total)[None, :] <= (past + torch.arange(n))[:, None]
            out = F.scaled_dot_product_attention(
                q[off : off + n].transpose(0, 1),
                keys.repeat_interleave(rep, dim=1).transpose(0, 1),
                values.repeat_interleave(rep, dim=1).transpose(0, 1),
                attn_mask=mask,
                scale=self.scale,
            )
            outs.append(out.transpose(0, 1))
            off += n
        return torch.cat(outs)


def make_prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@torch.inference_mode()
def run_engine(
    model: LlamaForCausalLM, prompts: list[list[int]], new_tokens: int
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy-generate ``new_tokens`` per prompt with packed steps (continuous-batching style).

    Returns per sequence the generated tokens and the logits ``[len(prompt) + new - 1, vocab]`` of
    every position fed to the model.
    """
    attn = RefAttention(model.attn_scale)
    generated: list[list[int]] = [[] for _ in prompts]
    logits_rows: list[list[torch.Tensor]] = [[] for _ in prompts]
    pending = {0: [0, 1], ARRIVAL: [2]} if len(prompts) == 3 else {0: list(range(len(prompts)))}
    active: list[int] = []
    step = 0
    while active or pending:
        layout, ids, pos = [], [], []
        for s in active:  # one decode token each
            ids.append(generated[s][-1])
            pos.append(len(prompts[s]) + len(generated[s]) - 1)
            layout.append((s, 1))
        for s in pending.pop(step, []):
            ids += prompts[s]
            pos += range(len(prompts[s]))
            layout.append((s, len(prompts[s])))
            active.append(s)
        attn.layout = layout
        hidden = model(torch.tensor(ids), torch.tensor(pos), attn)
        logits = model.compute_logits(hidden)
        assert logits.dtype == torch.float32 and logits.shape == (len(ids), model.config.vocab_size)
        off = 0
        for s, n in layout:
            logits_rows[s].append(logits[off : off + n])
            generated[s].append(int(logits[off + n - 1].argmax()))
            off += n
        active = [s for s in active if len(generated[s]) < new_tokens]
        step += 1
    return generated, [torch.cat(rows) for rows in logits_rows]


def check_against_hf(
    hf_model: torch.nn.Module,
    prompts: list[list[int]],
    generated: list[list[int]],
    logits: list[torch.Tensor],
) -> None:
    for prompt, gen, ours in zip(prompts, generated, logits):
        full = torch.tensor([prompt + gen])
        with torch.no_grad():
            ref = hf_model(full).logits[0, :-1].float()
            hf_gen = hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones_like(torch.tensor([prompt])),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
        assert gen == hf_gen[0, len(prompt) :].tolist()


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_matches_hf(name: str, tmp_path: Path) -> None:
    hf_model = make_hf_checkpoint(name, tmp_path)
    config = ModelConfig.from_hf_dir(tmp_path)
    assert config.model_type == HF_CONFIGS[name][0]
    model = load_model(tmp_path, torch.float32, "cpu", progress=False)
    prompts = make_prompts(config.vocab_size)
    generated, logits = run_engine(model, prompts, NEW_TOKENS)
    check_against_hf(hf_model, prompts, generated, logits)


def test_config_parsing() -> None:
    cfg = ModelConfig.from_dict(
        {
            "model_type": "llama",
            "vocab_size": 10,
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "eos_token_id": [7, 9],
            "bos_token_id": 1,
            "torch_dtype": "bfloat16",
        }
    )
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.eos_token_ids, cfg.eos_token_id) == (
        4,
        2,
        (7, 9),
        7,
    )
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling is not None
    assert cfg.rope_scaling.factor == 8.0 and cfg.checkpoint_dtype == "bfloat16"
    qwen = ModelConfig.from_dict(
        {
            "model_type": "qwen2",
            "vocab_size": 10,
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "sliding_window": 4096,
        }
    )
    assert qwen.attention_bias and not qwen.o_proj_bias and qwen.sliding_window is None
    assert not qwen.qk_norm
    qwen3 = {**_BASE, "model_type": "qwen3", "num_hidden_layers": 1, "head_dim": 128}
    qwen3 |= {"intermediate_size": 16, "sliding_window": 4096}
    parsed = ModelConfig.from_dict(qwen3)
    assert parsed.qk_norm and parsed.head_dim == 128 and not parsed.attention_bias
    assert parsed.sliding_window is None  # use_sliding_window is false by default
    windowed = ModelConfig.from_dict(qwen3 | {"use_sliding_window": True, "attention_bias": True})
    assert windowed.sliding_window == 4096 and windowed.attention_bias and windowed.o_proj_bias
    big = ModelConfig.llama3_8b()
    assert (big.num_layers, big.num_kv_heads, big.vocab_size, big.head_dim) == (32, 8, 128256, 128)


def test_unknown_model_type_and_rope(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 5}))
    with pytest.raises(ValueError, match="gpt2"):
        ModelConfig.from_hf_dir(tmp_path)
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_dict(
            {
                "model_type": "llama",
                "vocab_size": 10,
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
            }
        )


def test_bad_world_size() -> None:
    cfg = ModelConfig.tiny()  # 4 heads, 2 kv heads
    with pytest.raises(ValueError, match=r"num_kv_heads \(2\).*world_size \(4\)"):
        LlamaForCausalLM(cfg, rank=0, world_size=4)
    with pytest.raises(ValueError, match=r"num_heads \(4\).*world_size \(3\)"):
        LlamaForCausalLM(cfg, rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank 2"):
        LlamaForCausalLM(cfg, rank=2, world_size=2)
    LlamaForCausalLM(cfg, rank=1, world_size=2)  # 2 q heads + 1 kv head per rank is fine


def test_missing_weight_is_reported(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    make_hf_checkpoint("llama_untied_bias", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"], tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MissingWeightsError, match=r"lm_head\.weight.*layers\.1\.self_attn\.k_proj"):
        load_model(tmp_path, torch.float32, progress=False)


def test_synthetic_bf16() -> None:
    model = load_model("synthetic", "bf16", config=ModelConfig.tiny(), seed=3)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # tiny() is untied
    std = model.model.layers[0].mlp.down_proj.weight.float().std().item()
    assert 0.015 < std < 0.025
    assert torch.all(model.model.norm.weight == 1)
    generated, _ = run_engine(model, [[1, 2, 3], [4, 5]], 3)
    assert [len(g) for g in generated] == [3, 3]
    again = LlamaForCausalLM(ModelConfig.tiny())
    init_synthetic_weights(again, seed=3)
    assert torch.equal(
        again.model.layers[1].self_attn.qkv_proj.weight.bfloat16(),
        model.model.layers[1].self_attn.qkv_proj.weight,
    )


def test_column_parallel_shards() -> None:
    """Per-matrix and pre-fused loading agree, and each rank holds its rows of every matrix."""
    from replica.model import ColumnParallelLinear

    q, k, v = torch.randn(8, 6), torch.randn(4, 6), torch.randn(4, 6)
    for rank in range(2):
        split = ColumnParallelLinear(6, [8, 4, 4], rank=rank, world_size=2)
        fused = ColumnParallelLinear(6, [8, 4, 4], rank=rank, world_size=2)
        for i, t in enumerate((q, k, v)):
            split.weight_loader(split.weight, t, i)
        fused.weight_loader(fused.weight, torch.cat([q, k, v]))
        want = torch.cat(
            [q[4 * rank : 4 * rank + 4], k[2 * rank : 2 * rank + 2], v[2 * rank : 2 * rank + 2]]
        )
        assert torch.equal(split.weight, want) and torch.equal(fused.weight, want)
    with pytest.raises(ValueError, match="shape"):
        split.weight_loader(split.weight, torch.randn(5, 6), 1)


def _tp_worker(rank: int, world_size: int, model_dir: str, out: str) -> None:
    """One rank of the TP test: load its shard, run the engine loop, rank 0 saves the results."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{out}.rdzv", rank=rank, world_size=world_size
    )
    try:
        model = load_model(model_dir, torch.float32, "cpu", rank, world_size, progress=False)
        assert model.num_local_heads == 4 // world_size
        generated, logits = run_engine(model, make_prompts(VOCAB), NEW_TOKENS)
        if rank == 0:
            torch.save({"generated": generated, "logits": logits}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "name", ["llama_gqa_tied", "llama_untied_bias", "qwen2_bias", "qwen3_qk_norm"]
)
def test_tensor_parallel_gloo(name: str, tmp_path: Path) -> None:
    hf_model = make_hf_checkpoint(name, tmp_path / "ckpt")
    out = tmp_path / "result.pt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--tp-worker",
                str(r),
                "2",
                str(tmp_path / "ckpt"),
                str(out),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    result = torch.load(out)
    check_against_hf(hf_model, make_prompts(VOCAB), result["generated"], result["logits"])


def test_embedded_smollm2() -> None:
    from transformers import AutoTokenizer

    model_dir = embedded_model_dir()
    assert embedded_model_dir() == model_dir  # second call hits the cache
    config = ModelConfig.from_hf_dir(model_dir)
    assert (
        config.num_layers,
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        config.vocab_size,
        config.tie_word_embeddings,
    ) == (30, 576, 9, 3, 49152, True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [
        {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    model = load_model(model_dir, torch.float32, "cpu", progress=False)
    attn = RefAttention(model.attn_scale)
    ids, pos, out = prompt, list(range(len(prompt))), []
    with torch.inference_mode():
        for _ in range(24):
            attn.layout = [(0, len(ids))]
            hidden = model(torch.tensor(ids), torch.tensor(pos), attn)
            token = int(model.compute_logits(hidden[-1:])[0].argmax())
            if token in config.eos_token_ids or token == tokenizer.eos_token_id:
                break
            out.append(token)
            ids, pos = [token], [pos[-1] + 1]
    answer = tokenizer.decode(out, skip_special_tokens=True)
    assert "Paris" in answer, answer


if __name__ == "__main__" and sys.argv[1:2] == ["--tp-worker"]:
    _tp_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])


def test_sliding_window_bounds_the_context(tmp_path: Path) -> None:
    """Attention applies no window, so a Mistral checkpoint's sliding_window is the context limit:
    within it the engine is token-identical to transformers (which applies the window), one token
    beyond it is refused with the reason."""
    from replica import SamplingParams
    from replica.errors import RequestRejected
    from tests.models import tiny_llm

    config_cls, model_cls = _hf_classes("mistral")
    torch.manual_seed(0)
    config = config_cls(**_BASE, num_key_value_heads=2, sliding_window=16)
    hf_model = model_cls(config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.normal_(0.0, 0.1)
    hf_model.save_pretrained(tmp_path)
    llm = tiny_llm(tmp_path)
    assert llm.engine.context_limit == 16
    prompt = make_prompts(VOCAB)[1][:10]
    [out] = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0))
    with torch.no_grad():
        expected = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert list(out.token_ids) == expected[0, len(prompt) :].tolist()
    with pytest.raises(RequestRejected, match="context limit of 16 tokens .*sliding window"):
        llm.generate([prompt], SamplingParams(max_tokens=7, temperature=0))


@pytest.mark.parametrize("kv_mode", ["vattention", "paged"])
def test_engine_serves_qwen3_like_hf(kv_mode: str, tmp_path: Path) -> None:
    """The whole engine (scheduler, KV cache, sdpa) on the Qwen3 checkpoint: greedy tokens equal
    transformers' for prompts batched together."""
    from replica import SamplingParams
    from tests.models import tiny_llm

    hf_model = make_hf_checkpoint("qwen3_qk_norm", tmp_path)
    llm = tiny_llm(tmp_path, kv_mode=kv_mode)
    prompts = make_prompts(VOCAB)
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            expected = hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert list(out.token_ids) == expected[0, len(prompt) :].tolist()
