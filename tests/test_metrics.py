"""Monitoring: each kind's totals and durations kept by both stores, and ``GET /metrics``.

What is shown, on the in-memory store and on SQLite:

* the per-kind counters after tasks that are done, fail, are cancelled (queued
  or scheduled), retried by their kind's policy and retried from the page;
* the wait and run time histograms: each duration in its bucket (a bound
  counts as in), the counts and the sums, on a clock the test moves;
* the gauges (queued, scheduled, running, workers, paused, oldest wait);
* reset zeroes the totals, keeping a kind whose task is still queued;
* the scrape parses with ``prometheus_client``'s own text parser and says what
  the store says; it is behind the access token (Bearer or Basic) unless
  ``QUEUE_METRICS_PUBLIC`` (or ``QUEUE_PUBLIC_READ``) opens it;
* a schema 4 file (``tests/data/queue-v4.db``) is upgraded and counts per kind
  from then on, and so are the files of schemas 1 to 3, upgraded all the way.

Two gunicorn processes on one SQLite file giving the same scrape: in
test_durable.py, with the other real-server tests.
"""

from __future__ import annotations

import base64
import dataclasses
import shutil
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from dashboard import get_queue
from dashboard.local import memory, sqlite
from dashboard.local.memory import MemoryStore
from dashboard.local.schema import SCHEMA_VERSION
from dashboard.local.sqlite import SqliteStore
from dashboard.records import DURATION_BUCKETS, KindStats, State
from dashboard.tasks import Float, Int, Retry

SECRET = "metrics-secret-0123456789"
DATA = Path(__file__).parent / "data"
V4_FILE = DATA / "queue-v4.db"


@pytest.fixture(params=["memory", "sqlite"])
def store_kind(request):
    return request.param


@pytest.fixture
def make_store(store_kind, db):
    """``make_store()``: a store of the kind this test runs on (made when asked, so a
    test can set the clock up first)."""
    return lambda: MemoryStore() if store_kind == "memory" else SqliteStore(db)


class Clock:
    """The store's clock that never steps, moved by hand: durations come out exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(store_kind, monkeypatch):
    fake = Clock()
    if store_kind == "memory":
        monkeypatch.setattr(memory, "time", SimpleNamespace(
            monotonic=fake, time=time.time, time_ns=time.time_ns, sleep=time.sleep))
    else:
        monkeypatch.setattr(sqlite, "clock", fake)
    return fake


def totals(metrics) -> dict[str, tuple[int, ...]]:
    """Each kind's counters: submitted, done, failed, cancelled, retried, starts, ends."""
    return {k.kind: (k.submitted, k.done, k.failed, k.cancelled, k.retried, k.wait.count,
                     k.run.count) for k in metrics.kinds}


def cumulative(durations: list[float]) -> tuple[int, ...]:
    """Prometheus's bucket counts of ``durations``: how many are at most each bound."""
    return tuple(sum(d <= bound for d in durations) for bound in DURATION_BUCKETS)


# -- the stores ---------------------------------------------------------------------


def test_each_kind_counts_its_done_failed_cancelled_and_retried_tasks(make_store, registry,
                                                                      queues):
    tries: dict[int, int] = {}

    @registry.task("ok")
    def ok(ctx):
        pass

    @registry.task("boom")
    def boom(ctx):
        raise RuntimeError("boom")

    @registry.task("wobbly", retry=Retry(attempts=3, backoff=0, max_backoff=0))
    def wobbly(ctx):  # fails twice, then works: two attempts retried by its policy
        tries[ctx.task_id] = tries.get(ctx.task_id, 0) + 1
        if tries[ctx.task_id] < 3:
            raise RuntimeError("not yet")

    q = queues(make_store())
    q.submit("ok")
    q.submit("ok")
    failed = q.submit("boom")
    q.submit("wobbly")
    q.cancel(q.submit("ok"))  # queued, never started
    q.cancel(q.submit("boom", delay=3600))  # scheduled, never due
    assert q.run_pending() == 6  # ok ×2, boom, wobbly ×3
    retried, created = q.retry(failed)  # the page's Retry: a new task, which fails again
    assert created and q.run_pending() == 1

    metrics = q.metrics()
    assert totals(metrics) == {
        #        submitted, done, failed, cancelled, retried, starts, ends
        "boom": (3, 0, 2, 1, 0, 2, 2),
        "ok": (3, 2, 0, 1, 0, 2, 2),
        "wobbly": (1, 1, 0, 0, 2, 3, 3),
    }
    snap = q.stats()
    for field in ("submitted", "done", "failed", "cancelled"):
        assert sum(getattr(k, field) for k in metrics.kinds) == getattr(snap, field), field
    assert (metrics.queued, metrics.scheduled, metrics.running, metrics.paused,
            metrics.oldest_wait) == (0, 0, 0, False, None)


