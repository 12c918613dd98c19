"""The store interface: what the in-process queue's worker threads and its
views of the queue need of the place where tasks live.

A store owns every piece of queue state a dashboard shows: the tasks (queued,
running and a bounded history of finished ones), cumulative counters (in all,
and per task kind with wait and run time histograms), the worker slots and
what each one runs, the paused and closed flags, a rolling per-second record
of the last few minutes, and a version number that changes whenever any of
that changes. The :class:`~dashboard.local.queue.WorkQueue` on
top of it owns only threads.

Two stores implement it: :class:`~dashboard.local.memory.MemoryStore` (this
process) and :class:`~dashboard.local.sqlite.SqliteStore` (one file, every
process on the machine). Nothing outside :mod:`dashboard.local` uses it: the
web layer sees the :class:`~dashboard.backend.Backend` seam only.

This module imports nothing from Flask.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, NamedTuple

from ..errors import BulkStopped, QueueFull, TaskNotFound, WrongState
from ..records import (SERIES_SECONDS, KindHealth, Metrics, Retried, ScheduleState, Snapshot,
                       State, Submitted, TaskFilter, TaskInfo, TaskRecord)

__all__ = ["MAX_ERRORS", "MAX_LOG_LINES", "RATE_WINDOW", "SERIES_SECONDS", "Run", "Store",
           "keep_line", "rates"]


class Run(NamedTuple):
    """The task a periodic schedule queues when it is due."""

    kind: str
    params: dict[str, Any]
    time_limit: float | None = None

#: The window the rates (throughput, mean wait and run time) are measured over.
RATE_WINDOW = 60
#: Errors of earlier attempts kept with a task that is retried automatically.
MAX_ERRORS = 20
#: Lines a task logged kept with it (the last ones).
MAX_LOG_LINES = 200


def keep_line(record: TaskRecord, line: str) -> None:
    """Add ``line`` to the record's log, letting go of the oldest beyond MAX_LOG_LINES."""
    logs = record.logs
    if not isinstance(logs, list):
        logs = record.logs = []
    logs.append(line)
    if len(logs) > MAX_LOG_LINES:
        del logs[0]
        record.logs_dropped += 1


def rates(now: float, first_second: int | None,
          recent: Iterable[tuple[float, float, float]]) -> dict[str, float | None]:
    """A snapshot's ``mean_wait``, ``mean_run`` and ``throughput`` (per minute), from
    the ``(finished, wait_sum, run_sum)`` of each second in the last RATE_WINDOW.

    In the first minute of a run (``first_second``: the oldest second recorded),
    the rate is over the time there is. Both stores use it; ``now`` and the
    seconds are on a clock that never steps, so no clock change makes a rate
    negative or inflates it.
    """
    finished = wait_sum = run_sum = 0.0
    for count, waited, ran in recent:
        finished += count
        wait_sum += waited
        run_sum += ran
    span = RATE_WINDOW
    if first_second is not None:
        span = min(RATE_WINDOW, max(1.0, now - first_second))
    return {
        "mean_wait": wait_sum / finished if finished else None,
        "mean_run": run_sum / finished if finished else None,
        "throughput": finished * 60.0 / span,
    }


