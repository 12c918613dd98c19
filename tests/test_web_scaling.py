"""A backend whose workers are separate processes (RQ's): the page shows − and +
disabled with its one line saying how to scale, the form and the API refuse a new
count with a 409 saying the same, and a worker on another machine is shown as
host:pid. The in-process queue keeps its working − and +."""

from __future__ import annotations

import re

import pytest

from dashboard.backend import Capabilities
from dashboard.ext import QueueExtension
from dashboard.records import WorkerInfo, WorkerState

HTMX = {"HX-Request": "true"}
HINT = "Workers are separate processes: scale them with your process manager."


class Proxy:
    """The in-process queue, answering for the backend named in the subclass."""

    def __init__(self, backend):
        self._backend = backend

    def __getattr__(self, name):
        return getattr(self._backend, name)


class SeparateWorkers(Proxy):
    """A backend whose worker count is set where its workers run."""

    @property
    def capabilities(self):
        return Capabilities(scale_workers=False, shared=True, durable=True, scale_hint=HINT)

    def set_workers(self, count):
        raise AssertionError(f"set_workers({count!r}) was called on a backend that cannot scale")


class RemoteWorker(Proxy):
    """A backend with one worker, on the machine box-1."""

    def stats(self, *args, **kwargs):
        snap = self._backend.stats(*args, **kwargs)
        return snap._replace(workers=(
            WorkerInfo("rq-worker-a", WorkerState.IDLE, None, 3, pid=4321, host="box-1"),))


@pytest.fixture
def proxied(make_app):
    """``proxied(Proxy)``: a client of an app whose queue is served through ``Proxy``,
    and the real queue behind it."""
    with pytest.MonkeyPatch.context() as patch:  # undone before make_app shuts the queue down

        def make(proxy):
            app = make_app(QUEUE_WORKERS=2)
            real = QueueExtension.queue_for
            patch.setattr(QueueExtension, "queue_for", lambda self, a: proxy(real(self, a)))
            return app.test_client(), real(app.extensions["dashboard"], app)

        yield make


def button(page: str, label: str) -> str:
    match = re.search(rf'<button [^>]*aria-label="{label}"[^>]*>', page)
    assert match, f"no {label} button in the page"
    return match.group(0)


def test_a_backend_that_cannot_scale_shows_minus_and_plus_disabled_and_says_how(proxied):
    client, _ = proxied(SeparateWorkers)
    for path in ("/", "/live", "/live/controls"):
        page = client.get(path).text
        for label in ("Fewer workers", "More workers"):
            assert " disabled" in button(page, label), (path, label)
        assert f'<span class="hint" id="scale-hint">{HINT}</span>' in page, path
        assert "set where the workers run, not here" not in page


@pytest.mark.parametrize("delta", ["1", "-1"])
def test_the_form_refuses_a_new_worker_count_with_a_409_saying_how(proxied, delta):
    client, queue = proxied(SeparateWorkers)
    refused = client.post("/workers", data={"delta": delta}, headers=HTMX)
    assert refused.status_code == 409 and HINT in refused.text
    # Without JavaScript: back to the page (303, as every refusal), which shows why.
    plain = client.post("/workers", data={"delta": delta})
    assert plain.status_code == 303 and "refused=" in plain.headers["Location"]
    assert HINT in client.get(plain.headers["Location"]).text
    assert queue.workers == 2


@pytest.mark.parametrize("body", [{"count": 3}, {"delta": 1}, {"delta": -1}])
def test_the_api_refuses_a_new_worker_count_with_a_409_saying_how(proxied, body):
    client, queue = proxied(SeparateWorkers)
    refused = client.post("/api/workers", json=body)
    assert refused.status_code == 409 and refused.json == {"error": HINT}
    assert queue.workers == 2


def test_a_backend_that_cannot_scale_and_gives_no_hint_is_refused_in_plain_words(
        proxied, monkeypatch):
    monkeypatch.setattr(SeparateWorkers, "capabilities",
                        property(lambda self: Capabilities(scale_workers=False)))
    client, queue = proxied(SeparateWorkers)
    refused = client.post("/api/workers", json={"count": 3})
    assert refused.status_code == 409
    assert refused.json == {"error": "the worker count is set where the workers run, not here"}
    assert "set where the workers run, not here" in client.get("/").text


def test_the_in_process_queue_keeps_its_working_minus_and_plus(make_app):
    app = make_app(QUEUE_WORKERS=2)
    client = app.test_client()
    page = client.get("/").text
    for label in ("Fewer workers", "More workers"):
        assert " disabled" not in button(page, label)
    assert 'id="scale-hint"' not in page
    assert client.post("/workers", data={"delta": "1"}, headers=HTMX).status_code == 200
    assert client.post("/api/workers", json={"delta": -1}).json == {"workers": 2}


def test_a_worker_on_another_machine_is_shown_as_host_and_pid(proxied):
    client, _ = proxied(RemoteWorker)
    region = client.get("/live/workers").text
    assert '<span class="pid">box-1:4321</span> rq-worker-a' in region
    assert "in process box-1:4321" in region
    worker = client.get("/api/stats").json["workers"]
    assert worker == [{"name": "rq-worker-a", "state": "idle", "task": None, "done": 3,
                       "pid": 4321, "host": "box-1"}]
