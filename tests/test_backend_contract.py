"""The contract every backend keeps, through the Backend seam only.

Written against public behaviour (no private attributes, no store): what a
client of the seam submits, reads and changes. Each backend is one parameter
of the ``backend`` fixture, with a ``drain`` that runs what is queued the way
that backend runs work (the in-process backend: ``run_pending()`` in this
thread). A new backend joins by adding its parameter.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterator

import pytest

from dashboard.backend import Backend
from dashboard.errors import (InvalidParam, QueueError, QueueFull, TaskFailed, TaskNotFound,
                              UnknownKind, WrongState)
from dashboard.records import State
from dashboard.local.memory import MemoryStore
from dashboard.local.sqlite import SqliteStore
from dashboard.tasks import Bool, Float, Int, Registry, Retry, Str
from dashboard.local.queue import WorkQueue
from dashboard.local.store import MAX_LOG_LINES
from support import wait_for

MAX_QUEUED = 20


def contract_registry() -> Registry:
    registry = Registry()

    @registry.task("add", params={"a": Int(0, 100), "b": Int(0, 100)})
    def add(ctx, a=0, b=0):
        ctx.progress(1.0, f"{a}+{b}")
        return a + b

    @registry.task("boom")
    def boom(ctx):
        raise ValueError("boom, as asked")

    @registry.task("hold")
    def hold(ctx):
        """Runs until the test lets it go (HOLD), or is cancelled."""
        while not HOLD.wait(0.01):
            if ctx.cancelled:
                return

    @registry.task("fails_first", params={"times": Int(0, 10), "error": Str(choices=("io", "bug"))},
                   retry=Retry(attempts=3, backoff=0.0, max_backoff=0.0, on=(ConnectionError,)))
    def fails_first(ctx, times=0, error="io"):
        """Fails its first ``times`` attempts (a ConnectionError retries; a bug does not)."""
        TRIES[ctx.task_id] = TRIES.get(ctx.task_id, 0) + 1
        if TRIES[ctx.task_id] <= times:
            raise (ConnectionError if error == "io" else KeyError)(f"try {TRIES[ctx.task_id]}")
        return TRIES[ctx.task_id]

    @registry.task("sleeps", params={"seconds": Float(0, 60), "obey": Bool()},
                   retry=Retry(attempts=3, backoff=0.0, max_backoff=0.0), time_limit=30.0)
    def sleeps(ctx, seconds=0.0, obey=True):
        """Sleeps, a little at a time, stopping early when asked if it obeys."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if obey and ctx.cancelled:
                return "stopped"
            time.sleep(0.005)
        return "slept"

    @registry.task("chatty", params={"lines": Int(0, 1000)})
    def chatty(ctx, lines=1):
        for n in range(1, lines + 1):
            ctx.logger.info("line %d of %d <b>", n, lines)
        logging.getLogger("some.library").warning("a library's warning")
        logging.getLogger("some.library").info("an info the configuration drops")
        elsewhere = threading.Thread(target=lambda: ctx.logger.warning("from another thread"))
        elsewhere.start()
        elsewhere.join()
        try:
            {}["missing"]
        except KeyError:
            ctx.logger.exception("looked it up")

    @registry.task("fails_slowly", retry=Retry(attempts=2, backoff=3600.0, max_backoff=3600.0))
    def fails_slowly(ctx):
        raise ConnectionError("down")

    @registry.task("returns", params={"what": Str(choices=tuple(RETURNS))})
    def returns(ctx, what):
        return RETURNS[what]()

    return registry


#: What the "returns" kind returns: JSON values, then what cannot be kept.
RETURNS = {
    "json": lambda: {"text": "é", "list": [1, 2.5, None, True], "nested": {"k": []}},
    "zero": lambda: 0,
    "set": lambda: {1, 2},
    "nan": lambda: float("nan"),
    "big": lambda: "x" * (MAX_RESULT_BYTES + 1),
}
MAX_RESULT_BYTES = 1000
HOLD = threading.Event()
TRIES: dict = {}  # task id -> attempts made, for fails_first


