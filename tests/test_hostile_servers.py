"""Regression tests for the server-level defects a hostile review found.

Each test is named after the defect it pins (d13, d14, d11, d1, d2, uWSGI);
each failed on 730f48c. All but one start the real server in a subprocess
(tests/servers.py): a free port, its own process group, always killed at
the end. What ran where comes from the app's log lines, the counting app's
file and GET /api/stats; deadlines only bound a failure, and the one test
that needs a fixed window (a file held locked for longer than the store's
busy timeout) says so.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import sqlite3
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from servers import (
    BIN,
    CountLog,
    DONE_RE,
    HOST,
    ROOT,
    STARTED_RE,
    UWSGI,
    Server,
    Servers,
    free_port,
    parent_pid,
    run_to_exit,
    server_env,
)
from support import wait_for

needs_uwsgi = pytest.mark.skipif(
    not UWSGI.exists(), reason=f"uWSGI is not installed in {BIN} (pip install pyuwsgi)"
)

QUICK = {"FLASK_QUEUE_WORKERS": "1", "FLASK_QUEUE_WORK_TIME": "0.05", "FLASK_QUEUE_SHUTDOWN_TIMEOUT": "10"}

#: The counting app of test_durable.py: a ``count`` task that writes
#: "<id> <pid> start" and "<id> <pid> end" to the file named by COUNT_LOG.
COUNTING = ("--pythonpath", str(ROOT / "tests" / "apps"), "counting:create_app()")

#: The store's busy timeout (SqliteStore's default; no setting lowers it).
BUSY_TIMEOUT = 10.0

WORKER_TIMEOUT = "WORKER TIMEOUT"
SHUTDOWN_LINE = re.compile(r"\[(\d+)\] \[\w+\] dashboard\.queue: shutdown:")


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``start_server(kind, *args, **env)``: see servers.Servers; all are killed at the end."""
    servers = Servers(tmp_path, QUICK)
    try:
        yield servers
    finally:
        servers.stop_all()


def try_request(server: Server, method: str, path: str, body: Any = None,
                timeout: float = 10.0):
    """One request on a new connection, or None when nothing answered."""
    conn = server.connect(timeout=timeout)
    try:
        return server.request(method, path, body, conn)
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def submit(server: Server, kind: str, count: int = 1, **params: Any) -> list[int]:
    reply = server.request("POST", "/api/tasks", {"kind": kind, "count": count, "params": params})
    assert reply.status == 202, reply
    return reply.body["ids"]


def task(server: Server, task_id: int) -> dict[str, Any] | None:
    """GET /api/tasks/<id>: the task, or None for a 404."""
    reply = server.request("GET", f"/api/tasks/{task_id}")
    if reply.status == 404:
        return None
    assert reply.status == 200, reply
    return reply.body


def wait_task(server: Server, task_id: int, state: str = "done",
              timeout: float = 60.0) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        reply = try_request(server, "GET", f"/api/tasks/{task_id}")
        if reply is not None and reply.status == 200 and reply.body["state"] == state:
            return reply.body
        return None

    try:
        return wait_for(reached, timeout, f"task {task_id} {state}", 0.05)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; log:\n{server.log_tail()}") from None


def new_pid_answering(server: Server, old: int, timeout: float = 60.0) -> int:
    """Poll GET /api/stats until a process other than ``old`` answers; its pid."""
    def other() -> int | None:
        if server.exited():
            raise AssertionError(f"{server.name} exited; log:\n{server.log_tail()}")
        reply = try_request(server, "GET", "/api/stats")
        if reply is not None and reply.status == 200 and reply.body["pid"] != old:
            return reply.body["pid"]
        return None

    try:
        return wait_for(other, timeout, f"a process other than {old} answering", 0.02)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; log:\n{server.log_tail()}") from None




# -- 13: gunicorn's timeout and a worker that recycles ---------------------------------


