"""Fixtures that build allocators on either backend with geometry scaled to its page size."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from replica import KVCacheAllocator, KVCacheConfig, open_device
from replica.kv.copies import CopyFence
from replica.vmm import Device

HOST_PAGE = 64 * 1024
TOKENS_PER_PAGE = 16


@pytest.fixture(scope="session", params=["host", pytest.param("cuda", marks=pytest.mark.gpu)])
def kv_device(request: pytest.FixtureRequest) -> Device:
    if request.param == "host":
        return open_device("host", HOST_PAGE)
    return open_device("cuda")


class Clock:
    """A settable clock for the elastic pool's idle timer."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


MakeAllocator = Callable[..., KVCacheAllocator]


@pytest.fixture
def make_allocator(kv_device: Device) -> MakeAllocator:
    """Builds an allocator whose ranges hold TOKENS_PER_PAGE tokens per page on any backend."""

    def make(
        layout: str = "interleaved",
        num_layers: int = 4,
        max_slots: int = 4,
        max_tokens: int = 8 * TOKENS_PER_PAGE,
        budget_pages: int = 64,
        clock: Callable[[], float] | None = None,
        make_fence: Callable[[], CopyFence] | None = None,
        **overrides: object,
    ) -> KVCacheAllocator:
        heads, dtype = 2, torch.float32
        heads_per_range = heads * (2 * num_layers if layout == "interleaved" else 1)
        bytes_per_token = kv_device.page_size // TOKENS_PER_PAGE
        head_dim = bytes_per_token // (heads_per_range * 4)
        config = KVCacheConfig(
            num_layers=num_layers,
            num_kv_heads=heads,
            head_dim=head_dim,
            dtype=dtype,
            max_slots=max_slots,
            max_tokens=max_tokens,
            page_size=kv_device.page_size,
            budget_bytes=budget_pages * kv_device.page_size,
            layout=layout,
            **overrides,  # type: ignore[arg-type]
        )
        assert config.bytes_per_token == bytes_per_token
        kwargs = {"clock": clock} if clock else {}
        return KVCacheAllocator(config, kv_device, make_fence=make_fence, **kwargs)

    return make
