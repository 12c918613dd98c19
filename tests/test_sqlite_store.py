"""What only the SQLite store does: survive restarts, share one file, leases, bad files.

Two SqliteStore objects on one file stand for two processes (each has its own
process token and connection); the real multi-process proofs with gunicorn
are in test_durable.py. The store suite common to both stores is
test_engine.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest

from dashboard import create_app, get_queue
from dashboard.config import ConfigError
from dashboard.records import State
from dashboard.local.clock import clock
from dashboard.errors import StoreError
from dashboard.local.sqlite import SCHEMA_VERSION, SqliteStore
from dashboard.tasks import Int
from support import wait_for




def test_the_file_is_wal_with_a_schema_version(db):
    SqliteStore(db)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_queued_work_survives_a_restart_and_runs_once(db, registry, queues):
    ran = []

    @registry.task("note", params={"i": Int(0, 99)})
    def note(ctx, i):
        ran.append(i)

    first = queues(SqliteStore(db))
    ids = [first.submit("note", i=i) for i in range(5)]
    first.run_pending(2)
    assert first.shutdown() == 0  # nothing dropped: it stays in the file
    second = queues(SqliteStore(db))  # the next start, on the same file
    snap = second.stats()
    assert (snap.queued, snap.done, snap.submitted) == (3, 2, 5)
    assert second.run_pending() == 3
    assert ran == [0, 1, 2, 3, 4]
    assert [second.get(i).state for i in ids] == [State.DONE] * 5


def test_two_processes_never_take_the_same_task(db, registry, queues):
    runs = Counter()
    lock = threading.Lock()

    @registry.task("count")
    def count(ctx):
        with lock:
            runs[ctx.task_id] += 1

    # Two stores on one file: two process tokens, two connections, as two processes.
    a = queues(SqliteStore(db, poll_interval=0.01), workers=3)
    b = queues(SqliteStore(db, poll_interval=0.01), workers=3)
    a.start()
    b.start()
    ids = a.submit_many("count", 300) + b.submit_many("count", 300)
    assert a.join(timeout=60) and b.join(timeout=60)
    assert set(runs) == set(ids) and set(runs.values()) == {1}
    snap = a.stats()
    assert (snap.done, snap.queued, snap.running) == (600, 0, 0)
    assert {w.pid for w in snap.workers} == {os.getpid()}
    assert len(snap.workers) == 6  # both "processes" list their workers
    assert sum(w.done for w in snap.workers) == 600


def test_one_view_from_every_process(db, registry, queues):
    @registry.task("noop")
    def noop(ctx):
        pass

    a = queues(SqliteStore(db))
    b = queues(SqliteStore(db))
    a.submit_many("noop", 4)
    b.run_pending(1)
    sa, sb = a.stats(), b.stats()
    assert sa.tag == sb.tag  # one tag for one state: a 304 from either process is right
    assert (sa.queued, sa.done) == (sb.queued, sb.done) == (3, 1)
    a.pause()
    assert b.stats().paused  # a pause pauses every process
    assert b.run_pending() == 0
    b.resume()
    assert a.run_pending() == 3


def test_a_dead_process_tasks_are_queued_again_then_failed(db, registry, queues):
    @registry.task("noop")
    def noop(ctx):
        pass

    dying = SqliteStore(db, lease_time=0.5, max_attempts=2)
    survivor = SqliteStore(db, lease_time=0.5, max_attempts=2)
    queue = queues(survivor)
    task_id = queue.submit("noop")
    first = dying.claim(None, block=False)  # claimed, then its process "dies": no renewal
    assert first.id == task_id and first.attempts == 1
    # Gone, as far as the file can tell: it holds and renews nothing, and its
    # pid (ours) cannot say whether it runs, so only the lease can.
    dying.reset_after_fork()
    wait_for(lambda: survivor.maintain() or survivor.get(task_id).state is State.QUEUED,
             timeout=10, what="the lease to expire and the task to be queued again")
    info = survivor.get(task_id)
    assert "stopped during attempt 1" in info.message
    second = dying.claim(None, block=False)  # the second attempt dies too
    assert second.attempts == 2
    dying.reset_after_fork()
    wait_for(lambda: survivor.maintain() or survivor.get(task_id).state is State.FAILED,
             timeout=10, what="the task to be failed after its last attempt")
    info = survivor.get(task_id)
    assert info.error.startswith("gave up after 2 attempts: the process running it stopped")
    snap = queue.stats()
    assert (snap.failed, snap.running, snap.queued) == (1, 0, 0)
    # The dead process finishing late changes nothing: its lease was lost.
    dying.finish(second, State.DONE)
    assert survivor.get(task_id).state is State.FAILED and queue.stats().done == 0


def test_a_live_process_keeps_its_tasks_by_renewing_the_lease(db, registry, queues):
    release = threading.Event()
    started = threading.Event()

    @registry.task("slow")
    def slow(ctx):
        started.set()
        release.wait(30)

    owner = queues(SqliteStore(db, lease_time=0.6), workers=1)
    other = SqliteStore(db, lease_time=0.6)
    owner.start()
    task_id = owner.submit("slow")
    assert started.wait(30)
    deadline = time.monotonic() + 2.0  # over three lease times: the supervisor renews
    while time.monotonic() < deadline:
        other.maintain()
        assert other.get(task_id).state is State.RUNNING
        time.sleep(0.05)
    release.set()
    assert owner.join(timeout=30)
    assert owner.get(task_id).attempts == 1


def test_graceful_shutdown_queues_again_what_it_could_not_finish(db, registry, queues, caplog):
    started = threading.Event()
    release = threading.Event()

    @registry.task("stuck")
    def stuck(ctx):
        started.set()
        release.wait(30)

    q = queues(SqliteStore(db), workers=1)
    q.start()
    task_id = q.submit("stuck")
    assert started.wait(30)
    q.shutdown(timeout=0.1)
    info = SqliteStore(db).get(task_id)
    assert info.state is State.QUEUED and "stopped before it finished" in info.message
    assert "queued again" in caplog.text
    release.set()
    q._threads["worker-1"].join(30)


def test_workers_of_a_process_that_stopped_are_dropped(db, registry, queues):
    gone = SqliteStore(db, lease_time=0.3)
    gone.add_worker("worker-1")
    watcher = queues(SqliteStore(db, lease_time=0.3), workers=1)
    watcher.start()
    assert len(watcher.stats().workers) == 2
    wait_for(lambda: watcher.store.maintain() or len(watcher.stats().workers) == 1,
             timeout=10, what="the silent process's worker to be dropped")


def test_the_history_is_pruned_by_count_and_age_in_batches(db, registry, queues):
    @registry.task("noop")
    def noop(ctx):
        pass

    store = SqliteStore(db, history=10)
    q = queues(store)
    q.submit_many("noop", 100)
    q.run_pending()
    assert store.prune(batch=7) == 90  # 13 short transactions
    snap = q.stats(50)
    assert len(snap.recent) == 10 and snap.done == 100  # the counters keep the totals
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE tasks SET finished_at = finished_at - 1e6")
    conn.close()
    store.retention = 3600
    assert store.prune() == 10
    assert q.stats().recent == ()


def test_a_million_tasks_leave_the_file_small(db):
    """Finished rows written in bulk, a million in all, pruned as the queue would."""
    store = SqliteStore(db, history=1_000)
    conn = sqlite3.connect(db)
    sizes = []
    try:
        for _ in range(100):
            now = time.time()
            with conn:
                conn.executemany(
                    "INSERT INTO tasks (kind, params, state, enqueued_at, started_at, "
                    "finished_at) VALUES ('noop', '{}', 'done', ?, ?, ?)",
                    ((now, now, now) for _ in range(10_000)),
                )
            store.prune(batch=5_000)
            sizes.append(os.path.getsize(db) + os.path.getsize(db + "-wal"))
    finally:
        conn.close()
    with sqlite3.connect(db) as check:
        assert check.execute("SELECT count(*) FROM tasks").fetchone()[0] == 1_000
        assert check.execute("SELECT max(id) FROM tasks").fetchone()[0] == 1_000_000
    check.close()
    assert max(sizes[10:]) <= 1.5 * max(sizes[:10])  # flat: freed pages are reused


# -- bad files: a clear error at start, nothing changed ----------------------------------


def fingerprint(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns


def test_a_corrupt_file_is_refused_and_left_alone(db):
    with open(db, "wb") as f:
        f.write(b"this is no database " * 200)
    before = fingerprint(db)
    with pytest.raises(StoreError, match="is not a usable SQLite database .* Nothing was changed"):
        SqliteStore(db)
    assert fingerprint(db) == before
    assert sorted(os.listdir(os.path.dirname(db))) == ["queue.db"]


def test_a_schema_from_the_future_is_refused_and_left_alone(db):
    SqliteStore(db)
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    before = fingerprint(db)
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this "
                                         f"code knows \\({SCHEMA_VERSION}\\)"):
        SqliteStore(db)
    assert fingerprint(db) == before


def test_another_apps_database_is_refused_and_left_alone(db):
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    conn.close()
    before = fingerprint(db)
    with pytest.raises(StoreError, match="a SQLite database of something else"):
        SqliteStore(db)
    assert fingerprint(db) == before


def test_an_unwritable_place_is_refused():
    # Tests run as root, for whom chmod changes nothing: /proc is a read-only place for anyone.
    with pytest.raises(StoreError, match="must be writable"):
        SqliteStore("/proc/queue.db")
    with pytest.raises(StoreError, match="the directory /no/such/dir does not exist"):
        SqliteStore("/no/such/dir/queue.db")


def test_the_app_reports_a_bad_queue_url_as_a_config_error(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"x" * 100)
    with pytest.raises(ConfigError, match="QUEUE_URL: .*bad.db is not a usable SQLite database"):
        create_app({"QUEUE_URL": f"sqlite:///{bad}", "QUEUE_HANDLE_SIGNALS": False})
    with pytest.raises(ConfigError, match="QUEUE_URL must be memory://, sqlite:///path"):
        create_app({"QUEUE_URL": "postgres://localhost", "QUEUE_HANDLE_SIGNALS": False})


def test_a_relative_path_lives_in_the_instance_folder(tmp_path):
    app = create_app({"QUEUE_URL": "sqlite:///q.db", "QUEUE_HANDLE_SIGNALS": False, "QUEUE_WORKERS": 0})
    try:
        assert get_queue(app).store.path == os.path.join(app.instance_path, "q.db")
        assert os.path.exists(os.path.join(app.instance_path, "q.db"))
    finally:
        get_queue(app).shutdown()
        for suffix in ("", "-wal", "-shm"):
            path = os.path.join(app.instance_path, "q.db" + suffix)
            if os.path.exists(path):
                os.remove(path)


def test_the_dashboard_runs_on_the_sqlite_store(tmp_path):
    app = create_app({"QUEUE_URL": f"sqlite:///{tmp_path}/q.db", "QUEUE_WORKERS": 0,
                      "QUEUE_HANDLE_SIGNALS": False, "QUEUE_WORK_TIME": 0})
    queue = get_queue(app)
    try:
        client = app.test_client()
        assert client.post("/tasks", data={"count": "3"}).status_code == 303
        queue.run_pending()
        live = client.get("/live", headers={"HX-Request": "true"})
        assert b'id="count-done">3<' in live.data
        again = client.get("/live", headers={"HX-Request": "true", "HX-PTag": live.headers["HX-PTag"]})
        assert again.status_code == 304
        assert client.get("/api/tasks/2").json["state"] == "done"
    finally:
        queue.shutdown()


def test_the_page_lists_the_workers_of_every_process(tmp_path):
    path = tmp_path / "q.db"
    app = create_app({"QUEUE_URL": f"sqlite:///{path}", "QUEUE_WORKERS": 1, "QUEUE_HANDLE_SIGNALS": False})
    queue = get_queue(app)
    try:
        client = app.test_client()
        client.get("/")  # starts this process's worker
        with sqlite3.connect(path) as conn:  # another live process, as the file sees it
            # (no boot or pid namespace: nobody can tell whether it runs, so its
            # heartbeat, on the shared clock, says it does)
            conn.execute("INSERT INTO processes (token, pid, host, started_at, heartbeat_at) "
                         "VALUES ('other', 4242, 'host', ?, ?)", (time.time(), clock()))
            conn.execute("INSERT INTO workers (process, name, pid) VALUES ('other', 'worker-1', 4242)")
        conn.close()
        html = client.get("/").data
        assert b"in 2 processes" in html
        assert f'id="worker-{os.getpid()}-worker-1"'.encode() in html
        assert b'id="worker-4242-worker-1"' in html
        assert b"queue in a SQLite file shared by every process" in html
    finally:
        queue.shutdown()


# -- upgrading a file of the first release ----------------------------------------------

V1_FILE = os.path.join(os.path.dirname(__file__), "data", "queue-v1.db")


def test_a_schema_1_file_is_upgraded_in_place_keeping_every_task(tmp_path, registry, queues):
    """queue-v1.db was written by the first release: two finished tasks, one left
    running by a process that is gone, three queued."""
    @registry.task("pretend", params={"seconds": Int(0, 10)})
    def pretend(ctx, seconds=0):
        pass

    path = tmp_path / "queue.db"
    shutil.copyfile(V1_FILE, path)
    store = SqliteStore(str(path))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
    q = queues(store)
    assert [q.get(i).state for i in (1, 2)] == [State.DONE, State.FAILED]
    assert q.get(2).error == "RuntimeError: boom"
    store.maintain()  # the running task's process is long gone: back in the queue
    info = q.get(3)
    assert info.state is State.QUEUED and "stopped" in info.message
    assert q.run_pending() == 4
    snap = q.stats()
    assert (snap.done, snap.failed, snap.queued, snap.running) == (5, 1, 0, 0)
    assert q.submit("pretend") == 7  # ids go on where they were
    SqliteStore(str(path))  # opening again changes nothing


V2_FILE = os.path.join(os.path.dirname(__file__), "data", "queue-v2.db")


def test_a_schema_2_file_is_upgraded_in_place_and_keeps_results_from_then_on(
        tmp_path, registry, queues):
    """queue-v2.db was written by the release before results: one task done, one
    failed, one queued."""
    @registry.task("pretend", params={"seconds": Int(0, 10)})
    def pretend(ctx, seconds=0):
        return {"slept": seconds}

    path = tmp_path / "queue.db"
    shutil.copyfile(V2_FILE, path)
    q = queues(SqliteStore(str(path)))
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert [q.get(i).state for i in (1, 2, 3)] == [State.DONE, State.FAILED, State.QUEUED]
    assert q.get(1).result is None and q.get(2).error == "RuntimeError: boom"
    assert q.run_pending() == 1
    assert q.get(3).result == {"slept": 2}
    assert q.submit("pretend", seconds=4) == 4  # ids go on where they were


def test_a_schema_1_file_in_use_by_the_old_release_is_not_upgraded(tmp_path):
    path = tmp_path / "queue.db"
    shutil.copyfile(V1_FILE, path)
    with sqlite3.connect(path) as conn:  # a process of the old release, alive just now
        conn.execute("UPDATE processes SET heartbeat_at = ?, pid = 4242", (time.time(),))
    conn.close()
    before = fingerprint(path)
    with pytest.raises(StoreError, match=r"in use by an older release \(pids 4242\)"):
        SqliteStore(str(path))
    assert fingerprint(path) == before


class _ConnectionRacedAfter:
    """A connection on which, right after the first statement that reads the schema
    version, ``race()`` runs (another process's step)."""

    def __init__(self, conn, race):
        self._conn, self._race = conn, race

    def execute(self, sql, *args):
        cursor = self._conn.execute(sql, *args)
        if "user_version" in sql and self._race is not None:
            race, self._race = self._race, None
            cursor = _Fetched(cursor.fetchall())
            race()
        return cursor

    def __getattr__(self, name):
        return getattr(self._conn, name)


class _Fetched:
    def __init__(self, rows):
        self._rows = rows

    def fetchone(self):
        return self._rows[0] if self._rows else None

    def fetchall(self):
        return self._rows


def test_a_file_created_by_another_process_during_the_check_is_not_called_foreign(
        tmp_path, monkeypatch):
    """The check that refuses someone else's database read the schema version, then
    the tables, in two statements: another process creating the schema in between
    made a brand-new queue file look like "a SQLite database of something else"
    (seen once in CI, eight processes starting at once)."""
    import sqlite3

    path = str(tmp_path / "queue.db")
    connect = sqlite3.connect
    raced = []

    def other_process_creates_the_schema():
        monkeypatch.setattr(sqlite3, "connect", connect)
        SqliteStore(path).close()
        raced.append(True)

    def connect_then_race(*args, **kwargs):
        return _ConnectionRacedAfter(connect(*args, **kwargs), other_process_creates_the_schema)

    monkeypatch.setattr(sqlite3, "connect", connect_then_race)
    store = SqliteStore(path)
    try:
        assert raced and store.snapshot().queued == 0
    finally:
        store.close()


def test_processes_creating_the_file_at_the_same_moment_all_start(tmp_path):
    """uWSGI workers that each build the app create a new file together; SQLite may
    answer "locked" at once, without waiting, to all but one (seen in CI: a worker
    failed to load the app, and uWSGI's need-app stopped the server). The race is
    narrow: without the retry, this failed in about one run of three here."""
    path = tmp_path / "queue.db"
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from dashboard.local.sqlite import SqliteStore
        while not os.path.exists({str(go)!r}):
            time.sleep(0.001)
        SqliteStore({str(path)!r})
    """)
    for attempt in range(5):  # the race is narrow: several rounds of eight
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(f"{path}{suffix}"):
                os.remove(f"{path}{suffix}")
        if go.exists():
            go.unlink()
        children = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE,
                                     text=True) for _ in range(8)]
        go.touch()
        for child in children:
            _, err = child.communicate(timeout=60)
            assert child.returncode == 0, err


@pytest.mark.parametrize("old_clock", ["behind", "ahead"])
def test_after_a_reboot_a_delayed_task_is_due_when_it_was(tmp_path, registry, queues, old_clock):
    """Regression: after a reboot the clock values in the file count from the old boot,
    and a delayed task's due time was not restated with the others: it fell due at
    once (the old clock was behind ours) or days late (it was ahead)."""
    @registry.task("pretend")
    def pretend(ctx):
        pass

    path = tmp_path / "queue.db"
    task_id = queues(SqliteStore(str(path))).submit("pretend", delay=120)
    with closing(sqlite3.connect(path)) as conn, conn:  # as the last boot left the file
        conn.execute("UPDATE meta SET boot = 'the-boot-before'")
        conn.execute("UPDATE tasks SET due_clock = due_clock + ?",
                     (-1e6 if old_clock == "behind" else 1e6,))
    q = queues(SqliteStore(str(path)))  # this boot takes the file over
    assert q.run_pending() == 0
    assert q.get(task_id).state is State.SCHEDULED
    with closing(sqlite3.connect(path)) as conn:
        (due_clock,) = conn.execute("SELECT due_clock FROM tasks WHERE id = ?",
                                    (task_id,)).fetchone()
    assert abs(due_clock - clock() - 120) < 10
