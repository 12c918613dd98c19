"""Task states, task records and the read-only snapshots handed to views.

A :class:`TaskRecord` is the store's mutable, private state of one task. What
leaves the store is always a copy: :class:`TaskInfo` for a task,
:class:`WorkerInfo` for a worker thread and :class:`Snapshot` for the whole
queue, all immutable, so a view can render them without holding any lock.
"""

from __future__ import annotations

import json
import logging
import time
from enum import Enum
from typing import Any, NamedTuple


class State(str, Enum):
    """Every state a task can be in. Templates and JSON use the string values."""

    SCHEDULED = "scheduled"  # delayed: queued when due
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


FINISHED_STATES = frozenset({State.DONE, State.FAILED, State.CANCELLED})

# -- the rules about a task: each written once, here ---------------------------------

#: States from which a task can be cancelled (a scheduled or queued one never runs;
#: a running one is asked to stop).
CANCELLABLE_STATES = frozenset({State.SCHEDULED, State.QUEUED, State.RUNNING})
#: States from which a task can be retried (as a new task of the same kind and params).
RETRYABLE_STATES = frozenset({State.FAILED, State.CANCELLED})
CANNOT_CANCEL = "only scheduled, queued or running tasks can be cancelled"
CANNOT_RETRY = "only failed or cancelled tasks can be retried"


def clean_progress(fraction: Any, message: Any = None) -> tuple[float, str | None]:
    """What ``ctx.progress(fraction, message)`` records, on every backend: the fraction
    clamped to 0..1 (a number, never NaN: that would clamp to 0 unseen), the message
    cut to 200 characters."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise TypeError(f"progress fraction must be a number, got {fraction!r}") from None
    if value != value:
        raise ValueError("progress fraction must be a number from 0 to 1, got nan")
    return min(1.0, max(0.0, value)), None if message is None else str(message)[:200]


def task_logger(kind: str) -> logging.Logger:
    """``ctx.logger``: ``dashboard.task.<kind>``, at INFO and up unless set otherwise."""
    logger = logging.getLogger(f"dashboard.task.{kind}")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    return logger


def progress_changed(old: float, new: float, old_message: str | None,
                     new_message: str | None) -> bool:
    """Whether progress moved in a way a person can see (a whole percent, or a new
    message): only then is it a new version of the queue, worth a poll's render."""
    return int(new * 100) != int(old * 100) or new_message != old_message


class WorkerState(str, Enum):
    """What a worker is doing, as the dashboard and the API say it."""

    IDLE = "idle"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"  # finishing its task while the queue shuts down, or dead holding one
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def of(cls, has_task: bool, alive: bool, paused: bool, closed: bool) -> WorkerState:
        """One rule for every store."""
        if has_task:
            return cls.STOPPING if closed or not alive else cls.RUNNING
        if not alive:
            return cls.STOPPED
        return cls.PAUSED if paused else cls.IDLE


