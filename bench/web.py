"""The HTTP rows: the dashboard under the project's gunicorn config, on 127.0.0.1.

:class:`BenchServer` runs ``gunicorn -c gunicorn.conf.py`` (gthread, one
process, eight threads) with :mod:`bench.app`: the dashboard plus ``/bare``,
a route returning a short string, which is the baseline of every request
rate here. :func:`http_rows` loads each route in turn, alternating rounds;
:func:`polling_cost` runs 50 simulated dashboards and reads the server's CPU
time from /proc.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .load import Connection, LoadGenerator, LoadResult, build_request

HOST = "127.0.0.1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HX = {"HX-Request": "true"}
#: A form post of one trivial task (the queue is paused: it never runs).
POST_BODY = "kind=pretend&count=1&seconds=0"


def _clean_env(settings: dict[str, str]) -> dict[str, str]:
    """This environment less any server setting that would change what is measured."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("FLASK_", "GUNICORN_", "WERKZEUG_"))
        and k not in ("BIND", "PORT", "WEB_CONCURRENCY")
    }
    env.update(settings)
    return env


class BenchServer:
    """``gunicorn -c gunicorn.conf.py bench.app:create_app()`` on a free port."""

    def __init__(self, **settings: str):
        # We bind the socket and hand gunicorn its descriptor (BIND=fd://N): a
        # port chosen and closed again could be taken by anyone before gunicorn
        # binds it, and the load would then measure somebody else's server.
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((HOST, 0))
        self.listener.listen(1024)
        self.port = self.listener.getsockname()[1]
        self.settings = {
            "BIND": f"fd://{self.listener.fileno()}",
            "FLASK_QUEUE_SUBMIT_LIMIT": "",  # the per-client limit would refuse the load
            "FLASK_QUEUE_SHUTDOWN_TIMEOUT": "1",
            **settings,
        }
        self.log = tempfile.NamedTemporaryFile(prefix="bench-gunicorn-", suffix=".log",
                                               delete=False)
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn = Connection(HOST, self.port)

    def __enter__(self) -> BenchServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "bench.app:create_app()"],
            cwd=ROOT, env=_clean_env(self.settings), stdin=subprocess.DEVNULL,
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            pass_fds=(self.listener.fileno(),),
        )
        self.listener.close()  # gunicorn holds its own copy now
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited at start; see {self.log.name}")
            try:
                if self.request("GET", "/bare")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not answer within 60s; see {self.log.name}")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own session: master and workers
            self.proc.wait(10)
        self.log.close()
        if not any(exc):
            os.unlink(self.log.name)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                body: str = "", content_type: str | None = None) -> tuple[int, dict, bytes, int]:
        raw = build_request(method, path, f"{HOST}:{self.port}", headers, body.encode(),
                            content_type)
        return self.conn.exchange(raw)

    def api(self, method: str, path: str, data: Any = None) -> Any:
        status, _, body, _ = self.request(
            method, path, {}, json.dumps(data) if data is not None else "",
            "application/json" if data is not None else None,
        )
        if status >= 300:
            raise RuntimeError(f"{method} {path}: {status} {body[:200]!r}")
        return json.loads(body) if body else None

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.api("GET", "/api/stats")
            if not stats["queued"] and not stats["running"]:
                return
            time.sleep(0.05)
        raise RuntimeError("the queue did not drain")

    def tag(self) -> str:
        return self.request("GET", "/live", HX)[1]["hx-ptag"]

    def pids(self) -> list[int]:
        """The master and its children (the worker processes)."""
        assert self.proc is not None
        master = self.proc.pid
        pids = [master]
        try:
            children = open(f"/proc/{master}/task/{master}/children").read().split()
            pids += [int(c) for c in children]
        except OSError:
            pass
        return pids

    def cpu_seconds(self) -> float:
        """User + system CPU time of the master and its workers so far (Linux /proc)."""
        ticks = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")


# -- row 4: requests per second against the bare route --------------------------------


@dataclass
class Route:
    key: str
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    results: list[LoadResult] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return statistics.median(r.rate for r in self.results)

    @property
    def bytes(self) -> float:
        return statistics.median(r.bytes_per_response for r in self.results)

    @property
    def bad(self) -> int:
        return sum(r.bad for r in self.results)

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.results)


def _prepare_page(server: BenchServer) -> None:
    """A page like a busy dashboard's: 20 finished tasks listed (some failed, with
    Retry buttons), the chart, then the queue paused with work waiting in "Up next"."""
    for count, fail_rate in ((18, 0), (7, 1)):  # the same page every run
        server.api("POST", "/api/tasks", {"kind": "flaky", "count": count,
                                          "params": {"seconds": 0, "fail_rate": fail_rate}})
    server.wait_idle()
    server.api("POST", "/api/pause")
    server.api("POST", "/api/tasks", {"kind": "pretend", "count": 10, "params": {"seconds": 0}})