@pytest.fixture(params=["memory", "sqlite", pytest.param("rq", marks=pytest.mark.redis)])
def backend(request, tmp_path) -> Iterator[tuple[Backend, Callable[[], int]]]:
    """``(backend, drain)``: drain runs everything runnable and says how many ran."""
    TRIES.clear()  # ids start again with each SQLite file
    if request.param == "rq":
        yield from rq_backend(request.getfixturevalue("redis_url"))
        return
    if request.param == "memory":
        store = MemoryStore(MAX_QUEUED, 100)
    else:
        store = SqliteStore(str(tmp_path / "contract.db"), MAX_QUEUED, 100)
    queue = WorkQueue(workers=0, store=store, registry=contract_registry(),
                      max_result_bytes=MAX_RESULT_BYTES)
    yield queue, queue.run_pending
    queue.shutdown()


def rq_backend(url: str) -> Iterator[tuple[Backend, Callable[[], int]]]:
    """The RQ backend on a private Redis; drain runs an RQ worker of ours in this process
    (no fork, so the kinds above share this module's state) until the queue is empty."""
    from flask import Flask

    from dashboard.rq import RQBackend

    queue = RQBackend(url, contract_registry(), name="contract", max_queued=MAX_QUEUED,
                      history=100, max_result_bytes=MAX_RESULT_BYTES)
    app = Flask("contract")

    def drain() -> int:
        worker = queue.worker(app, fork=False)
        worker.work(burst=True, logging_level="WARNING", with_scheduler=True)
        return worker.ran

    yield queue, drain
    queue.shutdown()


def test_a_submitted_task_is_queued_then_done(backend):
    queue, drain = backend
    tag = queue.tag
    task_id = queue.submit("add", a=2, b=3)
    assert queue.tag != tag
    info = queue.get(task_id)
    assert (info.state, info.kind, info.params) == (State.QUEUED, "add", {"a": 2, "b": 3})
    assert queue.stats().queued == 1
    assert drain() == 1
    done = queue.get(task_id)
    assert done.state is State.DONE and done.finished and done.error is None
    snap = queue.stats(recent=5)
    assert (snap.queued, snap.done, snap.failed) == (0, 1, 0)
    assert [t.id for t in snap.recent] == [task_id]


def test_a_failing_task_is_failed_with_its_error_and_can_be_retried_once(backend):
    queue, drain = backend
    task_id = queue.submit("boom")
    drain()
    failed = queue.get(task_id)
    assert failed.state is State.FAILED and "boom, as asked" in failed.error
    assert failed.can_retry and not failed.can_cancel
    again, created = queue.retry(task_id)
    assert created and again != task_id and queue.get(again).retry_of == task_id
    assert queue.get(task_id).retried_as == again
    assert queue.retry(task_id) == (again, False)  # a second click queues nothing
    assert queue.stats().queued == 1


def test_a_cancelled_queued_task_never_runs(backend):
    queue, drain = backend
    task_id = queue.submit("add", a=1, b=1)
    assert queue.get(task_id).can_cancel
    queue.cancel(task_id)
    assert drain() == 0
    assert queue.get(task_id).state is State.CANCELLED
    with pytest.raises(WrongState) as refused:
        queue.cancel(task_id)
    assert refused.value.status == 409


def test_paused_nothing_runs_until_resumed(backend):
    queue, drain = backend
    queue.pause()
    assert queue.stats().paused
    queue.submit("add")
    assert drain() == 0 and queue.stats().queued == 1
    queue.resume()
    assert drain() == 1 and queue.stats().done == 1


def test_refusals_change_nothing_and_carry_their_status(backend):
    queue, _ = backend
    before = queue.stats()
    for call, error, status in [
        (lambda: queue.submit("nope"), UnknownKind, 400),
        (lambda: queue.submit("add", a=101), QueueError, 400),
        (lambda: queue.submit_many("add", MAX_QUEUED + 1, {}), QueueFull, 503),
        (lambda: queue.retry(10**15), TaskNotFound, 404),
        (lambda: queue.cancel(10**15), TaskNotFound, 404),
    ]:
        with pytest.raises(error) as refused:
            call()
        assert refused.value.status == status
    after = queue.stats()
    assert (after.submitted, after.queued) == (before.submitted, before.queued)
    assert queue.get(10**15) is None


def test_history_can_be_cleared_and_counters_reset(backend):
    queue, drain = backend
    queue.submit_many("add", 3, {})
    drain()
    assert queue.clear_history() == 3
    assert not queue.stats(recent=10).recent
    assert queue.stats().done == 3  # the counters keep their totals
    queue.reset()
    assert queue.stats().done == 0


def test_identity_names_the_queue_and_stays(backend):
    queue, _ = backend
    identity = queue.identity
    queue.submit("add")
    assert queue.identity == identity and identity