class TaskRecord:
    """The live state of one task inside a store. Change it only under the store's lock."""

    __slots__ = (
        "id",
        "kind",
        "params",
        "state",
        "enqueued_at",
        "started_at",
        "finished_at",
        "progress",
        "message",
        "error",
        "traceback",
        "worker",
        "cancel_requested",
        "cancel_seen",
        "retry_of",
        "retried_as",
        "attempts",
        "time_limit",
        "deadline",
        "_more",
        "checked_at",
        "queued_clock",
        "started_clock",
        "dirty",
        "lost",
    )

    def __init__(self, task_id: int, kind: str, params: dict[str, Any], enqueued_at: float):
        self.id = task_id
        self.kind = kind
        self.params = params
        self.state = State.QUEUED
        self.enqueued_at = enqueued_at
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.progress = 0.0
        self.message: str | None = None
        self.error: str | None = None
        self.traceback: str | None = None
        self.worker: str | None = None
        self.cancel_requested = False
        self.cancel_seen = False  # the task read ctx.cancelled while it was set
        self.retry_of: int | None = None
        self.retried_as: int | None = None
        self.attempts = 0
        self.time_limit: float | None = None  # seconds it may run, or None
        self.deadline = 0.0  # while it runs here with a limit: when (monotonic) it is up
        # What most tasks never have (a result, a key, a due time, earlier errors, log
        # lines...): made on the first write, so a plain submit builds no more than it
        # did before they existed. Read and written as attributes: see _MORE below.
        self._more: _More | None = None
        self.checked_at = 0.0  # when a shared store last looked for a cancel request
        # When it was queued and started on a clock that never steps (the
        # durations behind the rates); the *_at times above are for people.
        self.queued_clock = 0.0
        self.started_clock = 0.0
        self.dirty = False  # progress not yet written (a shared store)
        self.lost = False  # its run here no longer counts: another process took it back

    def info(self) -> TaskInfo:
        more = self._more
        if more is None:
            result = key = due_at = schedule = None
            errors = logs = ()
            dropped = 0
        else:
            result, key, due_at, dropped = more.result, more.key, more.due_at, more.logs_dropped
            schedule = more.schedule
            errors = tuple(more.errors) if more.errors else ()
            logs = tuple(more.logs) if more.logs else ()
        return TaskInfo(
            self.id,
            self.kind,
            self.params,
            self.state,
            self.enqueued_at,
            self.started_at,
            self.finished_at,
            self.progress,
            self.message,
            self.error,
            self.traceback,
            self.worker,
            self.cancel_requested,
            self.retry_of,
            self.retried_as,
            self.attempts,
            result,
            key,
            due_at,
            errors,
            self.time_limit,
            logs,
            dropped,
            schedule,
        )


#: A task record's rarer fields, with what they are until first written.
_MORE: dict[str, Any] = {
    "result": None,  # what the task returned, as JSON text
    "key": None,  # while it is scheduled, queued or running, no other task has it
    "due_at": None,  # delayed: when it is due (wall clock, to show)
    "due_clock": 0.0,  # the same on the clock that never steps
    "errors": (),  # earlier attempts that failed and were tried again
    "retry_in": 0.0,  # set when this attempt failed and is to be tried again
    "overdue": False,  # it ran past its limit and the supervisor said so
    "logs": (),  # the last lines it logged
    "logs_dropped": 0,  # older lines no longer kept
    "schedule": None,  # the periodic schedule that queued it
}


class _More:
    __slots__ = tuple(_MORE)

    def __init__(self) -> None:
        for name, default in _MORE.items():
            setattr(self, name, default)



def _more_field(name: str, default: Any) -> property:
    def get(record: TaskRecord) -> Any:
        more = record._more
        return default if more is None else getattr(more, name)

    def put(record: TaskRecord, value: Any) -> None:
        more = record._more
        if more is None:
            more = record._more = _More()
        setattr(more, name, value)

    return property(get, put, doc=f"{name} (default {default!r} until written)")


for _name, _default in _MORE.items():
    setattr(TaskRecord, _name, _more_field(_name, _default))


#: A task's id, as its backend gives it out: an integer from the in-process
#: stores, a string from others (RQ's job ids). The web layer reads ids from
#: requests as text (1 to 64 letters, digits, ``-`` and ``_``) and hands that
#: text back: a backend's ``get(str(task_id))`` finds the task ``task_id``
#: names, and an id it never gave out is an unknown task, never an error.
TaskId = int | str


class Retried(NamedTuple):
    """What a retry did: the retry's id, and whether this call queued it (False:
    the task had been retried already, by an earlier click or another process,
    and ``id`` is that retry; nothing was queued)."""

    id: TaskId
    created: bool


class Submitted(NamedTuple):
    """What a submit did: the task's id, and whether this call queued it (False: a
    task with the same key was queued or running, and ``id`` is that task)."""

    id: TaskId
    created: bool


