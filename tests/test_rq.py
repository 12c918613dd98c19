"""The RQ backend with real parts: a private redis-server, real ``flask queue worker``
processes, real gunicorn servers. The contract every backend keeps is in
test_backend_contract.py (its ``rq`` parameter); here is what is RQ's own: only
our entry point ever runs, pause holds workers already waiting on the queue
(rq#526), a killed worker's task is failed as abandoned, and several web and
worker processes on one Redis run each task once and show the same numbers.
"""

from __future__ import annotations

import http.client
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from dashboard.records import State
from servers import BIN, HOST, ROOT, CountLog, Server, free_port, parent_pid, server_env
from support import wait_for

pytestmark = pytest.mark.redis

APPS = ROOT / "tests" / "apps"
APP = "counting:create_app()"


# -- in this process ---------------------------------------------------------------------


@pytest.fixture
def rq_app(redis_url):
    from dashboard import create_app

    app = create_app({"TESTING": True, "QUEUE_URL": redis_url, "QUEUE_HANDLE_SIGNALS": False})
    yield app


def _worker(app):
    from dashboard import get_queue

    return get_queue(app).worker(app, fork=False)


def test_a_redis_url_selects_the_rq_backend_and_the_page_says_so(rq_app):
    from dashboard import get_queue
    from dashboard.rq import RQBackend

    queue = get_queue(rq_app)
    assert isinstance(queue, RQBackend)
    caps = queue.capabilities
    assert (caps.shared, caps.durable, caps.scale_workers, caps.schedules) == (
        True, True, False, False)
    page = rq_app.test_client().get("/")
    assert page.status_code == 200
    assert b"run by RQ workers" in page.data


@pytest.mark.parametrize("url, says", [
    ("redis://", "needs a host"),
    ("redis://localhost:6379/zero", "the database must be a number"),
    ("redis://localhost:99999/0", "the port must be a number"),
    ("unix://", "needs the socket's path"),
])
def test_a_redis_url_that_cannot_be_one_is_refused_at_start_naming_it(url, says):
    from dashboard import ConfigError, create_app

    with pytest.raises(ConfigError, match="QUEUE_URL") as refused:
        create_app({"TESTING": True, "QUEUE_URL": url})
    assert says in str(refused.value)


def test_each_kinds_health_is_kept_in_redis_as_tasks_come_and_go(rq_app):
    """Queued counts what waits to start (scheduled too, and a failed attempt waiting to be
    tried again), by a flag on the job that the scripts clear once; the hour's counts are
    a hash per minute; Reset forgets the hour, not what still waits."""
    from dashboard import get_queue

    queue = get_queue(rq_app)

    def health(kind: str):
        return {h.kind: h for h in queue.kind_health()}[kind]

    assert queue.capabilities.kind_health and not queue.capabilities.search
    ids = [queue.submit("pretend", seconds=0) for _ in range(3)]
    later = queue.submit("pretend", seconds=0, delay=3600)
    assert (health("pretend").queued, health("pretend").done) == (4, 0)
    queue.cancel(ids[0])
    queue.cancel(later)
    assert health("pretend").queued == 2
    for _ in range(2):
        queue.submit("flaky", seconds=0, fail_rate=1)
    shaky = queue.submit("shaky", seconds=0, fail_rate=1)  # tried again after 1 s
    _worker(rq_app).work(burst=True, logging_level="ERROR")
    pretend, flaky = health("pretend"), health("flaky")
    assert (pretend.queued, pretend.running, pretend.done, pretend.failed) == (0, 0, 2, 0)
    assert pretend.run_p50 is not None and pretend.wait_p95 is not None
    assert (flaky.queued, flaky.done, flaky.failed, flaky.failure_rate) == (0, 0, 2, 1.0)
    assert queue.get(shaky).state is State.SCHEDULED
    assert (health("shaky").queued, health("shaky").failed) == (1, 0)  # waits for attempt 2
    queue.reset()
    assert (health("pretend").done, health("flaky").failed, health("shaky").queued) == (0, 0, 1)
    assert rq_app.test_client().get("/api/kinds").get_json()["kinds"][0]["kind"] == "flaky"


def test_the_worker_count_is_not_the_pages_to_change(rq_app):
    client = rq_app.test_client()
    reply = client.post("/api/workers", json={"count": 3})
    assert reply.status_code == 409
    assert "process manager" in reply.get_json()["error"]


