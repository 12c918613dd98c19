"""The in-memory store.

:class:`MemoryStore` keeps all of it in this process under one lock. It is
fast and simple, and it is per process: another process has another queue,
and queued work is gone when the process ends.

This module imports nothing from Flask.
"""

from __future__ import annotations

import heapq
import os
import secrets
import threading
import time
from bisect import bisect_left
from collections import deque
from itertools import accumulate, islice, takewhile
from typing import Any, Iterable

from ..errors import BulkStopped, QueueClosed, QueueFull, TaskNotFound, WrongState
from ..records import (FINISHED_STATES, HEALTH_WINDOW, KindHealth, TaskFilter, params_text,
                       percentile)
from ..records import (CANNOT_CANCEL, CANNOT_RETRY, DURATION_BUCKETS, RETRYABLE_STATES,
                       SERIES_SECONDS, Histogram, KindStats, Metrics, Retried, ScheduleState,
                       Snapshot, State, Submitted, TaskInfo, TaskRecord, WorkerInfo, WorkerState,
                       progress_changed)
from .store import MAX_ERRORS, RATE_WINDOW, Run, Store, keep_line, rates

# Enum member lookups cost a class attribute access each time; the hot paths
# (submit, claim, finish) use these module constants instead.
SCHEDULED, QUEUED, RUNNING, DONE, FAILED, CANCELLED = (
    State.SCHEDULED, State.QUEUED, State.RUNNING, State.DONE, State.FAILED, State.CANCELLED
)


#: Microseconds from the Unix epoch to 2026-01-01: in-memory ids count from there.
_ID_EPOCH_US = 1_767_225_600_000_000