class TaskInfo(NamedTuple):
    """An immutable copy of one task, as views and the JSON API see it."""

    id: TaskId
    kind: str
    params: dict[str, Any]
    state: State
    enqueued_at: float
    started_at: float | None
    finished_at: float | None
    progress: float
    message: str | None
    error: str | None
    traceback: str | None
    worker: str | None
    cancel_requested: bool = False
    retry_of: TaskId | None = None
    retried_as: TaskId | None = None
    attempts: int = 0
    #: What the task returned, as JSON text (None: it returned None, or has not ended).
    result_json: str | None = None
    #: Its unique key: while it is queued or running, a submit with the key gives this task.
    key: str | None = None
    #: A delayed task: when it is (or was) due, on the wall clock.
    due_at: float | None = None
    #: Earlier attempts that failed and were retried automatically, oldest first:
    #: ``{"attempt": n, "error": "...", "at": wall clock}``.
    errors: tuple[dict[str, Any], ...] = ()
    #: Seconds it may run (its own, else its kind's), or None.
    time_limit: float | None = None
    #: The last lines it logged while it ran, and how many earlier ones were let go.
    logs: tuple[str, ...] = ()
    logs_dropped: int = 0
    #: The periodic schedule that queued it (its due time is ``due_at``), or None.
    schedule: str | None = None

    @property
    def result(self) -> Any:
        """What the task returned (a JSON value: None, bool, number, str, list, dict)."""
        return None if self.result_json is None else json.loads(self.result_json)

    @property
    def overdue(self) -> bool:
        """Running past its time limit: ``ctx.cancelled`` is true, and the task holds its
        worker until it returns (a thread cannot be killed)."""
        return (self.state is State.RUNNING and self.time_limit is not None
                and self.started_at is not None
                and time.time() - self.started_at > self.time_limit)

    @property
    def can_cancel(self) -> bool:
        """Whether Cancel applies: queued or running, and not asked to stop already."""
        return self.state in CANCELLABLE_STATES and not self.cancel_requested

    @property
    def can_retry(self) -> bool:
        """Whether Retry applies: failed or cancelled, and not retried already."""
        return self.state in RETRYABLE_STATES and self.retried_as is None

    @property
    def shows_progress(self) -> bool:
        """Whether a progress bar means anything: only while it runs."""
        return self.state is State.RUNNING

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @property
    def wait(self) -> float | None:
        """Seconds between being queued and starting, once started."""
        if self.started_at is None:
            return None
        return max(0.0, self.started_at - self.enqueued_at)

    @property
    def duration(self) -> float | None:
        """Seconds the task ran, once finished after starting."""
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at)

    @property
    def percent(self) -> int:
        return int(self.progress * 100)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "params": dict(self.params),
            "state": self.state.value,
            "enqueued_at": self.enqueued_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "progress": self.progress,
            "message": self.message,
            "error": self.error,
            "worker": self.worker,
            "cancel_requested": self.cancel_requested,
            "retry_of": self.retry_of,
            "retried_as": self.retried_as,
            "attempts": self.attempts,
            "result": self.result,
            "key": self.key,
            "due_at": self.due_at,
            "errors": list(self.errors),
            "time_limit": self.time_limit,
            "overdue": self.overdue,
            "logs": list(self.logs),
            "logs_dropped": self.logs_dropped,
            "schedule": self.schedule,
        }


class WorkerInfo(NamedTuple):
    """One worker thread: its name, state (idle, running, paused, stopped), task and process."""

    name: str
    state: WorkerState
    task: TaskInfo | None
    done: int
    pid: int = 0
    #: The machine it runs on, for a backend whose workers run elsewhere; empty for
    #: the in-process threads.
    host: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": str(self.state),
            "task": None if self.task is None else self.task.to_dict(),
            "done": self.done,
            "pid": self.pid,
            "host": self.host,
        }


class ScheduleState(NamedTuple):
    """What a store keeps of one schedule: when it is next due, and its last run."""

    next_due: float | None = None  # wall clock
    last_due: float | None = None  # the due time of the last run (a run now: when asked)
    last_task: TaskId | None = None
    last_state: State | None = None  # None: no run yet, or the history forgot it
    runs: int = 0


