"""The operator's view on the SQLite store: what the contract suites do not show.

test_backend_contract.py holds every backend to the same find, count, bulk and health
through the seam, and test_contract.py proves find, count and the bulk actions against
a model on both stores. Here: a schema-5 file upgraded and searchable, the query plans
(every page a seek on an index, nothing sorted but the few waiting tasks), what a text
search means, a bulk action as one transaction per batch, and each kind's health by
the wall-clock minute, driven on clocks the test sets, against the memory store.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
import types
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from dashboard.errors import BulkStopped, QueueClosed, QueueFull
from dashboard.local import memory as memory_module
from dashboard.local import sqlite as sqlite_module
from dashboard.local.memory import MemoryStore
from dashboard.local.queue import bulk_in_batches
from dashboard.local.sqlite import SCHEMA_VERSION, SqliteStore, count_sql, find_sql
from dashboard.records import (BULK_BATCH, DURATION_BUCKETS, HEALTH_WINDOW, State,
                               TaskFilter)
from dashboard.tasks import Int, Str

DATA = Path(__file__).parent / "data"
FAILED, QUEUED, DONE = State.FAILED, State.QUEUED, State.DONE


def ids(page) -> list:
    return [t.id for t in page.tasks]


# -- upgrading ------------------------------------------------------------------------


def test_a_schema_5_file_is_upgraded_keeping_everything_and_can_be_searched(
        tmp_path, registry, queues):
    """queue-v5.db was written by the release before the operator's view (schema 5):
    1 done with a result; 2 failed, retried as 3 (queued); 4 queued with the key
    report-42 and params in another script; 5 scheduled 30 days on; 6 cancelled; 7
    queued by the schedule "nightly". Its params were json.dumps's text ('{"region":
    "Z\\u00fcrich", ...}'): a search must find them as it finds new ones."""
    @registry.task("report", params={"region": Str(), "year": Int(2000, 2100)})
    def report(ctx, region="", year=2025):
        return {"rows": len(region)}

    path = tmp_path / "queue.db"
    shutil.copyfile(DATA / "queue-v5.db", path)
    store = SqliteStore(str(path))
    q = queues(store)
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        assert conn.execute("SELECT params FROM tasks WHERE id = 4").fetchone()[0] == \
            '{"region":"Zürich","year":2026}'
    assert [q.get(i).state for i in range(1, 8)] == [
        DONE, FAILED, QUEUED, QUEUED, State.SCHEDULED, State.CANCELLED, QUEUED]
    assert q.get(1).result == {"rows": 4} and q.get(2).error == "KeyError: 'nowhere'"
    assert (q.get(2).retried_as, q.get(3).retry_of) == (3, 2)
    assert q.get(4).params == {"region": "Zürich", "year": 2026}
    assert q.enqueue("report", {"region": "x", "year": 2000}, key="report-42") == (4, False)
    nightly = store.schedule_states(["nightly"])["nightly"]
    assert (nightly.last_task, nightly.runs, nightly.last_state) == (7, 1, QUEUED)
    assert q.get(7).schedule == "nightly" and q.get(5).due_at is not None
    # Searchable, old rows and new alike.
    assert ids(q.find(TaskFilter(text="zürich"))) == [4]
    assert ids(q.find(TaskFilter(text='"REGION":"nord"'))) == [1]
    assert ids(q.find(TaskFilter(text="keyerror"))) == [2]
    assert ids(q.find(TaskFilter(states=frozenset({QUEUED})))) == [7, 4, 3]
    assert ids(q.find(TaskFilter(kind="report"), limit=2, oldest_first=True)) == [1, 2]
    assert q.count(TaskFilter()) == 7
    assert q.count(TaskFilter().for_action("retry")) == 1  # 6: 2 was retried already
    assert q.bulk("retry", TaskFilter(kind="report")).ids == (8,)  # ids go on
    assert q.get(6).retried_as == 8
    assert q.run_pending() == 4  # 3, 4, 7 and 8
    health = q.kind_health()[0]
    assert (health.kind, health.queued, health.done, health.failed) == ("report", 0, 4, 0)
    assert q.bulk("purge", TaskFilter(states=frozenset({DONE}))).count == 5
    assert q.count(TaskFilter()) == 3  # 2, 5, 6
    SqliteStore(str(path))  # opening again changes nothing


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_files_of_every_older_schema_are_upgraded_and_searchable(tmp_path, version):
    path = tmp_path / "queue.db"
    shutil.copyfile(DATA / f"queue-v{version}.db", path)
    with closing(sqlite3.connect(path)) as conn:
        finished, total = conn.execute(
            "SELECT count(finished_at), count(*) FROM tasks").fetchone()
        pretend = [i for (i,) in conn.execute("SELECT id FROM tasks WHERE kind = 'pretend' "
                                              "ORDER BY id")]
    store = SqliteStore(str(path))
    assert store.count(TaskFilter()) == total
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT kept FROM meta").fetchone()[0] == finished
    done = store.find(TaskFilter(states=frozenset({DONE})), 10)
    assert done and all(t.state is DONE for t in done)
    assert [t.id for t in store.find(TaskFilter(kind="pretend"), 100, None, True)] == pretend
    assert store.kind_health(["pretend"])[0].kind == "pretend"