def first_id() -> int:
    """The first id of a new in-memory queue: one that no earlier run of it used.

    An in-memory queue keeps nothing across a restart, yet an id a client
    holds must never name another task after one. So an id is the
    microseconds since 2026-01-01 when its task was queued, moved on by one
    where that was given out already: a later run starts above every id an
    earlier one gave out (unless that one averaged more than a million tasks
    a second, five times what the engine manages, or the wall clock was set
    back in between), and two processes side by side, each with a queue of
    its own, give out the same id only to tasks queued in the same microsecond.
    """
    return max(1, time.time_ns() // 1000 - _ID_EPOCH_US)


def _stamp(wall: float) -> int:
    """:func:`first_id` for a task queued at ``wall`` (the time.time() already read)."""
    return int(wall * 1_000_000) - _ID_EPOCH_US


class _Slot:
    __slots__ = ("name", "task", "done", "alive")

    def __init__(self, name: str):
        self.name = name
        self.task: TaskRecord | None = None
        self.done = 0
        self.alive = True


class _Kind:
    """One task kind's totals (see :class:`~dashboard.records.KindStats`). A histogram is
    a count per bucket here, the last one past every bound: an observation is one
    increment, and a scrape adds them up into Prometheus's cumulative counts."""

    __slots__ = ("submitted", "done", "failed", "cancelled", "retried", "waits", "wait_sum",
                 "runs", "run_sum", "hour", "queued", "running")

    def __init__(self) -> None:
        self.submitted = self.done = self.failed = self.cancelled = self.retried = 0
        self.queued = self.running = 0  # now: each kind's health reads them, never a walk
        self.waits = [0] * (len(DURATION_BUCKETS) + 1)
        self.wait_sum = 0.0
        self.runs = [0] * (len(DURATION_BUCKETS) + 1)
        self.run_sum = 0.0
        self.hour: deque[_Minute] = deque()  # the last hour, a minute at a time

    def stats(self, kind: str) -> KindStats:
        return KindStats(kind, self.submitted, self.done, self.failed, self.cancelled,
                         self.retried, _histogram(self.waits, self.wait_sum),
                         _histogram(self.runs, self.run_sum))

    def minute(self, wall: float) -> _Minute:
        """The current minute's counts (kept for HEALTH_WINDOW); call under the lock."""
        number = int(wall // 60)
        hour = self.hour
        if hour and hour[-1].number == number:
            return hour[-1]
        while hour and hour[0].number <= number - HEALTH_WINDOW // 60:
            hour.popleft()
        minute = _Minute(number)
        hour.append(minute)
        return minute

    def health(self, kind: str, queued: int, running: int, wall: float) -> KindHealth:
        oldest = int(wall // 60) - HEALTH_WINDOW // 60
        minutes = [m for m in self.hour if m.number > oldest]
        runs = [sum(column) for column in zip(*(m.runs for m in minutes))] or []
        waits = [sum(column) for column in zip(*(m.waits for m in minutes))] or []
        return KindHealth(kind, queued, running, sum(m.done for m in minutes),
                          sum(m.failed for m in minutes), percentile(runs, 0.5),
                          percentile(runs, 0.95), percentile(waits, 0.95))


class _Minute:
    """One minute of one kind: tasks done and failed, and the run and wait times of the
    attempts that ended and started in it (a count per histogram bucket)."""

    __slots__ = ("number", "done", "failed", "runs", "waits")

    def __init__(self, number: int):
        self.number = number
        self.done = self.failed = 0
        self.runs = [0] * (len(DURATION_BUCKETS) + 1)
        self.waits = [0] * (len(DURATION_BUCKETS) + 1)


def _histogram(counts: list[int], total: float) -> Histogram:
    cumulative = tuple(accumulate(counts))
    return Histogram(cumulative[:-1], cumulative[-1], total)


class _Second:
    """One second: the depth at its end and at its highest, and the tasks that finished."""

    __slots__ = ("second", "depth", "peak", "finished", "wait_sum", "run_sum")

    def __init__(self, second: int, depth: int):
        self.second = second
        self.depth = depth
        self.peak = depth
        self.finished = 0
        self.wait_sum = 0.0
        self.run_sum = 0.0


#: How many times a thread that finds the store's lock taken yields the GIL
#: before it blocks on the lock; see :func:`_yield_to_holder`.
_YIELDS = 3


def _yield_to_holder(lock: Any) -> None:
    """Let the thread holding ``lock`` finish before blocking on it.

    A thread that blocks on a lock is woken owning it, but without the GIL;
    the thread that released it runs on, reaches the lock again and blocks in
    turn. Submitter and worker then hand the lock and the GIL back and forth
    at every task, with context switches each time (a lock convoy), which
    halved the engine's rate. The holder is most often waiting for the GIL
    with a critical section of a microsecond left: giving the GIL up a few
    times (``sleep(0)``) lets it finish, and the lock is then taken at once.
    """
    for _ in range(_YIELDS):
        time.sleep(0)
        if not lock.locked():
            return


class _YieldingLock:
    """The store's lock as its conditions take it back after a wait: yielding first.

    A worker woken by ``notify`` takes the lock again on its way out of
    ``wait``; blocking there would make it the owner without the GIL, the
    start of a convoy (see :func:`_yield_to_holder`).
    """

    __slots__ = ("_lock",)

    def __init__(self, lock: Any):
        self._lock = lock

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        lock = self._lock
        if blocking and lock.locked():
            _yield_to_holder(lock)
        return lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class MemoryStore(Store):
    """All state in this process's memory, under one lock.

    Memory is bounded: at most ``max_queued`` queued tasks, one running task
    per worker, a ring of the last ``history`` finished tasks and
    ``SERIES_SECONDS`` per-second buckets. Counters keep the totals.
    """

    def __init__(self, max_queued: int = 10_000, history: int = 1_000):
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        if history < 0:
            raise ValueError("history must be 0 or more")
        self.max_queued = max_queued
        self.history_size = history
        self._init_state()

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        waits = _YieldingLock(self._lock)
        self._work = threading.Condition(waits)  # workers wait here for tasks
        self._idle = threading.Condition(waits)  # join() waits here
        self._ended = threading.Condition(waits)  # wait_finished() waits here
        self._end_waiters = 0
        self._keys: dict[str, TaskRecord] = {}  # a unique key → the task that last had it
        # Periodic schedules: name → [spec, next due, last due, last run's record, runs].
        self._schedules: dict[str, list[Any]] = {}
        # Delayed tasks by due time (a heap; cancelled ones are skipped when popped).
        self._due: list[tuple[float, int, TaskRecord]] = []
        self._scheduled = 0
        self._queue: deque[TaskRecord] = deque()  # may hold cancelled records: skipped
        self._tasks: dict[int, TaskRecord] = {}
        self._history: deque[TaskRecord] = deque()
        self._slots: dict[str, _Slot] = {}
        self._waiting = 0  # workers blocked in claim(): submit notifies only if any
        self._joiners = 0
        self._next_id = first_id()
        self._last_claim: float | None = None  # monotonic
        self._queued = 0
        self._running = 0
        self._paused = False
        self._closed = False
        self._version = 0
        self._token = f"{os.getpid():x}{secrets.token_hex(3)}"
        self._zero_counters()

    def _zero_counters(self) -> None:
        self._submitted = self._queued + self._running
        # Each kind with a task still to come keeps its entry (the shared store keeps
        # its row); those queued or running count as submitted, as in the total.
        self._kinds: dict[str, _Kind] = {}
        for record in self._tasks.values():
            if record.finished_at is None:
                kind = self._kind(record.kind)
                if record.state is QUEUED:
                    kind.submitted += 1
                    kind.queued += 1
                elif record.state is RUNNING:
                    kind.submitted += 1
                    kind.running += 1
        self._done = 0
        self._failed = 0
        self._cancelled = 0
        self._restarts = 0
        self._series: deque[_Second] = deque(maxlen=SERIES_SECONDS)

    # -- the per-second record -------------------------------------------

    def _second(self, now: float) -> _Second:
        """The bucket of ``now`` (monotonic), started if need be. Call under the lock."""
        second = int(now)
        series = self._series
        if series:
            last = series[-1]
            if last.second == second:
                return last
        bucket = _Second(second, self._queued)
        series.append(bucket)
        return bucket

    def _kind(self, kind: str) -> _Kind:
        """The totals of ``kind``, started if need be. Call under the lock."""
        stats = self._kinds.get(kind)
        if stats is None:
            stats = self._kinds[kind] = _Kind()
        return stats

    def _grew(self, now: float) -> None:
        bucket = self._second(now)
        bucket.depth = depth = self._queued
        if depth > bucket.peak:
            bucket.peak = depth

    # -- reading ---------------------------------------------------------

    @property
    def tag(self) -> str:
        return f"{self._token}-{self._version}"

    @property
    def identity(self) -> str:
        return self._token

    @property
    def closed(self) -> bool:
        return self._closed

    def snapshot(self, recent: int = 20, upcoming: int = 0) -> Snapshot:
        pid = os.getpid()
        with self._lock:
            now, wall = time.monotonic(), time.time()
            if self._due:
                self._promote_locked(now)
            paused = self._paused
            workers = tuple(
                WorkerInfo(
                    s.name,
                    WorkerState.of(s.task is not None, s.alive, paused, self._closed),
                    None if s.task is None else s.task.info(),
                    s.done,
                    pid,
                )
                for s in self._slots.values()
            )
            last = tuple(r.info() for r in islice(reversed(self._history), recent))
            waiting = [r for r in islice((r for r in self._queue if r.state is QUEUED),
                                         max(1, upcoming))] if self._queued else []
            next_up = tuple(r.info() for r in waiting[:upcoming])
            # The chart shows wall-clock seconds; the record counts monotonic ones.
            shift = wall - now
            series = tuple((b.second + shift, b.depth, b.peak) for b in self._series)
            since = int(now) - RATE_WINDOW
            measured = rates(
                now,
                self._series[0].second if self._series else None,
                ((b.finished, b.wait_sum, b.run_sum)
                 for b in takewhile(lambda b: b.second > since, reversed(self._series))),
            )
            queued = self._queued
            return Snapshot(
                tag=f"{self._token}-{self._version}",
                version=self._version,
                pid=pid,
                queued=queued,
                running=self._running,
                done=self._done,
                failed=self._failed,
                cancelled=self._cancelled,
                submitted=self._submitted,
                restarts=self._restarts,
                paused=paused,
                closed=self._closed,
                max_queued=self.max_queued,
                workers=workers,
                recent=last,
                upcoming=next_up,
                series=series,
                taken_at=wall,
                oldest_wait=now - waiting[0].queued_clock if waiting else None,
                idle_for=None if self._last_claim is None else now - self._last_claim,
                scheduled=self._scheduled,
                soon=tuple(e[2].info() for e in heapq.nsmallest(
                    upcoming, (e for e in self._due if e[2].state is SCHEDULED))
                ) if self._scheduled and upcoming else (),
                **measured,
            )

    def metrics(self) -> Metrics:
        with self._lock:
            now = time.monotonic()
            if self._due:
                self._promote_locked(now)
            oldest = next((r for r in self._queue if r.state is QUEUED), None) \
                if self._queued else None
            return Metrics(
                queued=self._queued,
                scheduled=self._scheduled,
                running=self._running,
                workers=sum(1 for s in self._slots.values() if s.alive),
                paused=self._paused,
                oldest_wait=None if oldest is None else now - oldest.queued_clock,
                kinds=tuple(stats.stats(kind) for kind, stats in sorted(self._kinds.items())),
                taken_at=time.time(),
                pid=os.getpid(),
            )

    def get(self, task_id: int) -> TaskInfo | None:
        with self._lock:
            record = self._tasks.get(task_id)
            return None if record is None else record.info()

    # -- submitting ------------------------------------------------------

    def add_one(self, kind: str, params: dict[str, Any], time_limit: float | None = None) -> int:
        # The hot path of every submit: the record is built before taking the
        # lock (its id is set under it), and the per-second bucket is inlined.
        now = time.monotonic()
        record = TaskRecord(0, kind, params, time.time())
        record.queued_clock = now
        record.time_limit = time_limit
        lock = self._lock
        if lock.locked():
            _yield_to_holder(lock)
        with lock:
            if self._closed:
                raise QueueClosed()
            depth = self._queued
            if depth >= self.max_queued:
                raise QueueFull(depth, self.max_queued, 1)
            task_id = self._next_id
            stamp = _stamp(record.enqueued_at)
            if stamp > task_id:
                task_id = stamp
            record.id = task_id
            self._next_id = task_id + 1
            self._queue.append(record)
            self._tasks[task_id] = record
            self._queued = depth = depth + 1
            self._submitted += 1
            stats = self._kinds.get(kind) or self._kind(kind)
            stats.submitted += 1
            stats.queued += 1
            series = self._series
            bucket = series[-1] if series else None
            if bucket is None or bucket.second != int(now):
                bucket = self._second(now)
            bucket.depth = depth
            if depth > bucket.peak:
                bucket.peak = depth
            self._version += 1
            # Paused workers would wake only to wait again; resuming wakes them all.
            if self._waiting and not self._paused:
                self._work.notify()
            return task_id

    def add(
        self, kind: str, params: dict[str, Any], count: int = 1, retry_of: int | None = None,
        delay: float | None = None, time_limit: float | None = None,
    ) -> list[int]:
        with self._lock:
            if delay:
                ids = self._schedule_locked(kind, params, count, retry_of, delay)
            else:
                ids = self._add_locked(kind, params, count, retry_of)
            if time_limit is not None:
                for task_id in ids:
                    self._tasks[task_id].time_limit = time_limit
            return ids

    def _schedule_locked(self, kind: str, params: dict[str, Any], count: int,
                         retry_of: int | None, delay: float) -> list[int]:
        if self._closed:
            raise QueueClosed()
        if self._scheduled + count > self.max_queued:
            raise QueueFull(self._scheduled, self.max_queued, count, "scheduled")
        now, wall = time.monotonic(), time.time()
        first = max(self._next_id, _stamp(wall))
        self._next_id = first + count
        for task_id in range(first, first + count):
            record = TaskRecord(task_id, kind, dict(params) if count > 1 else params, wall)
            record.state = SCHEDULED
            record.retry_of = retry_of
            record.due_clock = now + delay
            record.due_at = wall + delay
            self._tasks[task_id] = record
            heapq.heappush(self._due, (record.due_clock, task_id, record))
        self._scheduled += count
        self._submitted += count
        self._kind(kind).submitted += count
        self._version += 1
        if self._waiting:
            self._work.notify_all()  # a waiting worker now waits until the first is due
        return list(range(first, first + count))

    def _promote_locked(self, now: float) -> float | None:
        """Queue every scheduled task now due, in due order; the clock when the next is
        due, or None. A promoted task joins the queue as if submitted when it fell due:
        behind what was queued before then, ahead of what was queued after."""
        due = self._due
        while due and due[0][0] <= now:
            due_clock, _, record = heapq.heappop(due)
            if record.state is not SCHEDULED:
                continue  # cancelled while scheduled
            record.state = QUEUED
            record.queued_clock = due_clock
            queue = self._queue
            later = 0
            for other in reversed(queue):
                if other.queued_clock <= due_clock:
                    break
                later += 1
            if later:
                queue.insert(len(queue) - later, record)
            else:
                queue.append(record)
            self._scheduled -= 1
            self._queued += 1
            self._kind(record.kind).queued += 1
            self._grew(now)
            self._version += 1
            if self._waiting and not self._paused:
                self._work.notify()
        while due and due[0][2].state is not SCHEDULED:
            heapq.heappop(due)
        return due[0][0] if due else None

    # -- periodic schedules ------------------------------------------------

    def schedule_next(self, name: str, spec: str, first_due: float) -> float:
        with self._lock:
            entry = self._schedules.get(name)
            if entry is None:
                entry = self._schedules[name] = [spec, first_due, None, None, 0]
            elif entry[0] != spec:  # the code changed: due anew; the last run stays
                entry[0], entry[1] = spec, first_due
                self._version += 1
            return entry[1]

    def claim_due(self, name: str, due: float, next_due: float,
                  run: Run | None) -> tuple[float, int | None]:
        with self._lock:
            if self._closed:
                raise QueueClosed()
            entry = self._schedules.get(name)
            if entry is None or entry[1] != due:
                return (next_due if entry is None else entry[1]), None
            task_id = None if run is None else self._add_run_locked(name, run, due)
            entry[1] = next_due
            if task_id is not None:
                entry[2], entry[3] = due, self._tasks[task_id]
                entry[4] += 1
            self._version += 1
            return next_due, task_id

    def run_schedule(self, name: str, run: Run) -> int:
        with self._lock:
            entry = self._schedules.get(name)
            task_id = self._add_run_locked(name, run, None)
            if entry is not None:
                record = self._tasks[task_id]
                entry[2], entry[3] = record.enqueued_at, record
                entry[4] += 1
            return task_id

    def _add_run_locked(self, name: str, run: Run, due: float | None) -> int:
        (task_id,) = self._add_locked(run.kind, dict(run.params), 1, None)
        record = self._tasks[task_id]
        record.schedule = name
        if due is not None:
            record.due_at = due
        record.time_limit = run.time_limit
        return task_id

    def schedule_states(self, names: Iterable[str]) -> dict[str, ScheduleState]:
        with self._lock:
            states = {}
            for name in names:
                entry = self._schedules.get(name)
                if entry is None:
                    continue
                record = entry[3]
                known = record is not None and self._tasks.get(record.id) is record
                states[name] = ScheduleState(
                    entry[1], entry[2], None if record is None else record.id,
                    record.state if known else None, entry[4])
            return states

    def add_keyed(self, kind: str, params: dict[str, Any], key: str,
                  delay: float | None = None, time_limit: float | None = None) -> Submitted:
        with self._lock:
            if self._closed:
                raise QueueClosed()
            held = self._keys.get(key)
            if (held is not None and held.finished_at is None
                    and self._tasks.get(held.id) is held):
                return Submitted(held.id, False)
            if delay:
                (task_id,) = self._schedule_locked(kind, params, 1, None, delay)
            else:
                (task_id,) = self._add_locked(kind, params, 1, None)
            record = self._tasks[task_id]
            record.key = key
            record.time_limit = time_limit
            keys = self._keys
            keys[key] = record
            if len(keys) > 2 * (self.max_queued + self.history_size) + 64:
                # Keys of tasks long gone: the map stays as bounded as the tasks are.
                for old in [k for k, r in keys.items()
                            if r.finished_at is not None or self._tasks.get(r.id) is not r]:
                    del keys[old]
            return Submitted(task_id, True)

    def _add_locked(
        self, kind: str, params: dict[str, Any], count: int, retry_of: int | None
    ) -> list[int]:
        if self._closed:
            raise QueueClosed()
        if self._queued + count > self.max_queued:
            raise QueueFull(self._queued, self.max_queued, count)
        now, wall = time.monotonic(), time.time()
        first = max(self._next_id, _stamp(wall))
        self._next_id = first + count
        append = self._queue.append
        tasks = self._tasks
        for task_id in range(first, first + count):
            # Each task gets its own params dict: a task may not see another's changes.
            record = TaskRecord(task_id, kind, dict(params) if count > 1 else params, wall)
            record.queued_clock = now
            record.retry_of = retry_of
            append(record)
            tasks[task_id] = record
        self._queued += count
        self._submitted += count
        stats = self._kind(kind)
        stats.submitted += count
        stats.queued += count
        self._grew(now)
        self._version += 1
        if self._waiting and not self._paused:
            if count == 1:
                self._work.notify()
            else:
                self._work.notify(count)
        return list(range(first, first + count))

    # -- working ---------------------------------------------------------

    def claim(self, worker: str | None, block: bool = True) -> TaskRecord | None:
        lock = self._lock
        if lock.locked():
            _yield_to_holder(lock)
        with lock:
            return self._claim_locked(worker, block)

    def finish_and_claim(
        self,
        record: TaskRecord,
        state: State,
        error: str | None = None,
        traceback: str | None = None,
    ) -> TaskRecord | None:
        # One lock round-trip between the end of one task and the start of the next.
        lock = self._lock
        if lock.locked():
            _yield_to_holder(lock)
        worker = record.worker  # (a retried attempt's record lets go of its worker)
        with lock:
            self._finish_locked(record, state, error, traceback)
            return self._claim_locked(worker, True)

    def _claim_locked(self, worker: str | None, block: bool) -> TaskRecord | None:
        slot = None if worker is None else self._slots[worker]
        queue = self._queue
        while True:
            if self._closed or (slot is not None and not slot.alive):
                return None
            due = self._due
            if due and due[0][0] <= time.monotonic():
                self._promote_locked(time.monotonic())
            if queue and not self._paused:
                record = queue.popleft()
                if record.state is not QUEUED:
                    continue  # cancelled while queued: already counted
                now = time.monotonic()
                record.state = RUNNING
                record.started_at = time.time()
                record.started_clock = self._last_claim = now
                record.worker = worker
                record.attempts += 1
                waited = now - record.queued_clock
                stats = self._kinds.get(record.kind) or self._kind(record.kind)
                bucket_index = bisect_left(DURATION_BUCKETS, waited)
                stats.waits[bucket_index] += 1
                stats.wait_sum += waited
                stats.minute(record.started_at).waits[bucket_index] += 1
                self._queued = depth = self._queued - 1
                self._running += 1
                stats.queued -= 1
                stats.running += 1
                if slot is not None:
                    slot.task = record
                series = self._series
                bucket = series[-1] if series else None
                if bucket is None or bucket.second != int(now):
                    bucket = self._second(now)
                bucket.depth = depth
                self._version += 1
                return record
            if not block:
                return None
            self._waiting += 1
            try:
                # Until woken, or until the next delayed task is due (maybe a
                # cancelled one's: then a spare look).
                self._work.wait(max(0.0, due[0][0] - time.monotonic()) if due else None)
            finally:
                self._waiting -= 1

    def maintain(self, wait: float | None = None) -> None:
        """Queue what has fallen due while no worker looked (none running, or paused)."""
        if self._due:
            with self._lock:
                self._promote_locked(time.monotonic())

    def progress(self, record: TaskRecord, fraction: float, message: str | None) -> None:
        with self._lock:
            if record.state is not RUNNING:
                return
            # Only a change a person can see is a new version: whole percents or a new message.
            visible = progress_changed(record.progress, fraction, record.message, message)
            record.progress = fraction
            record.message = message
            if visible:
                self._version += 1

    def log(self, record: TaskRecord, line: str) -> None:
        with self._lock:
            if record.state is RUNNING:
                keep_line(record, line)
                self._version += 1

    def finish(
        self,
        record: TaskRecord,
        state: State,
        error: str | None = None,
        traceback: str | None = None,
    ) -> None:
        with self._lock:
            self._finish_locked(record, state, error, traceback)

    def _finish_locked(
        self, record: TaskRecord, state: State, error: str | None, traceback: str | None
    ) -> None:
        if record.state is not RUNNING:
            raise ValueError(f"task {record.id} is {record.state}, not running")
        if state is SCHEDULED:
            self._retry_later_locked(record, error, traceback)
            return
        now = time.monotonic()
        record.state = state
        record.finished_at = time.time()
        stats = self._kinds.get(record.kind) or self._kind(record.kind)
        if state is DONE:
            record.progress = 1.0
            # An earlier attempt's error stays in ``errors``, not on a task that is done.
            record.error = record.traceback = None
            self._done += 1
            stats.done += 1
        elif state is FAILED:
            record.error = error
            record.traceback = traceback
            self._failed += 1
            stats.failed += 1
        elif state is CANCELLED:
            record.error = error
            self._cancelled += 1
            stats.cancelled += 1
        else:
            raise ValueError(f"{state} is not a finished state")
        self._running -= 1
        stats.running -= 1
        started = record.started_clock or now
        ran = now - started
        bucket_index = bisect_left(DURATION_BUCKETS, ran)
        stats.runs[bucket_index] += 1
        stats.run_sum += ran
        if state is DONE or state is FAILED:
            minute = stats.minute(record.finished_at)
            minute.runs[bucket_index] += 1
            if state is DONE:
                minute.done += 1
            else:
                minute.failed += 1
        series = self._series
        bucket = series[-1] if series else None
        if bucket is None or bucket.second != int(now):
            bucket = self._second(now)
        bucket.finished += 1
        bucket.run_sum += ran
        bucket.wait_sum += started - record.queued_clock
        worker = record.worker
        if worker is not None:
            slot = self._slots.get(worker)
            if slot is not None and slot.task is record:
                slot.task = None
                slot.done += 1
        # _remember(record), inlined: the history ring drops its oldest.
        history = self._history
        if len(history) >= self.history_size:
            if self.history_size:
                del self._tasks[history.popleft().id]
                history.append(record)
            else:
                del self._tasks[record.id]
        else:
            history.append(record)
        self._version += 1
        if self._joiners and not self._queued and not self._running:
            self._idle.notify_all()
        if self._end_waiters:
            self._ended.notify_all()

    def _retry_later_locked(self, record: TaskRecord, error: str | None,
                            traceback: str | None) -> None:
        """The attempt failed and is tried again in ``record.retry_in`` seconds: the task
        is scheduled again, the error kept with those of its earlier attempts."""
        now, wall = time.monotonic(), time.time()
        record.errors = [*record.errors[-(MAX_ERRORS - 1):],
                         {"attempt": record.attempts, "error": error, "at": wall}]
        record.error, record.traceback = error, traceback
        record.state = SCHEDULED
        record.due_clock, record.due_at = now + record.retry_in, wall + record.retry_in
        record.progress, record.message = 0.0, None
        heapq.heappush(self._due, (record.due_clock, record.id, record))
        stats = self._kind(record.kind)
        stats.retried += 1
        ran = now - (record.started_clock or now)
        stats.runs[bisect_left(DURATION_BUCKETS, ran)] += 1
        stats.run_sum += ran
        self._running -= 1
        stats.running -= 1
        self._scheduled += 1
        slot = self._slots.get(record.worker) if record.worker is not None else None
        if slot is not None and slot.task is record:
            slot.task = None
        record.worker = None
        self._version += 1
        if self._joiners and not self._queued and not self._running:
            self._idle.notify_all()

    def _remember(self, record: TaskRecord) -> None:
        history = self._history
        if len(history) >= self.history_size:
            if not self.history_size:
                del self._tasks[record.id]
                return
            del self._tasks[history.popleft().id]
        history.append(record)

    # -- operating on one task -------------------------------------------

    def cancel(self, task_id: int) -> State:
        with self._lock:
            return self._cancel_locked(task_id)

    def cancel_many(self, ids: list[int]) -> list[int]:
        """Cancel those of ``ids`` still scheduled or queued, under one hold of the lock (a
        task a worker took meanwhile is left to run: a bulk cancel never stops one)."""
        with self._lock:
            return [task_id for task_id in ids
                    if (record := self._tasks.get(task_id)) is not None
                    and record.state in (SCHEDULED, QUEUED)
                    and self._cancel_locked(task_id) is CANCELLED]

    def retry_many(self, ids: list[int]) -> list[int]:
        """Retry those of ``ids`` that can be, under one hold of the lock; the new ids. A full
        queue stops it: BulkStopped, with the ids retried before."""
        created = []
        with self._lock:
            for task_id in ids:
                record = self._tasks.get(task_id)
                if record is None or record.state not in RETRYABLE_STATES \
                        or record.retried_as is not None:
                    continue
                try:
                    created.append(self._retry_locked(task_id).id)
                except QueueFull as exc:
                    raise BulkStopped("retry", created, exc) from None
        return created

    def _cancel_locked(self, task_id: int) -> State:
        record = self._tasks.get(task_id)
        if record is None:
            raise TaskNotFound(task_id)
        if record.state is SCHEDULED:
            record.state = CANCELLED
            record.finished_at = time.time()
            record.error = "cancelled before it was due"
            self._scheduled -= 1
            self._cancelled += 1
            self._kind(record.kind).cancelled += 1
            self._remember(record)
            if len(self._due) > 2 * self._scheduled + 64:
                self._due = [e for e in self._due if e[2].state is SCHEDULED]
                heapq.heapify(self._due)
            self._version += 1
            return CANCELLED
        if record.state is QUEUED:
            now = time.monotonic()
            record.state = CANCELLED
            record.finished_at = time.time()
            record.error = "cancelled before it started"
            self._queued -= 1
            self._cancelled += 1
            stats = self._kind(record.kind)
            stats.cancelled += 1
            stats.queued -= 1
            self._second(now).depth = self._queued
            self._remember(record)
            self._compact_queue()
            self._version += 1
            if self._joiners and not self._queued and not self._running:
                self._idle.notify_all()
            return CANCELLED
        if record.state is RUNNING:
            if not record.cancel_requested:
                record.cancel_requested = True
                self._version += 1
            return RUNNING
        raise WrongState(task_id, record.state, CANNOT_CANCEL)

    def _compact_queue(self) -> None:
        # Cancelled records stay in the deque until a worker skips them; when
        # they outnumber the live ones (a paused queue, mass cancels), drop them
        # so the deque never holds much more than max_queued records. In place:
        # a worker waiting in claim() holds this very deque, and must see what
        # is queued after it is compacted.
        queue = self._queue
        if len(queue) > 2 * self._queued + 64:
            live = [r for r in queue if r.state is QUEUED]
            queue.clear()
            queue.extend(live)

    def retry(self, task_id: int) -> Retried:
        with self._lock:
            return self._retry_locked(task_id)

    def _retry_locked(self, task_id: int) -> Retried:
        record = self._tasks.get(task_id)
        if record is None:
            raise TaskNotFound(task_id)
        if record.state not in RETRYABLE_STATES:
            raise WrongState(task_id, record.state, CANNOT_RETRY)
        if record.retried_as is not None:
            return Retried(record.retried_as, False)
        (new_id,) = self._add_locked(record.kind, dict(record.params), 1, record.id)
        self._tasks[new_id].time_limit = record.time_limit
        record.retried_as = new_id
        return Retried(new_id, True)

    def clear_history(self) -> int:
        with self._lock:
            return self._clear_history_locked()

    def _clear_history_locked(self) -> int:
        forgotten = len(self._history)
        for record in self._history:
            self._tasks.pop(record.id, None)
        self._history.clear()
        self._version += 1
        return forgotten

    # -- the operator's view ----------------------------------------------

    def _matching(self, query: TaskFilter, after: int | None,
                  ascending: bool) -> Iterable[TaskRecord]:
        """The records that match, by id (the table keeps them in the order of their ids:
        each is added with the next one), past ``after``. Call under the lock."""
        states, kind = query.states, query.kind
        needles = [n.casefold() for n in query.needles()]
        records = self._tasks.values() if ascending else reversed(self._tasks.values())
        for record in records:
            if after is not None and (record.id <= after if ascending else record.id >= after):
                continue
            if states and record.state not in states:
                continue
            if query.not_retried and record.retried_as is not None:
                continue
            if kind is not None and record.kind != kind:
                continue
            if needles:
                found, error = params_text(record.params).casefold(), (record.error or "").casefold()
                if not any(n in found or n in error for n in needles):
                    continue
            yield record

    def find(self, query: TaskFilter, limit: int, after: int | None = None,
             ascending: bool = False) -> list[TaskInfo]:
        with self._lock:
            return [r.info() for r in islice(self._matching(query, after, ascending), limit)]

    def count(self, query: TaskFilter) -> int:
        with self._lock:
            return sum(1 for _ in self._matching(query, None, True))

    def purge(self, ids: list[int]) -> int:
        with self._lock:
            gone = set()
            for task_id in ids:
                record = self._tasks.get(task_id)
                if record is not None and record.state in FINISHED_STATES \
                        and record.finished_at is not None:
                    gone.add(task_id)
            if gone:
                for task_id in gone:
                    del self._tasks[task_id]
                self._history = deque(r for r in self._history if r.id not in gone)
                self._version += 1
            return len(gone)

    def kind_health(self, kinds: Iterable[str]) -> list[KindHealth]:
        wall = time.time()
        with self._lock:
            empty = _Kind()
            return [(stats := self._kinds.get(kind) or empty).health(
                        kind, stats.queued, stats.running, wall) for kind in kinds]

    def reset(self) -> None:
        with self._lock:
            self._clear_history_locked()
            self._zero_counters()
            for slot in self._slots.values():
                slot.done = 0

    # -- workers ---------------------------------------------------------

    def add_worker(self, name: str, replacement: bool = False) -> None:
        with self._lock:
            slot = self._slots.get(name)
            if slot is None:
                self._slots[name] = _Slot(name)
            else:
                slot.alive = True
            if replacement:
                self._restarts += 1
            self._version += 1

    def stop_worker(self, name: str) -> None:
        with self._lock:
            slot = self._slots.get(name)
            if slot is not None:
                slot.alive = False
                self._work.notify_all()
                self._version += 1

    def worker_exited(self, name: str, error: str | None = None) -> None:
        with self._lock:
            slot = self._slots.get(name)
            if slot is None:
                return
            slot.alive = False
            if slot.task is not None:
                self._finish_locked(slot.task, FAILED, error or "worker thread exited", None)
            self._version += 1

    def remove_worker(self, name: str) -> None:
        with self._lock:
            if self._slots.pop(name, None) is not None:
                self._version += 1

    def touch(self) -> None:
        with self._lock:
            self._version += 1

    # -- the whole queue -------------------------------------------------

    def wait_finished(self, task_id: int, timeout: float | None) -> TaskInfo | None:
        # Woken when a worker finishes a task; a task that ends another way (cancelled
        # while queued, failed with a dead worker) is seen at the next look, 0.25 s on.
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._end_waiters += 1
            try:
                while True:
                    record = self._tasks.get(task_id)
                    if record is None or record.finished_at is not None:
                        return None if record is None else record.info()
                    left = 0.25 if deadline is None else min(0.25, deadline - time.monotonic())
                    if left <= 0:
                        return record.info()
                    self._ended.wait(left)
            finally:
                self._end_waiters -= 1

    def wait_idle(self, timeout: float | None) -> bool:
        with self._lock:
            self._joiners += 1
            try:
                return self._idle.wait_for(
                    lambda: not self._queued and not self._running, timeout
                )
            finally:
                self._joiners -= 1

    def set_paused(self, paused: bool) -> None:
        with self._lock:
            if self._paused != paused:
                self._paused = paused
                self._version += 1
                if not paused:
                    self._work.notify_all()

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._version += 1
            self._work.notify_all()

    def close_nowait(self) -> None:
        # One attribute store is atomic; add() and claim() read it under the
        # lock, so from here on nothing new is queued or started.
        self._closed = True

    def drop_queued(self) -> int:
        with self._lock:
            dropped = 0
            for record in self._queue:
                if record.state is QUEUED:
                    self._tasks.pop(record.id, None)
                    dropped += 1
            self._queue.clear()
            self._queued = 0
            for stats in self._kinds.values():
                stats.queued = 0
            for _, _, record in self._due:  # delayed tasks go with the process too
                if record.state is SCHEDULED:
                    self._tasks.pop(record.id, None)
                    dropped += 1
            self._due.clear()
            self._scheduled = 0
            self._second(time.monotonic()).depth = 0
            self._version += 1
            if self._joiners and not self._running:
                self._idle.notify_all()
            return dropped

    def reset_after_fork(self) -> int:
        # The parent's threads and any lock they held did not come along:
        # new locks, and no tasks, or two processes would run the same ones.
        dropped = self._queued + self._scheduled
        self._init_state()
        return dropped

