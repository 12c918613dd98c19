"""The work queue: worker threads and their supervisor on top of a store.

:class:`WorkQueue` owns threads and nothing else; all state lives in the
store (:mod:`dashboard.local.store`). Submitting is O(1) and never waits for work.

This module imports nothing from Flask; :mod:`dashboard.ext` adds the glue.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
import weakref
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any, Callable, Mapping

from ..backend import Backend, Capabilities, decode_cursor, encode_cursor
from ..records import (BULK_ACTIONS, BULK_BATCH, BulkResult, KindHealth, TaskFilter, TaskPage,
                       Metrics, Retried, ScheduleInfo, Snapshot, State, Submitted, TaskInfo,
                       TaskRecord, clean_progress, task_logger)
from ..errors import BulkStopped, InvalidParam, QueueClosed, QueueFull, StoreUnavailable, TaskNotFound
from ..periodic import CATCH_UP, Schedule
from ..signals import (send as _send_signal, task_cancelled, task_failed, task_retried,
                       task_started, task_submitted, task_succeeded)
from .memory import MemoryStore
from . import tasklog
from .tasklog import ensure_installed as _capture_task_logs
from .tasklog import running as _task_running
from .store import Run, Store
from ..tasks import (Registry, check_delay, check_key, check_time_limit,
                     registry as default_registry)

__all__ = ["WorkQueue", "TaskContext", "QueueFull", "QueueClosed"]

logger = logging.getLogger("dashboard.queue")

#: ``runner(fn, ctx, params)`` calls the task function; the Flask glue wraps it
#: in an app context.
Runner = Callable[[Callable[..., Any], "TaskContext", Mapping[str, Any]], Any]


def _run_plain(fn: Callable[..., Any], ctx: TaskContext, params: Mapping[str, Any]) -> Any:
    return fn(ctx, **params)


class TaskContext:
    """What a running task receives as its first argument.

    Use it to report progress, which the dashboard shows as a bar, and to
    check whether someone asked the task to stop.
    """

    __slots__ = ("_record", "_store")

    def __init__(self, record: TaskRecord, store: Store):
        self._record = record
        self._store = store

    @property
    def task_id(self) -> int:
        return self._record.id

    @property
    def kind(self) -> str:
        return self._record.kind

    @property
    def logger(self) -> logging.Logger:
        """A logger for the task (``dashboard.task.<kind>``, at INFO and up unless set
        otherwise): what it logs shows on the task's page, as does what the task
        logs through any logger the logging configuration lets through."""
        return task_logger(self._record.kind)

    @property
    def cancelled(self) -> bool:
        """True once cancellation of this task was requested.

        Checking it is cheap; a long task should check it between steps and
        return early when it is set. A task that returns after seeing it set
        is recorded as cancelled; one that never looks runs to the end and is
        recorded as done.
        """
        deadline = self._record.deadline
        if deadline and time.monotonic() >= deadline:
            return True  # past its time limit: it ends as timed out, whatever it returns
        if self._store.cancel_requested(self._record):
            # The task saw the request: if it now returns, it stopped because
            # of it, and is recorded as cancelled rather than done.
            self._record.cancel_seen = True
            return True
        return False

    def log_line(self, line: str) -> None:
        """Keep a line the task logged (see ``dashboard.local.tasklog``)."""
        self._store.log(self._record, line)

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report how far the task is, from 0 to 1, with an optional short message.

        Values outside 0..1 are clamped; the message is cut to 200 characters.
        """
        self._store.progress(self._record, *clean_progress(fraction, message))


_FAILED = State.FAILED
_SCHEDULED = State.SCHEDULED  # an attempt failed and is to be tried again
_DONE_RESULT = (State.DONE, None, None)
_CANCELLED_RESULT = (State.CANCELLED, "cancelled while running", None)

#: The signal each end of an attempt sends.
_ENDS = {State.DONE: task_succeeded, State.FAILED: task_failed, State.SCHEDULED: task_retried,
         State.CANCELLED: task_cancelled}


class _Raised(tuple):
    """An attempt's end ``(state, error, traceback)`` with the exception the task raised,
    for the signals' ``exception``; the store takes it as the plain triple. Made only
    while a failure handler is connected: the exception's frames hold the task's locals."""

    exception: BaseException

    def __new__(cls, ending: tuple[State, str | None, str | None],
                exception: BaseException) -> _Raised:
        self = super().__new__(cls, ending)
        self.exception = exception
        return self


def _raised(ending: tuple[State, str | None, str | None],
            exc: BaseException) -> tuple[State, str | None, str | None]:
    if task_failed.receivers or task_retried.receivers:
        return _Raised(ending, exc)
    return ending


def _as_ended(record: TaskRecord, attempts: int, state: State, error: str | None,
              trace: str | None) -> TaskInfo:
    """The task as its attempt ended, for the signals. A shared store writes the end to
    its file, not to the record, so the outcome fills in what it wrote; a record
    scheduled again (a retry) may already be another worker's, so that attempt's own
    fields are kept."""
    info = record.info()
    if state is _SCHEDULED:
        return info._replace(state=state, error=error, traceback=trace, attempts=attempts,
                             worker=None, progress=0.0, message=None, finished_at=None,
                             due_at=time.time() + record.retry_in)
    return info._replace(state=state, error=error, traceback=trace,
                         progress=1.0 if state is State.DONE else info.progress)


def _as_submitted(task_id: int, kind: str, params: Mapping[str, Any]) -> TaskInfo:
    """A task the store no longer has (``history=0``, and a worker ended it already),
    as it was submitted."""
    return TaskInfo(task_id, kind, dict(params), State.QUEUED, time.time(), None, None, 0.0,
                    None, None, None, None)


#: Bytes of a task's result (as JSON) kept by default: QUEUE_MAX_RESULT_BYTES.
MAX_RESULT_BYTES = 64 * 1024


def page_of(find: Callable[..., list[TaskInfo]], query: TaskFilter, limit: int,
            cursor: str | None, oldest_first: bool,
            number: Callable[[Any], int | None]) -> TaskPage:
    """A :class:`TaskPage` from a store's keyset ``find(query, limit, after, ascending)``:
    the cursor says from which task, and whether to go on past it or back before it."""
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 500:
        raise InvalidParam("limit", f"must be an integer from 1 to 500, got {limit!r}")
    decoded = decode_cursor(cursor)
    anchor = None
    if decoded is not None:
        anchor = number(decoded[1])
        if anchor is None:
            raise InvalidParam("cursor", "is not one this list gave out (use a page's newer "
                               "or older link)")
    forward = decoded is None or decoded[0]
    rows = find(query, limit + 1, anchor, oldest_first == forward)
    more = len(rows) > limit
    rows = rows[:limit]
    if not forward:
        rows.reverse()
        if not rows:  # nothing newer any more (deleted meanwhile): the first page
            return page_of(find, query, limit, None, oldest_first, number)
    before, after = (more, True) if not forward else (anchor is not None, more)
    return TaskPage(tuple(rows),
                    newer=encode_cursor(False, rows[0].id) if rows and before else None,
                    older=encode_cursor(True, rows[-1].id) if rows and after else None)


