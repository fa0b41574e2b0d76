"""The offline API: generate for a list of prompts, no server.

from replica import LLM, SamplingParams
llm = LLM()                                    # the embedded SmolLM2-135M-Instruct
[out] = llm.chat([[{"role": "user", "content": "Name three primary colors."}]],
                 SamplingParams(max_tokens=32, temperature=0))
print(out.text)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from replica.engine import LLMEngine
from replica.engine_config import EngineConfig
from replica.model.source import apply_chat_template
from replica.sampling_params import SamplingParams


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    prompt_tokens: int
    logprobs: tuple[float, ...] | None = None
    cached_tokens: int = 0  # prompt tokens the prefix cache held (not computed again)
    #: Per generated token, the ``logprobs`` most likely (token id, logprob) pairs.
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None


class LLM:
    def __init__(self, model: str = "embedded", tp: int | None = None, **config: Any) -> None:
        """``tp``: tensor-parallel ranks (EngineConfig.tensor_parallel_size); rank 0 is this
        process, the others are spawned (see replica.tp). Call ``shutdown`` when done."""
        if tp is not None:
            config["tensor_parallel_size"] = tp
        self.engine = LLMEngine(EngineConfig(model=model, **config))
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stops the other tensor-parallel ranks, if any."""
        self.engine.shutdown()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Runs every prompt to completion (continuous batching); results in prompt order."""
        params = params or SamplingParams()
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} sampling params")
        # The whole batch is checked before any of it is queued: a bad prompt leaves nothing behind.
        token_ids = [
            self.engine.check(self.engine.tokenize(p), q) for p, q in zip(prompts, per_prompt)
        ]
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        for request_id, prompt_ids, request_params in zip(ids, token_ids, per_prompt):
            self.engine.add_request(request_id, prompt_ids, request_params)
        texts = {i: "" for i in ids}
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        logprobs: dict[str, list[float]] = {i: [] for i in ids}
        top: dict[str, list[tuple[tuple[int, float], ...]]] = {i: [] for i in ids}
        finished = {}
        while self.engine.has_work():
            for output in self.engine.step():
                texts[output.request_id] += output.text
                tokens[output.request_id] += output.token_ids
                logprobs[output.request_id] += output.logprobs or ()
                top[output.request_id] += output.top_logprobs or ()
                if output.finished:
                    finished[output.request_id] = output
        failed = [o for o in finished.values() if o.error]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(ids)} requests failed: {failed[0].error}")
        return [
            Completion(
                texts[i],
                tuple(tokens[i]),
                finished[i].finish_reason,
                finished[i].prompt_tokens,
                tuple(logprobs[i]) if p.logprobs is not None else None,
                finished[i].cached_tokens,
                tuple(top[i]) if p.logprobs is not None else None,
            )
            for i, p in zip(ids, per_prompt)
        ]

    def chat(
        self,
        conversations: Sequence[Sequence[dict[str, str]]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Applies the tokenizer's chat template to each conversation, then generates."""
        prompts = [apply_chat_template(self.tokenizer, messages) for messages in conversations]
        return self.generate(prompts, params)
