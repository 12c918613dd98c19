"""The demo app plus a task kind that records every run in a file, for test_durable.py.

``count`` appends ``"<task id> <pid> start"`` when it begins and ``"<task id>
<pid> end"`` when it returns to the file named by ``COUNT_LOG``. Each line is
one ``os.write`` on a descriptor opened with ``O_APPEND``: short appends are
atomic, so lines from several processes never mix, and a ``kill -9`` leaves
whole lines only. A test reads the file to count how often each task started
and finished, and in which process.

Served as ``counting:create_app()`` with ``tests/apps`` on the path (the
tests directory is not a package).
"""

from __future__ import annotations

import os
import time

from dashboard import Float, registry, task
from dashboard import create_app as _create_app

LOG_ENV = "COUNT_LOG"
#: Seconds: with it set, ``count`` also runs periodically, as the schedule "counter".
EVERY_ENV = "COUNT_EVERY"


def _record(task_id: int, event: str) -> None:
    fd = os.open(os.environ[LOG_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{task_id} {os.getpid()} {event}\n".encode())
    finally:
        os.close(fd)


@task("count", params={"seconds": Float(0, 60)})
def count(ctx, seconds: float = 0.0) -> None:
    """Records its start and its end; sleeps ``seconds`` in between, in small steps."""
    _record(ctx.task_id, "start")
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(0.05, left))
    _record(ctx.task_id, "end")


if os.environ.get(EVERY_ENV):
    registry.schedule("counter", "count", every=float(os.environ[EVERY_ENV]))


def create_app():
    return _create_app()