def test_wait_and_run_times_fall_in_their_buckets_with_their_sums(make_store, clock, registry,
                                                                 queues):
    @registry.task("step", params={"seconds": Float(0, 10_000)})
    def step(ctx, seconds):
        clock.now += seconds  # the task's work takes that long on the store's clock

    q = queues(make_store())
    for seconds in (0.25, 5.0, 1000.0):
        q.submit("step", seconds=seconds)
    assert q.run_pending() == 3
    # Each waits for those before it: 0, 0.25 (on a bound: counted in its bucket), 5.25;
    # the last run is past every bound (+Inf only).
    waits, runs = [0.0, 0.25, 5.25], [0.25, 5.0, 1000.0]
    (kind,) = q.metrics().kinds
    assert kind.wait.buckets == cumulative(waits) == (1,) * 5 + (2,) * 5 + (3,) * 6
    assert kind.run.buckets == cumulative(runs) == (0,) * 5 + (1,) * 4 + (2,) * 7
    assert (kind.wait.count, kind.run.count) == (3, 3)
    assert kind.wait.sum == pytest.approx(sum(waits))
    assert kind.run.sum == pytest.approx(sum(runs))


def test_the_gauges_say_what_is_queued_scheduled_running_and_who_works(make_store, clock,
                                                                      registry, queues):
    @registry.task("step")
    def step(ctx):
        pass

    store = make_store()
    q = queues(store)
    first = q.submit("step")
    clock.now += 3.0
    q.submit("step")
    q.submit("step", delay=60)
    store.add_worker("worker-1")
    store.add_worker("worker-2")
    store.add_worker("worker-3")
    store.stop_worker("worker-3")  # on its way out: no longer counted
    metrics = q.metrics()
    assert (metrics.queued, metrics.scheduled, metrics.running, metrics.workers) == (2, 1, 0, 2)
    assert metrics.oldest_wait == pytest.approx(3.0)
    record = store.claim("worker-1", block=False)
    assert record.id == first
    q.pause()
    metrics = q.metrics()
    assert (metrics.queued, metrics.running, metrics.paused) == (1, 1, True)
    assert metrics.oldest_wait == pytest.approx(0.0)  # the second was queued 3 s later
    store.finish(record, State.DONE)
    for name in ("worker-1", "worker-2", "worker-3"):
        store.worker_exited(name)
        store.remove_worker(name)


def test_reset_zeroes_each_kind_and_keeps_one_with_work_to_come(make_store, registry, queues):
    @registry.task("step")
    def step(ctx):
        pass

    @registry.task("other")
    def other(ctx):
        pass

    q = queues(make_store())
    q.submit("step")
    q.submit("other")
    q.run_pending()
    q.submit("step")
    q.pause()
    q.reset()
    # "other" has nothing left: gone; "step" has a task queued, counted as submitted, as
    # the queue's own total counts it.
    assert q.metrics().kinds == (KindStats("step", submitted=1),)
    assert q.stats().submitted == 1
    q.resume()
    assert q.run_pending() == 1
    assert totals(q.metrics()) == {"step": (1, 1, 0, 0, 0, 1, 1)}