# -- results ---------------------------------------------------------------------------------


def test_what_a_task_returns_is_its_result(backend):
    queue, drain = backend
    added, shaped, zero = (queue.submit("add", a=2, b=3), queue.submit("returns", what="json"),
                           queue.submit("returns", what="zero"))
    assert queue.get(added).result is None  # not yet
    drain()
    assert queue.get(added).result == 5 and queue.result(added) == 5
    assert queue.get(shaped).result == RETURNS["json"]()
    assert queue.get(shaped).to_dict()["result"] == RETURNS["json"]()
    assert queue.result(zero, timeout=0) == 0


@pytest.mark.parametrize("what, says", [
    ("set", "Object of type set is not JSON serializable"),
    ("nan", "Out of range float values are not JSON compliant"),
    ("big", f"{MAX_RESULT_BYTES + 3:,} bytes of JSON, more than the {MAX_RESULT_BYTES:,} kept"),
])
def test_a_result_that_cannot_be_kept_fails_the_task_saying_why(backend, what, says):
    queue, drain = backend
    task_id = queue.submit("returns", what=what)
    drain()
    info = queue.get(task_id)
    assert info.state is State.FAILED and info.result is None
    assert info.error.startswith("its result could not be kept: ") and says in info.error
    with pytest.raises(TaskFailed, match="its result could not be kept") as failed:
        queue.result(task_id, timeout=0)
    assert failed.value.info.id == task_id


def test_waiting_for_a_result_blocks_until_the_task_ends_or_times_out(backend):
    queue, drain = backend
    added, boom = queue.submit("add", a=1, b=1), queue.submit("boom")
    with pytest.raises(TimeoutError, match="has not finished after 0.05s"):
        queue.result(added, timeout=0.05)
    with pytest.raises(TaskNotFound):
        queue.wait(10**15, timeout=0)
    runner = threading.Thread(target=drain)
    runner.start()
    try:
        assert queue.result(added, timeout=30) == 2  # a deadline that only bounds a failure
        with pytest.raises(TaskFailed, match="failed: ValueError: boom, as asked"):
            queue.result(boom, timeout=30)
    finally:
        runner.join(30)
    cancelled = queue.submit("add")
    queue.cancel(cancelled)
    assert queue.wait(cancelled, timeout=0).state is State.CANCELLED
    with pytest.raises(TaskFailed, match="was cancelled"):
        queue.result(cancelled)


# -- unique keys -----------------------------------------------------------------------------


def test_a_key_names_one_task_while_it_is_queued_or_running(backend):
    queue, drain = backend
    first = queue.enqueue("add", {"a": 1}, key="report-42")
    assert first.created and queue.get(first.id).key == "report-42"
    assert queue.enqueue("add", {"a": 2}, key="report-42") == (first.id, False)
    assert queue.submit("add", a=3, key="report-42") == first.id
    other = queue.submit("add", key="report-43")
    assert other != first.id and queue.stats().queued == 2
    assert queue.get(first.id).params == {"a": 1}  # the first submit's params stand
    drain()
    again = queue.enqueue("add", {"a": 4}, key="report-42")  # the holder is done: a new one
    assert again.created and again.id != first.id


def test_a_running_task_holds_its_key_until_it_ends(backend):
    queue, drain = backend
    HOLD.clear()
    task_id = queue.submit("hold", key="nightly")
    runner = threading.Thread(target=drain)
    runner.start()
    try:
        wait_for(lambda: queue.get(task_id).state is State.RUNNING, 30, "the task to start")
        assert queue.enqueue("hold", key="nightly") == (task_id, False)
    finally:
        HOLD.set()
        runner.join(30)
    assert queue.get(task_id).state is State.DONE
    assert queue.enqueue("add", key="nightly").created


@pytest.mark.parametrize("key", ["", "x" * 201, "tab\there", 42])
def test_a_key_that_cannot_be_one_is_refused_naming_it(backend, key):
    queue, _ = backend
    with pytest.raises(InvalidParam, match="^key must be a string of 1 to 200 printable"):
        queue.enqueue("add", key=key)
    assert queue.stats().submitted == 0



# -- delayed tasks ---------------------------------------------------------------------------


