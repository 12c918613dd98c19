"""The SQLite store under real gunicorn processes: one queue for all, kept across restarts.

Each test starts gunicorn with ``tests/apps/counting.py``: the demo app plus a
``count`` task that appends ``"<id> <pid> start"`` and ``"<id> <pid> end"``
to a file (one atomic ``O_APPEND`` write per line), so the test can count how
often each task started and finished, and in which process, whatever
happened to the processes in between. Every server of a test shares one
queue file in ``tmp_path``.

What is shown:

* exactly once across processes: 1,000 tasks submitted concurrently over
  HTTP to three worker processes each start once and end once, spread over
  all three, and every process then answers the same counts;
* periodic tasks: a schedule every second, three processes each with a
  scheduler claiming due times in the file: each due time runs once, none
  missed; a unique key submitted 30 times at once through the three queues one
  task, and delayed tasks run once each, after their due time;
* ``kill -9`` of every process while tasks run and wait: after a restart on
  the same file every task ends; those cut off ran again (attempt 2) and no
  task was lost;
* SIGTERM, then start: the running tasks finish, the queued ones stay in the
  file (the log says so) and run once after the next start;
* one view: whichever process answers, the same workers of all live
  processes; a killed process drops out, its replacement comes in; pause and
  the worker count set through one process hold in all;
* one scrape: ``GET /metrics`` from either of two processes gives the same
  totals, the right ones, read by ``prometheus_client``'s own parser;
* a file that cannot be used (garbage, a damaged page, a schema from the
  future, a directory, a read-only directory) stops ``flask run`` and
  gunicorn at start with one line naming it, no traceback, and the file
  untouched.

Deadlines only bound failures; the one fixed window is where a negative is
shown (nothing starts while paused), and it is stated there.
"""

from __future__ import annotations

import hashlib
import http.client
import math
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from servers import (BIN, HOST, ROOT, CountLog, Server, free_port, group_members, parent_pid, run_to_exit,
                     server_env)
from support import wait_for

pytestmark = pytest.mark.server

APPS = ROOT / "tests" / "apps"
APP = "counting:create_app()"  # tests/ is no package: tests/apps goes on the path


# -- the servers --------------------------------------------------------------------


