"""A durable store in one SQLite file, shared by every process on one machine.

Queued work survives a restart, and several server processes see one queue:
a task is claimed atomically (one ``UPDATE ... RETURNING`` in an immediate
transaction), so two workers in two processes never take the same one.

Delivery is **at least once**. A running task holds a lease that its
process renews; when a process dies (``kill -9``, a crash, a deploy that
could not wait), its tasks are queued again once their lease expires, and
after ``max_attempts`` starts a task is failed with a message saying so. A
task may therefore run more than once: make tasks idempotent, or check in
the task whether its work was already done.

Each process opens its own connection, lazily, in the process that uses it
(so nothing crosses a fork), and serialises its threads' use of it with a
lock. The file must be on a local disk: SQLite's locking is not reliable on
network file systems.

This module imports nothing from Flask.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from .records import Snapshot, State, TaskInfo, TaskRecord, WorkerInfo
from .store import (
    RATE_WINDOW,
    SERIES_SECONDS,
    QueueClosed,
    QueueFull,
    Store,
    TaskNotFound,
    WrongState,
    rates,
)
from .tasks import TaskError

logger = logging.getLogger("dashboard.sqlite")

#: The schema this code reads and writes; kept in ``PRAGMA user_version``.
SCHEMA_VERSION = 1

#: How long a running task's lease lasts, by default; renewed every third of it.
LEASE_TIME = 30.0

_STATES = {s.value: s for s in State}

#: The statement both task triggers begin with: when a new second has begun,
#: the last one (still in meta's sec_* columns) goes to the seconds table.
_FLUSH_LAST_SECOND = """\
INSERT INTO seconds (second, depth, peak, finished, wait_sum, run_sum)
    SELECT sec, sec_depth, sec_peak, sec_finished, sec_wait, sec_run FROM meta
    WHERE sec IS NOT NULL AND sec != unixepoch()
    ON CONFLICT (second) DO UPDATE SET
        depth = excluded.depth, peak = max(peak, excluded.peak),
        finished = finished + excluded.finished, wait_sum = wait_sum + excluded.wait_sum,
        run_sum = run_sum + excluded.run_sum;"""

_SCHEMA = """
CREATE TABLE meta (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    instance     TEXT NOT NULL,             -- random: tags of another file never match
    version      INTEGER NOT NULL DEFAULT 0,-- bumped by every visible change
    paused       INTEGER NOT NULL DEFAULT 0,
    workers      INTEGER,                   -- worker threads per process, once set live
    queued       INTEGER NOT NULL DEFAULT 0,
    running      INTEGER NOT NULL DEFAULT 0,
    done         INTEGER NOT NULL DEFAULT 0,
    failed       INTEGER NOT NULL DEFAULT 0,
    cancelled    INTEGER NOT NULL DEFAULT 0,
    submitted    INTEGER NOT NULL DEFAULT 0,
    restarts     INTEGER NOT NULL DEFAULT 0,
    max_queued   INTEGER NOT NULL DEFAULT 10000,
    next_id      INTEGER NOT NULL DEFAULT 1,-- ids are never reused
    head         INTEGER NOT NULL DEFAULT 1,-- no queued task has a smaller id
    -- the current second's bucket, written to `seconds` when the next one starts
    sec          INTEGER,
    sec_depth    INTEGER NOT NULL DEFAULT 0,
    sec_peak     INTEGER NOT NULL DEFAULT 0,
    sec_finished INTEGER NOT NULL DEFAULT 0,
    sec_wait     REAL NOT NULL DEFAULT 0,
    sec_run      REAL NOT NULL DEFAULT 0
);
CREATE TABLE tasks (
    id               INTEGER PRIMARY KEY,
    kind             TEXT NOT NULL,
    params           TEXT NOT NULL,        -- JSON
    state            TEXT NOT NULL,
    enqueued_at      REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    progress         REAL NOT NULL DEFAULT 0,
    message          TEXT,
    error            TEXT,
    traceback        TEXT,
    worker           TEXT,
    process          TEXT,                 -- the claiming process's token
    pid              INTEGER,
    lease_until      REAL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    retry_of         INTEGER,
    retried_as       INTEGER
);
-- The only index: the history, newest first, and pruning oldest first. Every
-- index is one more page written per commit, so the queue order comes from
-- the ids (from meta.head up) and the running tasks are few enough to scan.
CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE processes (
    token        TEXT PRIMARY KEY,
    pid          INTEGER NOT NULL,
    host         TEXT NOT NULL,
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL
);
CREATE TABLE workers (
    process  TEXT NOT NULL,
    name     TEXT NOT NULL,
    pid      INTEGER NOT NULL,
    alive    INTEGER NOT NULL DEFAULT 1,
    task_id  INTEGER,
    done     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (process, name)
);
CREATE TABLE seconds (
    second   INTEGER PRIMARY KEY,
    depth    INTEGER NOT NULL,
    peak     INTEGER NOT NULL,
    finished INTEGER NOT NULL DEFAULT 0,
    wait_sum REAL NOT NULL DEFAULT 0,
    run_sum  REAL NOT NULL DEFAULT 0
);
-- The counters, the version, the queue head and the per-second record follow
-- the tasks table in triggers: they change in the same statement as the task,
-- so they never disagree with it, and a submit is one INSERT that touches two
-- pages (the task's and meta's). The `seconds` table is written once a second.
CREATE TRIGGER tasks_refuse_when_full BEFORE INSERT ON tasks
WHEN NEW.state = 'queued' AND (SELECT queued >= max_queued FROM meta)
BEGIN
    SELECT RAISE(ABORT, 'queue full');
