"""A durable store in one SQLite file, shared by every process on one machine.

Queued work survives a restart, and several server processes see one queue:
a task is claimed atomically (one ``UPDATE ... RETURNING`` in an immediate
transaction), so two workers in two processes never take the same one.

Delivery is **at least once**. A running task belongs to the process that
claimed it for as long as that process runs: while it runs the task it
renews a lease on the machine's shared clock (:mod:`dashboard.local.clock`, which
no wall-clock step moves), and any other process can tell from ``/proc``
whether it still runs. When it is gone (``kill -9``, a crash, a reboot) its
tasks are queued again at once; when nobody can tell (a process in another
container sharing the file), once its lease has run out. After
``max_attempts`` starts a task is failed with a message saying so. A task
may therefore run more than once when its process dies under it: make tasks
idempotent, or check in the task whether its work was already done.

A file that is busy for longer than the busy timeout (another process, a
backup, ``sqlite3`` in a shell holding the write lock) never costs a task
its outcome: requests are refused with :class:`StoreUnavailable` (a 503),
reads go on (WAL lets readers through, and reads never wait for this
process's writer), and the end of a task, its progress and the bookkeeping
of its worker are kept in memory and written by a keeper thread as soon as
the file lets them.

Each process opens its own connections, lazily, in the process that uses
them (so nothing crosses a fork): one writer, guarded by a lock, and one
reader per thread. The file must be on a local disk: SQLite's locking is not
reliable on network file systems.

This module imports nothing from Flask.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, NamedTuple
from urllib.parse import quote

from .clock import ALIVE, BOOT_ID, DEAD, Identity, clock, identity, process_alive
from ..errors import BulkStopped, QueueClosed, QueueFull, StoreError, StoreUnavailable, TaskNotFound, WrongState
from ..records import (CANNOT_CANCEL, CANNOT_RETRY, FINISHED_STATES, RETRYABLE_STATES,
                       SERIES_SECONDS, KindHealth, KindStats, Metrics, Retried, ScheduleState,
                       Snapshot, State, Submitted, TaskFilter, TaskInfo, TaskRecord, WorkerInfo,
                       WorkerState, percentile, progress_changed)
from .schema import (FINISHED_SQL, HEALTH_BUCKETS, HEALTH_SQL, INSERT, INSERT_SCHEDULED,
                     KIND_COLUMNS, RESET_KINDS, SCHEMA, SCHEMA_VERSION, STATES, T_COLUMNS,
                     TASK_COLUMNS, UPGRADE_FROM_1, UPGRADE_FROM_2, UPGRADE_FROM_3,
                     UPGRADE_FROM_4, UPGRADE_FROM_5, WAITING_BY_KIND, WINDOW_MINUTES,
                     kind_stats, statements, task_info, task_record)
from .store import MAX_ERRORS, RATE_WINDOW, Run, Store, keep_line, rates

logger = logging.getLogger("dashboard.sqlite")

#: How long a running task's lease lasts, by default; renewed every third of it.
LEASE_TIME = 30.0

#: Seconds the keeper waits before writing progress, so that a task reporting
#: often costs one write for several reports.
PROGRESS_DELAY = 0.1

_PARAMS_TEXT = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def params_text(params: dict[str, Any]) -> str:
    """A task's params as the tasks table keeps them: the text a search looks in, the
    same as :func:`dashboard.records.params_text` makes (keys sorted, no spaces, other
    scripts as they are, so a search for "Zürich" finds it). A lone surrogate (a JSON
    request can carry one), which no UTF-8 text holds, is kept as JSON escapes it."""
    text = _PARAMS_TEXT(params)
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:  # (only inside a JSON string: written as JSON escapes it)
            return text.encode("utf-8", "backslashreplace").decode()
    return text


_FINISHED = frozenset(s.value for s in FINISHED_STATES)

#: Each kind's tasks queued and running now, read where the queue finds them: the two
#: lanes of the queue (see SqliteStore._claim_locked) and tasks_running.
NOW_BY_KIND = """
SELECT kind, sum(state = 'queued'), sum(state = 'running') FROM (
    SELECT kind, state FROM tasks WHERE id >= (SELECT head FROM meta) AND state = 'queued'
        AND due_clock IS NULL
    UNION ALL
    SELECT kind, state FROM tasks INDEXED BY tasks_late WHERE state = 'queued'
        AND due_clock IS NOT NULL
    UNION ALL
    SELECT kind, state FROM tasks INDEXED BY tasks_running WHERE state = 'running')
GROUP BY kind"""
#: Ids per statement when a batch names tasks by id.
_IDS_PER_STATEMENT = 500


def _lanes(query: TaskFilter) -> list[tuple[str, str, list[Any]]]:
    """Where the tasks of each state the filter asks for are found, in order:
    ``(source, condition, arguments)``, each a walk in id order (see :func:`find_sql`).
    Empty: no state and no kind asked for (the table itself, by id)."""
    if not query.states and query.kind is None:
        return []
    kind, kind_args = ("kind = ? AND ", [query.kind]) if query.kind is not None else ("", [])
    lanes = []
    for state in sorted(s.value for s in (query.states or State)):
        if state in _FINISHED:
            index = "tasks_kind" if query.kind is not None else "tasks_state"
            lanes.append((f"tasks INDEXED BY {index}",
                          f"{kind}state = ? AND {FINISHED_SQL}", [*kind_args, state]))
        elif state == "running":
            lanes.append(("tasks INDEXED BY tasks_running", f"{kind}state = 'running'",
                          kind_args))
        elif state == "queued":  # the queue's two lanes (see SqliteStore._claim_locked)
            lanes.append(("tasks", f"{kind}id >= (SELECT head FROM meta) AND state = 'queued' "
                          "AND due_clock IS NULL", kind_args))
            lanes.append(("tasks INDEXED BY tasks_late", f"{kind}state = 'queued' "
                          "AND due_clock IS NOT NULL", kind_args))
        else:
            lanes.append(("tasks INDEXED BY tasks_due", f"{kind}state = 'scheduled'",
                          kind_args))
    return lanes


def _other_terms(query: TaskFilter) -> tuple[str, list[Any]]:
    """The filter's conditions besides state and kind, as SQL (`` AND ...``)."""
    terms, args = "", []
    if query.not_retried:
        terms += " AND retried_as IS NULL"
    needles = query.needles()
    if needles:
        terms += " AND (" + " OR ".join(
            r"params LIKE ? ESCAPE '\' OR error LIKE ? ESCAPE '\'" for _ in needles) + ")"
        for needle in needles:
            pattern = "%" + re.sub(r"([\\%_])", r"\\\1", needle) + "%"
            args += [pattern, pattern]
    return terms, args


def find_sql(query: TaskFilter, limit: int, after: int | None,
             ascending: bool) -> list[tuple[str, list[Any]]]:
    """The statements of one keyset page of :meth:`SqliteStore.find`, with their arguments.

    No state and no kind asked for: one statement, a walk along the table by id from
    the page's first id. Otherwise one statement per state asked for (every state, for
    a kind alone), each giving at most ``limit`` ids, which :meth:`SqliteStore.find`
    merges before it reads the page's rows. A finished state (the history, where the
    hundreds of thousands are) is a seek on ``tasks_state`` (or ``tasks_kind``) to the
    page's first id and a walk along it in id order; a running task is on
    ``tasks_running``, in id order too. None of these sorts anything: a deep page costs
    what the first does. The tasks waiting are where the queue finds them: those queued
    as submitted from meta's head on, by id; those queued when due (on tasks_late) and
    those scheduled (on tasks_due), by due time, so their ids are sorted, at most
    QUEUE_MAX_QUEUED of each. A text search reads the rows the other filters leave (no
    index can help there).

    Text is looked for with ``LIKE`` (``%``, ``_`` and ``\\`` escaped: they mean
    themselves), which ignores the case of ASCII letters only: "zürich" finds
    "Zürich", but "ZÜRICH" does not (the memory store folds every script)."""
    order = "ASC" if ascending else "DESC"
    rest, rest_args = _other_terms(query)
    bound, bound_args = "", []
    if after is not None:
        bound, bound_args = (" AND id > ?" if ascending else " AND id < ?"), [after]
    lanes = _lanes(query)
    if not lanes:
        where = f"WHERE 1{bound}{rest} " if bound or rest else ""
        return [(f"SELECT {TASK_COLUMNS} FROM tasks {where}ORDER BY id {order} LIMIT ?",
                 [*bound_args, *rest_args, limit])]
    columns = TASK_COLUMNS if len(lanes) == 1 else "id"
    return [(f"SELECT {columns} FROM {source} WHERE {condition}{bound}{rest} "
             f"ORDER BY id {order} LIMIT ?", [*args, *bound_args, *rest_args, limit])
            for source, condition, args in lanes]


def count_sql(query: TaskFilter) -> tuple[str, list[Any]]:
    """:func:`find_sql`'s filter, counted: on the same lanes, every match read once."""
    rest, rest_args = _other_terms(query)
    lanes = _lanes(query)
    if not lanes and not rest:  # every task: meta's counts say it
        return "SELECT kept + queued + running + scheduled FROM meta", []
    if not lanes:
        return f"SELECT count(*) FROM tasks WHERE 1{rest}", rest_args
    every: list[Any] = []
    for _source, _condition, args in lanes:
        every += [*args, *rest_args]
    return ("SELECT " + " + ".join(f"(SELECT count(*) FROM {source} WHERE {condition}{rest})"
                                   for source, condition, _ in lanes), every)


