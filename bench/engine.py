"""The in-process rows: rate, dispatch latency and memory of the engine, each
against a bare ``queue.Queue`` (or ``ThreadPoolExecutor``) doing the same work."""

from __future__ import annotations

import concurrent.futures
import gc
import json
import logging
import os
import queue as stdlib_queue
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc

from dashboard.tasks import Registry
from dashboard.local.queue import WorkQueue

registry = Registry()


@registry.task("noop")
def noop_task(ctx) -> None:
    pass


_stamps: list[float] = []
_started = threading.Event()


@registry.task("stamp")
def stamp_task(ctx) -> None:
    _stamps.append(time.perf_counter())
    _started.set()


def noop() -> None:
    pass


# -- row 1: rate --------------------------------------------------------------------------


def engine_rate(n: int) -> float:
    """Submit ``n`` trivial tasks from one thread to one worker, then join."""
    return drain_rate(WorkQueue(1, max_queued=n, history=1000, registry=registry), n)


def drain_rate(q: WorkQueue, n: int) -> float:
    """Start ``q``, submit ``n`` trivial tasks from this thread, join: tasks per second."""
    q.start()
    try:
        start = time.perf_counter()
        submit = q.submit
        for _ in range(n):
            submit("noop")
        if not q.join(timeout=600):
            raise RuntimeError("the queue did not drain")
        return n / (time.perf_counter() - start)
    finally:
        q.shutdown(timeout=10)


def executor_rate(n: int) -> float:
    """The same work on ``ThreadPoolExecutor(max_workers=1)``: submit ``n``, wait for all."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(noop).result()  # start its thread outside the timing, as q.start() is
        start = time.perf_counter()
        submit = pool.submit
        futures = [submit(noop) for _ in range(n)]
        concurrent.futures.wait(futures)
        return n / (time.perf_counter() - start)


def bare_consumer(work: stdlib_queue.Queue) -> threading.Thread:
    """One thread calling each function put on ``work`` until it gets None."""

    def consume() -> None:
        while True:
            fn = work.get()
            if fn is None:
                return
            fn()

    thread = threading.Thread(target=consume)
    thread.start()
    return thread


def raw_queue_rate(n: int) -> float:
    """The floor of in-process hand-off: a bare ``queue.Queue`` and one thread."""
    work: stdlib_queue.Queue = stdlib_queue.Queue()
    thread = bare_consumer(work)
    start = time.perf_counter()
    put = work.put
    for _ in range(n):
        put(noop)
    put(None)
    thread.join()
    return n / (time.perf_counter() - start)


# -- row 2: dispatch latency ----------------------------------------------------------------

#: Pause between tries, so the worker is back to waiting when the next task comes.
IDLE_GAP = 0.001


def engine_dispatch(tries: int) -> list[float]:
    """Seconds from ``submit()`` to the task function's first line, one idle worker."""
    q = WorkQueue(1, max_queued=1000, history=100, registry=registry)
    q.start()
    out = []
    try:
        submit = q.submit
        for _ in range(tries):
            time.sleep(IDLE_GAP)
            _started.clear()
            start = time.perf_counter()
            submit("stamp")
            if not _started.wait(10):
                raise RuntimeError("the task did not start")
            out.append(_stamps[-1] - start)
        return out
    finally:
        _stamps.clear()
        q.shutdown(timeout=10)


