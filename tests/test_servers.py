"""The real servers, each started in a subprocess on a free port.

Workers start exactly once per serving process, and only there; a task runs
once, and never in a reloader's watching parent or in a gunicorn/uWSGI
master. On SIGTERM or SIGINT the queue closes (a submission that still
reaches the app gets 503), the running task gets QUEUE_SHUTDOWN_TIMEOUT to finish,
the queued tasks dropped are counted in the log, and the process exits by
itself, also when a task would run far longer than that.

What ran where comes from the app's log lines (see tests/servers.py); the
serving pid from GET /api/stats, the parent's or master's pid from the
process we started. Deadlines only bound failures: nothing here asserts how
long anything took.

Not tested: a graceful stop under ``flask run --debug``; the reloader does
not allow one. SIGTERM to its parent kills the child at once (SIGKILL from
``subprocess.call`` as the parent exits): the running task is cut off and
nothing is logged. SIGINT to the parent alone, or to the whole group (Ctrl+C):
the child is killed 0.25 s later; with Ctrl+C it gets as far as logging the
dropped count, but a running task never finishes.
"""

from __future__ import annotations

import os
import re
import signal
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import pytest

from servers import (
    ABANDONED_RE,
    BIN,
    DONE_RE,
    DROPPED_RE,
    ROOT,
    STARTED_RE,
    UWSGI,
    HeldSubmit,
    Server,
    Servers,
    assert_each_ran_once,
    fill_thread_pool,
    finish_held,
    free_port,
    ignored_signals,
    parent_pid,
    probe_new_connections,
    server_env,
)

pytestmark = pytest.mark.server

needs_uwsgi = pytest.mark.skipif(
    not UWSGI.exists(), reason=f"uWSGI is not installed in {BIN} (pip install pyuwsgi)"
)

#: Short tasks by default; each test sets what it needs on top.
QUICK = {"FLASK_QUEUE_WORKERS": "2", "FLASK_QUEUE_WORK_TIME": "0.05", "FLASK_QUEUE_SHUTDOWN_TIMEOUT": "10"}

StartServer = Callable[..., Server]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """``start_server(kind, *args, ignore=(), **env)`` starts a server; all are killed at the end.

    ``kind`` is flask, flask-debug, gunicorn or uwsgi; ``args`` are added to
    its command line, ``env`` to QUICK in its environment; ``ignore`` names
    signals it starts with ignored (SIGINT and SIGTERM are otherwise at their
    defaults, whatever this process has).
    """
    servers = Servers(tmp_path, QUICK)
    try:
        yield servers
    finally:
        servers.stop_all()


def assert_workers_started_once_in(server: Server, *pids: int) -> None:
    starts = server.starts()
    assert starts == Counter({pid: 1 for pid in pids}), (
        f"worker threads started {dict(starts)}, expected once in each of {pids}"
    )


# -- where workers start and tasks run ------------------------------------------


def test_flask_run_starts_workers_once_in_the_serving_process(start_server):
    server = start_server("flask")
    stats = server.wait_ready()
    assert stats["pid"] == server.pid, "without the reloader, the process we started serves"
    ids = server.submit(count=6)
    server.wait_done(6)
    assert_each_ran_once(server.runs(), server.pid, ids)
    assert {run.pid for run in server.runs()} == {server.pid}
    assert_workers_started_once_in(server, server.pid)


def test_flask_debug_runs_three_tasks_exactly_three_times(start_server):
    server = start_server("flask-debug")
    child = server.wait_ready()["pid"]
    assert child != server.pid, "under --debug the reloader's child serves"
    assert parent_pid(child) == server.pid
    ids = server.submit(count=3)
    server.wait_done(3)
    runs = server.runs()
    assert len(runs) == 3, runs
    assert_each_ran_once(runs, child, ids)
    # Only the child ever started workers, so no other process can run a task.
    assert_workers_started_once_in(server, child)