def test_healthz_needs_redis_and_a_worker_with_a_fresh_heartbeat(rq_app, redis_url):
    client = rq_app.test_client()
    reply = client.get("/healthz")
    assert reply.status_code == 503 and b"no RQ worker" in reply.data
    worker = _worker(rq_app)
    worker.register_birth()
    worker.heartbeat()
    try:
        assert client.get("/healthz").status_code == 200
    finally:
        worker.register_death()


def test_healthz_says_when_redis_does_not_answer(tmp_path):
    from dashboard import create_app

    app = create_app({"TESTING": True, "QUEUE_URL": f"unix://{tmp_path}/nothing.sock"})
    reply = app.test_client().get("/healthz")
    assert reply.status_code == 503 and b"does not answer" in reply.data


def _foreign_jobs(queue_name: str, connection: Any, marker: Path) -> dict[str, str]:
    """Jobs of every shape a stranger with access to Redis could write: their ids."""
    from rq import Queue
    from rq.job import Callback
    from rq.serializers import JSONSerializer

    json_queue = Queue(queue_name, connection=connection, serializer=JSONSerializer)
    pickle_queue = Queue(queue_name, connection=connection)  # RQ's default: a pickle
    command = f"touch {marker}"
    return {
        "os.system": json_queue.enqueue("os.system", command).id,
        "pickled": pickle_queue.enqueue("os.system", command).id,
        "a callback": json_queue.enqueue("dashboard.rq.run_task", "pretend", {},
                                         on_success=Callback("os.system")).id,
        "other args": json_queue.enqueue("dashboard.rq.run_task", command).id,
    }


def test_a_job_not_ours_is_refused_and_nothing_of_it_runs(rq_app, tmp_path):
    from dashboard import get_queue

    queue = get_queue(rq_app)
    marker = tmp_path / "pwned"
    jobs = _foreign_jobs(queue.name, queue.connection, marker)
    ours = queue.submit("pretend", seconds=0)
    worker = _worker(rq_app)
    worker.work(burst=True, logging_level="WARNING")
    assert not marker.exists()
    for what, job_id in jobs.items():
        info = queue.get(job_id)
        assert info.state is State.FAILED, what
        assert info.error.startswith("refused: "), (what, info.error)
    assert "'os.system' is not dashboard.rq.run_task" in queue.get(jobs["os.system"]).error
    assert queue.get(ours).state is State.DONE  # and the worker went on
    assert queue.stats().failed == len(jobs)


def test_every_view_uses_only_the_seam_on_rq(rq_app, monkeypatch):
    from dashboard import get_queue
    from dashboard.ext import QueueExtension
    from test_backend_seam import SeamOnly

    queue = get_queue(rq_app)
    failed = queue.submit("flaky", seconds=0, fail_rate=1)
    _worker(rq_app).work(burst=True, logging_level="WARNING")
    waiting = queue.submit("pretend", seconds=0)
    real = QueueExtension.queue_for
    monkeypatch.setattr(QueueExtension, "queue_for", lambda self, a: SeamOnly(real(self, a)))
    client = rq_app.test_client()
    htmx = {"HX-Request": "true"}
    for path in ("/", "/?present=1", "/live", "/live/counts", "/live/workers", "/healthz",
                 f"/tasks/{failed}", f"/tasks/{waiting}/live", "/api/stats",
                 f"/api/tasks/{failed}", "/metrics"):
        for headers in (htmx, {}):
            reply = client.get(path, headers=headers)
            assert reply.status_code != 500, (path, reply.data[:300])
    for path, kwargs in [
        ("/api/tasks", {"json": {"kind": "pretend", "count": 2, "params": {"seconds": 0}}}),
        ("/tasks", {"data": {"kind": "pretend", "count": "1"}, "headers": htmx}),
        (f"/api/tasks/{waiting}/cancel", {}), (f"/api/tasks/{failed}/retry", {}),
        ("/pause", {"data": {}}), ("/resume", {"data": {}, "headers": htmx}),
        ("/api/pause", {}), ("/api/resume", {}), ("/workers", {"data": {"delta": "1"}}),
        ("/history/clear", {"data": {}}), ("/reset", {"data": {}, "headers": htmx}),
    ]:
        reply = client.post(path, **kwargs)
        assert reply.status_code < 500, (path, reply.status_code, reply.data[:300])