# -- query plans ----------------------------------------------------------------------


def plans(store: SqliteStore, statements: list[tuple[str, list]]) -> list[str]:
    conn = store._reader()
    return [" / ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args))
            for sql, args in statements]


@pytest.mark.parametrize("query", [
    TaskFilter(states=frozenset({FAILED})),
    TaskFilter(states=frozenset({FAILED}), kind="report"),
    TaskFilter(kind="report", states=frozenset({DONE, FAILED, State.CANCELLED})),
    TaskFilter().for_action("retry"),
    TaskFilter(kind="report").for_action("purge"),
    TaskFilter(states=frozenset({State.RUNNING}), kind="report"),
], ids=["state", "state+kind", "kind, finished", "bulk retry", "bulk purge", "running"])
def test_a_page_deep_or_first_is_a_seek_on_an_index_and_sorts_nothing(db, query):
    store = SqliteStore(db)
    for after, ascending in ((None, False), (123_456, False), (123_456, True)):
        for plan in plans(store, find_sql(query, 51, after, ascending)):
            assert "INDEX" in plan and "TEMP B-TREE" not in plan, plan
            assert "SCAN tasks" not in plan or "tasks_running" in plan, plan
    (plan,) = plans(store, [count_sql(query)])
    assert "TEMP B-TREE" not in plan and "SCAN tasks " not in plan.replace(
        "SCAN tasks USING INDEX tasks_running", ""), plan
    if not query.states & {State.RUNNING}:
        assert "COVERING INDEX" in plan, plan  # a count reads the index alone


def test_a_kind_alone_sorts_only_the_waiting_lanes_and_upkeep_reads_no_history(db):
    """A kind alone asks for every state: the finished ones and the running are walked
    on their indexes; the queued as submitted from the queue's head; only the tasks
    queued when due and the scheduled ones (at most QUEUE_MAX_QUEUED each) are sorted."""
    store = SqliteStore(db)
    for plan in plans(store, find_sql(TaskFilter(kind="report"), 51, 99, False)):
        if "TEMP B-TREE" in plan:
            assert "tasks_due" in plan or "tasks_late" in plan, plan
        else:
            assert "INDEX" in plan or "PRIMARY KEY (rowid>? AND rowid<?)" in plan, plan
    (take_back,) = plans(store, [("SELECT t.id FROM tasks t LEFT JOIN processes p "
                                  "ON p.token = t.process WHERE t.state = 'running'", [])])
    assert "tasks_running" in take_back  # upkeep's look for orphans: not the history
    assert plans(store, [count_sql(TaskFilter())]) == ["SCAN meta"]


# -- text ----------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    if request.param == "memory":
        return MemoryStore(100, 100)
    return SqliteStore(str(tmp_path / "queue.db"), 100, 100)


def texts(store, text: str) -> list[int]:
    return [t.id for t in store.find(TaskFilter(text=text), 50, None, True)]


def test_a_search_means_its_characters_in_any_ascii_case(store):
    a = store.add_one("k", {"pct": "100%"})
    b = store.add_one("k", {"name": "a_b"})
    c = store.add_one("k", {"path": "C:\\Temp"})
    d = store.add_one("k", {"name": "aXb", "city": "Zürich"})
    assert texts(store, "%") == [a] and texts(store, "0%") == [a]
    assert texts(store, "_") == [b] and texts(store, "A_B") == [b]
    # In params as JSON a backslash is two, as a quote is \": found as typed either way.
    assert texts(store, "\\") == [c] and texts(store, '"c:\\\\temp"') == [c]
    assert texts(store, "C:\\Temp") == [c] and texts(store, '"c:\\temp"') == [c]
    assert texts(store, '"NAME":"A') == [b, d]
    assert texts(store, "ZÜRICH" if isinstance(store, MemoryStore) else "zürich") == [d]
    assert texts(store, "%_%") == texts(store, "*") == []
    assert store.count(TaskFilter(text="A")) == 3  # all but {"pct":"100%"}