def http_rows(load: LoadGenerator, rounds: int = 3, seconds: float = 3.0,
              log=print) -> dict[str, Route]:
    """Median req/s and bytes per response of each route, ``rounds`` alternating rounds.

    ``changed`` is a poll from a page behind the current state (no HX-PTag):
    the regions are rendered once for a state and reused; ``fresh`` is the
    same poll with that reuse turned off, so every request renders.

    The queue is paused with a large QUEUE_MAX_QUEUED, so the posts are never
    refused (503) and no task runs beside the requests.
    """
    routes = {
        "bare": Route("bare", "GET", "/bare"),
        "post": Route("post", "POST", "/tasks", body=POST_BODY),
        "changed": Route("changed", "GET", "/live", dict(HX)),
        "fresh": Route("fresh", "GET", "/live", dict(HX)),
        "unchanged": Route("unchanged", "GET", "/live", dict(HX)),
    }
    with BenchServer(FLASK_QUEUE_MAX_QUEUED="10000000") as server:
        _prepare_page(server)

        expected = {"bare": 200, "post": 303, "changed": 200, "fresh": 200, "unchanged": 304}

        def run(route: Route, secs: float) -> LoadResult:
            if route.key == "unchanged":
                route.headers["HX-PTag"] = server.tag()  # the posts moved it on
            status = server.request(route.method, route.path, route.headers, route.body)[0]
            if status != expected[route.key]:  # wrk counts only 4xx and 5xx as errors
                raise RuntimeError(f"{route.method} {route.path} answered {status}")
            if route.key == "fresh":  # no reuse of a render: every request renders
                reuse = server.request("POST", "/bench/live-cache", body="seconds=0")[2]
            try:
                result = load.run(HOST, server.port, route.method, route.path, route.headers,
                                  route.body, secs)
            finally:
                if route.key == "fresh":
                    server.request("POST", "/bench/live-cache", body=f"seconds={reuse.decode()}")
            if route.key == "unchanged":
                status = server.request("GET", "/live", route.headers)[0]
                if status != 304:
                    raise RuntimeError(f"the unchanged poll answered {status} by the end")
            return result

        for route in routes.values():
            run(route, min(1.0, seconds))  # warm up: the threads, templates, connections
        for i in range(rounds):
            order = list(routes.values())
            order = order[i % len(order):] + order[:i % len(order)]  # no route always first
            for route in order:
                route.results.append(run(route, seconds))
            log(f"  http round {i + 1}/{rounds}: " + ", ".join(
                f"{r.key} {r.results[-1].rate:,.0f}/s" for r in order))
    return routes


# -- row 6: the CPU time of 50 dashboards polling ---------------------------------------


def _dashboards(server: BenchServer, count: int, seconds: float,
                interval: float = 1.0) -> dict[str, int]:
    """``count`` pages polling /live every ``interval`` like htmx's ptag extension:
    each sends the last HX-PTag it got. Returns the status counts."""
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def page(offset: float) -> None:
        conn = Connection(HOST, server.port)
        tag = None
        next_poll = time.monotonic() + offset
        try:
            while True:
                delay = next_poll - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if next_poll >= stop:
                    return
                next_poll += interval
                headers = dict(HX)
                if tag:
                    headers["HX-PTag"] = tag
                try:
                    status, got, _, _ = conn.exchange(
                        build_request("GET", "/live", f"{HOST}:{server.port}", headers))
                    tag = got.get("hx-ptag", tag)
                    key = str(status)
                except OSError:
                    key = "error"
                with lock:
                    statuses[key] = statuses.get(key, 0) + 1
        finally:
            conn.close()

    rng = random.Random(6)
    threads = [threading.Thread(target=page, args=(rng.random() * interval,))
               for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


@dataclass
class CpuWindow:
    name: str
    cpu_per_minute: float
    statuses: dict[str, int]


def _cpu_window(server: BenchServer, name: str, dashboards: int, seconds: float) -> CpuWindow:
    before = server.cpu_seconds()
    start = time.monotonic()
    if dashboards:
        statuses = _dashboards(server, dashboards, seconds)
    else:
        time.sleep(seconds)
        statuses = {}
    elapsed = time.monotonic() - start
    used = server.cpu_seconds() - before
    return CpuWindow(name, used * 60.0 / elapsed, statuses)


def polling_cost(dashboards: int = 50, seconds: float = 15.0,
                 log=print) -> dict[str, CpuWindow]:
    """CPU seconds per minute of the server process(es), three windows:

    ``idle``: ``dashboards`` pages polling a queue where nothing changes (304s);
    ``busy``: the same pages while 4 workers burn a backlog down, reporting
    progress ten times a second (every poll renders); ``busy_alone``: the same
    burn-down with no page polling, the cost of the work itself.
    """
    out = {}
    work = {"kind": "pretend", "count": 100, "params": {"seconds": 2}}
    with BenchServer(FLASK_QUEUE_WORKERS="4", FLASK_QUEUE_MAX_QUEUED="10000") as server:
        _dashboards(server, dashboards, min(2.0, seconds))  # warm up
        out["idle"] = _cpu_window(server, "idle", dashboards, seconds)
        log(f"  polling: idle queue {out['idle'].cpu_per_minute:.2f} CPU s/min "
            f"{out['idle'].statuses}")
        server.api("POST", "/api/tasks", work)  # 100 × 2 s on 4 workers: 50 s of burn-down
        time.sleep(0.5)
        out["busy"] = _cpu_window(server, "busy", dashboards, seconds)
        log(f"  polling: burning down {out['busy'].cpu_per_minute:.2f} CPU s/min "
            f"{out['busy'].statuses}")
        out["busy_alone"] = _cpu_window(server, "busy_alone", 0, seconds)
        log(f"  polling: burning down, no dashboards {out['busy_alone'].cpu_per_minute:.2f}"
            " CPU s/min")
        if server.api("GET", "/api/stats")["queued"] == 0:
            raise RuntimeError("the backlog ran out before the last window ended")
    return out
