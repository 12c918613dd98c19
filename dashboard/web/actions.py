"""What a request may do to the queue, checked and charged, for the page's forms
and the JSON API alike: add work, retry a task, run a schedule now, set the
worker count."""

from __future__ import annotations

import threading
from typing import Any, Mapping

from flask import current_app

from ..backend import TaskId
from ..records import BulkResult, Retried, Submitted, TaskFilter
from ..errors import CannotScale, InvalidParam, QueueError, QueueFull, TaskNotFound
from ..ext import current_queue
from ..tasks import Int, check_delay, check_key, check_time_limit
from . import security
from .answers import parse_task_id
from .search import acted_on, check_search, question


def count_spec() -> Int:
    return Int(1, current_app.config["QUEUE_MAX_BATCH"])


def _can(**asked: bool) -> None:
    """Refuse what the request asks for that this backend cannot do (a plain submit
    asks for nothing, and looks nothing up)."""
    if not any(asked.values()):
        return
    capabilities, where = current_queue.capabilities, current_queue.description
    for feature, wanted in asked.items():
        capabilities.check(feature, wanted, where)


def read_delay(raw: Any) -> float | None:
    """A request's ``delay``: seconds from now (a number, or a form's text); None or
    empty for now."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        try:
            raw = float(raw.strip())
        except ValueError:
            pass  # check_delay says what it must be
    return check_delay(raw)


def submit(kind_name: Any, count: Any, params: Any, delay: Any = None,
           time_limit: Any = None) -> list[TaskId]:
    """Check everything the request says, then queue (or schedule, with a ``delay``),
    charging the client for what was queued."""
    count = count_spec().parse("count", count)
    if not isinstance(params, dict):
        raise InvalidParam("params", f"must be an object of parameters, got {type(params).__name__}")
    current_queue.registry.get(kind_name).check_params(params)  # bad input: 400, not 429
    _can(delay=delay not in (None, ""), time_limit=time_limit is not None)
    due_in = read_delay(delay)
    limit = None if time_limit is None else check_time_limit(time_limit)
    return security.spend_submit(count, lambda: current_queue.submit_many(
        kind_name, count, params, delay=due_in, time_limit=limit))


def submit_keyed(kind_name: Any, count: Any, params: Any, key: Any,
                 delay: Any = None, time_limit: Any = None) -> Submitted:
    """:func:`submit` of one task with a unique key: charged only when it queued one."""
    if count_spec().parse("count", count) != 1:
        raise InvalidParam("count", "must be 1 with a key: a key names one task")
    if not isinstance(params, dict):
        raise InvalidParam("params", f"must be an object of parameters, got {type(params).__name__}")
    current_queue.registry.get(kind_name).check_params(params)
    _can(key=True, delay=delay not in (None, ""), time_limit=time_limit is not None)
    check_key(key)
    due_in = read_delay(delay)
    limit = None if time_limit is None else check_time_limit(time_limit)
    return security.spend_submit(
        1, lambda: current_queue.enqueue(kind_name, params, key=key, delay=due_in,
                                         time_limit=limit),
        queued=lambda done: int(done.created))

def retry(task_id: str) -> tuple[Retried, TaskId]:
    """Retry a task: ``(what the backend did, the task's id)``.

    A task retried already is not queued again (a double click queues one
    task): its retry's id comes back, and costs the client nothing. The
    backend says which it was, so two requests at once (in two processes
    sharing a store) are answered and charged for what each one did.
    """
    info = current_queue.get(parse_task_id(task_id))
    if info is None:
        raise TaskNotFound(task_id)  # before the limit: an unknown task is a 404, not a 429
    if info.retried_as is not None:  # nothing to queue: no limit to pass
        return current_queue.retry(info.id), info.id
    retried = security.spend_submit(1, lambda: current_queue.retry(info.id),
                                    queued=lambda done: int(done.created))
    return retried, info.id


def run_schedule(name: str) -> TaskId:
    """Queue a schedule's task now (its "Run now"), charged to the client as one task
    like any other it adds; the schedule's next due time stays.

    An unknown name is a 404 naming the known schedules, and a backend that does
    not run schedules a 400 saying so: both before the limit, so neither costs
    the client anything.
    """
    if not current_queue.capabilities.schedules:
        raise InvalidParam("schedules", f"are not run by this backend (the queue "
                           f"{current_queue.description})")
    schedule = current_queue.registry.get_schedule(name)
    return security.spend_submit(1, lambda: current_queue.run_schedule(schedule.name))

class CountChanged(QueueError):
    """A bulk action confirmed for ``expected`` tasks now finds more: nothing was done."""

    status = 409

    def __init__(self, action: str, query: TaskFilter, count: int, expected: int):
        self.count = count
        super().__init__(
            f"the filter now matches {count} tasks to {action}, not the {expected} you "
            f"confirmed: nothing was done. {question(action, query, count)}")


class TooManyAtOnce(QueueError):
    """A bulk retry would queue more tasks at once than ``QUEUE_SUBMIT_LIMIT`` ever allows
    one client: waiting would not help, a narrower filter would (429)."""

    status = 429

    def __init__(self, count: int, limit: str, amount: int):
        super().__init__(
            f"retrying {count} tasks at once is refused: QUEUE_SUBMIT_LIMIT allows {limit} "
            f"from one client, and a retry queues a new task for each; nothing was retried. "
            f"Narrow the filter (a kind, a text) to at most {amount} tasks, or raise the limit")


class PartlyDone(QueueError):
    """The queue filled up while a bulk retry ran: some were retried, the rest not (503)."""

    status = 503
    retry_after = 5

    def __init__(self, done: int, count: int, reason: str):
        super().__init__(f"the queue filled up part way: {done} of {count} tasks were "
                         f"retried, the other {count - done} were not ({reason}); retry the "
                         f"rest once the queue has room")


def bulk(action: str, query: TaskFilter, expected: int | None = None) -> BulkResult:
    """Do a bulk action to every task ``query`` matches that it applies to.

    ``expected`` is the count the person confirmed: when more match now, nothing is
    done (409). A retry queues a task for each, so it is charged to the client like a
    submit of that many, checked first against ``QUEUE_SUBMIT_LIMIT`` (more than it
    ever allows at once: a 429 saying so) and the room in the queue (503): it is done
    whole or not at all, never half without a word.
    """
    check_search(query)
    target = acted_on(query, action)
    count = 0 if target is None else current_queue.count(target)
    if expected is not None and count > expected:
        raise CountChanged(action, query, count, expected)
    if not count:
        return BulkResult(action, 0)
    if action != "retry":
        return current_queue.bulk(action, query)
    allowance = security.submit_allowance()
    if allowance is not None and count > allowance:
        raise TooManyAtOnce(count, security.submit_limit_words(), allowance)
    snap = current_queue.stats(0)
    if count > snap.max_queued - snap.queued:
        raise QueueFull(snap.queued, snap.max_queued, count)

    def retry_all() -> BulkResult:
        try:
            return current_queue.bulk("retry", query)
        except QueueFull as exc:  # others filled the queue meanwhile: say how far it got
            left = current_queue.count(target)  # type: ignore[arg-type]
            raise PartlyDone(max(0, count - left), count, str(exc)) from None

    return security.spend_submit(count, retry_all, queued=lambda done: done.count)


#: One change of the worker count at a time in this process: a ``delta`` reads the
#: count and sets it, and two clicks at once must not both start from the same count.
_WORKERS_LOCK = threading.Lock()


def set_workers(data: Mapping[str, Any]) -> int:
    """Set the worker count a request asks for: ``count`` outright (1..QUEUE_MAX_WORKERS, else
    a 400), or ``delta`` from now, clamped to that range.

    The page's − and + post ``delta``: a click more than the range allows (a
    double click at 2 workers, twenty clicks on +) stops at the end and is
    no error. A ``delta`` never moves the count against its sign (from 0
    workers, − stays at 0). A backend whose workers are separate processes
    refuses it (a 409 with its ``scale_hint``), having changed nothing.
    """
    capabilities = current_queue.capabilities
    if not capabilities.scale_workers:
        raise CannotScale(capabilities.scale_hint)
    top = current_app.config["QUEUE_MAX_WORKERS"]
    if data.get("count") not in (None, ""):
        return current_queue.set_workers(Int(1, top).parse("count", data["count"]))
    delta = Int(-top, top).parse("delta", data.get("delta"))
    with _WORKERS_LOCK:
        now = current_queue.workers
        if delta > 0:
            wanted = max(now, min(now + delta, top))
        elif delta < 0:
            wanted = min(now, max(now + delta, 1))
        else:
            wanted = now
        return current_queue.set_workers(wanted)
