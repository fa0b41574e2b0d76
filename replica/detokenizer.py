"""Streaming text for generated tokens: incremental detokenization and stop conditions.

* ``IncrementalDetokenizer`` turns token ids into text deltas one token at a time with the
  ``tokenizers`` library's ``DecodeStream``: each step decodes only the tokens since the last
  emitted text, so tokenizers whose pieces depend on their left neighbour (SentencePiece's leading
  space) come out right, and nothing is emitted while the text ends in an incomplete UTF-8
  character (byte-level / byte-fallback tokens). A few prompt tokens prime the stream as context.
* ``StopChecker`` finds stop strings in the streamed text, cuts the output before the earliest one
  and holds back any tail that might still become one, so a client never sees part of a stop string.
* ``OutputStream`` wires both to one request's ``SamplingParams``: token id in, text delta and
  finish reason ("stop": EOS, a stop token id or a stop string; "length": max_tokens) out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

if TYPE_CHECKING:
    from replica.sampling_params import SamplingParams

FinishReason = Literal["stop", "length"]

_REPLACEMENT = "\ufffd"

# Prompt tokens stepped through ahead of the first generated one, giving it the left context that
# decides e.g. whether a SentencePiece "▁word" renders with its space. A few tokens suffice.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Token ids -> text deltas for one request; concatenated deltas equal the full decode."""

    def __init__(
        self,
        tokenizer: Any,  # a Hugging Face fast tokenizer
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer: Tokenizer = tokenizer.backend_tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        # The stream's state, mirrored for ``flush``: the tokens of its last text, and those since.
        self._read: list[int] = []
        self._unread: list[int] = []
        self._chunks: list[str] = []
        self.token_ids: list[int] = []
        # The context's text is not output, nor the bytes of a character it ends inside of.
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        while context and self._decode(context).endswith(_REPLACEMENT):
            context.pop()
        for token_id in context:
            self._step(token_id)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes (possibly "")."""
        self.token_ids.append(token_id)
        self._chunks.append(self._step(token_id))
        return self._chunks[-1]

    def flush(self) -> str:
        """Emit the text held for an incomplete character (it ends in U+FFFD); the last call."""
        prefix = self._decode(self._read)
        self._read, self._unread = self._read + self._unread, []
        self._chunks.append(self._decode(self._read)[len(prefix) :])
        return self._chunks[-1]

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _step(self, token_id: int) -> str:
        self._unread.append(token_id)
        try:
            delta = self._stream.step(self._tokenizer, token_id)
        except Exception as error:  # tokenizers raises a plain Exception
            if "Invalid prefix" not in str(error):
                raise
            # A decoder rewrote emitted text (e.g. a Replace across tokens): go on from the held
            # tokens in a new stream, without taking back what was emitted.
            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            unread, self._read, self._unread = self._unread, [], []
            return "".join([self._step(t) for t in unread])
        if delta is None:
            return ""
        self._read, self._unread = self._unread, []
        return delta


class StopChecker:
    """Stop strings and stop tokens of one request, applied to its streamed text.

    ``feed(delta)`` returns the text that is safe to stream now. Text is held back while its tail is
    a proper prefix of some stop string; once a stop string appears, the output is cut before the
    earliest occurrence (the stop string itself is not output, as in OpenAI's API) and the checker
    finishes with reason "stop". Generation ends at the first delta that completes any stop string,
    so of "a" and "baa" in "b" + "aa", "baa" wins (earliest start), but in "ba" + "a", "a" does.
    """

    def __init__(
        self,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        eos_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._stop = tuple(stop)
        self._stop_token_ids = frozenset(stop_token_ids)
        self._eos_token_ids = frozenset(() if ignore_eos else eos_token_ids)
        # Invariant: no stop string occurs in emitted + pending, and any future occurrence starts
        # inside pending (emitted text never ends with a proper prefix of a stop string).
        self._pending = ""
        self._emitted: list[str] = []
        self.finish_reason: FinishReason | None = None
        # The matched stop string, or the stop token id (None for EOS or "length").
        self.stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The output text streamed so far (final once finished)."""
        return "".join(self._emitted)

    def token_stops(self, token_id: int) -> bool:
        """Whether generating ``token_id`` ends the request with reason "stop"."""
        return token_id in self._stop_token_ids or token_id in self._eos_token_ids

    def feed(self, delta: str) -> str:
        """Add newly decoded text; return what may be streamed now. Ignored once finished."""
        if self.finished or not delta:
            return ""
        pending = self._pending + delta
        match = self._earliest_stop(pending)
        if match is not None:
            start, stop = match
            self._pending = ""
            self.finish_reason, self.stop_reason = "stop", stop
            return self._emit(pending[:start])
        hold = self._held_suffix_len(pending)
        self._pending = pending[len(pending) - hold :]
        return self._emit(pending[: len(pending) - hold])

    def finish(self, reason: FinishReason, stop_reason: str | int | None = None) -> str:
        """End the request for a reason other than a stop string; release the held-back text."""
        if self.finished:
            return ""
        self.finish_reason, self.stop_reason = reason, stop_reason
        pending, self._pending = self._pending, ""
        return self._emit(pending)

    def _emit(self, text: str) -> str:
        if text:
            self._emitted.append(text)
        return text

    def _earliest_stop(self, text: str) -> tuple[int, str] | None:
        """(start, stop string) of the earliest occurrence in ``text``; longest on a tie."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            start = text.find(stop)
            if start < 0:
                continue
            if best is None or start < best[0] or (start == best[0] and len(stop) > len(best[1])):
                best = (start, stop)
        return best

    def _held_suffix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        hold = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:k]):
                    hold = k
                    break
        return hold


@dataclass(frozen=True)
class StreamDelta:
    """What one generated token adds to a request's stream."""

    text: str
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None


class OutputStream:
    """One request's generated tokens -> streamed text and finish reason."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        eos_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)
        self._checker = StopChecker(
            params.stop, params.stop_token_ids, eos_token_ids, params.ignore_eos
        )
        self._params = params
        self.token_ids: list[int] = []

    @property
    def text(self) -> str:
        return self._checker.text

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._checker.finish_reason

    @property
    def stop_reason(self) -> str | int | None:
        return self._checker.stop_reason

    @property
    def finished(self) -> bool:
        return self._checker.finished

    def add(self, token_id: int) -> StreamDelta:
        """Account for one sampled token. Raises ``RuntimeError`` once finished."""
        if self.finished:
            raise RuntimeError("OutputStream.add after the request finished")
        self.token_ids.append(token_id)
        checker = self._checker
        if checker.token_stops(token_id):
            # The stop token's own text is not output; text held for an incomplete character before
            # it is released (and may still complete a stop string).
            text = checker.feed(self._detokenizer.flush())
            reason = token_id if token_id in self._params.stop_token_ids else None
            text += checker.finish("stop", reason)
        else:
            text = checker.feed(self._detokenizer.add(token_id))
            if not checker.finished and len(self.token_ids) >= self._params.max_tokens:
                text += checker.feed(self._detokenizer.flush())
                text += checker.finish("length")
        return StreamDelta(text, checker.finish_reason, checker.stop_reason)
