"""``flask queue ...``: every command through click's runner, and for real.

Through ``app.test_cli_runner()`` on a SQLite store (the commands act on the
file, as any process sharing it does): each command's effect and words, the
API's messages for a refused submit (exit 1, nothing queued), usage errors
(exit 2), and the in-memory store's one line pointing at ``--server``.

For real, as subprocesses: ``flask --app dashboard queue submit`` against a
running gunicorn on the same SQLite file, the server runs the tasks, and
``queue wait`` returns 0; ``--server`` against gunicorn with the in-memory
store and an access token; ``queue worker`` running the work of web
processes that run none (``QUEUE_RUN_WORKERS=false``), stopped by SIGTERM
after its running task finished; ``queue watch`` under a pseudo-terminal
(redrawn in place) and piped (a line per change).
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from dashboard import create_app, get_queue
from servers import BIN, HOST, ROOT, CountLog, Server, free_port, server_env
from support import wait_for

APPS = ROOT / "tests" / "apps"
TOKEN = "cli-secret-0123456789"


@pytest.fixture
def app(tmp_path):
    app = create_app({"TESTING": True, "QUEUE_WORKERS": 0, "QUEUE_HANDLE_SIGNALS": False,
                      "QUEUE_WORK_TIME": 0, "QUEUE_URL": f"sqlite:///{tmp_path / 'q.db'}"})
    yield app
    get_queue(app).shutdown(timeout=5)


@pytest.fixture
def cli(app):
    runner = app.test_cli_runner()

    def invoke(*args: str):
        return runner.invoke(args=["queue", *args])

    return invoke


def test_status_says_the_counts_and_json_gives_them_all(app, cli):
    queue = get_queue(app)
    queue.submit("pretend", seconds=0)
    queue.submit("flaky", seconds=0, fail_rate=1)
    queue.run_pending()
    queue.submit("pretend", seconds=0)
    result = cli("status")
    assert result.exit_code == 0, result.output
    assert "queue in a SQLite file shared by every process" in result.output
    assert "queued 1   scheduled 0   running 0" in result.output
    assert "done 1   failed 1   cancelled 0   submitted 3" in result.output
    data = json.loads(cli("status", "--json").output)
    assert (data["queued"], data["done"], data["failed"], data["paused"]) == (1, 1, 1, False)
    assert data["recent"][0]["kind"] == "flaky"


def test_submit_checks_like_the_api_and_queues(app, cli):
    queue = get_queue(app)
    result = cli("submit", "pretend", "--param", "seconds=1.5", "--count", "3")
    assert result.exit_code == 0, result.output
    ids = [t.id for t in queue.stats(upcoming=10).upcoming]
    assert len(ids) == 3 and result.output.startswith("queued 3 task(s) of pretend: #")
    assert all(queue.get(i).params == {"seconds": 1.5} for i in ids)
    # Refused with the API's words, exit 1, nothing queued.
    for args, says in [
        (("pretend", "-p", "seconds=999"), "seconds must be a number from 0 to 600, got 999.0"),
        (("nope",), "kind must be one of: flaky, pretend, primes, shaky; got 'nope'"),
        (("pretend", "-p", "colour=red"), "colour is not a parameter of 'pretend'"),
        (("pretend", "-n", "0"), "count must be an integer from 1 to"),
        (("pretend", "--key", "k", "-n", "2"), "count must be 1 with a key"),
        (("pretend", "--delay", "-1"), "delay must be a number of seconds from 0"),
    ]:
        refused = cli("submit", *args)
        assert refused.exit_code == 1, (args, refused.output)
        assert says in refused.output, (args, refused.output)
    assert queue.stats().submitted == 3
    # Usage mistakes are exit 2.
    assert cli("submit").exit_code == 2
    bad = cli("submit", "pretend", "-p", "seconds")
    assert bad.exit_code == 2 and "must be NAME=VALUE" in bad.output


def test_submit_with_a_delay_schedules_and_with_a_key_queues_once(app, cli):
    queue = get_queue(app)
    result = cli("submit", "pretend", "--delay", "60")
    assert result.exit_code == 0 and "due in 60s" in result.output
    assert queue.stats().scheduled == 1
    first = cli("submit", "pretend", "--key", "report-42")
    again = cli("submit", "pretend", "--key", "report-42")
    assert first.exit_code == again.exit_code == 0
    task_id = int(first.output.split("#")[1].split()[0])
    assert again.output.strip() == f"nothing queued: task #{task_id} holds the key 'report-42'"
    assert queue.stats().queued == 1


def test_pause_resume_workers_cancel_retry_and_clear(app, cli):
    queue = get_queue(app)
    assert cli("pause").exit_code == 0 and queue.stats().paused
    assert cli("resume").output.strip() == "resumed" and not queue.stats().paused
    result = cli("workers", "3")
    assert result.output.strip() == "workers: 3 per process"
    assert queue.store.workers_target() == 3
    assert cli("workers", "0").exit_code == 1  # 1..QUEUE_MAX_WORKERS, as the API says
    task_id = queue.submit("pretend", seconds=0)
    assert cli("cancel", str(task_id)).output.strip() == f"task {task_id}: cancelled"
    again = cli("cancel", f"#{task_id}")
    assert again.exit_code == 1 and "only scheduled, queued or running tasks" in again.output
    retried = cli("retry", str(task_id))
    new_id = queue.get(task_id).retried_as
    assert retried.output.strip() == f"task {task_id}: retried as #{new_id}"
    assert "retried already" in cli("retry", str(task_id)).output
    assert cli("cancel", "999999").exit_code == 1
    queue.run_pending()
    assert cli("clear").output.strip() == "forgot 2 finished task(s)"
    assert queue.get(task_id) is None


def test_wait_says_whether_the_queue_emptied_in_time(app, cli):
    queue = get_queue(app)
    queue.submit("pretend", seconds=0)
    late = cli("wait", "--timeout", "0.2")
    assert late.exit_code == 1 and "still 1 queued and 0 running after 0.2s" in late.output
    queue.run_pending()
    done = cli("wait", "--timeout", "5")
    assert done.exit_code == 0 and done.output.startswith("idle: nothing queued or running")


def test_with_the_memory_store_the_commands_point_at_server():
    app = create_app({"TESTING": True, "QUEUE_WORKERS": 0, "QUEUE_HANDLE_SIGNALS": False})
    try:
        result = app.test_cli_runner().invoke(args=["queue", "status"])
        assert result.exit_code == 1
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "give --server URL" in lines[0], result.output
        worker = app.test_cli_runner().invoke(args=["queue", "worker"])
        assert worker.exit_code == 1 and "Use a shared store" in worker.output
    finally:
        get_queue(app).shutdown(timeout=5)


def test_watch_piped_prints_a_line_per_change(app, cli):
    get_queue(app).submit("pretend", seconds=0)
    result = cli("watch", "--count", "3", "--interval", "0.1")
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1  # nothing changed between the looks: one line
    assert lines[0].endswith("queued=1 scheduled=0 running=0 done=0 failed=0 cancelled=0")


# -- the operator's view: find, bulk, kinds ----------------------------------------------


@pytest.fixture
def shared_memory(monkeypatch):
    """An in-memory queue the commands may act on, as they do on a shared store: the
    operator's commands against a store that can search (``cli`` and the queue)."""
    from dataclasses import replace

    from dashboard.local.queue import WorkQueue

    app = create_app({"TESTING": True, "QUEUE_WORKERS": 0, "QUEUE_HANDLE_SIGNALS": False,
                      "QUEUE_WORK_TIME": 0})
    real = WorkQueue.capabilities
    monkeypatch.setattr(WorkQueue, "capabilities",
                        property(lambda self: replace(real.fget(self), shared=True)))
    runner = app.test_cli_runner()
    try:
        yield (lambda *args, input=None: runner.invoke(args=["queue", *args], input=input)), \
            get_queue(app)
    finally:
        get_queue(app).shutdown(timeout=5)