def test_a_delayed_task_is_scheduled_apart_from_the_queue_and_cancellable(backend):
    queue, drain = backend
    later = queue.submit("add", a=1, delay=3600)
    also = queue.submit("add", at=datetime.now(timezone.utc) + timedelta(hours=2))
    info = queue.get(later)
    assert info.state is State.SCHEDULED and info.can_cancel
    assert info.due_at == pytest.approx(info.enqueued_at + 3600, abs=1)
    snap = queue.stats(0, 10)
    assert (snap.queued, snap.scheduled, snap.submitted) == (0, 2, 2)
    assert [t.id for t in snap.soon] == [later, also]  # soonest first
    assert drain() == 0  # not due
    assert queue.cancel(later) is State.CANCELLED
    assert queue.get(later).error == "cancelled before it was due"
    assert queue.stats().scheduled == 1 and queue.stats().cancelled == 1
    assert queue.get(queue.submit("add", at=time.time() - 5)).state is State.QUEUED  # past: now


def test_a_delayed_task_runs_once_due(backend):
    queue, drain = backend
    task_id = queue.submit("add", a=2, b=2, delay=0.2)
    assert drain() == 0
    wait_for(drain, 30, "the delayed task to fall due and run")
    done = queue.get(task_id)
    assert done.state is State.DONE and done.result == 4
    assert done.started_at >= done.due_at - 0.01  # never before it is due
    assert queue.stats().scheduled == 0


def test_once_due_a_task_is_queued_as_if_submitted_then(backend):
    """Behind what was queued before it fell due, ahead of what was queued after."""
    queue, drain = backend
    if queue.capabilities.shared and not hasattr(queue, "run_pending"):
        pytest.skip("RQ: a due task is queued when RQ's scheduler next looks (each second), "
                    "behind what was queued meanwhile")
    queue.pause()
    before = queue.submit("add", a=1)
    due = queue.submit("add", a=2, delay=0.05)
    wait_for(lambda: time.time() >= queue.get(due).due_at + 0.05, 30, "the due time")
    after = queue.submit("add", a=3)
    queue.resume()
    assert drain() == 3
    started = [queue.get(t).started_at for t in (before, due, after)]
    assert started == sorted(started)


def test_a_key_is_held_while_its_task_is_scheduled(backend):
    queue, _ = backend
    first = queue.enqueue("add", key="nightly", delay=60)
    assert queue.enqueue("add", key="nightly") == (first.id, False)
    queue.cancel(first.id)
    assert queue.enqueue("add", key="nightly").created


@pytest.mark.parametrize("when, says", [
    ({"delay": -1}, "^delay must be a number of seconds from 0 to 2592000"),
    ({"delay": 31 * 24 * 3600}, "^delay must be a number of seconds from 0 to 2592000"),
    ({"delay": float("inf")}, "^delay must be"),
    ({"delay": "5"}, "^delay must be"),
    ({"at": "tomorrow"}, "^at must be a datetime or seconds since the epoch"),
    ({"delay": 5, "at": 5}, "^at cannot be given with delay"),
])
def test_a_delay_that_cannot_be_is_refused_naming_it(backend, when, says):
    queue, _ = backend
    with pytest.raises(InvalidParam, match=says):
        queue.submit("add", **when)
    assert queue.stats().submitted == 0


# -- automatic retries -----------------------------------------------------------------------


def test_a_failing_attempt_is_tried_again_until_it_succeeds(backend):
    queue, drain = backend
    task_id = queue.submit("fails_first", times=2)
    wait_for(lambda: drain() and queue.get(task_id).finished, 30, "the attempts to run")
    done = queue.get(task_id)
    assert done.state is State.DONE and done.result == 3 and done.attempts == 3
    assert [e["attempt"] for e in done.errors] == [1, 2]
    assert [e["error"] for e in done.errors] == ["ConnectionError: try 1", "ConnectionError: try 2"]
    # Done is done: the failed attempts' errors are in ``errors``, not the task's error,
    # so a search of errors finds it on no store.
    assert (done.error, done.traceback) == (None, None)
    snap = queue.stats()
    assert (snap.done, snap.failed, snap.submitted) == (1, 0, 1)  # one task, not three
    assert queue.result(task_id) == 3


def test_the_last_attempt_fails_the_task_with_every_error_kept(backend):
    queue, drain = backend
    task_id = queue.submit("fails_first", times=5)
    wait_for(lambda: drain() and queue.get(task_id).finished, 30, "the attempts to run")
    failed = queue.get(task_id)
    assert failed.state is State.FAILED and failed.attempts == 3
    assert failed.error == "ConnectionError: try 3"
    assert [e["error"] for e in failed.errors] == ["ConnectionError: try 1",
                                                   "ConnectionError: try 2"]
    assert failed.can_retry  # the manual Retry stays
    with pytest.raises(TaskFailed, match="try 3"):
        queue.result(task_id)


