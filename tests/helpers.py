"""Helpers shared by the test folders: waiting on a condition instead of sleeping, and what an
import loads."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Calls ``predicate`` every ``interval`` seconds until it returns something truthy, and
    returns that; fails the test with ``what`` (what it waited for) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.005
) -> T:
    """``wait_until`` inside an event loop: the loop runs other tasks between two calls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


def modules_loaded_by(imports: str, watched: tuple[str, ...]) -> list[str]:
    """Which of ``watched`` a fresh interpreter has loaded after ``import <imports>`` (run from
    the repository root)."""
    code = (
        f"import json, sys, {imports}; "
        f"print(json.dumps(sorted(m for m in {watched!r} if m in sys.modules)))"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)