def test_find_lists_what_the_filter_matches_a_page_at_a_time(shared_memory):
    cli, queue = shared_memory
    failed = queue.submit_many("flaky", 3, {"seconds": 0, "fail_rate": 1})
    done = queue.submit_many("pretend", 2, {"seconds": 0})
    queue.run_pending()
    result = cli("find", "--state", "failed", "--kind", "flaky", "--limit", "2")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert [int(line.split()[0][1:]) for line in lines[:2]] == sorted(failed, reverse=True)[:2]
    assert "flaky task gave up" in lines[0]
    assert lines[2] == "2 of 3 shown (failed, of kind flaky, newest first)"
    cursor = lines[3].removeprefix("more: --cursor ")
    rest = cli("find", "--state", "failed", "--kind", "flaky", "--cursor", cursor)
    assert int(rest.output.split()[0][1:]) == min(failed)
    data = json.loads(cli("find", "--text", "GAVE", "--oldest", "--json").output)
    assert [t["id"] for t in data["tasks"]] == failed and data["count"] == 3
    assert [t["id"] for t in json.loads(cli("find", "--state", "done", "--json").output)[
        "tasks"]] == sorted(done, reverse=True)
    assert cli("find", "--state", "running").output.strip() == "no task matches (running)"
    # Refused with the API's words (exit 1); a state that is none is a usage mistake (2).
    for args, says in [(("--kind", "nope"), "kind must be one of: flaky, pretend"),
                       (("--text", "x" * 201), "text must be at most 200 characters"),
                       (("--cursor", "zz"), "cursor is not one this list gave out")]:
        refused = cli("find", *args)
        assert refused.exit_code == 1 and says in refused.output, (args, refused.output)
    assert cli("find", "--state", "nope").exit_code == 2