def test_an_exception_the_kind_does_not_retry_fails_at_once(backend):
    queue, drain = backend
    task_id = queue.submit("fails_first", times=1, error="bug")
    drain()
    failed = queue.get(task_id)
    assert failed.state is State.FAILED and failed.attempts == 1 and failed.errors == ()


def test_a_retry_waiting_to_be_due_is_scheduled_and_cancellable(backend):
    queue, drain = backend
    task_id = queue.submit("fails_slowly")
    assert drain() == 1
    info = queue.get(task_id)
    assert info.state is State.SCHEDULED and info.can_cancel and info.attempts == 1
    assert info.error == "ConnectionError: down" and len(info.errors) == 1
    assert 1800 - 5 <= info.due_at - info.errors[0]["at"] <= 3600 + 5  # backoff, jittered
    snap = queue.stats(0, 10)
    assert (snap.scheduled, snap.running, snap.failed) == (1, 0, 0)
    assert [t.id for t in snap.soon] == [task_id]
    assert queue.cancel(task_id) is State.CANCELLED
    assert queue.get(task_id).errors == info.errors  # its history stays


def test_a_retry_policy_waits_longer_each_time_up_to_its_cap():
    policy = Retry(attempts=10, backoff=2.0, max_backoff=30.0)
    rng = random.Random(7)
    waits = [policy.wait(attempt, rng) for attempt in range(1, 8)]
    caps = [2, 4, 8, 16, 30, 30, 30]
    assert all(cap / 2 <= wait <= cap for wait, cap in zip(waits, caps)), waits
    with pytest.raises(ValueError, match="attempts must be an integer from 1 to 100"):
        Retry(attempts=0)
    with pytest.raises(ValueError, match="on must be exception types"):
        Retry(on=("ConnectionError",))


# -- time limits -----------------------------------------------------------------------------


def run_in_thread(drain):
    runner = threading.Thread(target=drain)
    runner.start()
    return runner


def test_past_its_time_limit_a_task_sees_cancelled_and_is_failed_as_timed_out(backend):
    queue, drain = backend
    task_id = queue.submit("sleeps", seconds=30, time_limit=0.2)
    assert queue.get(task_id).time_limit == 0.2  # its own, not its kind's 30
    runner = run_in_thread(drain)
    try:
        info = queue.wait(task_id, timeout=30)
    finally:
        runner.join(30)
    assert info.state is State.FAILED and info.error == "timed out after 0.2s"
    assert info.attempts == 1 and info.errors == ()  # a time-out is not retried
    assert info.duration < 25  # it stopped when told, long before its 30 seconds


def test_a_task_that_ignores_its_time_limit_runs_on_and_is_overdue_meanwhile(backend):
    queue, drain = backend
    task_id = queue.submit("sleeps", seconds=1.0, obey=False, time_limit=0.05)
    runner = run_in_thread(drain)
    try:
        wait_for(lambda: queue.get(task_id).overdue, 30, "the task to be overdue")
        assert queue.get(task_id).state is State.RUNNING  # it holds its worker
        info = queue.wait(task_id, timeout=30)
    finally:
        runner.join(30)
    assert info.state is State.FAILED and info.error == "timed out after 0.05s"
    assert info.result is None and not info.overdue


def test_a_kinds_time_limit_is_the_default_and_a_bad_one_is_refused(backend):
    queue, _ = backend
    assert queue.get(queue.submit("sleeps")).time_limit == 30.0
    assert queue.get(queue.submit("add")).time_limit is None
    for bad in (0, -1, "5", float("nan"), 31 * 24 * 3600):
        with pytest.raises(InvalidParam, match="^time_limit must be a number of seconds above 0"):
            queue.submit("sleeps", time_limit=bad)
    assert queue.stats().submitted == 2


# -- what a task logs ------------------------------------------------------------------------


