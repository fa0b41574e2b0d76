"""The CUDA backend checked from outside: the driver (through cuda-python, not our extension)
must agree with the allocator's books, torch kernels must read and write the cache in place, and
shrink() must give memory back to the device."""

from __future__ import annotations

import pytest
import torch

from replica import KVCacheAllocator, KVCacheConfig, open_device

pytestmark = pytest.mark.gpu
driver = pytest.importorskip(
    "cuda.bindings.driver", reason="cuda-python (the gpu extra) is not installed"
)

MIB = 1024 * 1024


def make(layout: str = "per_layer", budget_mib: int = 512, **overrides: object) -> KVCacheAllocator:
    config = KVCacheConfig(
        num_layers=4,
        num_kv_heads=8,
        head_dim=128,
        dtype=torch.bfloat16,
        max_slots=8,
        max_tokens=4096,
        page_size=2 * MIB,
        budget_bytes=budget_mib * MIB,
        layout=layout,
        **overrides,  # type: ignore[arg-type]
    )
    return KVCacheAllocator(config, open_device("cuda"))


def driver_says_mapped(address: int) -> bool:
    """Asks the driver itself whether a physical allocation backs ``address``."""
    result, base, size = driver.cuMemGetAddressRange(address)
    if result != driver.CUresult.CUDA_SUCCESS:
        return False
    attr_result, mapped = driver.cuPointerGetAttribute(
        driver.CUpointer_attribute.CU_POINTER_ATTRIBUTE_MAPPED, address
    )
    assert attr_result == driver.CUresult.CUDA_SUCCESS
    assert int(base) <= address < int(base) + int(size)
    return bool(mapped)


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_driver_agrees_with_the_books(layout: str) -> None:
    allocator = make(layout, eager_pages=0)
    a, b, c = (allocator.acquire() for _ in range(3))
    allocator.ensure(a, 1500)
    allocator.ensure(b, 3000)
    allocator.ensure(c, 10)
    allocator.release(b)
    allocator.ensure(allocator.acquire(), 700)  # reuses b's cached slot
    allocator.release(c)
    allocator.shrink()
    allocator.synchronize()
    page = allocator.config.page_size
    checked = 0
    for reservation in allocator.reservations:
        for index, page_id in enumerate(reservation.page_ids()):
            assert driver_says_mapped(reservation.base + index * page) == (page_id >= 0), (
                index,
                page_id,
            )
            checked += page_id >= 0
    assert checked == allocator.stats().pages_mapped > 0


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_torch_kernels_read_and_write_the_cache(layout: str) -> None:
    allocator = make(layout)
    slot = allocator.acquire()
    allocator.ensure(slot, 2048)
    k, v = allocator.k_cache(2), allocator.v_cache(2)
    assert k.is_cuda and k.dtype == torch.bfloat16
    k[slot, :2048].normal_()
    v[slot, :2048].normal_()
    q = torch.randn(1, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
    keys = k[slot, :2048].transpose(0, 1).unsqueeze(0)  # [1, heads, tokens, dim], strided, in place
    values = v[slot, :2048].transpose(0, 1).unsqueeze(0)
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values)
    reference = torch.nn.functional.scaled_dot_product_attention(
        q, keys.contiguous(), values.contiguous()
    )
    torch.testing.assert_close(out, reference)
    # The tensor is the reserved range itself (no copy). NOTE: never let pytest print a cache
    # tensor: its repr reads unmapped pages, an illegal address on the GPU.
    address = int(k.data_ptr())
    reservation = allocator.reservations[4 if layout == "per_layer" else 0]
    assert reservation.base <= address < reservation.base + reservation.nbytes


def test_shrink_returns_memory_to_the_device() -> None:
    torch.cuda.synchronize()
    free_before, _ = torch.cuda.mem_get_info()
    allocator = make("interleaved", budget_mib=2048, eager_pages=0)
    slots = [allocator.acquire() for _ in range(8)]
    for slot in slots:
        allocator.ensure(slot, 4096)  # 8 KiB a token: 8 slots x 2 ranges x 16 pages x 2 MiB
    mapped = allocator.stats().pages_mapped * allocator.config.page_size
    assert mapped == 512 * MIB
    free_full, _ = torch.cuda.mem_get_info()
    assert free_before - free_full >= mapped
    for slot in slots:
        allocator.release(slot)
    released = allocator.shrink()
    assert released == 256
    free_after, _ = torch.cuda.mem_get_info()
    assert free_after - free_full >= mapped
    assert abs(free_after - free_before) <= 64 * MIB  # back where it started (driver slack aside)
