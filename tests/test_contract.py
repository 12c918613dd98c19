"""The store contract, proved against a plain model (hypothesis stateful testing).

A :class:`RuleBasedStateMachine` drives a real store and a model of a few
lists and counters with the same random operations: submit one or many,
claim (as a named worker or the calling thread) and finish (done, failed,
cancelled), cancel queued, running, finished and unknown tasks, retry (twice,
too) and retry what cannot be retried, pause and resume, clear the history,
reset, add, stop, kill and remove workers, upkeep, close. After every step
the store must agree with the model:

* the counters equal the number of tasks in each state, and ``submitted``
  counts what was accepted since the last reset; the per-kind totals of
  :meth:`metrics` (every task here is of kind ``k``) say the same, with the
  attempts scheduled again by a retry policy, and a wait observed at each
  start and a run at each end of an attempt;
* every task the model knows is in exactly the state the model says (so no
  task is in two states), and every forgotten one is gone;
* the queued tasks are listed in the order they were queued (FIFO), and a
  claim takes the oldest;
* each worker shows the task it holds and the state it is in;

and at the end, once resumed, every task still queued runs exactly once.

The same machine runs on the in-memory store, on SQLite, and on two SQLite
stores on one file standing for two processes (each step picks one). No
threads run tasks and nothing sleeps: the test claims and finishes.
``CONTRACT_EXAMPLES`` sets how many runs (30 by default, seeded, so
``make test`` sees the same ones every time).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from dashboard.errors import QueueClosed, QueueFull, TaskNotFound, WrongState
from dashboard.records import State, WorkerState
from dashboard.local.sqlite import SqliteStore
from dashboard.local.memory import MemoryStore
from dashboard.local.store import Run

MAX_QUEUED = 12
DELAY = 3600.0  # seconds: a delayed task of the model is never due during a run
HISTORY = 10_000  # larger than any run: the ring never forgets on its own here
NAMES = ("worker-1", "worker-2")
SCHEDULES = ("nightly", "often")
SPECS = ("every 10", "every 10 (changed)")
FINISHED = (State.DONE, State.FAILED, State.CANCELLED)


class StoreMachine(RuleBasedStateMachine):
    """The model; subclasses say which stores it drives."""

    def make_stores(self, directory: str) -> list:
        raise NotImplementedError

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="contract-")
        self.stores = self.make_stores(self.directory)
        self.closed = [False] * len(self.stores)
        self.queue: list[int] = []  # queued ids, oldest first
        self.state: dict[int, State] = {}  # every task the store must still know
        self.forgotten: set[int] = set()
        self.held: dict[int, tuple[int, object, str | None]] = {}  # running: store, record, worker
        self.workers: dict[tuple[int, str], dict] = {}  # (store, name) -> alive, task
        self.retried: dict[int, int] = {}
        self.keys: dict[str, int] = {}  # unique key -> the task that last took it
        self.scheduled: list[int] = []  # delayed far beyond the run: never due here
        self.cancel_asked: set[int] = set()
        self.paused = False
        self.done = self.failed = self.cancelled = self.submitted = 0
        # Since the last reset: attempts scheduled again, starts, ends of an attempt.
        self.retried_later = self.starts = self.ends = 0
        self.claims: Counter[int] = Counter()
        # Periodic schedules: name -> [spec, next due, last due, last task, runs], as
        # the store must keep them (one model for stores sharing a file).
        self.schedules: dict[str, list] = {}

    # -- helpers -------------------------------------------------------------

    def store_index(self) -> st.SearchStrategy[int]:
        return st.integers(0, len(self.stores) - 1)

    def add_queued(self, ids: list[int]) -> None:
        for task_id in ids:
            assert task_id not in self.state and task_id not in self.forgotten, task_id
            self.state[task_id] = State.QUEUED
            self.queue.append(task_id)
        self.submitted += len(ids)

    def finished_ids(self, *states: State) -> list[int]:
        return [i for i, s in self.state.items() if s in (states or FINISHED)]

    def count(self, state: State) -> None:
        if state is State.DONE:
            self.done += 1
        elif state is State.FAILED:
            self.failed += 1
        else:
            self.cancelled += 1

    def end(self, task_id: int, state: State) -> None:
        _, _, worker = self.held.pop(task_id)
        self.state[task_id] = state
        self.count(state)
        self.ends += 1
        for (_, name), slot in self.workers.items():
            if slot["task"] == task_id:
                slot["task"] = None
                slot["done"] += 1

    # -- submitting -----------------------------------------------------------

    @rule(data=st.data())
    def submit(self, data):
        i = data.draw(self.store_index())
        store = self.stores[i]
        if self.closed[i]:
            with pytest.raises(QueueClosed):
                store.add_one("k", {})
        elif len(self.queue) >= MAX_QUEUED:
            with pytest.raises(QueueFull):
                store.add_one("k", {})
        else:
            self.add_queued([store.add_one("k", {"n": len(self.state)})])

    @rule(data=st.data(), key=st.sampled_from(["a", "b", "c"]))
    def submit_keyed(self, data, key):
        """While a task with the key is queued or running, a keyed submit gives it back."""
        i = data.draw(self.store_index())
        store = self.stores[i]
        holder = self.keys.get(key)
        live = holder is not None and self.state.get(holder) in (State.SCHEDULED, State.QUEUED,
                                                                 State.RUNNING)
        if self.closed[i]:
            with pytest.raises(QueueClosed):
                store.add_keyed("k", {}, key)
        elif live:
            assert store.add_keyed("k", {}, key) == (holder, False)
        elif len(self.queue) >= MAX_QUEUED:
            with pytest.raises(QueueFull):
                store.add_keyed("k", {}, key)
        else:
            task_id, created = store.add_keyed("k", {}, key)
            assert created
            self.add_queued([task_id])
            self.keys[key] = task_id
            assert store.get(task_id).key == key

    @rule(data=st.data(), count=st.integers(1, 3))
    def schedule(self, data, count):
        """Delayed tasks, due long after this run: scheduled, apart from the queue."""
        i = data.draw(self.store_index())
        store = self.stores[i]
        if self.closed[i]:
            with pytest.raises(QueueClosed):
                store.add("k", {}, count, delay=DELAY)
        elif len(self.scheduled) + count > MAX_QUEUED:
            with pytest.raises(QueueFull, match="too many scheduled"):
                store.add("k", {}, count, delay=DELAY)
        else:
            ids = store.add("k", {}, count, delay=DELAY)
            for task_id in ids:
                assert task_id not in self.state and task_id not in self.forgotten, task_id
                self.state[task_id] = State.SCHEDULED
                self.scheduled.append(task_id)
            self.submitted += count

    @precondition(lambda self: self.scheduled)
    @rule(data=st.data())
    def cancel_scheduled(self, data):
        task_id = data.draw(st.sampled_from(self.scheduled))
        i = data.draw(self.store_index())
        assert self.stores[i].cancel(task_id) is State.CANCELLED
        self.scheduled.remove(task_id)
        self.state[task_id] = State.CANCELLED
        self.cancelled += 1
        assert self.stores[i].get(task_id).error == "cancelled before it was due"

    @rule(data=st.data(), count=st.integers(1, 5))
    def submit_many(self, data, count):
        i = data.draw(self.store_index())
        store = self.stores[i]
        if self.closed[i]:
            with pytest.raises(QueueClosed):
                store.add("k", {}, count)
        elif len(self.queue) + count > MAX_QUEUED:
            with pytest.raises(QueueFull):
                store.add("k", {}, count)
        else:
            ids = store.add("k", {}, count)
            assert ids == sorted(ids) and len(set(ids)) == count
            self.add_queued(ids)

    # -- periodic schedules -------------------------------------------------------

    @rule(data=st.data(), name=st.sampled_from(SCHEDULES), spec=st.sampled_from(SPECS),
          first=st.integers(1, 50))
    def sync_schedule(self, data, name, spec, first):
        """A process starts with a schedule: the store's next due time, unless it knew
        the schedule with another spec (the code changed), which starts anew."""
        i = data.draw(self.store_index())
        entry = self.schedules.get(name)
        if entry is None:
            entry = self.schedules[name] = [spec, first * 10.0, None, None, 0]
        elif entry[0] != spec:  # due anew; the last run stays
            entry[0], entry[1] = spec, first * 10.0
        assert self.stores[i].schedule_next(name, spec, first * 10.0) == entry[1]

    @precondition(lambda self: self.schedules)
    @rule(data=st.data(), with_run=st.booleans(), stale=st.booleans())
    def claim_due(self, data, with_run, stale):
        """Of claims of one due time (from any process), exactly one wins; a stale due
        time (another process claimed it) changes nothing and gives the current one."""
        i = data.draw(self.store_index())
        name = data.draw(st.sampled_from(sorted(self.schedules)))
        entry = self.schedules[name]
        due = entry[1] - 10.0 if stale else entry[1]
        run = Run("k", {"schedule": name}) if with_run else None
        store = self.stores[i]
        if self.closed[i]:
            with pytest.raises(QueueClosed):
                store.claim_due(name, due, due + 10.0, run)
            return
        if not stale and with_run and len(self.queue) >= MAX_QUEUED:
            with pytest.raises(QueueFull):
                store.claim_due(name, due, due + 10.0, run)
            return
        next_due, task_id = store.claim_due(name, due, due + 10.0, run)
        if stale:
            assert (next_due, task_id) == (entry[1], None)
            return
        assert next_due == due + 10.0 and (task_id is None) == (not with_run)
        entry[1] = next_due
        if task_id is not None:
            self.add_queued([task_id])
            entry[2], entry[3] = due, task_id
            entry[4] += 1
            info = store.get(task_id)
            assert (info.schedule, info.due_at, info.kind) == (name, due, "k")

    @precondition(lambda self: self.schedules)
    @rule(data=st.data())
    def run_schedule_now(self, data):
        """Run now: one task more, the next due time unchanged."""
        i = data.draw(self.store_index())
        name = data.draw(st.sampled_from(sorted(self.schedules)))
        store = self.stores[i]
        if self.closed[i]:
            with pytest.raises(QueueClosed):
                store.run_schedule(name, Run("k", {}))
        elif len(self.queue) >= MAX_QUEUED:
            with pytest.raises(QueueFull):
                store.run_schedule(name, Run("k", {}))
        else:
            task_id = store.run_schedule(name, Run("k", {}))
            self.add_queued([task_id])
            entry = self.schedules[name]
            entry[2], entry[3] = store.get(task_id).enqueued_at, task_id
            entry[4] += 1

    # -- working ----------------------------------------------------------------

    @rule(data=st.data())
    def claim(self, data):
        i = data.draw(self.store_index())
        free = [n for (j, n), w in self.workers.items() if j == i and w["task"] is None]
        worker = data.draw(st.sampled_from([None, *free]))
        slot = self.workers.get((i, worker)) if worker else None
        if self.closed[i] or (slot is not None and not slot["alive"]) or self.paused \
                or not self.queue:
            expected = None
        else:
            expected = self.queue[0]
        record = self.stores[i].claim(worker, block=False)
        assert (record and record.id) == expected, (record and record.id, expected)
        if record is None:
            return
        self.queue.pop(0)
        self.state[record.id] = State.RUNNING
        self.held[record.id] = (i, record, worker)
        self.claims[record.id] += 1
        self.starts += 1
        if slot is not None:
            slot["task"] = record.id

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def finish(self, data):
        task_id = data.draw(st.sampled_from(sorted(self.held)))
        i, record, _ = self.held[task_id]
        states = [State.DONE, State.FAILED] + ([State.CANCELLED] if task_id in
                                              self.cancel_asked else [])
        state = data.draw(st.sampled_from(states))
        self.stores[i].finish(record, state, None if state is State.DONE else "it ended so")
        self.end(task_id, state)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def retry_later(self, data):
        """The attempt failed and its kind retries it: scheduled again, its error kept."""
        task_id = data.draw(st.sampled_from(sorted(self.held)))
        i, record, _ = self.held.pop(task_id)
        record.retry_in = DELAY
        before = len(self.stores[i].get(task_id).errors)
        self.stores[i].finish(record, State.SCHEDULED, f"attempt {record.attempts} failed")
        self.state[task_id] = State.SCHEDULED
        self.scheduled.append(task_id)
        self.retried_later += 1
        self.ends += 1
        for slot in self.workers.values():
            if slot["task"] == task_id:
                slot["task"] = None
        self.cancel_asked.discard(task_id)
        errors = self.stores[i].get(task_id).errors
        assert len(errors) == before + 1
        assert errors[-1]["error"] == f"attempt {record.attempts} failed"

    # -- one task ---------------------------------------------------------------

    @precondition(lambda self: self.queue)
    @rule(data=st.data())
    def cancel_queued(self, data):
        task_id = data.draw(st.sampled_from(self.queue))
        i = data.draw(self.store_index())
        assert self.stores[i].cancel(task_id) is State.CANCELLED
        self.queue.remove(task_id)
        self.state[task_id] = State.CANCELLED
        self.cancelled += 1

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def cancel_running(self, data):
        task_id = data.draw(st.sampled_from(sorted(self.held)))
        i = data.draw(self.store_index())
        assert self.stores[i].cancel(task_id) is State.RUNNING
        self.cancel_asked.add(task_id)
        assert self.stores[i].get(task_id).cancel_requested

    @precondition(lambda self: self.finished_ids())
    @rule(data=st.data())
    def cancel_finished(self, data):
        task_id = data.draw(st.sampled_from(sorted(self.finished_ids())))
        with pytest.raises(WrongState):
            self.stores[data.draw(self.store_index())].cancel(task_id)

    @rule(data=st.data())
    def cancel_unknown(self, data):
        unknown = max([*self.state, *self.forgotten, 0]) + 1000
        with pytest.raises(TaskNotFound):
            self.stores[data.draw(self.store_index())].cancel(unknown)

    @precondition(lambda self: self.finished_ids(State.FAILED, State.CANCELLED))
    @rule(data=st.data())
    def retry(self, data):
        task_id = data.draw(st.sampled_from(sorted(self.finished_ids(State.FAILED,
                                                                      State.CANCELLED))))
        i = data.draw(self.store_index())
        store = self.stores[i]
        if task_id in self.retried:  # a second click: the same retry, nothing queued
            assert store.retry(task_id) == (self.retried[task_id], False)
        elif self.closed[i]:
            with pytest.raises(QueueClosed):
                store.retry(task_id)
        elif len(self.queue) >= MAX_QUEUED:
            with pytest.raises(QueueFull):
                store.retry(task_id)
        else:
            new_id, created = store.retry(task_id)
            assert created
            self.add_queued([new_id])
            self.retried[task_id] = new_id
            assert store.get(new_id).retry_of == task_id
            assert store.get(task_id).retried_as == new_id

    @precondition(lambda self: self.queue or self.held or self.finished_ids(State.DONE))
    @rule(data=st.data())
    def retry_what_cannot_be(self, data):
        task_id = data.draw(st.sampled_from(
            sorted([*self.queue, *self.held, *self.finished_ids(State.DONE)])))
        with pytest.raises(WrongState):
            self.stores[data.draw(self.store_index())].retry(task_id)

    # -- the whole queue -------------------------------------------------------

    @rule(data=st.data(), paused=st.booleans())
    def pause_or_resume(self, data, paused):
        self.stores[data.draw(self.store_index())].set_paused(paused)
        self.paused = paused

    @rule(data=st.data())
    def clear_history(self, data):
        finished = self.finished_ids()
        assert self.stores[data.draw(self.store_index())].clear_history() == len(finished)
        self.forget(finished)

    @rule(data=st.data())
    def reset(self, data):
        self.stores[data.draw(self.store_index())].reset()
        self.forget(self.finished_ids())
        self.done = self.failed = self.cancelled = 0
        self.retried_later = self.starts = self.ends = 0
        self.submitted = len(self.queue) + len(self.held)
        for slot in self.workers.values():
            slot["done"] = 0

    def forget(self, ids: list[int]) -> None:
        for task_id in ids:
            del self.state[task_id]
            self.forgotten.add(task_id)

    @precondition(lambda self: not all(self.closed))
    @rule(data=st.data())
    def close(self, data):
        # Late in a run only: a closed store takes part in little afterwards.
        if len(self.state) + len(self.forgotten) < 8:
            return
        i = data.draw(self.store_index())
        self.stores[i].close()
        self.closed[i] = True

    @rule(data=st.data())
    def upkeep(self, data):
        self.stores[data.draw(self.store_index())].maintain()  # changes nothing here

    # -- workers -----------------------------------------------------------------

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def add_worker(self, data, name):
        i = data.draw(self.store_index())
        slot = self.workers.get((i, name))
        if slot is not None and (slot["alive"] or slot["task"] is not None):
            return  # only a new slot, or one whose thread ended holding nothing
        self.stores[i].add_worker(name, replacement=slot is not None)
        if slot is None:
            self.workers[(i, name)] = {"alive": True, "task": None, "done": 0}
        else:
            slot["alive"] = True

    @precondition(lambda self: self.workers)
    @rule(data=st.data())
    def stop_worker(self, data):
        (i, name) = data.draw(st.sampled_from(sorted(self.workers)))
        self.stores[i].stop_worker(name)
        self.workers[(i, name)]["alive"] = False

    @precondition(lambda self: self.workers)
    @rule(data=st.data(), died=st.booleans())
    def worker_exited(self, data, died):
        (i, name) = data.draw(st.sampled_from(sorted(self.workers)))
        slot = self.workers[(i, name)]
        if slot["task"] is not None and not died:
            return  # a thread ends cleanly only between tasks
        self.stores[i].worker_exited(name, "worker thread died: test" if died else None)
        if slot["task"] is not None:
            self.end(slot["task"], State.FAILED)
        slot["alive"] = False

    @precondition(lambda self: self.workers)
    @rule(data=st.data())
    def remove_worker(self, data):
        (i, name) = data.draw(st.sampled_from(sorted(self.workers)))
        slot = self.workers[(i, name)]
        if slot["alive"] or slot["task"] is not None:
            return
        self.stores[i].remove_worker(name)
        del self.workers[(i, name)]

    # -- what must hold after every step -----------------------------------------

    @invariant()
    def agrees_with_the_model(self):
        reader = self.stores[0]
        snap = reader.snapshot(recent=0, upcoming=MAX_QUEUED + 1)
        assert (snap.queued, snap.running, snap.done, snap.failed, snap.cancelled,
                snap.submitted, snap.paused) == (
            len(self.queue), len(self.held), self.done, self.failed, self.cancelled,
            self.submitted, self.paused)
        assert [t.id for t in snap.upcoming] == self.queue  # FIFO
        metrics = reader.metrics()
        assert (metrics.queued, metrics.scheduled, metrics.running, metrics.paused) == (
            len(self.queue), len(self.scheduled), len(self.held), self.paused)
        assert metrics.workers == sum(slot["alive"] for slot in self.workers.values())
        # One kind, "k": listed while it has counted anything since the last reset, or
        # has a task still to come.
        totals = (self.submitted, self.done, self.failed, self.cancelled, self.retried_later,
                  self.starts, self.ends)
        listed = {k.kind: (k.submitted, k.done, k.failed, k.cancelled, k.retried, k.wait.count,
                           k.run.count) for k in metrics.kinds}
        if any(totals) or self.queue or self.held or self.scheduled:
            assert listed == {"k": totals}
        else:
            assert listed in ({}, {"k": totals})
        for k in metrics.kinds:
            for histogram in (k.wait, k.run):
                assert list(histogram.buckets) == sorted(histogram.buckets)
                assert histogram.buckets[-1] <= histogram.count and histogram.sum >= 0
        assert snap.scheduled == len(self.scheduled)
        assert sorted(t.id for t in snap.soon) == sorted(self.scheduled)  # all due together
        # Every known task in the one state the model says; no forgotten one left.
        states = {}
        for task_id in self.state:
            info = reader.get(task_id)
            assert info is not None, f"task {task_id} was lost"
            states[task_id] = info.state
        assert states == self.state
        assert all(reader.get(task_id) is None for task_id in self.forgotten)
        expected = sorted(
            (name, slot["task"] or 0, WorkerState.of(slot["task"] is not None, slot["alive"],
                                              self.paused, self.closed[0]), slot["done"])
            for (_, name), slot in self.workers.items())
        # (0 for no task: two processes' workers of one name, one idle, sort as tuples)
        shown = sorted((w.name, w.task.id if w.task else 0, w.state, w.done)
                       for w in snap.workers)
        assert shown == expected
        # Each schedule: its next due time, its last run and that run's state (None
        # once forgotten), and how many runs there were.
        kept = reader.schedule_states(self.schedules)
        assert set(kept) == set(self.schedules)
        for name, (_, next_due, last_due, last_task, runs) in self.schedules.items():
            assert kept[name] == (next_due, last_due, last_task, self.state.get(last_task), runs)

    def teardown(self):
        try:
            self.drain()
        finally:
            for store in self.stores:
                dispose(store)
            shutil.rmtree(self.directory, ignore_errors=True)

    def drain(self):
        """Once resumed, every queued task runs exactly once."""
        open_stores = [i for i, closed in enumerate(self.closed) if not closed]
        if not open_stores:
            return
        store = self.stores[open_stores[0]]
        for task_id, (i, record, _) in sorted(self.held.items()):
            self.stores[i].finish(record, State.DONE)
            self.end(task_id, State.DONE)
        store.set_paused(False)
        waiting = list(self.queue)
        ran = []
        while (record := store.claim(None, block=False)) is not None:
            ran.append(record.id)
            store.finish(record, State.DONE)
        assert ran == waiting  # each once, in order
        assert all(self.claims[i] == 0 for i in ran)
        assert store.snapshot().queued == 0


def dispose(store) -> None:
    """Let go of anything a store still holds, and close its connections."""
    if isinstance(store, SqliteStore):
        for conn in (store._writer, getattr(store._readers, "conn", None)):
            if conn is not None:
                conn.close()
        store._writer = store._readers.conn = None
        store.reset_after_fork()


class MemoryMachine(StoreMachine):
    def make_stores(self, directory):
        return [MemoryStore(MAX_QUEUED, HISTORY)]


class SqliteMachine(StoreMachine):
    def make_stores(self, directory):
        return [SqliteStore(os.path.join(directory, "q.db"), MAX_QUEUED, HISTORY)]


class TwoProcessesMachine(StoreMachine):
    def make_stores(self, directory):
        path = os.path.join(directory, "q.db")
        return [SqliteStore(path, MAX_QUEUED, HISTORY), SqliteStore(path, MAX_QUEUED, HISTORY)]


@pytest.mark.parametrize("machine", [MemoryMachine, SqliteMachine, TwoProcessesMachine],
                         ids=["memory", "sqlite", "sqlite-two-processes"])
def test_the_store_contract_holds_against_the_model(machine):
    examples = int(os.environ.get("CONTRACT_EXAMPLES", "30"))
    run_state_machine_as_test(machine, settings=settings(
        max_examples=examples, stateful_step_count=40, deadline=None, database=None,
        derandomize=examples <= 30,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
