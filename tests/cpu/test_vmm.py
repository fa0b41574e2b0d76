"""The extension's mechanism on the host backend: refusals, rollback, worker errors, lifetimes."""

from __future__ import annotations

import gc

import pytest
import torch

from replica import (
    CudaUnavailable,
    KVCacheAllocator,
    KVCacheConfig,
    VmmError,
    cuda_available,
    open_device,
)
from replica.vmm import MapWorker, Op, PagePool, Reservation

PAGE = 64 * 1024


@pytest.fixture
def pool() -> PagePool:
    return PagePool(open_device("host", PAGE).backend)


def test_refuses_what_would_break_the_mapping(pool: PagePool) -> None:
    reservation = Reservation(pool, 4)
    pool.create([0, 1])
    reservation.map_run(0, [0])
    with pytest.raises(ValueError, match="page slot 0 already holds page id 0"):
        reservation.map_run(0, [1])
    with pytest.raises(ValueError, match="unknown page id 7"):
        reservation.map_run(1, [7])
    with pytest.raises(IndexError, match=r"page slots \[3, 5\) outside a reservation of 4 pages"):
        reservation.map_run(3, [1, 1])
    with pytest.raises(ValueError, match="while it is mapped"):
        pool.release([0])
    with pytest.raises(ValueError, match="already exists"):
        pool.create([1])
    with pytest.raises(ValueError, match="holds no page"):
        reservation.unmap_run(1, 1)


def test_one_page_mapped_at_two_places_is_the_same_memory(pool: PagePool) -> None:
    """Aliasing: the page's bytes read the same through both addresses, the kernel shows both
    mappings on the same memfd offset, and the page is released only after the last unmap."""
    reservation = Reservation(pool, 4)
    pool.create([0, 1])
    reservation.map_run(0, [0, 1])
    reservation.map_run(3, [0])
    assert pool.mappings(0) == 2 and pool.mappings(1) == 1
    memory = torch.frombuffer(memoryview(reservation), dtype=torch.uint8)
    memory[:PAGE] = torch.arange(PAGE, dtype=torch.int64).remainder(251).to(torch.uint8)
    assert torch.equal(memory[3 * PAGE : 4 * PAGE], memory[:PAGE])
    memory[3 * PAGE + 7] = 99  # writes through the alias reach the first address too
    assert int(memory[7]) == 99
    offsets = _memfd_offsets(reservation.base, 4)
    assert offsets[0] == offsets[3] != offsets[1] and offsets[2] is None
    with pytest.raises(ValueError, match="while it is mapped"):
        pool.release([0])
    reservation.unmap_run(0, 1)
    assert pool.mappings(0) == 1 and int(memory[3 * PAGE + 7]) == 99  # the alias keeps it
    with pytest.raises(ValueError, match=r"while it is mapped \(1 mappings\)"):
        pool.release([0])
    reservation.unmap_run(3, 1)
    pool.release([0])
    assert 0 not in pool


def _memfd_offsets(base: int, pages: int) -> list[int | None]:
    """For each page slot of a reservation, the file offset /proc/self/maps shows for the vattn
    memfd mapped there (None: not mapped to it)."""
    found: list[int | None] = [None] * pages
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) < 6 or "vattn-kv" not in line:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            offset = int(fields[2], 16)
            for i in range(pages):
                address = base + i * PAGE
                if start <= address < end:
                    found[i] = offset + (address - start)
    return found


def test_a_failed_run_maps_nothing(pool: PagePool) -> None:
    reservation = Reservation(pool, 4)
    pool.create([0, 1])
    with pytest.raises(ValueError):
        reservation.map_run(0, [0, 1, 9])  # the third id does not exist
    assert reservation.page_ids() == [-1, -1, -1, -1]
    assert not pool.is_mapped(0) and not pool.is_mapped(1)


def test_worker_reraises_a_batch_error_at_the_next_wait_and_goes_on(pool: PagePool) -> None:
    reservation = Reservation(pool, 4)
    worker = MapWorker(pool)
    bad = worker.submit([Op.create([0]), Op.map(reservation, 0, [5]), Op.map(reservation, 1, [0])])
    good = worker.submit([Op.map(reservation, 2, [0])])
    with pytest.raises(ValueError, match="unknown page id 5"):
        worker.wait(good)  # a later batch's wait reports it: the batches before it ran first
    worker.wait(bad)  # an error is reported once
    worker.wait(good)
    assert reservation.page_ids() == [-1, -1, 0, -1]  # the failed batch stopped at its error
    with pytest.raises(ValueError, match="never issued"):
        worker.wait(99)


def test_unmapped_page_reads_zero_after_reuse_and_data_follows_the_page(pool: PagePool) -> None:
    reservation = Reservation(pool, 2)
    tensor = torch.frombuffer(memoryview(reservation), dtype=torch.uint8)
    pool.create([0])
    reservation.map_run(0, [0])
    tensor[:PAGE] = 5
    reservation.unmap_run(0, 1)
    reservation.map_run(1, [0])  # the same physical page, elsewhere
    assert int(tensor[PAGE:].sum()) == 5 * PAGE


def test_tensors_keep_the_reservation_alive() -> None:
    config = KVCacheConfig(
        num_layers=2,
        num_kv_heads=2,
        head_dim=64,
        dtype=torch.float32,
        max_slots=2,
        max_tokens=64,
        page_size=PAGE,
        budget_bytes=16 * PAGE,
    )
    allocator = KVCacheAllocator(config, open_device("host", PAGE))
    slot = allocator.acquire()
    allocator.ensure(slot, 10)
    k = allocator.k_cache(1)
    k[slot, :10] = 3.0
    del allocator
    gc.collect()
    assert float(k[slot, :10].sum()) == 3.0 * 10 * 2 * 64


def test_backend_choice_and_errors() -> None:
    with pytest.raises(ValueError, match="unknown VMM backend 'tpu'"):
        open_device("tpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiple of the OS page size"):
        open_device("host", 1000)
    if not cuda_available()[0]:
        assert open_device("auto").name == "host"
        with pytest.raises(CudaUnavailable, match="the CUDA backend is unavailable"):
            open_device("cuda")
        assert issubclass(CudaUnavailable, VmmError)


def test_config_rounds_slots_to_whole_pages() -> None:
    config = KVCacheConfig(
        num_layers=30,
        num_kv_heads=3,
        head_dim=64,
        dtype=torch.float32,
        max_slots=4,
        max_tokens=2048,
        page_size=2 * 1024 * 1024,
        budget_bytes=0,
    )
    assert config.bytes_per_token == 2 * 30 * 3 * 64 * 4  # K and V of every layer (interleaved)
    assert config.tokens_per_slot % 2048 == 0 and config.tokens_per_slot >= 2048
    assert config.tokens_per_slot * config.bytes_per_token % config.page_size == 0
    with pytest.raises(ValueError, match="max_slots must be a positive int"):
        KVCacheConfig(
            num_layers=1,
            num_kv_heads=1,
            head_dim=8,
            dtype=torch.float32,
            max_slots=0,
            max_tokens=8,
            page_size=PAGE,
            budget_bytes=0,
        )
