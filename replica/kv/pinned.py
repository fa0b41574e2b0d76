"""Pinned host memory for the host KV tier (``replica.kv.host_tier``), allocated at start in
chunks: pageable memory is first written (the kernel faults its pages in, on torch's intra-op
threads) and then registered with the CUDA runtime (``cudaHostRegister``), which page-locks it
and maps it for the device; registered memory copies to and from the device asynchronously at
the same bandwidth as ``cudaHostAlloc``'s.

Why not ``torch.empty(..., pin_memory=True)``: torch's pinned allocator calls ``cudaHostAlloc``,
which faults and locks every page on one thread (an H100 machine pinned 48 GiB in 39 s that way;
touching then registering 2 GiB took 0.19 s against 0.81 s), rounds each allocation up to a power
of two, and keeps freed memory in its cache, so a tier dropped at shutdown would stay pinned.

Lifetime: ``PinnedChunks`` owns the tensors; when it is collected (its owner gone) or ``release``
is called, the device is synchronized (no copy may still read or write them) and each chunk is
unregistered before its memory goes back to the allocator. The caches hold their tier in
reference cycles, so it is collected by Python's cycle collector, which may run while another
engine captures a CUDA graph on this thread: a device synchronize then would break the capture,
so chunks collected during a capture wait (still pinned, still owned) until the next
``PinnedChunks`` is made or released outside one. A chunk the runtime refuses to register raises
``RuntimeError`` and is not kept.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

#: Chunks collected during a graph capture: (device, chunks), unregistered later (module doc).
_deferred: list[tuple[torch.device, list[torch.Tensor]]] = []


def _cudart():  # noqa: ANN202 (torch's runtime bindings module)
    return torch.cuda.cudart()


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


def _unregister(device: torch.device, chunks: list[torch.Tensor]) -> None:
    if not chunks:
        return
    if _capturing():
        _deferred.append((device, list(chunks)))
        chunks.clear()
        return
    try:
        torch.cuda.synchronize(device)
        for chunk in chunks:
            _cudart().cudaHostUnregister(chunk.data_ptr())
    except Exception:  # noqa: BLE001 (at interpreter exit the CUDA context may be gone)
        pass
    chunks.clear()


def _drain_deferred() -> None:
    """Unregisters the chunks collected during a capture, when none is under way."""
    while _deferred and not _capturing():
        _unregister(*_deferred.pop())


class PinnedChunks:
    """Host chunks pinned by registration for ``device`` (a CUDA device); ``chunks`` holds them in
    allocation order."""

    def __init__(self, device: torch.device) -> None:
        _drain_deferred()
        self.device = device
        self.chunks: list[torch.Tensor] = []
        self._finalizer = weakref.finalize(self, _unregister, device, self.chunks)

    def allocate(self, shape: Sequence[int]) -> torch.Tensor:
        """A new pinned uint8 chunk of ``shape``; ``RuntimeError`` when the runtime refuses it."""
        chunk = torch.empty(tuple(shape), dtype=torch.uint8)
        chunk.zero_()  # faults the pages in on torch's threads, before the driver locks them
        nbytes = chunk.numel()
        if nbytes:
            error = _cudart().cudaHostRegister(chunk.data_ptr(), nbytes, 0)
            if int(error) != 0:
                raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed: {error}")
        self.chunks.append(chunk)
        return chunk

    def release(self) -> None:
        """Unregisters every chunk and drops them (after the device's work is done)."""
        self._finalizer()
        _drain_deferred()
