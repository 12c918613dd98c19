"""The store contract, proved against a plain model (hypothesis stateful testing).

A :class:`RuleBasedStateMachine` drives a real store and a model of a few
lists and counters with the same random operations: submit one or many,
claim (as a named worker or the calling thread) and finish (done, failed,
cancelled), cancel queued, running, finished and unknown tasks, retry (twice,
too) and retry what cannot be retried, pause and resume, clear the history,
reset, add, stop, kill and remove workers, upkeep, close; and the operator's
view: find a page (by states, kind, text, not retried yet; newest or oldest
first, from any task), count, and retry, cancel or purge in bulk by a filter,
in batches. After every step the store must agree with the model:

* the counters equal the number of tasks in each state, and ``submitted``
  counts what was accepted since the last reset; the per-kind totals of
  :meth:`metrics` (tasks here are of kind ``k``, some of ``j``) say the same,
  with the attempts scheduled again by a retry policy, and a wait observed at
  each start and a run at each end of an attempt; each kind's health, its
  queued and running tasks now and its done and failed ones since the reset;
* every task the model knows is in exactly the state the model says (so no
  task is in two states), and every forgotten one is gone;
* the queued tasks are listed in the order they were queued (FIFO), and a
  claim takes the oldest;
* each worker shows the task it holds and the state it is in;
* a page of a search is the model's matching tasks in id order, from the
  cursor's task on, and a count all of them (text is matched by the rule
  every backend keeps, :meth:`TaskFilter.matches`, on the task as the store
  has it); a bulk action acts on exactly the model's matching tasks, oldest
  first (a retry on as many as the queue has room for, then QueueFull);

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
from dashboard.records import BULK_ACTIONS, State, TaskFilter, WorkerState
from dashboard.local import queue as local_queue
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
KINDS = ("k", "j")
#: Words in the params of submitted tasks, and texts a search looks for: some in any
#: case, some with what LIKE would take for wildcards, some in errors.
WORDS = ("x", "A_b", "50%", "Zz\\")
TEXTS = ('"n":1', "a_b", "A_", "50%", "%", "_", "zZ\\", "\\", "ENDED", "before it",
         "attempt", '"w":"x"')
#: Tasks per batch of a bulk action here (BULK_BATCH in production): a few batches.
BATCH = 3
#: The searches every step checks: everything, what a bulk retry, cancel and purge act
#: on, one state of one kind, the running ones, one kind, a text in errors.
SWEEP = (
    TaskFilter(),
    TaskFilter().for_action("retry"),
    TaskFilter(kind="j").for_action("cancel"),
    TaskFilter(frozenset({State.DONE, State.CANCELLED})).for_action("purge"),
    TaskFilter(frozenset({State.FAILED}), kind="k"),
    TaskFilter(frozenset({State.RUNNING})),
    TaskFilter(kind="j"),
    TaskFilter(text="ENDED"),
)
#: What each kind's totals count, in the order of KindStats.
TOTALS = ("submitted", "done", "failed", "cancelled", "retried_later", "starts", "ends")


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
        self.kind: dict[int, str] = {}  # every task's kind
        # Per kind, since the last reset: what the totals count (see totals()).
        self.by_kind: dict[str, Counter] = {kind: Counter() for kind in KINDS}
        # Periodic schedules: name -> [spec, next due, last due, last task, runs], as
        # the store must keep them (one model for stores sharing a file).
        self.schedules: dict[str, list] = {}

    # -- helpers -------------------------------------------------------------

    def store_index(self) -> st.SearchStrategy[int]:
        return st.integers(0, len(self.stores) - 1)

    def add_queued(self, ids: list[int], kind: str = "k") -> None:
        for task_id in ids:
            assert task_id not in self.state and task_id not in self.forgotten, task_id
            self.state[task_id] = State.QUEUED
            self.queue.append(task_id)
            self.kind[task_id] = kind
        self.submitted += len(ids)
        self.by_kind[kind]["submitted"] += len(ids)

    def bump(self, task_id: int, what: str) -> None:
        """Count ``what`` for the task's kind."""
        self.by_kind[self.kind[task_id]][what] += 1

    def finished_ids(self, *states: State) -> list[int]:
        return [i for i, s in self.state.items() if s in (states or FINISHED)]

    def count(self, task_id: int, state: State) -> None:
        if state is State.DONE:
            self.done += 1
        elif state is State.FAILED:
            self.failed += 1
        else:
            self.cancelled += 1
        self.bump(task_id, state.value)

    def end(self, task_id: int, state: State) -> None:
        _, _, worker = self.held.pop(task_id)
        self.state[task_id] = state
        self.count(task_id, state)
        self.ends += 1
        self.bump(task_id, "ends")
        for (_, name), slot in self.workers.items():
            if slot["task"] == task_id:
                slot["task"] = None
                slot["done"] += 1

    # -- submitting -----------------------------------------------------------

    @rule(data=st.data(), kind=st.sampled_from(KINDS), word=st.sampled_from(WORDS))
    def submit(self, data, kind, word):
        i = data.draw(self.store_index())
        store = self.stores[i]
        if self.closed[i]:
            with pytest.raises(QueueClosed):
                store.add_one(kind, {})
        elif len(self.queue) >= MAX_QUEUED:
            with pytest.raises(QueueFull):
                store.add_one(kind, {})
        else:
            params = {"n": len(self.state), "w": word}
            task_id = store.add_one(kind, params)
            self.add_queued([task_id], kind)
            assert store.get(task_id).params == params

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
                self.kind[task_id] = "k"
            self.submitted += count
            self.by_kind["k"]["submitted"] += count

    @precondition(lambda self: self.scheduled)
    @rule(data=st.data())
    def cancel_scheduled(self, data):
        task_id = data.draw(st.sampled_from(self.scheduled))
        i = data.draw(self.store_index())
        assert self.stores[i].cancel(task_id) is State.CANCELLED
        self.scheduled.remove(task_id)
        self.state[task_id] = State.CANCELLED
        self.cancelled += 1
        self.bump(task_id, "cancelled")
        assert self.stores[i].get(task_id).error == "cancelled before it was due"

    @rule(data=st.data(), count=st.integers(1, 5), kind=st.sampled_from(KINDS))
    def submit_many(self, data, count, kind):
        i = data.draw(self.store_index())
        store = self.stores[i]
        if self.closed[i]:
            with pytest.raises(QueueClosed):
                store.add(kind, {}, count)
        elif len(self.queue) + count > MAX_QUEUED:
            with pytest.raises(QueueFull):
                store.add(kind, {}, count)
        else:
            ids = store.add(kind, {"w": "many"}, count)
            assert ids == sorted(ids) and len(set(ids)) == count
            self.add_queued(ids, kind)

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
        self.bump(record.id, "starts")
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
        self.bump(task_id, "retried_later")
        self.bump(task_id, "ends")
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
        self.bump(task_id, "cancelled")

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
            self.add_queued([new_id], self.kind[task_id])
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
        self.by_kind = {kind: Counter() for kind in KINDS}
        for task_id in [*self.queue, *self.held]:
            self.bump(task_id, "submitted")
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

    # -- the operator's view ------------------------------------------------------

    def draw_filter(self, data) -> TaskFilter:
        states = data.draw(st.frozensets(st.sampled_from(list(State)), max_size=3))
        kind = data.draw(st.sampled_from([None, *KINDS, "nope"]))
        text = data.draw(st.none() | st.sampled_from(TEXTS))
        return TaskFilter(states, kind, text, data.draw(st.booleans()))

    def matching(self, query: TaskFilter, reader) -> list[int]:
        """The ids of the tasks the model knows that match ``query``, oldest first: state,
        kind and "not retried" as the model has them; text by the rule every backend
        keeps, on the task as the store has it (params and error)."""
        ids = []
        for task_id, state in sorted(self.state.items()):
            if query.states and state not in query.states:
                continue
            if query.kind is not None and self.kind[task_id] != query.kind:
                continue
            if query.not_retried and task_id in self.retried:
                continue
            if query.text and not query.matches(reader.get(task_id)):
                continue
            ids.append(task_id)
        return ids

    @rule(data=st.data(), limit=st.integers(1, 5), ascending=st.booleans())
    def find(self, data, limit, ascending):
        """A page: the matching tasks in id order, past the cursor's task (any task,
        one forgotten or never known too); the count, all of them."""
        reader = self.stores[data.draw(self.store_index())]
        query = self.draw_filter(data)
        known = sorted([*self.state, *self.forgotten])
        after = None  # the first page; else a task's id, or one beside it
        if known and data.draw(st.booleans()):
            after = known[data.draw(st.integers(0, 50)) % len(known)] + data.draw(
                st.integers(-1, 1))
        expected = self.matching(query, reader)
        assert reader.count(query) == len(expected)
        if not ascending:
            expected.reverse()
        if after is not None:
            expected = [i for i in expected if (i > after if ascending else i < after)]
        page = reader.find(query, limit, after, ascending)
        assert [t.id for t in page] == expected[:limit], (query, after, ascending)
        assert all(t.state is self.state[t.id] for t in page)

    @rule(data=st.data(), action=st.sampled_from(sorted(BULK_ACTIONS)))
    def bulk(self, data, action):
        """A bulk action by a filter, BATCH tasks at a time: it acts on the model's
        matching tasks the action applies to, oldest first, and on no other."""
        i = data.draw(self.store_index())
        store = self.stores[i]
        query = self.draw_filter(data)
        target = query.for_action(action)  # (no state left: nothing it acts on)
        targets = self.matching(target, store) if target.states else []
        if action == "retry":
            room = MAX_QUEUED - len(self.queue)
            refused = QueueClosed if self.closed[i] and targets else \
                QueueFull if len(targets) > room else None
            if refused is not None:
                with pytest.raises(refused):
                    local_queue.bulk_in_batches(store, action, query)
                targets = [] if refused is QueueClosed else targets[:room]
            else:
                result = local_queue.bulk_in_batches(store, action, query)
                assert result.count == len(targets)
            new_ids = [store.get(task_id).retried_as for task_id in targets]
            if refused is None:
                assert list(result.ids) == new_ids
            assert new_ids == sorted(new_ids)  # queued in the order of the tasks
            for task_id, new_id in zip(targets, new_ids):
                self.add_queued([new_id], self.kind[task_id])
                self.retried[task_id] = new_id
                assert store.get(new_id).retry_of == task_id
            assert all(store.get(t).retried_as is None
                       for t in (self.matching(target, store) if target.states else []))
            return
        result = local_queue.bulk_in_batches(store, action, query)
        assert result.count == len(targets)
        if action == "cancel":
            assert list(result.ids) == targets
            for task_id in targets:
                if self.state[task_id] is State.QUEUED:
                    self.queue.remove(task_id)
                else:
                    self.scheduled.remove(task_id)
                self.state[task_id] = State.CANCELLED
                self.cancelled += 1
                self.bump(task_id, "cancelled")
        else:
            self.forget(targets)

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
        # Each kind listed while it has counted anything since the last reset, or has a
        # task still to come; the totals of all of them, the snapshot's.
        assert (self.submitted, self.done, self.failed, self.cancelled, self.retried_later,
                self.starts, self.ends) == tuple(
                    sum(self.by_kind[kind][what] for kind in KINDS) for what in TOTALS)
        listed = {k.kind: (k.submitted, k.done, k.failed, k.cancelled, k.retried, k.wait.count,
                           k.run.count) for k in metrics.kinds}
        assert set(listed) <= set(KINDS)
        waiting = {self.kind[i] for i in [*self.queue, *self.held, *self.scheduled]}
        for kind in KINDS:
            totals = tuple(self.by_kind[kind][what] for what in TOTALS)
            if any(totals) or kind in waiting:
                assert listed.get(kind) == totals, kind
            else:
                assert listed.get(kind, totals) == totals, kind
        # Each kind's health: now, and what ended since the reset (the last hour).
        for health in reader.kind_health(KINDS):
            counted = self.by_kind[health.kind]
            assert (health.queued, health.running, health.done, health.failed) == (
                sum(self.kind[i] == health.kind for i in self.queue),
                sum(self.kind[i] == health.kind for i in self.held),
                counted["done"], counted["failed"]), health
            assert (health.wait_p95 is None) == (not counted["starts"])
            assert (health.run_p50 is None) == (not counted["done"] + counted["failed"])
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

    @invariant()
    def finds_what_the_model_holds(self):
        """The filters of the operator's everyday views, after every step: each counted,
        listed whole (newest first), and paged two at a time from the middle (oldest
        first) as a cursor would."""
        reader = self.stores[-1]
        for query in SWEEP:
            expected = self.matching(query, reader)
            assert reader.count(query) == len(expected), query
            page = reader.find(query, len(expected) + 1)
            assert [t.id for t in page] == expected[::-1], query
            if len(expected) > 2:
                middle = expected[len(expected) // 2]
                page = reader.find(query, 2, middle, True)
                assert [t.id for t in page] == [i for i in expected if i > middle][:2], query

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
def test_the_store_contract_holds_against_the_model(machine, monkeypatch):
    monkeypatch.setattr(local_queue, "BULK_BATCH", BATCH)
    examples = int(os.environ.get("CONTRACT_EXAMPLES", "30"))
    run_state_machine_as_test(machine, settings=settings(
        max_examples=examples, stateful_step_count=40, deadline=None, database=None,
        derandomize=examples <= 30,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