class ScheduleInfo(NamedTuple):
    """One periodic schedule as the page and the JSON API show it."""

    name: str
    kind: str
    params: dict[str, Any]
    #: As the code gave it (``"*/5 * * * *"``, ``"every 10 seconds"``), and in words.
    expression: str
    description: str
    next_due: float | None = None
    last_due: float | None = None
    last_task: TaskId | None = None
    last_state: State | None = None
    runs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "params": dict(self.params),
            "expression": self.expression,
            "description": self.description,
            "next_due": self.next_due,
            "last_due": self.last_due,
            "last_task": self.last_task,
            "last_state": None if self.last_state is None else self.last_state.value,
            "runs": self.runs,
        }


#: Seconds of per-second history a snapshot's ``series`` covers (the depth chart, the rates).
SERIES_SECONDS = 300


class Snapshot(NamedTuple):
    """One consistent view of a queue, taken under one lock.

    Times a person reads (``taken_at``, the series' seconds) are on the wall
    clock; the durations (rates, waits) are measured on a clock that never
    steps, so a wall-clock step changes no rate.

    ``tag`` changes whenever anything a dashboard shows changes; it includes a
    token of the process and store, so tags from another process or an earlier
    run never match. ``throughput`` (tasks finished per minute), ``mean_wait``
    and ``mean_run`` are measured over the last minute; ``series`` holds
    ``(second, depth at its end, highest depth in it)`` for the seconds in
    which anything happened, over the last few minutes.
    """

    tag: str
    version: int
    pid: int
    queued: int
    running: int
    done: int
    failed: int
    cancelled: int
    submitted: int
    restarts: int
    paused: bool
    closed: bool
    max_queued: int
    workers: tuple[WorkerInfo, ...]
    recent: tuple[TaskInfo, ...]
    upcoming: tuple[TaskInfo, ...]
    mean_wait: float | None
    mean_run: float | None
    throughput: float
    series: tuple[tuple[float, int, int], ...]
    taken_at: float
    #: Seconds the oldest queued task has waited, and since a worker last took a
    #: task (None: never): together with idle workers, they tell a stall.
    oldest_wait: float | None = None
    idle_for: float | None = None
    #: Delayed tasks not yet due (not counted in ``queued``), and the next ones due.
    scheduled: int = 0
    soon: tuple[TaskInfo, ...] = ()
    #: The periodic schedules, by name (see :class:`ScheduleInfo`).
    schedules: tuple[ScheduleInfo, ...] = ()

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.cancelled

    @property
    def eta(self) -> float | None:
        """Seconds until the queue is empty at the current rate; None if it is not moving."""
        if not self.queued:
            return 0.0
        if self.paused or not self.throughput:
            return None
        return self.queued * 60.0 / self.throughput

    def to_dict(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "version": self.version,
            "pid": self.pid,
            "queued": self.queued,
            "scheduled": self.scheduled,
            "running": self.running,
            "done": self.done,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "submitted": self.submitted,
            "restarts": self.restarts,
            "paused": self.paused,
            "closed": self.closed,
            "max_queued": self.max_queued,
            "workers": [w.to_dict() for w in self.workers],
            "recent": [t.to_dict() for t in self.recent],
            "mean_wait": self.mean_wait,
            "mean_run": self.mean_run,
            "throughput": self.throughput,
            "eta": self.eta,
            "schedules": [s.to_dict() for s in self.schedules],
        }


# -- metrics: what a monitoring scrape reads -------------------------------------------

#: The upper bounds (seconds) of the wait and run time histograms' buckets, as
#: Prometheus counts them (each bucket holds every duration up to its bound, a last
#: one, +Inf, all of them): from 5 ms, a hand-off to an idle worker, to 10 minutes.
#: The SQLite store keeps a column per bound: changing them is a new schema version.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0, 600.0)