def raw_dispatch(tries: int) -> list[float]:
    """The same with a bare ``queue.Queue``: ``put()`` to the consumer calling the function."""
    work: stdlib_queue.Queue = stdlib_queue.Queue()
    stamps: list[float] = []
    started = threading.Event()

    def stamp() -> None:
        stamps.append(time.perf_counter())
        started.set()

    thread = bare_consumer(work)
    out = []
    try:
        for _ in range(tries):
            time.sleep(IDLE_GAP)
            started.clear()
            start = time.perf_counter()
            work.put(stamp)
            if not started.wait(10):
                raise RuntimeError("the function did not start")
            out.append(stamps[-1] - start)
        return out
    finally:
        work.put(None)
        thread.join()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def dispatch_latency(tries: int = 2000, rounds: int = 4) -> dict[str, dict[str, float]]:
    """p50 and p99 over ``tries`` hand-offs each, ours and the raw queue alternating."""
    ours: list[float] = []
    raw: list[float] = []
    for _ in range(rounds):
        ours += engine_dispatch(tries // rounds)
        raw += raw_dispatch(tries // rounds)
    return {
        name: {"p50": percentile(v, 50), "p99": percentile(v, 99), "max": max(v)}
        for name, v in (("ours", ours), ("raw", raw))
    }


# -- row 8: delayed tasks -------------------------------------------------------------------


def delay_lateness(tries: int = 1000, delay: float = 0.005) -> dict[str, dict[str, float]]:
    """Seconds from a delayed task's due time to its function's first line (one idle
    worker, in-memory store), and, as the baseline, how late the OS wakes a thread
    waiting on a condition for the same time (what any timer here can do)."""
    q = WorkQueue(1, max_queued=1000, history=100, registry=registry)
    q.start()
    ours: list[float] = []
    try:
        for _ in range(tries):
            _started.clear()
            due = time.perf_counter() + delay
            q.submit("stamp", delay=delay)
            if not _started.wait(10):
                raise RuntimeError("the delayed task did not start")
            ours.append(max(0.0, _stamps[-1] - due))
    finally:
        _stamps.clear()
        q.shutdown(timeout=10)
    base: list[float] = []
    waiter = threading.Condition()
    for _ in range(tries):
        due = time.perf_counter() + delay
        with waiter:
            waiter.wait(delay)
        base.append(max(0.0, time.perf_counter() - due))
    return {name: {"p50": percentile(v, 50), "p99": percentile(v, 99)}
            for name, v in (("ours", ours), ("base", base))}


def scheduled_bytes(n: int = 100_000) -> dict[str, float]:
    """Traced bytes per task, beyond its params dict: ``n`` scheduled against ``n`` queued."""

    def measure(delay) -> float:
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            q = WorkQueue(0, max_queued=n, history=1000, registry=registry)
            submit = q.submit
            for _ in range(n):
                submit("noop", delay=delay)
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        del q
        return (after - before) / n - sys.getsizeof({})

    return {"scheduled": measure(3600), "queued": measure(None)}


def engine_rate_with_scheduled(n: int, scheduled: int = 1000) -> float:
    """:func:`engine_rate` with ``scheduled`` tasks waiting to be due in an hour."""
    q = WorkQueue(1, max_queued=max(n, scheduled), history=1000, registry=registry)
    for _ in range(scheduled):
        q.submit("noop", delay=3600)
    return drain_rate(q, n)


# -- row 3: memory ----------------------------------------------------------------------


def queued_bytes(n: int = 100_000) -> dict[str, float]:
    """Traced bytes per queued task, beyond its params dict, with ``n`` queued and no
    worker; and the same for a bare ``queue.Queue`` of ``(kind, params)`` tuples."""

    def measure(fill) -> float:
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            keep = fill()
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        del keep
        params_size = sys.getsizeof({})  # each task holds its own params dict
        return (after - before) / n - params_size

    def ours():
        q = WorkQueue(0, max_queued=n, history=1000, registry=registry)
        submit = q.submit
        for _ in range(n):
            submit("noop")
        return q

    def raw():
        work: stdlib_queue.Queue = stdlib_queue.Queue()
        put = work.put
        for _ in range(n):
            put(("noop", {}))
        return work

    return {"ours": measure(ours), "raw": measure(raw)}


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def rss_through_history(total: int = 1_000_000) -> dict:
    """Run ``total`` tasks through one worker and a history of 1,000, in batches of
    10,000 at most; RSS after a tenth (the history long full), half and all of them."""
    logging.getLogger("dashboard").setLevel(logging.WARNING)
    batch = max(1, min(10_000, total // 10))
    total -= total % batch
    marks = {total // 10 // batch * batch, total // 2 // batch * batch, total}
    q = WorkQueue(1, max_queued=batch, history=1000, registry=registry)
    q.start()
    samples = {}
    start = time.perf_counter()
    try:
        for done in range(batch, total + 1, batch):
            q.submit_many("noop", batch)
            if not q.join(timeout=600):
                raise RuntimeError("the queue did not drain")
            if done in marks:
                gc.collect()
                samples[done] = rss_bytes()
        snap = q.stats(0)
        if snap.done != total:
            raise RuntimeError(f"{snap.done} of {total} tasks done")
        return {"rss": samples, "seconds": time.perf_counter() - start,
                "history": len(q.stats(5000).recent)}
    finally:
        q.shutdown(timeout=10)


def rss_run(total: int = 1_000_000) -> dict:
    """:func:`rss_through_history` in a fresh interpreter, so nothing else sits in its RSS."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import json, bench.engine as e; "
            f"print(json.dumps(e.rss_through_history({total})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(f"the RSS run failed:\n{out.stderr}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    data["rss"] = {int(k): v for k, v in data["rss"].items()}
    return data


# -- the poll's render time does not grow with the tasks ever run ------------------------


def poll_render_seconds(finished: tuple[int, ...] = (20, 10_000), polls: int = 200,
                        rounds: int = 10) -> dict[int, float]:
    """Median seconds to answer one changed poll (GET /live, a full render, no reuse)
    after each number of ``finished`` tasks ran, the apps' polls alternating: the
    rendering must not grow with the number of tasks ever run."""
    from dashboard import create_app, get_queue
    from dashboard.web import live as views

    logging.getLogger("dashboard").setLevel(logging.CRITICAL)
    apps = {}
    for count in finished:
        app = create_app({"QUEUE_WORKERS": 0, "QUEUE_HANDLE_SIGNALS": False,
                          "QUEUE_MAX_QUEUED": max(count, 1000)})
        queue = get_queue(app)
        for _ in range(0, count, 1000):
            queue.submit_many("pretend", min(1000, count), {"seconds": 0})
            queue.run_pending()
        queue.submit_many("pretend", 5, {"seconds": 0})  # something queued and listed too
        apps[count] = (app, queue, app.test_client())
    headers = {"HX-Request": "true"}
    times: dict[int, list[float]] = {count: [] for count in finished}
    reuse, views.LIVE_CACHE_SECONDS = views.LIVE_CACHE_SECONDS, 0  # time the render itself
    try:
        for _ in range(rounds):
            for count, (_, _, client) in apps.items():
                for _ in range(polls // rounds):
                    start = time.perf_counter()
                    response = client.get("/live", headers=headers)
                    times[count].append(time.perf_counter() - start)
                    assert response.status_code == 200
        return {count: statistics.median(t) for count, t in times.items()}
    finally:
        views.LIVE_CACHE_SECONDS = reuse
        for _, queue, _ in apps.values():
            queue.shutdown(timeout=5)
