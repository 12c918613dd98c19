"""Every Python example in the docs runs: each page includes a file under
docs/examples/ (or examples/reports/app.py), and these tests import that file and
run what the page shows, so a renamed setting or method breaks a test, not a reader."""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest
from flask import Flask

from dashboard import QueueExtension, State, get_queue

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
TEST_CONFIG = {"TESTING": True, "QUEUE_WORKERS": 0, "QUEUE_HANDLE_SIGNALS": False,
               "QUEUE_SCHEDULES": False}


def _load(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Flask finds an app's templates through its module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tasks_example():
    """docs/examples/tasks.py on an app of its own; tasks run with run_pending()."""
    module = _load(EXAMPLES / "tasks.py", "docs_example_tasks")
    app = Flask("docs_example_tasks")
    app.config.update(TEST_CONFIG)
    QueueExtension(app, registry=module.registry)
    with app.app_context():
        yield module, get_queue(app)
    get_queue(app).shutdown(timeout=5)


def test_every_python_block_in_the_docs_is_an_included_file():
    """No Python a reader would paste is written inline in a page: each is a
    literalinclude of a file that a test here runs."""
    pages = sorted(DOCS.rglob("*.md"))
    inline = [f"{p.relative_to(ROOT)}" for p in pages if "_build" not in p.parts
              and re.search(r"^```(python|py|pycon)\s*$", p.read_text(), re.M)]
    assert not inline, f"inline Python in {inline}: include a file from docs/examples/"
    included = {m for p in pages if "_build" not in p.parts
                for m in re.findall(r"```\{literalinclude\} (\S+)", p.read_text())}
    names = {Path(i).name for i in included}
    assert {"quickstart.py", "tasks.py", "signals.py", "app.py"} <= names, names
    for page in pages:
        for target in re.findall(r"```\{literalinclude\} (\S+)", page.read_text()):
            assert (page.parent / target).resolve().is_file(), f"{page.name}: {target}"


def test_the_includes_markers_exist():
    """Every start-after/end-before marker a page names is in its file."""
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        for target, options in re.findall(
                r"```\{literalinclude\} (\S+)\n((?::[a-z-]+:.*\n)*)", text):
            source = (page.parent / target).resolve().read_text()
            for marker in re.findall(r":(?:start-after|end-before): (.*)", options):
                assert marker.strip().strip("\"") in source, f"{page.name}: {marker} not in {target}"


def test_quickstart_submits_and_runs_a_task():
    module = _load(EXAMPLES / "quickstart.py", "docs_example_quickstart")
    app = module.app
    app.config.update(QUEUE_HANDLE_SIGNALS=False)
    try:
        client = app.test_client()
        answer = client.post("/reports/42")
        assert answer.status_code == 202
        task_id = answer.json["id"]
        with app.app_context():
            assert get_queue(app).result(task_id, timeout=30) == "report-42.pdf"
        page = client.get("/queue/")
        assert page.status_code == 200 and b'id="queue-depth"' in page.data
    finally:
        get_queue(app).shutdown(timeout=5)


def test_results(tasks_example):
    module, queue = tasks_example
    queue.set_workers(1)  # result() waits: a worker thread runs the task meanwhile
    queue.start()
    count, info = module.results()
    assert count == 168
    assert info.state is State.DONE and info.result == 168


def test_delays(tasks_example):
    module, queue = tasks_example
    soon, later, then = module.delays()
    assert queue.get(soon).state is State.SCHEDULED
    assert queue.get(later).state is State.SCHEDULED
    assert queue.get(then).state is State.SCHEDULED


def test_retries(tasks_example):
    module, queue = tasks_example
    task_id = queue.submit("fetch", url="http://127.0.0.1:9/")  # nothing listens: refused
    assert queue.run_pending() == 1
    info = queue.get(task_id)
    assert info.state is State.SCHEDULED, info  # tried again later
    assert info.attempts == 1 and "ConnectionRefusedError" in info.errors[0]["error"]


def test_time_limits(tasks_example):
    module, queue = tasks_example
    assert module.registry.get("render").time_limit == 60
    long_one = module.render_a_long_one()
    short_one = queue.submit("render", pages=5000, time_limit=0.05)
    queue.cancel(long_one)  # not worth waiting for here
    queue.run_pending()
    info = queue.get(short_one)
    assert info.state is State.FAILED and "timed out" in info.error


def test_logs(tasks_example):
    module, queue = tasks_example
    task_id = queue.submit("import_file", path="/tmp/rows.csv")
    queue.run_pending()
    info = queue.get(task_id)
    assert info.state is State.DONE
    assert any("3 rows skipped" in line for line in info.logs), info.logs


def test_unique_keys(tasks_example):
    module, queue = tasks_example
    first, again, submitted = module.unique_keys()
    assert again == first and submitted.id == first and submitted.created is False
    assert queue.stats().queued == 1


def test_periodic_tasks(tasks_example):
    module, queue = tasks_example
    names = {s.name for s in queue.schedules()}
    assert names == {"cleanup", "heartbeat", "weekly-report"}
    task_id = queue.run_schedule("weekly-report")
    queue.run_pending()
    assert queue.get(task_id).result == "report-42.pdf"


def test_signals_send_a_failure_to_the_tracker(monkeypatch):
    sent = []
    fake = types.ModuleType("sentry_sdk")
    fake.capture_exception = lambda exc, **kw: sent.append(("exception", exc, kw))
    fake.capture_message = lambda text, **kw: sent.append(("message", text, kw))
    monkeypatch.setitem(sys.modules, "sentry_sdk", fake)
    module = _load(EXAMPLES / "signals.py", "docs_example_signals")
    app = module.create_app(TEST_CONFIG)
    queue = get_queue(app)
    try:
        with app.app_context():
            task_id = queue.submit("divide", by=0)
            queue.submit("divide", by=2)
            queue.run_pending()
        assert len(sent) == 1
        how, exc, kw = sent[0]
        assert how == "exception" and isinstance(exc, ZeroDivisionError)
        assert kw["tags"] == {"task.kind": "divide"} and kw["extra"]["task.id"] == task_id
    finally:
        queue.shutdown(timeout=5)


def test_the_reports_example_app_orders_a_report(monkeypatch):
    """examples/reports/app.py, which the quickstart includes whole."""
    import logging

    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)  # leave the test's logging be
    module = _load(ROOT / "examples" / "reports" / "app.py", "docs_example_reports")
    app = module.create_app(TEST_CONFIG)
    queue = get_queue(app)
    try:
        client = app.test_client()
        assert b"/reports/42" in client.get("/").data
        ordered = client.post("/reports/42", data={"fmt": "csv"})
        assert ordered.status_code == 303
        task_id = ordered.headers["Location"].rstrip("/").rsplit("/", 1)[-1]
        assert queue.run_pending() == 1
        info = queue.get(task_id)
        assert info.state is State.DONE and info.params == {"user_id": 42, "fmt": "csv"}
        refused = client.post("/reports/42", data={"fmt": "doc"})
        assert refused.status_code == 400 and b"fmt must be one of" in refused.data
    finally:
        queue.shutdown(timeout=5)