def test_sqlite_folds_the_case_of_ascii_letters_only(db):
    """The documented difference (find_sql): SQLite's LIKE knows ASCII case only."""
    store = SqliteStore(db)
    task = store.add_one("k", {"city": "Zürich"})
    assert texts(store, "ZüRICH") == [task]
    assert texts(store, "ZÜRICH") == []


def test_params_sqlite_cannot_hold_as_text_are_kept_escaped(store):
    """A JSON request can carry a lone surrogate ("\\ud800"), which no UTF-8 text holds:
    kept as JSON escapes it and read back as it came, the rest of the params as they
    are (findable)."""
    odd = {"s": "x\ud800y", "é": 1}
    one = store.add_one("k", odd)
    many = store.add("k", odd, 2)
    keyed = store.add_keyed("k", odd, "key").id
    later = store.add("k", odd, 1, delay=3600)[0]
    for task_id in (one, *many, keyed, later):
        assert store.get(task_id).params == odd
    assert texts(store, "é") == [one, *many, keyed, later]


# -- bulk actions ----------------------------------------------------------------------


def failed_tasks(store, count: int, kind: str = "k") -> list[int]:
    ids_ = store.add(kind, {}, count)
    while (record := store.claim(None, block=False)) is not None:
        store.finish(record, FAILED, "it broke")
    return ids_


@contextmanager
def counting_writes(store: SqliteStore):
    """How many write transactions ``store`` begins meanwhile."""
    begun = []
    write = store._write

    @contextmanager
    def counted(*args, **kwargs):
        begun.append(1)
        with write(*args, **kwargs) as conn_now:
            yield conn_now

    store._write = counted
    try:
        yield begun
    finally:
        store._write = write


def test_clearing_a_large_history_goes_in_short_transactions(db):
    """With 100,000 finished tasks kept by default, one DELETE held every submit and
    worker of every process for about a second; now 500 go per transaction."""
    store = SqliteStore(db, max_queued=2000, history=2000)
    failed_tasks(store, 1200)
    late = store.add_one("k", {})
    with counting_writes(store) as begun:
        assert store.clear_history() == 1200
    assert len(begun) == 1 + 3  # the newest end, then 500, 500, 200
    assert store.count(TaskFilter()) == 1 and store.get(late).state is QUEUED
    failed_tasks(store, 3)
    with counting_writes(store) as begun:
        store.reset()
    assert store.count(TaskFilter(states=frozenset({FAILED}))) == 0
    assert store.snapshot().failed == 0