def test_what_a_task_logs_while_it_runs_is_kept_with_it(backend):
    queue, drain = backend
    task_id = queue.submit("chatty", lines=2)
    drain()
    logs = [line.split(" ", 1)[1] for line in queue.get(task_id).logs]  # less the time
    assert logs == [
        "INFO dashboard.task.chatty: line 1 of 2 <b>",
        "INFO dashboard.task.chatty: line 2 of 2 <b>",
        "WARNING some.library: a library's warning",
        "ERROR dashboard.task.chatty: looked it up (KeyError: 'missing')",
    ]  # not what the configuration drops, nor another thread's, nor the queue's own lines
    assert queue.get(task_id).to_dict()["logs_dropped"] == 0


def test_a_tasks_log_keeps_its_last_lines(backend):
    queue, drain = backend
    task_id = queue.submit("chatty", lines=300)
    drain()
    info = queue.get(task_id)
    assert len(info.logs) == MAX_LOG_LINES and info.logs_dropped == 300 + 2 - MAX_LOG_LINES
    assert info.logs[-1].endswith("looked it up (KeyError: 'missing')")


# -- the operator's view: finding tasks, acting on many, each kind's health ------------------


def searchable(queue):
    if not queue.capabilities.search:
        pytest.skip(f"the queue {queue.description} says search is not available")


def filled(queue, drain, ok: int = 7, bad: int = 5) -> tuple[list, list]:
    """``ok`` tasks done and ``bad`` failed, interleaved, oldest first."""
    done, failed = [], []
    for n in range(max(ok, bad)):
        if n < ok:
            done.append(queue.submit("add", a=n, b=1))
        if n < bad:
            failed.append(queue.submit("fails_first", times=5, error="bug"))
    drain()
    return done, failed


def test_find_pages_through_every_match_newest_first_and_back(backend):
    from dashboard.records import TaskFilter

    queue, drain = backend
    searchable(queue)
    done, failed = filled(queue, drain)
    everything = list(reversed([*sorted(done + failed, key=lambda i: int(i))]))
    seen, cursor, pages = [], None, []
    while True:
        page = queue.find(TaskFilter(), limit=5, cursor=cursor)
        pages.append(page)
        seen += [t.id for t in page.tasks]
        if page.older is None:
            break
        cursor = page.older
    assert seen == everything and [len(p.tasks) for p in pages] == [5, 5, 2]
    assert pages[0].newer is None and pages[1].newer is not None
    back = queue.find(TaskFilter(), limit=5, cursor=pages[2].newer)
    assert [t.id for t in back.tasks] == [t.id for t in pages[1].tasks]
    oldest = queue.find(TaskFilter(), limit=100, oldest_first=True)
    assert [t.id for t in oldest.tasks] == list(reversed(everything)) and oldest.older is None


def test_a_page_stays_put_when_tasks_are_added_before_it(backend):
    from dashboard.records import TaskFilter

    queue, drain = backend
    searchable(queue)
    filled(queue, drain)
    first = queue.find(TaskFilter(), limit=4)
    second = queue.find(TaskFilter(), limit=4, cursor=first.older)
    queue.submit_many("add", 3, {})
    assert queue.find(TaskFilter(), limit=4, cursor=first.older).tasks == second.tasks


def test_find_filters_by_state_kind_and_text(backend):
    from dashboard.records import TaskFilter

    queue, drain = backend
    searchable(queue)
    done, failed = filled(queue, drain)
    queued = queue.submit("add", a=42, b=0)
    by_state = queue.find(TaskFilter(states=frozenset({State.FAILED})))
    assert sorted(t.id for t in by_state.tasks) == sorted(failed)
    assert [t.id for t in queue.find(TaskFilter(states=frozenset({State.QUEUED}))).tasks] == [queued]
    assert {t.kind for t in queue.find(TaskFilter(kind="add")).tasks} == {"add"}
    assert queue.count(TaskFilter(kind="add")) == len(done) + 1
    if queue.capabilities.text_search:
        assert [t.id for t in queue.find(TaskFilter(text='"A":42')).tasks] == [queued]  # any case
        assert queue.count(TaskFilter(text="KeyError")) == len(failed)  # in the error
        assert queue.count(TaskFilter(text="100%_")) == 0  # no wildcards
    assert queue.count(TaskFilter(kind="nope")) == 0


def test_a_cursor_not_given_out_is_refused_naming_it(backend):
    from dashboard.records import TaskFilter

    queue, _ = backend
    searchable(queue)
    for bad in ("x1", "a", "a1;drop", "a" * 80):
        with pytest.raises(InvalidParam, match="^cursor "):
            queue.find(TaskFilter(), cursor=bad)


