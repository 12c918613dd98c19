"""Signals for integrations: what happens to tasks, for an app to act on.

They are `blinker`_ signals, like Flask's own, so an app can send every failure
to its error tracker without wrapping each task::

    from dashboard import task_failed

    @task_failed.connect_via(app)
    def report_failure(sender, task, error, exception=None, **extra):
        tracker.capture(exception or error, tags={"kind": task.kind, "task": task.id})

The sender is the Flask app whose queue it is (a :class:`~dashboard.WorkQueue`
made without the extension sends itself). Every signal passes ``task``, a
:class:`~dashboard.records.TaskInfo` (id, kind, params, state, attempts...);
``task_failed`` and ``task_retried`` also pass ``error`` (the text the task
records) and ``exception`` (what the task raised, or None when nothing was
raised: a time limit, a result that could not be kept, a worker that died).

Each event is sent once, in the process where it happened: the one that ran the
task, or that submitted or cancelled it. Handlers of what happens in a worker
run in that worker's thread, between two tasks, inside the app context: keep
them quick. A handler that raises is logged and ignored; it never changes how
the task ends, nor stops the worker.

This module imports nothing from Flask.

.. _blinker: https://blinker.readthedocs.io/
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

from blinker import Namespace, NamedSignal

from .records import TaskInfo

__all__ = [
    "task_submitted",
    "task_started",
    "task_succeeded",
    "task_failed",
    "task_retried",
    "task_cancelled",
]

logger = logging.getLogger("dashboard.signals")

_signals = Namespace()

task_submitted = _signals.signal("task-submitted", doc="""\
A task was queued or scheduled: by a submit (one per task of a batch), a retry
from the page or the API, or a periodic schedule's run. A submit with a key that
found its task already there queued nothing, and sends nothing.""")

task_started = _signals.signal("task-started", doc="""\
A worker took the task and is about to run it (each attempt of a task that is
retried automatically).""")

task_succeeded = _signals.signal("task-succeeded", doc="""\
The task returned and is done; its result is ``task.result``.""")

task_failed = _signals.signal("task-failed", doc="""\
The task failed for good: it raised (on its last attempt, if its kind retries),
ran past its time limit, returned what could not be kept, or its worker died.
Passes ``error`` and ``exception``.""")

task_retried = _signals.signal("task-retried", doc="""\
An attempt failed and its kind's ``Retry`` tries it again: the task is scheduled
for ``task.due_at``. Passes ``error`` and ``exception``. The task's last attempt
sends ``task_succeeded`` or ``task_failed`` instead.""")

task_cancelled = _signals.signal("task-cancelled", doc="""\
The task was cancelled: before it ran (sent where it was cancelled), or while it
ran, once it stopped (sent where it ran). A running task that never looks at
``ctx.cancelled`` ends done, and sends ``task_succeeded``.""")


def send(signal: NamedSignal, sender: Any, task: Callable[[], TaskInfo | None],
         context: Callable[[], AbstractContextManager[Any]] = nullcontext,
         **extra: Any) -> None:
    """Call each handler of ``signal`` connected for ``sender`` (or for any sender)
    with ``task=task()`` and ``extra``, inside ``context()``.

    The task is made only when a handler is there to see it, so a queue nobody
    listens to builds nothing. A handler that raises is logged and the others
    still run: what a handler does must never change how a task ends, nor end
    the thread that sent it.
    """
    try:
        if signal.is_muted:
            return
        receivers = list(signal.receivers_for(sender))
        if not receivers:
            return
        info = task()
        if info is None:
            return  # (the history let it go already: there is nothing to show)
        with context():
            for receiver in receivers:
                try:
                    receiver(sender, task=info, **extra)
                except Exception:  # noqa: BLE001 - a handler's fault is the handler's
                    logger.exception("a handler of %s (%s) failed on task %s; ignored",
                                     signal.name, _name(receiver), info.id)
    except Exception:  # noqa: BLE001 - nor may the sending (an app context that fails)
        logger.exception("could not send %s; ignored", signal.name)


def _name(receiver: Callable[..., Any]) -> str:
    module = getattr(receiver, "__module__", None)
    name = getattr(receiver, "__qualname__", None) or repr(receiver)
    return f"{module}.{name}" if module else name
