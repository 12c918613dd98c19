"""Row 9: the RQ backend on a private Redis (``redis-server`` on a unix socket in a
temporary directory, started here and always stopped), each number against RQ itself
or against the same backend at another size, in the same run:

* submits through :class:`dashboard.rq.RQBackend` against RQ's own ``Queue.enqueue``;
* no-op tasks drained end to end by 2 worker processes against 1;
* a changed poll's render with many finished jobs in Redis against with 100
  (``--rq-finished``: 15,000 by default, what two worker processes of ours finish in
  about 100 s on two cores; filling 100,000 takes over ten minutes there).

``python -m bench.rq worker URL NAME [--no-fork] [--dashboard] [--burst]`` is a worker
process of ours (the end-to-end row's, and the fill's): it waits for work until SIGTERM,
then stops warm, or with ``--burst`` stops when the queue is empty.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator

from dashboard.tasks import Registry

#: Debian's; any redis-server on PATH otherwise.
REDIS_SERVER = "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else (
    shutil.which("redis-server") or "redis-server")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

registry = Registry()


@registry.task("noop")
def noop_task(ctx) -> None:
    pass


def noop() -> None:
    """RQ's own baseline job: a module-level function that does nothing."""


def redis_available() -> bool:
    return os.path.exists(REDIS_SERVER) or shutil.which(REDIS_SERVER) is not None


