"""The seam every backend plugs into: what the web layer (and a CLI) may ask of a queue.

The dashboard's views and its JSON API use this and nothing else: submit,
read a task, a snapshot and its tag, the metrics a monitoring scrape reads,
cancel, retry, pause and resume, the worker count, clear and reset, health,
and what this backend can do (:class:`Capabilities`), so the page can leave
out a control that would not work here instead of pretending.

How work is claimed, renewed and finished is the backend's own business: the
in-process backend (:class:`~dashboard.local.WorkQueue`, over the memory
or SQLite store) keeps worker threads; a backend whose workers run in other
processes or machines implements the same methods and none of that.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from .errors import InvalidParam, TaskFailed
from .records import (BulkResult, KindHealth, Metrics, Retried, ScheduleInfo, Snapshot, State,
                      Submitted, TaskFilter, TaskId, TaskInfo, TaskPage)
from .tasks import Registry


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; the page and the API offer only these."""

    #: The worker count can be changed from the page (the − and + buttons).
    scale_workers: bool = True
    #: Every server process sees the same queue (the page then names no one process).
    shared: bool = False
    #: Queued work outlives a restart.
    durable: bool = False
    #: Task features a submit may ask for; one it lacks is refused, naming it, and
    #: the page leaves out its control.
    delays: bool = True
    keys: bool = True
    time_limits: bool = True
    #: Periodic schedules are run (each due time once) and listed, with "run now".
    schedules: bool = True
    #: The operator's view: every task it holds can be listed by state and kind
    #: (``find``), counted, acted on in bulk, and each kind's last hour shown.
    search: bool = True
    #: ``find`` and the bulk actions can also look for text in params and errors.
    text_search: bool = True
    #: Each kind's health (``kind_health``) is kept.
    kind_health: bool = True
    #: When scale_workers is False: one line saying how to change the worker count
    #: instead (the page shows it beside the disabled − and +, and the API's 409 says it).
    scale_hint: str = ""

    def check_filter(self, query: TaskFilter, where: str) -> None:
        """Refuse (a 400 naming the field) a search this backend cannot do."""
        if not self.search:
            raise InvalidParam("search", f"is not available with this backend (the queue "
                               f"{where})")
        if query.text and not self.text_search:
            raise InvalidParam("text", f"search is not available with this backend (the "
                               f"queue {where}): filter by state and kind")

    def check(self, feature: str, asked: bool, where: str) -> None:
        """Refuse (a 400 naming the field) a submit that asks for what this backend lacks."""
        if asked and not getattr(self, {"delay": "delays", "key": "keys",
                                         "time_limit": "time_limits"}[feature]):
            raise InvalidParam(feature, f"is not available with this backend (the queue "
                               f"{where})")