def bulk_in_batches(store: Store, action: str, query: TaskFilter,
                    sent: Callable[[str, list[int]], None] | None = None) -> BulkResult:
    """Do a bulk action through a store's keyset ``find`` and its ``*_many`` methods,
    BULK_BATCH tasks at a time, oldest first."""
    if action not in BULK_ACTIONS:
        raise InvalidParam("action", f"must be one of: {', '.join(BULK_ACTIONS)}; got "
                           f"{str(action)[:40]!r}")
    target = query.for_action(action)
    if not target.states:
        return BulkResult(action, 0)
    act = {"retry": store.retry_many, "cancel": store.cancel_many,
           "purge": lambda ids: ids[:store.purge(ids)]}[action]
    touched: list[int] = []
    after = None
    while True:
        rows = store.find(target, BULK_BATCH, after, True)
        if not rows:
            break
        after = rows[-1].id
        try:
            done = act([row.id for row in rows])
        except BulkStopped as stopped:  # (a full queue): say how far it got, undo nothing
            touched.extend(stopped.ids)
            if sent is not None and stopped.ids:
                sent(action, stopped.ids)
            raise BulkStopped(action, touched, stopped.reason) from None
        touched.extend(done)
        if sent is not None and done:
            sent(action, done)
        if len(rows) < BULK_BATCH:
            break
    if action == "purge":
        return BulkResult(action, len(touched))
    return BulkResult(action, len(touched), tuple(touched))


def encode_result(value: Any, limit: int) -> tuple[str | None, str | None]:
    """A task's return value as JSON text to keep, or why it cannot be kept:
    ``(text, None)`` or ``(None, the reason)``. What JSON cannot hold, or more
    than ``limit`` bytes of it, is refused, never dropped without a word."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        return None, (f"its result could not be kept: {exc} (a result must be JSON: None, "
                      "true/false, a finite number, a string, or lists and dicts of these "
                      "with string keys)")
    except RecursionError:
        return None, "its result could not be kept: it nests too deeply for JSON"
    size = len(text.encode())
    if size > limit:
        return None, (f"its result could not be kept: {size:,} bytes of JSON, more than the "
                      f"{limit:,} kept (QUEUE_MAX_RESULT_BYTES)")
    return text, None


#: The largest id a store gives out has 18 digits (see dashboard.local.memory.first_id).
_MAX_ID_DIGITS = 18


def _number(task_id: int | str) -> int | None:
    """A task id as the stores hold it (a positive integer), from an int or its text
    (the web layer's reading of a request); None when it cannot be one of ours."""
    if type(task_id) is int:
        return task_id if task_id > 0 else None
    if (isinstance(task_id, str) and 0 < len(task_id) <= _MAX_ID_DIGITS and task_id.isascii()
            and task_id.isdigit()):
        return int(task_id)
    return None


def _known(task_id: int | str) -> int:
    """:func:`_number`, or :class:`TaskNotFound` for an id no store of ours gives out."""
    number = _number(task_id)
    if number is None:
        raise TaskNotFound(task_id)
    return number


def _when(moment: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment))


def _worker_number(name: str) -> int:
    return int(name.rpartition("-")[2])


def _log_info() -> bool:
    return logger.isEnabledFor(logging.INFO)


class _Default:
    pass


_DEFAULT = _Default()

_live_queues: weakref.WeakSet[WorkQueue] = weakref.WeakSet()


def live_queues() -> list[WorkQueue]:
    """Every WorkQueue object that still exists in this process."""
    return list(_live_queues)


def _find_task(thread: threading.Thread) -> TaskContext | None:
    """The task a worker thread of some queue of this process runs now, if any: how a
    log line finds its task (see tasklog), without a write per task."""
    for queue in list(_live_queues):
        for name, worker in list(queue._threads.items()):
            if worker is thread:
                record = queue._current.get(name)
                return None if record is None else TaskContext(record, queue.store)
    return None


tasklog.find_task = _find_task


def _after_fork_in_child() -> None:
    for queue in list(_live_queues):
        queue._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)

#: Seconds queued work may wait, while workers sit idle and none takes a task,
#: before the queue is called stalled (the log, the page and /healthz say so).
STALL_AFTER = 10.0


def stall_reason(snap: Snapshot, after: float = STALL_AFTER) -> str | None:
    """Why the queue looks stuck, or None: work is queued and not paused, a
    worker is idle, yet for ``after`` seconds nothing queued was taken."""
    if not snap.queued or snap.paused or snap.closed:
        return None
    if snap.oldest_wait is None or snap.oldest_wait < after:
        return None
    if snap.idle_for is not None and snap.idle_for < after:
        return None
    idle = sum(1 for w in snap.workers if w.state == "idle")
    if not idle:
        return None
    return (f"stalled: {snap.queued} task(s) queued, the oldest for {snap.oldest_wait:.0f}s, "
            f"and {idle} idle worker(s) took none")