class Store:
    """The interface every store implements. All methods are thread-safe.

    Workers are named slots. A worker thread asks for work with :meth:`claim`
    and reports the end of each task with :meth:`finish` (or
    :meth:`finish_and_claim`); the store moves the task between states and
    keeps the counters, so the log, the counters and the dashboard agree.
    """

    #: Largest number of tasks that may wait in the queue.
    max_queued: int
    #: True when queued work outlives the process (shutdown keeps it, does not drop it).
    durable: bool = False
    #: Seconds between two calls of :meth:`maintain` by a queue's supervisor.
    maintain_every: float = 1.0

    @property
    def tag(self) -> str:
        """A short string that changes whenever anything visible changes.

        Cheap to read (no lock, no copy): views compare it to what a page holds
        to answer 304 without rendering.
        """
        raise NotImplementedError

    @property
    def identity(self) -> str:
        """Names this queue: another in-memory queue (a restarted process) or
        another SQLite file has another. Task ids are unique within one queue,
        so a page holding an id checks this before trusting it."""
        raise NotImplementedError

    # -- submitting --

    def add(
        self, kind: str, params: dict[str, Any], count: int = 1, retry_of: int | None = None,
        delay: float | None = None, time_limit: float | None = None,
    ) -> list[int]:
        """Queue ``count`` tasks of ``kind`` with ``params``, all or none.

        Returns their ids in order. Raises :class:`QueueFull` when fewer than
        ``count`` places are free and :class:`QueueClosed` after :meth:`close`.

        With a ``delay`` (seconds) they are *scheduled*: not queued (nor counted
        in ``queued``) until due, then queued in due order, as if submitted then.
        At most ``max_queued`` tasks may be scheduled, apart from those queued.
        ``time_limit``: seconds each may run, kept with the task.
        """
        raise NotImplementedError

    def add_keyed(self, kind: str, params: dict[str, Any], key: str,
                  delay: float | None = None, time_limit: float | None = None) -> Submitted:
        """Queue (or schedule) one task with a unique key: ``(its id, True)``; or, while
        a task with the key is scheduled, queued or running, nothing: ``(that task's
        id, False)``. Raises
        :class:`QueueFull` or :class:`QueueClosed` when it would queue."""
        raise NotImplementedError

    def add_one(self, kind: str, params: dict[str, Any], time_limit: float | None = None) -> int:
        """:meth:`add` for one task, returning its id: the path every submit takes."""
        return self.add(kind, params, 1, time_limit=time_limit)[0]

    # -- periodic schedules --

    def schedule_next(self, name: str, spec: str, first_due: float) -> float:
        """The schedule's next due time (wall clock) as the store keeps it: ``first_due``,
        kept from now on, for a schedule it did not know, or knew with another ``spec``
        (the code changed: what it had is forgotten)."""
        raise NotImplementedError

    def claim_due(self, name: str, due: float, next_due: float,
                  run: Run | None) -> tuple[float, int | None]:
        """Claim the due time ``due`` of a schedule, in one step no other process can
        split: while the store's next due time for it is ``due``, make it ``next_due``
        and queue ``run`` (when given) as the schedule's run, due at ``due``:
        ``(next_due, its id)``. Otherwise (another process claimed it) change nothing:
        ``(the store's next due time, None)``. Raises :class:`QueueFull` or
        :class:`QueueClosed`, changing nothing, when it cannot queue."""
        raise NotImplementedError

    def run_schedule(self, name: str, run: Run) -> int:
        """Queue ``run`` now as the schedule's latest run; its next due time stays."""
        raise NotImplementedError

    def schedule_states(self, names: Iterable[str]) -> dict[str, ScheduleState]:
        """What the store keeps of each named schedule it knows."""
        raise NotImplementedError

    # -- working --

    def claim(self, worker: str | None, block: bool = True) -> TaskRecord | None:
        """Take the oldest queued task for ``worker`` and mark it running.

        With ``block``, waits while the queue is empty or paused. Returns
        ``None`` when there is nothing to do: the store is closed, the worker
        was asked to stop, or (without ``block``) nothing is ready.
        ``worker=None`` claims for the calling thread, outside any slot.
        """
        raise NotImplementedError

    def progress(self, record: TaskRecord, fraction: float, message: str | None) -> None:
        """Record a running task's progress (``fraction`` already in 0..1)."""
        raise NotImplementedError

    def log(self, record: TaskRecord, line: str) -> None:
        """Keep a line the running task logged: the last :data:`MAX_LOG_LINES` stay,
        an older one is let go (and counted)."""
        raise NotImplementedError

    def cancel_requested(self, record: TaskRecord) -> bool:
        """Whether someone asked this running task to stop (cheap: tasks poll it)."""
        return record.cancel_requested

    def finish(
        self,
        record: TaskRecord,
        state: State,
        error: str | None = None,
        traceback: str | None = None,
    ) -> None:
        """Move a running task to a finished ``state`` and free its worker."""
        raise NotImplementedError

    def finish_and_claim(
        self,
        record: TaskRecord,
        state: State,
        error: str | None = None,
        traceback: str | None = None,
    ) -> TaskRecord | None:
        """:meth:`finish` then a blocking :meth:`claim` for the same worker."""
        worker = record.worker  # (a retried attempt's record lets go of its worker)
        self.finish(record, state, error, traceback)
        return self.claim(worker)

    # -- operating on one task --

    def cancel(self, task_id: int) -> State:
        """Cancel a queued task (it never runs) or ask a running one to stop.

        Returns the task's state afterwards: ``CANCELLED`` for a queued task,
        ``RUNNING`` for a running one (its ``cancel_requested`` is now set).
        Raises :class:`TaskNotFound`, or :class:`WrongState` once finished.
        """
        raise NotImplementedError

    def retry(self, task_id: int) -> Retried:
        """Queue a new task with the kind and params of a failed or cancelled one.

        The new task records ``retry_of``; the old one ``retried_as``. Returns
        ``(the new id, True)``. A task that was retried already is not queued
        again: ``(the id of its retry, False)`` (a double click, or two
        processes at once, queue one task, and only one is told it did). Raises
        :class:`TaskNotFound`, :class:`WrongState`, :class:`QueueFull` or
        :class:`QueueClosed`.
        """
        raise NotImplementedError

    def clear_history(self) -> int:
        """Forget the finished tasks (counters stay); return how many were forgotten."""
        raise NotImplementedError

    # -- the operator's view --------------------------------------------------------------

    def find(self, query: TaskFilter, limit: int, after: int | None = None,
             ascending: bool = False) -> list[TaskInfo]:
        """Up to ``limit`` tasks it holds that match ``query``, by id, descending (newest
        first) or ``ascending``, past ``after`` (exclusive) in that order. Keyset: a seek
        on an index, whatever the page; never an offset."""
        raise NotImplementedError

    def count(self, query: TaskFilter) -> int:
        """How many tasks it holds match ``query``."""
        raise NotImplementedError

    def retry_many(self, ids: list[int]) -> list[int]:
        """Retry each of ``ids`` that can be (failed or cancelled, not retried yet), as
        :meth:`retry` does; the new tasks' ids, in order. Others are skipped. A full queue
        stops it: BulkStopped, with the ids retried before. A store may do it in one lock
        or transaction; this default retries them one by one."""
        created = []
        for task_id in ids:
            try:
                retried = self.retry(task_id)
            except (TaskNotFound, WrongState):
                continue
            except QueueFull as exc:
                raise BulkStopped("retry", created, exc) from None
            if retried.created:
                created.append(retried.id)
        return created

    def cancel_many(self, ids: list[int]) -> list[int]:
        """Cancel each of ``ids`` that is scheduled or queued (never a running one: a bulk
        cancel takes back what has not started); the ids cancelled. Default: one by one."""
        cancelled = []
        for task_id in ids:
            info = self.get(task_id)
            if info is None or info.state not in (State.SCHEDULED, State.QUEUED):
                continue
            try:
                if self.cancel(task_id) is State.CANCELLED:
                    cancelled.append(task_id)
            except (TaskNotFound, WrongState):
                continue
        return cancelled

    def purge(self, ids: list[int]) -> int:
        """Forget each of ``ids`` that has finished (the counters keep their totals);
        how many were forgotten."""
        raise NotImplementedError

    def kind_health(self, kinds: Iterable[str]) -> list[KindHealth]:
        """Each of ``kinds``' health over the last hour (:class:`KindHealth`), in order."""
        raise NotImplementedError

    def reset(self) -> None:
        """Clear the history, the counters and the per-second record, for a fresh run.

        Queued and running tasks are kept; they count as submitted.
        """
        raise NotImplementedError

    # -- workers --

    def add_worker(self, name: str, replacement: bool = False) -> None:
        """Register (or revive) the worker slot ``name``.

        ``replacement`` says a supervisor is replacing a thread that died; the
        store counts those restarts.
        """
        raise NotImplementedError

    def stop_worker(self, name: str) -> None:
        """Ask one worker to exit after its current task; its claim returns ``None``."""
        raise NotImplementedError

    def worker_exited(self, name: str, error: str | None = None) -> None:
        """A worker thread ended. With ``error`` it died, and its task fails with it."""
        raise NotImplementedError

    def remove_worker(self, name: str) -> None:
        """Forget a worker slot whose thread has ended for good."""
        raise NotImplementedError

    # -- reading --

    def snapshot(self, recent: int = 20, upcoming: int = 0) -> Snapshot:
        """One consistent copy of everything visible.

        With the ``recent`` last finished tasks (newest first) and the next
        ``upcoming`` queued ones (oldest first).
        """
        raise NotImplementedError

    def metrics(self) -> Metrics:
        """The counts and each kind's totals and durations, in one consistent read.

        The per-kind totals are kept as tasks change state, in the same step as the
        change (under the lock, or in the same transaction), and :meth:`reset`
        zeroes them with the other counters: a scrape copies them and reads no
        history. (The SQLite store counts a task as submitted when it first starts,
        and adds the tasks still waiting for that, read from the queue's own lanes.)
        """
        raise NotImplementedError

    def get(self, task_id: int) -> TaskInfo | None:
        """Return a copy of one task, or ``None`` if unknown or gone from the history."""
        raise NotImplementedError

    def wait_finished(self, task_id: int, timeout: float | None) -> TaskInfo | None:
        """Block until the task has finished, or ``timeout`` seconds pass: the task as
        it is then (finished or not), or None when unknown or gone from the history.

        This reads the task again and again, from 5 ms apart up to 100 ms apart: a
        store that another process writes has nothing to wait on. A store of one
        process does better.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.005
        while True:
            info = self.get(task_id)
            if info is None or info.finished:
                return info
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return info
            time.sleep(pause if left is None else min(pause, left))
            pause = min(pause * 2, 0.1)

    # -- the whole queue --

    def wait_idle(self, timeout: float | None) -> bool:
        """Block until nothing is queued or running; ``False`` on timeout."""
        raise NotImplementedError

    def set_paused(self, paused: bool) -> None:
        """While paused, workers finish what they run and take nothing new."""
        raise NotImplementedError

    def close(self) -> None:
        """Refuse new work from now on and wake every waiting worker so it can exit."""
        raise NotImplementedError

    def close_nowait(self) -> None:
        """Refuse new work from now on without taking any lock (for signal handlers).

        Waiting workers are not woken; a later :meth:`close` does that.
        """
        raise NotImplementedError

    def drop_queued(self) -> int:
        """Forget every queued task (at shutdown); return how many there were."""
        raise NotImplementedError

    def reset_after_fork(self) -> int:
        """Called in a forked child: start empty; return how many queued tasks were dropped."""
        raise NotImplementedError

    # -- for shared stores --

    def maintain(self, wait: float | None = None) -> None:
        """Periodic upkeep, called by each queue's supervisor every ``maintain_every``.

        ``wait``: seconds to wait for a busy store before raising
        :class:`StoreUnavailable` (default: the store's own busy timeout).

        A shared store renews the leases of this process's running tasks,
        requeues the tasks of processes that stopped, prunes old history and
        forgets dead processes. Every store queues the delayed tasks that fell due.
        """

    def workers_target(self) -> int | None:
        """The number of worker threads every process should run, if the store keeps one."""
        return None

    def set_workers_target(self, count: int) -> None:
        """Ask every process sharing this store to run ``count`` worker threads."""

    def release(self, records: list[TaskRecord]) -> int:
        """Give back tasks this process will not finish (it is stopping); return how many.

        A durable store queues them again for another process; the
        in-memory store has nobody to give them to.
        """
        return 0

    def detach(self) -> None:
        """This process stops using the store: forget its workers (shared stores)."""

    def problem(self) -> str | None:
        """Why the store cannot be used at the moment (its file was deleted, say), or None."""
        return None

    def touch(self) -> None:
        """Count a change no write made (a stall began or ended): pages poll anew."""
        raise NotImplementedError
