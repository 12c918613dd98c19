"""Row 10: the operator's view on the SQLite store (issue 15).

10a/10b: a filtered page (failed tasks of one kind, newest first, 50 rows) with a
million finished tasks in the file against a thousand, first page and a page 90% of
the way down (reached by its keyset cursor). 10c/10d: a bulk retry of 10,000 failed
tasks while 2 worker threads run and another thread submits a task every 2 ms, each
submit timed.

The history is not run through the engine (a million tasks would take many minutes):
:func:`fill` writes the finished rows straight into a file the store created, in one
transaction, and adds up in bulk what the store's triggers would have counted row by
row (meta's totals, each kind's totals and histograms; ``meta.kept`` is left to its
own trigger). Every task ended more than an hour ago, so each kind's last hour (the
health minutes) and the per-second record have nothing of them, as they would not.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import tempfile
import threading
import time
from typing import Any, Callable

from dashboard.backend import encode_cursor
from dashboard.local.clock import clock
from dashboard.local.queue import WorkQueue
from dashboard.local.sqlite import SqliteStore, params_text
from dashboard.records import DURATION_BUCKETS, State, TaskFilter
from dashboard.tasks import Registry

#: The kinds of the filled history: the first fails 30% of the time, the others 5%
#: (10% of all tasks failed, 2% more cancelled before they started).
KINDS = ("flaky", "email", "report", "resize", "sync")
FLAKY = KINDS[0]
#: What 10a/10b look for: the flaky kind's failed tasks (newest first).
QUERY = TaskFilter(states=frozenset({State.FAILED}), kind=FLAKY)
PAGE = 50
#: How long each filled task waited and ran (the same for all: the histograms are
#: then added up per bucket, not per row).
WAITED, RAN = 0.001, 0.002

registry = Registry()


def _noop(ctx, **params: Any) -> None:
    pass


for _kind in (*KINDS, "noop"):
    registry.task(_kind)(_noop)


def state_of(index: int) -> tuple[str, str]:
    """The kind and state of the ``index``-th filled task (from 0), spread evenly: kinds
    in turn; of every 10 flaky tasks 3 failed and 1 cancelled, of every 20 others 1
    failed and 1 cancelled. So 1,000 tasks hold exactly 60 failed flaky ones and any
    multiple of 100 exactly 10% failed."""
    kind, turn = index % len(KINDS), index // len(KINDS)
    if kind == 0:
        slot = turn % 10
        state = "failed" if slot < 3 else "cancelled" if slot == 3 else "done"
    else:
        slot = turn % 20
        state = "failed" if slot == 0 else "cancelled" if slot == 1 else "done"
    return KINDS[kind], state


def store_for(path: str, tasks: int, max_queued: int = 10_000) -> SqliteStore:
    """A store on ``path`` whose history cap (QUEUE_HISTORY) keeps every filled task."""
    return SqliteStore(path, max_queued=max_queued, history=max(1_000, 4 * tasks),
                       poll_interval=0.05)


def fill(path: str, tasks: int) -> float:
    """Create the store's file at ``path`` holding ``tasks`` finished tasks (see the
    module's docstring); the seconds it took."""
    started = time.perf_counter()
    store_for(path, tasks).close()  # creates the file (schema, triggers, meta)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # Nothing else has the file open: fill without a journal, then back to WAL
        # (the store's mode), so the rows are written once rather than to the WAL and
        # again at its checkpoint.
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -262144")  # 256 MiB: the indexes stay in memory
        conn.execute("BEGIN IMMEDIATE")
        _fill_rows(conn, tasks)
        conn.execute("COMMIT")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        assert mode == "wal", mode
    finally:
        conn.close()
    return time.perf_counter() - started


