"""Shared fixtures, in the shape of Flask's tutorial tests: an app from the
factory with test config, a client, and a check that no test leaks threads."""

from __future__ import annotations

import threading
import time
import pytest

from dashboard import create_app, get_queue
from dashboard.tasks import Registry

# The browser fixtures are a plugin, so the session-wide Chromium (and its one
# Playwright loop) is shared by every module instead of started once per module
# that imports it: a second sync Playwright in the same thread fails.
pytest_plugins = ["browser"]


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail a test that leaves queue threads running (every queue must be shut down)."""
    before = set(threading.enumerate())
    yield
    def leaked():
        return [
            t for t in threading.enumerate()
            if t not in before and t.is_alive() and ("worker-" in t.name or "supervisor" in t.name)
        ]
    # Threads finishing a shutdown may need a moment to end: wait, with a deadline.
    deadline = time.monotonic() + 5
    while leaked() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not leaked(), f"test left queue threads running: {[t.name for t in leaked()]}"


@pytest.fixture
def app():
    """The demo app with no worker threads: tests run tasks with run_pending()."""
    app = create_app({"TESTING": True, "WORKERS": 0, "HANDLE_SIGNALS": False, "WORK_TIME": 0})
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
