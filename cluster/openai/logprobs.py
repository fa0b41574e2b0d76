"""Token strings and logprobs in OpenAI's shapes: each token's own text and UTF-8 bytes
(``TokenStrings``), and one request's logprobs built as its tokens come in (``Logprobs``)."""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cluster.openai.responses import (
    ChatLogprobs,
    CompletionLogprobs,
    LogprobsBody,
    TokenLogprob,
    TopLogprob,
)

if TYPE_CHECKING:
    from replica.request import RequestOutput

#: A token's bytes at most, for a model without a tokenizer (its prompts are token ids).
DEFAULT_TOKEN_BYTES = 16
#: The logprob OpenAI reports for an impossible token (JSON has no -Infinity).
MIN_LOGPROB = -9999.0

#: A position's most likely tokens: (token id, logprob) pairs.
TopPairs = Sequence[tuple[int, float]]


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in chars)
    for n, b in enumerate(extra):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


def _is_byte_level(decoder: dict[str, Any] | None) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "Sequence":
        return any(_is_byte_level(d) for d in decoder.get("decoders", ()))
    return decoder.get("type") == "ByteLevel"


class TokenStrings:
    """Token ids -> each token's own UTF-8 bytes and text, as OpenAI's logprobs show them: a
    token that holds part of a character has text like ``"\\xe2\\x80"`` and its exact bytes.
    Byte-level BPE pieces (GPT-2, Llama 3, Qwen, SmolLM) map back through their alphabet,
    SentencePiece ones through ``▁`` and ``<0xNN>``. Without a tokenizer a token reads
    ``token_id:N`` and has no bytes."""

    def __init__(self, tokenizer: Any | None) -> None:
        self._bytes: list[bytes | None] = []
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            self.max_bytes = DEFAULT_TOKEN_BYTES
            return
        decoder = json.loads(backend.to_str()).get("decoder")
        alphabet = _byte_level_alphabet() if _is_byte_level(decoder) else None
        added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        size = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        for token_id in range(size):
            piece = added.get(token_id)
            if piece is not None:
                self._bytes.append(piece.encode("utf-8", "backslashreplace"))
            else:
                self._bytes.append(self._piece_bytes(backend.id_to_token(token_id), alphabet))
        self.max_bytes = max((len(b) for b in self._bytes if b is not None), default=1)

    @staticmethod
    def _piece_bytes(piece: str | None, alphabet: dict[str, int] | None) -> bytes | None:
        if piece is None:
            return None
        if alphabet is not None and all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("▁", " ").encode("utf-8", "backslashreplace")

    def bytes(self, token_id: int) -> bytes | None:
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else None

    def text(self, token_id: int) -> str:
        raw = self.bytes(token_id)
        return f"token_id:{token_id}" if raw is None else raw.decode("utf-8", "backslashreplace")

    def entry(self, token_id: int, logprob: float) -> TopLogprob:
        """Chat's ``{token, logprob, bytes}`` of one token."""
        raw = self.bytes(token_id)
        bytes_ = None if raw is None else list(raw)
        return TopLogprob(token=self.text(token_id), logprob=finite(logprob), bytes=bytes_)

    def entry_with_top(self, token_id: int, logprob: float, top: TopPairs) -> TokenLogprob:
        """Chat's entry of a generated token: its own, and its position's most likely tokens."""
        own = self.entry(token_id, logprob)
        alternatives = [self.entry(t, lp) for t, lp in top]
        return TokenLogprob(
            token=own.token, logprob=own.logprob, bytes=own.bytes, top_logprobs=alternatives
        )


def finite(logprob: float) -> float:
    """A logprob JSON can carry: -inf (and NaN) become OpenAI's -9999.0."""
    return logprob if math.isfinite(logprob) and logprob > MIN_LOGPROB else MIN_LOGPROB


class Logprobs:
    """One request's logprobs in OpenAI's shapes, built as its tokens come in.

    Chat: ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}],
    "refusal": None}``, the ``top_logprobs`` most likely tokens at each position. Completions:
    ``{tokens, token_logprobs, top_logprobs, text_offset}``, each ``top_logprobs`` dict holding
    the ``logprobs`` most likely tokens and the chosen one (so up to ``logprobs`` + 1), each
    ``text_offset`` where the token's text starts in the completion (a token that ends inside a
    character starts where that character does). There is one entry per generated token but the
    stop token that ended the request (EOS or a stop token id): as in OpenAI's, the tokens'
    texts join into the content, which leaves that token's text out. ``take()`` returns those of
    the tokens added since the last take: a stream's chunk, or the whole reply when taken once.
    """

    def __init__(self, strings: TokenStrings, chat: bool) -> None:
        self.strings, self.chat = strings, chat
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._offset = 0
        self._pending: list[tuple[int, float, TopPairs]] = []

    def add_output(self, output: RequestOutput) -> None:
        """The tokens of one output, less the stop token that ended the request."""
        kept = len(output.token_ids) - output.stop_token
        self.add(output.token_ids[:kept], output.logprobs, output.top_logprobs)

    def add(
        self,
        token_ids: Sequence[int],
        logprobs: Sequence[float] | None,
        top_logprobs: Sequence[TopPairs] | None,
    ) -> None:
        for i, token_id in enumerate(token_ids):
            logprob = logprobs[i] if logprobs is not None and i < len(logprobs) else -math.inf
            top = top_logprobs[i] if top_logprobs is not None and i < len(top_logprobs) else ()
            self._pending.append((token_id, logprob, top))

    @property
    def pending(self) -> int:
        """Tokens added since the last ``take()``."""
        return len(self._pending)

    def take(self) -> LogprobsBody:
        pending, self._pending = self._pending, []
        if self.chat:
            content = [self.strings.entry_with_top(t, lp, top) for t, lp, top in pending]
            return ChatLogprobs(content=content, refusal=None)
        return self._completion(pending)

    def _completion(self, pending: list[tuple[int, float, TopPairs]]) -> CompletionLogprobs:
        shaped = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for token_id, logprob, top in pending:
            text = self.strings.text(token_id)
            alternatives = {self.strings.text(t): finite(lp) for t, lp in top}
            alternatives.setdefault(text, finite(logprob))
            shaped.tokens.append(text)
            shaped.token_logprobs.append(finite(logprob))
            shaped.top_logprobs.append(alternatives)
            shaped.text_offset.append(self._offset)
            raw = self.strings.bytes(token_id)
            self._offset += len(self._decoder.decode(raw if raw is not None else text.encode()))
        return shaped
