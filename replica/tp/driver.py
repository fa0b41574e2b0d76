"""Rank 0 of a tensor-parallel replica, in the engine's process: starts the other ranks through a
:class:`~replica.tp.runtime.RankRuntime`, builds its own :class:`~replica.tp.worker.RankWorker`,
and runs each step on every rank.

A step, as rank 0 sees it::

    schedule (the scheduler's allocator calls are recorded)
    broadcast StepMessage(step, plan, recorded calls)       # others replay the calls
    agree on the status (all-reduce MAX)                    # a failed replay/prepare stops here
    run the model (its collectives join all ranks)
    collect every rank's RankStatus (code, reclaimable pages)

Outcomes: all OK -> rank 0's logits; a rank failed before the model -> StepFailed(broken=False)
(the engine fails the step's requests; their slots are released on every rank by the next
message); anything else (a failure in the model, a lost or diverged rank, a timeout) ->
StepFailed(broken=True): the driver shuts the group down and the replica must be restarted.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import NoReturn

import torch
import torch.distributed as dist

from replica.engine_config import EngineConfig
from replica.errors import ReplicaBroken
from replica.kv.recording import RecordingKVCache
from replica.model import ModelConfig
from replica.model_runner import ModelRunner, StepPlan
from replica.tp.plan import (
    RankStatus,
    StatusCode,
    StepFailed,
    StepMessage,
    books,
    check_tensor_parallel,
)
from replica.tp.runtime import LocalProcessRuntime, RankRuntime
from replica.tp.worker import RankWorker, default_timeout

log = logging.getLogger(__name__)

#: How long rank 0 waits for the others' statuses once it knows a step went wrong.
GRACE_S = 5.0


class TensorParallelDriver:
    """Rank 0's side of a replica of ``config.tensor_parallel_size`` ranks.

    ``runner`` is rank 0's ModelRunner; ``kv`` is the recording allocator the scheduler must use.
    """

    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        runtime: RankRuntime | None = None,
        timeout_s: float | None = None,
    ) -> None:
        tp = config.tensor_parallel_size
        check_tensor_parallel(model_config, tp)
        if dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is already initialised in this process: it can be rank 0 of "
                "one tensor-parallel replica at a time (shut the other engine down first)"
            )
        self.timeout_s = timeout_s or default_timeout()
        self.runtime = runtime or LocalProcessRuntime(timeout_s=self.timeout_s)
        self.broken: str | None = None
        self._step = 0
        # Every rank's host tier must hold the same blocks: the ranks replay rank 0's allocator
        # calls, and which blocks a tier keeps follows its capacity (its LRU evictions), so a rank
        # with a smaller tier would miss a restore rank 0 makes and the replay check would break
        # the replica. Rank 0 sizes the tier once, here, and every rank is handed that size
        # rather than resolving its own (its host memory read at another moment, after the
        # others pinned theirs).
        cuda = config.torch_device().type == "cuda"
        config = replace(config, kv_offload_bytes=config.host_tier_bytes(cuda))
        address, port = self.runtime.start(tp, config)
        try:
            self.worker = RankWorker(0, tp, address, port, config, timeout_s=self.timeout_s)
        except BaseException as error:
            others = [s.error for s in self.runtime.collect(GRACE_S) if s.error]
            self.runtime.shutdown()
            raise RuntimeError(
                f"the tensor-parallel replica did not start: rank 0: {error}"
                + "".join(f"; {e}" for e in others)
            ) from error
        ready = self.runtime.collect(self.timeout_s)
        failed = [
            s.error or f"rank {s.rank}: {s.code.name}" for s in ready if s.code is not StatusCode.OK
        ]
        if failed:
            self.shutdown()
            raise RuntimeError("the tensor-parallel replica did not start: " + "; ".join(failed))
        self.runner: ModelRunner = self.worker.runner
        self.kv = RecordingKVCache(self.runner.kv)
        self.rank_pages = {s.rank: s.reclaimable_pages for s in ready}

    # ---- steps ---------------------------------------------------------------------------------
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Runs ``plan`` on every rank; returns rank 0's float32 logits. Raises StepFailed."""
        message = self._send(plan)
        try:
            agreed = self.worker.agree(StatusCode.OK)
        except Exception as error:
            log.exception("rank 0 failed agreeing on the step's status")
            self._fail(message, self.runtime.collect(GRACE_S), f"rank 0 failed agreeing: {error}")
        if agreed is not StatusCode.OK:
            self._fail(message, self.runtime.collect(self.timeout_s))
        try:
            logits = self.runner.execute(plan)
        except Exception as error:
            log.exception("rank 0 failed running the model")
            self.worker.abort()  # the others may be waiting in a collective for rank 0
            self._fail(
                message,
                self.runtime.collect(GRACE_S),
                f"rank 0 failed running the model: {type(error).__name__}: {error}",
            )
        self._check(message, self.runtime.collect(self.timeout_s))
        return logits

    def sync(self) -> None:
        """Replays pending allocator calls (e.g. after ``kv.shrink()``) on every rank now, without
        a model step, so they also free their pages. Raises StepFailed (broken) on failure."""
        if not self.kv.pending:
            return
        message = self._send(None)
        self._check(message, self.runtime.collect(self.timeout_s))

    def _send(self, plan: StepPlan | None) -> StepMessage:
        if self.broken is not None:
            raise ReplicaBroken(self.broken)
        message = StepMessage(self._step, plan, self.kv.drain())
        self._step += 1
        try:
            self.runtime.broadcast(message)
        except Exception as error:
            log.exception("rank 0 could not send step %d", message.step)
            self._fail(message, [], f"rank 0 could not send step {message.step}: {error}")
        return message

    def _check(self, message: StepMessage, statuses: list[RankStatus]) -> None:
        """Raises StepFailed unless every rank did ``message`` and its books equal rank 0's."""
        mine = books(self.kv)
        for i, status in enumerate(statuses):
            if (
                status.code is StatusCode.OK
                and status.step == message.step
                and status.books != mine
            ):
                statuses[i] = RankStatus(
                    status.rank,
                    status.step,
                    StatusCode.BROKEN,
                    0,
                    f"rank {status.rank}'s KV books {status.books} differ from rank 0's {mine}",
                )
        if any(s.code is not StatusCode.OK or s.step != message.step for s in statuses):
            self._fail(message, statuses)
        self._note_pages(statuses)
        self._drop_host_blocks(statuses)

    def _fail(
        self, message: StepMessage, statuses: list[RankStatus], own: str | None = None
    ) -> NoReturn:
        """Raises StepFailed for ``message``; broken unless every failure was STEP_FAILED."""
        errors = [own] if own else []
        broken = own is not None
        for status in statuses:
            if status.step != message.step and status.code is StatusCode.OK:
                status = RankStatus(
                    status.rank,
                    status.step,
                    StatusCode.BROKEN,
                    0,
                    f"rank {status.rank} answered step {status.step}, not {message.step}",
                )
            if status.code is not StatusCode.OK:
                errors.append(status.error or f"rank {status.rank}: {status.code.name}")
                broken = broken or status.code is StatusCode.BROKEN
        if not errors:  # the agreement said no, yet nobody reports why: do not trust the group
            errors, broken = [f"step {message.step}: the ranks disagree on its status"], True
        text = f"tensor-parallel step {message.step} failed: " + "; ".join(errors)
        if broken:
            self.broken = text
            self.shutdown()
        else:
            self._note_pages(statuses)
            self._drop_host_blocks(statuses)
        raise StepFailed(text, broken)

    def _note_pages(self, statuses: list[RankStatus]) -> None:
        self.rank_pages.update({s.rank: s.reclaimable_pages for s in statuses})

    def _drop_host_blocks(self, statuses: list[RankStatus]) -> None:
        """Blocks a rank's host tier dropped on its own (a failed offload) leave every rank's
        tier: rank 0's now, the others' with the next message, before any acquire of it."""
        keys = sorted({key for s in statuses for key in s.host_dropped})
        if keys:
            self.kv.drop_host_blocks(keys)

    # ---- state ---------------------------------------------------------------------------------
    def min_available_pages_over_ranks(self) -> int:
        """Pages a new request could get on every rank: the minimum over ranks (the others' as of
        their last status; their books only lag rank 0's by calls not yet replayed)."""
        return min([int(self.kv.reclaimable_pages()), *self.rank_pages.values()])

    def shutdown(self) -> None:
        """Stops the other ranks and leaves the process group (all ranks leave together: NCCL's
        teardown may wait for the peers; a leave that hangs is left behind after the timeout
        rather than hanging the caller). Idempotent."""
        self.runtime.stop()
        if hasattr(self, "worker"):
            leave = threading.Thread(
                target=self.worker.shutdown, name="vattn-tp-leave", daemon=True
            )
            leave.start()
            leave.join(GRACE_S)
            if leave.is_alive():
                log.warning("rank 0 did not leave its process group within %.0f s", GRACE_S)
        self.runtime.shutdown()