def _refusal(path: str, exc: sqlite3.Error) -> StoreError:
    error = StoreError(_explain(path, exc))
    text = str(exc)
    error.busy = "locked" in text or "busy" in text
    return error


class _Outcome(NamedTuple):
    """How a task ended, kept until it is written."""

    record: TaskRecord
    state: State
    error: str | None
    traceback: str | None
    finished_at: float  # wall clock
    finished_clock: float


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class SqliteStore(Store):
    """Tasks, counters, workers and the per-second record in one SQLite file.

    ``path`` is created if missing (the directory must exist and be
    writable). ``history`` finished tasks are kept, and none older than
    ``retention`` seconds; older ones are pruned in small batches.

    With ``check`` (the default) the file is opened, checked, created or
    upgraded here, and a file that cannot be used raises :class:`StoreError`.
    Without it nothing is read or written until the store is used, and the
    file is never created: for a process started after the file was checked
    (a server's worker forked from a master that checked it), which must
    start even if the file is busy or gone for a moment.
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
        self._instance: str | None = None
        # The file's identity when first opened, and why it can be used no
        # more: facts about the file, so a forked child keeps them.
        self._file: tuple[int, int] | None = None
        self._file_checked = 0.0
        self._lost: str | None = None
        self._init_process()
        if not check:
            return
        # Check (or create) the file now, so a bad file fails at start, then
        # close: each process opens its own connections when it first needs them.
        # Processes that start together (uWSGI workers building the app each)
        # may create a new file at the same moment, and SQLite then answers
        # "locked" at once, without waiting, to one of them: try again, for
        # as long as the busy timeout would have waited.
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                conn = self._open(create=True, check_first=True)
                try:
                    self._instance = self._check_schema(conn)
                finally:
                    conn.close()
                return
            except StoreError as exc:
                if not exc.busy or time.monotonic() >= deadline:
                    raise
            time.sleep(0.05)

    def _init_process(self) -> None:
        self._pid = os.getpid()
        self._me = identity()
        self._token = f"{socket.gethostname()}:{self._pid}:{secrets.token_hex(3)}"
        self._write_lock = threading.Lock()  # this process's one writer
        self._state = threading.Lock()  # _mine, _pending, _keeper, _stopping
        self._work = threading.Condition(threading.Lock())  # idle workers wait here
        self._writer: sqlite3.Connection | None = None
        self._readers = threading.local()
        self._closed = False
        self._stopping: set[str] = set()
        self._waiting = 0
        # Tasks claimed here whose end is not written yet, by id: their leases
        # are renewed for as long as they are here, whatever else happens.
        self._mine: dict[int, TaskRecord] = {}
        # Writes that must land (a task's end, a worker's exit), oldest first,
        # with the ids of the tasks whose end they write.
        self._pending: list[tuple[str, Callable[[sqlite3.Connection, float], Any],
                                  tuple[int, ...]]] = []
        self._dirty = False  # progress waiting to be written
        self._keeper: threading.Thread | None = None
        self._keeper_wake = threading.Event()
        self._said: dict[str, float] = {}

    # -- connections -------------------------------------------------------

    def _open(self, create: bool = False, check_first: bool = False) -> sqlite3.Connection:
        directory = os.path.dirname(self.path) or "."
        if os.path.isdir(self.path):
            raise StoreError(f"cannot use the queue database {self.path}: it is a directory; "
                             "QUEUE_URL must name a file")
        if not os.path.isdir(directory):
            raise StoreError(f"cannot open the queue database {self.path}: "
                             f"the directory {directory} does not exist")
        # Only the first check may create the file: a process that finds it
        # gone later must say so, not start an empty queue beside the old one.
        uri = f"file:{quote(self.path)}?mode={'rwc' if create else 'rw'}"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout,
                                   isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            if not create and not os.path.exists(self.path):
                raise StoreError(f"the queue database {self.path} is gone (deleted while "
                                 "in use?)") from None
            raise _refusal(self.path, exc) from None
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
            raise _refusal(self.path, exc) from None
        except BaseException:
            conn.close()
            raise
        if self._file is None:
            self._file = _file_id(self.path)
        return conn

    def _refuse_foreign(self, conn: sqlite3.Connection) -> None:
        """Refuse, reading only, a file of a newer schema or of something else."""
        # One statement, so one read: another process creating the schema
        # between two reads (version 0, then its tables) made a new file look
        # like someone else's.
        version, tables = conn.execute(
            "SELECT (SELECT user_version FROM pragma_user_version), "
            "(SELECT count(*) FROM sqlite_master)"
        ).fetchone()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the queue database {self.path} has schema version {version}, newer than "
                f"this code knows ({SCHEMA_VERSION}): it was written by a newer release. "
                "Upgrade this code, or point QUEUE_URL at another file. Nothing was changed."
            )
        if version == 0 and tables:
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
            if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    # Another process may have done it while we waited for the lock.
                    version = conn.execute("PRAGMA user_version").fetchone()[0]
                    if version == 0:
                        for statement in statements(SCHEMA):
                            conn.execute(statement)
                        conn.execute("INSERT INTO meta (id, instance) VALUES (1, ?)",
                                     (secrets.token_hex(4),))
                        logger.info("created the queue database %s", self.path)
                    else:
                        if version == 1:
                            self._upgrade_from_1(conn)
                        if version <= 2:
                            for statement in statements(UPGRADE_FROM_2):
                                conn.execute(statement)
                        if version <= 3:
                            for statement in statements(UPGRADE_FROM_3):
                                conn.execute(statement)
                        if version <= 4:
                            for statement in statements(UPGRADE_FROM_4):
                                conn.execute(statement)
                        if version <= 5:
                            for statement in statements(UPGRADE_FROM_5):
                                conn.execute(statement)
                            self._upgrade_params_from_5(conn)
                        logger.info("upgraded the queue database %s from schema %d to %d",
                                    self.path, version, SCHEMA_VERSION)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            if conn.execute("SELECT max_queued != ? OR boot IS NOT ? FROM meta",
                            (self.max_queued, BOOT_ID)).fetchone()[0]:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.execute("UPDATE meta SET max_queued = ?", (self.max_queued,))
                    self._adopt_boot(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            return conn.execute("SELECT instance FROM meta").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise _refusal(self.path, exc) from None

    def _upgrade_from_1(self, conn: sqlite3.Connection) -> None:
        """Schema 1 → 2, in the caller's transaction: the times that are compared
        move from the wall clock to the shared one; who uses the file starts afresh."""
        live = conn.execute(
            "SELECT pid FROM processes WHERE heartbeat_at > ?", (time.time() - 2 * LEASE_TIME,)
        ).fetchall()
        others = sorted({pid for (pid,) in live if pid != self._pid})
        if others:
            raise StoreError(
                f"the queue database {self.path} is in use by an older release (pids "
                f"{', '.join(map(str, others))}): stop every process using it, then start "
                "this one, which upgrades the file. Nothing was changed."
            )
        for statement in statements(UPGRADE_FROM_1):
            conn.execute(statement)
        # Everything measured on the clock starts again with this boot.
        conn.execute("UPDATE meta SET boot = NULL")
        logger.info("upgraded the queue database %s to schema %d", self.path, SCHEMA_VERSION)

    @staticmethod
    def _upgrade_params_from_5(conn: sqlite3.Connection, chunk: int = 10_000) -> None:
        """Schema 5 → 6, in the caller's transaction: params kept as json.dumps wrote
        them (``{"a": 1}``, other scripts escaped) become the text a search looks in
        (:func:`params_text`), so one search finds old and new tasks alike."""
        last = 0
        while True:
            rows = conn.execute("SELECT id, params FROM tasks WHERE id > ? ORDER BY id LIMIT ?",
                                (last, chunk)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            changed = []
            for task_id, text in rows:
                try:
                    new = params_text(json.loads(text))
                except ValueError:
                    continue  # not JSON (never written so): left as it is
                if new != text:
                    changed.append((new, task_id))
            conn.executemany("UPDATE tasks SET params = ? WHERE id = ?", changed)

    def _adopt_boot(self, conn: sqlite3.Connection) -> None:
        """After a reboot (or an upgrade) the clock values in the file count from
        another boot: restate them on ours, in the caller's transaction."""
        (boot,) = conn.execute("SELECT boot FROM meta").fetchone()
        if boot == BOOT_ID:
            return
        now, wall = clock(), time.time()
        conn.execute("DELETE FROM seconds")
        conn.execute(
            "UPDATE meta SET boot = ?, last_claim = NULL, sec = NULL, sec_finished = 0, "
            "sec_wait = 0, sec_run = 0, version = version + 1", (BOOT_ID,))
        # Waiting times go on from the wall clock's reading; leases of the old
        # boot's processes are over (those processes are gone).
        conn.execute(
            "UPDATE tasks SET queued_clock = ? - max(0, ? - enqueued_at), "
            "started_clock = CASE WHEN started_at IS NULL THEN NULL "
            "ELSE ? - max(0, ? - started_at) END, lease_until = 0 "
            "WHERE state IN ('queued', 'running')", (now, wall, now, wall))
        # Delayed tasks (waiting, or queued when due in their own lane) are due when
        # they were, on the wall clock: restated on ours, in the same order.
        conn.execute("UPDATE tasks SET due_clock = ? + (due_at - ?) "
                     "WHERE state IN ('scheduled', 'queued') AND due_clock IS NOT NULL "
                     "AND due_at IS NOT NULL", (now, wall))
        if boot is not None:
            logger.info("the queue database %s was last used before a reboot: leases of "
                        "that boot are over", self.path)

    def _writer_conn(self) -> sqlite3.Connection:
        """This process's writer (under the write lock)."""
        if self._pid != os.getpid():
            self._after_fork()
        self._check_file()
        if self._writer is None:
            try:
                conn = self._open()
            except StoreError as exc:
                raise StoreUnavailable(str(exc)) from None
            try:
                if self._instance is None:
                    self._instance = conn.execute("SELECT instance FROM meta").fetchone()[0]
                if conn.execute("SELECT boot IS NOT ? FROM meta", (BOOT_ID,)).fetchone()[0]:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        self._adopt_boot(conn)
                        conn.execute("COMMIT")
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise
            except sqlite3.Error as exc:
                conn.close()
                raise self._unavailable(exc) from None
            self._writer = conn
        return self._writer

    def _reader(self) -> sqlite3.Connection:
        """This thread's reader: reads never wait for this process's writer."""
        if self._pid != os.getpid():
            self._after_fork()
        self._check_file()
        local = self._readers
        conn = getattr(local, "conn", None)
        if conn is None:
            try:
                conn = self._open()
            except StoreError as exc:
                raise StoreUnavailable(str(exc)) from None
            local.conn = conn
            if self._instance is None:
                try:
                    self._instance = conn.execute("SELECT instance FROM meta").fetchone()[0]
                except sqlite3.Error as exc:
                    raise self._reader_failed(exc) from None
        return conn

    def _reader_failed(self, exc: sqlite3.Error) -> StoreUnavailable:
        # Open anew next time: the file may have been repaired or replaced.
        conn = getattr(self._readers, "conn", None)
        self._readers.conn = None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        return self._unavailable(exc)

    def _after_fork(self) -> None:
        # A forked child: the parent's connections must not be used (nor
        # closed) here, nor its claims held. Start this process's own state.
        _abandoned.append(self._writer)
        _abandoned.append(getattr(self._readers, "conn", None))
        self._init_process()

    def _file_due(self) -> bool:
        """Is the file's identity due to be checked (at most once a second)?"""
        return self._lost is not None or time.monotonic() - self._file_checked >= 1.0

    def _check_file(self) -> None:
        """Refuse to go on with a file that was deleted or replaced while in use."""
        if self._lost is not None:
            raise StoreUnavailable(self._lost, retry_after=30)
        if self._file is None:
            return
        now = time.monotonic()
        if now - self._file_checked < 1.0:
            return
        self._file_checked = now
        if _file_id(self.path) != self._file:
            self._lost = (f"the queue database {self.path} was deleted or replaced while this "
                          "process used it; it takes no more work: restart it")
            logger.error("%s (pid %d)", self._lost, self._pid)
            self._work_notify_all()
            raise StoreUnavailable(self._lost, retry_after=30)

    def _unavailable(self, exc: sqlite3.Error) -> StoreUnavailable:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return StoreUnavailable(f"the queue database is locked by another process ({text})")
        return StoreUnavailable(f"the queue database {self.path} cannot be used now ({text})")

    @contextmanager
    def _write(self, wait: float | None = None) -> Iterator[tuple[sqlite3.Connection, float]]:
        """One immediate transaction on this process's writer, and the shared
        clock read inside it (so times are in commit order across processes).

        Waits up to ``wait`` (the busy timeout) for the lock, then raises
        :class:`StoreUnavailable`; nothing of the transaction stays.
        """
        wait = self.busy_timeout if wait is None else wait
        if not self._write_lock.acquire(timeout=wait):
            raise StoreUnavailable("the queue database is busy: this process's writes "
                                   f"waited {wait:g}s for it")
        try:
            conn = self._writer_conn()
            short = wait != self.busy_timeout
            try:
                if short:
                    conn.execute(f"PRAGMA busy_timeout = {int(wait * 1000)}")
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._unavailable(exc) from None
            finally:
                if short:
                    try:
                        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                    except sqlite3.Error:
                        pass
            now = clock()
            try:
                # What this process owes the file goes first, in order: a later
                # write (a worker added again, say) must not be undone by an
                # earlier one that lands after it.
                settled = self._write_owed(conn, now) if self._pending else None
                yield conn, now
            except sqlite3.IntegrityError:
                _rollback(conn)
                raise
            except sqlite3.Error as exc:
                _rollback(conn)
                raise self._unavailable(exc) from None
            except BaseException:
                _rollback(conn)
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                raise self._unavailable(exc) from None
        finally:
            self._write_lock.release()
        if settled:
            self._settle_owed(*settled)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._reader()
        try:
            conn.execute("BEGIN")  # one snapshot of the file for every read inside
            try:
                yield conn
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._reader_failed(exc) from None

    def _read_one(self, sql: str, args: tuple = ()) -> tuple | None:
        conn = self._reader()
        try:
            return conn.execute(sql, args).fetchone()
        except sqlite3.Error as exc:
            raise self._reader_failed(exc) from None

    def _say(self, key: str, level: int, message: str, *args: Any) -> None:
        """Log ``message`` at most once every 30 s per ``key``: a busy file must
        not fill the log with the same line from every worker, every poll."""
        now = time.monotonic()
        if now - self._said.get(key, -1e9) >= 30.0:
            self._said[key] = now
            logger.log(level, message, *args)

    # -- helpers inside a write transaction ---------------------------------

    def _add_locked(self, conn: sqlite3.Connection, now: float, kind: str,
                    params: dict[str, Any], count: int,
                    retry_of: int | None = None, delay: float | None = None,
                    time_limit: float | None = None) -> list[int]:
        if self._closed:
            raise QueueClosed()
        wall = time.time()
        text = params_text(params)
        if delay:
            return self._schedule_locked(conn, now, wall, kind, text, count, retry_of, delay,
                                         time_limit)
        try:
            if count == 1:
                return [conn.execute(INSERT, (kind, text, wall, now, retry_of,
                                              time_limit)).lastrowid]
            queued, first = conn.execute("SELECT queued, next_id FROM meta").fetchone()
            if queued + count > self.max_queued:
                raise QueueFull(queued, self.max_queued, count)
            conn.executemany(INSERT, ((kind, text, wall, now, retry_of, time_limit)
                                       for _ in range(count)))
            return list(range(first, first + count))
        except sqlite3.IntegrityError as exc:
            if "queue full" not in str(exc):
                raise
            # The caller's transaction is rolled back: nothing of the batch stays.
            queued = conn.execute("SELECT queued FROM meta").fetchone()[0]
            raise QueueFull(queued, self.max_queued, count) from None

    def _schedule_locked(self, conn: sqlite3.Connection, now: float, wall: float, kind: str,
                         text: str, count: int, retry_of: int | None,
                         delay: float, time_limit: float | None = None) -> list[int]:
        first = conn.execute("SELECT next_id FROM meta").fetchone()[0]
        try:
            conn.executemany(INSERT_SCHEDULED, ((kind, text, wall, retry_of, wall + delay,
                                                 now + delay, time_limit)
                                                for _ in range(count)))
        except sqlite3.IntegrityError as exc:
            if "too many scheduled" not in str(exc):
                raise
            scheduled = conn.execute("SELECT scheduled FROM meta").fetchone()[0]
            raise QueueFull(scheduled, self.max_queued, count, "scheduled") from None
        return list(range(first, first + count))

    @staticmethod
    def _promote_locked(conn: sqlite3.Connection, now: float) -> int:
        """Queue the scheduled tasks now due, as if submitted when they fell due (they
        go in the due-order lane, apart from the id order of the others)."""
        return conn.execute(
            "UPDATE tasks SET state = 'queued', queued_clock = due_clock, clock = ? "
            "WHERE state = 'scheduled' AND due_clock <= ?", (now, now)).rowcount

    def _claim_locked(self, conn: sqlite3.Connection, now: float,
                      worker: str | None) -> TaskRecord | None:
        self._promote_locked(conn, now)
        # Two lanes, the older first: tasks queued as submitted (by id, from meta's
        # head), and delayed tasks queued when due (by due time, on their index).
        row = conn.execute(
            f"UPDATE tasks SET state = 'running', started_at = ?, started_clock = ?, clock = ?, "
            f"worker = ?, process = ?, pid = ?, lease_until = ?, attempts = attempts + 1 "
            f"WHERE id = (SELECT id FROM ("
            f"SELECT * FROM (SELECT id, queued_clock AS c FROM tasks WHERE id >= "
            f"(SELECT head FROM meta) AND state = 'queued' AND due_clock IS NULL "
            f"ORDER BY id LIMIT 1) UNION ALL "
            f"SELECT * FROM (SELECT id, due_clock AS c FROM tasks WHERE state = 'queued' "
            f"AND due_clock IS NOT NULL ORDER BY due_clock LIMIT 1)) ORDER BY c, id LIMIT 1) "
            f"AND (SELECT paused FROM meta) = 0 RETURNING {TASK_COLUMNS}",
            (time.time(), now, now, worker, self._token, self._pid, now + self.lease_time),
        ).fetchone()
        if row is None:
            return None
        if worker is not None:
            conn.execute("UPDATE workers SET task_id = ? WHERE process = ? AND name = ?",
                         (row[0], self._token, worker))
        record = task_record(row)
        # Held from inside the transaction: upkeep in another thread must never
        # see a task running under our token that we do not hold.
        with self._state:
            self._mine[record.id] = record
            self._ensure_keeper()
        return record

    def _finish_locked(self, conn: sqlite3.Connection, now: float, outcome: _Outcome) -> bool:
        record = outcome.record
        if outcome.state is State.SCHEDULED:
            changed = self._retry_later_locked(conn, now, outcome)
        else:
            changed = self._end_locked(conn, now, outcome)
        if record.worker is not None:
            conn.execute(
                "UPDATE workers SET task_id = NULL, done = done + ? "
                "WHERE process = ? AND name = ? AND task_id = ?",
                (changed if outcome.state is not State.SCHEDULED else 0, self._token,
                 record.worker, record.id),
            )
        if not changed:
            # Our claim ended (the process was taken for dead, or the lease
            # ran out) and another process took the task back; its outcome
            # there is the one that counts.
            logger.warning("task %d: lease lost while it ran here; this result is not kept",
                           record.id)
            return False
        return True

    def _retry_later_locked(self, conn: sqlite3.Connection, now: float,
                            outcome: _Outcome) -> int:
        """The attempt failed and is tried again in ``record.retry_in`` seconds: the
        task is scheduled again, the error kept with those of its earlier attempts."""
        record, wall = outcome.record, time.time()
        record.errors = [*record.errors[-(MAX_ERRORS - 1):],
                         {"attempt": record.attempts, "error": outcome.error, "at": wall}]
        return conn.execute(
            "UPDATE tasks SET state = 'scheduled', due_at = ?, due_clock = ?, clock = ?, "
            "error = ?, traceback = ?, errors = ?, lease_until = NULL, process = NULL, "
            "pid = NULL, worker = NULL, progress = 0, message = NULL, logs = ?, "
            "logs_dropped = ? "
            "WHERE id = ? AND state = 'running' AND process = ? AND attempts = ?",
            (wall + record.retry_in, now + record.retry_in, now, outcome.error,
             outcome.traceback, json.dumps(record.errors),
             json.dumps(record.logs) if record.logs else None, record.logs_dropped,
             record.id, self._token, record.attempts),
        ).rowcount

    def _end_locked(self, conn: sqlite3.Connection, now: float, outcome: _Outcome) -> int:
        record = outcome.record
        return conn.execute(
            "UPDATE tasks SET state = ?, finished_at = ?, finished_clock = ?, clock = ?, "
            "error = ?, traceback = ?, lease_until = NULL, "
            "progress = CASE WHEN ? THEN 1.0 ELSE ? END, message = ?, result = ?, logs = ?, "
            "logs_dropped = ? "
            "WHERE id = ? AND state = 'running' AND process = ? AND attempts = ?",
            (outcome.state.value, outcome.finished_at, outcome.finished_clock, now,
             outcome.error, outcome.traceback, outcome.state is State.DONE, record.progress,
             record.message, record.result, json.dumps(record.logs) if record.logs else None,
             record.logs_dropped, record.id, self._token, record.attempts),
        ).rowcount

    def _settle(self, record: TaskRecord, state: State, finished_at: float) -> None:
        """The task's end (or its retry later) is written: stop holding it."""
        record.state = state
        record.finished_at = None if state is State.SCHEDULED else finished_at
        with self._state:
            if self._mine.get(record.id) is record:
                del self._mine[record.id]

    def _give_back(self, conn: sqlite3.Connection, now: float, task_id: int, attempts: int,
                   pid: int | None, cancel_requested: bool, why: str, note: str) -> None:
        """A running task whose run here or elsewhere is over without an end:
        cancelled if that was asked, queued again, or failed after its last attempt.

        ``why`` is for the log ("process 12 stopped while running it"), ``note``
        for the task's own message ("process 12 stopped").
        """
        conn.execute("UPDATE workers SET task_id = NULL WHERE task_id = ?", (task_id,))
        if cancel_requested:
            conn.execute(
                "UPDATE tasks SET state = 'cancelled', finished_at = ?, finished_clock = ?, "
                "clock = ?, lease_until = NULL, error = ? WHERE id = ?",
                (time.time(), now, now, f"cancelled: {note} before it could stop", task_id),
            )
            logger.warning("task %d: %s; it was asked to stop, so it is cancelled, not queued "
                           "again", task_id, why)
        elif attempts < self.max_attempts:
            conn.execute(
                "UPDATE tasks SET state = 'queued', started_at = NULL, started_clock = NULL, "
                "clock = ?, worker = NULL, process = NULL, lease_until = NULL, progress = 0, "
                "message = ? WHERE id = ?",
                (now, f"queued again: {note} during attempt {attempts}", task_id),
            )
            logger.warning("task %d: %s; queued again (attempt %d of %d)", task_id, why,
                           attempts, self.max_attempts)
        else:
            conn.execute(
                "UPDATE tasks SET state = 'failed', finished_at = ?, finished_clock = ?, "
                "clock = ?, lease_until = NULL, error = ? WHERE id = ?",
                (time.time(), now, now, f"gave up after {attempts} attempts: the process "
                 f"running it stopped each time (last: pid {pid})", task_id),
            )
            logger.error("task %d: failed after %d attempts, each cut off by its process "
                         "stopping", task_id, attempts)

    # -- the keeper: leases, progress and writes that must land -----------

    def _ensure_keeper(self) -> None:
        """Start the keeper if it is not running (call with ``_state`` held)."""
        if self._keeper is None or not self._keeper.is_alive():
            self._keeper = threading.Thread(
                target=self._keep, name=f"dashboard-sqlite-keeper-{self._pid}", daemon=True)
            self._keeper.start()

    def _keep(self) -> None:
        """Runs while this process holds tasks or owes writes, whatever else it
        does (stopping included): renews the leases of the tasks it runs, writes
        their progress, and writes what could not be written, until it lands."""
        renew_every = self.lease_time / 3
        next_renewal = time.monotonic() + renew_every
        retry = self.poll_interval
        while True:
            with self._state:
                if not self._mine and not self._pending:
                    self._keeper = None
                    return
                owing = bool(self._pending)
                dirty = self._dirty
            now = time.monotonic()
            timeout = max(0.0, next_renewal - now)
            if owing:
                timeout = min(timeout, retry)
            if dirty:
                timeout = min(timeout, PROGRESS_DELAY)
            if timeout:
                self._keeper_wake.wait(timeout)
                self._keeper_wake.clear()
            try:
                if self._pending:
                    self._write_pending()
                    retry = self.poll_interval
                if self._dirty:
                    self._write_progress()
                if time.monotonic() >= next_renewal:
                    self._renew()
                    next_renewal = time.monotonic() + renew_every
            except StoreUnavailable as exc:
                retry = min(5.0, retry * 2)
                self._say("keeper", logging.WARNING, "could not write to the queue database "
                          "(%s); trying again", exc.reason)
                if time.monotonic() >= next_renewal:
                    next_renewal = time.monotonic() + retry
            except Exception:  # noqa: BLE001 - the keeper must outlive any one failure
                logger.exception("queue database upkeep failed; trying again")
                retry = min(5.0, retry * 2)

    def _renew(self) -> None:
        """Renew the leases of the tasks held here; let go of the ones taken back."""
        with self._state:
            held = dict(self._mine)
        if not held:
            return
        with self._write(wait=max(0.5, self.lease_time / 3)) as (conn, now):
            ids = list(held)
            owned = set()
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT id, attempts, state FROM tasks WHERE process = ? AND id IN ({marks})",
                    (self._token, *chunk)).fetchall()
                owned.update((i, a) for i, a, s in rows)
                conn.execute(
                    f"UPDATE tasks SET lease_until = ? WHERE process = ? AND state = 'running' "
                    f"AND id IN ({marks})", (now + self.lease_time, self._token, *chunk))
            conn.execute("UPDATE processes SET heartbeat_at = ? WHERE token = ?",
                         (now, self._token))
        for task_id, record in held.items():
            if (task_id, record.attempts) not in owned:
                record.lost = True
                record.cancel_requested = True  # ctx.cancelled: stop, it runs elsewhere now
                with self._state:
                    if self._mine.get(task_id) is record:
                        del self._mine[task_id]
                logger.warning("task %d: another process took it back while it ran here "
                               "(its claim ran out); ctx.cancelled is now true and its "
                               "outcome here will not be kept", task_id)

    def _write_progress(self) -> None:
        with self._state:
            self._dirty = False
            dirty = [r for r in self._mine.values() if r.dirty]
            for record in dirty:
                record.dirty = False
        if not dirty:
            return
        try:
            with self._write() as (conn, _now):
                conn.executemany(
                    "UPDATE tasks SET progress = ?, message = ?, logs = ?, logs_dropped = ? "
                    "WHERE id = ? AND state = 'running' AND process = ? AND attempts = ?",
                    [(r.progress, r.message, json.dumps(r.logs) if r.logs else None,
                      r.logs_dropped, r.id, self._token, r.attempts) for r in dirty])
        except BaseException:
            with self._state:
                for record in dirty:
                    record.dirty = True
                self._dirty = True
            raise

    def _owe(self, what: str, write: Callable[[sqlite3.Connection, float], Any],
             exc: StoreUnavailable, tasks: tuple[int, ...] = ()) -> None:
        with self._state:
            self._pending.append((what, write, tasks))
            self._ensure_keeper()
        self._say(f"owe-{what}", logging.WARNING, "%s could not be written (%s); it is kept "
                  "and written as soon as the queue database lets it", what, exc.reason)
        self._keeper_wake.set()

    def _write_owed(self, conn: sqlite3.Connection, now: float) -> tuple[int, list]:
        """Write what is owed, inside the caller's transaction (under the write lock)."""
        with self._state:
            owed = list(self._pending)
        afters = []
        for _what, write, _tasks in owed:
            after = write(conn, now)
            if callable(after):
                afters.append(after)
        return len(owed), afters

    def _settle_owed(self, count: int, afters: list) -> None:
        """The owed writes of a committed transaction landed: forget them."""
        with self._state:
            landed = self._pending[:count]
            del self._pending[:count]
        for after in afters:
            after()
        logger.info("the queue database took what it owed: %s",
                    ", ".join(what for what, _, _ in landed))

    def _write_pending(self) -> None:
        with self._write():
            pass  # the owed writes go first in every transaction

    def _outcome_writer(self, outcome: _Outcome) -> Callable[[sqlite3.Connection, float], Any]:
        def write(conn: sqlite3.Connection, now: float) -> Callable[[], None] | None:
            if self._finish_locked(conn, now, outcome):
                return lambda: self._settle(outcome.record, outcome.state, outcome.finished_at)
            return lambda: self._let_go(outcome.record)
        return write

    def _let_go(self, record: TaskRecord) -> None:
        with self._state:
            if self._mine.get(record.id) is record:
                del self._mine[record.id]

    # -- the store interface ---------------------------------------------

    @property
    def tag(self) -> str:
        row = self._read_one("SELECT version FROM meta")
        return f"{self._instance}-{row[0]}"

    @property
    def identity(self) -> str:
        # The file's own random name, written when it was made: the same for
        # every process using it and across restarts.
        if self._instance is None:
            return self.tag.rsplit("-", 1)[0]
        return self._instance

    @property
    def closed(self) -> bool:
        return self._closed

    def problem(self) -> str | None:
        return self._lost

    def add(self, kind: str, params: dict[str, Any], count: int = 1,
            retry_of: int | None = None, delay: float | None = None,
            time_limit: float | None = None) -> list[int]:
        if self._closed:
            raise QueueClosed()
        with self._write() as (conn, now):
            ids = self._add_locked(conn, now, kind, params, count, retry_of, delay, time_limit)
        if delay:
            self._work_notify_all()  # waiting workers look again when the first is due
        else:
            self._wake_workers(count)
        return ids

    def add_keyed(self, kind: str, params: dict[str, Any], key: str,
                  delay: float | None = None, time_limit: float | None = None) -> Submitted:
        if self._closed:
            raise QueueClosed()
        with self._write() as (conn, now):
            # Writers take the file one at a time (BEGIN IMMEDIATE), so between this
            # read and the insert no other process can queue a task with the key.
            row = conn.execute("SELECT id FROM tasks WHERE key = ? AND finished_at IS NULL",
                               (key,)).fetchone()
            if row is not None:
                return Submitted(row[0], False)
            (task_id,) = self._add_locked(conn, now, kind, params, 1, delay=delay,
                                          time_limit=time_limit)
            conn.execute("UPDATE tasks SET key = ? WHERE id = ?", (key, task_id))
        self._wake_workers(1)
        return Submitted(task_id, True)

    # -- periodic schedules ------------------------------------------------

    def schedule_next(self, name: str, spec: str, first_due: float) -> float:
        row = self._read_one("SELECT spec, next_due FROM schedules WHERE name = ?", (name,))
        if row is not None and row[0] == spec:
            return row[1]
        with self._write() as (conn, _now):
            # Another process may have written it since the read: the first one wins.
            row = conn.execute("SELECT spec, next_due FROM schedules WHERE name = ?",
                               (name,)).fetchone()
            if row is not None and row[0] == spec:
                return row[1]
            conn.execute(
                "INSERT INTO schedules (name, spec, next_due) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, "
                "next_due = excluded.next_due", (name, spec, first_due))
            if row is not None:
                # Due anew: pages show it. (A schedule new to the file shows nothing new:
                # a page listed it with this due time already, and a poll must not
                # find the tag moved under the page it was rendered with.)
                conn.execute("UPDATE meta SET version = version + 1")
        return first_due

    def claim_due(self, name: str, due: float, next_due: float,
                  run: Run | None) -> tuple[float, int | None]:
        if self._closed:
            raise QueueClosed()
        with self._write() as (conn, now):
            row = conn.execute("SELECT next_due FROM schedules WHERE name = ?",
                               (name,)).fetchone()
            if row is None or row[0] != due:
                return (next_due if row is None else row[0]), None
            if run is None:
                conn.execute("UPDATE schedules SET next_due = ? WHERE name = ?",
                             (next_due, name))
                conn.execute("UPDATE meta SET version = version + 1")
                return next_due, None
            task_id = self._add_run_locked(conn, now, name, run, due)
            conn.execute("UPDATE schedules SET next_due = ?, last_due = ?, last_task = ?, "
                         "runs = runs + 1 WHERE name = ?", (next_due, due, task_id, name))
        self._wake_workers(1)
        return next_due, task_id

    def run_schedule(self, name: str, run: Run) -> int:
        if self._closed:
            raise QueueClosed()
        with self._write() as (conn, now):
            task_id = self._add_run_locked(conn, now, name, run, None)
            conn.execute("UPDATE schedules SET last_due = (SELECT enqueued_at FROM tasks "
                         "WHERE id = ?), last_task = ?, runs = runs + 1 WHERE name = ?",
                         (task_id, task_id, name))
        self._wake_workers(1)
        return task_id

    def _add_run_locked(self, conn: sqlite3.Connection, now: float, name: str, run: Run,
                        due: float | None) -> int:
        (task_id,) = self._add_locked(conn, now, run.kind, run.params, 1,
                                      time_limit=run.time_limit)
        conn.execute("UPDATE tasks SET schedule = ?, due_at = ? WHERE id = ?",
                     (name, due, task_id))
        return task_id

    def schedule_states(self, names: Iterable[str]) -> dict[str, ScheduleState]:
        wanted = set(names)
        if not wanted:
            return {}
        with self._read() as conn:
            rows = conn.execute(
                "SELECT s.name, s.next_due, s.last_due, s.last_task, t.state, s.runs "
                "FROM schedules s LEFT JOIN tasks t ON t.id = s.last_task").fetchall()
        return {name: ScheduleState(next_due, last_due, last_task,
                                    None if state is None else STATES[state], runs)
                for name, next_due, last_due, last_task, state, runs in rows
                if name in wanted}

    def add_one(self, kind: str, params: dict[str, Any], time_limit: float | None = None) -> int:
        # The path of every submit, kept short: one INSERT in one transaction.
        if self._pending:
            return self.add(kind, params, time_limit=time_limit)[0]  # what is owed goes first
        text = params_text(params) if params else "{}"
        wall = time.time()
        if self._closed:
            raise QueueClosed()
        lock = self._write_lock
        if not lock.acquire(False) and not lock.acquire(timeout=self.busy_timeout):
            raise StoreUnavailable("the queue database is busy: this process's writes "
                                   f"waited {self.busy_timeout:g}s for it")
        try:
            if self._closed:
                raise QueueClosed()
            conn = self._writer
            if conn is None or self._pid != os.getpid() or self._file_due():
                conn = self._writer_conn()
            try:
                conn.execute("BEGIN IMMEDIATE")
                now = clock()
                task_id = conn.execute(INSERT, (kind, text, wall, now, None,
                                                time_limit)).lastrowid
                conn.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                queued = conn.execute("SELECT queued FROM meta").fetchone()[0]
                _rollback(conn)
                if "queue full" in str(exc):
                    raise QueueFull(queued, self.max_queued, 1) from None
                raise
            except sqlite3.Error as exc:
                _rollback(conn)
                raise self._unavailable(exc) from None
        finally:
            lock.release()
        if self._waiting:
            self._wake_workers(1)
        return task_id

    def _wake_workers(self, count: int) -> None:
        with self._work:
            if self._waiting:
                self._work.notify(count)

    def _work_notify_all(self) -> None:
        with self._work:
            self._work.notify_all()

    def _stopped(self, worker: str | None) -> bool:
        return self._closed or (worker is not None and worker in self._stopping)

    def claim(self, worker: str | None, block: bool = True) -> TaskRecord | None:
        while True:
            if self._stopped(worker):
                return None
            next_due = None
            try:
                ready, next_due = self._maybe_ready()
                if ready:
                    with self._write() as (conn, now):
                        if self._stopped(worker):
                            return None
                        record = self._claim_locked(conn, now, worker)
                    if record is not None:
                        return record
            except StoreUnavailable as exc:
                if not block:
                    raise
                self._say("claim", logging.WARNING, "workers cannot take work: %s; trying "
                          "again", exc.reason)
            if not block:
                return None
            # Woken by a submit in this process, or look again soon for work
            # another process queued.
            with self._work:
                if self._stopped(worker):
                    return None
                self._waiting += 1
                try:
                    wait = self.poll_interval
                    if next_due is not None:  # look again when the next delayed task is due
                        wait = max(0.0, min(wait, next_due - clock()))
                    self._work.wait(wait)
                finally:
                    self._waiting -= 1

    def _maybe_ready(self) -> tuple[bool, float | None]:
        """A cheap read (no write lock): is anything queued, or due, with the queue not
        paused? And when is the next delayed task due (shared clock), if any."""
        ready, due = self._read_one(
            "SELECT paused = 0 AND (queued > 0 OR (scheduled > 0 AND "
            "(SELECT min(due_clock) FROM tasks WHERE state = 'scheduled') <= ?)), "
            "CASE WHEN scheduled > 0 THEN (SELECT min(due_clock) FROM tasks "
            "WHERE state = 'scheduled') END FROM meta", (clock(),))
        return bool(ready), due

    def _outcome(self, record: TaskRecord, state: State, error: str | None,
                 traceback: str | None) -> _Outcome:
        if state not in (State.DONE, State.FAILED, State.CANCELLED, State.SCHEDULED):
            raise ValueError(f"{state} is not a finished state (nor a retry)")
        return _Outcome(record, state, error, traceback, time.time(), clock())

    def finish(self, record: TaskRecord, state: State, error: str | None = None,
               traceback: str | None = None) -> None:
        outcome = self._outcome(record, state, error, traceback)
        write = self._outcome_writer(outcome)
        try:
            with self._write() as (conn, now):
                after = write(conn, now)
        except StoreUnavailable as exc:
            self._owe(f"the end of task {record.id}", write, exc, (record.id,))
            return
        after()

    def finish_and_claim(self, record: TaskRecord, state: State, error: str | None = None,
                         traceback: str | None = None) -> TaskRecord | None:
        worker = record.worker
        outcome = self._outcome(record, state, error, traceback)
        write = self._outcome_writer(outcome)
        following = None
        try:
            with self._write() as (conn, now):
                after = write(conn, now)
                # One transaction from the end of one task to the start of the next.
                if not self._stopped(worker):
                    following = self._claim_locked(conn, now, worker)
        except StoreUnavailable as exc:
            self._owe(f"the end of task {record.id}", write, exc, (record.id,))
        else:
            after()
            if following is not None or self._stopped(worker):
                return following
        return self.claim(worker)

    def progress(self, record: TaskRecord, fraction: float, message: str | None) -> None:
        visible = progress_changed(record.progress, fraction, record.message, message)
        record.progress = fraction
        record.message = message
        if not visible or record.lost:
            return  # not worth a write: nobody could see it
        # Written at once if the file lets us within a moment; otherwise the
        # keeper writes the latest value soon. A busy file never fails a task.
        try:
            with self._write(wait=0.05) as (conn, _now):
                conn.execute(
                    "UPDATE tasks SET progress = ?, message = ? WHERE id = ? "
                    "AND state = 'running' AND process = ? AND attempts = ?",
                    (fraction, message, record.id, self._token, record.attempts))
        except StoreUnavailable:
            with self._state:
                record.dirty = True
                self._dirty = True
                self._ensure_keeper()
            self._keeper_wake.set()

    def log(self, record: TaskRecord, line: str) -> None:
        # Kept here and written by the keeper with the progress, a few lines a write;
        # the end of the task writes what is left.
        with self._state:
            keep_line(record, line)
            if record.lost:
                return
            record.dirty = True
            self._dirty = True
            self._ensure_keeper()
        self._keeper_wake.set()

    def cancel_requested(self, record: TaskRecord) -> bool:
        if record.cancel_requested:
            return True
        now = time.monotonic()
        if now - record.checked_at >= 0.25:  # another process may have asked: look, not too often
            record.checked_at = now
            try:
                row = self._read_one("SELECT cancel_requested FROM tasks WHERE id = ?",
                                     (record.id,))
            except StoreUnavailable:
                return False  # asked again in a moment; the task must not fail for it
            record.cancel_requested = bool(row and row[0])
        return record.cancel_requested

    def cancel(self, task_id: int) -> State:
        with self._write() as (conn, now):
            row = conn.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                raise TaskNotFound(task_id)
            state = STATES[row[0]]
            if state is State.QUEUED or state is State.SCHEDULED:
                why = "started" if state is State.QUEUED else "was due"
                conn.execute(
                    "UPDATE tasks SET state = 'cancelled', finished_at = ?, finished_clock = ?, "
                    f"clock = ?, error = 'cancelled before it {why}' WHERE id = ?",
                    (time.time(), now, now, task_id),
                )
                return State.CANCELLED
            if state is State.RUNNING:
                conn.execute(
                    "UPDATE tasks SET cancel_requested = 1 WHERE id = ? AND cancel_requested = 0",
                    (task_id,),
                )
                return State.RUNNING
            raise WrongState(task_id, state, CANNOT_CANCEL)

    def retry(self, task_id: int) -> Retried:
        with self._write() as (conn, now):
            row = conn.execute("SELECT state, kind, params, retried_as, time_limit FROM tasks "
                               "WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                raise TaskNotFound(task_id)
            state = STATES[row[0]]
            if state not in RETRYABLE_STATES:
                raise WrongState(task_id, state, CANNOT_RETRY)
            if row[3] is not None:
                return Retried(row[3], False)  # retried already: a double click queues one task
            (new_id,) = self._add_locked(conn, now, row[1], json.loads(row[2]), 1, task_id,
                                         time_limit=row[4])
            conn.execute("UPDATE tasks SET retried_as = ? WHERE id = ?", (new_id, task_id))
        self._wake_workers(1)
        return Retried(new_id, True)

    # -- the operator's view ----------------------------------------------------

    def find(self, query: TaskFilter, limit: int, after: int | None = None,
             ascending: bool = False) -> list[TaskInfo]:
        """A keyset page (see :func:`find_sql`: text is matched in ASCII case only)."""
        statements = find_sql(query, limit, after, ascending)
        with self._read() as conn:
            if len(statements) == 1:
                return [task_info(row) for row in conn.execute(*statements[0])]
            ids = sorted((task_id for sql, args in statements
                          for (task_id,) in conn.execute(sql, args)),
                         reverse=not ascending)[:limit]
            if not ids:
                return []
            rows = conn.execute(f"SELECT {TASK_COLUMNS} FROM tasks WHERE id IN "
                                f"({','.join('?' * len(ids))})", ids).fetchall()
        place = {task_id: n for n, task_id in enumerate(ids)}
        return [task_info(row) for row in sorted(rows, key=lambda row: place[row[0]])]

    def count(self, query: TaskFilter) -> int:
        sql, args = count_sql(query)
        return self._read_one(sql, tuple(args))[0]

    def retry_many(self, ids: list[int]) -> list[int]:
        """:meth:`retry` for each of ``ids`` that can be retried, in one transaction: each
        new task linked to its task both ways, none retried twice (read in the
        transaction, so of two processes retrying at once each task is retried by one).
        With less room in the queue than tasks to retry, those that fit are retried (in
        the order of ``ids``) and kept, then :class:`BulkStopped` with their ids and the
        QueueFull: what the same retries one by one do. Closed: :class:`QueueClosed`,
        nothing retried."""
        created: list[int] = []
        full = None
        with self._write() as (conn, now):
            rows = {}
            for start in range(0, len(ids), _IDS_PER_STATEMENT):
                chunk = ids[start:start + _IDS_PER_STATEMENT]
                rows.update((row[0], row) for row in conn.execute(
                    f"SELECT id, kind, params, time_limit FROM tasks WHERE id IN "
                    f"({','.join('?' * len(chunk))}) AND state IN ('failed', 'cancelled') "
                    f"AND retried_as IS NULL", chunk))
            wanted = [rows[i] for i in dict.fromkeys(ids) if i in rows]
            if not wanted:
                return []
            if self._closed:
                raise QueueClosed()
            queued = conn.execute("SELECT queued FROM meta").fetchone()[0]
            room = max(0, self.max_queued - queued)
            if len(wanted) > room:
                full = QueueFull(queued + room, self.max_queued, 1)
            wall = time.time()
            for task_id, kind, text, time_limit in wanted[:room]:
                new_id = conn.execute(INSERT, (kind, text, wall, now, task_id,
                                               time_limit)).lastrowid
                created.append(new_id)
            conn.executemany("UPDATE tasks SET retried_as = ? WHERE id = ?",
                             zip(created, (row[0] for row in wanted)))
        if created:
            self._wake_workers(len(created))
        if full is not None:
            raise BulkStopped("retry", created, full)
        return created

    def cancel_many(self, ids: list[int]) -> list[int]:
        """Cancel each of ``ids`` that is scheduled or queued, in one transaction (never a
        running one); the ids cancelled, in the order of ``ids``."""
        cancelled: set[int] = set()
        with self._write() as (conn, now):
            wall = time.time()
            for start in range(0, len(ids), _IDS_PER_STATEMENT):
                chunk = ids[start:start + _IDS_PER_STATEMENT]
                cancelled.update(row[0] for row in conn.execute(
                    "UPDATE tasks SET state = 'cancelled', finished_at = ?, finished_clock = ?, "
                    "clock = ?, error = CASE state WHEN 'queued' THEN 'cancelled before it "
                    "started' ELSE 'cancelled before it was due' END "
                    f"WHERE id IN ({','.join('?' * len(chunk))}) "
                    "AND state IN ('queued', 'scheduled') RETURNING id",
                    (wall, now, now, *chunk)).fetchall())
        return [task_id for task_id in dict.fromkeys(ids) if task_id in cancelled]

    def purge(self, ids: list[int]) -> int:
        removed = 0
        with self._write() as (conn, _now):
            for start in range(0, len(ids), _IDS_PER_STATEMENT):
                chunk = ids[start:start + _IDS_PER_STATEMENT]
                removed += conn.execute(
                    f"DELETE FROM tasks WHERE id IN ({','.join('?' * len(chunk))}) "
                    "AND finished_at IS NOT NULL AND state IN ('done', 'failed', 'cancelled')",
                    chunk).rowcount
            if removed:
                conn.execute("UPDATE meta SET version = version + 1")
        return removed

    def kind_health(self, kinds: Iterable[str]) -> list[KindHealth]:
        """Each kind's last hour, by the wall-clock minute (see
        :data:`~dashboard.local.schema.KIND_MINUTES`: an hour of rows per kind, kept as
        tasks start and end), and its tasks queued and running now, counted where the
        queue finds them (never the history)."""
        kinds = list(kinds)
        size = HEALTH_BUCKETS
        oldest = int(time.time() // 60) - WINDOW_MINUTES
        with self._read() as conn:
            hour = {row[0]: row[1:] for row in conn.execute(HEALTH_SQL, (oldest, oldest))}
            now = {row[0]: row[1:] for row in conn.execute(NOW_BY_KIND)}
        health = []
        for kind in kinds:
            queued, running = now.get(kind, (0, 0))
            row = hour.get(kind)
            if row is None:
                health.append(KindHealth(kind, queued, running))
                continue
            done, failed, runs, waits = row[0], row[1], row[2:2 + size], row[2 + size:]
            health.append(KindHealth(kind, queued, running, done, failed,
                                     percentile(runs, 0.5), percentile(runs, 0.95),
                                     percentile(waits, 0.95)))
        return health

    def clear_history(self, batch: int = 500) -> int:
        """Forget the tasks finished so far, oldest first, ``batch`` per transaction: a
        history of 100,000 takes about a second to delete, which one transaction would
        hold every submit and worker of every process for. Tasks that finish meanwhile
        stay (they came after the click)."""
        with self._write() as (conn, _now):
            newest = conn.execute("SELECT max(finished_at) FROM tasks "
                                  "WHERE finished_at IS NOT NULL").fetchone()[0]
        forgotten = 0
        while newest is not None:
            with self._write() as (conn, _now):
                removed = conn.execute(
                    "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE finished_at "
                    "IS NOT NULL AND finished_at <= ? ORDER BY finished_at LIMIT ?)",
                    (newest, batch)).rowcount
                conn.execute("UPDATE meta SET version = version + 1")
            forgotten += removed
            if removed < batch:
                break
        return forgotten

    def reset(self) -> None:
        self.clear_history()  # in batches; what finishes meanwhile goes below, with the counters
        with self._write() as (conn, _now):
            conn.execute("DELETE FROM tasks WHERE finished_at IS NOT NULL")
            conn.execute("DELETE FROM seconds")
            conn.execute(
                "UPDATE meta SET done = 0, failed = 0, cancelled = 0, restarts = 0, "
                "submitted = queued + running, version = version + 1, sec = NULL, "
                "sec_finished = 0, sec_wait = 0, sec_run = 0"
            )
            conn.execute("UPDATE workers SET done = 0")
            for statement in RESET_KINDS:
                conn.execute(statement)
            conn.execute("DELETE FROM kind_minutes")

    # -- workers ----------------------------------------------------------

    def add_worker(self, name: str, replacement: bool = False) -> None:
        with self._write() as (conn, now):
            self._register(conn, now)
            # A slot used before (a worker replaced, or one "−" then "+") starts
            # idle: whatever task it showed has ended or been given back.
            conn.execute(
                "INSERT INTO workers (process, name, pid) VALUES (?, ?, ?) "
                "ON CONFLICT (process, name) DO UPDATE SET alive = 1, task_id = NULL",
                (self._token, name, self._pid),
            )
            conn.execute(
                "UPDATE meta SET version = version + 1, restarts = restarts + ?",
                (int(replacement),),
            )
        with self._state:
            self._stopping.discard(name)

    def stop_worker(self, name: str) -> None:
        with self._state:
            self._stopping.add(name)
        self._work_notify_all()

        def write(conn: sqlite3.Connection, _now: float) -> None:
            conn.execute("UPDATE workers SET alive = 0 WHERE process = ? AND name = ?",
                         (self._token, name))
            conn.execute("UPDATE meta SET version = version + 1")

        self._write_or_owe(f"worker {name} stopping", write)

    def _write_or_owe(self, what: str, write: Callable[[sqlite3.Connection, float], Any]) -> None:
        try:
            with self._write() as (conn, now):
                write(conn, now)
        except StoreUnavailable as exc:
            self._owe(what, write, exc)

    def worker_exited(self, name: str, error: str | None = None) -> None:
        # A worker that died holding a task fails it (unless its end is owed
        # already: that end stands); one that stopped cleanly holds none.
        outcomes = []
        if error is not None:
            with self._state:
                owed = {task for *_, tasks in self._pending for task in tasks}
                held = [r for r in self._mine.values() if r.worker == name and r.id not in owed]
            outcomes = [self._outcome(r, State.FAILED, error, None) for r in held]
        writes = [self._outcome_writer(o) for o in outcomes]

        def write(conn: sqlite3.Connection, now: float) -> Callable[[], None]:
            afters = [w(conn, now) for w in writes]
            conn.execute("UPDATE workers SET alive = 0, task_id = NULL "
                         "WHERE process = ? AND name = ?", (self._token, name))
            conn.execute("UPDATE meta SET version = version + 1")
            return lambda: [after() for after in afters]

        with self._state:
            self._stopping.add(name)  # its thread is over: the name takes nothing more
        try:
            with self._write() as (conn, now):
                after = write(conn, now)
        except StoreUnavailable as exc:
            self._owe(f"the exit of worker {name}", write, exc,
                      tuple(o.record.id for o in outcomes))
            return
        after()

    def remove_worker(self, name: str) -> None:
        def write(conn: sqlite3.Connection, _now: float) -> None:
            conn.execute("DELETE FROM workers WHERE process = ? AND name = ?",
                         (self._token, name))
            conn.execute("UPDATE meta SET version = version + 1")

        self._write_or_owe(f"the removal of worker {name}", write)
        with self._state:
            self._stopping.discard(name)

    def workers_target(self) -> int | None:
        return self._read_one("SELECT workers FROM meta")[0]

    def touch(self) -> None:
        with self._write() as (conn, _now):
            conn.execute("UPDATE meta SET version = version + 1")

    def set_workers_target(self, count: int) -> None:
        with self._write() as (conn, _now):
            conn.execute("UPDATE meta SET workers = ?, version = version + 1", (count,))

    # -- reading ----------------------------------------------------------

    def snapshot(self, recent: int = 20, upcoming: int = 0) -> Snapshot:
        with self._read() as conn:
            now, wall = clock(), time.time()
            (version, paused, queued, running, done, failed, cancelled, submitted,
             restarts, last_claim, scheduled) = conn.execute(
                "SELECT version, paused, queued, running, done, failed, cancelled, submitted, "
                "restarts, last_claim, scheduled FROM meta"
            ).fetchone()
            workers = []
            for name, pid, alive, done_count, *task_row in conn.execute(
                f"SELECT w.name, w.pid, w.alive, w.done, {T_COLUMNS} FROM workers w "
                "JOIN processes p ON p.token = w.process "
                "LEFT JOIN tasks t ON t.id = w.task_id AND t.state = 'running' "
                "ORDER BY w.pid, w.name"
            ):
                task = None if task_row[0] is None else task_info(tuple(task_row))
                workers.append(WorkerInfo(
                    name, WorkerState.of(task is not None, bool(alive), bool(paused),
                                       self._closed), task, done_count, pid,
                ))
            last = tuple(task_info(r) for r in conn.execute(
                f"SELECT {TASK_COLUMNS} FROM tasks WHERE finished_at IS NOT NULL "
                "ORDER BY finished_at DESC, id DESC LIMIT ?", (recent,)))
            # The two lanes of the queue (see _claim_locked), merged as a claim takes them.
            head = conn.execute(
                f"SELECT queued_clock, {TASK_COLUMNS} FROM tasks WHERE id >= "
                "(SELECT head FROM meta) AND state = 'queued' AND due_clock IS NULL "
                "ORDER BY id LIMIT ?", (max(1, upcoming),)).fetchall()
            late = conn.execute(
                f"SELECT due_clock, {TASK_COLUMNS} FROM tasks WHERE state = 'queued' "
                "AND due_clock IS NOT NULL ORDER BY due_clock LIMIT ?",
                (max(1, upcoming),)).fetchall() if queued else []
            if late:
                head = sorted(head + late, key=lambda r: (r[0] or 0.0, r[1]))
            soon = tuple(task_info(r) for r in conn.execute(
                f"SELECT {TASK_COLUMNS} FROM tasks WHERE state = 'scheduled' "
                "ORDER BY due_clock LIMIT ?", (upcoming,))) if scheduled and upcoming else ()
            # The seconds written so far, and the current one, still in meta.
            buckets = conn.execute(
                "SELECT second, depth, peak, finished, wait_sum, run_sum FROM seconds "
                "WHERE second > ? UNION ALL "
                "SELECT sec, sec_depth, sec_peak, sec_finished, sec_wait, sec_run FROM meta "
                "WHERE sec > ? ORDER BY 1", (int(now) - SERIES_SECONDS,) * 2,
            ).fetchall()
        next_up = tuple(task_info(r[1:]) for r in head[:upcoming])
        oldest = head[0][0] if head and head[0][0] is not None else None
        # The chart shows wall-clock seconds; the record counts on the shared clock.
        shift = wall - now
        series = tuple((b[0] + shift, b[1], b[2]) for b in buckets)
        since = int(now) - RATE_WINDOW
        measured = rates(now, buckets[0][0] if buckets else None,
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
            taken_at=wall,
            oldest_wait=None if oldest is None else max(0.0, now - oldest),
            idle_for=None if last_claim is None else max(0.0, now - last_claim),
            scheduled=scheduled,
            soon=soon,
            **measured,
        )

    def metrics(self) -> Metrics:
        with self._read() as conn:
            now = clock()
            queued, scheduled, running, paused = conn.execute(
                "SELECT queued, scheduled, running, paused FROM meta").fetchone()
            # Workers as the snapshot lists them: of the processes still registered.
            (workers,) = conn.execute(
                "SELECT count(*) FROM workers w JOIN processes p ON p.token = w.process "
                "WHERE w.alive").fetchone()
            # The head of each lane of the queue (see _claim_locked): the older waited longest.
            (oldest,) = conn.execute(
                "SELECT min(c) FROM (SELECT * FROM (SELECT queued_clock AS c FROM tasks "
                "WHERE id >= (SELECT head FROM meta) AND state = 'queued' AND due_clock IS NULL "
                "ORDER BY id LIMIT 1) UNION ALL SELECT * FROM (SELECT queued_clock AS c FROM "
                "tasks WHERE state = 'queued' AND due_clock IS NOT NULL ORDER BY due_clock "
                "LIMIT 1))").fetchone() if queued else (None,)
            kinds = {row[0]: kind_stats(row) for row in conn.execute(
                f"SELECT {KIND_COLUMNS} FROM kinds")}
            for kind, waiting in conn.execute(WAITING_BY_KIND):
                stats = kinds.get(kind) or KindStats(kind)
                kinds[kind] = stats._replace(submitted=stats.submitted + waiting)
        return Metrics(
            queued=queued,
            scheduled=scheduled,
            running=running,
            workers=workers,
            paused=bool(paused),
            oldest_wait=None if oldest is None else max(0.0, now - oldest),
            kinds=tuple(kinds[kind] for kind in sorted(kinds)),
            taken_at=time.time(),
            pid=os.getpid(),
        )

    def get(self, task_id: int) -> TaskInfo | None:
        row = self._read_one(f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,))
        return None if row is None else task_info(row)

    # -- the whole queue --------------------------------------------------

    def wait_idle(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            queued, running = self._read_one("SELECT queued, running FROM meta")
            if not queued and not running:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            pause = 0.02 if deadline is None else min(0.02, max(0.0, deadline - time.monotonic()))
            with self._work:
                self._work.wait(pause)

    def set_paused(self, paused: bool) -> None:
        with self._write() as (conn, _now):
            changed = conn.execute(
                "UPDATE meta SET paused = ?, version = version + 1 WHERE paused != ?",
                (int(paused), int(paused))).rowcount
        if changed and not paused:
            self._work_notify_all()

    def close(self) -> None:
        self._closed = True
        self._work_notify_all()

    def close_nowait(self) -> None:
        self._closed = True

    def drop_queued(self) -> int:
        return 0  # durable: queued work stays for the next start

    def reset_after_fork(self) -> int:
        # The connections are replaced lazily; here, the locks the parent's
        # threads may have held at the fork, and its claims, which are not ours.
        self._after_fork()
        return 0

    # -- upkeep -----------------------------------------------------------

    def _register(self, conn: sqlite3.Connection, now: float) -> None:
        me = self._me
        conn.execute(
            "INSERT INTO processes (token, pid, host, boot, pidns, start, started_at, "
            "heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (token) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            (self._token, self._pid, socket.gethostname(), me.boot, me.pidns, me.start,
             time.time(), now),
        )

    def maintain(self, wait: float | None = None) -> None:
        with self._write(wait) as (conn, now):
            self._register(conn, now)
            if self._promote_locked(conn, now):
                self._wake_workers(1)
            self._take_back(conn, now)
            self._forget_gone(conn, now)
            conn.execute("DELETE FROM seconds WHERE second < ?", (int(now) - SERIES_SECONDS,))
        self.prune()

    def _owner(self, boot: str | None, pidns: str | None, pid: int | None,
               start: int | None) -> str:
        if boot is None or pid is None:
            return "unknown"
        return process_alive(Identity(boot, pidns, pid, start), self._me)

    def _take_back(self, conn: sqlite3.Connection, now: float) -> None:
        """Running tasks whose run is over without an end: their process is gone
        (or, when nobody can tell, stopped renewing its lease), or it is this
        process and it no longer runs them."""
        rows = conn.execute(
            "SELECT t.id, t.attempts, t.pid, t.process, t.cancel_requested, t.lease_until, "
            "p.boot, p.pidns, p.start FROM tasks t LEFT JOIN processes p ON p.token = t.process "
            "WHERE t.state = 'running'"
        ).fetchall()
        if not rows:
            return
        with self._state:
            held = set(self._mine)
        for task_id, attempts, pid, process, cancel, lease, boot, pidns, start in rows:
            if process == self._token:
                if task_id in held:
                    continue
                why = note = f"process {pid} lost track of it"
            else:
                owner = self._owner(boot, pidns, pid, start)
                if owner == ALIVE:
                    continue  # whatever its lease says: it runs there now
                if owner != DEAD and lease is not None and lease >= now:
                    continue
                why, note = f"process {pid} stopped while running it", f"process {pid} stopped"
            self._give_back(conn, now, task_id, attempts, pid, bool(cancel), why, note)

    def _forget_gone(self, conn: sqlite3.Connection, now: float) -> None:
        """Processes that stopped: their rows and their workers go."""
        silent = now - 3 * self.maintain_every - self.lease_time
        gone = [
            (token,) for token, pid, boot, pidns, start, heartbeat in conn.execute(
                "SELECT token, pid, boot, pidns, start, heartbeat_at FROM processes "
                "WHERE token != ?", (self._token,))
            if (owner := self._owner(boot, pidns, pid, start)) == DEAD
            or (owner != ALIVE and heartbeat < silent)
        ]
        if gone:
            conn.executemany("DELETE FROM workers WHERE process = ?", gone)
            conn.executemany("DELETE FROM processes WHERE token = ?", gone)
            conn.execute("UPDATE meta SET version = version + 1")

    def _prune_batch(self, batch: int = 500) -> int:
        """Forget up to ``batch`` of the oldest finished tasks beyond ``history`` or
        older than ``retention``, in one short transaction; return how many."""
        wall = time.time()
        with self._write() as (conn, _now):
            kept = conn.execute("SELECT kept FROM meta").fetchone()[0]
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
                    "ORDER BY finished_at LIMIT ?)", (wall - self.retention, batch - removed)
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
        with self._state:
            held = [r for r in records if self._mine.get(r.id) is r]
        if not held:
            return 0
        released = 0
        with self._write() as (conn, now):
            for record in held:
                row = conn.execute(
                    "SELECT cancel_requested FROM tasks WHERE id = ? AND state = 'running' "
                    "AND process = ? AND attempts = ?",
                    (record.id, self._token, record.attempts)).fetchone()
                if row is not None:
                    self._give_back(conn, now, record.id, record.attempts, self._pid,
                                    bool(row[0]), "its process stopped before it finished",
                                    "its process stopped before it finished")
                    released += 1
        for record in held:
            record.lost = True
            self._let_go(record)
        return released

    def detach(self) -> None:
        with self._write() as (conn, _now):
            conn.execute("DELETE FROM workers WHERE process = ?", (self._token,))
            conn.execute("DELETE FROM processes WHERE token = ?", (self._token,))
            conn.execute("UPDATE meta SET version = version + 1")


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # nothing was begun, or the failure already ended it


# Connections inherited through a fork: never used or closed in the child.
_abandoned: list[sqlite3.Connection | None] = []


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