END;
CREATE TRIGGER tasks_added AFTER INSERT ON tasks
WHEN NEW.state = 'queued'
BEGIN
    {flush_last_second}
    UPDATE meta SET
        queued = queued + 1, submitted = submitted + 1, version = version + 1,
        next_id = max(next_id, NEW.id + 1),
        sec_peak = CASE WHEN sec = unixepoch() THEN max(sec_peak, queued + 1) ELSE queued + 1 END,
        sec_finished = CASE WHEN sec = unixepoch() THEN sec_finished ELSE 0 END,
        sec_wait = CASE WHEN sec = unixepoch() THEN sec_wait ELSE 0 END,
        sec_run = CASE WHEN sec = unixepoch() THEN sec_run ELSE 0 END,
        sec_depth = queued + 1,
        sec = unixepoch();
END;
CREATE TRIGGER tasks_moved AFTER UPDATE OF state ON tasks
WHEN OLD.state != NEW.state
BEGIN
    {flush_last_second}
    UPDATE meta SET
        queued = queued + d.dq,
        running = running - (OLD.state = 'running') + (NEW.state = 'running'),
        done = done + (NEW.state = 'done'),
        failed = failed + (NEW.state = 'failed'),
        cancelled = cancelled + (NEW.state = 'cancelled'),
        version = version + 1,
        head = CASE
            WHEN OLD.state = 'queued' AND NEW.state = 'running' THEN max(head, NEW.id + 1)
            WHEN NEW.state = 'queued' THEN min(head, NEW.id)
            ELSE head END,
        sec_peak = CASE WHEN sec = unixepoch() THEN max(sec_peak, queued + d.dq)
                        ELSE queued + d.dq END,
        sec_finished = CASE WHEN sec = unixepoch() THEN sec_finished ELSE 0 END + d.ran,
        sec_wait = CASE WHEN sec = unixepoch() THEN sec_wait ELSE 0 END
                   + CASE WHEN d.ran THEN NEW.started_at - NEW.enqueued_at ELSE 0 END,
        sec_run = CASE WHEN sec = unixepoch() THEN sec_run ELSE 0 END
                  + CASE WHEN d.ran THEN NEW.finished_at - NEW.started_at ELSE 0 END,
        sec_depth = queued + d.dq,
        sec = unixepoch()
    FROM (SELECT (NEW.state = 'queued') - (OLD.state = 'queued') AS dq,
                 OLD.state = 'running' AND NEW.finished_at IS NOT NULL AS ran) AS d;
END;
CREATE TRIGGER tasks_touched AFTER UPDATE OF progress, message, cancel_requested, retried_as
ON tasks
BEGIN
    UPDATE meta SET version = version + 1;
