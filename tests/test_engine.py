"""The engine on its own: no Flask, mostly no threads (run_pending), never a bare sleep."""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter

import pytest

from dashboard.records import State
from dashboard.local.sqlite import SqliteStore
from dashboard.errors import InvalidParam, QueueClosed, QueueFull, TaskNotFound, UnknownKind, WrongState
from dashboard.local.memory import MemoryStore
from dashboard.tasks import Float, Int, Str
from dashboard.local.queue import WorkQueue
from support import wait_for


@pytest.fixture(params=["memory", "sqlite"])
def store_kind(request):
    """Every test that takes make_queue runs on both stores: one suite, two stores."""
    return request.param


def _queue_factory(registry, kind, tmp_path):
    made = []

    def make(workers=0, max_queued=10_000, history=1_000, **kwargs):
        if kind == "sqlite":
            path = str(tmp_path / f"queue-{len(made)}.db")
            # A short poll: idle workers look for work from other processes this often.
            store = SqliteStore(path, max_queued, history, poll_interval=0.01)
        else:
            store = MemoryStore(max_queued, history)
        q = WorkQueue(workers, registry=registry, store=store, **kwargs)
        made.append(q)
        return q

    return make, made


@pytest.fixture
def make_queue(registry, store_kind, tmp_path):
    """Build queues on the private registry and shut every one down after the test."""
    make, made = _queue_factory(registry, store_kind, tmp_path)
    yield make
    for q in made:
        q.shutdown(timeout=5)


@pytest.fixture
def make_memory_queue(registry, tmp_path):
    """For what only the in-memory store does (its ring, dropping work at shutdown, fork)."""
    make, made = _queue_factory(registry, "memory", tmp_path)
    yield make
    for q in made:
        q.shutdown(timeout=5)


# -- registry and params -------------------------------------------------------


def test_only_registered_kinds_can_be_submitted(registry, make_queue):
    @registry.task("hello")
    def hello(ctx):
        pass

    q = make_queue()
    with pytest.raises(UnknownKind, match=r"kind must be one of: hello; got 'os.system'"):
        q.submit("os.system")
    assert q.stats().submitted == 0


def test_params_are_typed_and_bounded(registry, make_queue):
    @registry.task("sized", params={"n": Int(1, 10), "rate": Float(0, 1), "tag": Str(5)})
    def sized(ctx, n=1, rate=0.5, tag=""):
        pass

    q = make_queue()
    for bad, match in [
        ({"n": 0}, r"n must be an integer from 1 to 10, got 0"),
        ({"n": "x"}, r"n must be an integer from 1 to 10, got 'x'"),
        ({"n": True}, r"n must be an integer"),
        ({"rate": float("nan")}, r"rate must be a number from 0 to 1"),
        ({"rate": "inf"}, r"rate must be a number from 0 to 1"),
        # Too big for a float (as JSON can send it): was an OverflowError, a 500.
        ({"rate": 10**400}, r"rate must be a number from 0 to 1, got an integer of 1329 bits"),
        ({"tag": "toolong"}, r"tag must be a string of at most 5 characters"),
        ({"other": 1}, r"other is not a parameter of 'sized' \(allowed: n, rate, tag\)"),
    ]:
        with pytest.raises(InvalidParam, match=match):
            q.submit("sized", **bad)
    assert q.stats().submitted == 0
    task_id = q.submit("sized", n="7", rate=1, tag="ok")
    assert q.get(task_id).params == {"n": 7, "rate": 1.0, "tag": "ok"}


def test_registration_checks_the_function(registry):
    with pytest.raises(TypeError, match="no parameter 'm'"):

        @registry.task("bad", params={"m": Int(0, 1)})
        def bad(ctx, n=0):
            pass

    with pytest.raises(TypeError, match="task context first"):

        @registry.task("noctx")
        def noctx():
            pass


# -- running -------------------------------------------------------------------


