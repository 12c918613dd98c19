"""The task signals: each event sent once, with its task, by the app's queue, and a
handler that raises changes nothing. Threads are waited on, never slept for."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from contextlib import ExitStack

import pytest
from flask import Flask, current_app

from dashboard import (QueueExtension, Registry, Retry, State, get_queue, task_cancelled,
                       task_failed, task_retried, task_started, task_submitted,
                       task_succeeded)
from dashboard.local.memory import MemoryStore
from dashboard.local.queue import WorkQueue
from dashboard.local.sqlite import SqliteStore
from dashboard.tasks import Int
from support import wait_for

SIGNALS = {
    "submitted": task_submitted,
    "started": task_started,
    "succeeded": task_succeeded,
    "failed": task_failed,
    "retried": task_retried,
    "cancelled": task_cancelled,
}


class Heard:
    """What handlers heard, in order and from any thread: one entry a call, with the
    signal's name, the sender, the task, the other arguments and the thread."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self._lock = threading.Lock()

    def handler(self, name: str):
        def heard(sender, task, **extra):
            with self._lock:
                self.calls.append({"signal": name, "sender": sender, "task": task,
                                   "thread": threading.current_thread().name, **extra})
        return heard

    def of(self, name: str) -> list[dict]:
        with self._lock:
            return [c for c in self.calls if c["signal"] == name]

    def events(self) -> list[tuple[str, int]]:
        with self._lock:
            return [(c["signal"], c["task"].id) for c in self.calls]


@pytest.fixture
def heard():
    """A Heard connected to every task signal (any sender), disconnected after the test:
    blinker's signals are the module's, and outlive a test."""
    recorder = Heard()
    with ExitStack() as stack:
        for name, signal in SIGNALS.items():
            stack.enter_context(signal.connected_to(recorder.handler(name)))
        yield recorder


@pytest.fixture(params=["memory", "sqlite"])
def make_queue(request, registry, tmp_path):
    """WorkQueues on the private registry, on the store of the test's parameter."""
    made = []

    def make(workers=0, history=1_000, **kwargs):
        if request.param == "sqlite":
            store = SqliteStore(str(tmp_path / f"queue-{len(made)}.db"), 10_000, history,
                                poll_interval=0.01)
        else:
            store = MemoryStore(10_000, history)
        q = WorkQueue(workers, registry=registry, store=store, **kwargs)
        made.append(q)
        return q

    yield make
    for q in made:
        q.shutdown(timeout=5)


def run_all(q: WorkQueue) -> None:
    """Run what is queued, and the retries it schedules (with no backoff they are due
    at once), in this thread."""
    while q.run_pending():
        pass


# -- each event once, with its task ---------------------------------------------------


def test_a_task_that_succeeds_is_submitted_started_and_succeeded_once_each(
        registry, make_queue, heard):
    @registry.task("add", params={"a": Int(0, 10), "b": Int(0, 10)})
    def add(ctx, a, b):
        return a + b

    q = make_queue()
    task_id = q.submit("add", a=2, b=3)
    assert heard.events() == [("submitted", task_id)]
    run_all(q)
    assert heard.events() == [("submitted", task_id), ("started", task_id),
                              ("succeeded", task_id)]
    for call in heard.calls:
        task = call["task"]
        assert call["sender"] is q  # no app: the queue itself sends
        assert (task.id, task.kind, task.params) == (task_id, "add", {"a": 2, "b": 3})
    submitted, started, succeeded = (c["task"] for c in heard.calls)
    assert submitted.state is State.QUEUED
    assert (started.state, started.attempts) == (State.RUNNING, 1)
    assert (succeeded.state, succeeded.result, succeeded.error) == (State.DONE, 5, None)
    assert set(heard.calls[2]) == {"signal", "sender", "task", "thread"}  # no error for a success


def test_a_failing_task_sends_task_failed_once_with_its_error_and_exception(
        registry, make_queue, heard):
    @registry.task("broken")
    def broken(ctx):
        raise ValueError("disk on fire")

    q = make_queue()
    task_id = q.submit("broken")
    run_all(q)
    assert heard.events() == [("submitted", task_id), ("started", task_id),
                              ("failed", task_id)]
    (failed,) = heard.of("failed")
    assert failed["error"] == "ValueError: disk on fire"
    assert isinstance(failed["exception"], ValueError)
    assert str(failed["exception"]) == "disk on fire"
    assert failed["task"].state is State.FAILED
    assert failed["task"].error == "ValueError: disk on fire"
    assert "disk on fire" in failed["task"].traceback
    assert q.get(task_id).state is State.FAILED