class Histogram(NamedTuple):
    """Durations observed, as Prometheus counts them: ``buckets[i]`` is how many were at
    most ``DURATION_BUCKETS[i]`` seconds (cumulative), ``count`` how many in all (the
    +Inf bucket), ``sum`` their total in seconds."""

    buckets: tuple[int, ...]
    count: int
    sum: float


#: A histogram with nothing observed yet.
NO_DURATIONS = Histogram((0,) * len(DURATION_BUCKETS), 0, 0.0)


class KindStats(NamedTuple):
    """One task kind's totals since the last reset, kept by the store as tasks change
    state (never counted from the history, which forgets).

    ``retried``: failed attempts that the kind's retry policy scheduled again (a
    task retried from the page is a new task, counted in ``submitted``). ``wait``:
    from being queued (or falling due) to each start; ``run``: from each start to
    the end of that attempt (done, failed, cancelled, or scheduled again)."""

    kind: str
    submitted: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    retried: int = 0
    wait: Histogram = NO_DURATIONS
    run: Histogram = NO_DURATIONS


class Metrics(NamedTuple):
    """What a monitoring scrape reads, taken in one read (one lock, or one transaction
    of the shared file), so its numbers agree with each other.

    With a shared store every process gives the same values: the counts and the
    per-kind totals are the file's, and ``workers`` counts the live worker threads
    of every live process using it."""

    queued: int
    scheduled: int
    running: int
    #: Worker threads alive (those finishing a task while stopping included).
    workers: int
    paused: bool
    #: Seconds the oldest queued task has waited; None when nothing is queued.
    oldest_wait: float | None
    #: One entry per kind seen since the last reset, by name.
    kinds: tuple[KindStats, ...]
    taken_at: float
    pid: int


# -- the operator's view: finding tasks, acting on many, each kind's health ------------


#: What a bulk action may do, and the states of the tasks it acts on.
BULK_ACTIONS = {
    "retry": RETRYABLE_STATES,  # queued again as new tasks, linked (each once)
    "cancel": frozenset({State.SCHEDULED, State.QUEUED}),  # never run
    "purge": FINISHED_STATES,  # forgotten (the counters keep their totals)
}
#: Tasks a bulk action handles per batch: each batch is one short lock or transaction,
#: so workers and submits go on between them. (200 made a submit wait up to ~65 ms
#: behind a SQLite retry batch on a busy 2-core machine; 100 halves it: bench row 10d.)
BULK_BATCH = 100
#: Characters of text a search may ask for.
MAX_SEARCH_TEXT = 200


class TaskFilter(NamedTuple):
    """Which tasks a search, a count or a bulk action means: those that match every part
    given. ``text`` is looked for, in any case, in the task's params (as JSON) and in its
    error."""

    states: frozenset[State] = frozenset()  # empty: every state
    kind: str | None = None
    text: str | None = None
    #: Only tasks not retried yet (what a bulk retry acts on).
    not_retried: bool = False

    def matches(self, info: TaskInfo) -> bool:
        """The rule every backend keeps (the memory store applies it as written)."""
        if self.states and info.state not in self.states:
            return False
        if self.not_retried and info.retried_as is not None:
            return False
        if self.kind is not None and info.kind != self.kind:
            return False
        if self.text:
            params, error = params_text(info.params).casefold(), (info.error or "").casefold()
            return any(n.casefold() in params or n.casefold() in error for n in self.needles())
        return True

    def needles(self) -> tuple[str, ...]:
        r"""What a text search looks for, in any case: the text as typed and, where they
        differ, as JSON writes it inside a string (a backslash doubled: ``C:\\data`` for
        ``C:\data``; and with its quotes escaped too), so a param with a backslash or a
        quote is found as the person typed it, and ``"path":"C:\data"`` finds it too."""
        if not self.text:
            return ()
        variants = (self.text, self.text.replace("\\", "\\\\"),
                    json.dumps(self.text, ensure_ascii=False)[1:-1])
        return tuple(dict.fromkeys(variants))

    def for_action(self, action: str) -> TaskFilter:
        """This filter narrowed to the tasks ``action`` acts on (``retry``: the failed and
        cancelled ones that match, and so on). When none of its states is one the action
        acts on (a filter for queued tasks, and a retry), the result's ``states`` is
        empty, which in a filter means *every* state: check it before using the filter
        (``bulk`` and the web layer's ``acted_on`` do, and then act on nothing)."""
        acts_on = BULK_ACTIONS[action]
        states = acts_on & self.states if self.states else acts_on
        return self._replace(states=frozenset(states), not_retried=action == "retry")

    def to_dict(self) -> dict[str, Any]:
        return {"states": sorted(s.value for s in self.states), "kind": self.kind,
                "text": self.text}