def test_bulk_asks_first_says_what_it_did_and_kinds_shows_each_kinds_health(shared_memory):
    cli, queue = shared_memory
    failed = queue.submit_many("flaky", 3, {"seconds": 0, "fail_rate": 1})
    queue.run_pending()
    declined = cli("bulk", "retry", "--kind", "flaky", input="n\n")
    assert declined.exit_code == 1 and "nothing done" in declined.output
    assert ("Retry 3 failed or cancelled tasks of kind flaky (the queue in this process's "
            "memory)? [y/N]") in declined.output
    assert all(queue.get(i).retried_as is None for i in failed)
    retried = cli("bulk", "retry", "--kind", "flaky", input="y\n")
    assert retried.exit_code == 0, retried.output
    assert retried.output.strip().splitlines()[-1].startswith("3 tasks retried as #")
    assert all(queue.get(i).retried_as is not None for i in failed)
    assert cli("bulk", "retry", "--kind", "flaky").output.strip() == \
        "no task to retry (of kind flaky)"
    cancelled = cli("bulk", "cancel", "--yes")
    assert cancelled.output.strip() == "3 tasks cancelled" and queue.stats().queued == 0
    assert cli("bulk", "explode").exit_code == 2

    kinds = cli("kinds")
    assert kinds.exit_code == 0, kinds.output
    lines = kinds.output.strip().splitlines()
    assert lines[0].split() == ["kind", "queued", "running", "done/h", "failed/h", "fail%",
                                "run", "p50", "run", "p95", "wait", "p95"]
    flaky = next(line for line in lines if line.startswith("flaky "))
    assert flaky.split()[1:6] == ["0", "0", "0", "3", "100%"]
    data = json.loads(cli("kinds", "--json").output)
    assert [k["kind"] for k in data["kinds"]] == ["flaky", "pretend", "primes", "shaky"]


def test_the_operators_commands_say_when_the_store_cannot_search(app, cli, monkeypatch):
    from dataclasses import replace

    from dashboard.local.queue import WorkQueue

    real = WorkQueue.capabilities
    monkeypatch.setattr(WorkQueue, "capabilities", property(lambda self: replace(
        real.fget(self), search=False, text_search=False, kind_health=False)))
    for args in (("find",), ("bulk", "purge", "--yes")):
        refused = cli(*args)
        assert refused.exit_code == 1
        assert "search is not available with this backend (the queue in a SQLite file" \
            in refused.output
    refused = cli("kinds")
    assert refused.exit_code == 1 and "each kind's health is not available" in refused.output


# -- for real: subprocesses and servers ------------------------------------------------