def test_a_bulk_action_is_one_write_transaction_per_batch(db):
    store = SqliteStore(db, max_queued=1000, history=1000)
    failed = failed_tasks(store, 450)
    with counting_writes(store) as begun:
        result = bulk_in_batches(store, "retry", TaskFilter(kind="k"))
    assert len(begun) == 5 == -(-450 // BULK_BATCH)  # 100, 100, 100, 100, 50
    assert result.count == 450 and list(result.ids) == sorted(result.ids)
    assert [store.get(t).retried_as for t in failed] == list(result.ids)
    with counting_writes(store) as begun:
        assert bulk_in_batches(store, "cancel", TaskFilter(kind="k")).count == 450
    assert len(begun) == 5
    tag = store.tag
    with counting_writes(store) as begun:
        assert bulk_in_batches(store, "purge", TaskFilter(kind="k")).count == 900
    assert len(begun) == 9 and store.tag != tag  # a page polling sees it
    assert store.count(TaskFilter()) == 0


def test_a_bulk_retry_queues_what_fits_then_says_the_queue_is_full(store):
    """As retries one by one do: the oldest, as many as there is room for (each linked
    both ways), then BulkStopped naming them (its reason the QueueFull); once closed,
    nothing."""
    store.max_queued = 5
    failed = failed_tasks(store, 5)
    failed += failed_tasks(store, 3)
    store.add_one("k", {})
    with pytest.raises(BulkStopped) as stopped:
        bulk_in_batches(store, "retry", TaskFilter(states=frozenset({FAILED})))
    assert isinstance(stopped.value.reason, QueueFull) and len(stopped.value.ids) == 4
    retried = [store.get(t).retried_as for t in failed]
    assert all(retried[:4]) and retried[4:] == [None] * 4
    assert all(store.get(new).retry_of == old for old, new in zip(failed, retried[:4]))
    assert store.count(TaskFilter(states=frozenset({QUEUED}))) == 5
    store.close()
    with pytest.raises(QueueClosed):
        bulk_in_batches(store, "retry", TaskFilter(states=frozenset({FAILED})))
    assert [store.get(t).retried_as for t in failed[4:]] == [None] * 4


# -- each kind's health --------------------------------------------------------------


class Clocks:
    """The wall clock and the clock durations are measured on, as both stores read
    them, set by the test."""

    def __init__(self, monkeypatch):
        self.wall = 1_800_000_000.0  # a whole minute
        self.tick = 1000.0
        fake = types.SimpleNamespace(time=lambda: self.wall, monotonic=lambda: self.tick,
                                     time_ns=time.time_ns, sleep=time.sleep,
                                     perf_counter=time.perf_counter)
        monkeypatch.setattr(memory_module, "time", fake)
        monkeypatch.setattr(sqlite_module, "time", fake)
        monkeypatch.setattr(sqlite_module, "clock", lambda: self.tick)

    def attempt(self, store, kind: str, minute: float, waited: float, ran: float,
                state: State) -> None:
        """One task of ``kind`` queued, started ``waited`` later, minute ``minute`` (from
        the first), and ended ``ran`` after, as ``state``."""
        self.wall = 1_800_000_000.0 + minute * 60
        store.add_one(kind, {})
        self.tick += waited
        record = store.claim(None, block=False)
        self.tick += ran
        store.finish(record, state, None if state is DONE else "no")
        self.tick += 1


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_each_kinds_health_is_its_last_hour_by_the_minute(monkeypatch, tmp_path, backend):
    clocks = Clocks(monkeypatch)
    store = MemoryStore(100, 100) if backend == "memory" else SqliteStore(
        str(tmp_path / "queue.db"), 100, 100)
    hour = HEALTH_WINDOW // 60
    clocks.attempt(store, "a", -2 * hour, 0.001, 0.001, DONE)  # long forgotten
    clocks.attempt(store, "a", -hour, 0.001, 0.001, FAILED)  # just out of the hour
    clocks.attempt(store, "a", -hour + 1, 0.005, DURATION_BUCKETS[0], FAILED)  # bounds: in
    for ran in (0.0051, 0.2, 0.2, 700.0):  # the 700 s run: past the last bound
        clocks.attempt(store, "a", 0, 1.0, ran, DONE)
    clocks.attempt(store, "b", 0, 30.5, 0.5, DONE)
    store.add_one("a", {})
    a, b, c = store.kind_health(["a", "b", "c"])
    assert (a.queued, a.running, a.done, a.failed) == (1, 0, 4, 1)
    assert (a.run_p50, a.run_p95, a.wait_p95) == (0.25, DURATION_BUCKETS[-1], 1.0)
    assert (b.done, b.run_p50, b.wait_p95) == (1, 0.5, 60.0)
    assert c == (c.kind, 0, 0, 0, 0, None, None, None)
    clocks.wall += 60  # a minute on: the oldest failure leaves the hour
    assert store.kind_health(["a"])[0].failed == 0
    clocks.attempt(store, "a", 2 * hour, 0.001, 0.001, DONE)  # hours later
    later = store.kind_health(["a"])[0]
    assert (later.done, later.failed, later.run_p50) == (1, 0, DURATION_BUCKETS[0])
    if backend == "sqlite":  # a new minute let go of those over an hour before it
        with closing(sqlite3.connect(store.path)) as conn:
            oldest = conn.execute("SELECT min(minute) FROM kind_minutes").fetchone()[0]
        assert oldest is None or oldest > int(clocks.wall // 60) - hour
    store.reset()
    assert store.kind_health(["a"])[0] == ("a", 1, 0, 0, 0, None, None, None)


def test_sqlite_health_counts_as_the_memory_store_does_whatever_the_order(
        monkeypatch, tmp_path):
    """Starts and ends of many kinds, minutes apart and back (an end written late, after
    a later start): both stores give the same health."""
    clocks = Clocks(monkeypatch)
    stores = [MemoryStore(100, 100), SqliteStore(str(tmp_path / "queue.db"), 100, 100)]
    steps = [("a", 0, 0.02, 0.3, DONE), ("b", 0, 2.0, 0.01, FAILED), ("a", 3, 0.0, 40, DONE),
             ("a", 2, 0.1, 0.1, FAILED), ("b", 59, 500, 0.001, DONE), ("c", 61, 0.05, 2, DONE),
             ("a", 61, 0.05, 2, FAILED), ("a", 60, 0.006, 0.03, DONE)]
    for kind, minute, waited, ran, state in steps:
        for store in stores:
            clocks.attempt(store, kind, minute, waited, ran, state)
    for minute in (61, 62, 65, 119, 121):
        clocks.wall = 1_800_000_000.0 + minute * 60
        memory, sqlite = (store.kind_health(["a", "b", "c", "d"]) for store in stores)
        assert sqlite == memory, minute