@pytest.mark.server
def test_d13_max_requests_recycle_lets_a_long_task_finish(start_server):
    # The worker recycles after 10 requests; the master kills a worker silent
    # for 3 s; the running task takes 8 s and QUEUE_SHUTDOWN_TIMEOUT promises 30.
    server = start_server("gunicorn", "--max-requests", "10", "--timeout", "3",
                          FLASK_QUEUE_SHUTDOWN_TIMEOUT="30")
    first = server.wait_ready()["pid"]
    [long_task] = submit(server, "pretend", seconds=8)
    server.wait_stats("the long task running", lambda s: s["running"] == 1)
    # More requests: the tenth makes the worker leave; the next process answers.
    second = new_pid_answering(server, first)
    assert parent_pid(second) == server.pid

    log = server.log()
    # A new worker is forked only once the old one has exited: its story is whole.
    assert "Autorestarting worker after current request." in log, log
    assert WORKER_TIMEOUT not in log, "the master killed the recycling worker mid-shutdown"
    runs = [(int(m[1]), int(m[3])) for m in DONE_RE.finditer(log)]
    assert (long_task, first) in runs, f"task {long_task} never finished in {first}:\n{log}"
    # It finished during the worker's shutdown, which began with the recycle.
    shutdown = next(m for m in SHUTDOWN_LINE.finditer(log) if int(m[1]) == first)
    done = next(m for m in DONE_RE.finditer(log) if int(m[1]) == long_task)
    assert shutdown.start() < done.start(), log


