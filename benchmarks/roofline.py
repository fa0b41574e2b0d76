"""What a decode step could cost at best, measured on the device next to the engine:

* the HBM roofline: (weight bytes + KV bytes read) / peak bandwidth, or FLOPs / dense peak;
* the practical floor: the model's linear layers alone at the batch size, replayed in a CUDA
  graph, plus the attention kernel alone over the same KV (every other thing the engine does —
  norms, RoPE, KV write, sampling, scheduling, mapping, Python — must fit above it).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from replica.model.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear

H100_HBM_BYTES_PER_S = 3.35e12
H100_DENSE_BF16_FLOPS = 989e12


def linear_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every matrix a decode step multiplies by, in execution order (LM head last)."""
    weights = [
        m.weight
        for m in model.modules()
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
    ]
    heads = [m.weight for m in model.modules() if isinstance(m, ParallelLMHead)]
    return weights + heads[:1]


def roofline_seconds(weight_bytes: int, kv_bytes: int, flops: float) -> float:
    return max((weight_bytes + kv_bytes) / H100_HBM_BYTES_PER_S, flops / H100_DENSE_BF16_FLOPS)


def time_cuda(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn`` on the current stream (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def linears_graph_seconds(model: torch.nn.Module, batch: int) -> tuple[float, float]:
    """(CUDA-graph replay, eager) seconds of all linear layers at ``batch`` rows."""
    weights = linear_weights(model)
    inputs = {
        w.shape[1]: torch.randn(batch, w.shape[1], device=w.device, dtype=w.dtype) for w in weights
    }

    def run() -> None:
        for weight in weights:
            F.linear(inputs[weight.shape[1]], weight)

    eager = time_cuda(run)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm the kernels' workspaces outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return time_cuda(graph.replay), eager


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(w.numel() * w.element_size() for w in linear_weights(model))


def linear_flops(model: torch.nn.Module, batch: int) -> float:
    return sum(2.0 * batch * w.numel() for w in linear_weights(model))


def wall(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