def test_a_failure_with_nothing_raised_passes_no_exception(registry, make_queue, heard):
    """A result that cannot be kept fails the task; there is no exception to pass."""
    @registry.task("unkeepable")
    def unkeepable(ctx):
        return {1, 2}  # a set is not JSON

    q = make_queue()
    task_id = q.submit("unkeepable")
    run_all(q)
    (failed,) = heard.of("failed")
    assert failed["task"].id == task_id and failed["exception"] is None
    assert failed["error"].startswith("its result could not be kept")


def test_each_failing_attempt_that_is_tried_again_sends_task_retried_then_the_end_once(
        registry, make_queue, heard):
    attempts = Counter()

    @registry.task("hopeless", retry=Retry(attempts=3, backoff=0))
    def hopeless(ctx):
        raise ConnectionError("no route")

    @registry.task("second_time_lucky", retry=Retry(attempts=3, backoff=0))
    def second_time_lucky(ctx):
        attempts[ctx.task_id] += 1
        if attempts[ctx.task_id] == 1:
            raise ConnectionError("once")
        return "ok"

    q = make_queue()
    hopeless_id = q.submit("hopeless")
    lucky_id = q.submit("second_time_lucky")
    run_all(q)

    events = heard.events()
    assert [s for s, i in events if i == hopeless_id] == [
        "submitted", "started", "retried", "started", "retried", "started", "failed"]
    assert [s for s, i in events if i == lucky_id] == [
        "submitted", "started", "retried", "started", "succeeded"]
    retried = [c for c in heard.of("retried") if c["task"].id == hopeless_id]
    assert [c["task"].attempts for c in retried] == [1, 2]
    for call in retried:
        assert call["error"] == "ConnectionError: no route"
        assert isinstance(call["exception"], ConnectionError)
        assert call["task"].state is State.SCHEDULED and call["task"].due_at is not None
    (failed,) = heard.of("failed")
    assert (failed["task"].id, failed["task"].attempts) == (hopeless_id, 3)
    assert len(failed["task"].errors) == 2  # the two attempts tried again
    (succeeded,) = heard.of("succeeded")
    assert (succeeded["task"].id, succeeded["task"].result) == (lucky_id, "ok")


def test_a_cancelled_queued_or_scheduled_task_sends_task_cancelled_once_and_never_starts(
        registry, make_queue, heard):
    @registry.task("noop")
    def noop(ctx):
        pass

    q = make_queue()
    queued = q.submit("noop")
    scheduled = q.submit("noop", delay=3600)
    assert q.cancel(queued) is State.CANCELLED
    assert q.cancel(scheduled) is State.CANCELLED
    run_all(q)
    assert heard.events() == [("submitted", queued), ("submitted", scheduled),
                              ("cancelled", queued), ("cancelled", scheduled)]
    cancelled = [c["task"] for c in heard.of("cancelled")]
    assert [t.state for t in cancelled] == [State.CANCELLED, State.CANCELLED]
    assert cancelled[0].error == "cancelled before it started"


def test_a_running_task_that_stops_when_cancelled_sends_task_cancelled_from_its_worker(
        registry, make_queue, heard):
    started = threading.Event()

    @registry.task("polite")
    def polite(ctx):
        started.set()
        while not ctx.cancelled:
            time.sleep(0.005)

    q = make_queue(workers=1)
    q.start()
    task_id = q.submit("polite")
    assert started.wait(30)
    assert q.cancel(task_id) is State.RUNNING  # only asked: nothing is sent for that
    wait_for(lambda: heard.of("cancelled"), what="task_cancelled from the worker")
    (cancelled,) = heard.of("cancelled")
    assert cancelled["task"].id == task_id
    assert (cancelled["task"].state, cancelled["task"].error) == (
        State.CANCELLED, "cancelled while running")
    assert "worker-1" in cancelled["thread"]  # sent where it ran, once it stopped
    assert q.join(timeout=30)
    assert not heard.of("succeeded") and not heard.of("failed")
    assert [s for s, _ in heard.events()] == ["submitted", "started", "cancelled"]


def test_a_batch_sends_one_task_submitted_per_task(registry, make_queue, heard):
    @registry.task("noop")
    def noop(ctx):
        pass

    q = make_queue()
    ids = q.submit_many("noop", 5)
    assert heard.events() == [("submitted", i) for i in ids]
    assert len(set(ids)) == 5


def test_a_keyed_submit_that_finds_its_task_sends_nothing(registry, make_queue, heard):
    @registry.task("noop")
    def noop(ctx):
        pass

    q = make_queue()
    first = q.submit("noop", key="report-42")
    assert q.submit("noop", key="report-42") == first
    assert q.enqueue("noop", key="report-42") == (first, False)
    assert heard.events() == [("submitted", first)]
    assert heard.of("submitted")[0]["task"].key == "report-42"


