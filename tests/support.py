"""Helpers shared by the test modules."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], timeout: float = 10.0, what: str = "", interval: float = 0.02
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``.

    The timeout only bounds a failure: a passing test never waits it out.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what or predicate}")
        time.sleep(interval)