@pytest.mark.server
def test_d13_graceful_timeout_shorter_than_the_shutdown_timeout_is_refused(tmp_path):
    port = free_port()
    env = server_env({"BIND": f"{HOST}:{port}", "FLASK_QUEUE_SHUTDOWN_TIMEOUT": "10"})
    args = [str(BIN / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py"),
            "--graceful-timeout", "5"]
    code, out, err = run_to_exit(args, env)
    assert code == 1, err
    assert "Traceback" not in out + err, err
    [line] = [line for line in err.splitlines() if "cannot start" in line]
    assert "graceful_timeout (5s)" in line and "QUEUE_SHUTDOWN_TIMEOUT (10s)" in line, line


# -- 14: max_requests and the in-memory queue ----------------------------------------

RECYCLE_WARNING = "gunicorn restarts each worker after max_requests (100) requests"


@pytest.mark.server
@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_d14_max_requests_with_the_memory_store_warns_once_at_start(start_server, tmp_path,
                                                                      store):
    settings = {"WEB_CONCURRENCY": "2"}
    if store == "sqlite":
        settings["FLASK_QUEUE_URL"] = f"sqlite:///{tmp_path / 'queue.db'}"
    server = start_server("gunicorn", "--max-requests", "100", **settings)
    server.wait_ready()
    server.wait_log("two workers booted",
                    lambda log: log.count("Booting worker with pid") == 2)
    log = server.log()
    if store == "memory":
        # Once, by the master, at start: not once per worker.
        assert log.count(RECYCLE_WARNING) == 1, log
        assert f"[{server.pid}] [WARNING] dashboard.gunicorn:" in log, log
        assert log.index(RECYCLE_WARNING) < log.index("Booting worker with pid"), log
    else:
        assert RECYCLE_WARNING not in log, "the SQLite store keeps queued work: no warning"


@pytest.mark.server
def test_d14_a_task_id_from_before_a_recycle_never_names_another_task(start_server):
    server = start_server("gunicorn", "--max-requests", "20")
    first = server.wait_ready()["pid"]
    [old] = submit(server, "pretend", seconds=0.01)
    before = wait_task(server, old)
    second = new_pid_answering(server, first)
    assert parent_pid(second) == server.pid
    # The new process's own tasks: ids it hands out must not reuse the old one's.
    new = submit(server, "pretend", count=3, seconds=0.02)
    wait_task(server, new[-1])
    assert old not in new, f"the new process handed out id {old} again: {new}"
    after = task(server, old)
    same = ("kind", "params", "enqueued_at")
    assert after is None or {k: after[k] for k in same} == {k: before[k] for k in same}, (
        f"GET /api/tasks/{old} answered with another task: {after} (was {before})"
    )


# -- 11: a worker replaced while the queue file is locked ----------------------------


def worker_pids(server: Server, n: int) -> set[int]:
    """Wait until GET /api/stats lists workers of ``n`` processes of this master."""
    def listed() -> set[int] | None:
        if server.exited():
            raise AssertionError(f"{server.name} exited; log:\n{server.log_tail()}")
        reply = try_request(server, "GET", "/api/stats")
        if reply is None or reply.status != 200:
            return None
        pids = {w["pid"] for w in reply.body["workers"] if parent_pid(w["pid"]) == server.pid}
        return pids if len(pids) == n else None

    try:
        return wait_for(listed, 60, f"workers of {n} processes listed", 0.05)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; log:\n{server.log_tail()}") from None


BOOTING_RE = re.compile(r"Booting worker with pid: (\d+)")


@pytest.mark.server
def test_d11_a_worker_replaced_while_the_file_is_locked_boots_and_the_server_keeps_answering(
    start_server, tmp_path
):
    db = tmp_path / "queue.db"
    server = start_server("gunicorn", WEB_CONCURRENCY="2", FLASK_QUEUE_URL=f"sqlite:///{db}")
    pids = worker_pids(server, 2)
    victim = min(pids)

    with closing(sqlite3.connect(db, isolation_level=None)) as holder:
        holder.execute("BEGIN IMMEDIATE")  # every writer now waits, then fails
        os.kill(victim, signal.SIGKILL)
        replacement = server.wait_log(
            "a replacement worker booting",
            lambda log: next((int(m[1]) for m in BOOTING_RE.finditer(log)
                              if int(m[1]) not in pids), None),
        )
        # The one fixed window: the lock is held for longer than the store's
        # busy timeout after the replacement began to boot (no setting lowers
        # it), so whatever it writes while booting fails. Meanwhile the master
        # runs, the port takes connections, and reads are answered (slowly:
        # a writer waiting for the lock holds its process's connection).
        hold_until = time.monotonic() + BUSY_TIMEOUT + 2
        answers = Counter()
        while time.monotonic() < hold_until:
            assert not server.exited(), f"gunicorn stopped; log:\n{server.log_tail()}"
            reply = try_request(server, "GET", "/api/stats", timeout=BUSY_TIMEOUT * 3)
            assert reply is not None and reply.status == 200, (reply, server.log_tail())
            answers[reply.body["pid"]] += 1
        holder.execute("ROLLBACK")

    assert not server.exited() and parent_pid(replacement) == server.pid, server.log_tail()
    assert answers, "no read was answered while the file was locked"
    # Once the file is free, everything works: tasks run, in both processes'
    # workers (the replacement's start as soon as the file can be written).
    server.wait_log("worker threads started in the replacement",
                    lambda log: any(int(m[2]) == replacement for m in STARTED_RE.finditer(log)))
    assert worker_pids(server, 2) == (pids - {victim}) | {replacement}
    ids = submit(server, "pretend", count=4, seconds=0.1)
    for task_id in ids:
        wait_task(server, task_id)
    log = server.log()
    assert "Worker failed to boot" not in log, log
    assert "damaged" not in log and "Point QUEUE_URL at another file" not in log, log


# -- 1: the in-memory queue after a cancelled backlog --------------------------------


@pytest.mark.server
def test_d1_the_memory_queue_runs_again_after_a_paused_backlog_was_cancelled(start_server):
    server = start_server("gunicorn")
    server.wait_ready()
    assert server.request("POST", "/api/pause").body == {"paused": True}
    backlog = submit(server, "pretend", count=100, seconds=0)
    for task_id in backlog:
        reply = server.request("POST", f"/api/tasks/{task_id}/cancel")
        assert reply.status == 200 and reply.body["state"] == "cancelled", reply
    [last] = submit(server, "pretend", seconds=0)
    assert server.request("POST", "/api/resume").body == {"paused": False}
    # A task that takes no time, one worker idle: a deadline only bounds the failure.
    done = wait_task(server, last, timeout=30)
    assert done["state"] == "done"
    stats = server.stats()
    assert (stats["cancelled"], stats["done"], stats["queued"]) == (100, 1, 0), stats


# -- 2: SQLite, a task whose process is stopping --------------------------------------


@pytest.mark.server
def test_d2_a_task_is_not_started_elsewhere_while_its_stopping_process_runs_it(
    start_server, tmp_path
):
    counts = CountLog(tmp_path / "count.log")
    # Leases of 3 s, renewed every second; a stop gives running tasks 12 s.
    shared = {"FLASK_QUEUE_URL": f"sqlite:///{tmp_path / 'queue.db'}",
              "FLASK_QUEUE_LEASE_TIME": "3", "FLASK_QUEUE_SHUTDOWN_TIMEOUT": "12",
              "COUNT_LOG": str(counts.path)}
    a = start_server("gunicorn", *COUNTING, **shared)
    in_a = a.wait_ready()["pid"]
    # Only A runs: the task starts there, and takes 8 s (several leases).
    [task_id] = submit(a, "count", seconds=8)
    wait_for(lambda: counts.pids("start")[task_id], 30, f"task {task_id} started")
    assert counts.pids("start")[task_id] == [in_a]

    b = start_server("gunicorn", *COUNTING, **shared)
    in_b = b.wait_ready()["pid"]
    b.wait_log("B's workers started", lambda log: STARTED_RE.search(log))
    assert wait_task(b, task_id, "running")["attempts"] == 1

    a.send(signal.SIGTERM)  # A stops, finishing its task first (8 s < 12 s)
    assert a.wait_exit() == 0, a.log_tail()
    a.wait_group_gone()

    assert counts.pids("start")[task_id] == [in_a], (
        f"task {task_id} started again in {in_b} while {in_a} still ran it: {counts.events()}"
    )
    assert counts.pids("end")[task_id] == [in_a], counts.events()
    info = task(b, task_id)
    assert (info["state"], info["attempts"]) == ("done", 1), info
    assert "lease lost" not in a.log(), a.log_tail()
    assert "queued again" not in b.log(), b.log_tail()


# -- uWSGI: every process runs tasks, not only those that served a request ------------


def started_pids(log: str) -> set[int]:
    return {int(m[2]) for m in STARTED_RE.finditer(log)}


@pytest.mark.server
@needs_uwsgi
@pytest.mark.parametrize("lazy", [True, False], ids=["lazy-apps", "app-in-master"])
def test_uwsgi_two_processes_on_one_file_both_run_tasks_from_the_start(
    start_server, tmp_path, lazy
):
    extra = ["--set", "processes=2"]
    if not lazy:
        extra += ["--set", "lazy-apps=false"]
    server = start_server("uwsgi", *extra, FLASK_QUEUE_URL=f"sqlite:///{tmp_path / 'queue.db'}")
    # Before any request: each worker process started its workers.
    pids = server.wait_log("worker threads started in two processes",
                           lambda log: len(started_pids(log)) == 2 and started_pids(log),
                           timeout=30)
    assert server.pid not in pids, "never in the master"
    assert all(parent_pid(pid) == server.pid for pid in pids)
    # One request queues the work; both processes take their share.
    ids = submit(server, "pretend", count=8, seconds=0.5)
    server.wait_log("eight tasks done", lambda log: len(DONE_RE.findall(log)) == 8)
    runs = server.runs()
    assert sorted(run.task_id for run in runs) == sorted(ids), runs
    assert {run.pid for run in runs} == pids, f"not every process ran tasks: {runs}"
    starts = Counter(int(m[2]) for m in STARTED_RE.finditer(server.log()))
    assert starts == Counter({pid: 1 for pid in pids}), f"started more than once: {starts}"


# -- uWSGI: SIGHUP ----------------------------------------------------------------------


@pytest.mark.server
@needs_uwsgi
def test_uwsgi_sighup_reloads_the_workers_and_the_master_goes_on(start_server):
    server = start_server("uwsgi", FLASK_QUEUE_SHUTDOWN_TIMEOUT="30")
    first = server.wait_ready()["pid"]
    [running] = submit(server, "pretend", seconds=3)
    server.wait_stats("the task running", lambda s: s["running"] == 1)
    server.send(signal.SIGHUP)
    second = new_pid_answering(server, first)
    assert parent_pid(second) == server.pid, "the same master forked the new worker"
    log = server.log()
    assert "binary reloading" not in log, log
    # The old worker finished its running task before it went.
    assert (running, first) in {(run.task_id, run.pid) for run in server.runs()}, log
    # The new worker runs tasks (its workers started without waiting for a request).
    [after] = submit(server, "pretend", seconds=0)
    assert wait_task(server, after)["state"] == "done"
    assert (after, second) in {(run.task_id, run.pid) for run in server.runs()}
    assert not server.exited()


def test_d11_a_process_started_after_the_check_builds_its_store_without_opening_the_file(
    tmp_path, monkeypatch
):
    from dashboard import create_app, get_queue
    from dashboard.ext import CHECKED_ENV, vouch_for_store

    checked, other = tmp_path / "checked.db", tmp_path / "other.db"
    settings = {"TESTING": True, "QUEUE_WORKERS": 0, "QUEUE_HANDLE_SIGNALS": False}
    # The master builds the app: the file is checked (created here), then vouched for.
    master_app = create_app({**settings, "QUEUE_URL": f"sqlite:///{checked}"})
    monkeypatch.delenv(CHECKED_ENV, raising=False)
    assert vouch_for_store(master_app)
    assert os.environ[CHECKED_ENV] == str(checked)
    # A later process (a replacement worker) with the file gone for a moment:
    # building the app does not touch it, so it cannot fail for it.
    for name in os.listdir(tmp_path):
        os.remove(tmp_path / name)
    worker_app = create_app({**settings, "QUEUE_URL": f"sqlite:///{checked}"})
    assert not os.listdir(tmp_path), "the vouched-for file was opened while building the app"
    # A file nobody vouched for is still checked at once.
    other_app = create_app({**settings, "QUEUE_URL": f"sqlite:///{other}"})
    assert other.exists()
    for app in (master_app, worker_app, other_app):
        get_queue(app).shutdown(timeout=5)