# -- worker processes ----------------------------------------------------------------------


class RQCluster:
    """Web servers and `flask queue worker` processes of the counting app on one Redis."""

    def __init__(self, tmp_path: Path, redis_url: str):
        self.tmp_path = tmp_path
        self.url = redis_url
        self.counts = CountLog(tmp_path / "count.log")
        self.started: list[Server] = []

    def _env(self, **settings: str) -> dict[str, str]:
        return server_env({"FLASK_QUEUE_URL": self.url, "COUNT_LOG": str(self.counts.path),
                           "PYTHONPATH": str(APPS), "FLASK_QUEUE_MAX_BATCH": "100",
                           **settings})

    def web(self, **settings: str) -> Server:
        port = free_port()
        env = self._env(BIND=f"{HOST}:{port}", WEB_CONCURRENCY="1", **settings)
        args = [str(BIN / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py"), "--pythonpath",
                str(APPS), APP]
        return self._start(f"web-{len(self.started)}", args, env, port)

    def worker(self, *extra: str) -> Server:
        args = [str(BIN / "flask"), "--app", APP, "queue", "worker", *extra]
        return self._start(f"worker-{len(self.started)}", args, self._env(), 0)

    def _start(self, name: str, args: list[str], env: dict[str, str], port: int) -> Server:
        server = Server(name, args, self.tmp_path / f"{name}.log", env, port)
        self.started.append(server)
        return server.start()

    def stop(self) -> None:
        for server in self.started:
            server.stop()


@pytest.fixture
def rq_cluster(tmp_path, redis_url) -> Iterator[RQCluster]:
    made = RQCluster(tmp_path, redis_url)
    try:
        yield made
    finally:
        made.stop()


def _backend(redis_url: str):
    """The counting app's queue, read from this process as a web process would: its RQ
    queue, with a registry that checks the count kind's params (the kind itself runs in
    the worker processes; importing tests/apps/counting here would add it to the
    registry every other test shares)."""
    from dashboard import Float, Registry
    from dashboard.rq import RQBackend

    registry = Registry()

    @registry.task("count", params={"seconds": Float(0, 60)})
    def count(ctx, seconds=0.0):
        raise AssertionError("runs in the worker processes only")

    return RQBackend(redis_url, registry, name="dashboard")  # (counting's app.name)


def _live_workers(queue, count: int, state: str | None = None) -> list:
    from rq import Worker
    from rq.serializers import JSONSerializer

    def ready():
        workers = Worker.all(queue=queue.rq_queue, serializer=JSONSerializer)
        if len(workers) == count and (state is None
                                      or all(w.get_state() == state for w in workers)):
            return workers
        return None

    return wait_for(ready, 60, f"{count} RQ worker(s){' ' + state if state else ''}")


def test_pause_holds_workers_already_waiting_on_the_queue(rq_cluster, redis_url):
    """rq#526: with RQ's suspension alone, a worker blocked on the queue when the pause
    comes takes the next job anyway. Ours put it back: nothing starts while paused."""
    queue = _backend(redis_url)
    workers = [rq_cluster.worker(), rq_cluster.worker()]
    _live_workers(queue, 2, "idle")  # each blocked on the queue, waiting for a job
    queue.pause()
    ids = queue.submit_many("count", 10, {"seconds": 0})
    # Each worker wakes with a job, puts it back, and waits out the pause.
    _live_workers(queue, 2, "suspended")
    assert rq_cluster.counts.events() == []
    snap = queue.stats(0, 10)
    assert (snap.queued, snap.running, snap.done) == (10, 0, 0)
    assert [t.id for t in snap.upcoming] == ids  # in order, none lost
    queue.resume()
    wait_for(lambda: queue.stats().done == 10, 60, "the 10 tasks to run once resumed")
    assert rq_cluster.counts.count("start") == {i: 1 for i in ids}
    assert any("put back in its place" in w.log() for w in workers)  # the leak was met


def test_a_killed_worker_s_task_is_failed_as_abandoned(rq_cluster, redis_url):
    from dashboard.rq import WORKER_TIMEOUT

    queue = _backend(redis_url)
    web = rq_cluster.web()
    worker = rq_cluster.worker()
    _live_workers(queue, 1, "idle")
    task_id = queue.submit("count", seconds=60)
    wait_for(lambda: rq_cluster.counts.count("start").get(task_id), 60, "the task to start")
    horse = wait_for(lambda: [p for p in _children(worker.pid)], 10, "its work horse")
    for pid in (worker.pid, *horse):  # the machine went away: the worker and its horse
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    web.wait_ready()

    def ended() -> dict[str, Any] | None:  # as the task's page shows it
        reply = web.request("GET", f"/api/tasks/{task_id}")
        return reply.body if reply.body["state"] != "running" else None

    info = wait_for(ended, 60, "the page to show the task ended")
    assert info["state"] == "failed" and info["error"].startswith("abandoned: ")
    # Stated in docs/rq.md: within WORKER_TIMEOUT of the last heartbeat, found by the
    # next sweep (every 2 s); a generous bound only fails a far slower machine.
    assert time.monotonic() - killed < WORKER_TIMEOUT + 20
    wait_for(lambda: not _stats(web)["workers"], 60, "the dead worker to leave the page")
    assert _stats(web)["failed"] == 1


def test_a_task_whose_work_horse_is_killed_fails_at_once_and_the_worker_goes_on(
        rq_cluster, redis_url):
    queue = _backend(redis_url)
    worker = rq_cluster.worker()
    _live_workers(queue, 1, "idle")
    task_id = queue.submit("count", seconds=60)
    wait_for(lambda: rq_cluster.counts.count("start").get(task_id), 60, "the task to start")
    for pid in wait_for(lambda: _children(worker.pid), 10, "its work horse"):
        os.kill(pid, signal.SIGKILL)
    info = wait_for(lambda: (i := queue.get(task_id)) and i.finished and i, 60,
                    "the task to be failed")
    assert info.state is State.FAILED and "its process died" in info.error
    after = queue.submit("count", seconds=0)
    wait_for(lambda: queue.get(after).state is State.DONE, 60, "the next task to run")


def test_stop_kills_a_running_task_and_it_ends_cancelled(rq_cluster, redis_url):
    queue = _backend(redis_url)
    rq_cluster.worker()
    _live_workers(queue, 1, "idle")
    task_id = queue.submit("count", seconds=60)
    wait_for(lambda: rq_cluster.counts.count("start").get(task_id), 60, "the task to start")
    reply = rq_cluster.web().wait_ready() and None
    web = rq_cluster.started[-1]
    reply = web.request("POST", f"/api/tasks/{task_id}/stop")
    assert reply.status == 202 and reply.body == {"id": str(task_id), "stopping": True}
    info = wait_for(lambda: (i := queue.get(task_id)) and i.finished and i, 60,
                    "the task to stop")
    assert info.state is State.CANCELLED and "stopped by force" in info.error
    assert not rq_cluster.counts.count("end").get(task_id)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and parent_pid(int(entry)) == pid:
            found.append(int(entry))
    return found


def _stats(server: Server) -> dict[str, Any] | None:
    try:
        reply = server.request("GET", "/api/stats")
    except (OSError, http.client.HTTPException):
        return None
    return reply.body if reply.status == 200 else None


def test_two_web_and_two_worker_processes_run_500_tasks_once_and_agree(rq_cluster,
                                                                         redis_url):
    webs = [rq_cluster.web(), rq_cluster.web()]
    for web in webs:
        web.wait_ready()
    workers = [rq_cluster.worker(), rq_cluster.worker()]
    submitted: list[int] = []
    for batch in range(10):  # 500 over HTTP, half through each web process
        web = webs[batch % 2]
        reply = web.request("POST", "/api/tasks", {"kind": "count", "count": 50,
                                                   "params": {"seconds": 0}})
        assert reply.status == 202, reply.body
        submitted += reply.body["ids"]
    assert len(set(submitted)) == 500
    wait_for(lambda: (s := _stats(webs[0])) and s["done"] == 500, 240, "500 tasks done")
    starts, ends = rq_cluster.counts.count("start"), rq_cluster.counts.count("end")
    assert starts == {i: 1 for i in submitted} and ends == starts  # each exactly once
    views = [_stats(web) for web in webs]
    keys = ("queued", "running", "done", "failed", "cancelled", "submitted", "paused")
    assert [tuple(v[k] for k in keys) for v in views] == [(0, 0, 500, 0, 0, 500, False)] * 2
    assert {w["name"] for w in views[0]["workers"]} == {w["name"] for w in views[1]["workers"]}
    assert len(views[0]["workers"]) == 2
    # Both worker processes took a share (each horse records its own pid, so count by
    # the worker named on each finished task instead).
    queue = _backend(redis_url)
    names = {queue.get(i).worker for i in submitted[-100:]}
    assert len(names) == 2, names
    for worker in workers:
        assert worker.members(), worker.log_tail()


def test_the_plain_rq_worker_line_in_the_docs_runs_our_tasks(redis_url, tmp_path):
    """The RQ guide's `rq worker ...` line (docs/rq.md), run as written (with --burst):
    a task of ours runs."""
    import re
    import subprocess

    guide = (ROOT / "docs" / "rq.md").read_text()
    line = re.search(r"FLASK_APP='yourapp:create_app\(\)' rq worker (.+?)\n```", guide, re.S)
    assert line, "the RQ guide's rq worker line"
    args = line.group(1).replace("\\\n", " ").split()
    args = [redis_url if a == "redis://localhost:6379/0" else a for a in args]
    assert args[-1] == "yourapp"
    queue = _backend(redis_url)
    task_id = queue.submit("count", seconds=0)
    env = server_env({"FLASK_APP": "counting:create_app()", "FLASK_QUEUE_URL": redis_url,
                      "PYTHONPATH": os.pathsep.join([str(APPS), str(ROOT)]),
                      "COUNT_LOG": str(tmp_path / "count.log")})
    done = subprocess.run([str(BIN / "rq"), "worker", *args[:-1], "--burst", queue.name],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert queue.get(task_id).state is State.DONE


def test_the_task_signals_are_sent_as_the_app_where_each_event_happens(rq_app):
    from dashboard import (get_queue, task_cancelled, task_failed, task_started,
                           task_submitted, task_succeeded)

    heard: list[tuple[str, Any, str]] = []

    def listen(name):
        def handler(sender, task, **extra):
            heard.append((name, task.id, task.state.value))
        return handler

    handlers = {name: listen(name) for name in ("submitted", "started", "succeeded",
                                                "failed", "cancelled")}
    for sent, name in ((task_submitted, "submitted"), (task_started, "started"),
                         (task_succeeded, "succeeded"), (task_failed, "failed"),
                         (task_cancelled, "cancelled")):
        sent.connect(handlers[name], sender=rq_app)
    queue = get_queue(rq_app)
    ok = queue.submit("pretend", seconds=0)
    bad = queue.submit("flaky", seconds=0, fail_rate=1)
    gone = queue.submit("pretend", seconds=0)
    queue.cancel(gone)
    _worker(rq_app).work(burst=True, logging_level="WARNING")
    assert ("submitted", ok, "queued") in heard and ("submitted", bad, "queued") in heard
    assert ("cancelled", gone, "cancelled") in heard
    assert ("started", ok, "running") in heard and ("started", bad, "running") in heard
    assert ("succeeded", ok, "done") in heard and ("failed", bad, "failed") in heard
    assert len(heard) == 8  # each once


def test_stop_is_refused_naming_why_where_a_backend_cannot(client):
    task_id = client.post("/api/tasks", json={"kind": "pretend"}).get_json()["ids"][0]
    reply = client.post(f"/api/tasks/{task_id}/stop")
    assert reply.status_code == 400
    assert reply.get_json()["error"].startswith("stop is not available with this backend")


def test_the_cli_and_metrics_read_the_same_queue(rq_app):
    import json

    from dashboard import get_queue

    queue = get_queue(rq_app)
    runner = rq_app.test_cli_runner()
    added = runner.invoke(args=["queue", "submit", "pretend", "--count", "3", "-p", "seconds=0"])
    assert added.exit_code == 0, added.output
    _worker(rq_app).work(burst=True, logging_level="WARNING")
    status = runner.invoke(args=["queue", "status", "--json"])
    assert status.exit_code == 0 and json.loads(status.output)["done"] == 3
    refused = runner.invoke(args=["queue", "workers", "3"])
    assert refused.exit_code == 1 and "process manager" in refused.output
    scrape = rq_app.test_client().get("/metrics").get_data(as_text=True)
    assert 'queue_tasks_done_total{kind="pretend"} 3.0' in scrape, scrape[:2000]
    assert queue.metrics().kinds[0].run.count == 3
