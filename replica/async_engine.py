"""Streaming on top of the engine: one background thread runs steps while there is work; callers
await per-request async iterators of ``RequestOutput`` deltas. The engine is warmed up first
(``LLMEngine.warm_up``: decode CUDA graphs captured on a GPU). Leaving the iterator early (client
disconnect, cancellation) aborts the request and frees its slot at once.

Callers (new requests, aborts, stats) take turns with the loop: between two steps the loop lets
every waiting caller in first, so none waits longer than the step that is running (with a plain
lock, which the loop may re-take at once, a caller could wait for many steps under load). The
async methods wait in a worker thread, never on the caller's event loop, which streams every
other request's tokens.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from replica.engine import LLMEngine
from replica.engine_config import EngineConfig
from replica.engine_stats import EngineSnapshot, EngineStats, RoutingStats
from replica.request import RequestOutput
from replica.sampling_params import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, engine: LLMEngine | None = None) -> None:
        self.engine = engine or LLMEngine(config)
        captured = self.engine.warm_up()  # before serving: no request pays for a graph capture
        if captured:
            log.info("captured %d decode CUDA graphs", captured)
        self._lock = threading.Lock()  # guards the engine: the loop thread and callers
        self._turn = threading.Condition()  # guards _callers; the loop waits on it between steps
        self._callers = 0  # callers waiting for the engine or using it
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="vattn-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def broken(self) -> str | None:
        """Why the replica takes no more requests (a rank was lost), else None."""
        return self.engine.broken

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        announce: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """The request's deltas, the last one ``finished``. Raises RequestRejected (a ValueError)
        before anything is queued if it can never be served. With ``announce`` the first output is
        an empty delta sent as soon as the request is queued: a remote caller learns at once
        whether the engine accepted it (the ingress answers a rejection with a 400)."""
        request_id = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def add(engine: LLMEngine) -> int:
            request = engine.add_request(
                request_id, prompt, params
            )  # RequestRejected if impossible
            self._queues[request_id] = (loop, queue)
            return len(request.prompt_token_ids)

        adding = asyncio.ensure_future(asyncio.to_thread(self._call, add))
        try:
            prompt_tokens = await asyncio.shield(adding)
        except asyncio.CancelledError:  # the caller left while its request was being added

            def forget(done: asyncio.Future[None]) -> None:
                if done.exception() is None:
                    loop.run_in_executor(None, self._forget, request_id)

            adding.add_done_callback(forget)
            raise
        self._wake.set()
        finished = False
        try:
            if announce:
                yield RequestOutput(request_id, "", (), False, None, prompt_tokens, 0)
            while not finished:
                output = await queue.get()
                finished = output.finished
                yield output
        finally:
            if finished:
                self._queues.pop(request_id, None)
            else:
                self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        """Aborts a request nobody reads any more."""
        self._queues.pop(request_id, None)
        self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._engine():
            self.engine.abort(request_id)

    # What the serving layer reads, each a frozen snapshot taken between two steps (blocking: from
    # an event loop, call them in a worker thread, e.g. ``asyncio.to_thread``).
    def stats(self) -> EngineStats:
        """The engine's gauges, counters and KV books (``LLMEngine.stats``)."""
        with self._engine():
            return self.engine.stats()

    def routing_stats(self) -> RoutingStats:
        """What the router and the autoscaler weigh (``LLMEngine.routing_stats``)."""
        with self._engine():
            return self.engine.routing_stats()

    def snapshot(self) -> EngineSnapshot:
        """The metrics snapshot (``LLMEngine.snapshot``); it drains the latency samples and map
        latencies, so the metrics pusher is its only caller."""
        with self._engine():
            return self.engine.snapshot()

    @property
    def context_limit(self) -> int:
        """The most tokens (prompt + max_tokens) one request may hold (fixed at start)."""
        return self.engine.context_limit

    def release_kv_memory(self) -> int:
        """Gives every KV page no request holds back to the device; returns the pages released
        (``LLMEngine.release_kv_memory``, as a replica does when it stops)."""
        with self._engine():
            return self.engine.release_kv_memory()

    def _call(self, function: Callable[[LLMEngine], T]) -> T:
        """Runs ``function(engine)`` between steps."""
        with self._engine():
            return function(self.engine)

    @contextmanager
    def _engine(self) -> Iterator[LLMEngine]:
        """The engine, to a caller: it goes before the loop's next step."""
        with self._turn:
            self._callers += 1
        try:
            with self._lock:
                yield self.engine
        finally:
            with self._turn:
                self._callers -= 1
                self._turn.notify_all()

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def shutdown(self) -> None:
        """Stops the engine's other tensor-parallel ranks, if any (between two steps), then the
        loop."""
        with self._engine():
            self.engine.shutdown()
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stopping:
            self._wake.wait()
            with self._turn:  # callers first; a flood of them delays a step by 50 ms at most
                self._turn.wait_for(lambda: self._callers == 0, timeout=0.05)
            with self._lock:
                if not self.engine.has_work():
                    self._wake.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as error:  # a broken step fails its requests, not the process
                    log.exception("engine step failed")
                    outputs = self._fail_all(error)
            for output in outputs:
                target = self._queues.get(output.request_id)
                if target is not None:
                    loop, queue = target
                    loop.call_soon_threadsafe(queue.put_nowait, output)

    def _fail_all(self, error: Exception) -> list[RequestOutput]:
        failed = []
        for request_id in list(self.engine.requests):
            request = self.engine.requests[request_id]
            self.engine.abort(request_id)
            failed.append(
                RequestOutput(
                    request_id,
                    "",
                    (),
                    True,
                    "abort",
                    len(request.prompt_token_ids),
                    len(request.output_token_ids),
                    error=f"{type(error).__name__}: {error}",
                )
            )
        return failed
