"""Test set-up shared by every folder: GPU tests are skipped unless a CUDA device is usable.

Folders: cpu/ (CPU only), gpu/ (CUDA only, marked ``gpu``), allocator/ (each test runs on the host
backend and, marked ``gpu``, on the CUDA backend). Run the GPU part with ``pytest -m gpu``.
"""

from __future__ import annotations

import pytest

from replica.vmm import cuda_available


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ok, why = cuda_available()
    if ok:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {why}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    """The tiny random Llama of tests/models.py, saved once per session."""
    from tests.models import save_random_llama

    return save_random_llama(tmp_path_factory.mktemp("tiny-llama"))
