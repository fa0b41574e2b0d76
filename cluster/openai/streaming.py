"""A reply streamed as server-sent events: the framing of every event (``sse_event``), the chunks
of one reply shaped as its choices' outputs come in (``ReplyStream``), and the choices' streams
merged into one (``merged``).

A stream, as OpenAI's: chat's first chunk per choice names the role; then each choice's deltas as
they come, each chunk with its choice's index and its tokens' logprobs when asked. A tool mode's
choice goes through its ``ToolCallStream``: text it holds back (from where a ``<tool_call>`` block
may start) waits, its logprobs with it, and calls go out as OpenAI's tool-call deltas. The chunk
that ends the last choice carries the usage, unless ``stream_options.include_usage`` asks OpenAI's
way: ``"usage": null`` in every chunk and a last chunk with the usage and no choices. Then
``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from cluster.openai.logprobs import Logprobs
from cluster.openai.responses import (
    Body,
    ChatCompletionChunk,
    Chunk,
    Delta,
    LogprobsBody,
    chat_chunk,
    completion_chunk,
    usage,
    usage_chunk,
)
from cluster.openai.tool_calls import ToolCallStream, Tools
from replica.request import RequestOutput

#: What the last event of a stream carries.
DONE = "[DONE]"


def sse_event(data: Body | str) -> str:
    """One server-sent event: a body as its JSON, or ``DONE``."""
    return f"data: {data if isinstance(data, str) else data.to_json()}\n\n"


class ReplyStream:
    """The chunks of one streamed reply (its ``n`` choices), shaped as their outputs come in:
    ``opening()``, then ``chunks()`` of each output, then ``closing()``."""

    def __init__(
        self,
        reply_id: str,
        model: str,
        chat: bool,
        prompt_tokens: int,
        logprobs: Sequence[Logprobs | None],
        include_usage: bool,
        tools: Tools | None = None,
    ) -> None:
        self.reply_id, self.model, self.chat = reply_id, model, chat
        self.prompt_tokens, self.include_usage = prompt_tokens, include_usage
        self.logprobs = list(logprobs)
        choices = len(self.logprobs)
        self.parsers = [
            ToolCallStream(tools.mode, tools.named) if tools is not None and chat else None
            for _ in range(choices)
        ]
        self.tokens = [0] * choices  # each choice's completion tokens so far
        self.cached = [0] * choices  # prompt tokens the prefix cache held
        self.finished = 0  # choices finished

    @property
    def done(self) -> bool:
        return self.finished == len(self.logprobs)

    def opening(self) -> list[Chunk]:
        """Chat's first chunk of each choice, naming the role; none for completions."""
        if not self.chat:
            return []
        bodies: list[Chunk] = [
            chat_chunk(self.reply_id, self.model, Delta(role="assistant"), None, None, index)
            for index in range(len(self.logprobs))
        ]
        return self._with_usage(bodies)

    def chunks(self, index: int, output: RequestOutput) -> list[Chunk]:
        """Choice ``index``'s chunks of its next output (none while a tool mode holds its text
        back); the chunk that ends the last choice carries the usage (unless include_usage)."""
        self.tokens[index] = output.completion_tokens
        self.cached[index] = output.cached_tokens
        self.finished += output.finished
        logprobs = self.logprobs[index]
        if logprobs is not None:
            logprobs.add_output(output)
        bodies: list[Chunk] = []
        if self.chat:
            bodies += self._chat_chunks(index, output)
        else:
            text, reason, taken = output.text, output.finish_reason, self._take(index)
            bodies.append(completion_chunk(self.reply_id, self.model, text, reason, taken, index))
        return self._with_usage(bodies)

    def closing(self) -> list[Chunk]:
        """With include_usage, once every choice finished: the chunk of the usage alone."""
        if not (self.include_usage and self.done):
            return []
        prompt, tokens = self.prompt_tokens, sum(self.tokens)
        cached = self.cached[0]  # the prompt is counted once
        return [usage_chunk(self.reply_id, self.model, self.chat, prompt, tokens, cached)]

    def _chat_chunks(self, index: int, output: RequestOutput) -> list[ChatCompletionChunk]:
        reason, parser = output.finish_reason, self.parsers[index]
        if parser is None:
            deltas = [Delta(content=output.text) if output.text else Delta()]
        else:
            deltas = parser.feed(output.text) + (parser.finish() if output.finished else [])
            if not deltas and not output.finished:
                return []
            reason = "tool_calls" if parser.calls and reason == "stop" else reason
        logprobs = self._take(index)
        deltas = deltas or [Delta()]
        last = len(deltas) - 1
        return [
            chat_chunk(
                self.reply_id,
                self.model,
                delta,
                reason if i == last else None,
                logprobs if i == 0 else None,
                index,
            )
            for i, delta in enumerate(deltas)
        ]

    def _take(self, index: int) -> LogprobsBody | None:
        """The logprobs of the choice's tokens since its last chunk; None (as OpenAI's) when it has
        none, e.g. the last chunk of a reply ended by its stop token."""
        logprobs = self.logprobs[index]
        return logprobs.take() if logprobs is not None and logprobs.pending else None

    def _with_usage(self, bodies: list[Chunk]) -> list[Chunk]:
        """``"usage": null`` on every chunk with include_usage; else the usage on the chunk that
        ends the last choice."""
        if self.include_usage:
            for body in bodies:
                body.usage = None
        elif bodies and self.done:
            bodies[-1].usage = usage(self.prompt_tokens, sum(self.tokens), self.cached[0])
        return bodies


async def merged(streams: Sequence[Any]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The outputs of several streams as they come, each with its stream's index; a stream's
    exception is raised here once the outputs before it are out. Close it (``aclosing``) to stop
    reading the streams."""
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: Any) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
        except Exception as error:  # noqa: BLE001 - raised to the reader below
            await queue.put((index, error))
        await queue.put((index, None))

    pumps = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    running = len(pumps)
    try:
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()
