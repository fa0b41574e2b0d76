"""Every check a request passes before the engine queues it, in one place (the serving layer calls
it through the replica, ``LLMEngine.check``): a non-empty prompt of ids in the vocabulary whose
prompt + max_tokens fits the context limit and the whole cache. A request that fails one can never
be served: ``RequestRejected`` (a ValueError) names the problem and the field."""

from __future__ import annotations

from collections.abc import Sequence

from replica.errors import RequestRejected
from replica.kv.base import KVCache
from replica.model.config import ModelConfig
from replica.sampling_params import SamplingParams


class RequestChecks:
    """The checks of one engine: its ``max_model_len``, its model's vocabulary and positions, and
    its cache (read at each check: the budget is the cache's)."""

    def __init__(self, max_model_len: int, model_config: ModelConfig, kv: KVCache) -> None:
        self.max_model_len, self.model_config, self.kv = max_model_len, model_config, kv

    @property
    def context_limit(self) -> int:
        """The most tokens (prompt + max_tokens) one request may hold: ``max_model_len``, the
        model's positions, and its sliding window if it has one (Mistral): attention here applies
        no window, and within the window sliding and full attention are the same."""
        window = self.model_config.sliding_window
        limits = (self.max_model_len, self.model_config.max_position_embeddings, window)
        return min(limit for limit in limits if limit is not None)

    def check(self, token_ids: Sequence[int], params: SamplingParams) -> tuple[int, ...]:
        """Returns the ids as a tuple (the one prompt type from the ingress to the request), or
        raises RequestRejected naming the problem."""
        if not token_ids:
            raise RequestRejected("the prompt is empty", "prompt")
        vocab = self.model_config.vocab_size
        bad = next(
            (
                t
                for t in token_ids
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab
            ),
            None,
        )
        if bad is not None:
            raise RequestRejected(
                f"token id {bad!r} is outside the vocabulary [0, {vocab})", "prompt"
            )
        biased = next((t for t, _ in params.logit_bias if t >= vocab), None)
        if biased is not None:
            raise RequestRejected(
                f"logit_bias token id {biased} is outside the vocabulary [0, {vocab})", "logit_bias"
            )
        total = len(token_ids) + params.max_tokens
        if total > self.context_limit:
            window = self.model_config.sliding_window
            why = (
                " (the model's sliding window: attention over a sliding window is not implemented)"
                if window == self.context_limit
                else ""
            )
            raise RequestRejected(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{total} exceeds the "
                f"context limit of {self.context_limit} tokens{why}",
                "max_tokens",
                "context_length_exceeded",
            )
        pages = self.kv.pages_for(total)
        if pages > self.kv.budget_pages:
            raise RequestRejected(
                f"{total} tokens need {pages} KV pages; the whole cache has {self.kv.budget_pages}",
                "max_tokens",
            )
        return tuple(token_ids)
