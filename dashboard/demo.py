"""The demo task kinds: something to watch, something that fails, real CPU work.

They are also the examples of how to write a task of your own: register a
function with :func:`~dashboard.tasks.task`, declare each parameter a request
may set, report progress through ``ctx`` and return early when
``ctx.cancelled`` is set; and of a periodic one, with ``registry.schedule``.
"""

from __future__ import annotations

import math
import random
import time

from flask import current_app, has_app_context

from .tasks import Float, Int, Retry, registry, task

STEP = 0.1  # seconds between progress reports: ten moves a second look smooth


def _work_time(seconds: float | None) -> float:
    if seconds is not None:
        return seconds
    return current_app.config["QUEUE_WORK_TIME"] if has_app_context() else 3.0


def _sleep_with_progress(ctx, seconds: float, label: str) -> bool:
    """Sleep ``seconds`` in small steps, reporting progress; False if cancelled."""
    steps = max(1, math.ceil(seconds / STEP))
    start = time.monotonic()
    for i in range(1, steps + 1):
        if ctx.cancelled:
            return False
        # Sleep to the step's deadline, not a fixed amount, so the total stays right.
        time.sleep(max(0.0, start + seconds * i / steps - time.monotonic()))
        ctx.progress(i / steps, f"{label} {seconds * i / steps:.1f}s of {seconds:g}s")
    return True


@task("pretend", params={"seconds": Float(0, 600)})
def pretend(ctx, seconds: float | None = None) -> None:
    """Pretends to work for ``seconds`` (default QUEUE_WORK_TIME), reporting progress."""
    _sleep_with_progress(ctx, _work_time(seconds), "working")


# A periodic task, to show schedules on the page (listed below the history, with
# "Run now"): once a night, when nobody watches the burn-down it would add to.
registry.schedule("nightly-cleanup", "pretend", cron="0 3 * * *", params={"seconds": 2})


@task("flaky", params={"seconds": Float(0, 600), "fail_rate": Float(0, 1)})
def flaky(ctx, seconds: float | None = None, fail_rate: float = 0.3) -> None:
    """Works like pretend, then fails with probability ``fail_rate`` (default 0.3)."""
    if not _sleep_with_progress(ctx, _work_time(seconds), "trying"):
        return
    if random.random() < fail_rate:
        raise RuntimeError(f"flaky task gave up (it fails {fail_rate:.0%} of the time)")


@task("shaky", params={"seconds": Float(0, 600), "fail_rate": Float(0, 1)},
      retry=Retry(attempts=3, backoff=1.0))
def shaky(ctx, seconds: float | None = None, fail_rate: float = 0.5) -> None:
    """Like flaky, but a failed attempt is tried again by itself: 3 attempts in all."""
    flaky(ctx, seconds, fail_rate)


@task("primes", params={"limit": Int(2, 100_000_000)})
def primes(ctx, limit: int = 20_000_000) -> int:
    """Counts the primes below ``limit`` with a segmented sieve: real CPU work."""
    segment = 1 << 16
    root = math.isqrt(limit - 1) + 1
    small = bytearray([1]) * root
    small[:2] = b"\x00\x00"
    for i in range(2, math.isqrt(root) + 1):
        if small[i]:
            small[i * i :: i] = bytes(len(range(i * i, root, i)))
    base = [i for i in range(2, root) if small[i]]
    count = 0
    for low in range(0, limit, segment):
        if ctx.cancelled:
            return count
        high = min(low + segment, limit)
        sieve = bytearray([1]) * (high - low)
        for p in base:
            if p * p >= high:
                break
            # A plain Python loop on purpose: this is the demo of CPU-bound work
            # in a thread, which shares the GIL with the request handlers.
            for multiple in range(max(p * p, (low + p - 1) // p * p) - low, high - low, p):
                sieve[multiple] = 0
        if low < 2:
            sieve[: 2 - low] = bytes(min(2 - low, high - low))
        count += sieve.count(1)
        ctx.progress(high / limit, f"{count:,} primes below {high:,}")
    return count
