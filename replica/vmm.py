"""The one module that imports the compiled VMM mechanism (``replica._vmm``).

It picks a backend (CUDA when a GPU is visible, else the host backend), and turns reserved
virtual ranges into torch tensors that keep their reservation alive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from replica import _vmm

VmmError = _vmm.VmmError
PagePool = _vmm.PagePool
Reservation = _vmm.Reservation
MapWorker = _vmm.MapWorker
Op = _vmm.Op

BackendName = Literal["auto", "cuda", "host"]

#: Default page size: the GPU's allocation granularity on Hopper (no smaller page exists there).
DEFAULT_PAGE_SIZE = 2 * 1024 * 1024


class CudaUnavailable(VmmError):
    """The CUDA backend was asked for on a machine whose driver or device cannot be used."""


def cuda_available() -> tuple[bool, str]:
    """Whether the CUDA driver loads and sees a device, and if not, why."""
    ok, why = _vmm.cuda_available()
    return bool(ok), str(why)


@dataclass(frozen=True)
class Device:
    """Where KV memory lives: the backend object plus the torch device its tensors are on."""

    backend: _vmm.Backend
    torch_device: torch.device

    @property
    def name(self) -> str:
        return str(self.backend.name)

    @property
    def page_size(self) -> int:
        return int(self.backend.page_size)


def open_device(
    backend: BackendName = "auto", page_size: int | None = None, device_index: int = 0
) -> Device:
    """Opens a VMM backend.

    ``auto`` takes CUDA when the driver sees a device, else the host backend. ``page_size`` None
    means 2 MiB (the H100's granularity); on CUDA it must be a multiple of the granularity.
    """
    if backend not in ("auto", "cuda", "host"):
        raise ValueError(f"unknown VMM backend {backend!r}; expected 'auto', 'cuda' or 'host'")
    if backend == "auto":
        backend = "cuda" if cuda_available()[0] else "host"
    if backend == "cuda":
        ok, why = cuda_available()
        if not ok:
            raise CudaUnavailable(f"the CUDA backend is unavailable: {why}")
        made = _vmm.cuda_backend(device_index, page_size or 0)
        return Device(made, torch.device("cuda", device_index))
    return Device(_vmm.host_backend(page_size or DEFAULT_PAGE_SIZE), torch.device("cpu"))


class _CudaRange:
    """Presents a reservation through ``__cuda_array_interface__`` (bytes, no copy).

    torch keeps a reference to this object for as long as the tensor lives, and this object keeps
    the reservation, so the virtual range outlives every tensor over it.
    """

    def __init__(self, reservation: _vmm.Reservation) -> None:
        self.reservation = reservation
        self.__cuda_array_interface__ = {
            "shape": (int(reservation.nbytes),),
            "typestr": "|u1",
            "data": (int(reservation.base), False),
            "version": 3,
            "strides": None,
        }


def reservation_tensor(
    reservation: _vmm.Reservation,
    device: Device,
    dtype: torch.dtype,
    shape: tuple[int, ...],
) -> torch.Tensor:
    """A contiguous tensor of ``shape`` and ``dtype`` over the start of ``reservation``.

    Reads and writes are valid only where pages are mapped: the caller's policy guarantees that.
    """
    element = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * element
    if nbytes > reservation.nbytes:
        raise ValueError(
            f"shape {shape} of {dtype} needs {nbytes} bytes; the reservation has "
            f"{reservation.nbytes}"
        )
    if device.torch_device.type == "cuda":
        raw = torch.as_tensor(_CudaRange(reservation), device=device.torch_device)
    else:
        raw = torch.frombuffer(memoryview(reservation), dtype=torch.uint8)
    return raw[:nbytes].view(dtype).view(shape)