def _fill_rows(conn: sqlite3.Connection, tasks: int) -> None:
    if conn.execute("SELECT next_id FROM meta").fetchone()[0] != 1:
        raise RuntimeError("fill wants a new file")
    wall, now = time.time(), clock()
    # Ended from two days ago to an hour ago, oldest first (by id, as they would).
    first, last = wall - 2 * 86400, wall - 3600
    step = (last - first) / max(1, tasks)
    counts = {kind: {"done": 0, "failed": 0, "cancelled": 0} for kind in KINDS}

    def rows():
        for index in range(tasks):
            kind, state = state_of(index)
            counts[kind][state] += 1
            task_id = index + 1
            ended = first + index * step
            ended_clock = now - (wall - ended)
            params = params_text({"n": task_id, "user": f"u{task_id % 97}"})
            if state == "cancelled":  # before it started
                yield (task_id, kind, params, state, ended - 5.0, None, ended, 0.0, None,
                       "cancelled before it started", None, None, None, None, 0,
                       ended_clock - 5.0, None, ended_clock, ended_clock, None)
                continue
            failed = state == "failed"
            yield (task_id, kind, params, state, ended - WAITED - RAN, ended - RAN, ended,
                   0.0 if failed else 1.0, None,
                   "ValueError: the upstream said no" if failed else None,
                   "Traceback (most recent call last):\nValueError: the upstream said no"
                   if failed else None, "worker-1", "bench:1:fill", 1, 1,
                   ended_clock - WAITED - RAN, ended_clock - RAN, ended_clock, ended_clock,
                   None if failed else "null")

    conn.executemany(
        "INSERT INTO tasks (id, kind, params, state, enqueued_at, started_at, finished_at, "
        "progress, message, error, traceback, worker, process, pid, attempts, queued_clock, "
        "started_clock, finished_clock, clock, result) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows())
    # What the triggers count as a task starts and ends (tasks_moved, tasks_kind_started,
    # tasks_kind_ended), for all the filled tasks at once. (tasks_kept_added has counted
    # meta.kept already: an insert of a finished row fires it.)
    total = {state: sum(c[state] for c in counts.values())
             for state in ("done", "failed", "cancelled")}
    conn.execute("UPDATE meta SET done = done + ?, failed = failed + ?, "
                 "cancelled = cancelled + ?, submitted = submitted + ?, "
                 "version = version + 1, next_id = ?, head = ?",
                 (total["done"], total["failed"], total["cancelled"], tasks, tasks + 1,
                  tasks + 1))
    waits = [f"wait_{i}" for i in range(len(DURATION_BUCKETS))]
    runs = [f"run_{i}" for i in range(len(DURATION_BUCKETS))]
    columns = ["kind", "submitted", "done", "failed", "cancelled", "wait_count", "wait_sum",
               *waits, "run_count", "run_sum", *runs]
    for kind, c in counts.items():
        ran = c["done"] + c["failed"]  # the cancelled ones never started
        values = [kind, sum(c.values()), c["done"], c["failed"], c["cancelled"],
                  ran, ran * WAITED, *(ran if WAITED <= b else 0 for b in DURATION_BUCKETS),
                  ran, ran * RAN, *(ran if RAN <= b else 0 for b in DURATION_BUCKETS)]
        conn.execute(f"INSERT INTO kinds ({', '.join(columns)}) "
                     f"VALUES ({', '.join('?' * len(columns))})", values)


# -- 10a, 10b: a filtered page, 1,000,000 finished tasks against 1,000 --------------------


def _timed(calls: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """The median seconds of ``reps`` calls of each of ``calls``, taken in turn (one of
    each, then again), so that a burst of the machine's noise falls on all of them."""
    times: dict[str, list[float]] = {key: [] for key in calls}
    perf = time.perf_counter
    for _ in range(reps):
        for key, call in calls.items():
            start = perf()
            call()
            times[key].append(perf() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def deep_cursor(path: str, fraction: float = 0.9) -> tuple[str, int]:
    """The cursor of the page ``fraction`` of the way down QUERY's tasks (newest first),
    as the page before it gives out (continue after its last task), and the position."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        matches = conn.execute("SELECT count(*) FROM tasks WHERE kind = ? AND state = 'failed'",
                               (FLAKY,)).fetchone()[0]
        skip = max(0, int(matches * fraction) - 1)
        (task_id,) = conn.execute(
            "SELECT id FROM tasks WHERE kind = ? AND state = 'failed' ORDER BY id DESC "
            "LIMIT 1 OFFSET ?", (FLAKY, skip)).fetchone()
    finally:
        conn.close()
    return encode_cursor(True, task_id), skip + 1


def page_times(big: int, small: int, rounds: int, reps: int = 200,
               log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Median seconds of QUERY's first page with ``big`` and ``small`` finished tasks,
    and of the page 90% down with ``big``, in alternating rounds."""
    with tempfile.TemporaryDirectory(prefix="bench10-") as tmp:
        paths = {n: os.path.join(tmp, f"h{n}.db") for n in (big, small)}
        filled = {}
        for n, path in paths.items():
            log(f"  10a fill {n:,} finished tasks ...")
            filled[n] = fill(path, n)
        queues = {n: WorkQueue(0, registry=registry, store=store_for(path, n))
                  for n, path in paths.items()}
        try:
            cursor, position = deep_cursor(paths[big])
            calls = {
                "big": lambda: queues[big].find(QUERY, limit=PAGE),
                "small": lambda: queues[small].find(QUERY, limit=PAGE),
                "deep": lambda: queues[big].find(QUERY, limit=PAGE, cursor=cursor),
            }
            sizes = {key: len(call().tasks) for key, call in calls.items()}
            times: dict[str, list[float]] = {key: [] for key in calls}
            for _ in range(rounds):
                for key, median in _timed(calls, reps).items():
                    times[key].append(median)
            counts = {n: q.count(QUERY) for n, q in queues.items()}
            size = os.path.getsize(paths[big])
        finally:
            for q in queues.values():
                q.shutdown(timeout=5)
    return {"times": {key: statistics.median(t) for key, t in times.items()},
            "rows": sizes, "matches": counts, "position": position, "fill": filled,
            "bytes": size}


# -- 10c, 10d: a bulk retry while workers run and a submit comes every 2 ms ----------------


class Submitter(threading.Thread):
    """Submits a no-op task every ``period`` seconds, timing each submit."""

    def __init__(self, q: WorkQueue, period: float):
        super().__init__(daemon=True, name="bench-submitter")
        self.q, self.period = q, period
        self.stop = threading.Event()
        self.waits: list[tuple[float, float]] = []  # (when it began, seconds it took)
        self.failed: list[str] = []

    def run(self) -> None:
        submit, period, perf = self.q.submit, self.period, time.perf_counter
        due = perf()
        while not self.stop.is_set():
            start = perf()
            try:
                submit("noop")
            except Exception as exc:  # (a full queue): counted, the timing goes on
                self.failed.append(type(exc).__name__)
            self.waits.append((start, perf() - start))
            due = max(due + period, perf())
            time.sleep(max(0.0, due - perf()))

    def between(self, start: float, end: float) -> list[float]:
        return [took for began, took in self.waits if start <= began <= end]


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0


def bulk_round(bulk: int, period: float = 0.002, workers: int = 2) -> dict[str, Any]:
    """One round: a file of ``10 * bulk`` finished tasks (``bulk`` of them failed), 2
    workers started, the submitter alone for a while (the baseline), then the bulk
    retry of every failed task; then, the submitter stopped, ``bulk`` submits one by
    one from this thread (the bulk's baseline)."""
    with tempfile.TemporaryDirectory(prefix="bench10-") as tmp:
        path = os.path.join(tmp, "bulk.db")
        tasks = 10 * bulk
        filled = fill(path, tasks)
        store = store_for(path, tasks, max_queued=3 * bulk + 10_000)
        q = WorkQueue(workers, registry=registry, store=store)
        q.start()
        submitter = Submitter(q, period)
        try:
            failed = q.count(TaskFilter(states=frozenset({State.FAILED})))
            submitter.start()
            time.sleep(0.2)
            alone_start = time.perf_counter()
            time.sleep(min(3.0, max(0.3, bulk / 8000)))
            alone_end = bulk_start = time.perf_counter()
            result = q.bulk("retry", TaskFilter(states=frozenset({State.FAILED})))
            bulk_end = time.perf_counter()
            time.sleep(0.05)
            submitter.stop.set()
            submitter.join()
            start = time.perf_counter()
            for _ in range(result.count):
                q.submit("noop")
            one_by_one = time.perf_counter() - start
        finally:
            submitter.stop.set()
            q.shutdown(timeout=10)
    return {"bulk": bulk_end - bulk_start, "retried": result.count, "failed": failed,
            "one_by_one": one_by_one, "during": submitter.between(bulk_start, bulk_end),
            "alone": submitter.between(alone_start, alone_end), "fill": filled,
            "refused": submitter.failed}