class Cluster:
    """gunicorn with the counting app on one queue file; ``start()`` as often as needed."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.db = tmp_path / "queue.db"
        self.counts = CountLog(tmp_path / "count.log")
        self.servers: list[Server] = []

    def start(self, processes: int = 3, **settings: str) -> Server:
        port = free_port()
        env = server_env({
            "BIND": f"{HOST}:{port}",
            "WEB_CONCURRENCY": str(processes),
            "FLASK_QUEUE_URL": f"sqlite:///{self.db}",
            "FLASK_QUEUE_WORKERS": "1",
            "FLASK_QUEUE_SHUTDOWN_TIMEOUT": "10",
            "COUNT_LOG": str(self.counts.path),
            **settings,
        })
        args = [str(BIN / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py"),
                "--pythonpath", str(APPS), APP]
        n = len(self.servers)
        server = Server(f"gunicorn-{n}", args, self.tmp_path / f"gunicorn-{n}.log", env, port)
        self.servers.append(server)
        return server.start()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def task_rows(self) -> dict[int, tuple[str, int]]:
        """``{id: (state, attempts)}`` read from the file itself (no server running)."""
        with closing(sqlite3.connect(self.db)) as conn:
            return {i: (s, a) for i, s, a in conn.execute("SELECT id, state, attempts FROM tasks")}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path)
    try:
        yield made
    finally:
        made.stop()


def try_stats(server: Server) -> dict[str, Any] | None:
    """GET /api/stats on a new connection (so any process may answer), or None."""
    try:
        reply = server.request("GET", "/api/stats")
    except (OSError, http.client.HTTPException):
        return None
    return reply.body if reply.status == 200 else None


def by_pid(stats: dict[str, Any]) -> dict[int, list[str]]:
    """The workers a stats answer lists, grouped by process."""
    grouped: dict[int, list[str]] = defaultdict(list)
    for worker in stats["workers"]:
        grouped[worker["pid"]].append(worker["name"])
    return {pid: sorted(names) for pid, names in grouped.items()}


def counts(stats: dict[str, Any]) -> tuple[int, ...]:
    return tuple(stats[k] for k in
                 ("queued", "running", "done", "failed", "cancelled", "submitted", "paused"))


def answers_from_every_process(
    server: Server, pids: set[int], predicate: Callable[[dict[str, Any]], bool],
    what: str, timeout: float = 60.0,
) -> dict[int, dict[str, Any]]:
    """Poll GET /api/stats until each of ``pids`` answered once with ``predicate`` true.

    Each poll is a new connection, so the processes take turns answering;
    which one does is up to the kernel, hence the polling.
    """
    answers: dict[int, dict[str, Any]] = {}

    def collect() -> bool:
        stats = try_stats(server)
        if stats is not None and stats["pid"] in pids and predicate(stats):
            answers[stats["pid"]] = stats
        return set(answers) == pids

    try:
        wait_for(collect, timeout, f"{what}, answered by each of {sorted(pids)}", 0.02)
    except AssertionError as exc:
        raise AssertionError(f"{exc} (answered: {sorted(answers)}); log:\n"
                             f"{server.log_tail()}") from None
    return answers


def wait_processes(server: Server, n: int, names: list[str]) -> set[int]:
    """Wait until stats list ``n`` worker processes of this master, each with ``names``."""
    master = server.pid

    def listed() -> set[int] | None:
        if server.exited():
            raise AssertionError(f"{server.name} exited; log:\n{server.log_tail()}")
        stats = try_stats(server)
        if stats is None:
            return None
        grouped = by_pid(stats)
        ours = {pid for pid in grouped if parent_pid(pid) == master}
        if len(ours) == n and all(grouped[pid] == names for pid in ours):
            return ours
        return None

    try:
        return wait_for(listed, 60.0, f"{n} processes of {server.name} listing {names}", 0.05)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; log:\n{server.log_tail()}") from None


def submit(server: Server, count: int, seconds: float) -> list[int]:
    reply = server.request("POST", "/api/tasks",
                           {"kind": "count", "count": count, "params": {"seconds": seconds}})
    assert reply.status == 202, reply
    return reply.body["ids"]


def task_info(server: Server, task_id: int) -> dict[str, Any]:
    reply = server.request("GET", f"/api/tasks/{task_id}")
    assert reply.status == 200, reply
    return reply.body


def assert_clean_log(server: Server) -> None:
    log = server.log()
    assert "Traceback" not in log, log
    assert "lease lost" not in log, log


# -- exactly once -------------------------------------------------------------------


def test_a_thousand_tasks_over_three_processes_each_run_exactly_once(cluster):
    server = cluster.start(processes=3, FLASK_QUEUE_WORKERS="2")
    pids = wait_processes(server, 3, ["worker-1", "worker-2"])
    assert server.pid not in pids, "no task runs in the master"

    # 1,000 tasks in 600 requests of 1, 5 or 10, from 12 client threads at once,
    # each request on a new connection: all three processes take submissions.
    sizes = [1] * 500 + [5] * 60 + [10] * 20
    random.Random(7).shuffle(sizes)
    with ThreadPoolExecutor(max_workers=12) as pool:
        batches = list(pool.map(lambda n: submit(server, n, 0.005), sizes))
    ids = [task_id for batch in batches for task_id in batch]
    assert len(ids) == 1000 and len(set(ids)) == 1000, "every submit got ids of its own"

    ends = cluster.counts.wait_ended(ids)
    starts = cluster.counts.count("start")
    assert set(starts) == set(ends) == set(ids), "only the submitted tasks ran"
    twice = {t: n for t, n in (starts + ends).items() if n != 2}
    assert not twice, f"tasks that did not start once and end once: {twice}"

    ran_in = Counter(pid for _, pid, e in cluster.counts.events() if e == "end")
    assert set(ran_in) == pids, f"the work was not spread over the three processes: {ran_in}"
    print(f"\ntasks per process: {dict(ran_in)}")

    # Every process, asked in turn, tells the same story: all done, nothing left.
    final = (0, 0, 1000, 0, 0, 1000, False)
    answers = answers_from_every_process(
        server, pids, lambda s: counts(s) == final, "1000 done, nothing queued or running"
    )
    views = {pid: by_pid(stats) for pid, stats in answers.items()}
    assert all(view == {p: ["worker-1", "worker-2"] for p in pids} for view in views.values())
    assert sum(w["done"] for w in answers[min(pids)]["workers"]) == 1000
    assert set(cluster.task_rows().values()) == {("done", 1)}, "one attempt each"
    assert_clean_log(server)


# -- periodic tasks: once per due time across processes ----------------------------


def test_a_schedule_every_second_runs_once_per_due_time_across_three_processes(cluster):
    """Three processes, each with a scheduler thread waking at every whole second to
    claim it in the file: over ten seconds, each due time has exactly one run, and
    each run starts once."""
    server = cluster.start(processes=3, FLASK_QUEUE_WORKERS="2", COUNT_EVERY="1",
                           FLASK_QUEUE_SCHEDULES="true")
    wait_processes(server, 3, ["worker-1", "worker-2"])
    first = math.floor(time.time()) + 2  # every process is up by now
    seconds = range(first, first + 10)

    def runs() -> list[tuple[int, float, str]]:
        with closing(sqlite3.connect(cluster.db, timeout=10)) as conn:
            return conn.execute("SELECT id, due_at, state FROM tasks "
                                "WHERE schedule = 'counter' ORDER BY id").fetchall()

    def ten_seconds_done() -> list | None:
        rows = runs()
        done = {due for _, due, state in rows if state == "done"}
        return rows if done >= set(map(float, seconds)) else None

    rows = wait_for(ten_seconds_done, 60.0, "ten due times run", 0.2)
    per_due = Counter(due for _, due, _ in rows)
    assert {d: per_due[float(d)] for d in seconds} == {d: 1 for d in seconds}, \
        "a due time with no run, or with more than one"
    doubled = {d: n for d, n in per_due.items() if n != 1}
    assert not doubled, f"due times run more than once: {doubled}"
    # Consecutive whole seconds from the first run on: none missed before the window.
    dues = sorted(per_due)
    assert dues == [dues[0] + n for n in range(len(dues))]
    ids = [task_id for task_id, due, _ in rows if first <= due < first + 10]
    starts = cluster.counts.count("start")
    assert {i: starts[i] for i in ids} == {i: 1 for i in ids}, "a run started twice"
    assert_clean_log(server)


def test_a_key_and_delayed_tasks_hold_across_three_processes(cluster):
    """One key submitted 30 times at once through three processes queues one task,
    and every answer names it; 20 tasks delayed 2 s are scheduled in the file, and
    each runs once, after its due time, in whichever process takes it."""
    server = cluster.start(processes=3, FLASK_QUEUE_WORKERS="2")
    wait_processes(server, 3, ["worker-1", "worker-2"])
    keyed = {"kind": "count", "params": {"seconds": 1.0}, "key": "report-42"}
    with ThreadPoolExecutor(max_workers=10) as pool:
        replies = list(pool.map(lambda _: server.request("POST", "/api/tasks", keyed),
                                range(30)))
    assert sorted(r.status for r in replies) == [200] * 29 + [202], replies
    (held,) = {r.body["ids"][0] for r in replies}
    assert [r.body["created"] for r in replies].count(True) == 1

    reply = server.request("POST", "/api/tasks", {"kind": "count", "count": 20, "delay": 2,
                                                  "params": {"seconds": 0.0}})
    assert reply.status == 202, reply
    delayed = reply.body["ids"]
    assert {task_info(server, i)["state"] for i in delayed} <= {"scheduled", "queued",
                                                                "running", "done"}
    cluster.counts.wait_ended([held, *delayed])
    starts = cluster.counts.count("start")
    assert {i: starts[i] for i in [held, *delayed]} == {i: 1 for i in [held, *delayed]}
    with closing(sqlite3.connect(cluster.db, timeout=10)) as conn:
        rows = conn.execute(
            f"SELECT id, started_at >= due_at FROM tasks WHERE id IN "
            f"({','.join(map(str, delayed))})").fetchall()
    assert dict(rows) == {i: 1 for i in delayed}, "a delayed task started before it was due"
    assert server.request("POST", "/api/tasks", keyed).status == 202  # the key is free again
    assert_clean_log(server)


# -- kill -9, then start again ------------------------------------------------------


def test_kill_9_of_every_process_loses_nothing_and_the_cut_off_tasks_run_again(cluster):
    settings = {"FLASK_QUEUE_WORKERS": "2", "FLASK_QUEUE_LEASE_TIME": "3"}
    first = cluster.start(processes=3, **settings)
    first_pids = wait_processes(first, 3, ["worker-1", "worker-2"])
    ids = submit(first, 18, 1.5)

    # Six running (two threads in each of three processes), more waiting.
    first.wait_stats(
        "six tasks running, more queued",
        lambda s: s["running"] == 6 and s["queued"] >= 6
        and len(cluster.counts.unfinished()) == 6,
    )
    first.stop()  # SIGKILL to the process group: master and workers at once
    assert not first.members()

    # What the file says at the kill, and what the tasks wrote.
    at_kill = cluster.task_rows()
    running = {t for t, (state, _) in at_kill.items() if state == "running"}
    done = {t for t, (state, _) in at_kill.items() if state == "done"}
    queued = {t for t, (state, _) in at_kill.items() if state == "queued"}
    assert running | done | queued == set(ids), at_kill
    assert running and queued, f"nothing was both running and queued at the kill: {at_kill}"
    starts_before = cluster.counts.count("start")
    cut_off = cluster.counts.unfinished()
    assert cut_off, "a task was running when the processes were killed"
    # A claimed task whose start line was not written yet, or one whose end
    # line was written but not its result: the file is what counts.
    assert cut_off <= running, (cut_off, running)

    second = cluster.start(processes=3, **settings)
    second_pids = wait_processes(second, 3, ["worker-1", "worker-2"])
    assert not second_pids & first_pids
    ends = cluster.counts.wait_ended(ids)

    starts = cluster.counts.count("start")
    start_pids = cluster.counts.pids("start")
    for task_id in ids:
        info = task_info(second, task_id)
        assert info["state"] == "done", info
        if task_id in done:  # finished before the kill: never again
            assert (starts[task_id], ends[task_id], info["attempts"]) == (1, 1, 1), info
        elif task_id in running:  # cut off: once more, in the new processes
            assert info["attempts"] == 2, info
            assert starts[task_id] == starts_before[task_id] + 1, (task_id, start_pids[task_id])
            assert start_pids[task_id][-1] in second_pids
        else:  # queued at the kill: once, after the restart
            assert (starts[task_id], ends[task_id], info["attempts"]) == (1, 1, 1), info
            assert start_pids[task_id] == [start_pids[task_id][0]]
            assert start_pids[task_id][0] in second_pids
    for task_id in cut_off:
        assert (starts[task_id], ends[task_id]) == (2, 1), (task_id, start_pids[task_id])
        assert start_pids[task_id][0] in first_pids and start_pids[task_id][1] in second_pids

    stats = second.wait_stats("all done", lambda s: not s["queued"] and not s["running"])
    assert (stats["done"], stats["failed"], stats["submitted"]) == (18, 0, 18), stats
    requeued = {int(m) for m in re.findall(
        r"task (\d+): process \d+ stopped while running it; queued again \(attempt 1 of 3\)",
        second.log())}
    assert requeued == running, second.log_tail()
    assert_clean_log(second)


# -- SIGTERM, then start again ------------------------------------------------------


def test_sigterm_keeps_the_queued_tasks_for_the_next_start_and_each_runs_once(cluster):
    first = cluster.start(processes=2, FLASK_QUEUE_WORKERS="1")
    first_pids = wait_processes(first, 2, ["worker-1"])
    ids = submit(first, 8, 1.0)
    first.wait_stats(
        "two tasks running, more queued",
        lambda s: s["running"] == 2 and s["queued"] >= 2
        and len(cluster.counts.unfinished()) == 2,
    )
    first.send(signal.SIGTERM)
    assert first.wait_exit() == 0, first.log_tail()
    first.wait_group_gone()

    log = first.log()
    # The running tasks finished within QUEUE_SHUTDOWN_TIMEOUT, in the first run.
    ran_first = set(cluster.counts.count("end"))
    assert len(ran_first) >= 2 and not cluster.counts.unfinished(), cluster.counts.events()
    assert all(pid in first_pids for _, pid, _ in cluster.counts.events())
    left = set(ids) - ran_first
    assert left, "tasks were queued at the signal"
    kept = [int(n) for n in re.findall(
        r"shutdown: (\d+) queued task\(s\) stay in the store for the next start", log)]
    assert kept and all(len(left) <= n <= 6 for n in kept), log
    assert "queued again" not in log and "still running a task" not in log, log
    assert_clean_log(first)

    second = cluster.start(processes=2, FLASK_QUEUE_WORKERS="1")
    second_pids = wait_processes(second, 2, ["worker-1"])
    ends = cluster.counts.wait_ended(ids)
    starts = cluster.counts.count("start")
    assert all(starts[t] == 1 and ends[t] == 1 for t in ids), (starts, ends)
    start_pids = cluster.counts.pids("start")
    assert all(start_pids[t][0] in second_pids for t in left)
    stats = second.wait_stats("all done", lambda s: not s["queued"] and not s["running"])
    assert (stats["done"], stats["failed"], stats["submitted"]) == (8, 0, 8), stats
    assert all(task_info(second, t)["attempts"] == 1 for t in ids)
    assert_clean_log(second)


# -- several processes, one view ----------------------------------------------------


def test_every_process_shows_one_view_and_follows_one_control(cluster):
    server = cluster.start(processes=3, FLASK_QUEUE_WORKERS="1", FLASK_QUEUE_LEASE_TIME="3")
    master = server.pid
    pids = wait_processes(server, 3, ["worker-1"])

    # Whichever process answers lists the workers of all three.
    one = {pid: ["worker-1"] for pid in pids}
    answers_from_every_process(server, pids, lambda s: by_pid(s) == one, "the same three workers")

    # The worker count set through one process: every process runs two.
    reply = server.request("POST", "/api/workers", {"count": 2})
    assert reply.status == 200 and reply.body == {"workers": 2}, reply
    two = {pid: ["worker-1", "worker-2"] for pid in pids}
    answers_from_every_process(server, pids, lambda s: by_pid(s) == two, "two workers each")

    # kill -9 one process: gunicorn starts another; the dead one's workers
    # drop out of every answer once its heartbeat is old, the new one's come in
    # (with two workers: it follows the shared count).
    victim = min(pids)
    assert parent_pid(victim) == master
    os.kill(victim, signal.SIGKILL)

    def replaced(stats: dict[str, Any]) -> bool:
        grouped = by_pid(stats)
        return (victim not in grouped and len(grouped) == 3 and pids - {victim} <= set(grouped)
                and all(names == ["worker-1", "worker-2"] for names in grouped.values()))

    stats = wait_for(lambda: (s := try_stats(server)) and replaced(s) and s, 60,
                     f"pid {victim} replaced in the workers list")
    live = set(by_pid(stats))
    newcomer = (live - pids).pop()
    assert parent_pid(newcomer) == master
    assert victim not in group_members(master)
    answers_from_every_process(server, live, replaced, "the same view without the dead process")

    # Pause through one process: no process starts anything.
    assert server.request("POST", "/api/pause").body == {"paused": True}
    ids = [submit(server, 1, 0)[0] for _ in range(6)]
    # The one window of this file, for a negative: every idle worker looks
    # for work five times a second, so a second (and each process answering
    # at least once, paused, with all six waiting) would see any start.
    window_ends = time.monotonic() + 1.0
    seen: set[int] = set()

    def paused_long_enough() -> bool:
        stats = try_stats(server)
        if stats is not None:
            assert (stats["paused"], stats["queued"], stats["running"]) == (True, 6, 0), stats
            assert {w["state"] for w in stats["workers"]} == {"paused"}, stats["workers"]
            seen.add(stats["pid"])
        assert not cluster.counts.events(), "a task started while paused"
        return seen == live and time.monotonic() >= window_ends

    wait_for(paused_long_enough, 60, "every process answering, paused, for a second")

    assert server.request("POST", "/api/resume").body == {"paused": False}
    cluster.counts.wait_ended(ids, timeout=60)
    assert cluster.counts.count("start") == Counter({t: 1 for t in ids})
    answers_from_every_process(
        server, live, lambda s: counts(s) == (0, 0, 6, 0, 0, 6, False), "six done"
    )
    assert "Traceback" not in server.log()


# -- one scrape, whichever process answers ---------------------------------------------


def scrape(server: Server) -> tuple[int, dict[tuple[str, tuple], float]] | None:
    """GET /metrics on a new connection, then GET /api/stats on the same one: the pid of
    the process that answered (a connection stays with the process that accepted it)
    and every sample of the scrape, read by prometheus_client's parser; or None."""
    conn = server.connect()
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode()
        if response.status != 200 or response.will_close:
            return None
        stats = server.request("GET", "/api/stats", conn=conn)
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    if stats.status != 200:
        return None
    return stats.body["pid"], {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_from_two_processes_on_one_file_give_the_same_totals(cluster):
    server = cluster.start(processes=2, FLASK_QUEUE_WORKERS="2")
    pids = wait_processes(server, 2, ["worker-1", "worker-2"])

    # Work of every outcome, each request on a new connection (through both processes):
    # 20 done, 4 failed, 2 failed after two automatic retries each, 3 cancelled.
    for _ in range(20):
        submit(server, 1, 0.01)
    for kind, count in (("flaky", 4), ("shaky", 2)):
        reply = server.request("POST", "/api/tasks", {
            "kind": kind, "count": count, "params": {"seconds": 0, "fail_rate": 1}})
        assert reply.status == 202, reply
    later = server.request("POST", "/api/tasks", {"kind": "count", "count": 3, "delay": 3600})
    for task_id in later.body["ids"]:
        assert server.request("POST", f"/api/tasks/{task_id}/cancel").status == 200
    answers_from_every_process(
        server, pids, lambda s: (counts(s), s["scheduled"]) == ((0, 0, 20, 6, 3, 29, False), 0),
        "every task ended")

    scrapes: dict[int, dict[tuple[str, tuple], float]] = {}

    def each_answered() -> bool:
        answer = scrape(server)
        if answer is not None and answer[0] in pids:
            scrapes[answer[0]] = answer[1]
        return set(scrapes) == pids

    wait_for(each_answered, 60, f"a scrape answered by each of {sorted(pids)}")
    first, second = scrapes.values()
    assert first == second, "the two processes disagree"  # every sample, sums too

    def kind(name: str) -> tuple:
        return (("kind", name),)

    expected = {
        # kind: submitted, done, failed, cancelled, retried, starts (= attempts)
        "count": (23, 20, 0, 3, 0, 20),
        "flaky": (4, 0, 4, 0, 0, 4),
        "shaky": (2, 0, 2, 0, 4, 6),
    }
    got = {name: tuple(first[(f"queue_tasks_{field}_total", kind(name))]
                       for field in ("submitted", "done", "failed", "cancelled", "retried"))
           + (first[("queue_task_wait_seconds_count", kind(name))],)
           for name in expected}
    assert got == expected
    for name, (*_, starts) in expected.items():
        assert first[("queue_task_run_seconds_count", kind(name))] == starts
        assert first[("queue_task_run_seconds_bucket", (*kind(name), ("le", "+Inf")))] == starts
    # Every process's workers, counted once: two processes of two.
    assert first[("queue_workers", ())] == 4
    assert [first[(g, ())] for g in ("queue_tasks_queued", "queue_tasks_scheduled",
                                     "queue_tasks_running", "queue_paused",
                                     "queue_oldest_queued_seconds")] == [0, 0, 0, 0, 0]
    log = server.log()  # (the failed tasks' tracebacks are there, as they should be)
    assert "Exception on" not in log and "lease lost" not in log, log


# -- files that cannot be used ------------------------------------------------------


def fingerprint(path: Path) -> tuple[Any, ...]:
    """The bytes and mtime of a file, or what a directory holds."""
    if path.is_dir():
        return ("dir", sorted(os.listdir(path)), path.stat().st_mtime_ns)
    return (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)


def queue_file(path: Path, tasks: int = 200) -> Path:
    """A queue file as the app leaves it: the schema, and tasks waiting."""
    from dashboard.local.sqlite import SqliteStore

    SqliteStore(str(path))  # creates the schema, then closes its connection
    with closing(sqlite3.connect(path)) as conn:
        conn.executemany(
            "INSERT INTO tasks (kind, params, state, enqueued_at) VALUES (?, ?, 'queued', ?)",
            [("pretend", '{"seconds": 1}', time.time())] * tasks,
        )
        conn.commit()
    return path


def garbage(directory: Path) -> Path:
    path = directory / "queue.db"
    path.write_bytes(b"this is no database at all\n" * 300)
    return path


def damaged(directory: Path) -> Path:
    """A real queue file with the tasks table's first page overwritten."""
    path = queue_file(directory / "queue.db")
    with closing(sqlite3.connect(path)) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'tasks'").fetchone()[0]
    with open(path, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(random.Random(3).randbytes(page_size))
    return path


def future(directory: Path) -> Path:
    from dashboard.local.sqlite import SCHEMA_VERSION

    path = queue_file(directory / "queue.db")
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    return path


def a_directory(directory: Path) -> Path:
    path = directory / "queue.db"
    path.mkdir()
    return path


def read_only_dir(directory: Path) -> Path:
    return queue_file(directory / "queue.db")


BAD_FILES = {
    # name: (make the file, what the one line says, run in a read-only mount)
    "garbage": (garbage, "is not a usable SQLite database (file is not a database)", False),
    "damaged-page": (damaged, "is not a usable SQLite database", False),
    "future-schema": (future, "newer than this code knows", False),
    "a-directory": (a_directory, "it is a directory; QUEUE_URL must name a file", False),
    "read-only-directory": (read_only_dir, "must be writable", True),
}

#: Runs a command in a mount namespace of its own in which the directory
#: "$1" is bind-mounted read-only. The tests run as root, for whom chmod
#: makes nothing read-only; a read-only mount is read-only for root too, and
#: it exists only in that namespace, gone with the process.
READ_ONLY_MOUNT = ('mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1" '
                   '&& shift && exec "$@"')


def read_only_prefix(directory: Path) -> list[str]:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed: no read-only mount")
    prefix = [unshare, "--mount", "--propagation", "private", "sh", "-c", READ_ONLY_MOUNT,
              "sh", str(directory)]
    probe = subprocess.run([*prefix, "sh", "-c", ': > "$0/probe"', str(directory)],
                           check=False, capture_output=True, text=True, timeout=30)
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"cannot make a read-only mount here: {probe.stderr.strip()}")
    return prefix




@pytest.mark.parametrize("server", ["flask", "gunicorn"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_an_unusable_queue_file_stops_the_server_at_start_and_is_left_alone(
    tmp_path, server, case
):
    make, says, read_only = BAD_FILES[case]
    directory = tmp_path / "data"
    directory.mkdir()
    path = make(directory)
    prefix = read_only_prefix(directory) if read_only else []
    before = fingerprint(path), sorted(os.listdir(directory))

    port = free_port()
    env = server_env({"FLASK_QUEUE_URL": f"sqlite:///{path}"})
    if server == "flask":
        args = [str(BIN / "flask"), "--app", "dashboard", "run", "--host", HOST,
                "--port", str(port)]
    else:
        env.update(BIND=f"{HOST}:{port}", WEB_CONCURRENCY="3")
        args = [str(BIN / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py")]
    code, out, err = run_to_exit([*prefix, *args], env)

    assert code != 0, err
    assert "Traceback" not in out + err, err
    # flask prints the one line; gunicorn its own start line, then the one line.
    lines = err.strip().splitlines()
    assert len(lines) == (1 if server == "flask" else 2), err
    naming = [line for line in lines if str(path) in line]
    assert len(naming) == 1, f"one line naming {path}, got:\n{err}"
    assert "QUEUE_URL" in naming[0] and says in naming[0], naming[0]
    assert (fingerprint(path), sorted(os.listdir(directory))) == before, "the file was changed"