class Backend(ABC):
    """A queue as the web layer sees it. Refusals are :mod:`dashboard.errors`."""

    #: The task kinds this queue runs; nothing else can be submitted.
    registry: Registry
    #: The number of workers asked for.
    workers: int

    # -- what it is ------------------------------------------------------------

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities: ...

    @property
    @abstractmethod
    def description(self) -> str:
        """Where the queue lives, for the page's header: "in this process's memory"."""

    @property
    @abstractmethod
    def identity(self) -> str:
        """Names this queue; another queue (a restart of an in-memory one) has another."""

    # -- reading ---------------------------------------------------------------

    @property
    @abstractmethod
    def tag(self) -> str:
        """Changes whenever anything a snapshot shows changes; cheap to read."""

    @abstractmethod
    def stats(self, recent: int = 20, upcoming: int = 0) -> Snapshot:
        """One consistent snapshot, with the ``recent`` last finished and the next
        ``upcoming`` queued tasks."""

    @abstractmethod
    def metrics(self) -> Metrics:
        """What a monitoring scrape shows (``GET /metrics``), in one consistent read: the
        counts, the live workers, and each kind's totals and wait and run times since the
        last reset. With a shared store, every process gives the same numbers."""

    @abstractmethod
    def get(self, task_id: TaskId) -> TaskInfo | None: ...

    @abstractmethod
    def wait(self, task_id: TaskId, timeout: float | None = None) -> TaskInfo:
        """Block until the task has finished; the task as it ended.

        Raises :class:`~dashboard.errors.TaskNotFound` for an unknown task (or one
        the history forgot while it was waited for), :class:`TimeoutError` when it
        has not finished after ``timeout`` seconds.
        """

    def result(self, task_id: TaskId, timeout: float | None = None) -> Any:
        """What the task returned, once it has finished (a JSON value).

        Raises :class:`~dashboard.errors.TaskFailed` when it failed or was
        cancelled, and what :meth:`wait` raises.
        """
        info = self.wait(task_id, timeout)
        if info.state is not State.DONE:
            raise TaskFailed(info)
        return info.result

    @abstractmethod
    def health(self) -> str | None:
        """Why the queue is not doing its work (a sentence), or None when it is."""

    @abstractmethod
    def stall(self, snapshot: Snapshot) -> str | None:
        """Why work waits although workers are idle, or None: the page's stall banner."""

    @property
    @abstractmethod
    def closed(self) -> bool:
        """Shutting down: no new work is taken."""

    @property
    @abstractmethod
    def started(self) -> bool: ...

    # -- acting -------------------------------------------------------------------

    def submit(self, kind: str, /, *, key: str | None = None, delay: Any = None,
               at: Any = None, time_limit: Any = None, **params: Any) -> TaskId:
        """Queue one task of ``kind`` with ``params``; its id. ``delay`` (seconds) or
        ``at`` (a datetime) schedules it; ``time_limit`` replaces its kind's. With a
        ``key``, while a task with that key is scheduled, queued or running, that
        task's id, and nothing queued."""
        if key is not None or delay is not None or at is not None or time_limit is not None:
            return self.enqueue(kind, params, key=key, delay=delay, at=at,
                                time_limit=time_limit).id
        return self.submit_many(kind, 1, params)[0]

    @abstractmethod
    def enqueue(self, kind: str, params: dict[str, Any] | None = None, *,
                key: str | None = None, delay: Any = None, at: Any = None,
                time_limit: Any = None) -> Submitted:
        """Queue (or schedule) one task, saying whether it did: ``(id, True)``, or ``(id
        of the task holding key, False)`` while a task with ``key`` is scheduled,
        queued or running."""

    @abstractmethod
    def submit_many(self, kind: str, count: int, params: dict[str, Any], *,
                    delay: Any = None, time_limit: Any = None) -> list[TaskId]:
        """Queue (or, with a delay, schedule) ``count`` tasks of ``kind``; all or none."""

    def schedules(self) -> list[ScheduleInfo]:
        """The periodic schedules, by name, with their next and last runs."""
        return list(self.stats(0).schedules)

    @abstractmethod
    def run_schedule(self, name: str) -> TaskId:
        """Queue a schedule's task now (the page's "Run now"); its next due time stays.
        Raises :class:`~dashboard.errors.ScheduleNotFound` for an unknown name."""

    @abstractmethod
    def cancel(self, task_id: TaskId) -> State: ...

    def force_stop(self, task_id: TaskId) -> None:
        """Stop a running task now, killing the process that runs it, where the backend
        can (the RQ backend, on a forking worker); the task ends cancelled. Elsewhere a
        400 saying so: a thread cannot be killed, and :meth:`cancel` asks a running task
        to stop (it sees ``ctx.cancelled``)."""
        raise InvalidParam("stop", f"is not available with this backend (the queue "
                           f"{self.description}): cancel asks a running task to stop")

    @abstractmethod
    def retry(self, task_id: TaskId) -> Retried:
        """Queue a failed or cancelled task again: ``(its retry's id, True)``. A task
        retried already queues nothing: ``(that retry's id, False)``, decided
        where the queue lives, so of two processes retrying at once one is told
        it queued the retry."""

    # -- the operator's view ------------------------------------------------------

    @abstractmethod
    def find(self, query: TaskFilter, *, limit: int = 50, cursor: str | None = None,
             oldest_first: bool = False) -> TaskPage:
        """One page of the tasks this queue holds that match ``query``, newest first (or
        oldest), from ``cursor`` (a page's ``newer`` or ``older``; None: the first page).
        A cursor this queue did not give out is refused (InvalidParam, a 400)."""

    @abstractmethod
    def count(self, query: TaskFilter) -> int:
        """How many tasks match ``query`` now (what a bulk action's confirmation says)."""

    @abstractmethod
    def bulk(self, action: str, query: TaskFilter) -> BulkResult:
        """Do ``action`` (``retry``, ``cancel`` or ``purge``: ``BULK_ACTIONS``) to every
        task that matches ``query`` and that the action applies to, in batches of
        ``BULK_BATCH`` (each its own short lock or transaction, so workers and submits
        go on meanwhile). Tasks that change meanwhile are taken as they are then."""

    @abstractmethod
    def kind_health(self) -> tuple[KindHealth, ...]:
        """Each registered kind's health (:class:`.KindHealth`), by name."""

    @abstractmethod
    def pause(self) -> None: ...

    @abstractmethod
    def resume(self) -> None: ...

    @abstractmethod
    def set_workers(self, count: int) -> int: ...

    @abstractmethod
    def clear_history(self) -> int: ...

    @abstractmethod
    def reset(self) -> None: ...


def encode_cursor(after: bool, task_id: TaskId) -> str:
    """A page cursor: continue ``after`` the task (in the list's order), or before it."""
    return f"{'a' if after else 'b'}{task_id}"


def decode_cursor(cursor: str | None) -> tuple[bool, str] | None:
    """``(after, task id as text)`` from a cursor :func:`encode_cursor` made; None for
    none; a 400 naming the field for anything else."""
    if cursor is None or cursor == "":
        return None
    if (not isinstance(cursor, str) or len(cursor) < 2 or len(cursor) > 65
            or cursor[0] not in "ab" or not all(c.isalnum() or c in "-_" for c in cursor[1:])):
        raise InvalidParam("cursor", "is not one this list gave out (use a page's newer "
                           "or older link)")
    return cursor[0] == "a", cursor[1:]


#: The names the web layer may use: tests hold the views to these.
SEAM = frozenset(
    name for name in dir(Backend) if not name.startswith("_")
) | {"registry", "workers"}

__all__ = ["SEAM", "Backend", "Capabilities", "TaskId", "decode_cursor", "encode_cursor"]
