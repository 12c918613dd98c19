"""Shared fixtures, in the shape of Flask's tutorial tests: an app from the
factory with test config, a client, and a check that no test leaks threads."""

from __future__ import annotations

import os
import threading
import time

import pytest

from dashboard import create_app, get_queue
from dashboard.tasks import Registry
from dashboard.local.queue import WorkQueue

from redis_server import RedisServer, unavailable as redis_unavailable

# The browser fixtures are a plugin, so the session-wide Chromium (and its one
# Playwright loop) is shared by every module instead of started once per module
# that imports it: a second sync Playwright in the same thread fails.
pytest_plugins = ["browser"]


#: Environment variables that change what the app does: Flask's ``FLASK_*`` (every
#: setting of ours can be given so) and the markers the app leaves for itself.
_APP_ENV_PREFIXES = ("FLASK_", "DASHBOARD_")


@pytest.fixture(autouse=True)
def standard_environ(monkeypatch):
    """No test sees settings exported in the shell that runs it (as Flask's own
    ``_standard_os_environ`` does): ``FLASK_QUEUE_ACCESS_TOKEN`` there would make every
    request 401. Each is removed for the test and restored afterwards, and what
    the test (or the app) set is removed too: the exposure warning marks the
    environment, which would silence that warning in the next test."""
    for key in list(os.environ):
        if key.startswith(_APP_ENV_PREFIXES):
            monkeypatch.delenv(key)
    # No scheduler thread unless a test asks for one: the demo's nightly schedule
    # must not add a task to whatever test spans 03:00 UTC.
    monkeypatch.setenv("FLASK_QUEUE_SCHEDULES", "false")
    yield
    for key in list(os.environ):
        if key.startswith(_APP_ENV_PREFIXES):
            del os.environ[key]


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail a test that leaves queue threads running (every queue must be shut down)."""
    before = set(threading.enumerate())
    yield
    def leaked():
        return [
            t for t in threading.enumerate()
            if t not in before and t.is_alive() and ("worker-" in t.name or "supervisor" in t.name
                                                     or "scheduler" in t.name)
        ]
    # Threads finishing a shutdown may need a moment to end: wait, with a deadline.
    deadline = time.monotonic() + 5
    while leaked() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not leaked(), f"test left queue threads running: {[t.name for t in leaked()]}"


@pytest.fixture
def app():
    """The demo app with no worker threads: tests run tasks with run_pending()."""
    app = create_app({"TESTING": True, "QUEUE_WORKERS": 0, "QUEUE_HANDLE_SIGNALS": False, "QUEUE_WORK_TIME": 0})
    yield app
    get_queue(app).shutdown(timeout=5)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def queue(app):
    return get_queue(app)


@pytest.fixture
def registry():
    """A private registry, so engine tests never touch the demo kinds."""
    return Registry()


@pytest.fixture
def make_app(tmp_path):
    """``make_app(**config)``: a test app with no worker threads, shut down at the end.
    ``store="sqlite"`` puts its queue in a file of this test's own."""
    made = []

    def make(store="memory", **config):
        if store == "sqlite":
            config["QUEUE_URL"] = f"sqlite:///{tmp_path / f'queue-{len(made)}.db'}"
        app = create_app({"TESTING": True, "QUEUE_WORKERS": 0, "QUEUE_HANDLE_SIGNALS": False,
                          "QUEUE_WORK_TIME": 0, **config})
        made.append(app)
        return app

    yield make
    for app in made:
        get_queue(app).shutdown()


@pytest.fixture
def db(tmp_path):
    """The path of a SQLite queue file of this test's own."""
    return str(tmp_path / "queue.db")


@pytest.fixture
def queues(registry):
    """``queues(store, workers=0, **kwargs)``: WorkQueues on the private registry,
    each shut down at the end of the test."""
    made = []

    def make(store=None, workers=0, **kwargs):
        q = WorkQueue(workers, registry=registry, store=store, **kwargs)
        made.append(q)
        return q

    yield make
    for q in made:
        q.shutdown(timeout=5)


@pytest.fixture(scope="session")
def redis_server():
    """One private ``redis-server`` (tests/redis_server.py) for the session. Without
    redis-server or the redis and rq packages: fail under CI=true (CI must run the
    Redis tests), else skip, saying how to get them."""
    from browser import is_ci  # (the plugin above: imported here, after pytest loaded it)

    missing = redis_unavailable()
    if missing is not None:
        if is_ci():
            pytest.fail(f"CI=true and {missing}", pytrace=False)
        pytest.skip(missing)
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server):
    """The session's Redis, emptied (FLUSHALL) for this test: its URL."""
    with redis_server.client() as redis:
        redis.flushall()
    return redis_server.url
