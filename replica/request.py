"""A request's life inside one engine, and what the engine reports for it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from replica.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from replica.detokenizer import OutputStream


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class RequestOutput:
    """What one step added to a request (a streaming delta), and where the request stands."""

    request_id: str
    text: str  # new text since the last output
    token_ids: tuple[int, ...]  # new token ids since the last output
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort"
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[float, ...] | None = None  # chosen tokens' logprobs, for token_ids
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None
    error: str | None = None  # set when the request failed rather than finished
    replica: str | None = None  # set by the serving layer: which replica produced it
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (not computed again)
    # The last of token_ids is the stop token (EOS or a stop token id) that ended the request: it
    # counts as generated, but its text is not in the output (OpenAI's logprobs leave it out too).
    stop_token: bool = False


@dataclass(eq=False)
class Request:
    """Token ids known so far = prompt + output; ``computed`` of them have K/V in the cache.

    A running request feeds ``num_tokens - computed`` tokens next: many while prefilling (in
    chunks), one while decoding. Preemption by recompute resets ``computed`` to 0 and keeps the
    output, so the request re-prefills prompt + output and continues exactly where it was.

    With asynchronous scheduling a token may be *in flight*: sampled on the device by a step
    whose result the host has not read yet. It counts in ``num_tokens`` (so the next step can be
    scheduled to feed it) but not in ``output_token_ids``; the next step reads it on the device,
    from row ``in_flight_row`` of that step's sampled tokens.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]  # as the serving layer sent them (GenerateRequest's type)
    params: SamplingParams
    stream: OutputStream | None
    generator: torch.Generator | None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    slot: int | None = None
    computed: int = 0
    preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_reason: str | None = None
    #: Tokens sampled on the device, not read yet: 1 while a step is in flight, 2 for the moment
    #: between launching the next step and reading the previous one's tokens.
    in_flight: int = 0
    in_flight_row: int = -1  # the newest one's row in its step's sampled tokens
    #: Prompt tokens the prefix cache held when it was first admitted.
    cached_tokens: int = 0
    #: Known tokens when it was last admitted: its slot indexes their full blocks for the prefix
    #: cache as its steps write them (``Scheduler`` holds back a waiting request that is about to
    #: find them there).
    admitted_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.in_flight

    @property
    def out_of_tokens(self) -> bool:
        """Its last token (``max_tokens``) is known or in flight: nothing left to compute."""
        return len(self.output_token_ids) + self.in_flight >= self.params.max_tokens

    @property
    def pending_tokens(self) -> int:
        return self.num_tokens - self.computed

    @property
    def max_total_tokens(self) -> int:
        """Tokens the slot must hold at most: the prompt and every token it may generate."""
        return len(self.prompt_token_ids) + self.params.max_tokens

    def known_token_ids(self) -> tuple[int, ...]:
        """The prompt and the output the host has read (not a token in flight)."""
        return (*self.prompt_token_ids, *self.output_token_ids)

    def token_ids(self, start: int, stop: int) -> Sequence[int]:
        prompt = len(self.prompt_token_ids)
        if stop <= prompt:
            return self.prompt_token_ids[start:stop]
        if start >= prompt:  # decode: no copy of the whole history on every step
            return self.output_token_ids[start - prompt : stop - prompt]
        return (*self.prompt_token_ids[start:], *self.output_token_ids[: stop - prompt])