def test_fifo_order_in_the_calling_thread(registry, make_queue):
    ran = []

    @registry.task("record", params={"i": Int(0, 1000)})
    def record(ctx, i):
        ran.append(i)

    q = make_queue()
    for i in range(50):
        q.submit("record", i=i)
    assert q.run_pending() == 50
    assert ran == list(range(50))


def test_fifo_order_with_one_worker_thread(registry, make_queue):
    ran = []

    @registry.task("record", params={"i": Int(0, 1000)})
    def record(ctx, i):
        ran.append(i)

    q = make_queue(workers=1)
    q.pause()  # queue everything first, so order cannot come from timing
    for i in range(200):
        q.submit("record", i=i)
    q.start()
    q.resume()
    assert q.join(timeout=30)
    assert ran == list(range(200))


def test_many_submitters_every_task_runs_exactly_once(registry, make_queue):
    runs = Counter()
    runs_lock = threading.Lock()

    @registry.task("count")
    def count(ctx):
        with runs_lock:
            runs[ctx.task_id] += 1

    q = make_queue(workers=4, max_queued=10_000, history=100)
    q.start()
    ids: list[list[int]] = [[] for _ in range(8)]
    go = threading.Barrier(8)

    def submitter(n):
        go.wait()
        for _ in range(1250):
            ids[n].append(q.submit("count"))

    threads = [threading.Thread(target=submitter, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert q.join(timeout=60)

    submitted = [i for chunk in ids for i in chunk]
    assert len(submitted) == len(set(submitted)) == 10_000
    assert set(runs) == set(submitted)
    assert set(runs.values()) == {1}
    snap = q.stats()
    assert (snap.submitted, snap.done, snap.queued, snap.running, snap.failed) == (
        10_000, 10_000, 0, 0, 0,
    )
    assert sum(w.done for w in snap.workers) == 10_000
    assert len(snap.recent) == 20  # the ring forgets; the counters keep totals


def test_a_failing_task_is_recorded_and_the_worker_goes_on(registry, make_queue, caplog):
    @registry.task("boom")
    def boom(ctx):
        raise ValueError("disk on fire")

    @registry.task("fine")
    def fine(ctx):
        pass

    q = make_queue(workers=1)
    q.start()
    worker = q._threads["worker-1"]
    with caplog.at_level(logging.ERROR, logger="dashboard.queue"):
        failed = q.submit("boom")
        ok = q.submit("fine")
        assert q.join(timeout=30)

    info = q.get(failed)
    assert info.state is State.FAILED
    assert info.error == "ValueError: disk on fire"
    assert "Traceback" in info.traceback and "disk on fire" in info.traceback
    assert q.get(ok).state is State.DONE
    assert q._threads["worker-1"] is worker and worker.is_alive()  # not replaced: it never died
    logged = [r for r in caplog.records if "disk on fire" in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback is in the log
    assert q.stats().restarts == 0


def test_supervisor_replaces_a_worker_thread_that_dies(registry, make_queue, caplog):
    @registry.task("exit")
    def exit_task(ctx):
        raise SystemExit(3)  # not an Exception: it ends the thread

    @registry.task("fine")
    def fine(ctx):
        pass

    q = make_queue(workers=1)
    q.start()
    first_thread = q._threads["worker-1"]
    with caplog.at_level(logging.ERROR, logger="dashboard.queue"):
        killer = q.submit("exit")
        after = q.submit("fine")
        assert q.join(timeout=30)

    assert q.get(killer).state is State.FAILED
    assert "worker thread died: SystemExit" in q.get(killer).error
    assert q.get(after).state is State.DONE  # run by the replacement
    wait_for(lambda: q._threads["worker-1"] is not first_thread)
    assert not first_thread.is_alive()
    snap = q.stats()
    assert snap.restarts == 1
    assert [w.name for w in snap.workers] == ["worker-1"]
    assert q.is_healthy()
    # The supervisor logs just after it swaps the thread in: wait for the line.
    wait_for(lambda: any("started a replacement" in r.getMessage() for r in caplog.records))


def test_a_full_queue_refuses_and_queues_nothing(registry, make_queue):
    @registry.task("noop")
    def noop(ctx):
        pass

    q = make_queue(max_queued=5)
    q.submit_many("noop", 3)
    with pytest.raises(QueueFull, match="queue is full: 3 of 5 queued, 3 more requested"):
        q.submit_many("noop", 3)  # all or nothing: not 2 of 3
    assert q.stats().queued == 3
    q.submit_many("noop", 2)
    with pytest.raises(QueueFull):
        q.submit("noop")
    assert q.run_pending() == 5
    q.submit("noop")  # room again once work ran


def test_history_is_a_bounded_ring_and_counters_keep_totals(registry, make_memory_queue):
    @registry.task("noop")
    def noop(ctx):
        pass

    q = make_memory_queue(history=5)
    ids = q.submit_many("noop", 100)
    q.run_pending()
    snap = q.stats(recent=50)
    assert [t.id for t in snap.recent] == ids[-1:-6:-1]  # newest first, only 5 kept
    assert snap.done == snap.submitted == 100
    assert q.get(ids[0]) is None
    assert q.get(ids[-1]).state is State.DONE
    assert len(q.store._tasks) == 5  # nothing else is held on to


def test_stats_version_changes_exactly_when_something_visible_changes(registry, make_queue):
    @registry.task("steps")
    def steps(ctx):
        ctx.progress(0.5, "half")
        ctx.progress(0.501, "half")  # same percent, same message: nothing visible
        ctx.progress(7)  # clamped to 1

    q = make_queue()
    tag0 = q.tag
    assert q.tag == tag0 == q.stats().tag  # reading changes nothing
    task_id = q.submit("steps")
    tag1 = q.tag
    assert tag1 != tag0

    seen = []
    store_progress = q.store.progress

    def spy(record, fraction, message):
        before = q.tag
        store_progress(record, fraction, message)
        seen.append((fraction, q.tag != before))

    q.store.progress = spy
    q.run_pending()
    assert seen == [(0.5, True), (0.501, False), (1.0, True)]
    assert q.get(task_id).state is State.DONE


def test_progress_is_visible_in_the_snapshot_while_running(registry, make_queue):
    halfway = threading.Event()
    release = threading.Event()

    @registry.task("slow")
    def slow(ctx):
        ctx.progress(0.25, "a quarter")
        halfway.set()
        release.wait(30)

    q = make_queue(workers=1)
    q.start()
    task_id = q.submit("slow")
    assert halfway.wait(30)
    snap = q.stats()
    (worker,) = snap.workers
    assert worker.state == "running"
    assert worker.task.id == task_id
    assert (worker.task.percent, worker.task.message) == (25, "a quarter")
    assert snap.running == 1 and snap.queued == 0
    release.set()
    assert q.join(timeout=30)
    assert q.stats().workers[0].state == "idle"


def test_pause_holds_work_and_resume_releases_it(registry, make_queue):
    @registry.task("noop")
    def noop(ctx):
        pass

    q = make_queue(workers=2)
    q.start()
    q.pause()
    q.submit_many("noop", 10)
    assert not q.join(timeout=0.05)  # nothing may run while paused
    snap = q.stats()
    assert snap.paused and snap.queued == 10 and snap.done == 0
    assert {w.state for w in snap.workers} == {"paused"}
    q.resume()
    assert q.join(timeout=30)
    assert q.stats().done == 10


def test_context_carries_the_cancel_flag(registry, make_queue):
    seen = []

    @registry.task("look")
    def look(ctx):
        seen.append((ctx.task_id, ctx.kind, ctx.cancelled))

    q = make_queue()
    task_id = q.submit("look")
    q.run_pending()
    assert seen == [(task_id, "look", False)]


# -- shutdown --------------------------------------------------------------------


def test_shutdown_drops_queued_work_and_says_how_much(registry, make_memory_queue, caplog):
    @registry.task("noop")
    def noop(ctx):
        pass

    q = make_memory_queue(workers=1)
    q.pause()
    q.submit_many("noop", 7)
    q.start()
    with caplog.at_level(logging.WARNING, logger="dashboard.queue"):
        assert q.shutdown(timeout=5) == 7
    assert "dropped 7 queued task(s)" in caplog.text
    with pytest.raises(QueueClosed):
        q.submit("noop")
    assert not q.is_healthy()


def test_shutdown_lets_a_running_task_finish(registry, make_queue):
    started = threading.Event()
    release = threading.Event()

    @registry.task("slow")
    def slow(ctx):
        started.set()
        release.wait(30)

    q = make_queue(workers=1)
    q.start()
    task_id = q.submit("slow")
    assert started.wait(30)
    timer = threading.Timer(0.05, release.set)  # the task ends while shutdown waits
    timer.start()
    q.shutdown(timeout=30)
    timer.join()
    assert q.get(task_id).state is State.DONE


def test_shutdown_never_hangs_on_a_stuck_task(registry, make_queue, caplog):
    started = threading.Event()
    release = threading.Event()

    @registry.task("stuck")
    def stuck(ctx):
        started.set()
        release.wait(60)

    q = make_queue(workers=1)
    q.start()
    q.submit("stuck")
    assert started.wait(30)
    with caplog.at_level(logging.WARNING, logger="dashboard.queue"):
        q.shutdown(timeout=0.1)  # returns although the task still runs
    assert q._threads["worker-1"].is_alive()
    assert "still running a task" in caplog.text
    release.set()  # let the thread end so the leak check passes
    q._threads["worker-1"].join(30)


def test_close_wakes_idle_workers_and_they_exit(registry, make_queue):
    @registry.task("noop")
    def noop(ctx):
        pass

    q = make_queue(workers=3)
    q.start()
    threads = list(q._threads.values())
    q.close()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert {w.state for w in q.stats().workers} == {"stopped"}


def test_after_close_the_supervisor_replaces_no_worker(registry, make_queue):
    """Regression: the supervisor read "not closed", close() came, the idle workers
    exited, and the supervisor then took them for dead and started replacements
    (and shutdown() could list one not yet started, and fail joining it)."""
    @registry.task("noop")
    def noop(ctx):
        pass

    q = make_queue(workers=2)
    q.start()
    threads = dict(q._threads)
    q.close()
    for t in threads.values():
        t.join(30)
    q._keep_workers()  # the supervisor's step, as if it had read "not closed" before close()
    assert q._threads == threads
    assert not any(t.is_alive() for t in q._threads.values())


# -- processes -------------------------------------------------------------------


def test_start_is_once_per_process(registry, make_queue):
    @registry.task("noop")
    def noop(ctx):
        pass

    q = make_queue(workers=2)
    q.start()
    threads = dict(q._threads)
    q.start()
    assert q._threads == threads
    assert len([t for t in threading.enumerate() if t.name.startswith("dashboard-worker")]) == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_empty_with_threads_of_its_own(registry, make_memory_queue):
    ran_in = []

    @registry.task("where")
    def where(ctx):
        ran_in.append(os.getpid())

    q = make_memory_queue(workers=1)
    q.start()
    q.pause()
    q.submit_many("where", 3)  # queued in the parent: the child must not run them
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            queued_after_fork = q.stats().queued
            started_before = q.started
            q.start()
            q.resume()
            q.submit("where")
            joined = q.join(timeout=30)
            ok = (queued_after_fork, started_before, joined, ran_in, q.stats().done)
            os.write(write_fd, repr(ok).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, report
    assert report == repr((0, False, True, [pid], 1))
    # The parent's queue is untouched: its three tasks still wait for it.
    assert q.stats().queued == 3
    q.resume()
    assert q.join(timeout=30)
    assert ran_in == [os.getpid()] * 3


def test_progress_rejects_what_is_not_a_fraction(registry, make_queue):
    errors = []

    @registry.task("odd")
    def odd(ctx):
        for bad in ("half", None, float("nan")):
            try:
                ctx.progress(bad)
            except (TypeError, ValueError) as exc:
                errors.append(type(exc).__name__)
        ctx.progress(-3)
        errors.append(ctx._record.progress)

    q = make_queue()
    q.submit("odd")
    q.run_pending()
    assert errors == ["TypeError", "TypeError", "ValueError", 0.0]


def test_start_after_shutdown_does_nothing(registry, make_queue):
    q = make_queue(workers=2)
    q.shutdown()
    q.start()  # e.g. a request arriving while the server stops
    assert not q.started and q._threads == {}


def test_close_nowait_refuses_work_and_stops_claims_without_a_lock(registry, make_queue):
    @registry.task("noop")
    def noop(ctx):
        pass

    q = make_queue()
    q.submit_many("noop", 2)
    # As if the signal arrived while the main thread held the store's (writer's) lock.
    with getattr(q.store, "_lock", None) or q.store._write_lock:
        q.close_nowait()
    with pytest.raises(QueueClosed):
        q.submit("noop")
    assert q.run_pending() == 0  # nothing queued starts after the close
    # The in-memory store drops what is queued; a durable one keeps it for the next start.
    assert q.closed and q.shutdown() == (0 if q.store.durable else 2)
    assert q.stats().queued == (2 if q.store.durable else 0)


# -- control: cancel, retry, clear, reset, scale -----------------------------------


def test_a_cancelled_queued_task_never_runs(registry, make_queue):
    ran = []

    @registry.task("note", params={"i": Int(0, 99)})
    def note(ctx, i):
        ran.append(i)

    q = make_queue()
    ids = [q.submit("note", i=i) for i in range(3)]
    assert q.cancel(ids[1]) is State.CANCELLED
    snap = q.stats()
    assert (snap.queued, snap.cancelled) == (2, 1)
    assert q.run_pending() == 2
    assert ran == [0, 2]
    info = q.get(ids[1])
    assert (info.state, info.error, info.started_at) == (
        State.CANCELLED, "cancelled before it started", None,
    )
    assert [t.id for t in q.stats().recent][-1] == ids[1]  # listed with the finished ones


def test_cancelling_a_running_task_that_checks_stops_it(registry, make_queue):
    started, stopped = threading.Event(), threading.Event()

    @registry.task("polite")
    def polite(ctx):
        started.set()
        while not ctx.cancelled:
            stopped.wait(0.01)

    q = make_queue(workers=1)
    q.start()
    task_id = q.submit("polite")
    assert started.wait(30)
    assert q.cancel(task_id) is State.RUNNING  # asked; it stops when it looks
    assert q.get(task_id).cancel_requested
    assert q.join(timeout=30)
    info = q.get(task_id)
    assert (info.state, info.error) == (State.CANCELLED, "cancelled while running")
    assert q.stats().cancelled == 1


def test_a_running_task_that_ignores_cancel_finishes_as_done(registry, make_queue):
    started, go_on = threading.Event(), threading.Event()

    @registry.task("stubborn")
    def stubborn(ctx):
        started.set()
        go_on.wait(30)

    q = make_queue(workers=1)
    q.start()
    task_id = q.submit("stubborn")
    assert started.wait(30)
    q.cancel(task_id)
    go_on.set()
    assert q.join(timeout=30)
    info = q.get(task_id)
    assert info.state is State.DONE and info.cancel_requested
    with pytest.raises(WrongState, match=f"task {task_id} is done; only scheduled, queued or running"):
        q.cancel(task_id)
    with pytest.raises(TaskNotFound, match="no task 999"):
        q.cancel(999)


def test_retry_queues_a_linked_copy_of_a_failed_task(registry, make_queue):
    attempts = []

    @registry.task("shaky", params={"n": Int(0, 9)})
    def shaky(ctx, n):
        attempts.append(n)
        if len(attempts) == 1:
            raise RuntimeError("first try fails")

    q = make_queue()
    first = q.submit("shaky", n=7)
    q.run_pending()
    assert q.get(first).state is State.FAILED
    second, created = q.retry(first)
    assert created and second != first
    assert q.get(second).retry_of == first and q.get(first).retried_as == second
    q.run_pending()
    assert attempts == [7, 7]
    assert q.get(second).state is State.DONE
    with pytest.raises(WrongState, match="only failed or cancelled tasks can be retried"):
        q.retry(second)
    with pytest.raises(TaskNotFound):
        q.retry(12345)


def test_clear_history_keeps_counters_and_reset_clears_both(registry, make_queue):
    @registry.task("noop")
    def noop(ctx):
        pass

    q = make_queue()
    first = q.submit_many("noop", 5)
    q.run_pending()
    q.submit_many("noop", 2)  # still queued: a reset keeps them
    assert q.clear_history() == 5
    snap = q.stats()
    assert (snap.recent, snap.done, snap.submitted) == ((), 5, 7)
    assert q.get(first[0]) is None
    q.reset()
    snap = q.stats()
    assert (snap.done, snap.failed, snap.submitted, snap.queued, snap.series) == (0, 0, 2, 2, ())
    assert q.run_pending() == 2 and q.stats().done == 2


def test_set_workers_scales_up_and_down_live(registry, make_queue):
    release = threading.Event()
    running = threading.Semaphore(0)

    @registry.task("hold")
    def hold(ctx):
        running.release()
        release.wait(30)

    q = make_queue(workers=1, max_workers=8)
    q.start()
    q.submit_many("hold", 6)
    assert running.acquire(timeout=30)
    assert q.set_workers(4) == 4
    for _ in range(3):  # three more run at once: the new workers took them
        assert running.acquire(timeout=30)
    snap = q.stats()
    assert snap.running == 4 and len(snap.workers) == 4
    q.set_workers(2)  # two retire after their current task
    release.set()
    assert q.join(timeout=30)
    wait_for(lambda: [w.name for w in q.stats().workers] == ["worker-1", "worker-2"])
    assert q.stats().restarts == 0  # retired workers are not "replaced"
    assert q.is_healthy()
    with pytest.raises(ValueError, match="workers must be from 0 to 8"):
        q.set_workers(9)


def test_rates_series_and_eta(registry, make_queue):
    @registry.task("noop")
    def noop(ctx):
        pass

    q = make_queue()
    q.submit_many("noop", 10)
    q.run_pending(4)
    snap = q.stats()
    # Four finished within the first second or two of the run: the rate is
    # over the time there was, not over a whole minute.
    assert snap.throughput > 4.0  # not 4 finished / 60 s
    assert snap.mean_run is not None and snap.mean_wait is not None
    assert snap.eta == pytest.approx(6 * 60 / snap.throughput)
    assert snap.series and snap.series[-1][1] == 6
    q.pause()
    assert q.stats().eta is None  # not moving
    q.resume()
    q.run_pending()
    assert q.stats().eta == 0.0


def test_rates_are_over_the_window_or_the_time_there_was():
    from dashboard.local.store import rates

    assert rates(100.5, None, []) == {"mean_wait": None, "mean_run": None, "throughput": 0.0}
    seconds = [(2, 1.0, 4.0), (2, 1.0, 0.0)]  # 4 finished, 2 s waited, 4 s ran
    young = rates(1000.0, 990, seconds)  # a run 10 s old: 4 per 10 s
    assert young == {"mean_wait": 0.5, "mean_run": 1.0, "throughput": 24.0}
    assert rates(1000.0, 100, seconds)["throughput"] == 4.0  # over the whole minute
    assert rates(1000.2, 1000, seconds)["throughput"] == 240.0  # never under one second


def test_cancelled_records_do_not_pile_up_in_the_queue(registry, make_memory_queue):
    @registry.task("noop")
    def noop(ctx):
        pass

    q = make_memory_queue(max_queued=100, history=10)
    for _ in range(50):  # fill, cancel everything, again and again, with nobody running
        for task_id in q.submit_many("noop", 100):
            q.cancel(task_id)
    assert q.stats().cancelled == 5000
    assert len(q.store._queue) <= 2 * 0 + 64 + 1


def test_a_worker_that_keeps_dying_is_replaced_more_and_more_slowly(registry, make_queue, caplog):
    @registry.task("exit")
    def exit_task(ctx):
        raise SystemExit(1)

    q = make_queue(workers=1)
    q.start()
    with caplog.at_level(logging.ERROR, logger="dashboard.queue"):
        q.submit_many("exit", 4)
        wait_for(lambda: "died 4 times in the last minute" in caplog.text, timeout=30)
    assert "died 3 times in the last minute; started a replacement, and the next one waits 0.5s" \
        in caplog.text
    assert "died 4 times in the last minute; started a replacement, and the next one waits 1.0s" \
        in caplog.text
    assert q.stats().failed == 4


def test_a_refusal_quotes_what_it_was_given_briefly_however_large_or_deep(registry, make_queue):
    """Found in review: Int and Float quoted a value whole, and a value nested too
    deeply to repr made the refusal itself raise (a 500 for an app that submits
    what a request sent)."""

    @registry.task("sized", params={"n": Int(0, 5), "x": Float(0, 1), "s": Str(10)})
    def sized(ctx, n=0, x=0.0, s=""):
        pass

    q = make_queue()
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    for params in ({"n": deep}, {"x": deep}, {"s": deep}, {"n": "9" * 5000}, {"x": [1] * 10_000}):
        with pytest.raises(InvalidParam) as refused:
            q.submit("sized", **params)
        assert len(str(refused.value)) < 200, str(refused.value)[:300]
    with pytest.raises(UnknownKind) as unknown:
        q.submit(deep)
    assert "nested too deeply" in str(unknown.value)
    assert q.stats().submitted == 0


def test_a_required_param_is_refused_at_submit_not_failed_at_run(registry, make_queue):
    """A kind whose function has no default for a parameter was queued without it
    (from "Add work" or the API), then failed when it ran, with a TypeError."""
    @registry.task("report", params={"user_id": Int(1, 100), "fmt": Str(choices=("pdf",))})
    def report(ctx, user_id, fmt="pdf"):
        pass

    q = make_queue()
    for given in ({}, {"fmt": "pdf"}):
        with pytest.raises(InvalidParam, match=r"user_id is required by 'report': it must be "
                                               r"an integer from 1 to 100"):
            q.submit("report", **given)
    assert q.stats().submitted == 0
    assert q.get(q.submit("report", user_id=7)).params == {"user_id": 7}


def test_a_parameter_no_submit_could_give_is_refused_at_registration(registry):
    with pytest.raises(TypeError, match="parameter 'secret' has no default and no spec"):
        @registry.task("unreachable")
        def unreachable(ctx, secret):
            pass


@pytest.mark.parametrize("name", ["key", "delay", "at"])
def test_a_task_parameter_may_not_take_a_name_submit_keeps(registry, name):
    with pytest.raises(TypeError, match=f"a parameter may not be named '{name}': submit"):
        registry.task("clash")(eval(f"lambda ctx, {name}=None: None"))  # noqa: S307


def test_a_worker_threads_task_keeps_what_it_logs(registry, make_queue):
    """Worker threads set nothing per task for this: a log line finds its task through
    the thread (run_pending's caller thread is marked around each task instead)."""
    import logging

    @registry.task("talks")
    def talks(ctx):
        ctx.logger.info("from the worker")
        logging.getLogger("dashboard.sqlite").warning("the store's own line: not the task's")

    q = make_queue(workers=1)
    q.start()
    task_id = q.submit("talks")
    info = q.wait(task_id, timeout=30)
    assert [line.split(" ", 1)[1] for line in info.logs] == [
        "INFO dashboard.task.talks: from the worker"]
    logging.getLogger("some.app").warning("outside any task")  # no task: kept nowhere
    assert len(q.get(task_id).logs) == 1