def test_a_task_given_back_by_a_stopping_process_is_submitted_once(db):
    """SQLite: a task whose process stopped under it is queued again, and started again
    elsewhere: one task submitted, two starts, one end, across a reset too."""
    store, other = SqliteStore(db), SqliteStore(db)  # two processes on one file
    try:
        store.add_one("step", {})
        record = store.claim(None, block=False)
        assert store.release([record]) == 1  # stopping: queued again, attempt 1 done
        assert store.get(record.id).state is State.QUEUED
        assert totals(other.metrics()) == {"step": (1, 0, 0, 0, 0, 1, 0)}
        other.reset()  # queued and running tasks count as submitted: this one, once
        assert other.snapshot().submitted == 1
        assert totals(store.metrics()) == {"step": (1, 0, 0, 0, 0, 0, 0)}
        again = other.claim(None, block=False)
        other.finish(again, State.DONE)
        assert totals(store.metrics()) == {"step": (1, 1, 0, 0, 0, 1, 1)}
    finally:
        for each in (store, other):
            each.close()
            each.detach()


def test_a_schema_4_file_is_upgraded_and_counts_by_kind_from_then_on(tmp_path, registry,
                                                                     queues):
    """queue-v4.db was written by the release before /metrics (SCHEMA_VERSION 4): task 1
    (pretend) done, 2 (flaky) failed, 3 (pretend) queued, 4 (pretend) scheduled 30 days
    on. Its totals stay; each kind counts from the upgrade, the tasks waiting then
    counted as submitted."""
    @registry.task("pretend", params={"seconds": Int(0, 10)})
    def pretend(ctx, seconds=0):
        return {"slept": seconds}

    path = tmp_path / "queue.db"
    shutil.copyfile(V4_FILE, path)
    q = queues(SqliteStore(str(path)))
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
    assert [q.get(i).state for i in (1, 2, 3, 4)] == [State.DONE, State.FAILED, State.QUEUED,
                                                      State.SCHEDULED]
    assert q.metrics().kinds == (KindStats("pretend", submitted=2),)  # 3 and 4, waiting
    assert q.cancel(4) is State.CANCELLED
    assert q.run_pending() == 1 and q.get(3).result == {"slept": 2}
    assert q.submit("pretend", seconds=1) == 5  # ids go on where they were
    assert q.run_pending() == 1
    assert totals(q.metrics()) == {"pretend": (3, 2, 0, 1, 0, 2, 2)}
    snap = q.stats()
    assert (snap.submitted, snap.done, snap.failed, snap.cancelled) == (5, 3, 1, 1)
    q.reset()
    assert q.metrics().kinds == ()
    SqliteStore(str(path))  # opening again changes nothing


@pytest.mark.parametrize("version", [1, 2, 3])
def test_files_of_the_first_schemas_are_upgraded_all_the_way_and_count_by_kind(
        tmp_path, registry, queues, version):
    """The files the upgrade tests of test_sqlite_store.py and test_periodic.py open: the
    tasks waiting for a start count as submitted, and their runs count."""
    @registry.task("pretend", params={"seconds": Int(0, 10)})
    def pretend(ctx, seconds=0):
        pass

    path = tmp_path / "queue.db"
    shutil.copyfile(DATA / f"queue-v{version}.db", path)
    store = SqliteStore(str(path))
    q = queues(store)
    tasks = [info for i in range(1, 10) if (info := q.get(i)) is not None]  # (a few, from 1)
    waiting = [t for t in tasks if t.state in (State.QUEUED, State.SCHEDULED)
               and not t.attempts]
    assert waiting and q.metrics().kinds == (KindStats("pretend", submitted=len(waiting)),)
    store.maintain()  # (schema 1: a task left running by a process long gone is queued again)
    cancelled = [q.cancel(t.id) for t in tasks if t.state is State.SCHEDULED]  # due whenever
    ran = q.run_pending()
    assert ran >= 1
    assert totals(q.metrics()) == {
        "pretend": (len(waiting), ran, 0, len(cancelled), 0, ran, ran)}