def test_flask_debug_reload_gives_the_new_child_its_own_workers(start_server, tmp_path):
    watched = tmp_path / "watched.txt"
    watched.write_text("before\n")
    server = start_server("flask-debug", "--extra-files", str(watched),
                          FLASK_QUEUE_WORKERS="1", FLASK_QUEUE_SHUTDOWN_TIMEOUT="1")
    parent = server.pid
    child_a = server.wait_ready()["pid"]
    assert child_a != parent and parent_pid(child_a) == parent
    first = server.submit(count=3)
    server.wait_done(3)
    # Leave A busy at the reload: a task it cannot finish, two queued behind it.
    [endless] = server.submit(seconds=600)
    left_queued = server.submit(count=2)
    server.wait_stats("A running one task, two queued",
                      lambda s: s["running"] == 1 and s["queued"] == 2)

    watched.write_text("after\n")
    stat = watched.stat()
    # A later mtime, whatever the file system's time resolution.
    os.utime(watched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    stats_b = server.wait_stats("a new child serving", lambda s: s["pid"] != child_a)
    child_b = stats_b["pid"]
    assert child_b != parent and parent_pid(child_b) == parent
    assert stats_b["submitted"] == 0 and len(stats_b["workers"]) == 1, stats_b
    second = server.submit(count=3)
    server.wait_done(3)

    log = server.log()
    assert f"Detected change in '{watched}'" in log
    runs = server.runs()
    assert_each_ran_once(runs, child_a, first)
    assert_each_ran_once(runs, child_b, second)
    assert {run.pid for run in runs} == {child_a, child_b}, "the parent never runs a task"
    assert len(runs) == len(set((run.pid, run.task_id) for run in runs)) == 6, runs
    # A's unfinished work is gone with A, and said so; B never ran any of it.
    assert endless not in {r.task_id for r in runs if r.pid == child_a}
    assert server.dropped() == [len(left_queued)]
    assert len(ABANDONED_RE.findall(log)) == 1
    assert_workers_started_once_in(server, child_a, child_b)


@pytest.mark.parametrize("extra", [(), ("--preload",)], ids=["config", "preload"])
def test_gunicorn_runs_tasks_in_its_worker_only(start_server, extra):
    server = start_server("gunicorn", *extra, FLASK_QUEUE_WORKERS="3")
    master = server.pid
    worker = server.wait_ready()["pid"]
    assert worker != master and parent_pid(worker) == master
    log = server.log()
    assert "Using worker: gthread" in log
    ids = server.submit(count=6)
    server.wait_done(6)
    assert_each_ran_once(server.runs(), worker, ids)
    assert {run.pid for run in server.runs()} == {worker}, "no task ever runs in the master"
    assert_workers_started_once_in(server, worker)
    assert len(server.stats()["workers"]) == 3


def test_gunicorn_preload_two_processes_each_start_their_own(start_server):
    server = start_server("gunicorn", "--preload", "--workers", "2")
    master = server.pid
    server.wait_ready()
    # post_worker_init starts each process's workers at boot, before any request.
    server.wait_log("worker threads started in two processes",
                    lambda log: len({m[2] for m in STARTED_RE.finditer(log)}) == 2)
    workers = set(server.starts())
    assert master not in workers
    assert all(parent_pid(pid) == master for pid in workers)
    submitted = [task_id for _ in range(10) for task_id in server.submit()]
    server.wait_log("10 tasks done", lambda log: len(DONE_RE.findall(log)) >= 10)
    runs = server.runs()
    assert len(runs) == 10, runs
    assert {run.pid for run in runs} <= workers, "no task ever runs in the master"
    assert sorted(run.task_id for run in runs) == sorted(submitted)
    # Each process has a queue of its own, yet no id names two tasks: in-memory
    # ids are the microsecond a task was queued (see test_hostile_servers d14).
    assert len(set(submitted)) == len(submitted) == 10
    assert_workers_started_once_in(server, *workers)
    assert server.log().count("worker processes each have their own in-memory queue") == 2


@needs_uwsgi
@pytest.mark.parametrize("lazy", [True, False], ids=["lazy-apps", "app-in-master"])
def test_uwsgi_runs_tasks_in_its_worker_only(start_server, lazy):
    extra = () if lazy else ("--set", "lazy-apps=false")
    server = start_server("uwsgi", *extra, FLASK_QUEUE_WORKERS="3")
    master = server.pid
    worker = server.wait_ready()["pid"]
    assert worker != master and parent_pid(worker) == master
    # Where uWSGI loaded the app: in the worker, or in the master before the fork.
    loaded_in = server.wait_log("the app loaded", lambda log: _uwsgi_app_pid(log))
    assert loaded_in == (worker if lazy else master)
    ids = server.submit(count=6)
    server.wait_done(6)
    assert_each_ran_once(server.runs(), worker, ids)
    assert {run.pid for run in server.runs()} == {worker}, "no task ever runs in the master"
    assert_workers_started_once_in(server, worker)


def _uwsgi_app_pid(log: str) -> int | None:
    for line in log.splitlines():
        if line.startswith("WSGI app 0 ") and " ready " in line and " pid: " in line:
            return int(line.split(" pid: ")[1].split()[0])
    return None


# -- stopping ---------------------------------------------------------------------

#: Request threads of gunicorn.conf.py's gthread worker (GUNICORN_THREADS unset).
GUNICORN_THREADS = 8
#: Gunicorn's master has the signal; it passes SIGTERM on to its worker.
GUNICORN_TERM_RE = re.compile(r"Handling signal: term")

STOPS = [
    # kind, the signal sent to the process we started, whether submissions are
    # held in flight across it (else sent on new connections), and the log
    # line to wait for before finishing or sending them.
    #
    # The dev server closes its listening socket at once, but its request
    # threads live on while the atexit shutdown waits for the running task:
    # a request it was reading is answered, 503 once the queue has closed
    # (the "dropped" line says it has).
    pytest.param("flask", signal.SIGTERM, True, DROPPED_RE, id="flask-SIGTERM"),
    pytest.param("flask", signal.SIGINT, True, DROPPED_RE, id="flask-SIGINT"),
    # gunicorn SIGTERM: the worker's handler closes the queue as the signal
    # arrives, and gthread finishes the requests in flight: 503.
    pytest.param("gunicorn", signal.SIGTERM, True, GUNICORN_TERM_RE, id="gunicorn-SIGTERM"),
    # gunicorn SIGINT is its quick stop: the worker leaves its loop at once,
    # then closes the queue in worker_exit; nothing answers any more. Nothing
    # is held here, and these gunicorn tests first fill the worker's thread
    # pool: gthread's SIGQUIT handler calls its pool's shutdown(), which
    # deadlocks if the signal lands while the main thread is handing a
    # request to that pool (python/cpython#121649), more so while it starts
    # a pool thread for it; the master then kills the worker after
    # graceful_timeout, cutting the running task off.
    pytest.param("gunicorn", signal.SIGINT, False, DROPPED_RE, id="gunicorn-SIGINT"),
    # uWSGI (uwsgi.ini's graceful stop) finishes the requests in flight, takes
    # no new ones, and only then runs the atexit shutdown that closes the
    # queue: a 503 never shows; new connections wait and are reset at exit.
    # (Its http-socket sends no 100 Continue, so nothing can be held there.)
    pytest.param("uwsgi", signal.SIGTERM, False, None, id="uwsgi-SIGTERM", marks=needs_uwsgi),
    pytest.param("uwsgi", signal.SIGINT, False, None, id="uwsgi-SIGINT", marks=needs_uwsgi),
]


@pytest.mark.parametrize("kind, signum, hold, after", STOPS)
def test_stop_signal_refuses_work_and_lets_the_running_task_finish(
    start_server, kind, signum, hold, after
):
    server = start_server(kind, FLASK_QUEUE_WORKERS="1", FLASK_QUEUE_SHUTDOWN_TIMEOUT="30")
    serving = server.wait_ready()["pid"]
    [running] = server.submit(seconds=4)
    queued = server.submit(count=3)
    if kind == "gunicorn":
        fill_thread_pool(server, GUNICORN_THREADS)
    server.wait_stats("one task running, three queued",
                      lambda s: s["running"] == 1 and s["queued"] == 3)
    helds: list[HeldSubmit] = []
    try:
        if hold:
            helds = [HeldSubmit(server) for _ in range(6)]
        server.send(signum)
        if after is not None:
            server.wait_log(after.pattern, lambda log: after.search(log))
        refusal = finish_held(helds) if hold else probe_new_connections(server)
    finally:
        for held in helds:
            held.close()

    assert server.wait_exit() == 0
    server.wait_group_gone()
    log = server.log()

    if hold:
        assert refusal.reply is not None and refusal.reply.status == 503, refusal
        assert "shutting down" in refusal.reply.body["error"], refusal
    else:
        assert refusal.reply is None, refusal
    if kind == "uwsgi":
        assert "Gracefully killing worker 1" in log, "uwsgi.ini's graceful stop was not used"
    # The running task finished, after the shutdown began; nothing queued ever ran.
    runs = server.runs()
    assert_each_ran_once(runs, serving, [running])
    assert {run.pid for run in runs} == {serving}
    # What was accepted after the signal was queued before the queue closed.
    [dropped] = server.dropped()
    expected = len(queued) + refusal.accepted
    assert expected <= dropped <= expected + refusal.unknown, (dropped, refusal)
    done_line = next(m for m in DONE_RE.finditer(log) if int(m[1]) == running)
    assert DROPPED_RE.search(log).start() < done_line.start(), (
        "the task was still running when the shutdown began"
    )
    assert not ABANDONED_RE.search(log)
    assert_workers_started_once_in(server, serving)


@pytest.mark.parametrize("kind", [
    "flask", "gunicorn", pytest.param("uwsgi", marks=needs_uwsgi),
])
def test_a_task_longer_than_the_shutdown_timeout_does_not_hold_the_process(start_server, kind):
    server = start_server(kind, FLASK_QUEUE_WORKERS="1", FLASK_QUEUE_SHUTDOWN_TIMEOUT="1")
    serving = server.wait_ready()["pid"]
    [endless] = server.submit(seconds=600)
    server.wait_stats("the task running", lambda s: s["running"] == 1)
    server.send(signal.SIGTERM)
    # The deadline is a tenth of the task: exiting in time means it was not waited for.
    assert server.wait_exit(timeout=60) == 0
    server.wait_group_gone()
    log = server.log()
    [(threads, after)] = ABANDONED_RE.findall(log)
    assert (threads, after) == ("1", "1.0"), log
    assert "worker-1" in log[ABANDONED_RE.search(log).start():].splitlines()[0]
    assert endless not in {run.task_id for run in server.runs()}
    assert not DROPPED_RE.search(log), "nothing was queued"
    assert_workers_started_once_in(server, serving)


def test_a_signal_the_server_was_started_to_ignore_stays_ignored(start_server):
    server = start_server("flask", ignore=("SIGINT",))
    server.wait_ready()  # the app is loaded, its handlers installed
    assert signal.SIGINT in ignored_signals(server.pid)
    server.send(signal.SIGINT)  # the kernel discards it
    server.submit()
    server.wait_done(1)


# -- serving beyond this machine ------------------------------------------------------

EXPOSED = "beyond this machine, with no QUEUE_ACCESS_TOKEN"


@pytest.mark.parametrize("token", ["", "a-long-random-secret"], ids=["no-token", "token"])
def test_gunicorn_on_every_interface_warns_at_start_unless_a_token_is_set(tmp_path, token):
    port = free_port()
    settings = {**QUICK, "BIND": f"0.0.0.0:{port}"}
    if token:
        settings["FLASK_QUEUE_ACCESS_TOKEN"] = token
    args = [str(BIN / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py")]
    server = Server("gunicorn", args, tmp_path / "gunicorn.log", server_env(settings), port)
    try:
        server.start()
        # /healthz needs no token. gunicorn runs its when_ready hook, which warns,
        # before it starts the worker that answers.
        server.wait_log("the worker answering /healthz", lambda _: _healthy(server))
        log = server.log()
        assert f"Listening at: http://0.0.0.0:{port}" in log, log
        if token:
            assert EXPOSED not in log, log
        else:
            assert f"served on 0.0.0.0, {EXPOSED}" in log, log
            # By the master, at start (the worker says it again at its first request).
            assert f"[{server.pid}] [WARNING] dashboard.security:" in log, log
    finally:
        server.stop()


def _healthy(server: Server) -> bool:
    try:
        return server.request("GET", "/healthz").status == 200
    except OSError:
        return False