class Deployment:
    """gunicorn (tests/apps/counting.py) and ``flask queue`` processes on one SQLite file."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.db = tmp_path / "queue.db"
        self.counts = CountLog(tmp_path / "count.log")
        self.started: list[Server | subprocess.Popen] = []

    def env(self, **settings: str) -> dict[str, str]:
        return server_env({"FLASK_QUEUE_URL": f"sqlite:///{self.db}",
                           "COUNT_LOG": str(self.counts.path), "PYTHONPATH": str(APPS),
                           "FLASK_QUEUE_SHUTDOWN_TIMEOUT": "10", **settings})

    def web(self, **settings: str) -> Server:
        port = free_port()
        args = [str(BIN / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py"),
                "--pythonpath", str(APPS), "counting:create_app()"]
        env = self.env(BIND=f"{HOST}:{port}", WEB_CONCURRENCY="2", **settings)
        server = Server(f"gunicorn-{len(self.started)}", args,
                        self.tmp_path / f"gunicorn-{len(self.started)}.log", env, port)
        self.started.append(server)
        server.start()
        server.wait_ready()
        return server

    def flask(self, *args: str, timeout: float = 60.0, **settings: str
              ) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flask"), "--app", "counting:create_app()", "queue",
                               *args], cwd=ROOT, env=self.env(**settings), text=True,
                              capture_output=True, timeout=timeout)

    def spawn(self, *args: str, **popen) -> subprocess.Popen:
        proc = subprocess.Popen([str(BIN / "flask"), "--app", "counting:create_app()",
                                 "queue", *args], cwd=ROOT, env=self.env(), text=True,
                                start_new_session=True, **popen)
        self.started.append(proc)
        return proc

    def stop(self) -> None:
        for started in self.started:
            if isinstance(started, Server):
                started.stop()
            elif started.poll() is None:
                os.killpg(started.pid, signal.SIGKILL)
                started.wait(10)


@pytest.fixture
def deployment(tmp_path) -> Iterator[Deployment]:
    made = Deployment(tmp_path)
    try:
        yield made
    finally:
        made.stop()


@pytest.mark.server
def test_a_submit_from_the_command_line_runs_in_the_server_and_wait_returns_0(deployment):
    server = deployment.web(FLASK_QUEUE_WORKERS="2")
    submitted = deployment.flask("submit", "count", "-p", "seconds=0.2", "-n", "5")
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.startswith("queued 5 task(s) of count: #")
    waited = deployment.flask("wait", "--timeout", "60")
    assert waited.returncode == 0, waited.stderr
    stats = server.stats()
    assert (stats["done"], stats["queued"], stats["running"]) == (5, 0, 0)
    ran_in = {pid for _, pid, event in deployment.counts.events() if event == "end"}
    assert ran_in and server.pid not in ran_in  # in the server's worker processes
    status = deployment.flask("status", "--json")
    assert json.loads(status.stdout)["done"] == 5
    refused = deployment.flask("submit", "count", "-p", "seconds=61")
    assert refused.returncode == 1
    assert "seconds must be a number from 0 to 60, got 61.0" in refused.stderr


@pytest.mark.server
def test_server_acts_through_the_api_of_a_server_with_the_memory_store(tmp_path):
    port = free_port()
    args = [str(BIN / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py")]
    env = server_env({"BIND": f"{HOST}:{port}", "WEB_CONCURRENCY": "1",
                      "FLASK_QUEUE_ACCESS_TOKEN": TOKEN, "FLASK_QUEUE_WORK_TIME": "0.05"})
    server = Server("gunicorn", args, tmp_path / "gunicorn.log", env, port)
    server.start()
    try:
        url = f"http://{HOST}:{port}"
        cli_env = server_env({})

        def flask(*words: str) -> subprocess.CompletedProcess:
            return subprocess.run([str(BIN / "flask"), "--app", "dashboard", "queue", *words],
                                  cwd=ROOT, env=cli_env, text=True, capture_output=True,
                                  timeout=60)

        wait_for(lambda: flask("status", "--server", url, "--token", TOKEN).returncode == 0,
                 60.0, "the server answers")
        refused = flask("submit", "pretend", "--server", url)
        assert refused.returncode == 1 and "access token" in refused.stderr, refused.stderr
        submitted = flask("submit", "pretend", "-n", "4", "--server", url, "--token", TOKEN)
        assert submitted.returncode == 0, submitted.stderr
        waited = flask("wait", "--timeout", "60", "--server", url, "--token", TOKEN)
        assert waited.returncode == 0, waited.stderr
        stats = json.loads(flask("status", "--json", "--server", url, "--token", TOKEN).stdout)
        assert stats["done"] == 4
        cleared = flask("clear", "--server", url, "--token", TOKEN)
        assert cleared.stdout.strip() == "forgot 4 finished task(s)", cleared.stderr
        assert flask("pause", "--server", url, "--token", TOKEN).returncode == 0
        assert server.request("GET", "/api/stats",
                              headers={"Authorization": f"Bearer {TOKEN}"}).body["paused"]
        gone = flask("status", "--server", f"http://{HOST}:{free_port()}")
        assert gone.returncode == 1 and "cannot reach" in gone.stderr
    finally:
        server.stop()


@pytest.mark.server
def test_find_bulk_and_kinds_act_through_the_api_of_a_server(tmp_path):
    port = free_port()
    args = [str(BIN / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py")]
    env = server_env({"BIND": f"{HOST}:{port}", "WEB_CONCURRENCY": "1",
                      "FLASK_QUEUE_ACCESS_TOKEN": TOKEN, "FLASK_QUEUE_WORKERS": "2"})
    server = Server("gunicorn", args, tmp_path / "gunicorn.log", env, port)
    server.start()
    try:
        url = f"http://{HOST}:{port}"
        auth = {"Authorization": f"Bearer {TOKEN}"}

        def flask(*words: str, input: str | None = None) -> subprocess.CompletedProcess:
            return subprocess.run([str(BIN / "flask"), "--app", "dashboard", "queue", *words,
                                   "--server", url, "--token", TOKEN], cwd=ROOT,
                                  env=server_env({}), text=True, capture_output=True,
                                  timeout=60, input=input)

        wait_for(lambda: flask("status").returncode == 0, 60.0, "the server answers")
        body = {"kind": "flaky", "count": 4, "params": {"seconds": 0, "fail_rate": 1}}
        assert server.request("POST", "/api/tasks", body, headers=auth).status == 202
        assert flask("wait", "--timeout", "60").returncode == 0
        found = flask("find", "--state", "failed", "--json")
        assert found.returncode == 0, found.stderr
        failed = [t["id"] for t in json.loads(found.stdout)["tasks"]]
        assert len(failed) == 4
        declined = flask("bulk", "retry", "--state", "failed", input="n\n")
        assert declined.returncode == 1
        assert f"Retry 4 failed tasks (the queue served by {url})? [y/N]" in declined.stdout
        retried = flask("bulk", "retry", "--state", "failed", input="y\n")
        assert retried.returncode == 0, retried.stderr
        assert "? [y/N]: 4 tasks retried as #" in retried.stdout  # (no echo: not a terminal)
        assert flask("wait", "--timeout", "60").returncode == 0
        kinds = flask("kinds", "--json")
        flaky = next(k for k in json.loads(kinds.stdout)["kinds"] if k["kind"] == "flaky")
        assert flaky["failed"] == 8 and flaky["failure_rate"] == 1.0
        refused = flask("find", "--kind", "nope")
        assert refused.returncode == 1 and "kind must be one of" in refused.stderr
    finally:
        server.stop()


@pytest.mark.server
def test_a_worker_process_runs_the_work_of_web_processes_that_run_none(deployment):
    server = deployment.web(FLASK_QUEUE_RUN_WORKERS="false")
    assert server.stats()["workers"] == []
    worker = deployment.spawn("worker", "--workers", "2", stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    wait_for(lambda: len(server.stats()["workers"]) == 2, 60.0, "the worker process's threads")
    reply = server.request("POST", "/api/tasks", {"kind": "count", "count": 6,
                                                  "params": {"seconds": 0.05}})
    assert reply.status == 202, reply
    ends = deployment.counts.wait_ended(reply.body["ids"])
    assert set(ends) == set(reply.body["ids"])
    assert {pid for _, pid, e in deployment.counts.events() if e == "end"} == {worker.pid}
    # SIGTERM while a task runs: it finishes, the queued one stays in the file.
    long = server.request("POST", "/api/tasks", {"kind": "count", "count": 3,
                                                 "params": {"seconds": 1.0}}).body["ids"]
    wait_for(lambda: deployment.counts.count("start")[long[0]] == 1, 30.0, "a long task runs")
    worker.send_signal(signal.SIGTERM)
    out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, out
    assert "stopped" in out and "Traceback" not in out
    ended = deployment.counts.count("end")
    started = deployment.counts.count("start")
    assert all(ended[i] == started[i] for i in long), "a running task was cut off"
    stats = server.stats()
    assert stats["running"] == 0 and stats["queued"] >= 1  # kept for the next worker


@pytest.mark.server
def test_watch_redraws_in_place_in_a_terminal(deployment):
    deployment.web(FLASK_QUEUE_RUN_WORKERS="false")
    deployment.flask("submit", "count", "-n", "3")
    main, secondary = pty.openpty()
    try:
        proc = deployment.spawn("watch", "--count", "3", "--interval", "0.1",
                                stdout=secondary, stderr=subprocess.DEVNULL)
        os.close(secondary)
        output = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(main, 4096)
                except OSError:  # the process ended and closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(30) == 0
    finally:
        os.close(main)
    text = output.decode()
    assert text.count("\x1b[H") == 3  # three looks, each drawn over the last
    assert "depth      3 [" in text and "no task running" in text
    assert "queued=3 scheduled=0 running=0" in text
