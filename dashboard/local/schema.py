"""The SQLite store's schema: its tables and triggers, the upgrade from the first
version, and how a row of ``tasks`` becomes a task.

The triggers keep the counters (in all and per kind) and the per-second record in
the same transaction as the write that changes a task, so no writer can forget
them, and every process sharing the file reads the same totals.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Iterator

from ..records import (DURATION_BUCKETS, HEALTH_WINDOW, Histogram, KindStats, State, TaskInfo,
                       TaskRecord)

#: The schema this code reads and writes; kept in ``PRAGMA user_version``.
#: 2: times that are compared (leases, heartbeats, the per-second record, the
#: durations behind the rates) are on the machine's shared clock, with its boot.
#: 3: a task's result, its unique key, delayed (scheduled) tasks, automatic retries,
#: time limits, what it logged.
#: 4: periodic schedules, and which schedule queued a task.
#: 5: each kind's totals and wait and run time histograms (for /metrics).
#: 6: the operator's view: tasks found by state and kind on indexes, params kept as
#: the text a search looks in, and each kind's last hour by the minute.
SCHEMA_VERSION = 6

#: A state as the tasks table spells it → the State.
STATES = {s.value: s for s in State}

#: Both task triggers begin here: when a new second has begun (on the shared
#: clock: the row's ``queued_clock`` on insert, its ``clock`` on a change),
#: the last one (still in meta's sec_* columns) goes to the seconds table.
#: Every writer reads the clock inside its immediate transaction, so seconds
#: only ever move forward.
_FLUSH_LAST_SECOND = """\
INSERT INTO seconds (second, depth, peak, finished, wait_sum, run_sum)
    SELECT sec, sec_depth, sec_peak, sec_finished, sec_wait, sec_run FROM meta
    WHERE sec IS NOT NULL AND sec != CAST(NEW.{clock} AS INTEGER)
    ON CONFLICT (second) DO UPDATE SET
        depth = excluded.depth, peak = max(peak, excluded.peak),
        finished = finished + excluded.finished, wait_sum = wait_sum + excluded.wait_sum,
        run_sum = run_sum + excluded.run_sum;"""

#: Periodic schedules: a process claims a due time by moving next_due on from it, in
#: the transaction that queues its run (compare and set: of processes that try at
#: once, one finds next_due still at the due time, the others find it moved on).
SCHEDULES = """
CREATE TABLE schedules (
    name      TEXT PRIMARY KEY,
    spec      TEXT NOT NULL,                -- what decides the due times (the code's)
    next_due  REAL NOT NULL,                -- wall clock
    last_due  REAL,                         -- the last run's due time (run now: when asked)
    last_task INTEGER,
    runs      INTEGER NOT NULL DEFAULT 0
);"""

TABLES = """
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
    sec_run      REAL NOT NULL DEFAULT 0,
    boot         TEXT,                      -- the boot every *clock value counts from
    last_claim   REAL,                      -- when a task was last taken (clock)
    scheduled    INTEGER NOT NULL DEFAULT 0 -- delayed tasks not yet due
);
CREATE TABLE tasks (
    id               INTEGER PRIMARY KEY,
    kind             TEXT NOT NULL,
    params           TEXT NOT NULL,        -- JSON
    state            TEXT NOT NULL,
    enqueued_at      REAL NOT NULL,        -- wall clock, to show
    started_at       REAL,
    finished_at      REAL,
    progress         REAL NOT NULL DEFAULT 0,
    message          TEXT,
    error            TEXT,
    traceback        TEXT,
    worker           TEXT,
    process          TEXT,                 -- the claiming process's token
    pid              INTEGER,
    lease_until      REAL,                 -- clock
    attempts         INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    retry_of         INTEGER,
    retried_as       INTEGER,
    queued_clock     REAL,                 -- the shared clock when queued, started, finished:
    started_clock    REAL,                 -- the rates' wait and run times
    finished_clock   REAL,
    clock            REAL,                 -- the shared clock at the last change of state
    result           TEXT,                 -- what the task returned, JSON
    key              TEXT,                 -- unique among tasks not yet finished
    due_at           REAL,                 -- delayed: when due (wall clock, to show)
    due_clock        REAL,                 -- the same on the shared clock
    errors           TEXT,                 -- JSON: earlier attempts retried automatically
    time_limit       REAL,                 -- seconds it may run
    logs             TEXT,                 -- JSON: the last lines it logged
    logs_dropped     INTEGER NOT NULL DEFAULT 0,
    schedule         TEXT                  -- the periodic schedule that queued it
);
-- A keyed submit reads it; tasks without a key are not in it, and cost it nothing.
CREATE UNIQUE INDEX tasks_key ON tasks (key) WHERE key IS NOT NULL AND finished_at IS NULL;
-- Delayed tasks by due time: those waiting, and those queued when due (a lane of
-- their own, in due order; the other queued tasks go by id). Others are not in them.
CREATE INDEX tasks_due ON tasks (due_clock) WHERE state = 'scheduled';
CREATE INDEX tasks_late ON tasks (due_clock) WHERE state = 'queued' AND due_clock IS NOT NULL;
-- The history, newest first, and pruning oldest first. Every index is one more
-- page written per commit, so the queue order comes from the ids (from meta.head
-- up). (The operator's view adds the history by state and kind, and the running
-- tasks: FIND_INDEXES, below; none of them is written by a submit.)
CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
{schedules}
CREATE TABLE seconds (
    second   INTEGER PRIMARY KEY,          -- clock
    depth    INTEGER NOT NULL,
    peak     INTEGER NOT NULL,
    finished INTEGER NOT NULL DEFAULT 0,
    wait_sum REAL NOT NULL DEFAULT 0,
    run_sum  REAL NOT NULL DEFAULT 0
);
""".replace("{schedules}", SCHEDULES)

#: Who is using the file now: rows that are dropped and made anew on upgrade.
PROCESS_TABLES = """
CREATE TABLE processes (
    token        TEXT PRIMARY KEY,
    pid          INTEGER NOT NULL,
    host         TEXT NOT NULL,
    boot         TEXT,                     -- with pidns and start: is it still running?
    pidns        TEXT,
    start        INTEGER,
    started_at   REAL NOT NULL,            -- wall clock
    heartbeat_at REAL NOT NULL             -- clock
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
"""

# The counters, the version, the queue head and the per-second record follow
# the tasks table in triggers: they change in the same statement as the task,
# so they never disagree with it, and a submit is one INSERT that touches two
# pages (the task's and meta's). The `seconds` table is written once a second.
TRIGGERS = """
CREATE TRIGGER tasks_refuse_when_full BEFORE INSERT ON tasks
WHEN NEW.state = 'queued' AND (SELECT queued >= max_queued FROM meta)
BEGIN
    SELECT RAISE(ABORT, 'queue full');
END;
CREATE TRIGGER tasks_refuse_too_many_scheduled BEFORE INSERT ON tasks
WHEN NEW.state = 'scheduled' AND (SELECT scheduled >= max_queued FROM meta)
BEGIN
    SELECT RAISE(ABORT, 'too many scheduled');
END;
CREATE TRIGGER tasks_scheduled AFTER INSERT ON tasks
WHEN NEW.state = 'scheduled'
BEGIN
    UPDATE meta SET scheduled = scheduled + 1, submitted = submitted + 1,
        version = version + 1, next_id = max(next_id, NEW.id + 1);
END;
CREATE TRIGGER tasks_added AFTER INSERT ON tasks
WHEN NEW.state = 'queued'
BEGIN
    {flush_on_insert}
    UPDATE meta SET
        queued = queued + 1, submitted = submitted + 1, version = version + 1,
        next_id = max(next_id, NEW.id + 1),
        sec_peak = CASE WHEN sec = CAST(NEW.queued_clock AS INTEGER)
                        THEN max(sec_peak, queued + 1) ELSE queued + 1 END,
        sec_finished = CASE WHEN sec = CAST(NEW.queued_clock AS INTEGER)
                            THEN sec_finished ELSE 0 END,
        sec_wait = CASE WHEN sec = CAST(NEW.queued_clock AS INTEGER) THEN sec_wait ELSE 0 END,
        sec_run = CASE WHEN sec = CAST(NEW.queued_clock AS INTEGER) THEN sec_run ELSE 0 END,
        sec_depth = queued + 1,
        sec = CAST(NEW.queued_clock AS INTEGER);
END;
CREATE TRIGGER tasks_moved AFTER UPDATE OF state ON tasks
WHEN OLD.state != NEW.state
BEGIN
    {flush_on_change}
    UPDATE meta SET
        queued = queued + d.dq,
        running = running - (OLD.state = 'running') + (NEW.state = 'running'),
        scheduled = scheduled - (OLD.state = 'scheduled') + (NEW.state = 'scheduled'),
        done = done + (NEW.state = 'done'),
        failed = failed + (NEW.state = 'failed'),
        cancelled = cancelled + (NEW.state = 'cancelled'),
        version = version + 1,
        head = CASE  -- (a task queued when due is in the other lane: head leaves it)
            WHEN NEW.due_clock IS NOT NULL THEN head
            WHEN OLD.state = 'queued' AND NEW.state = 'running' THEN max(head, NEW.id + 1)
            WHEN NEW.state = 'queued' THEN min(head, NEW.id)
            ELSE head END,
        last_claim = CASE WHEN NEW.state = 'running' THEN NEW.clock ELSE last_claim END,
        sec_peak = CASE WHEN sec = d.now THEN max(sec_peak, queued + d.dq)
                        ELSE queued + d.dq END,
        sec_finished = CASE WHEN sec = d.now THEN sec_finished ELSE 0 END + d.ran,
        sec_wait = CASE WHEN sec = d.now THEN sec_wait ELSE 0 END
                   + CASE WHEN d.ran THEN max(0, NEW.started_clock - NEW.queued_clock) ELSE 0 END,
        sec_run = CASE WHEN sec = d.now THEN sec_run ELSE 0 END
                  + CASE WHEN d.ran THEN max(0, NEW.finished_clock - NEW.started_clock) ELSE 0 END,
        sec_depth = queued + d.dq,
        sec = d.now
    FROM (SELECT (NEW.state = 'queued') - (OLD.state = 'queued') AS dq,
                 OLD.state = 'running' AND NEW.finished_at IS NOT NULL AS ran,
                 CAST(NEW.clock AS INTEGER) AS now) AS d;
END;
CREATE TRIGGER tasks_touched AFTER UPDATE OF progress, message, cancel_requested, retried_as
ON tasks
BEGIN
    UPDATE meta SET version = version + 1;
END;
""".format(flush_on_insert=_FLUSH_LAST_SECOND.format(clock="queued_clock"),
           flush_on_change=_FLUSH_LAST_SECOND.format(clock="clock"))


def _observe(name: str, value: str) -> str:
    """The SET terms adding one duration ``value`` (an SQL expression, NULL when there is
    none to add) to the histogram ``name`` of a kinds row."""
    terms = [f"{name}_count = {name}_count + ({value} IS NOT NULL)",
             f"{name}_sum = {name}_sum + ifnull({value}, 0)"]
    terms += [f"{name}_{i} = {name}_{i} + ifnull({value} <= {bound!r}, 0)"
              for i, bound in enumerate(DURATION_BUCKETS)]
    return ",\n        ".join(terms)


def _histogram_columns(name: str) -> str:
    return "".join(f"    {name}_{i} INTEGER NOT NULL DEFAULT 0,\n"
                   for i in range(len(DURATION_BUCKETS)))


#: Each kind's totals since the last reset, for /metrics: kept by the triggers
#: below as its tasks change state, so a scrape reads a few rows and never the
#: history. A histogram is a count and a sum, and a
#: column per bound of DURATION_BUCKETS counting the durations up to it
#: (cumulative, as Prometheus reads them): ``wait_3`` is how many waits were at
#: most DURATION_BUCKETS[3].
#:
#: ``submitted`` leaves out the tasks still waiting for their first start (queued
#: or scheduled, never started): a scrape adds those (WAITING_BY_KIND), and a
#: task is counted here when it first leaves them, started or cancelled, in a
#: write that updates its kind's row anyway. So a submit writes what it did
#: before (its row and meta's), not a third page: the path the benchmarks hold
#: to a bare INSERT.
KINDS = f"""
CREATE TABLE kinds (
    kind      TEXT PRIMARY KEY,
    submitted INTEGER NOT NULL DEFAULT 0,   -- less those waiting for their first start
    done      INTEGER NOT NULL DEFAULT 0,
    failed    INTEGER NOT NULL DEFAULT 0,
    cancelled INTEGER NOT NULL DEFAULT 0,
    retried   INTEGER NOT NULL DEFAULT 0,   -- failed attempts its retry policy scheduled again
    wait_count INTEGER NOT NULL DEFAULT 0,  -- queued (or due) to each start
    wait_sum  REAL NOT NULL DEFAULT 0,
{_histogram_columns("wait")}    run_count INTEGER NOT NULL DEFAULT 0,   -- each start to the end of that attempt
    run_sum   REAL NOT NULL DEFAULT 0,
{_histogram_columns("run").rstrip().rstrip(",")}
) WITHOUT ROWID;
"""

# The kind's row (one page: the kinds are few), made when first needed, then one
# update per change of a task. A wait is observed at each start; a run at the end
# of each attempt, its outcome counted then. A task given back to the queue (its
# process died under it) counts nothing then: its next start and end do. A task
# that never started has no attempts: it counts as submitted when it leaves the
# waiting states (not when it falls due: queued, it still waits).
KIND_TRIGGERS = f"""
CREATE TRIGGER tasks_kind_started AFTER UPDATE OF state ON tasks
WHEN NEW.state = 'running' AND OLD.state != 'running'
BEGIN
    INSERT OR IGNORE INTO kinds (kind) VALUES (NEW.kind);
    UPDATE kinds SET
        submitted = submitted + (OLD.attempts = 0),
        {_observe("wait", "d.waited")}
    FROM (SELECT max(0, NEW.started_clock - NEW.queued_clock) AS waited) AS d
    WHERE kind = NEW.kind;
END;
CREATE TRIGGER tasks_kind_ended AFTER UPDATE OF state ON tasks
WHEN OLD.state != NEW.state AND NEW.state IN ('done', 'failed', 'cancelled', 'scheduled')
BEGIN
    INSERT OR IGNORE INTO kinds (kind) VALUES (NEW.kind);
    UPDATE kinds SET
        submitted = submitted + (OLD.state != 'running' AND OLD.attempts = 0),
        done = done + (NEW.state = 'done'),
        failed = failed + (NEW.state = 'failed'),
        cancelled = cancelled + (NEW.state = 'cancelled'),
        retried = retried + (NEW.state = 'scheduled'),
        {_observe("run", "d.ran")}
    FROM (SELECT CASE WHEN OLD.state = 'running' THEN
                 max(0, ifnull(NEW.finished_clock, NEW.clock) - NEW.started_clock) END AS ran) AS d
    WHERE kind = NEW.kind;
END;
"""

#: The columns of a kinds row, in the order :func:`kind_stats` reads them.
KIND_COLUMNS = ", ".join(
    ["kind", "submitted", "done", "failed", "cancelled", "retried"]
    + [f"{name}_{part}" for name in ("wait", "run")
       for part in ("count", "sum", *range(len(DURATION_BUCKETS)))])


#: The tasks waiting for their first start, by kind: what a scrape adds to each kind's
#: ``submitted``. Read where the queue's own reads look (the two lanes of queued
#: tasks, from meta's head and on tasks_late; scheduled ones on tasks_due), so it
#: reads the waiting tasks, never the history.
WAITING_BY_KIND = """
SELECT kind, count(*) FROM (
    SELECT kind FROM tasks WHERE id >= (SELECT head FROM meta) AND state = 'queued'
        AND due_clock IS NULL AND attempts = 0
    UNION ALL
    SELECT kind FROM tasks WHERE state = 'queued'
        AND due_clock IS NOT NULL AND attempts = 0
    UNION ALL
    SELECT kind FROM tasks WHERE state = 'scheduled'
        AND due_clock IS NOT NULL AND attempts = 0)
GROUP BY kind"""

#: Reset, once the finished tasks are gone: every kind with a task left gets a
#: zeroed row, whose ``submitted`` makes its total (with the waiting ones a scrape
#: adds) its queued and running tasks, as meta's total counts them: those running,
#: plus those queued again after a start, less those scheduled and never started.
RESET_KINDS = (
    "DELETE FROM kinds",
    "INSERT INTO kinds (kind, submitted) SELECT kind, sum((state = 'running') + "
    "(state = 'queued' AND attempts > 0) - (state = 'scheduled' AND attempts = 0)) "
    "FROM tasks GROUP BY kind",
)


def kind_stats(row: tuple) -> KindStats:
    size = 2 + len(DURATION_BUCKETS)
    wait, run = row[6:6 + size], row[6 + size:]
    return KindStats(*row[:6], Histogram(tuple(wait[2:]), wait[0], wait[1]),
                     Histogram(tuple(run[2:]), run[0], run[1]))


#: The operator's view finds finished tasks by id (keyset pages, newest or oldest
#: first) within one state, or one kind and state: a seek on one of these and a walk
#: along it, so the thousandth page costs what the first does (``retried_as`` rides
#: along, for a bulk retry's "not retried yet", so a count reads the index alone).
#: They hold the finished tasks only (the history, where the hundreds of thousands
#: are): a submit and a claim write no more pages than before, and a task's end one
#: entry in each. The running tasks are on ``tasks_running`` (a claim adds one entry,
#: an end removes it: upkeep's look for tasks whose process died reads it too, not the
#: whole table). The waiting ones (at most QUEUE_MAX_QUEUED queued, as many scheduled)
#: are found where the queue finds them: see :func:`~dashboard.local.sqlite.find_sql`.
#: (A query names the finished states as written here, so SQLite sees it may use them
#: and reads what it needs from the index alone.)
FINISHED_SQL = "state IN ('cancelled', 'done', 'failed')"
FIND_INDEXES = f"""
CREATE INDEX tasks_state ON tasks (state, id, retried_as) WHERE {FINISHED_SQL};
CREATE INDEX tasks_kind ON tasks (kind, state, id, retried_as) WHERE {FINISHED_SQL};
CREATE INDEX tasks_running ON tasks (id) WHERE state = 'running';
"""

#: How many finished tasks the file holds (``meta.kept``), kept as they come and go,
#: so pruning the history to QUEUE_HISTORY reads one number, not a count of it.
KEPT = """
ALTER TABLE meta ADD COLUMN kept INTEGER NOT NULL DEFAULT 0;
UPDATE meta SET kept = (SELECT count(*) FROM tasks WHERE finished_at IS NOT NULL);
CREATE TRIGGER tasks_kept_added AFTER INSERT ON tasks WHEN NEW.finished_at IS NOT NULL
BEGIN
    UPDATE meta SET kept = kept + 1;
END;
CREATE TRIGGER tasks_kept AFTER UPDATE OF finished_at ON tasks
WHEN (OLD.finished_at IS NULL) != (NEW.finished_at IS NULL)
BEGIN
    UPDATE meta SET kept = kept + (NEW.finished_at IS NOT NULL) - (OLD.finished_at IS NOT NULL);
END;
CREATE TRIGGER tasks_kept_forgotten AFTER DELETE ON tasks WHEN OLD.finished_at IS NOT NULL
BEGIN
    UPDATE meta SET kept = kept - 1;
END;
"""

#: Buckets of a health histogram: one per DURATION_BUCKETS bound, and one past them.
HEALTH_BUCKETS = len(DURATION_BUCKETS) + 1
#: Minutes in the health window.
WINDOW_MINUTES = HEALTH_WINDOW // 60
#: What a minute of one kind counts, as the memory store's ``_Minute``: tasks done and
#: failed, the run times of the attempts that ended so (in the minute they ended), and
#: the waits of every start (in the minute it started), a count per histogram bucket
#: (``run_3``: runs above DURATION_BUCKETS[2] and up to DURATION_BUCKETS[3]; the last,
#: past every bound), as :func:`~dashboard.records.percentile` reads them.
MINUTE_COLUMNS = ("done", "failed", *(f"run_{i}" for i in range(HEALTH_BUCKETS)),
                  *(f"wait_{i}" for i in range(HEALTH_BUCKETS)))

#: Each kind's last hour. The minute being counted lives in the kind's row of
#: ``kinds`` (its ``h_*`` columns: a row a start and an end update anyway, so
#: counting writes no page more); when a start or an end falls in another minute, the
#: kind's last one moves to ``kind_minutes`` first, as meta's current second moves to
#: ``seconds``, and the minutes there older than HEALTH_WINDOW go: the table holds at
#: most an hour per kind, and a read adds up an hour of rows, never the history.
#: Minutes are on the wall clock (seconds since the epoch // 60), as people read them
#: and the memory store counts them.
KIND_MINUTES = "".join([
    "\nALTER TABLE kinds ADD COLUMN h_minute INTEGER;\n",
    *(f"ALTER TABLE kinds ADD COLUMN h_{c} INTEGER NOT NULL DEFAULT 0;\n"
      for c in MINUTE_COLUMNS),
    "CREATE TABLE kind_minutes (\n    minute INTEGER NOT NULL,\n    kind TEXT NOT NULL,\n",
    *(f"    {c} INTEGER NOT NULL DEFAULT 0,\n" for c in MINUTE_COLUMNS),
    "    PRIMARY KEY (minute, kind)\n) WITHOUT ROWID;\n",
])


def _in_bucket(value: str, i: int) -> str:
    """SQL: is ``value`` (seconds) in bucket ``i``, as :func:`bisect.bisect_left` finds it
    in the memory store (above bound i - 1, up to bound i)?"""
    low = f"{value} > {DURATION_BUCKETS[i - 1]!r}" if i else ""
    high = f"{value} <= {DURATION_BUCKETS[i]!r}" if i < len(DURATION_BUCKETS) else ""
    return " AND ".join(t for t in (low, high) if t)


def _health_trigger(name: str, when: str, minute: str, counts: dict[str, str]) -> str:
    """A trigger counting one start or end of a task in its kind's current minute
    (``minute``, SQL): the minute counted before, if another, moves to kind_minutes
    first, and the minutes there over an hour before this one go (a seek on the
    table's first rows, which mostly finds none). ``counts``: the SQL added to each of
    MINUTE_COLUMNS it names. Plain updates of the kind's one row (a page the kinds
    trigger writes anyway), no join: these run at every start and end."""
    flush = ", ".join(f"h_{c}" for c in MINUTE_COLUMNS)
    added = ", ".join(f"{c} = {c} + excluded.{c}" for c in MINUTE_COLUMNS)
    zero = ", ".join(f"h_{c} = 0" for c in MINUTE_COLUMNS)
    count = ",\n        ".join(f"h_{c} = h_{c} + ({sql})" for c, sql in counts.items())
    return f"""
CREATE TRIGGER {name} AFTER UPDATE OF state ON tasks
WHEN {when}
BEGIN
    INSERT OR IGNORE INTO kinds (kind) VALUES (NEW.kind);
    INSERT INTO kind_minutes (minute, kind, {", ".join(MINUTE_COLUMNS)})
        SELECT h_minute, kind, {flush} FROM kinds
        WHERE kind = NEW.kind AND h_minute IS NOT NULL AND h_minute != {minute}
        ON CONFLICT (minute, kind) DO UPDATE SET {added};
    DELETE FROM kind_minutes WHERE minute <= {minute} - {WINDOW_MINUTES};
    UPDATE kinds SET h_minute = {minute}, {zero}
    WHERE kind = NEW.kind AND h_minute IS NOT {minute};
    UPDATE kinds SET
        {count}
    WHERE kind = NEW.kind;
END;
"""


_WAITED = "max(0, NEW.started_clock - NEW.queued_clock)"
_RAN = "max(0, NEW.finished_clock - NEW.started_clock)"
KIND_MINUTE_TRIGGERS = _health_trigger(
    "tasks_health_started", "NEW.state = 'running' AND OLD.state != 'running'",
    "CAST(NEW.started_at / 60 AS INTEGER)",
    {f"wait_{i}": _in_bucket(_WAITED, i) for i in range(HEALTH_BUCKETS)},
) + _health_trigger(
    "tasks_health_ended", "OLD.state = 'running' AND NEW.state IN ('done', 'failed')",
    "CAST(NEW.finished_at / 60 AS INTEGER)",
    {"done": "NEW.state = 'done'", "failed": "NEW.state = 'failed'",
     **{f"run_{i}": _in_bucket(_RAN, i) for i in range(HEALTH_BUCKETS)}},
)

#: Each kind's minutes in the window (``minute > ?``, twice): those moved to
#: kind_minutes and the one each kind counts now, added up.
HEALTH_SQL = (
    f"SELECT kind, {', '.join(f'sum({c})' for c in MINUTE_COLUMNS)} FROM ("
    f"SELECT kind, {', '.join(MINUTE_COLUMNS)} FROM kind_minutes WHERE minute > ? "
    f"UNION ALL SELECT kind, {', '.join(f'h_{c}' for c in MINUTE_COLUMNS)} FROM kinds "
    f"WHERE h_minute > ?) GROUP BY kind"
)

# (A new file is made as version 5 was, then what 6 adds: one definition of each.)
SCHEMA = (TABLES + KINDS + PROCESS_TABLES + TRIGGERS + KIND_TRIGGERS + FIND_INDEXES + KEPT
          + KIND_MINUTES + KIND_MINUTE_TRIGGERS)

# Version 5 had no operator's view, nor a count of the finished tasks. Its params were
# json.dumps's default text: the upgrade rewrites them as params_text (see
# SqliteStore._upgrade_params_from_5).
UPGRADE_FROM_5 = FIND_INDEXES + KEPT + KIND_MINUTES + KIND_MINUTE_TRIGGERS

# Version 4 kept totals only. Each kind counts from the upgrade on (the tasks still
# waiting then count as submitted: they are, until they start).
UPGRADE_FROM_4 = KINDS + KIND_TRIGGERS

# Version 3 had no periodic schedules.
UPGRADE_FROM_3 = """
ALTER TABLE tasks ADD COLUMN schedule TEXT;
""" + SCHEDULES

# Version 2 had no results, keys or delayed tasks.
UPGRADE_FROM_2 = """
ALTER TABLE meta ADD COLUMN scheduled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN result TEXT;
ALTER TABLE tasks ADD COLUMN key TEXT;
ALTER TABLE tasks ADD COLUMN due_at REAL;
ALTER TABLE tasks ADD COLUMN due_clock REAL;
ALTER TABLE tasks ADD COLUMN errors TEXT;
ALTER TABLE tasks ADD COLUMN time_limit REAL;
ALTER TABLE tasks ADD COLUMN logs TEXT;
ALTER TABLE tasks ADD COLUMN logs_dropped INTEGER NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX tasks_key ON tasks (key) WHERE key IS NOT NULL AND finished_at IS NULL;
CREATE INDEX tasks_due ON tasks (due_clock) WHERE state = 'scheduled';
CREATE INDEX tasks_late ON tasks (due_clock) WHERE state = 'queued' AND due_clock IS NOT NULL;
DROP TRIGGER IF EXISTS tasks_refuse_when_full;
DROP TRIGGER IF EXISTS tasks_added;
DROP TRIGGER IF EXISTS tasks_moved;
DROP TRIGGER IF EXISTS tasks_touched;
""" + TRIGGERS

# Version 1 kept these times on the wall clock, and its triggers read it.
UPGRADE_FROM_1 = """
ALTER TABLE meta ADD COLUMN boot TEXT;
ALTER TABLE meta ADD COLUMN last_claim REAL;
ALTER TABLE tasks ADD COLUMN queued_clock REAL;
ALTER TABLE tasks ADD COLUMN started_clock REAL;
ALTER TABLE tasks ADD COLUMN finished_clock REAL;
ALTER TABLE tasks ADD COLUMN clock REAL;
DROP TRIGGER tasks_refuse_when_full;
DROP TRIGGER tasks_added;
DROP TRIGGER tasks_moved;
DROP TRIGGER tasks_touched;
DROP TABLE processes;
DROP TABLE workers;
""" + PROCESS_TABLES  # the triggers: UPGRADE_FROM_2, which follows

# The id comes from meta.next_id (the insert trigger moves it on): ids are
# never reused, without AUTOINCREMENT's extra page per insert.
INSERT = (
    "INSERT INTO tasks (id, kind, params, state, enqueued_at, queued_clock, retry_of, "
    "time_limit) SELECT next_id, ?, ?, 'queued', ?, ?, ?, ? FROM meta"
)
#: A delayed task: scheduled, due at (wall clock, shared clock).
INSERT_SCHEDULED = (
    "INSERT INTO tasks (id, kind, params, state, enqueued_at, retry_of, due_at, due_clock, "
    "time_limit) SELECT next_id, ?, ?, 'scheduled', ?, ?, ?, ?, ? FROM meta"
)

COLUMNS = (
    "id", "kind", "params", "state", "enqueued_at", "started_at", "finished_at", "progress",
    "message", "error", "traceback", "worker", "cancel_requested", "retry_of", "retried_as",
    "attempts", "result", "key", "due_at", "errors", "time_limit", "logs", "logs_dropped",
    "schedule",
)
TASK_COLUMNS = ", ".join(COLUMNS)
T_COLUMNS = ", ".join(f"t.{c}" for c in COLUMNS)


def task_info(row: tuple) -> TaskInfo:
    (task_id, kind, params, state, enqueued_at, started_at, finished_at, progress, message,
     error, traceback, worker, cancel_requested, retry_of, retried_as, attempts, result,
     key, due_at, errors, time_limit, logs, logs_dropped, schedule) = row
    return TaskInfo(
        task_id, kind, json.loads(params), STATES[state], enqueued_at, started_at, finished_at,
        progress, message, error, traceback, worker, bool(cancel_requested), retry_of,
        retried_as, attempts, result, key, due_at, tuple(json.loads(errors)) if errors else (),
        time_limit, tuple(json.loads(logs)) if logs else (), logs_dropped, schedule,
    )


def task_record(row: tuple) -> TaskRecord:
    info = task_info(row)
    record = TaskRecord(info.id, info.kind, info.params, info.enqueued_at)
    record.state = info.state
    record.started_at = info.started_at
    record.worker = info.worker
    record.progress = info.progress
    record.message = info.message
    record.cancel_requested = info.cancel_requested
    record.retry_of = info.retry_of
    record.attempts = info.attempts
    record.key = info.key
    record.due_at = info.due_at
    record.errors = list(info.errors) if info.errors else ()
    record.time_limit = info.time_limit
    record.logs = list(info.logs) if info.logs else ()
    record.logs_dropped = info.logs_dropped
    if info.schedule is not None:
        record.schedule = info.schedule
    return record


def statements(script: str) -> Iterator[str]:
    """Split a script into statements (triggers hold ``;`` of their own)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                yield pending
            pending = ""