def test_a_retry_from_the_page_sends_task_submitted_for_the_new_task_once(
        registry, make_queue, heard):
    @registry.task("broken")
    def broken(ctx):
        raise ValueError("no")

    q = make_queue()
    old = q.submit("broken")
    run_all(q)
    new, created = q.retry(old)
    assert created and q.retry(old) == (new, False)  # the second click queues nothing
    submitted = [c["task"] for c in heard.of("submitted")]
    assert [t.id for t in submitted] == [old, new]
    assert submitted[1].retry_of == old and submitted[1].kind == "broken"


def test_a_schedules_runs_send_task_submitted(registry, make_queue, heard):
    @registry.task("tick", every=60)
    def tick(ctx):
        pass

    q = make_queue()
    now_id = q.run_schedule("tick")  # "Run now"
    q.run_schedules(now=time.time() + 600)  # the due times of the next ten minutes
    submitted = [c["task"] for c in heard.of("submitted")]
    assert submitted[0].id == now_id
    assert len(submitted) >= 2 and {t.schedule for t in submitted} == {"tick"}
    assert len({t.id for t in submitted}) == len(submitted) == q.stats().queued


def test_a_task_whose_worker_dies_sends_task_failed_once(registry, make_queue, heard):
    @registry.task("exit")
    def exit_task(ctx):
        raise SystemExit(3)  # not an Exception: it ends the worker thread

    q = make_queue(workers=1)
    q.start()
    task_id = q.submit("exit")
    wait_for(lambda: heard.of("failed"), what="task_failed for the dead worker's task")
    assert q.join(timeout=30)
    (failed,) = heard.of("failed")
    assert failed["task"].id == task_id and failed["task"].state is State.FAILED
    assert failed["error"].startswith("worker thread died: SystemExit")
    assert isinstance(failed["exception"], SystemExit)


# -- the sender, and the app context ------------------------------------------------


def test_the_demo_apps_queue_sends_as_the_app(app, heard):
    queue = get_queue(app)
    assert queue.signal_sender is app
    task_id = queue.submit("pretend")
    queue.run_pending()
    assert heard.events() == [("submitted", task_id), ("started", task_id),
                              ("succeeded", task_id)]
    assert {c["sender"] for c in heard.calls} == {app}


def test_a_handler_connected_for_one_app_hears_only_that_apps_tasks():
    apps = []
    for name in ("first_app", "second_app"):
        registry = Registry()

        @registry.task("broken")
        def broken(ctx):
            raise RuntimeError("broken")

        app = Flask(name)
        app.config.update(QUEUE_WORKERS=0, QUEUE_HANDLE_SIGNALS=False)
        QueueExtension(registry=registry).init_app(app)
        apps.append(app)
    first, second = apps
    failures = []

    def report(sender, task, error, exception=None, **extra):
        failures.append((sender.name, task.id, error))

    try:
        with task_failed.connected_to(report, sender=first):
            ids = {app.name: get_queue(app).submit("broken") for app in apps}
            for app in apps:
                get_queue(app).run_pending()
        assert failures == [("first_app", ids["first_app"], "RuntimeError: broken")]
        assert get_queue(second).get(ids["second_app"]).state is State.FAILED
    finally:
        for app in apps:
            get_queue(app).shutdown()


def test_handlers_in_a_worker_thread_run_inside_the_app_context(make_app):
    app = make_app(QUEUE_WORKERS=1, ERROR_TRACKER_DSN="https://tracker.example/1")
    queue = get_queue(app)
    seen = []

    def report(sender, task, error, exception=None, **extra):
        seen.append((current_app.name, current_app.config["ERROR_TRACKER_DSN"],
                     threading.current_thread().name, task.id))

    with task_failed.connected_to(report, sender=app):
        queue.start()
        task_id = queue.submit("flaky", fail_rate=1.0)
        wait_for(lambda: seen, what="the failure handler")
    assert seen == [(app.name, "https://tracker.example/1", f"{queue.name}-worker-1", task_id)]


def test_a_handler_outside_any_app_context_gets_one_and_inside_a_request_keeps_it(app):
    """run_pending from a script has no app context: one is pushed for the handler; a
    submit from a view sends inside the request's own (its ``g`` is the view's)."""
    from flask import g

    queue = get_queue(app)
    seen = []

    def started(sender, task, **extra):
        seen.append(("started", current_app.name))

    def submitted(sender, task, **extra):
        seen.append(("submitted", g.get("marker")))

    @app.get("/submit-from-a-view")
    def submit_from_a_view():
        g.marker = "the view's g"
        return {"id": queue.submit("pretend")}

    with task_started.connected_to(started, sender=app), \
            task_submitted.connected_to(submitted, sender=app):
        assert app.test_client().get("/submit-from-a-view").status_code == 200
        queue.run_pending()
    assert seen == [("submitted", "the view's g"), ("started", app.name)]


