"""Test set-up shared by every folder: GPU tests are skipped unless a CUDA device is usable, and
tests marked ``slow`` are left out unless asked for.

Folders: cpu/ (CPU only), gpu/ (CUDA only, marked ``gpu``), allocator/ (each test runs on the host
backend and, marked ``gpu``, on the CUDA backend), cluster/ (live Ray Serve, marked
``integration``). Run the GPU part with ``pytest -m gpu``.

Markers select as usual once ``-m`` is given (``pytest -m gpu``, ``pytest -m slow``,
``pytest -m "integration and not slow"``). Without ``-m`` (``make test``, CI) every test runs but
those marked ``slow``, which ``--run-slow`` adds back.
"""

from __future__ import annotations

import pytest

from replica.vmm import cuda_available


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run the tests marked slow (left out unless -m is given)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--run-slow") and not config.getoption("markexpr"):
        slow = [item for item in items if item.get_closest_marker("slow") is not None]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if item.get_closest_marker("slow") is None]
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