class WorkQueue(Backend):
    """A queue of named tasks run by worker threads in this process.

    ``submit`` queues a task and returns its id at once; ``workers`` threads
    take tasks in FIFO order and run them. A task that raises is recorded as
    failed and the worker goes on; a worker thread that dies anyway is
    replaced by a supervisor thread, which also does the store's upkeep and
    watches for a stall.

    Threads start with :meth:`start`, not in the constructor, so a queue can be
    built at import time in a process that will fork (a preloading server)
    and started in each child. With ``workers=0`` nothing runs until you call
    :meth:`run_pending`, which runs queued tasks in the calling thread: the
    deterministic mode for tests.
    """

    def __init__(
        self,
        workers: int = 1,
        *,
        max_queued: int = 10_000,
        history: int = 1_000,
        registry: Registry | None = None,
        runner: Runner | None = None,
        store: Store | None = None,
        name: str = "dashboard",
        shutdown_timeout: float = 10.0,
        max_workers: int = 64,
        stall_after: float = STALL_AFTER,
        max_result_bytes: int = MAX_RESULT_BYTES,
        scheduler: bool = True,
        run_workers: bool = True,
    ):
        if not 0 <= workers <= max_workers:
            raise ValueError(f"workers must be from 0 to {max_workers}")
        self.workers = workers
        self.max_workers = max_workers
        self.registry = registry if registry is not None else default_registry
        self.store = store if store is not None else MemoryStore(max_queued, history)
        self.name = name
        self.shutdown_timeout = shutdown_timeout
        self.stall_after = stall_after
        self.max_result_bytes = max_result_bytes
        #: Whether start() runs the scheduler thread (the periodic schedules' runs).
        self.scheduler = scheduler
        #: Whether this process runs worker threads at all. Off (a web process whose
        #: work runs in ``flask queue worker`` processes on the same store), the worker
        #: count is only passed on to the store, and nothing here takes a task.
        self.run_workers = run_workers
        self._runner: Runner = runner or _run_plain
        # What the signals are sent as, held weakly (see send_signals_as), and the
        # context their handlers run in.
        self._sender: Callable[[], Any] = weakref.ref(self)
        self._signal_context: Callable[[], AbstractContextManager[Any]] = nullcontext
        self._init_threads()
        self._pid: int | None = None  # the process whose threads run, once started
        self._shut_down = False
        self._closed_at: float | None = None
        self._forked_dropped = 0
        self._born = os.getpid()  # the process whose state this is
        _live_queues.add(self)

    def _init_threads(self) -> None:
        self._start_lock = threading.RLock()
        self._threads: dict[str, threading.Thread] = {}
        self._current: dict[str, TaskRecord | None] = {}  # what each worker runs now
        self._dead: set[str] = set()  # died: the supervisor replaces them
        self._retiring: set[str] = set()  # asked to stop by set_workers: not replaced
        self._deaths: dict[str, list[float]] = {}  # recent deaths, for backing off
        self._not_before: dict[str, float] = {}
        self._wake = threading.Event()  # wakes the supervisor
        self._supervisor: threading.Thread | None = None
        self._supervisor_stop = False
        self._start_error: str | None = None  # why the last start() failed
        self._followed: int | None = None  # a shared worker count above our QUEUE_MAX_WORKERS
        self._stalled: str | None = None
        self._short = False  # start() left workers for the supervisor to start
        self._said: dict[str, float] = {}
        self._scheduler: threading.Thread | None = None
        self._tick = threading.Event()  # wakes the scheduler (to stop)
        self._next_due: dict[str, float] = {}  # each schedule's, as last read from the store

    def _say(self, key: str, level: int, message: str, *args: Any, exc_info: bool = False) -> None:
        """Log at most once every 30 s per ``key``: a fault that lasts must not
        write the same line every second."""
        now = time.monotonic()
        if now - self._said.get(key, -1e9) >= 30.0:
            self._said[key] = now
            logger.log(level, message, *args, exc_info=exc_info)

    # -- what it is (the Backend seam) -------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        durable = self.store.durable
        # (a store that cannot search yet says so: the operator's view is left out)
        searches = type(self.store).find is not Store.find
        return Capabilities(scale_workers=True, shared=durable, durable=durable,
                            search=searches, text_search=searches, kind_health=searches)

    @property
    def description(self) -> str:
        if self.store.durable:
            return "in a SQLite file shared by every process"
        return "in this process's memory"

    def stall(self, snapshot: Snapshot) -> str | None:
        return stall_reason(snapshot, self.stall_after)

    # -- signals (see dashboard.signals) ------------------------------------

    @property
    def signal_sender(self) -> Any:
        """What this queue's signals are sent as: the Flask app it belongs to, so
        ``task_failed.connect(handler, sender=app)`` hears only that app's tasks; the
        queue itself when it belongs to none."""
        sender = self._sender()
        return self if sender is None else sender

    def send_signals_as(self, sender: Any,
                        context: Callable[[], AbstractContextManager[Any]] | None = None) -> None:
        """Send this queue's signals as ``sender``, their handlers inside ``context()``:
        how the Flask glue makes them the app's, sent in its app context.

        ``sender`` is held weakly: the app owns its queue, and the queue must not keep
        the app alive. Once it is gone the queue sends as itself again.
        """
        self._sender = weakref.ref(sender)
        self._signal_context = context or nullcontext

    def _send(self, signal: Any, task: Callable[[], TaskInfo | None], **extra: Any) -> None:
        """Send ``signal`` about ``task()`` (made only if a handler hears it). Callers
        look at ``signal.receivers`` first, so a queue nobody listens to pays nothing."""
        _send_signal(signal, self.signal_sender, task, self._signal_context, **extra)

    def _submitted(self, task_id: int, kind: str, params: Mapping[str, Any]) -> None:
        store = self.store
        self._send(task_submitted,
                   lambda: store.get(task_id) or _as_submitted(task_id, kind, params))

    def _finish_and_send(self, record: TaskRecord,
                         outcome: tuple[State, str | None, str | None]) -> None:
        """Give the store an attempt's end, then send the signal it calls for: once the
        store has it, so a handler that reads the task sees it ended."""
        state, error, trace = outcome
        attempts = record.attempts
        self.store.finish(record, state, error, trace)
        if record.state is State.RUNNING and record.attempts == attempts:
            # Not kept: another process took the task back (its run there counts and
            # sends there), or the file could not be written yet (see README, Signals).
            return
        extra = {}
        if state is _FAILED or state is _SCHEDULED:
            extra = {"error": error, "exception": getattr(outcome, "exception", None)}
        self._send(_ENDS[state], partial(_as_ended, record, attempts, state, error, trace),
                   **extra)

    # -- lifecycle -------------------------------------------------------

    @property
    def started(self) -> bool:
        """True when worker threads were started in this process."""
        return self._pid == os.getpid()

    #: Seconds start() waits for a shared store it cannot write (a file another
    #: program keeps locked) before it leaves the rest to the supervisor.
    START_WAIT = 1.0

    def start(self) -> None:
        """Start the worker threads and the supervisor, once per process.

        Calling it again in the same process does nothing; calling it in a
        forked child of a started process starts that child's own threads.
        It never fails and never waits long for the store: when the store
        cannot be written (a file locked by another program), the process
        serves anyway and the supervisor starts the workers once it can; if
        even the supervisor cannot start, nothing counts as started and the
        next call (the next request) tries again.
        """
        _capture_task_logs()
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._start_lock:
            if self._pid == pid or self._shut_down:
                # A request can still arrive while the server stops; it must
                # not fail because the queue already shut down.
                return
            if self._born != pid:
                # Forked without Python's at-fork handlers (uWSGI): what the
                # parent held is not ours.
                self._after_fork()
            if self._forked_dropped:
                logger.warning(
                    "pid %d: dropped %d task(s) queued before this process was forked; "
                    "submit work after the server has started",
                    pid,
                    self._forked_dropped,
                )
                self._forked_dropped = 0
            problem = None
            try:
                self.store.maintain(wait=self.START_WAIT)  # register, take back what the dead left
                target = self.store.workers_target()
                if target is not None and 0 < target:
                    self.workers = min(target, self.max_workers)

            except Exception as exc:  # noqa: BLE001 - the supervisor tries again
                problem = str(exc)
            started = 0
            for i in range(1, (self.workers if self.run_workers else 0) + 1):
                if problem is not None:
                    break
                try:
                    self._spawn(f"worker-{i}")
                    started += 1
                except Exception as exc:  # noqa: BLE001 - the supervisor starts it later
                    problem = str(exc)
            helpers = []
            if self.workers or self.store.durable:
                helpers.append(self._start_supervisor)
            if self.scheduler and self.registry.has_schedules:
                helpers.append(self._start_scheduler)
            for start_helper in helpers:
                try:
                    start_helper()
                except Exception as exc:  # noqa: BLE001 - start() is called again
                    self._start_error = f"could not start: {type(exc).__name__}: {exc}"
                    logger.error("%s; the next request tries again", self._start_error)
                    return
            self._start_error = None
            self._pid = pid
            self._short = problem is not None
            if problem is None:
                logger.info("started %d worker thread(s) in pid %d", started, pid)
            else:
                logger.error("pid %d started %d of %d worker thread(s): %s. It serves "
                             "requests, and the supervisor starts the others once it can.",
                             pid, started, self.workers, problem)

    def _start_supervisor(self) -> None:
        if self._supervisor is not None and self._supervisor.is_alive():
            return
        self._supervisor_stop = False
        supervisor = threading.Thread(
            target=self._supervise, name=f"{self.name}-supervisor", daemon=True
        )
        supervisor.start()
        self._supervisor = supervisor

    def _start_scheduler(self) -> None:
        if self._scheduler is not None and self._scheduler.is_alive():
            return
        scheduler = threading.Thread(
            target=self._schedule_loop, name=f"{self.name}-scheduler", daemon=True
        )
        scheduler.start()
        self._scheduler = scheduler

    def _spawn(self, name: str, replacement: bool = False) -> None:
        self.store.add_worker(name, replacement=replacement)
        thread = threading.Thread(
            target=self._worker_main, args=(name,), name=f"{self.name}-{name}", daemon=True
        )
        self._threads[name] = thread
        self._current[name] = None
        thread.start()

    def _after_fork(self) -> None:
        dropped = self.store.reset_after_fork()
        self._init_threads()
        self._born = os.getpid()
        # Logging from an at-fork hook is not safe; say it at the next start.
        self._forked_dropped = dropped

    def close(self) -> None:
        """Refuse new submissions; workers stop after the task they run.

        Safe to call from any thread, repeatedly. :meth:`shutdown` calls it.
        """
        if self._closed_at is None:
            self._closed_at = time.monotonic()
        self.store.close()
        self._tick.set()  # the scheduler stops

    def close_nowait(self) -> None:
        """Refuse new submissions from now on, taking no lock: safe in a signal handler.

        Workers stop taking tasks after the one they run; idle workers are
        woken by the next :meth:`close` or :meth:`shutdown`.
        """
        if self._closed_at is None:
            self._closed_at = time.monotonic()
        self.store.close_nowait()

    @property
    def closed(self) -> bool:
        return self._closed_at is not None

    def shutdown(self, timeout: float | None | _Default = _DEFAULT) -> int:
        """Stop: refuse new work, drop what is queued, let running tasks finish.

        Running tasks get ``timeout`` seconds (default: the queue's
        ``shutdown_timeout``; ``None`` waits for ever), counted from the first
        :meth:`close` (a signal handler may have closed the queue earlier).
        Returns how many queued tasks were dropped; that number is logged,
        and so are the running tasks that were cut off. Never hangs: after the
        timeout, tasks still running are abandoned (the threads are daemon
        threads and end with the process); a durable store queues them again.
        The last line logged says whether anything was lost, and is written
        only once that is known.
        """
        if isinstance(timeout, _Default):
            timeout = self.shutdown_timeout
        self.close()
        durable = self.store.durable
        dropped = 0 if durable else self.store.drop_queued()
        if self._shut_down:
            return dropped
        self._shut_down = True
        started = self.started
        if dropped:
            logger.warning("shutdown: dropped %d queued task(s)", dropped)
        elif durable and started:
            try:
                kept = self.store.snapshot(0).queued
            except StoreUnavailable:
                kept = 0
            if kept:
                logger.info("shutdown: %d queued task(s) stay in the store for the next start",
                            kept)
        # What a worker last took: running, unless it ended and the worker waits for more.
        running = [r for r in self._current.values()
                   if r is not None and r.state is State.RUNNING] if started else []
        if running:
            logger.info("shutdown: waiting up to %s for %d running task(s)",
                        "ever" if timeout is None else f"{timeout:g}s", len(running))
        deadline = None if timeout is None else (self._closed_at or time.monotonic()) + timeout
        self._wake.set()
        with self._start_lock:  # (not while the supervisor is starting one)
            threads = list(self._threads.values()) if started else []
        for thread in threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if thread is not threading.current_thread():
                thread.join(remaining)
        scheduler = self._scheduler  # (close() woke it: it ends at once)
        if scheduler is not None and scheduler is not threading.current_thread():
            scheduler.join(5.0)
        still = [t.name for t in threads if t.is_alive()]
        if still:
            logger.warning(
                "shutdown: %d thread(s) still running a task after %.1fs, not waiting: %s",
                len(still),
                timeout,
                ", ".join(still),
            )
        if not started:
            return dropped
        # Tasks still running here will not finish: a durable store queues
        # them again for the next process (at-least-once).
        cut = [r for r in self._current.values() if r is not None and r.state is State.RUNNING]
        released = 0
        if cut:
            try:
                released = self.store.release(cut)
            except Exception as exc:  # noqa: BLE001 - whatever happens, say what was lost
                logger.error("shutdown: could not give back %d unfinished task(s) (%s): they "
                             "run again once this process is seen gone", len(cut), exc)
        if released:
            logger.warning("shutdown: %d unfinished task(s) queued again", released)
        elif cut and not durable:
            logger.warning("shutdown: %d running task(s) cut off and lost: %s", len(cut),
                           ", ".join(f"#{r.id} ({r.kind})" for r in cut))
        if not dropped and not cut:
            logger.info("shutdown: done; no task dropped, every running task finished")
        self._supervisor_stop = True
        self._wake.set()
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(5.0)
        try:
            self.store.detach()
        except Exception as exc:  # noqa: BLE001 - others forget us once we are gone
            logger.warning("shutdown: could not remove this process from the store (%s)", exc)
        return dropped

    def health(self) -> str | None:
        """Why this queue is not healthy, or None when it is.

        Unhealthy: it is stopping, it could not start, its store cannot be used,
        its supervisor or a worker thread is dead, or work is stalled (queued,
        not paused, workers idle, nothing taken for ``stall_after`` seconds).
        """
        if self.closed:
            return "stopping"
        problem = self.store.problem()
        if problem is not None:
            return problem
        if self._start_error is not None and not self.started:
            return self._start_error
        if not self.started:
            return None  # nothing started yet in this process: nothing can have died
        with self._start_lock:
            supervisor = self._supervisor
            if (self.workers or self.store.durable) and (
                    supervisor is None or not supervisor.is_alive()):
                return "the supervisor thread is not running"
            dead = sorted(n for n, t in self._threads.items()
                          if n not in self._retiring and (n in self._dead or not t.is_alive()))
            missing = (self.workers - sum(1 for n in self._threads if n not in self._retiring)
                       if self.run_workers else 0)
        if dead:
            return f"worker thread(s) not running: {', '.join(dead)}"
        if missing > 0:
            return f"{missing} worker thread(s) not started yet"
        try:
            return stall_reason(self.store.snapshot(0), self.stall_after)
        except StoreUnavailable as exc:
            return str(exc)

    def is_healthy(self) -> bool:
        """True when every worker thread of this process is alive, work is accepted
        and taken: :meth:`health` has nothing to say."""
        return self.health() is None

    # -- submitting ------------------------------------------------------

    def submit(self, kind: str, /, *, key: str | None = None, delay: Any = None,
               at: Any = None, time_limit: Any = None, **params: Any) -> int:
        """Queue one task of ``kind`` with ``params`` and return its id.

        ``delay`` (seconds, or a timedelta) or ``at`` (a datetime, or seconds since
        the epoch) schedules it: it is queued when due. ``time_limit`` (seconds)
        replaces its kind's: past it ``ctx.cancelled`` turns true, and the task,
        once it returns, is failed as timed out. With a ``key``: while a
        task with that key is scheduled, queued or running, its id comes back and
        nothing is queued (see :meth:`enqueue`, which says which).

        Raises :class:`~dashboard.errors.UnknownKind`,
        :class:`~dashboard.errors.InvalidParam`, :class:`QueueFull` or
        :class:`QueueClosed`; in each case nothing is queued.
        """
        if key is not None or delay is not None or at is not None or time_limit is not None:
            return self.enqueue(kind, params, key=key, delay=delay, at=at,
                                time_limit=time_limit).id
        task_kind = self.registry.get(kind)
        checked = task_kind.check_params(params)
        task_id = self.store.add_one(kind, checked, task_kind.time_limit)
        if task_submitted.receivers:
            self._submitted(task_id, kind, checked)
        return task_id

    def enqueue(self, kind: str, params: Mapping[str, Any] | None = None, *,
                key: str | None = None, delay: Any = None, at: Any = None,
                time_limit: Any = None) -> Submitted:
        """Queue (or schedule) one task: ``(its id, True)``; with a ``key`` held by a
        task that is scheduled, queued or running, ``(that task's id, False)`` and
        nothing queued."""
        task_kind = self.registry.get(kind)
        checked = task_kind.check_params(params or {})
        due_in = check_delay(delay, at)
        limit = task_kind.time_limit if time_limit is None else check_time_limit(time_limit)
        if key is not None:
            submitted = self.store.add_keyed(kind, checked, check_key(key), due_in, limit)
        elif due_in is None:
            submitted = Submitted(self.store.add_one(kind, checked, limit), True)
        else:
            submitted = Submitted(
                self.store.add(kind, checked, 1, delay=due_in, time_limit=limit)[0], True)
        if submitted.created and task_submitted.receivers:
            self._submitted(submitted.id, kind, checked)
        return submitted

    def submit_many(
        self, kind: str, count: int, params: Mapping[str, Any] | None = None, *,
        delay: Any = None, time_limit: Any = None,
    ) -> list[int]:
        """Queue ``count`` tasks of the same kind and params, all or none; with a
        ``delay``, schedule them."""
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"count must be a positive integer, got {count!r}")
        task_kind = self.registry.get(kind)
        checked = task_kind.check_params(params or {})
        limit = task_kind.time_limit if time_limit is None else check_time_limit(time_limit)
        ids = self.store.add(kind, checked, count, delay=check_delay(delay), time_limit=limit)
        if task_submitted.receivers:
            for task_id in ids:
                self._submitted(task_id, kind, checked)
        return ids

    # -- reading ---------------------------------------------------------

    @property
    def tag(self) -> str:
        """Changes whenever anything :meth:`stats` shows changes; cheap to read."""
        return self.store.tag

    @property
    def identity(self) -> str:
        """Names the queue this process serves (see the store's ``identity``)."""
        return self.store.identity

    def stats(self, recent: int = 20, upcoming: int = 0) -> Snapshot:
        """One consistent snapshot: counts, workers, rates, the ``recent`` last
        finished tasks and the next ``upcoming`` queued ones, and the schedules."""
        snap = self.store.snapshot(recent, upcoming)
        if self.registry.has_schedules:
            snap = snap._replace(schedules=tuple(self.schedules()))
        return snap

    def metrics(self) -> Metrics:
        """The counts, the live workers and each kind's totals, in one read of the store."""
        return self.store.metrics()

    # -- periodic schedules ------------------------------------------------

    def schedules(self) -> list[ScheduleInfo]:
        """The periodic schedules, by name, with their next and last runs."""
        schedules = self.registry.schedules()
        states = self.store.schedule_states(s.name for s in schedules) if schedules else {}
        now = time.time()
        infos = []
        for schedule in schedules:
            state = states.get(schedule.name)
            # (a schedule the store does not know yet: from now on it does, so the
            # next due time shown is the one that runs)
            next_due = state.next_due if state is not None else self._sync(schedule, now)
            infos.append(ScheduleInfo(
                schedule.name, schedule.kind, dict(schedule.params), schedule.expression,
                schedule.description, next_due,
                *(state[1:] if state is not None else ())))
        return infos

    def run_schedule(self, name: str) -> int:
        """Queue a schedule's task now (the page's "Run now"): it counts as the
        schedule's last run, and its next due time stays."""
        schedule = self.registry.get_schedule(name)
        if name not in self._next_due:
            self._sync(schedule, time.time())
        run = self._run_of(schedule)
        task_id = self.store.run_schedule(name, run)
        logger.info("schedule %s: run now as task %d", name, task_id)
        if task_submitted.receivers:
            self._submitted(task_id, run.kind, run.params)
        return task_id

    def _run_of(self, schedule: Schedule) -> Run:
        return Run(schedule.kind, dict(schedule.params),
                   self.registry.get(schedule.kind).time_limit)

    def run_schedules(self, now: float | None = None) -> float | None:
        """Queue a run of each schedule whose due time has come; when (wall clock) the
        next one is due, or None when there are no schedules.

        Each due time is claimed in the store, together with queueing its run, so
        of the processes sharing a store exactly one runs it. A due time found more
        than ``CATCH_UP`` (60 s) late was missed while no process ran the queue:
        all those are run once, together. The scheduler thread calls this when a
        due time comes; tests call it with ``now`` to run schedules by hand.
        """
        schedules = self.registry.schedules()
        if not schedules:
            return None
        now = time.time() if now is None else now
        soonest = None
        for schedule in schedules:
            due = self._next_due.get(schedule.name)
            if due is None:
                due = self._sync(schedule, now)
            for _ in range(1000):  # (a bound: another process could keep moving it)
                if due > now:
                    break
                due = self._claim(schedule, due, now)
            if soonest is None or due < soonest:
                soonest = due
        return soonest

    def _sync(self, schedule: Schedule, now: float) -> float:
        """The schedule's next due time as the store keeps it (the first after ``now``
        for one it did not know, or knew with another spec)."""
        due = self._next_due[schedule.name] = self.store.schedule_next(
            schedule.name, schedule.spec, schedule.next_after(now))
        return due

    def _claim(self, schedule: Schedule, due: float, now: float) -> float:
        """Claim one due time of ``schedule`` (with those missed, see run_schedules);
        the schedule's next due time as the store has it after."""
        late = due < now - CATCH_UP
        # Missed ones: one run for all of them, then each due time from the window on.
        after = schedule.next_after(now - CATCH_UP) if late else schedule.next_after(due)
        name = schedule.name
        run = self._run_of(schedule)
        try:
            stored, task_id = self.store.claim_due(name, due, after, run)
        except QueueFull as exc:
            stored, task_id = self.store.claim_due(name, due, after, None)
            if stored == after:
                logger.warning("schedule %s: the run due at %s was skipped: %s", name,
                               _when(due), exc)
        if task_id is not None:
            if late:
                logger.warning("schedule %s: due times from %s to %s were missed while no "
                               "process ran the queue; ran once for them, as task %d", name,
                               _when(due), _when(now - CATCH_UP), task_id)
            else:
                logger.debug("schedule %s: queued task %d, due at %s", name, task_id,
                             _when(due))
            if task_submitted.receivers:
                self._submitted(task_id, run.kind, run.params)
        self._next_due[name] = stored
        return stored

    #: Longest the scheduler sleeps: it reads the store again at least this often.
    SCHEDULER_NAP = 5.0

    def _schedule_loop(self) -> None:
        """The scheduler thread: runs the schedules, sleeping until the next is due."""
        while not self.closed:
            try:
                soonest = self.run_schedules()
            except QueueClosed:
                return
            except StoreUnavailable as exc:
                self._say("schedules", logging.WARNING, "scheduler: %s; trying again",
                          exc.reason)
                soonest = time.time() + 1.0
            except Exception:  # noqa: BLE001 - nothing may end the scheduler
                self._say("schedules", logging.ERROR, "scheduler failed; trying again",
                          exc_info=True)
                soonest = time.time() + 1.0
            nap = self.SCHEDULER_NAP if soonest is None else soonest - time.time()
            self._tick.wait(min(self.SCHEDULER_NAP, max(0.0, nap)))

    def get(self, task_id: int | str) -> TaskInfo | None:
        """One task by id (or its text), or ``None`` when unknown or forgotten by the history."""
        number = _number(task_id)
        return None if number is None else self.store.get(number)

    def wait(self, task_id: int | str, timeout: float | None = None) -> TaskInfo:
        """Block until the task has finished; the task as it ended (see :meth:`.Backend.result`).

        Raises :class:`TaskNotFound` for an unknown task, :class:`TimeoutError` when it
        has not finished after ``timeout`` seconds.
        """
        info = self.store.wait_finished(_known(task_id), timeout)
        if info is None:
            raise TaskNotFound(task_id)
        if not info.finished:
            raise TimeoutError(f"task {task_id} has not finished after {timeout:g}s "
                               f"(it is {info.state.value})")
        return info

    def join(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or running. Returns ``False`` on timeout."""
        return self.store.wait_idle(timeout)

    def pause(self) -> None:
        """Workers finish their current task and take nothing new until :meth:`resume`."""
        self.store.set_paused(True)

    def resume(self) -> None:
        self.store.set_paused(False)

    # -- operating on tasks ------------------------------------------------

    def cancel(self, task_id: int | str) -> State:
        """Cancel a queued task, or ask a running one to stop (see the store's ``cancel``)."""
        number = _known(task_id)
        if not task_cancelled.receivers:
            return self.store.cancel(number)
        # Read first: a store keeping no history forgets the task as it cancels it.
        before = self.store.get(number)
        state = self.store.cancel(number)
        if state is State.CANCELLED:
            # (a running task sends it where it runs, once it stops)
            self._send(task_cancelled, lambda: self.store.get(number) or (
                None if before is None else before._replace(state=state)))
        return state

    def retry(self, task_id: int | str) -> Retried:
        """Queue a failed or cancelled task again, linked to it: ``(the new id, True)``.

        A task retried before is not queued again: ``(the id of its retry, False)``.
        """
        retried = self.store.retry(_known(task_id))
        if retried.created and task_submitted.receivers:
            self._send(task_submitted, partial(self.store.get, retried.id))
        return retried

    def clear_history(self) -> int:
        """Forget finished tasks; the counters keep their totals."""
        return self.store.clear_history()

    # -- the operator's view ------------------------------------------------------

    def find(self, query: TaskFilter, *, limit: int = 50, cursor: str | None = None,
             oldest_first: bool = False) -> TaskPage:
        """One page of the tasks that match ``query`` (see :meth:`.Backend.find`)."""
        return page_of(self.store.find, query, limit, cursor, oldest_first, _number)

    def count(self, query: TaskFilter) -> int:
        return self.store.count(query)

    def bulk(self, action: str, query: TaskFilter) -> BulkResult:
        """Retry, cancel or purge every task that matches, in batches (see
        :meth:`.Backend.bulk`)."""
        return bulk_in_batches(self.store, action, query, self._bulk_signals)

    def _bulk_signals(self, action: str, ids: list[int]) -> None:
        signal = {"retry": task_submitted, "cancel": task_cancelled}.get(action)
        if signal is not None and signal.receivers:
            for task_id in ids:
                self._send(signal, partial(self.store.get, task_id))

    def kind_health(self) -> tuple[KindHealth, ...]:
        return tuple(self.store.kind_health(self.registry.names()))

    def reset(self) -> None:
        """Clear history, counters and the per-second record, for the next run."""
        self.store.reset()

    def set_workers(self, count: int, share: bool = True) -> int:
        """Run ``count`` worker threads from now on (0..``max_workers``); return it.

        Extra workers finish the task they run, then exit (a worker that is
        dead or waiting to be replaced goes first, at once); new ones start at
        once. Before :meth:`start`, only the number to start changes. With a
        shared store, every process sharing it follows (``share``).
        """
        if not isinstance(count, int) or not 0 <= count <= self.max_workers:
            raise ValueError(f"workers must be from 0 to {self.max_workers}, got {count!r}")
        if share:
            self.store.set_workers_target(count)
        with self._start_lock:
            self.workers = count
            if not self.started or self._shut_down or not self.run_workers:
                return count
            active = [n for n in self._threads if n not in self._retiring]
            # Keep the live workers with the lowest numbers; retire the rest.
            active.sort(key=lambda n: (not self._running_thread(n), _worker_number(n)))
            for name in active[count:]:
                if self._running_thread(name):
                    self._retiring.add(name)
                    self.store.stop_worker(name)
                else:
                    self._forget_worker(name)
            for _ in range(count - len(active)):
                try:
                    self._spawn(self._free_name())
                except Exception as exc:  # noqa: BLE001 - the count holds: the supervisor
                    self._say("spawn", logging.WARNING, "could not start a worker now (%s); "
                              "the supervisor starts it once it can", exc)
                    break
            if count:
                self._start_supervisor()
        logger.info("now %d worker thread(s) in pid %d", count, os.getpid())
        return count

    def _running_thread(self, name: str) -> bool:
        thread = self._threads.get(name)
        return thread is not None and thread.is_alive() and name not in self._dead

    def _free_name(self) -> str:
        number = 1
        while f"worker-{number}" in self._threads:
            number += 1
        return f"worker-{number}"

    def _forget_worker(self, name: str) -> None:
        """A worker whose thread is over, for good (under ``_start_lock``).

        The store forgets it first: its name stays taken until then, so a
        worker added meanwhile gets another name and is never the one removed.
        """
        self.store.remove_worker(name)
        self._threads.pop(name, None)
        self._current.pop(name, None)
        self._retiring.discard(name)
        self._dead.discard(name)
        self._not_before.pop(name, None)
        self._deaths.pop(name, None)

    # -- running ---------------------------------------------------------

    def run_pending(self, limit: int | None = None) -> int:
        """Run queued tasks in the calling thread until none is ready; return how many ran.

        Failures are recorded exactly as in a worker thread. For tests and
        scripts: no thread, no sleeping, the same code path as the workers.
        """
        _capture_task_logs()
        ran = 0
        running = _task_running  # (worker threads are found by _find_task instead)
        while limit is None or ran < limit:
            record = self.store.claim(None, block=False)
            if record is None:
                break
            if task_started.receivers:
                self._send(task_started, record.info)
            running.task = TaskContext(record, self.store)  # what this thread logs is its
            try:
                outcome = self._execute(record)
            finally:
                running.task = None
            if (task_succeeded.receivers if outcome is _DONE_RESULT
                    else _ENDS[outcome[0]].receivers):
                self._finish_and_send(record, outcome)
            else:
                self.store.finish(record, *outcome)
            ran += 1
        return ran

    def _worker_main(self, name: str) -> None:
        error = None
        current = self._current
        dying: TaskRecord | None = None  # the task it held as it died, if running
        try:
            execute, finish_and_claim = self._execute, self.store.finish_and_claim
            record = current[name] = self.store.claim(name)
            while record is not None:
                if task_started.receivers:
                    self._send(task_started, record.info)
                outcome = execute(record)
                if (task_succeeded.receivers if outcome is _DONE_RESULT
                        else _ENDS[outcome[0]].receivers):
                    # The handlers run between two tasks, once the store has this end.
                    self._finish_and_send(record, outcome)
                    outcome = None  # (what a task raised holds its frames: let it go)
                    record = current[name] = self.store.claim(name)
                else:
                    # The end of one task and the start of the next take the lock once.
                    record = current[name] = finish_and_claim(record, *outcome)
        except BaseException as exc:  # noqa: BLE001 - a dying worker must still be accounted for
            error = f"worker thread died: {type(exc).__name__}: {exc}"
            logger.critical("%s %s; its task is failed and the thread replaced", name, error)
            held = current.get(name)
            if held is not None and held.state is State.RUNNING and task_failed.receivers:
                dying, died, attempts = held, exc, held.attempts
        finally:
            try:
                self.store.worker_exited(name, error)
                if dying is not None and dying.state is State.FAILED:
                    self._send(task_failed, partial(_as_ended, dying, attempts, _FAILED,
                                                    error, None),
                               error=error, exception=died)
            except Exception:  # noqa: BLE001 - never a traceback on stderr from a thread
                logger.exception("%s: could not record its exit", name)
            with self._start_lock:
                # Only while the slot is still this thread's: a "+" may have
                # reused the name once a retired thread let it go.
                if self._threads.get(name) is threading.current_thread():
                    if name in self._retiring:
                        try:
                            self._forget_worker(name)
                        except Exception:  # noqa: BLE001
                            logger.exception("%s: could not remove it", name)
                    elif error is not None:
                        self._dead.add(name)
                        self._wake.set()

    def _execute(self, record: TaskRecord) -> tuple[State, str | None, str | None]:
        """Run one task; return how it ended as ``(state, error, traceback)`` for the store,
        its return value (as JSON text) on the record. ``SCHEDULED``: the attempt failed
        and its kind retries it, after ``record.retry_in`` seconds."""
        if record.time_limit:
            record.deadline = time.monotonic() + record.time_limit
            record.overdue = False
        kind = None  # (a kind no longer registered fails in the lookup: nothing retries it)
        try:
            kind = self.registry.get(record.kind)
            value = self._runner(kind.fn, TaskContext(record, self.store), record.params)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"[:1000]
            if record.deadline and time.monotonic() > record.deadline:
                return _raised(self._timed_out(record, f" (it then raised {message})",
                                               traceback.format_exc()), exc)
            policy = None if kind is None else kind.retry
            if (policy is not None and policy.retries(exc, record.attempts)
                    and not record.cancel_requested and not record.cancel_seen):
                record.retry_in = policy.wait(record.attempts)
                logger.warning(
                    "task %d (%s) attempt %d of %d failed: %s; trying again in %.1fs "
                    "[pid %d %s]", record.id, record.kind, record.attempts, policy.attempts,
                    message, record.retry_in, os.getpid(), record.worker or "caller")
                return _raised((_SCHEDULED, message, traceback.format_exc()), exc)
            logger.error(
                "task %d (%s) failed: %s [pid %d %s]",
                record.id,
                record.kind,
                message,
                os.getpid(),
                record.worker or "caller",
                exc_info=True,
            )
            return _raised((_FAILED, message, traceback.format_exc()), exc)
        if record.deadline and time.monotonic() > record.deadline:
            return self._timed_out(record, "", None)
        if value is None and not record.cancel_seen:
            if _log_info():
                logger.info("task %d (%s) done in %.2fs [pid %d %s]", record.id, record.kind,
                            time.time() - (record.started_at or 0.0), os.getpid(),
                            record.worker or "caller")
            return _DONE_RESULT
        if value is not None:
            record.result, refusal = encode_result(value, self.max_result_bytes)
            if refusal is not None:
                logger.error("task %d (%s) failed: %s [pid %d %s]", record.id, record.kind,
                             refusal, os.getpid(), record.worker or "caller")
                return _FAILED, refusal, None
        if record.cancel_seen:
            logger.info("task %d (%s) stopped: cancelled while running", record.id, record.kind)
            return _CANCELLED_RESULT
        if _log_info():
            logger.info(
                "task %d (%s) done in %.2fs [pid %d %s]",
                record.id,
                record.kind,
                time.time() - (record.started_at or 0.0),
                os.getpid(),
                record.worker or "caller",
            )
        return _DONE_RESULT

    def _timed_out(self, record: TaskRecord, then: str,
                   trace: str | None) -> tuple[State, str | None, str | None]:
        """A task that ended past its time limit: failed, whatever it did; never retried."""
        message = f"timed out after {record.time_limit:g}s{then}"[:1000]
        logger.error("task %d (%s) failed: %s [pid %d %s]", record.id, record.kind, message,
                     os.getpid(), record.worker or "caller")
        return _FAILED, message, trace

    def _watch_overdue(self) -> None:
        """Say once, for each task running past its time limit, that it is: in the log,
        and to the pages (they poll anew; a task that reports no progress changes
        nothing else they would notice)."""
        now = time.monotonic()
        for record in list(self._current.values()):
            if (record is not None and record.deadline and now > record.deadline
                    and not record.overdue):
                record.overdue = True
                logger.warning(
                    "task %d (%s) is past its time limit of %gs: ctx.cancelled is now true; "
                    "a Python thread cannot be stopped, so it keeps its worker until it "
                    "returns [pid %d %s]", record.id, record.kind, record.time_limit,
                    os.getpid(), record.worker)
                self.store.touch()

    def _supervise(self) -> None:
        """Upkeep, the worker count, dead workers and stalls, once a second.

        It goes on while the queue is closed and stopping (the store's upkeep
        matters until the process is gone) and ends when :meth:`shutdown` is
        done. No failure ends it: each step is tried again at the next tick.
        """
        next_upkeep = 0.0
        while not self._supervisor_stop:
            if time.monotonic() >= next_upkeep:
                next_upkeep = time.monotonic() + self.store.maintain_every
                self._step("upkeep", self.store.maintain)
            if not self.closed:
                self._step("the shared worker count", self._follow_target)
                self._step("the workers", self._keep_workers)
                self._step("the stall watch", self._watch_stall)
                self._step("the time limits", self._watch_overdue)
            self._wake.wait(timeout=min(1.0, self.store.maintain_every))
            self._wake.clear()

    def _step(self, what: str, step: Callable[[], Any]) -> None:
        try:
            step()
        except StoreUnavailable as exc:
            self._say(what, logging.WARNING, "supervisor: %s: %s; trying again", what, exc.reason)
        except Exception:  # noqa: BLE001 - nothing may end the supervisor
            self._say(what, logging.ERROR, "supervisor: %s failed; trying again", what,
                      exc_info=True)

    def _follow_target(self) -> None:
        """Run the number of workers set in another process (a shared store)."""
        target = self.store.workers_target()
        if target is None:
            return
        wanted = min(target, self.max_workers)
        if not self.run_workers:
            self.workers = wanted  # (what the page shows; the worker processes run them)
            return
        if wanted != target and self._followed != target:
            self._followed = target
            logger.warning("the shared worker count is %d, more than this process's "
                           "QUEUE_MAX_WORKERS (%d): running %d", target, self.max_workers, wanted)
        if wanted != self.workers:
            logger.info("following the shared worker count: %d", wanted)
            self.set_workers(wanted, share=False)

    def _keep_workers(self) -> None:
        """Replace dead workers (backing off one that keeps dying), start missing
        ones, and let go of retired ones whose thread is over."""
        with self._start_lock:
            if self.closed or not self.run_workers:
                # Closing ends every worker: none of them died. (And a process that
                # runs no workers has none to keep.) (The supervisor may
                # have read "not closed" just before close(): this is read again
                # under the lock that shutdown() lists the threads under.)
                return
            now = time.monotonic()
            for name, thread in list(self._threads.items()):
                if name in self._retiring:
                    if not thread.is_alive():
                        self._forget_worker(name)
                    continue
                if name in self._dead or not thread.is_alive():
                    if now < self._not_before.get(name, 0.0):
                        continue  # backing off: it keeps dying
                    thread.join(1.0)
                    self._spawn(name, replacement=True)
                    self._dead.discard(name)
                    self._note_death(name, now)
            active = sum(1 for n in self._threads if n not in self._retiring)
            for _ in range(self.workers - active):
                self._spawn(self._free_name())
            if self._short:
                self._short = False
                logger.info("started %d worker thread(s) in pid %d (the store can be "
                            "written again)", self.workers, os.getpid())

    def _watch_stall(self) -> None:
        reason = stall_reason(self.store.snapshot(0), self.stall_after)
        if (reason is None) != (self._stalled is None):
            if reason is not None:
                logger.error("the queue is %s; look at the workers and the store", reason)
            else:
                logger.info("the queue is moving again")
            self.store.touch()  # the pages show it: their next poll is not a 304
        self._stalled = reason

    def _note_death(self, name: str, now: float) -> None:
        """Replace at once a worker that died; back off one that keeps dying.

        A worker that dies again and again (a broken store, a bug in a
        runner) would otherwise spin, filling the log: after three deaths
        within a minute, each replacement waits twice as long, up to a minute.
        """
        deaths = [t for t in self._deaths.get(name, []) if now - t < 60.0] + [now]
        self._deaths[name] = deaths
        if len(deaths) < 3:
            logger.error("%s died; started a replacement", name)
            self._not_before.pop(name, None)
            return
        delay = min(60.0, 0.5 * 2 ** (len(deaths) - 3))
        self._not_before[name] = now + delay
        logger.error(
            "%s died %d times in the last minute; started a replacement, and the next one "
            "waits %.1fs", name, len(deaths), delay,
        )