def test_the_queue_does_not_keep_its_app_alive():
    import gc
    import weakref

    app = Flask("short_lived")
    app.config.update(QUEUE_WORKERS=0, QUEUE_HANDLE_SIGNALS=False)
    QueueExtension(registry=Registry()).init_app(app)
    queue = get_queue(app)
    app_ref = weakref.ref(app)
    del app
    gc.collect()
    assert app_ref() is None
    assert queue.signal_sender is queue  # its app gone, it sends as itself
    queue.shutdown()


# -- a handler that raises ------------------------------------------------------------


def test_a_raising_handler_is_logged_and_changes_nothing(registry, make_queue, heard, caplog):
    @registry.task("noop")
    def noop(ctx):
        return "fine"

    @registry.task("broken")
    def broken(ctx):
        raise ValueError("the task's own error")

    def bad_handler(sender, task, **extra):
        raise RuntimeError("the handler is broken")

    q = make_queue(workers=1)
    with ExitStack() as stack:
        for signal in SIGNALS.values():
            stack.enter_context(signal.connected_to(bad_handler))
        with caplog.at_level(logging.ERROR, logger="dashboard.signals"):
            q.start()
            ids = [q.submit("noop"), q.submit("broken"), q.submit("noop")]
            wait_for(lambda: len(heard.of("succeeded")) + len(heard.of("failed")) == 3,
                     what="every task's end")
            assert q.join(timeout=30)

            def logged():
                return [r for r in caplog.records if r.name == "dashboard.signals"]

            # (the handlers of one event run in no set order: the last may log after ours)
            wait_for(lambda: len(logged()) >= 9, what="the broken handler's nine calls")
    assert [q.get(i).state for i in ids] == [State.DONE, State.FAILED, State.DONE]
    assert q.get(ids[0]).result == "fine" and q.get(ids[1]).error == "ValueError: the task's own error"
    # The other handler still heard every event: the raising one stopped nothing.
    assert Counter(s for s, _ in heard.events()) == {
        "submitted": 3, "started": 3, "succeeded": 2, "failed": 1}
    logged = logged()
    assert len(logged) == 9  # one a call of the broken handler
    assert all(r.exc_info and "the handler is broken" in str(r.exc_info[1]) for r in logged)
    assert "bad_handler" in logged[0].getMessage()
    assert q.is_healthy()  # its worker did not die
    assert q._threads["worker-1"].is_alive()


# -- the one the issue asks for: every failure once, across processes ----------------


def test_a_failure_handler_on_two_processes_sharing_a_file_sees_each_failure_once(
        db, registry, queues):
    @registry.task("doomed", params={"n": Int(0, 1000)})
    def doomed(ctx, n):
        raise RuntimeError(f"doomed #{n}")

    @registry.task("twice_doomed", params={"n": Int(0, 1000)}, retry=Retry(attempts=2, backoff=0))
    def twice_doomed(ctx, n):
        raise RuntimeError(f"twice doomed #{n}")

    # Two stores on one file: two process tokens, two connections, as two processes.
    a = queues(SqliteStore(db, poll_interval=0.01), workers=3)
    b = queues(SqliteStore(db, poll_interval=0.01), workers=3)
    failures, retries = Counter(), Counter()
    senders, wrong = set(), []
    lock = threading.Lock()

    def report_failure(sender, task, error, exception=None, **extra):
        with lock:
            failures[task.id] += 1
            senders.add(sender)
            if error != f"RuntimeError: {task.kind.replace('_', ' ')} #{task.params['n']}":
                wrong.append((task.id, error))  # (an assert here would only be logged)

    def count_retry(sender, task, error, exception=None, **extra):
        with lock:
            retries[task.id] += 1

    with ExitStack() as stack:
        for q in (a, b):
            stack.enter_context(task_failed.connected_to(report_failure, sender=q))
            stack.enter_context(task_retried.connected_to(count_retry, sender=q))
        a.start()
        b.start()
        doomed_ids = [a.submit("doomed", n=i) for i in range(100)]
        doomed_ids += [b.submit("doomed", n=i) for i in range(100, 200)]
        retried_ids = [(a if i % 2 else b).submit("twice_doomed", n=i) for i in range(100)]
        every = set(doomed_ids) | set(retried_ids)
        wait_for(lambda: a.join(timeout=0.1) and sum(failures.values()) >= len(every),
                 timeout=60, what="every failure reported")
    assert set(failures) == every  # every failure seen...
    assert set(failures.values()) == {1}  # ...exactly once
    assert set(retries) == set(retried_ids) and set(retries.values()) == {1}
    assert not wrong
    assert senders <= {a, b}
    assert a.stats().failed == len(every)
