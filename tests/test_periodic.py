"""Periodic tasks: schedules declared in code, each due time run once.

Declaring (a cron expression or an interval; every mistake fails when the app
starts, naming the schedule), the due times (cron by cronsim, intervals
counted from the epoch), and what a queue does with them through the Backend
seam on both stores: a due time queues one run, a due time claimed already
queues nothing, due times missed long ago run once together, "run now"
queues one and keeps the next due time, a full queue skips a due time and
says so. Time is handed in (``run_schedules(now)``) except in the test of
the scheduler thread, which waits on its runs with a deadline.

Across processes sharing a SQLite file, each due time runs once: the store
model (test_contract.py) proves the claim with two stores on one file, and
test_durable.py shows it with three gunicorn processes.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
import time
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cronsim import CronSim

from dashboard import create_app, get_queue
from dashboard.errors import ScheduleNotFound
from dashboard.local.memory import MemoryStore
from dashboard.local.queue import WorkQueue
from dashboard.local.schema import SCHEMA_VERSION
from dashboard.local.sqlite import SqliteStore
from dashboard.periodic import CATCH_UP, Schedule
from dashboard.records import State
from dashboard.tasks import Int, Registry
from support import wait_for

MAX_QUEUED = 20
V3_FILE = Path(__file__).parent / "data" / "queue-v3.db"


def periodic_registry() -> Registry:
    registry = Registry()

    @registry.task("report", params={"user_id": Int(1, 1000)}, time_limit=30.0)
    def report(ctx, user_id):
        return {"user": user_id}

    @registry.task("tick", every=10)
    def tick(ctx):
        return ctx.task_id

    registry.schedule("nightly", "report", cron="0 2 * * *", params={"user_id": 7})
    return registry


@pytest.fixture(params=["memory", "sqlite"])
def queue(request, tmp_path):
    if request.param == "memory":
        store = MemoryStore(MAX_QUEUED, 100)
    else:
        store = SqliteStore(str(tmp_path / "periodic.db"), MAX_QUEUED, 100)
    made = WorkQueue(workers=0, store=store, registry=periodic_registry())
    yield made
    made.shutdown()


def runs(queue, name: str) -> list:
    """The tasks of schedule ``name`` the queue holds, by id."""
    snap = queue.stats(recent=100, upcoming=100)
    return sorted((t for t in (*snap.upcoming, *snap.recent) if t.schedule == name),
                  key=lambda t: t.id)


def by_name(queue) -> dict:
    return {s.name: s for s in queue.schedules()}


# -- declaring ------------------------------------------------------------------------


def test_a_schedule_is_declared_with_cron_or_every_and_described():
    registry = periodic_registry()
    assert [s.name for s in registry.schedules()] == ["nightly", "tick"]
    nightly, tick = registry.schedules()
    assert (nightly.kind, dict(nightly.params), nightly.expression) == (
        "report", {"user_id": 7}, "0 2 * * *")
    assert nightly.description == "At 02:00 every day (UTC)"
    assert (tick.kind, tick.expression) == ("tick", "every 10 seconds")
    assert Schedule("s", "k", every=3600).expression == "every hour"
    assert Schedule("s", "k", every=120).expression == "every 2 minutes"
    assert Schedule("s", "k", cron="0 2 * * *", tz="Europe/Riga").expression == \
        "0 2 * * * (Europe/Riga)"


@pytest.mark.parametrize("kwargs, says", [
    ({}, "give cron or every, not neither"),
    ({"cron": "* * * * *", "every": 5}, "give cron or every, not both"),
    ({"cron": "61 * * * *"}, "is not a cron expression cronsim reads (Bad minute)"),
    ({"cron": "* * *"}, "Wrong number of fields"),
    ({"cron": 5}, "cron must be a string"),
    ({"every": 0.5}, "every must be a number of seconds from 1"),
    ({"every": True}, "every must be a number of seconds"),
    ({"every": float("inf")}, "every must be a number of seconds"),
    ({"every": 5, "tz": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
])
def test_a_schedule_that_cannot_be_fails_when_declared_naming_it(kwargs, says):
    registry = periodic_registry()
    with pytest.raises(ValueError, match="schedule 'bad'") as caught:
        registry.schedule("bad", "tick", **kwargs)
    assert says in str(caught.value)
    assert "bad" not in {s.name for s in registry.schedules()}


def test_a_schedule_of_an_unknown_kind_or_with_bad_params_fails_when_declared():
    registry = periodic_registry()
    with pytest.raises(ValueError, match=r"no task kind 'nope' is registered \(registered: "
                                         r"report, tick\)"):
        registry.schedule("s", "nope", every=5)
    with pytest.raises(ValueError, match="user_id must be an integer from 1 to 1000"):
        registry.schedule("s", "report", every=5, params={"user_id": 0})
    with pytest.raises(ValueError, match="user_id is required"):
        registry.schedule("s", "report", every=5)
    with pytest.raises(ValueError, match="already registered, as 0 2 \\* \\* \\* of 'report'"):
        registry.schedule("nightly", "report", cron="0 3 * * *", params={"user_id": 7})
    registry.schedule("nightly", "report", cron="0 2 * * *", params={"user_id": 7})  # the same
    with pytest.raises(ValueError, match="schedule name must be"):
        registry.schedule("../x", "tick", every=5)
    with pytest.raises(ValueError, match="user_id is required"):
        @registry.task("needs", params={"user_id": Int(1, 9)}, every=60)
        def needs(ctx, user_id):
            pass
    with pytest.raises(ScheduleNotFound, match="no schedule 'nope'; schedules are: nightly, tick"):
        registry.get_schedule("nope")


def test_due_times_follow_cron_in_its_zone_and_intervals_from_the_epoch():
    moment = datetime(2026, 3, 28, 23, 30, tzinfo=timezone.utc).timestamp()
    every = Schedule("s", "k", every=3600)
    assert every.next_after(moment) == moment + 1800  # on the hour
    assert every.next_after(moment + 1800) == moment + 1800 + 3600  # strictly after
    cron = Schedule("s", "k", cron="*/15 * * * *")
    assert cron.next_after(moment) == moment + 900
    assert cron.next_after(moment + 900) == moment + 1800
    # In a zone: 02:00 in Riga on the night summer time begins there (at 03:00, 29 March
    # 2026): what cronsim says, as Debian's cron would run it.
    riga = Schedule("s", "k", cron="0 2 * * *", tz="Europe/Riga")
    from zoneinfo import ZoneInfo
    zone = ZoneInfo("Europe/Riga")
    expected = next(CronSim("0 2 * * *", datetime.fromtimestamp(moment, zone))).timestamp()
    assert riga.next_after(moment) == expected
    assert datetime.fromtimestamp(expected, zone).hour == 2
    seconds = Schedule("s", "k", cron="*/10 * * * * *")  # six fields: seconds first
    assert seconds.next_after(moment + 1) == moment + 10


# -- running, through the seam ------------------------------------------------------


def test_the_schedules_are_listed_with_when_each_is_next_due(queue):
    now = time.time()
    listed = by_name(queue)
    assert sorted(listed) == ["nightly", "tick"]
    tick = listed["tick"]
    assert tick.next_due == (int(now // 10) + 1) * 10 or tick.next_due == (int(now // 10) + 2) * 10
    assert (tick.last_due, tick.last_task, tick.last_state, tick.runs) == (None, None, None, 0)
    nightly = listed["nightly"]
    assert datetime.fromtimestamp(nightly.next_due, timezone.utc).strftime("%H:%M:%S") == \
        "02:00:00"
    assert queue.stats().schedules == tuple(queue.schedules())
    assert queue.stats().to_dict()["schedules"][1]["expression"] == "every 10 seconds"


def test_each_due_time_queues_one_run(queue):
    start = 1_000_000_000.0 + 3  # 3 s past a multiple of 10
    assert queue.run_schedules(start) == start + 7  # nothing due yet: when the next is
    assert runs(queue, "tick") == []
    tag = queue.tag
    assert queue.run_schedules(start + 7) == start + 17
    assert queue.tag != tag
    (first,) = runs(queue, "tick")
    assert (first.state, first.due_at, first.schedule, first.kind) == (
        State.QUEUED, start + 7, "tick", "tick")
    assert queue.run_schedules(start + 7.5) == start + 17  # that due time is taken
    assert queue.run_schedules(start + 27) == start + 37  # two came: a run for each
    assert [t.due_at for t in runs(queue, "tick")] == [start + 7, start + 17, start + 27]
    assert queue.run_pending() == 3
    tick = by_name(queue)["tick"]
    assert (tick.next_due, tick.last_due, tick.runs) == (start + 37, start + 27, 3)
    assert tick.last_state is State.DONE and queue.result(tick.last_task, 0) == tick.last_task


def test_a_run_has_its_kinds_params_and_time_limit(queue):
    nightly = by_name(queue)["nightly"]
    queue.run_schedules(nightly.next_due)
    (run,) = runs(queue, "nightly")
    assert (run.params, run.time_limit, run.due_at) == ({"user_id": 7}, 30.0, nightly.next_due)
    queue.run_pending()
    assert queue.result(run.id, 0) == {"user": 7}


def test_due_times_missed_long_ago_run_once_together(queue, caplog):
    start = 1_000_000_000.0 + 3
    queue.run_schedules(start)
    later = start + 1000  # the process was stopped for a quarter of an hour
    caplog.set_level(logging.WARNING, logger="dashboard.queue")
    assert queue.run_schedules(later) == later + 7
    due = [t.due_at for t in runs(queue, "tick")]
    # One run for those missed by more than CATCH_UP, then one for each due time since.
    window = [start + 7 + 10 * n for n in range(100) if later - CATCH_UP <= start + 7 + 10 * n
              <= later]
    assert due == [start + 7, *window]
    assert len(window) == CATCH_UP / 10
    assert "were missed while no process ran the queue; ran once for them" in caplog.text


def test_run_now_queues_one_and_keeps_the_next_due_time(queue):
    before = by_name(queue)["nightly"]
    task_id = queue.run_schedule("nightly")
    info = queue.get(task_id)
    assert (info.state, info.schedule, info.params, info.due_at) == (
        State.QUEUED, "nightly", {"user_id": 7}, None)
    after = by_name(queue)["nightly"]
    assert after.next_due == before.next_due
    assert (after.last_task, after.last_state, after.runs) == (task_id, State.QUEUED, 1)
    assert after.last_due == info.enqueued_at
    with pytest.raises(ScheduleNotFound) as caught:
        queue.run_schedule("nope")
    assert caught.value.status == 404


def test_a_full_queue_skips_a_due_time_saying_so_and_goes_on(queue, caplog):
    start = 1_000_000_000.0 + 3
    queue.run_schedules(start)
    for _ in range(MAX_QUEUED):
        queue.submit("report", user_id=1)
    caplog.set_level(logging.WARNING, logger="dashboard.queue")
    assert queue.run_schedules(start + 7) == start + 17  # skipped, not tried for ever
    assert runs(queue, "tick") == []
    assert "schedule tick: the run due at 2001-09-09 01:46:50 UTC was skipped: queue is full: " \
           "20 of 20 queued" in caplog.text
    queue.run_pending()
    queue.run_schedules(start + 17)
    assert [t.due_at for t in runs(queue, "tick")] == [start + 17]


def test_a_changed_schedule_is_due_anew(tmp_path):
    """The code changed the schedule (another interval): the file's next due time
    for the old one is forgotten, the last run stays."""
    path = str(tmp_path / "q.db")
    old = WorkQueue(0, store=SqliteStore(path), registry=periodic_registry())
    start = 1_000_000_000.0 + 3
    old.run_schedules(start)
    old.run_schedules(start + 7)
    old.shutdown()
    registry = Registry()

    @registry.task("tick", every=60)
    def tick(ctx):
        pass

    new = WorkQueue(0, store=SqliteStore(path), registry=registry)
    assert new.run_schedules(start + 8) == 1_000_000_020.0  # the next minute
    listed = by_name(new)["tick"]
    assert (listed.expression, listed.last_due, listed.runs) == ("every minute", start + 7, 1)
    new.shutdown()


def test_two_processes_on_one_file_run_each_due_time_once(tmp_path):
    """Two queues on one file (two processes) wake for the same due times, in threads
    at once: each due time has one run."""
    path = str(tmp_path / "q.db")
    queues = [WorkQueue(0, store=SqliteStore(path, 1000), registry=periodic_registry())
              for _ in range(2)]
    start = 1_000_000_000.0 + 3
    for q in queues:
        q.run_schedules(start)
    barrier = threading.Barrier(2)

    def tick(q):
        for step in range(1, 21):
            barrier.wait()
            q.run_schedules(start + 10 * step)

    threads = [threading.Thread(target=tick, args=(q,)) for q in queues]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    due = [t.due_at for t in runs(queues[0], "tick")]
    assert due == [start + 7 + 10 * n for n in range(20)]
    assert by_name(queues[1])["tick"].runs == 20
    for q in queues:
        q.shutdown()


def test_the_scheduler_thread_runs_each_due_time_once_as_it_comes():
    registry = Registry()
    ran = []

    @registry.task("beat", every=1)
    def beat(ctx):
        ran.append(ctx.task_id)

    queue = WorkQueue(workers=1, registry=registry)
    queue.start()
    try:
        wait_for(lambda: len(ran) >= 3, 20.0, "three beats")
    finally:
        queue.shutdown()
    beats = [queue.get(task_id) for task_id in ran]
    due = [b.due_at for b in beats]
    assert due == [due[0] + n for n in range(len(due))]  # each second once, none missed
    # Queued when due, not before: a beat starts after its due time.
    assert all(b.enqueued_at >= b.due_at and b.started_at >= b.due_at for b in beats)
    assert not any(t.name.endswith("-scheduler") and t.is_alive()
                   for t in threading.enumerate() if t.name.startswith(queue.name))


def test_with_schedules_off_a_process_runs_no_scheduler_and_still_lists_them():
    registry = periodic_registry()
    queue = WorkQueue(workers=1, registry=registry, scheduler=False)
    queue.start()
    try:
        assert not [t for t in threading.enumerate() if t.name == f"{queue.name}-scheduler"]
        assert [s.name for s in queue.schedules()] == ["nightly", "tick"]
    finally:
        queue.shutdown()
    app = create_app({"TESTING": True, "QUEUE_WORKERS": 0, "QUEUE_HANDLE_SIGNALS": False,
                      "QUEUE_SCHEDULES": True})
    assert get_queue(app).scheduler is True
    app = create_app({"TESTING": True, "QUEUE_WORKERS": 0, "QUEUE_HANDLE_SIGNALS": False})
    assert get_queue(app).scheduler is False  # FLASK_QUEUE_SCHEDULES=false, as conftest sets


def test_a_schema_3_file_is_upgraded_and_runs_schedules(tmp_path):
    """queue-v3.db was written before periodic tasks: one task done with a result,
    one queued with a key, one scheduled."""
    path = tmp_path / "queue.db"
    shutil.copyfile(V3_FILE, path)
    registry = periodic_registry()

    @registry.task("pretend", params={"seconds": Int(0, 10)})
    def pretend(ctx, seconds=0):
        return {"slept": seconds}

    queue = WorkQueue(0, store=SqliteStore(str(path)), registry=registry)
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    # (task 3 was delayed an hour when the file was written: long due by now)
    assert [queue.get(i).state for i in (1, 2)] == [State.DONE, State.QUEUED]
    assert queue.get(3).due_at is not None
    assert queue.get(1).result == {"slept": 1} and queue.get(2).key == "report-42"
    assert queue.get(1).schedule is None
    task_id = queue.run_schedule("tick")
    assert task_id == 4 and queue.get(task_id).schedule == "tick"
    queue.run_pending()
    assert queue.get(2).state is State.DONE and queue.get(task_id).state is State.DONE
    queue.shutdown()