END;
""".format(flush_last_second=_FLUSH_LAST_SECOND)

# The id comes from meta.next_id (the insert trigger moves it on): ids are
# never reused, without AUTOINCREMENT's extra page per insert.
_INSERT = (
    "INSERT INTO tasks (id, kind, params, state, enqueued_at, retry_of) "
    "SELECT next_id, ?, ?, 'queued', ?, ? FROM meta"
)

_TASK_COLUMNS = (
    "id, kind, params, state, enqueued_at, started_at, finished_at, progress, message, error, "
    "traceback, worker, cancel_requested, retry_of, retried_as, attempts"
)


class StoreError(TaskError):
    """The store cannot be used as configured. The message says what to do."""


def _info(row: tuple) -> TaskInfo:
    (task_id, kind, params, state, enqueued_at, started_at, finished_at, progress, message,
     error, traceback, worker, cancel_requested, retry_of, retried_as, attempts) = row
    return TaskInfo(
        task_id, kind, json.loads(params), _STATES[state], enqueued_at, started_at, finished_at,
        progress, message, error, traceback, worker, bool(cancel_requested), retry_of,
        retried_as, attempts,
    )


def _record(row: tuple) -> TaskRecord:
    info = _info(row)
    record = TaskRecord(info.id, info.kind, info.params, info.enqueued_at)
    record.state = info.state
    record.started_at = info.started_at
    record.worker = info.worker
    record.progress = info.progress
    record.message = info.message
    record.cancel_requested = info.cancel_requested
    record.retry_of = info.retry_of
    record.attempts = info.attempts
    return record


class SqliteStore(Store):
    """Tasks, counters, workers and the per-second record in one SQLite file.

    ``path`` is created if missing (the directory must exist and be
    writable). ``history`` finished tasks are kept, and none older than
    ``retention`` seconds; older ones are pruned in small batches.
    """

    durable = True

    def __init__(
        self,
        path: str,
        max_queued: int = 10_000,
        history: int = 1_000,
        *,
        retention: float = 7 * 86400,
        lease_time: float = LEASE_TIME,
        max_attempts: int = 3,
        poll_interval: float = 0.2,
        busy_timeout: float = 10.0,
        check: bool = True,
    ):
        self.path = os.path.abspath(path)
        self.max_queued = max_queued
        self.history_size = history
        self.retention = retention
        self.lease_time = lease_time
        self.max_attempts = max_attempts
        self.poll_interval = poll_interval
        self.busy_timeout = busy_timeout
        self.maintain_every = max(0.2, lease_time / 3)
        self._init_process()
        self._instance: str | None = None
        if not check:
            # A process started after the file was checked (a server's worker
            # forked from a master that checked it): no I/O here, so a file
            # that is busy or gone for a moment cannot stop the process from
            # starting; problems show at use, as StoreUnavailable.
            return
        # Check (or create) the file now, so a bad file fails at start, then
        # close: each process opens its own connection when it first needs one.
        conn = self._open(check_first=True)
        try:
            self._instance = self._check_schema(conn)
        finally:
            conn.close()

    def _init_process(self) -> None:
        self._pid = os.getpid()
        self._token = f"{socket.gethostname()}:{self._pid}:{secrets.token_hex(3)}"
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._stopping: set[str] = set()
        self._registered = False
        self._waiting = 0

    # -- the connection --------------------------------------------------

    def _open(self, check_first: bool = False) -> sqlite3.Connection:
        directory = os.path.dirname(self.path) or "."
        if os.path.isdir(self.path):
            raise StoreError(f"cannot use the queue database {self.path}: it is a directory; "
                             "QUEUE_URL must name a file")
        if not os.path.isdir(directory):
            raise StoreError(f"cannot open the queue database {self.path}: "
                             f"the directory {directory} does not exist")
        try:
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreError(_explain(self.path, exc)) from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            if check_first:
                # Before anything writes: switching to WAL rewrites the header of
                # a file that may turn out to be someone else's.
                self._refuse_foreign(conn)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"cannot use WAL mode for {self.path} (got {mode!r})")
            # In WAL mode NORMAL survives a crashed process; only an OS crash
            # or power loss can lose the last transactions.
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(_explain(self.path, exc)) from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _refuse_foreign(self, conn: sqlite3.Connection) -> None:
        """Refuse, reading only, a file of a newer schema or of something else."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the queue database {self.path} has schema version {version}, newer than "
                f"this code knows ({SCHEMA_VERSION}): it was written by a newer release. "
                "Upgrade this code, or point QUEUE_URL at another file. Nothing was changed."
            )
        if version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise StoreError(
                f"{self.path} is a SQLite database of something else (it has tables "
                "but no queue schema). Point QUEUE_URL at another file. Nothing was changed."
            )
        if version:
            # Read every page now: a damaged one would otherwise show only at the
            # first claim or submit, in every worker thread, again and again.
            problems = [line for row in conn.execute("PRAGMA quick_check(3)")
                        for line in row[0].splitlines() if not line.startswith("***")]
            if problems != ["ok"]:
                raise StoreError(
                    f"{self.path} is not a usable SQLite database ({'; '.join(problems[:3])}): "
                    "it is damaged. Point QUEUE_URL at another file. Nothing was changed."
                )

    def _check_schema(self, conn: sqlite3.Connection) -> str:
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    # Another process may have created it while we waited for the lock.
                    if not conn.execute("PRAGMA user_version").fetchone()[0]:
                        for statement in _statements(_SCHEMA):
                            conn.execute(statement)
                        conn.execute("INSERT INTO meta (id, instance) VALUES (1, ?)",
                                     (secrets.token_hex(4),))
                        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                        logger.info("created the queue database %s", self.path)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            conn.execute("UPDATE meta SET max_queued = ? WHERE max_queued != ?",
                         (self.max_queued, self.max_queued))
            return conn.execute("SELECT instance FROM meta").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise StoreError(_explain(self.path, exc)) from None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        if self._pid != os.getpid():
            # A forked child: the parent's connection must not be used (nor
            # closed) here. Start this process's own state.
            _abandoned.append(self._conn)
            self._init_process()
        if self._conn is None:
            conn = self._open()
            if self._instance is None:
                try:
                    self._instance = conn.execute("SELECT instance FROM meta").fetchone()[0]
                except sqlite3.Error:
                    conn.close()
                    raise
            self._conn = conn
        return self._conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN")  # one snapshot of the file for every read inside
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- helpers inside a write transaction ---------------------------------

    def _add_locked(self, conn: sqlite3.Connection, kind: str, params: dict[str, Any],
                    count: int, retry_of: int | None = None) -> list[int]:
        if self._closed:
            raise QueueClosed()
        now = time.time()
        text = json.dumps(params)
        try:
            if count == 1:
                return [conn.execute(_INSERT, (kind, text, now, retry_of)).lastrowid]
            queued, first = conn.execute("SELECT queued, next_id FROM meta").fetchone()
            if queued + count > self.max_queued:
                raise QueueFull(queued, self.max_queued, count)
            conn.executemany(_INSERT, ((kind, text, now, retry_of) for _ in range(count)))
            return list(range(first, first + count))
        except sqlite3.IntegrityError as exc:
            if "queue full" not in str(exc):
                raise
            # The caller's transaction is rolled back: nothing of the batch stays.
            queued = conn.execute("SELECT queued FROM meta").fetchone()[0]
            raise QueueFull(queued, self.max_queued, count) from None

    def _claim_locked(self, conn: sqlite3.Connection, worker: str | None) -> TaskRecord | None:
        now = time.time()
        row = conn.execute(
            f"UPDATE tasks SET state = 'running', started_at = ?, worker = ?, process = ?, "
            f"pid = ?, lease_until = ?, attempts = attempts + 1 "
            f"WHERE id = (SELECT id FROM tasks WHERE id >= (SELECT head FROM meta) "
            f"AND state = 'queued' ORDER BY id LIMIT 1) "
            f"AND (SELECT paused FROM meta) = 0 RETURNING {_TASK_COLUMNS}",
            (now, worker, self._token, self._pid, now + self.lease_time),
        ).fetchone()
        if row is None:
            return None
        if worker is not None:
            conn.execute("UPDATE workers SET task_id = ? WHERE process = ? AND name = ?",
                         (row[0], self._token, worker))
        return _record(row)

    def _finish_locked(self, conn: sqlite3.Connection, record: TaskRecord, state: State,
                       error: str | None, traceback: str | None) -> bool:
        now = time.time()
        changed = conn.execute(
            "UPDATE tasks SET state = ?, finished_at = ?, error = ?, traceback = ?, "
            "lease_until = NULL, progress = CASE WHEN ? THEN 1.0 ELSE progress END "
            "WHERE id = ? AND state = 'running' AND process = ?",
            (state.value, now, error, traceback, state is State.DONE, record.id, self._token),
        ).rowcount
        if record.worker is not None:
            conn.execute(
                "UPDATE workers SET task_id = NULL, done = done + ? "
                "WHERE process = ? AND name = ?",
                (changed, self._token, record.worker),
            )
        if not changed:
            # Our lease ran out and another process took the task back; its
            # outcome is the one that counts.
            logger.warning("task %d: lease lost while it ran here; this result is not kept",
                           record.id)
            return False
        record.state = state
        record.finished_at = now
        return True

    # -- the store interface ---------------------------------------------

    @property
    def tag(self) -> str:
        with self._lock:
            version = self._connection().execute("SELECT version FROM meta").fetchone()[0]
        return f"{self._instance}-{version}"

    @property
    def closed(self) -> bool:
        return self._closed

    def add(self, kind: str, params: dict[str, Any], count: int = 1,
            retry_of: int | None = None) -> list[int]:
        with self._write() as conn:
            ids = self._add_locked(conn, kind, params, count, retry_of)
        self._wake_workers(count)
        return ids

    def add_one(self, kind: str, params: dict[str, Any]) -> int:
        # The path of every submit, kept short: one INSERT in one transaction.
        text = json.dumps(params) if params else "{}"
        now = time.time()
        with self._lock:
            if self._closed:
                raise QueueClosed()
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                task_id = conn.execute(_INSERT, (kind, text, now, None)).lastrowid
            except sqlite3.IntegrityError as exc:
                queued = conn.execute("SELECT queued FROM meta").fetchone()[0]
                conn.execute("ROLLBACK")
                if "queue full" in str(exc):
                    raise QueueFull(queued, self.max_queued, 1) from None
                raise
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            if self._waiting:
                self._work.notify()
        return task_id

    def _wake_workers(self, count: int) -> None:
        with self._lock:
            if self._waiting:
                self._work.notify(count)

    def claim(self, worker: str | None, block: bool = True) -> TaskRecord | None:
        while True:
            with self._lock:
                if self._closed or (worker is not None and worker in self._stopping):
                    return None
                if self._maybe_ready():
                    with self._write() as conn:
                        record = self._claim_locked(conn, worker)
                    if record is not None:
                        return record
                if not block:
                    return None
                # Woken by a submit in this process, or look again soon for
                # work another process queued.
                self._waiting += 1
                try:
                    self._work.wait(self.poll_interval)
                finally:
                    self._waiting -= 1

    def _maybe_ready(self) -> bool:
        """A cheap read: is anything queued and the queue not paused? (No write lock.)"""
        conn = self._connection()
        row = conn.execute("SELECT paused = 0 AND queued > 0 FROM meta").fetchone()
        return bool(row[0])

    def finish(self, record: TaskRecord, state: State, error: str | None = None,
               traceback: str | None = None) -> None:
        with self._write() as conn:
            self._finish_locked(conn, record, state, error, traceback)

    def finish_and_claim(self, record: TaskRecord, state: State, error: str | None = None,
                         traceback: str | None = None) -> TaskRecord | None:
        worker = record.worker
        with self._lock:
            with self._write() as conn:
                self._finish_locked(conn, record, state, error, traceback)
                # One transaction from the end of one task to the start of the next.
                stopping = self._closed or worker in self._stopping
                following = None if stopping else self._claim_locked(conn, worker)
            if following is not None or stopping:
                return following
        return self.claim(worker)

    def progress(self, record: TaskRecord, fraction: float, message: str | None) -> None:
        visible = int(fraction * 100) != int(record.progress * 100) or message != record.message
        record.progress = fraction
        record.message = message
        if not visible:
            return  # not worth a write: nobody could see it
        with self._write() as conn:
            conn.execute(
                "UPDATE tasks SET progress = ?, message = ? WHERE id = ? AND state = 'running'",
                (fraction, message, record.id),
            )

    def cancel_requested(self, record: TaskRecord) -> bool:
        if record.cancel_requested:
            return True
        now = time.monotonic()
        if now - record.checked_at >= 0.25:  # another process may have asked: look, not too often
            record.checked_at = now
            with self._lock:
                row = self._connection().execute(
                    "SELECT cancel_requested FROM tasks WHERE id = ?", (record.id,)
                ).fetchone()
            record.cancel_requested = bool(row and row[0])
        return record.cancel_requested

    def cancel(self, task_id: int) -> State:
        with self._write() as conn:
            row = conn.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                raise TaskNotFound(task_id)
            state = _STATES[row[0]]
            if state is State.QUEUED:
                conn.execute(
                    "UPDATE tasks SET state = 'cancelled', finished_at = ?, "
                    "error = 'cancelled before it started' WHERE id = ?", (time.time(), task_id),
                )
                return State.CANCELLED
            if state is State.RUNNING:
                conn.execute(
                    "UPDATE tasks SET cancel_requested = 1 WHERE id = ? AND cancel_requested = 0",
                    (task_id,),
                )
                return State.RUNNING
            raise WrongState(task_id, state, "only queued or running tasks can be cancelled")

    def retry(self, task_id: int) -> int:
        with self._write() as conn:
            row = conn.execute("SELECT state, kind, params, retried_as FROM tasks WHERE id = ?",
                               (task_id,)).fetchone()
            if row is None:
                raise TaskNotFound(task_id)
            state = _STATES[row[0]]
            if state not in (State.FAILED, State.CANCELLED):
                raise WrongState(task_id, state, "only failed or cancelled tasks can be retried")
            if row[3] is not None:
                return row[3]  # retried already: a double click queues one task
            (new_id,) = self._add_locked(conn, row[1], json.loads(row[2]), 1, task_id)
            conn.execute("UPDATE tasks SET retried_as = ? WHERE id = ?", (new_id, task_id))
        self._wake_workers(1)
        return new_id

    def clear_history(self) -> int:
        with self._write() as conn:
            forgotten = conn.execute(
                "DELETE FROM tasks WHERE finished_at IS NOT NULL"
            ).rowcount
            conn.execute("UPDATE meta SET version = version + 1")
            return forgotten

    def reset(self) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM tasks WHERE finished_at IS NOT NULL")
            conn.execute("DELETE FROM seconds")
            conn.execute(
                "UPDATE meta SET done = 0, failed = 0, cancelled = 0, restarts = 0, "
                "submitted = queued + running, version = version + 1, sec = NULL, "
                "sec_finished = 0, sec_wait = 0, sec_run = 0"
            )
            conn.execute("UPDATE workers SET done = 0")

    # -- workers ----------------------------------------------------------

    def add_worker(self, name: str, replacement: bool = False) -> None:
        with self._write() as conn:
            self._register(conn)
            self._stopping.discard(name)
            conn.execute(
                "INSERT INTO workers (process, name, pid) VALUES (?, ?, ?) "
                "ON CONFLICT (process, name) DO UPDATE SET alive = 1",
                (self._token, name, self._pid),
            )
            conn.execute(
                "UPDATE meta SET version = version + 1, restarts = restarts + ?",
                (int(replacement),),
            )

    def stop_worker(self, name: str) -> None:
        with self._lock:
            self._stopping.add(name)
            self._work.notify_all()
        with self._write() as conn:
            conn.execute("UPDATE workers SET alive = 0 WHERE process = ? AND name = ?",
                         (self._token, name))
            conn.execute("UPDATE meta SET version = version + 1")

    def worker_exited(self, name: str, error: str | None = None) -> None:
        with self._write() as conn:
            row = conn.execute(
                "SELECT task_id FROM workers WHERE process = ? AND name = ?", (self._token, name)
            ).fetchone()
            conn.execute("UPDATE workers SET alive = 0 WHERE process = ? AND name = ?",
                         (self._token, name))
            if row and row[0] is not None:
                task = conn.execute(
                    f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?", (row[0],)
                ).fetchone()
                if task is not None and task[3] == "running":
                    self._finish_locked(conn, _record(task), State.FAILED,
                                        error or "worker thread exited", None)
            conn.execute("UPDATE meta SET version = version + 1")

    def remove_worker(self, name: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM workers WHERE process = ? AND name = ?",
                         (self._token, name))
            conn.execute("UPDATE meta SET version = version + 1")
        with self._lock:
            self._stopping.discard(name)

    def workers_target(self) -> int | None:
        with self._lock:
            return self._connection().execute("SELECT workers FROM meta").fetchone()[0]

    def set_workers_target(self, count: int) -> None:
        with self._write() as conn:
            conn.execute("UPDATE meta SET workers = ?, version = version + 1", (count,))

    # -- reading ----------------------------------------------------------

    def snapshot(self, recent: int = 20, upcoming: int = 0) -> Snapshot:
        now = time.time()
        alive_since = now - 3 * self.maintain_every
        with self._read() as conn:
            (version, paused, queued, running, done, failed, cancelled, submitted,
             restarts) = conn.execute(
                "SELECT version, paused, queued, running, done, failed, cancelled, submitted, "
                "restarts FROM meta"
            ).fetchone()
            workers = []
            for name, pid, alive, done_count, task_row in self._worker_rows(conn, alive_since):
                task = None if task_row is None else _info(task_row)
                if task is not None and task.state is not State.RUNNING:
                    task = None
                workers.append(WorkerInfo(
                    name, _state(task, bool(alive), bool(paused), self._closed), task,
                    done_count, pid,
                ))
            last = tuple(_info(r) for r in conn.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks WHERE finished_at IS NOT NULL "
                "ORDER BY finished_at DESC, id DESC LIMIT ?", (recent,)))
            next_up = tuple(_info(r) for r in conn.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id >= (SELECT head FROM meta) "
                "AND state = 'queued' ORDER BY id LIMIT ?", (upcoming,))) if upcoming else ()
            # The seconds written so far, and the current one, still in meta.
            buckets = conn.execute(
                "SELECT second, depth, peak, finished, wait_sum, run_sum FROM seconds "
                "WHERE second > ? UNION ALL "
                "SELECT sec, sec_depth, sec_peak, sec_finished, sec_wait, sec_run FROM meta "
                "WHERE sec > ? ORDER BY 1", (int(now) - SERIES_SECONDS,) * 2,
            ).fetchall()
            series = tuple((b[0], b[1], b[2]) for b in buckets)
        since = int(now) - RATE_WINDOW
        measured = rates(now, series[0][0] if series else None,
                         (b[3:] for b in buckets if b[0] > since))
        return Snapshot(
            tag=f"{self._instance}-{version}",
            version=version,
            pid=os.getpid(),
            queued=queued,
            running=running,
            done=done,
            failed=failed,
            cancelled=cancelled,
            submitted=submitted,
            restarts=restarts,
            paused=bool(paused),
            closed=self._closed,
            max_queued=self.max_queued,
            workers=tuple(workers),
            recent=last,
            upcoming=next_up,
            series=series,
            taken_at=now,
            **measured,
        )

    def _worker_rows(self, conn: sqlite3.Connection, alive_since: float) -> Iterator[tuple]:
        """Workers of live processes (this one, and others with a recent heartbeat)."""
        rows = conn.execute(
            "SELECT w.name, w.pid, w.alive, w.done, w.task_id FROM workers w "
            "JOIN processes p ON p.token = w.process "
            "WHERE p.heartbeat_at >= ? OR p.token = ? ORDER BY w.pid, w.name",
            (alive_since, self._token),
        ).fetchall()
        for name, pid, alive, done, task_id in rows:
            task_row = None
            if task_id is not None:
                task_row = conn.execute(
                    f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)
                ).fetchone()
            yield name, pid, alive, done, task_row

    def get(self, task_id: int) -> TaskInfo | None:
        with self._lock:
            row = self._connection().execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()
        return None if row is None else _info(row)

    # -- the whole queue --------------------------------------------------

    def wait_idle(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                queued, running = self._connection().execute(
                    "SELECT queued, running FROM meta"
                ).fetchone()
            if not queued and not running:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.02 if deadline is None else min(0.02, max(0.0, deadline - time.monotonic())))

    def set_paused(self, paused: bool) -> None:
        with self._write() as conn:
            if conn.execute("UPDATE meta SET paused = ?, version = version + 1 WHERE paused != ?",
                            (int(paused), int(paused))).rowcount and not paused:
                with self._lock:
                    self._work.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._work.notify_all()

    def close_nowait(self) -> None:
        self._closed = True

    def drop_queued(self) -> int:
        return 0  # durable: queued work stays for the next start

    def reset_after_fork(self) -> int:
        # The connection is replaced lazily by _connection(); here, only the
        # locks the parent's threads may have held at the fork.
        _abandoned.append(self._conn)
        self._init_process()
        return 0

    # -- upkeep -----------------------------------------------------------

    def _register(self, conn: sqlite3.Connection) -> None:
        now = time.time()
        conn.execute(
            "INSERT INTO processes (token, pid, host, started_at, heartbeat_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (token) DO UPDATE SET heartbeat_at = ?",
            (self._token, self._pid, socket.gethostname(), now, now, now),
        )
        self._registered = True

    def maintain(self) -> None:
        now = time.time()
        with self._write() as conn:
            self._register(conn)
            conn.execute(
                "UPDATE tasks SET lease_until = ? WHERE state = 'running' AND process = ?",
                (now + self.lease_time, self._token),
            )
            self._requeue_expired(conn, now)
            dead = now - 3 * self.maintain_every - self.lease_time
            gone = conn.execute(
                "DELETE FROM processes WHERE heartbeat_at < ? RETURNING token", (dead,)
            ).fetchall()
            if gone:
                conn.executemany("DELETE FROM workers WHERE process = ?", gone)
                conn.execute("UPDATE meta SET version = version + 1")
            conn.execute("DELETE FROM seconds WHERE second < ?", (int(now) - SERIES_SECONDS,))
        self.prune()

    def _requeue_expired(self, conn: sqlite3.Connection, now: float) -> None:
        """Tasks whose process stopped renewing their lease: run again, or give up."""
        expired = conn.execute(
            "SELECT id, attempts, pid FROM tasks WHERE state = 'running' AND lease_until < ?",
            (now,),
        ).fetchall()
        for task_id, attempts, pid in expired:
            if attempts < self.max_attempts:
                conn.execute(
                    "UPDATE tasks SET state = 'queued', started_at = NULL, worker = NULL, "
                    "process = NULL, lease_until = NULL, progress = 0, message = ? WHERE id = ?",
                    (f"queued again: process {pid} stopped during attempt {attempts}", task_id),
                )
                logger.warning("task %d: process %s stopped while running it; queued again "
                               "(attempt %d of %d)", task_id, pid, attempts, self.max_attempts)
            else:
                conn.execute(
                    "UPDATE tasks SET state = 'failed', finished_at = ?, lease_until = NULL, "
                    "error = ? WHERE id = ?",
                    (now, f"gave up after {attempts} attempts: the process running it stopped "
                          f"each time (last: pid {pid})", task_id),
                )
                logger.error("task %d: failed after %d attempts, each cut off by its process "
                             "stopping", task_id, attempts)

    def _prune_batch(self, batch: int = 500) -> int:
        """Forget up to ``batch`` of the oldest finished tasks beyond ``history`` or
        older than ``retention``, in one short transaction; return how many."""
        now = time.time()
        with self._write() as conn:
            kept = conn.execute(
                "SELECT count(*) FROM tasks WHERE finished_at IS NOT NULL"
            ).fetchone()[0]
            excess = min(batch, max(0, kept - self.history_size))
            removed = 0
            if excess:
                removed += conn.execute(
                    "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE finished_at IS "
                    "NOT NULL ORDER BY finished_at LIMIT ?)", (excess,)
                ).rowcount
            if removed < batch:
                removed += conn.execute(
                    "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE finished_at < ? "
                    "ORDER BY finished_at LIMIT ?)", (now - self.retention, batch - removed)
                ).rowcount
            if removed:
                conn.execute("UPDATE meta SET version = version + 1")
            return removed

    def prune(self, batch: int = 500) -> int:
        """Prune the history down to its bounds, ``batch`` rows per transaction.

        Each batch is a transaction of its own, so submits from other threads
        and processes get the write lock between batches and never wait long.
        """
        total = 0
        while True:
            removed = self._prune_batch(batch)
            total += removed
            if removed < batch:
                return total

    def release(self, records: list[TaskRecord]) -> int:
        released = 0
        with self._write() as conn:
            for record in records:
                if conn.execute(
                    "UPDATE tasks SET state = 'queued', started_at = NULL, worker = NULL, "
                    "process = NULL, lease_until = NULL, progress = 0, message = ? "
                    "WHERE id = ? AND state = 'running' AND process = ?",
                    ("queued again: its process stopped before it finished", record.id,
                     self._token),
                ).rowcount:
                    released += 1
        return released

    def detach(self) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM workers WHERE process = ?", (self._token,))
            conn.execute("DELETE FROM processes WHERE token = ?", (self._token,))
            conn.execute("UPDATE meta SET version = version + 1")


def _statements(script: str) -> Iterator[str]:
    """Split a script into statements (triggers hold ``;`` of their own)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                yield pending
            pending = ""


# Connections inherited through a fork: never used or closed in the child.
_abandoned: list[sqlite3.Connection | None] = []


def _state(task: TaskInfo | None, alive: bool, paused: bool, closed: bool) -> str:
    if task is not None:
        return "stopping" if closed or not alive else "running"
    if not alive:
        return "stopped"
    return "paused" if paused else "idle"


def _explain(path: str, exc: sqlite3.Error) -> str:
    text = str(exc)
    if "not a database" in text or "malformed" in text or "file is encrypted" in text:
        return (f"{path} is not a usable SQLite database ({text}): it is corrupt or some other "
                "kind of file. Point QUEUE_URL at another file. Nothing was changed.")
    if "readonly" in text or "read-only" in text or "unable to open" in text:
        return (f"cannot write the queue database {path} ({text}): the file and its directory "
                "must be writable (SQLite adds -wal and -shm files beside it).")
    if "locked" in text or "busy" in text:
        return f"the queue database {path} stayed locked by another process ({text})"
    return f"cannot use the queue database {path}: {text}"


__all__ = ["SqliteStore", "StoreError", "SCHEMA_VERSION"]
