"""Structured outputs: each guided request's grammar, as a token bitmask for the sampler.

xgrammar (the engine vLLM and SGLang use) compiles a ``GuidedDecoding`` (any JSON object, or a
JSON schema) against the tokenizer's vocabulary, and one ``GrammarMatcher`` per request follows the
tokens it has generated. Before a step samples, ``bitmask`` fills one row per sampled request
(IntTensor[B, ceil(V / 32)], bit j of word w allowing token 32w + j; rows without a grammar allow
everything); ``replica.sampling`` masks the logits with it on the device, so guided and free
requests share a batch. After the host reads a token, ``accept`` advances the request's matcher.

The next mask depends on the last token, so the host must know it before it fills the mask: the
engine completes a step in flight before it schedules one that samples a guided request (the
overlap of asynchronous scheduling is given up for those steps only).

Invariants: a key has a matcher from ``add`` to ``release``; a matcher has accepted exactly the
tokens the engine appended to its request's output.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from replica.errors import RequestRejected
from replica.sampling import all_allowed_bitmask
from replica.sampling_params import GuidedDecoding

log = logging.getLogger(__name__)


class GrammarBook:
    """The matchers of one engine's guided requests (keys: request ids). The compiler is built on
    the first guided request (it reads the whole vocabulary once); compiled grammars are cached
    by xgrammar."""

    def __init__(self, tokenizer: Any | None, vocab_size: int, stop_token_ids: Sequence[int]):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._compiler: Any | None = None
        self.matchers: dict[str, Any] = {}

    def _compile(self, guided: GuidedDecoding) -> Any:
        import xgrammar as xgr

        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
            )
            self._compiler = xgr.GrammarCompiler(info)
        # NOTE: compact JSON (no free whitespace between tokens): a model may otherwise fill its
        # max_tokens with spaces and newlines that the grammar allows (small models do).
        schema = '{"type": "object"}' if guided.kind == "json_object" else guided.spec
        return self._compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)

    def add(self, key: str, guided: GuidedDecoding) -> None:
        """Compiles the request's grammar and starts its matcher; a grammar that does not compile
        (an invalid schema) raises RequestRejected naming ``response_format``."""
        if self.tokenizer is None:
            raise RequestRejected(
                "structured outputs need the model's tokenizer; this model has none",
                "response_format",
            )
        import xgrammar as xgr

        try:
            compiled = self._compile(guided)
        except Exception as error:  # noqa: BLE001 - xgrammar's C++ errors arrive as several types
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else "invalid"
            reason = reason.split("] ", 1)[-1]  # xgrammar prefixes [time] file:line:
            if ": " in reason and ".cc:" in reason:
                reason = reason.split(": ", 1)[1]
            raise RequestRejected(
                f"the JSON schema cannot be used: {reason}", "response_format"
            ) from None
        self.matchers[key] = xgr.GrammarMatcher(compiled)

    def release(self, key: str) -> None:
        self.matchers.pop(key, None)

    def __contains__(self, key: str) -> bool:
        return key in self.matchers

    def bitmask(self, keys: Sequence[str], device: torch.device) -> torch.Tensor | None:
        """The step's mask (IntTensor[len(keys), ceil(V / 32)] on ``device``), or None when no
        key has a grammar."""
        rows = [(i, self.matchers[k]) for i, k in enumerate(keys) if k in self.matchers]
        if not rows:
            return None
        mask = all_allowed_bitmask(len(keys), self.vocab_size)
        for i, matcher in rows:
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(mask, i)
                if not mask[i].any():  # a grammar nothing satisfies (e.g. anyOf []): stop
                    for token in self.stop_token_ids:
                        mask[i, token // 32] |= 1 << (token % 32)
        if device.type == "cuda":
            return mask.pin_memory().to(device, non_blocking=True)
        return mask.to(device)

    def accept(self, key: str, token: int) -> None:
        """Advances ``key``'s matcher by the token its request generated."""
        matcher = self.matchers.get(key)
        if matcher is None or matcher.is_terminated():
            return
        if not matcher.accept_token(token):  # only a bug can get here: the mask allowed it
            log.error("grammar of %s refused token %d that its mask allowed", key, token)