def params_text(params: dict[str, Any]) -> str:
    """A task's params as the text a search looks in (and the SQLite store keeps)."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class TaskPage(NamedTuple):
    """One page of a search, in the order asked for, and where the pages beside it start.

    The cursors are opaque text: ``older`` continues the list past the last task,
    ``newer`` goes back before the first; None where there is nothing more. A page
    is found from its cursor's task on an index (keyset paging), so the thousandth
    page costs what the first does, and a page does not shift when tasks are added
    before it."""

    tasks: tuple[TaskInfo, ...]
    newer: str | None = None
    older: str | None = None


class BulkResult(NamedTuple):
    """What a bulk action did: how many tasks, and which (for a retry: the new tasks)."""

    action: str
    count: int
    ids: tuple[TaskId, ...] = ()

    def line(self) -> str:
        """One line for people: "312 failed tasks retried as #5001–#5312"."""
        noun = "task" if self.count == 1 else "tasks"
        if self.action == "retry":
            if not self.count:
                return "no task to retry"
            return f"{self.count} {noun} retried as {_id_range(self.ids)}"
        done = {"cancel": "cancelled", "purge": "purged"}[self.action]
        return f"{self.count} {noun} {done}" if self.count else f"no task to {self.action}"

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "count": self.count, "ids": list(self.ids),
                "line": self.line()}


def _id_range(ids: tuple[TaskId, ...]) -> str:
    if len(ids) == 1:
        return f"#{ids[0]}"
    numbers = [i for i in ids if isinstance(i, int)]
    if len(numbers) == len(ids) and max(numbers) - min(numbers) == len(ids) - 1:
        return f"#{min(numbers)}–#{max(numbers)}"
    return f"#{ids[0]} … #{ids[-1]}"


#: The window of each kind's health (seconds): the last hour, kept by the minute.
HEALTH_WINDOW = 3600


class KindHealth(NamedTuple):
    """How one kind is doing: queued and running now; done and failed, and the run and
    wait times of what ended, over the last hour (kept by the minute as tasks end, never
    counted from the history). Times are histogram estimates (the bucket bound at the
    percentile), None when nothing ended."""

    kind: str
    queued: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    run_p50: float | None = None
    run_p95: float | None = None
    wait_p95: float | None = None

    @property
    def failure_rate(self) -> float | None:
        ended = self.done + self.failed
        return self.failed / ended if ended else None

    def to_dict(self) -> dict[str, Any]:
        return {**self._asdict(), "failure_rate": self.failure_rate}


def percentile(buckets: tuple[int, ...] | list[int], fraction: float) -> float | None:
    """The upper bound of the histogram bucket holding the ``fraction`` percentile of what
    ``buckets`` counted (per bucket, not cumulative; one count per DURATION_BUCKETS bound
    and a last one past them: then the last bound, "at least"). None when empty."""
    total = sum(buckets)
    if not total:
        return None
    rank, seen = fraction * total, 0
    for bound, count in zip((*DURATION_BUCKETS, DURATION_BUCKETS[-1]), buckets):
        seen += count
        if seen >= rank:
            return bound
    return DURATION_BUCKETS[-1]
