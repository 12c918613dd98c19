"""Every refusal the queue gives, each carrying the HTTP status that answers it.

A refusal means nothing was done, and its message says why in words a person
can act on (it names the field, the limit, the state). The web layer answers
any :class:`QueueError` with ``status`` and ``headers()``, so no view keeps a
table of exception types; a new refusal brings its own status.

Server-side faults are refusals too when nothing was changed: a store that
cannot be read or written right now is a ``503`` with ``Retry-After``, never
a ``400`` that blames the request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .records import State, TaskInfo


def short(value: object) -> str:
    """``repr(value)``, cut to 40 characters: an error quotes what it was given,
    and what it was given may be huge, or nested too deeply to repr at all."""
    try:
        text = repr(value)
    except RecursionError:
        return f"a {type(value).__name__} nested too deeply to show"
    return text if len(text) <= 40 else text[:37] + "..."


class QueueError(Exception):
    """Base of every refusal: nothing was done; the message says why."""

    #: The HTTP status that answers this refusal.
    status: int = 400
    #: Seconds after which the same request may succeed (sent as ``Retry-After``).
    retry_after: int | None = None

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class UnknownKind(QueueError):
    """The named task kind is not registered."""

    def __init__(self, kind: object, known: list[str]):
        self.kind = kind
        self.known = known
        super().__init__(
            f"kind must be one of: {', '.join(known) or '(none registered)'}; got {short(kind)}"
        )


class InvalidParam(QueueError):
    """A field of a request, or a task parameter, is missing, of the wrong type or
    out of range; ``field`` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field} {message}")


class TaskNotFound(QueueError):
    """No task has this id (or the history forgot it)."""

    status = 404

    def __init__(self, task_id: object):
        self.task_id = task_id
        super().__init__(f"no task {task_id}: unknown, or no longer in the history")


class ScheduleNotFound(QueueError):
    """No schedule has this name."""

    status = 404

    def __init__(self, name: object, known: list[str]):
        self.name = name
        super().__init__(f"no schedule {short(name)}; schedules are: "
                         f"{', '.join(known) or '(none declared)'}")


class WrongState(QueueError):
    """The task is not in a state that allows what was asked."""

    status = 409

    def __init__(self, task_id: object, state: State, wanted: str):
        self.task_id = task_id
        self.state = state
        super().__init__(f"task {task_id} is {state}; {wanted}")


class CannotScale(QueueError):
    """The worker count cannot be changed from here: this backend's workers are
    separate processes. The message says how to change it instead."""

    status = 409

    def __init__(self, hint: str = ""):
        super().__init__(hint or "the worker count is set where the workers run, not here")


class RateLimited(QueueError):
    """This client added more tasks than ``QUEUE_SUBMIT_LIMIT`` allows.

    ``limit`` is the limit in words, like "3 tasks per minute".
    """

    status = 429

    def __init__(self, limit: str, retry_after: int):
        self.retry_after = retry_after
        super().__init__(
            f"too much work from this client: the limit is {limit}; "
            f"try again in {retry_after}s"
        )


class QueueFull(QueueError):
    """The queue holds ``max_queued`` tasks; nothing of the request was queued.

    ``retry_after`` is unset here; the web layer estimates it from the run time.
    """

    status = 503

    def __init__(self, queued: int, max_queued: int, requested: int, what: str = "queued"):
        self.queued = queued
        self.max_queued = max_queued
        self.requested = requested
        where = "queue is full" if what == "queued" else f"too many {what}"
        super().__init__(
            f"{where}: {queued} of {max_queued} {what}, {requested} more requested"
        )


class BulkStopped(QueueError):
    """A bulk action stopped part way (a full queue while retrying): ``ids`` were done,
    the rest was not. The message says how many and why; nothing done is undone."""

    status = 503

    def __init__(self, action: str, ids: list, reason: QueueError):
        self.action = action
        self.ids = list(ids)
        self.reason = reason
        self.retry_after = reason.retry_after
        super().__init__(f"{action} stopped after {len(self.ids)} task(s): {reason}")


class QueueClosed(QueueError):
    """The queue is shutting down and takes no new work."""

    status = 503
    retry_after = 5

    def __init__(self) -> None:
        super().__init__("queue is shutting down and takes no new work")


class StoreUnavailable(QueueError):
    """The store cannot answer right now (its file is locked, deleted or unreadable).

    Nothing was changed; the request may be sent again after ``retry_after`` seconds.
    """

    status = 503

    def __init__(self, reason: str, retry_after: int = 5):
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(f"the queue is unavailable right now: {reason}; try again shortly")


class StoreError(QueueError):
    """The store cannot be used as configured (at start), or failed (later).

    At start the extension turns it into a :class:`~dashboard.config.ConfigError`;
    met while answering a request it is a ``503``: the fault is the server's,
    not the request's. ``busy``: the file was only locked by another process
    (worth trying again).
    """

    status = 503
    retry_after = 5
    busy = False


#: The name this base had before it carried a status; kept for code that catches it.
TaskError = QueueError

class TaskFailed(Exception):
    """Waiting for a task's result: the task failed, or was cancelled. ``info`` is the
    task as it ended (its ``error`` and ``traceback``). Not a refusal: the queue did
    what was asked; the task did not."""

    def __init__(self, info: TaskInfo):
        self.info = info
        how = "was cancelled" if info.state.value == "cancelled" else "failed"
        super().__init__(f"task {info.id} {how}: {info.error or 'no reason given'}")


__all__ = [
    "BulkStopped",
    "CannotScale",
    "InvalidParam",
    "QueueClosed",
    "QueueError",
    "QueueFull",
    "RateLimited",
    "StoreError",
    "StoreUnavailable",
    "TaskError",
    "TaskFailed",
    "TaskNotFound",
    "UnknownKind",
    "WrongState",
    "short",
]
