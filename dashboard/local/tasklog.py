"""What a task logs while it runs, kept with the task.

Each log record made by a thread while it runs a task goes to that task's
store too (:meth:`Store.log`), which keeps the last lines; the task's page
shows them. It sees what the logging configuration lets through (the levels
of the loggers the task uses, WARNING on the root logger unless the app sets
more); ``ctx.logger`` logs at INFO. Records logged from other threads the task
starts are not the task's.

This module imports nothing from Flask.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

#: Characters of a line kept (the store keeps the last MAX_LOG_LINES lines).
MAX_LINE = 500

#: ``.task``: the TaskContext of the task this thread runs, for a thread that is
#: not a worker (``run_pending``), set around each task.
running = threading.local()

#: How a worker thread's task is found, set by the queue module: a function of the
#: thread, giving that task's TaskContext-like object (with ``log_line``) or None.
#: A worker sets nothing per task: a log line is rare, a task is not.
find_task: Callable[[threading.Thread], Any] | None = None


def _keep(record: logging.LogRecord) -> None:
    """Hand ``record`` to the task this thread runs, if it runs one."""
    name = record.name
    if name.startswith("dashboard.") and not name.startswith("dashboard.task."):
        return  # the queue's own lines (about the task, or its store)
    task = getattr(running, "task", None)
    if task is None and find_task is not None:
        task = find_task(threading.current_thread())
    if task is None:
        return  # not from a thread that runs a task
    try:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            text = f"{text} ({type(error).__name__}: {error})"
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname} {record.name}: {text}"
        task.log_line("".join(c if c.isprintable() else " " for c in line[:MAX_LINE]))
    except Exception:  # noqa: BLE001 - logging must never fail the task
        pass


_previous_factory = logging.getLogRecordFactory()


def _factory(*args: object, **kwargs: object) -> logging.LogRecord:
    record = _previous_factory(*args, **kwargs)
    _keep(record)
    return record


_install_lock = threading.Lock()
_installed = False


def ensure_installed() -> None:
    """Wrap the record factory once per process. (A factory, not a handler on the
    root logger: a handler there would end Python's last-resort output of
    warnings in apps that configure no logging, and change nothing it prints.)"""
    global _installed, _previous_factory
    if not _installed:
        with _install_lock:
            if not _installed:
                _previous_factory = logging.getLogRecordFactory()
                logging.setLogRecordFactory(_factory)
                _installed = True