# -- GET /metrics -----------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, read by prometheus_client's own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(client, **headers: str) -> str:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    return response.text


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_the_scrape_parses_and_says_what_the_store_says(make_app, store, monkeypatch):
    app = make_app(store=store)
    queue = get_queue(app)
    # The demo's shaky kind tries again an hour on here, not a second: it stays
    # scheduled while the test looks, however slow the machine.
    monkeypatch.setitem(queue.registry._kinds, "shaky", dataclasses.replace(
        queue.registry.get("shaky"), retry=Retry(attempts=3, backoff=3600, max_backoff=3600)))
    queue.submit("pretend", seconds=0)
    queue.submit("flaky", seconds=0, fail_rate=1)
    queue.submit("shaky", seconds=0, fail_rate=1)  # fails; retried by its policy, later
    queue.cancel(queue.submit("pretend", seconds=0))
    assert queue.run_pending() == 3
    queue.submit("pretend", seconds=0)
    queue.pause()

    text = scrape(app.test_client())
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families == {
        "queue_tasks_submitted": "counter", "queue_tasks_done": "counter",
        "queue_tasks_failed": "counter", "queue_tasks_cancelled": "counter",
        "queue_tasks_retried": "counter", "queue_tasks_queued": "gauge",
        "queue_tasks_scheduled": "gauge", "queue_tasks_running": "gauge",
        "queue_workers": "gauge", "queue_paused": "gauge",
        "queue_oldest_queued_seconds": "gauge", "queue_task_wait_seconds": "histogram",
        "queue_task_run_seconds": "histogram",
    }
    got = samples(text)
    kind = lambda name: (("kind", name),)  # noqa: E731
    assert got[("queue_tasks_submitted_total", kind("pretend"))] == 3
    assert got[("queue_tasks_done_total", kind("pretend"))] == 1
    assert got[("queue_tasks_cancelled_total", kind("pretend"))] == 1
    assert got[("queue_tasks_failed_total", kind("flaky"))] == 1
    assert got[("queue_tasks_retried_total", kind("shaky"))] == 1
    assert got[("queue_tasks_failed_total", kind("shaky"))] == 0
    assert (got[("queue_tasks_queued", ())], got[("queue_tasks_scheduled", ())],
            got[("queue_tasks_running", ())], got[("queue_paused", ())],
            got[("queue_workers", ())]) == (1, 1, 0, 1, 0)
    assert got[("queue_oldest_queued_seconds", ())] >= 0
    for name in ("pretend", "flaky", "shaky"):
        for histogram in ("queue_task_wait_seconds", "queue_task_run_seconds"):
            count = got[(f"{histogram}_count", kind(name))]
            assert count == 1
            assert got[(f"{histogram}_bucket", (("kind", name), ("le", "+Inf")))] == count
            assert got[(f"{histogram}_bucket", (("kind", name), ("le", "600.0")))] == count
            assert got[(f"{histogram}_sum", kind(name))] >= 0

    # What the scrape says is the store's own read.
    metrics = queue.metrics()
    for k in metrics.kinds:
        assert got[("queue_tasks_submitted_total", kind(k.kind))] == k.submitted
        for bound, count in zip(DURATION_BUCKETS, k.run.buckets):
            le = (("kind", k.kind), ("le", repr(bound)))
            assert got[("queue_task_run_seconds_bucket", le)] == count


def test_the_scrape_is_behind_the_access_token_like_everything_else(make_app):
    client = make_app(QUEUE_ACCESS_TOKEN=SECRET).test_client()
    refused = client.get("/metrics")
    assert refused.status_code == 401 and "queue_" not in refused.text
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong-secret"}
                      ).status_code == 401
    scrape(client, Authorization=f"Bearer {SECRET}")  # how a scraper sends it
    basic = base64.b64encode(f"prometheus:{SECRET}".encode()).decode()
    scrape(client, Authorization=f"Basic {basic}")


def test_queue_metrics_public_opens_the_scrape_and_nothing_else(make_app):
    client = make_app(QUEUE_ACCESS_TOKEN=SECRET, QUEUE_METRICS_PUBLIC=True).test_client()
    assert "queue_tasks_queued 0.0" in scrape(client)
    for path in ("/", "/api/stats", "/live"):
        assert client.get(path).status_code == 401, path
    assert client.post("/api/tasks", json={"kind": "pretend"}).status_code == 401
    # Read-only pages for a projector open every GET, the scrape with them.
    scrape(make_app(QUEUE_ACCESS_TOKEN=SECRET, QUEUE_PUBLIC_READ=True).test_client())