@contextlib.contextmanager
def redis_server(timeout: float = 10.0) -> Iterator[str]:
    """A private ``redis-server`` on a unix socket in a temporary directory, nothing
    saved to disk: yields its ``unix://`` URL; it is stopped (and the directory
    removed) when the block ends, however it ends."""
    tmp = tempfile.mkdtemp(prefix="bench-redis-")
    sock = os.path.join(tmp, "redis.sock")
    log = open(os.path.join(tmp, "redis.log"), "wb")
    proc = None
    try:
        proc = subprocess.Popen(
            [REDIS_SERVER, "--port", "0", "--unixsocket", sock, "--save", "",
             "--appendonly", "no", "--dir", tmp],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        url = f"unix://{sock}"
        _wait_for_ping(url, proc, tmp, timeout)
        yield url
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_ping(url: str, proc: subprocess.Popen, tmp: str, timeout: float) -> None:
    from redis import Redis
    from redis.exceptions import RedisError

    deadline = time.monotonic() + timeout
    client = Redis.from_url(url, socket_connect_timeout=1)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({proc.returncode}): "
                                   f"{_tail(os.path.join(tmp, 'redis.log'))}")
            try:
                if client.ping():
                    return
            except (RedisError, OSError):
                pass
            if time.monotonic() >= deadline:
                raise RuntimeError(f"redis-server did not answer within {timeout:g}s: "
                                   f"{_tail(os.path.join(tmp, 'redis.log'))}")
            time.sleep(0.02)
    finally:
        client.close()


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, "rb") as f:
            return " | ".join(f.read().decode(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"



# -- 9a: submits against RQ's own enqueue ------------------------------------------------


def submit_rate(url: str, n: int) -> float:
    """``n`` ``RQBackend.submit("noop")`` from one client, on an empty database: per second."""
    from dashboard.rq import RQBackend, connect

    connection = connect(url)
    try:
        connection.flushdb()
        backend = RQBackend(url, registry, name="bench", max_queued=n + 1,
                            connection=connection)
        submit = backend.submit
        start = time.perf_counter()
        for _ in range(n):
            submit("noop")
        return n / (time.perf_counter() - start)
    finally:
        connection.close()


def rq_enqueue_rate(url: str, n: int) -> float:
    """The same number of RQ's own ``Queue.enqueue`` of a module-level no-op function
    (the JSON serializer, as ours), on an empty database: per second."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    from dashboard.rq import connect

    connection = connect(url)
    try:
        connection.flushdb()
        enqueue = Queue("base", connection=connection, serializer=JSONSerializer).enqueue
        start = time.perf_counter()
        for _ in range(n):
            enqueue(noop)
        return n / (time.perf_counter() - start)
    finally:
        connection.close()


# -- 9b: end to end, 1 worker process against 2 -----------------------------------------


def start_workers(url: str, name: str, count: int, *, fork: bool = True,
                  dashboard: bool = False, history: int = 1000,
                  burst: bool = False) -> list[subprocess.Popen]:
    command = [sys.executable, "-m", "bench.rq", "worker", url, name,
               "--history", str(history)]
    command += [] if fork else ["--no-fork"]
    command += ["--dashboard"] if dashboard else []
    command += ["--burst"] if burst else []
    return [subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL) for _ in range(count)]


def stop_workers(procs: list[subprocess.Popen], timeout: float = 15.0) -> None:
    """A warm stop (SIGTERM, as a process manager sends), then a kill past ``timeout``."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_until(check, timeout: float, what: str, procs: list[subprocess.Popen] = (),
               pause: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        dead = [p.returncode for p in procs if p.poll() is not None and p.returncode]
        if dead:
            raise RuntimeError(f"a worker process failed ({dead}) while waiting for {what}")
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{what}: not after {timeout:g}s")
        time.sleep(pause)


def drain_rate(url: str, n: int, workers: int, fork: bool = True) -> float:
    """``workers`` worker processes of ours, started and idle on an empty database; then
    ``n`` no-op tasks submitted in one batch: tasks per second from the submit's end
    to the last one done (the processes' start is not timed)."""
    from dashboard.rq import RQBackend, connect

    connection = connect(url)
    connection.flushdb()
    backend = RQBackend(url, registry, name="bench", max_queued=n, connection=connection)
    procs = start_workers(url, "bench", workers, fork=fork)
    try:
        wait_until(lambda: len(backend.stats(0).workers) == workers, 60,
                   f"{workers} workers registered", procs, pause=0.05)
        backend.submit_many("noop", n, {})
        start = time.perf_counter()
        wait_until(lambda: backend.stats(0).done >= n, max(60.0, n / 5), f"{n} tasks done",
                   procs, pause=0.05)
        elapsed = time.perf_counter() - start
        snap = backend.stats(0)
        if (snap.done, snap.failed) != (n, 0):
            raise RuntimeError(f"{snap.done} done and {snap.failed} failed of {n}")
        return n / elapsed
    finally:
        stop_workers(procs)
        connection.close()


def scaling(url: str, n: int, rounds: int, fork: bool = True) -> tuple[float, float]:
    """Median rates of 1 worker process and of 2, their rounds alternating."""
    one, two = [], []
    for _ in range(rounds):
        one.append(drain_rate(url, n, 1, fork))
        two.append(drain_rate(url, n, 2, fork))
    return statistics.median(one), statistics.median(two)


# -- 9c: a changed poll's render with many finished jobs against few ----------------------

#: The most QUEUE_HISTORY allows (dashboard/config.py), so no finished job is dropped.
HISTORY = 1_000_000


def fill(url: str, count: int, workers: int) -> float:
    """``count`` finished tasks of the dashboard's app in the database of ``url``: its
    ``pretend`` kind (0 s) submitted in batches, then run by ``workers`` worker processes
    of ours (no fork) until the queue is empty. Seconds taken."""
    app, backend = build(url, "", dashboard=True, history=HISTORY,
                         max_queued=max(count, 10_000))
    start = time.perf_counter()
    for offset in range(0, count, 1000):
        backend.submit_many("pretend", min(1000, count - offset), {"seconds": 0})
    procs = start_workers(url, backend.name, workers, fork=False, dashboard=True,
                          history=HISTORY, burst=True)
    try:
        deadline = time.monotonic() + max(120.0, count / 20)
        for proc in procs:
            proc.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"filling {count:,} tasks took over {count / 20:g}s") from None
    finally:
        stop_workers(procs)
    snap = backend.stats(0)
    if snap.done != count or snap.queued:
        raise RuntimeError(f"filled {snap.done:,} of {count:,} ({snap.queued} still queued)")
    return time.perf_counter() - start


def poll_render_seconds(url: str, finished: tuple[int, ...] = (100, 100_000),
                        polls: int = 200, rounds: int = 10,
                        workers: int | None = None) -> dict[str, Any]:
    """Median seconds to render one changed poll (GET /live, no reuse of a render) of
    the dashboard's app on the RQ backend, with each number of ``finished`` jobs in
    Redis (each in a database of its own on the same server), the apps' polls
    alternating. Each poll follows a submit (outside the timing): the tag has moved,
    the queue region and the counts changed, as when work arrives.

    A poll also reads the per-second record of the last five minutes (the chart and
    the rates), which a long fill leaves long and a short one short: measured as
    filled (``as_filled``), then again with that record dropped from every app
    (``render``), so both charts hold only the polls' own seconds and the number of
    finished jobs is the one difference."""
    from dashboard.rq import connect
    from dashboard.web import live as views

    logging.getLogger("dashboard").setLevel(logging.CRITICAL)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    apps = {}
    fills = {}
    server = connect(url)
    try:
        for db, count in enumerate(finished):
            db_url = f"{url}?db={db}"
            before = server.info("memory")["used_memory"]
            seconds = fill(db_url, count, workers)
            fills[count] = (seconds, server.info("memory")["used_memory"] - before)
            app, backend = build(db_url, "", dashboard=True, history=HISTORY,
                                 max_queued=max(count, 10_000))
            backend.submit_many("pretend", 5, {"seconds": 0})  # queued and listed too
            apps[count] = (app, backend, app.test_client())
    finally:
        server.close()
    headers = {"HX-Request": "true"}

    def measure() -> dict[int, float]:
        times: dict[int, list[float]] = {count: [] for count in finished}
        for _ in range(rounds):
            for count, (_, backend, client) in apps.items():
                for _ in range(polls // rounds):
                    backend.submit("pretend", seconds=0)
                    start = time.perf_counter()
                    response = client.get("/live", headers=headers)
                    times[count].append(time.perf_counter() - start)
                    assert response.status_code == 200, response.status_code
        return {count: statistics.median(t) for count, t in times.items()}

    reuse, views.LIVE_CACHE_SECONDS = views.LIVE_CACHE_SECONDS, 0  # time the render itself
    try:
        series = {count: len(backend.stats(0).series) for count, (_, backend, _) in apps.items()}
        as_filled = measure()
        for _, backend, _ in apps.values():
            # The backend's per-second record (flq:<queue>:sec and :secs), nothing else.
            backend.connection.delete(backend._sec, backend._secs)
        render = measure()
        return {"render": render, "as_filled": as_filled, "series": series, "fill": fills,
                "workers": workers}
    finally:
        views.LIVE_CACHE_SECONDS = reuse
        for _, backend, _ in apps.values():
            backend.shutdown()

# -- the worker processes -------------------------------------------------------------------


def build(url: str, name: str, *, dashboard: bool = False, history: int = 1000,
          max_queued: int = 10_000) -> tuple[Any, Any]:
    """``(app, backend)``: the dashboard's own app on ``url`` (its registry, its queue
    name) or a bare Flask app with this module's registry and queue ``name``."""
    if dashboard:
        from dashboard import create_app, get_queue

        app = create_app({"QUEUE_URL": url, "TESTING": True, "QUEUE_HISTORY": history,
                          "QUEUE_MAX_QUEUED": max_queued, "QUEUE_HANDLE_SIGNALS": False})
        return app, get_queue(app)
    from flask import Flask

    from dashboard.rq import RQBackend

    return Flask("bench-rq"), RQBackend(url, registry, name=name, max_queued=max_queued,
                                        history=history)


def worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rq worker")
    parser.add_argument("url")
    parser.add_argument("name")
    parser.add_argument("--no-fork", action="store_true", help="SimpleQueueWorker")
    parser.add_argument("--dashboard", action="store_true",
                        help="the dashboard's app and registry (its queue name)")
    parser.add_argument("--history", type=int, default=1000)
    parser.add_argument("--burst", action="store_true", help="stop when the queue is empty")
    args = parser.parse_args(argv)
    logging.getLogger("dashboard").setLevel(logging.WARNING)
    app, backend = build(args.url, args.name, dashboard=args.dashboard, history=args.history)
    worker = backend.worker(app, fork=not args.no_fork)
    worker.work(burst=args.burst, logging_level="WARNING")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"]:
        sys.exit("usage: python -m bench.rq worker URL NAME [--no-fork] [--dashboard] ...")
    from bench.rq import worker_main as main  # this module's registry, not __main__'s

    sys.exit(main(sys.argv[2:]))
