"""The engine of one replica: scheduler → vAttention cache → model → sampler.

    engine = LLMEngine(EngineConfig(model="embedded"))
    engine.add_request("r1", "Hello", SamplingParams(max_tokens=8, temperature=0))
    while engine.has_work():
        for output in engine.step(): ...

Each step waits for the pages the previous step submitted, schedules, submits the *next* step's
pages to the mapping worker, then runs the model while the worker maps.

Asynchronous scheduling (``EngineConfig.async_scheduling``, one rank): ``step()`` schedules and
launches step N+1 *before* it reads step N's sampled tokens, so the host's scheduling, planning and
output processing overlap the device's work instead of adding to it. A token still on the device
is fed to the next step there (``Request.in_flight``); a request that stopped (EOS, stop string,
abort) while its next step was already launched gets that step's token dropped; its slot is
released once that step is done (``Scheduler.step_completed``). Outputs arrive one ``step()`` later.

With ``tensor_parallel_size > 1`` this process is rank 0 of the replica (replica.tp): the scheduler
decides on a recording allocator and every step runs on all ranks; a rank failing before the model
fails the step's requests, one failing later breaks the replica (``broken``; every request fails).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from replica.detokenizer import OutputStream
from replica.engine_config import EngineConfig
from replica.engine_stats import (
    EngineSnapshot,
    EngineStats,
    LatencyLog,
    RankKVSnapshot,
    RoutingStats,
)
from replica.errors import ReplicaBroken, RequestRejected
from replica.grammar import GrammarBook
from replica.growth_reserve import GrowthReserve
from replica.kv.base import KVCache
from replica.kv.stats import KVCacheStats
from replica.model.source import load_tokenizer, model_source
from replica.model_runner import ModelRunner, StepPlan
from replica.request import Request, RequestOutput, RequestStatus
from replica.request_checks import RequestChecks
from replica.sampling import HostCopy, SamplingParams, TokenHistory, make_generator, sample
from replica.scheduler import ScheduledStep, Scheduler
from replica.tp import StepFailed
from replica.warm_up import decode_every_graph

if TYPE_CHECKING:
    from replica.tp.driver import TensorParallelDriver
    from replica.tp.runtime import RankRuntime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchedStep:
    """A step running on the device; its sampled tokens are on their way to the host."""

    sampled: tuple[Request, ...]
    tokens: torch.Tensor | None  # the sampled token ids, on the device (read by the next step)
    copy: HostCopy | None


def _aborted(request: Request, error: str | None = None) -> RequestOutput:
    """The last output of a request that was stopped (aborted, or failed with ``error``)."""
    return RequestOutput(
        request.request_id,
        "",
        (),
        True,
        "abort",
        len(request.prompt_token_ids),
        len(request.output_token_ids),
        error=error,
    )


class LLMEngine:
    def __init__(self, config: EngineConfig, tp_runtime: RankRuntime | None = None) -> None:
        self.device = config.torch_device()
        model_dir, model_config = model_source(config.model, config.synthetic)
        #: Rank 0's side of the tensor-parallel group (None when tensor_parallel_size == 1).
        self.tp: TensorParallelDriver | None = None
        #: Why the replica takes no more requests (a rank was lost), else None.
        self.broken: str | None = None
        if config.tensor_parallel_size > 1:
            from replica.tp.driver import TensorParallelDriver

            self.tp = TensorParallelDriver(config, model_config, tp_runtime)
            self.runner = self.tp.runner
            # The scheduler's cache calls are recorded and replayed on the other ranks.
            self.kv: KVCache = self.tp.kv
        else:
            self.runner = ModelRunner(config, model_dir, model_config)
            self.kv = self.runner.kv  # the scheduler decides with this rank's pages
        #: Rank 0's config, every default decided (EngineConfig.resolved).
        self.config = config = self.runner.config
        self.model_config = model_config
        self.tokenizer = load_tokenizer(model_dir) if model_dir is not None else None
        self.eos_token_ids = tuple(model_config.eos_token_ids)
        self.scheduler = Scheduler(
            self.kv,
            config.max_batch_tokens,
            config.max_running,
            config.watermark_pages,
            GrowthReserve.from_config(config.growth_reserve),
            admission_map_wait_s=config.admission_map_wait_s,
        )
        self.checks = RequestChecks(config.max_model_len, model_config, self.kv)
        self.requests: dict[str, Request] = {}
        #: Penalized requests' seen tokens (on the device) and guided requests' grammars.
        self.history = TokenHistory(model_config.vocab_size, self.device)
        self.grammars = GrammarBook(self.tokenizer, model_config.vocab_size, self.eos_token_ids)
        #: Overlap the host's work with the device's (one rank: a TP step is synchronous).
        self.async_scheduling = config.async_scheduling and self.tp is None
        self._launched: LaunchedStep | None = None  # the step in flight
        self.latency = LatencyLog()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    # ---- requests ------------------------------------------------------------------------------
    def tokenize(self, prompt: str | Sequence[int]) -> tuple[int, ...]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestRejected("this model has no tokenizer: send token ids", "prompt")
            return tuple(self.tokenizer.encode(prompt))
        return tuple(prompt)

    def add_request(
        self, request_id: str, prompt: str | Sequence[int], params: SamplingParams
    ) -> Request:
        """Queues a request, or raises RequestRejected (a ValueError) if it can never be served;
        nothing is queued then."""
        if self.broken is not None:
            raise ReplicaBroken(self.broken)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        token_ids = self.check(self.tokenize(prompt), params)
        stream = (
            OutputStream(self.tokenizer, token_ids, params, self.eos_token_ids)
            if self.tokenizer is not None
            else None
        )
        generator = make_generator(params.seed, self.device) if params.seed is not None else None
        if params.guided is not None:
            self.grammars.add(request_id, params.guided)  # an invalid schema is rejected here
        if params.penalized:
            self.history.add(request_id, token_ids)
        request = Request(request_id, token_ids, params, stream, generator)
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request

    @property
    def context_limit(self) -> int:
        """The most tokens (prompt + max_tokens) one request may hold (``RequestChecks``)."""
        return self.checks.context_limit

    def check(self, token_ids: Sequence[int], params: SamplingParams) -> tuple[int, ...]:
        """Every check a request passes before it is queued (``replica.request_checks``): returns
        the ids as a tuple, or raises RequestRejected (a ValueError) naming the problem."""
        return self.checks.check(token_ids, params)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops a request and frees its slot at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self._forget(request_id)
        self.scheduler.finish(request, "abort")
        return _aborted(request)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._launched is not None

    def warm_up(self) -> int:
        """Captures the decode CUDA graphs of every batch size before serving, so that no request
        pays for a capture (``replica.warm_up``). Returns the graphs captured (0 without graphs).
        Call it before adding requests."""
        graphs = self.runner.graphs if self.tp is None else None
        if graphs is None or self.has_work():
            return 0
        decode_every_graph(self, graphs.sizes)
        self.kv.synchronize()
        # The throw-away requests are not traffic: the request counters start from here.
        self.latency, self.prompt_tokens_total, self.generation_tokens_total = LatencyLog(), 0, 0
        return len(graphs.graphs)

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs a step. With asynchronous scheduling it launches the next step first, then returns
        the outputs of the step launched by the previous call."""
        previous, self._launched = self._launched, None
        outputs: list[RequestOutput] = []
        if previous is not None and any(r.request_id in self.grammars for r in previous.sampled):
            outputs += self._complete(previous)  # a grammar's next mask needs the token on the host
            previous = None
        scheduled = self.scheduler.schedule(preempt=previous is None)
        if scheduled is None and previous is not None and self.scheduler.blocked:
            outputs += self._complete(previous)  # preemption needs the step in flight done
            previous = None
            scheduled = self.scheduler.schedule()
        launched = None
        if scheduled is not None:
            try:
                launched = self._launch(scheduled, previous)
            except StepFailed as failure:  # tensor parallel, so nothing was in flight
                return self._fail(
                    list(self.requests.values()) if failure.broken else list(scheduled.requests),
                    failure,
                )
            except Exception as error:  # the step's requests fail; the engine goes on
                log.exception("a step of %d requests failed", len(scheduled.requests))
                if previous is not None:
                    outputs += self._complete(previous)
                return outputs + self._fail(
                    list(scheduled.requests),
                    StepFailed(f"{type(error).__name__}: {error}", broken=False),
                )
        if previous is not None:
            outputs += self._complete(previous)
        if launched is not None and self.async_scheduling:
            self._launched = launched
        elif launched is not None:
            outputs += self._complete(launched)
        return outputs

    def _launch(self, scheduled: ScheduledStep, previous: LaunchedStep | None) -> LaunchedStep:
        """Plans and runs the step and starts sampling; returns without waiting for the device."""
        now = time.monotonic()
        for request in scheduled.requests:
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
        plan, sampled, patches = self._plan(scheduled)
        if self.tp is not None:
            logits = self.tp.execute(plan)
        else:
            logits = self.runner.execute(
                plan, patches, previous.tokens if previous is not None else None
            )
        for request, query in zip(scheduled.requests, scheduled.query_lens):
            request.computed += query
        tokens = copy = None
        if sampled:
            keys = [r.request_id for r in sampled]
            history_rows = [self.history.row(k) for k in keys] if self.history.rows else []
            with torch.inference_mode():
                result = sample(
                    logits,
                    [r.params for r in sampled],
                    [r.generator for r in sampled],
                    self.history,
                    history_rows,
                    self.grammars.bitmask(keys, logits.device) if self.grammars.matchers else None,
                )
                self.history.record(history_rows, result.token_ids)  # on the device, in order
            tokens, copy = result.token_ids, result.to_host_async()
            for row, request in enumerate(sampled):
                request.in_flight += 1
                request.in_flight_row = row
        self.scheduler.launched(scheduled.requests)
        return LaunchedStep(tuple(sampled), tokens, copy)

    def _fail(self, requests: list[Request], failure: StepFailed) -> list[RequestOutput]:
        """Ends ``requests`` with ``error`` set (their slots are freed; under TP the release reaches
        the other ranks with the next message); a broken replica takes no more requests."""
        if failure.broken:
            self.broken = str(failure)
        outputs = []
        for request in requests:
            self.scheduler.finish(request, "abort")
            self.requests.pop(request.request_id, None)
            self._forget(request.request_id)
            outputs.append(_aborted(request, error=str(failure)))
        return outputs

    def _plan(
        self, scheduled: ScheduledStep
    ) -> tuple[StepPlan, list[Request], tuple[tuple[int, int], ...]]:
        """The step's plan, the requests it samples, and (input row, row of the previous step's
        sampled tokens) for each token still in flight."""
        input_ids: list[int] = []
        rows, sampled, patches = [], [], []
        for request, context, query in zip(
            scheduled.requests, scheduled.context_lens, scheduled.query_lens
        ):
            known = len(request.prompt_token_ids) + len(request.output_token_ids)  # on the host
            input_ids += request.token_ids(context, min(context + query, known))
            if context + query > known:  # its last token is still on the device
                assert request.in_flight == 1 and context + query == known + 1
                patches.append((len(input_ids), request.in_flight_row))
                input_ids.append(0)
            if context + query == request.num_tokens:  # its last token: sample the next
                rows.append(len(input_ids) - 1)
                sampled.append(request)
            self.prompt_tokens_total += max(
                0, min(context + query, len(request.prompt_token_ids)) - context
            )
        plan = StepPlan(
            tuple(r.slot for r in scheduled.requests),  # type: ignore[misc]
            scheduled.context_lens,
            scheduled.query_lens,
            tuple(input_ids),
            tuple(rows),
        )
        return plan, sampled, tuple(patches)

    def _complete(self, launched: LaunchedStep) -> list[RequestOutput]:
        """Waits for a launched step's tokens and turns them into outputs. Requests that ended
        while it ran (stop, abort) get nothing: their token is dropped."""
        result = launched.copy.wait() if launched.copy is not None else None
        self.scheduler.step_completed()
        if result is None:  # prefill chunks only: nothing sampled
            return []
        now = time.monotonic()
        outputs = []
        for i, request in enumerate(launched.sampled):
            request.in_flight -= 1
            if request.status is RequestStatus.FINISHED:
                continue
            token = result.token_ids[i]
            request.output_token_ids.append(token)
            self.grammars.accept(request.request_id, token)
            self.generation_tokens_total += 1
            self.latency.token(request, now)
            text, reason = "", None
            if request.stream is not None:
                delta = request.stream.add(token)
                text, reason = delta.text, delta.finish_reason
            else:
                reason = self._finish_without_text(request, token)
            if reason is not None:
                self.scheduler.finish(request, reason)
                self.requests.pop(request.request_id, None)
                self._forget(request.request_id)
                self.latency.finished(request, now)
            outputs.append(
                RequestOutput(
                    request.request_id,
                    text,
                    (token,),
                    reason is not None,
                    reason,
                    len(request.prompt_token_ids),
                    len(request.output_token_ids),
                    (result.logprobs[i],)
                    if result.logprobs is not None and request.params.logprobs is not None
                    else None,
                    (tuple(result.top_logprobs[i]),)
                    if result.top_logprobs is not None and request.params.logprobs
                    else None,
                    cached_tokens=request.cached_tokens,
                    stop_token=reason == "stop" and self._is_stop_token(request, token),
                )
            )
        return outputs

    def _forget(self, request_id: str) -> None:
        """Frees what the sampler kept for a request that ended (its history row, its grammar)."""
        self.history.release(request_id)
        self.grammars.release(request_id)

    def _is_stop_token(self, request: Request, token: int) -> bool:
        """Whether sampling ``token`` ends ``request`` (a stop token id, or EOS unless ignored)."""
        params = request.params
        return token in params.stop_token_ids or (
            not params.ignore_eos and token in self.eos_token_ids
        )

    def _finish_without_text(self, request: Request, token: int) -> str | None:
        if self._is_stop_token(request, token):
            return "stop"
        return "length" if len(request.output_token_ids) >= request.params.max_tokens else None

    def stats(self, drain_latency: bool = False) -> EngineStats:
        """The scheduler's gauges, the counters' totals and the KV books (under tensor parallelism
        ``pages_available`` is the least over ranks). ``latency``: the recent window of samples,
        or with ``drain_latency`` the samples since the last drain (taken away)."""
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            preemptions_total=self.scheduler.preemptions_total,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            kv=self._kv_stats(),
            latency=self.latency.drain() if drain_latency else self.latency.snapshot(),
            growth_reserve_ratio=self.scheduler.growth.ratio,
        )

    def snapshot(self) -> EngineSnapshot:
        """Everything the serving layer reports about this replica, frozen: the stats with the
        latency samples since the previous snapshot, this rank's own cache (map latencies
        drained), and why the replica is broken. Drains: one caller (the metrics pusher)."""
        return EngineSnapshot(self.stats(drain_latency=True), self.rank_kv_snapshot(), self.broken)

    def rank_kv_snapshot(self) -> RankKVSnapshot:
        """This process's rank cache: its own books and the map latencies since the last call."""
        return RankKVSnapshot(
            self.config.rank, self.runner.kv.stats(), tuple(self.runner.kv.drain_map_latencies())
        )

    def routing_stats(self) -> RoutingStats:
        """What the router weighs (``cluster.routing``), taken at once between two steps."""
        stats = self._kv_stats()
        summary = self.kv.prefix_summary() if self.broken is None else None
        return RoutingStats(
            available_pages=0 if self.broken is not None else stats.pages_available,
            queued_pages=self.scheduler.waiting_pages(),
            committed_pages=self.scheduler.committed_pages(),
            total_pages=stats.pages_total,
            tokens_per_page=self.kv.tokens_per_page,
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            demand_pages=self._demand_pages(stats),
            prefix_root=summary.root if summary else 0,
            prefix_tokens_per_block=summary.tokens_per_block if summary else 0,
            prefix_keys=frozenset(summary.keys) if summary else frozenset(),
            prefix_host_keys=frozenset(summary.host_keys) if summary else frozenset(),
            timestamp=time.time(),
        )

    def _demand_pages(self, stats: KVCacheStats) -> int:
        """Pages this replica's requests are expected to hold at once (the autoscaler's input,
        ``cluster.autoscaling``): those in use, the rest of the running requests' prompts and
        their expected growth (admission's reserve), and the waiting requests' prompts and
        expected growth."""
        growth, pages = self.scheduler.growth, self.kv.pages_for
        queued = sum(
            pages(r.num_tokens + growth.expected_tokens(r)) for r in self.scheduler.waiting
        )
        return stats.pages_in_use + growth.pages(self.scheduler.running, pages) + queued

    def _kv_stats(self) -> KVCacheStats:
        stats = self.kv.stats()
        if self.tp is None:
            return stats
        return dataclasses.replace(stats, pages_available=self.tp.min_available_pages_over_ranks())

    def shutdown(self) -> None:
        """Stops the other ranks of a tensor-parallel replica (nothing to do with one rank)."""
        if self.tp is not None:
            self.tp.shutdown()

    def release_kv_memory(self) -> int:
        """Gives every KV page no request holds back to the device (``KVCache.shrink``), as a
        replica does when it stops; returns the pages released."""
        return self.kv.shrink()

    def running_requests(self) -> list[Request]:
        return [r for r in self.scheduler.requests() if r.status is RequestStatus.RUNNING]
