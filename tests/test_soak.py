"""Soak: random operations from several threads on a running queue, then the books.

Four client threads submit (one or many), cancel, retry, pause and resume,
scale the workers and read, as fast as they can, for ``SOAK_SECONDS``
(3 by default, per store; ``SOAK_SECONDS=600 make test`` or
``SOAK_SECONDS=600 .venv/bin/python -m pytest tests/test_soak.py`` for a
long run), while real worker threads run tasks that take a moment, report
progress, look at ``ctx.cancelled`` and sometimes fail. Then the queue is
resumed and drained, and:

* every task accepted ran exactly once, or never when it was cancelled
  while queued (each run is counted by the task itself);
* every accepted task is finished, in exactly one state that agrees with
  how often it ran, and nothing is left queued or running;
* the counters add up: done + failed + cancelled = submitted;
* no client call failed other than with the refusals the API documents.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter

import pytest

from dashboard.records import State
from dashboard.local.sqlite import SqliteStore
from dashboard.errors import QueueClosed, QueueFull, TaskNotFound, WrongState
from dashboard.local.memory import MemoryStore
from dashboard.tasks import Bool, Int
from dashboard.local.queue import WorkQueue

SECONDS = float(os.environ.get("SOAK_SECONDS", "3"))
CLIENTS = 4
REFUSALS = (QueueFull, QueueClosed, TaskNotFound, WrongState)


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
def test_random_operations_on_a_running_queue_keep_the_books(registry, tmp_path, store_kind):
    runs: Counter[int] = Counter()
    runs_lock = threading.Lock()

    @registry.task("work", params={"steps": Int(0, 5), "fail": Bool()})
    def work(ctx, steps=1, fail=False):
        with runs_lock:
            runs[ctx.task_id] += 1
        for i in range(steps):
            if ctx.cancelled:
                return
            ctx.progress((i + 1) / steps, f"step {i + 1}")
            time.sleep(0.001)  # a moment of real work, so clients act on running tasks
        if fail:
            raise RuntimeError("failed on purpose")

    store = (MemoryStore(max_queued=200, history=1_000_000) if store_kind == "memory" else
             SqliteStore(str(tmp_path / "q.db"), max_queued=200, history=1_000_000,
                         poll_interval=0.01))
    q = WorkQueue(2, registry=registry, store=store, max_workers=4)
    q.start()
    accepted: list[int] = []
    accepted_lock = threading.Lock()
    failures: list[BaseException] = []
    deadline = time.monotonic() + SECONDS

    def client(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            while time.monotonic() < deadline:
                op = rnd.random()
                try:
                    if op < 0.35:
                        ids = [q.submit("work", steps=rnd.randint(0, 5), fail=rnd.random() < 0.2)]
                    elif op < 0.45:
                        ids = q.submit_many("work", rnd.randint(1, 5), {"steps": 1})
                    else:
                        ids = []
                        with accepted_lock:
                            known = rnd.choice(accepted) if accepted else None
                        if op < 0.65 and known is not None:
                            q.cancel(known)
                        elif op < 0.75 and known is not None:
                            retry, created = q.retry(known)
                            ids = [retry] if created else []
                        elif op < 0.80:
                            q.pause() if rnd.random() < 0.5 else q.resume()
                        elif op < 0.85:
                            q.set_workers(rnd.randint(1, 4))
                        else:
                            q.stats(20, 10)
                            if known is not None:
                                q.get(known)
                    with accepted_lock:
                        accepted.extend(i for i in ids if i not in accepted)
                except REFUSALS:
                    pass
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(SECONDS + 60)
        assert not failures, failures
        q.resume()
        q.set_workers(2)
        assert q.join(timeout=120), "the queue did not drain"
        snap = q.stats()
        assert (snap.queued, snap.running) == (0, 0)
        assert snap.done + snap.failed + snap.cancelled == snap.submitted == len(accepted)
        states = Counter()
        for task_id in accepted:
            info = q.get(task_id)
            assert info is not None, f"task {task_id} was lost"
            states[info.state] += 1
            if info.state in (State.DONE, State.FAILED):
                assert runs[task_id] == 1, (task_id, info.state, runs[task_id])
            else:
                assert info.state is State.CANCELLED and runs[task_id] <= 1, (task_id, info)
        assert set(runs) <= set(accepted)  # nothing ran that was not accepted
        assert (states[State.DONE], states[State.FAILED], states[State.CANCELLED]) == (
            snap.done, snap.failed, snap.cancelled)
        assert sum(states.values()) == len(accepted) > 0
        assert q.is_healthy(), q.health()
    finally:
        q.shutdown(timeout=30)
