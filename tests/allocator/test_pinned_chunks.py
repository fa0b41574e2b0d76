"""The host tier's pinned chunks (``replica.kv.pinned``) against a recording stand-in for the CUDA
runtime: each chunk is registered whole, its bytes zeroed; a refused registration raises and
keeps nothing; releasing (or dropping the owner) synchronizes the device first, then unregisters
every chunk once. The real registration runs in the GPU tests of the host tier."""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch

from replica.kv import pinned


class FakeRuntime:
    """Records ``cudaHostRegister``/``cudaHostUnregister`` calls; ``refuse`` makes the next
    registration fail with a nonzero error code."""

    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.calls = calls
        self.refuse = False

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802
        self.calls.append(("register", ptr, size, flags))
        return 2 if self.refuse else 0

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        self.calls.append(("unregister", ptr))
        return 0


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> FakeRuntime:
    calls: list[tuple[Any, ...]] = []
    fake = FakeRuntime(calls)
    monkeypatch.setattr(pinned, "_cudart", lambda: fake)
    monkeypatch.setattr(pinned.torch.cuda, "synchronize", lambda device: calls.append(("sync",)))
    monkeypatch.setattr(pinned, "_capturing", lambda: False)
    return fake


def test_chunks_are_registered_whole_and_unregistered_after_a_sync(
    runtime: FakeRuntime,
) -> None:
    owner = pinned.PinnedChunks(torch.device("cuda", 0))
    first = owner.allocate((3, 4096))
    second = owner.allocate((2, 8192))
    assert owner.chunks == [first, second]
    assert torch.count_nonzero(first) == torch.count_nonzero(second) == 0
    assert runtime.calls == [
        ("register", first.data_ptr(), 3 * 4096, 0),
        ("register", second.data_ptr(), 2 * 8192, 0),
    ]
    owner.release()
    assert runtime.calls[2:] == [
        ("sync",),
        ("unregister", first.data_ptr()),
        ("unregister", second.data_ptr()),
    ]
    assert owner.chunks == []
    owner.release()  # once only
    assert len(runtime.calls) == 5


def test_a_refused_registration_raises_and_keeps_nothing(runtime: FakeRuntime) -> None:
    owner = pinned.PinnedChunks(torch.device("cuda", 0))
    kept = owner.allocate((1, 4096))
    runtime.refuse = True
    with pytest.raises(RuntimeError, match="cudaHostRegister of 8192 bytes failed"):
        owner.allocate((2, 4096))
    assert owner.chunks == [kept]
    owner.release()
    assert [call[0] for call in runtime.calls] == ["register", "register", "sync", "unregister"]
    assert runtime.calls[-1] == ("unregister", kept.data_ptr())


def test_dropping_the_owner_unpins_its_chunks(runtime: FakeRuntime) -> None:
    owner = pinned.PinnedChunks(torch.device("cuda", 0))
    address = owner.allocate((1, 4096)).data_ptr()
    del owner
    gc.collect()
    assert runtime.calls[-2:] == [("sync",), ("unregister", address)]


def test_chunks_collected_during_a_graph_capture_wait_for_its_end(
    runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cycle collector may drop a tier while another engine captures a CUDA graph: no
    synchronize then (it would break the capture); the chunks stay pinned until the next owner is
    made outside a capture."""
    capturing = [True]
    monkeypatch.setattr(pinned, "_capturing", lambda: capturing[0])
    owner = pinned.PinnedChunks(torch.device("cuda", 0))
    address = owner.allocate((1, 4096)).data_ptr()
    del owner
    gc.collect()
    assert [call[0] for call in runtime.calls] == ["register"]  # nothing synchronized
    pinned.PinnedChunks(torch.device("cuda", 0))  # made during the capture: still waits
    assert len(runtime.calls) == 1
    capturing[0] = False
    pinned.PinnedChunks(torch.device("cuda", 0))
    assert runtime.calls[1:] == [("sync",), ("unregister", address)]
    assert not pinned._deferred  # noqa: SLF001
