"""Tensor parallelism for one replica: ``tp`` ranks, one process per GPU, joined with
torch.distributed (NCCL on GPU, gloo on CPU). Rank 0 runs the engine and its scheduler; each step
it sends the others the plan and its allocator calls (the page plan) to replay.

Modules: ``plan`` (messages, statuses, the tp-size check), ``worker`` (RankWorker: one rank),
``runtime`` (RankRuntime, LocalProcessRuntime),
``driver`` (TensorParallelDriver: rank 0); the page plan's recorder and replay live with the caches
(``replica.kv.recording``). Only the light modules are imported here; import
``worker``, ``runtime`` and ``driver`` from their modules.
"""

from replica.tp.plan import (
    RankStatus,
    Shutdown,
    StatusCode,
    StepFailed,
    StepMessage,
    check_tensor_parallel,
)

__all__ = [
    "RankStatus",
    "Shutdown",
    "StatusCode",
    "StepFailed",
    "StepMessage",
    "check_tensor_parallel",
]