def test_bulk_retry_retries_each_matching_failed_task_once(backend):
    from dashboard.records import TaskFilter

    queue, drain = backend
    searchable(queue)
    _, failed = filled(queue, drain)
    query = TaskFilter(states=frozenset({State.FAILED}), kind="fails_first")
    assert queue.count(query.for_action("retry")) == len(failed)
    result = queue.bulk("retry", query)
    assert result.count == len(failed) and len(result.ids) == len(failed)
    assert result.line().startswith(f"{len(failed)} tasks retried as #")
    assert {queue.get(t).retry_of for t in result.ids} == set(failed)
    assert queue.count(query.for_action("retry")) == 0
    assert queue.bulk("retry", query).count == 0  # nothing retried twice
    assert queue.stats().queued == len(failed)


def test_bulk_cancel_takes_back_what_has_not_started_and_purge_forgets_the_finished(backend):
    from dashboard.records import TaskFilter

    queue, drain = backend
    searchable(queue)
    done, failed = filled(queue, drain)
    waiting = queue.submit_many("add", 4, {})
    later = queue.submit("add", delay=3600)
    cancelled = queue.bulk("cancel", TaskFilter(kind="add"))
    assert sorted(cancelled.ids, key=int) == sorted([*waiting, later], key=int)
    assert queue.stats().queued == 0 and queue.stats().scheduled == 0
    assert all(queue.get(t).state is State.CANCELLED for t in waiting)
    total = queue.stats().done
    purged = queue.bulk("purge", TaskFilter(states=frozenset({State.DONE})))
    assert purged.count == len(done) and purged.line() == f"{len(done)} tasks purged"
    assert all(queue.get(t) is None for t in done) and queue.get(failed[0]) is not None
    assert queue.stats().done == total  # the counters keep their totals


def test_a_bulk_action_that_is_not_one_is_refused(backend):
    from dashboard.records import TaskFilter

    queue, _ = backend
    searchable(queue)
    with pytest.raises(InvalidParam, match="^action must be one of: retry, cancel, purge"):
        queue.bulk("delete", TaskFilter())


def test_each_kinds_health_counts_the_last_hour_as_tasks_end(backend):
    queue, drain = backend
    if not queue.capabilities.kind_health:
        pytest.skip("this backend keeps no per-kind health")
    filled(queue, drain, ok=4, bad=2)
    queue.submit("add")
    health = {h.kind: h for h in queue.kind_health()}
    assert set(health) == set(contract_registry().names())
    add, bad = health["add"], health["fails_first"]
    assert (add.queued, add.running, add.done, add.failed) == (1, 0, 4, 0)
    assert (bad.done, bad.failed, bad.failure_rate) == (0, 2, 1.0)
    assert add.failure_rate == 0.0 and add.run_p50 is not None and add.wait_p95 is not None
    assert health["chatty"].failure_rate is None and health["chatty"].run_p95 is None


def test_a_bulk_retry_stopped_by_a_full_queue_says_how_far_it_got(backend):
    from dashboard.errors import BulkStopped
    from dashboard.records import TaskFilter

    queue, drain = backend
    searchable(queue)
    failed = [queue.submit("boom") for _ in range(8)]
    drain()
    queue.submit_many("add", MAX_QUEUED - 3, {})  # room for 3 retries
    with pytest.raises(BulkStopped, match=r"^retry stopped after 3 task\(s\): queue is full") \
            as stopped:
        queue.bulk("retry", TaskFilter(states=frozenset({State.FAILED})))
    assert stopped.value.status == 503 and len(stopped.value.ids) == 3
    assert {queue.get(t).retry_of for t in stopped.value.ids} == set(failed[:3])
    assert queue.count(TaskFilter(states=frozenset({State.FAILED})).for_action("retry")) == 5


def test_a_bulk_cancel_never_stops_a_running_task(backend):
    from dashboard.records import TaskFilter

    queue, drain = backend
    searchable(queue)
    HOLD.clear()
    running = queue.submit("hold")
    runner = threading.Thread(target=drain)
    runner.start()
    try:
        wait_for(lambda: queue.get(running).state is State.RUNNING, 30, "the task to start")
        waiting = queue.submit("add")
        result = queue.bulk("cancel", TaskFilter())
        assert list(result.ids) == [waiting]
        assert not queue.get(running).cancel_requested
    finally:
        HOLD.set()
        runner.join(30)
    assert queue.get(running).state is State.DONE
