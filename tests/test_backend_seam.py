"""The web layer talks to the Backend seam (dashboard/backend.py) and to nothing
else of a queue: every page, poll, control and API call of the dashboard runs
here against a queue that answers only the seam's names, on both stores. A
view that reached past the seam (``queue.store``, ``queue.stall_after``) fails
this with the name it used; a backend that implements the seam serves the page.
"""

from __future__ import annotations

import pytest

from dashboard.backend import SEAM, Backend, Capabilities
from dashboard import get_queue
from dashboard.ext import QueueExtension
from dashboard.local.queue import WorkQueue


class SeamOnly:
    """A queue that answers only what the seam declares."""

    def __init__(self, backend: Backend):
        object.__setattr__(self, "_backend", backend)

    def __getattr__(self, name: str):
        if name not in SEAM:
            raise AssertionError(f"the web layer used {name!r}, which the Backend seam lacks")
        return getattr(self._backend, name)


@pytest.fixture(params=["memory", "sqlite"])
def seam_client(request, make_app, monkeypatch):
    app = make_app(store=request.param)
    real = QueueExtension.queue_for
    queue = real(app.extensions["dashboard"], app)
    with monkeypatch.context() as patch:  # undone before make_app shuts the queue down
        patch.setattr(QueueExtension, "queue_for", lambda self, a: SeamOnly(real(self, a)))
        yield app.test_client(), queue


HTMX = {"HX-Request": "true"}


def test_every_view_uses_only_the_seam(seam_client):
    client, queue = seam_client
    ok = lambda response: response.status_code < 500  # noqa: E731
    failed = queue.submit("flaky", seconds=0, fail_rate=1)
    queue.run_pending()
    waiting = queue.submit("pretend", seconds=0)
    for path in ("/", "/?present=1", "/live", "/live/counts", "/live/workers", "/healthz",
                 f"/tasks/{failed}", f"/tasks/{waiting}/live", "/tasks/lookup?id=1",
                 "/api/stats", f"/api/tasks/{failed}", "/metrics",
                 # the operator's view (a store that cannot search yet says so)
                 "/tasks", "/tasks?state=failed&kind=flaky&text=gave&order=oldest&limit=5",
                 "/tasks/live?state=failed", "/tasks/bulk?action=retry&state=failed",
                 "/api/tasks?state=failed&kind=flaky", "/api/tasks?action=retry",
                 "/api/kinds"):
        assert ok(client.get(path, headers=HTMX)), path
        assert ok(client.get(path)), path
    posts = [
        ("/api/tasks", {"json": {"kind": "pretend", "count": 2, "params": {"seconds": 0}}}),
        ("/tasks", {"data": {"kind": "pretend", "count": "1"}, "headers": HTMX}),
        (f"/api/tasks/{waiting}/cancel", {}),
        (f"/tasks/{failed}/retry", {"data": {}, "headers": HTMX}),
        (f"/api/tasks/{failed}/retry", {}),
        ("/pause", {"data": {}}), ("/resume", {"data": {}, "headers": HTMX}),
        ("/api/pause", {}), ("/api/resume", {}),
        ("/workers", {"data": {"delta": "1"}, "headers": HTMX}),
        ("/api/workers", {"json": {"count": 1}}),
        ("/history/clear", {"data": {}}), ("/reset", {"data": {}, "headers": HTMX}),
        ("/tasks/bulk", {"data": {"action": "cancel", "state": "queued", "expected": "9"},
                         "headers": HTMX}),
        ("/api/tasks/bulk", {"json": {"action": "retry", "kind": "flaky"}}),
        ("/api/tasks/bulk", {"json": {"action": "purge", "state": ["done"]}}),
    ]
    for path, kwargs in posts:
        response = client.post(path, **kwargs)
        assert ok(response), (path, response.status_code, response.data[:200])
    queue.set_workers(0)


def test_the_in_process_backend_is_one_and_says_what_it_can_do(make_app):
    from dashboard import get_queue

    memory, sqlite = get_queue(make_app()), get_queue(make_app(store="sqlite"))
    assert isinstance(memory, Backend) and isinstance(memory, WorkQueue)
    assert memory.capabilities == Capabilities(scale_workers=True, shared=False, durable=False)
    assert sqlite.capabilities == Capabilities(scale_workers=True, shared=True, durable=True)
    assert memory.description == "in this process's memory"
    assert sqlite.description == "in a SQLite file shared by every process"


def test_a_backend_that_cannot_scale_shows_minus_and_plus_disabled(make_app, monkeypatch):
    app = make_app()
    monkeypatch.setattr(WorkQueue, "capabilities", property(
        lambda self: Capabilities(scale_workers=False)))
    page = app.test_client().get("/").data
    assert b'aria-label="More workers" disabled' in page and b'id="workers-target"' in page
    assert b'aria-label="Fewer workers" disabled' in page
    assert b"set where the workers run, not here" in page  # (it gave no scale_hint)


class StringIds:
    """The in-process queue with ids as other backends give them (RQ's job ids
    are strings): ``"job-<n>"``. Only the seam's names answer."""

    def __init__(self, backend: Backend):
        self._backend = backend

    def __getattr__(self, name: str):
        if name not in SEAM:
            raise AssertionError(f"the web layer used {name!r}, which the Backend seam lacks")
        return getattr(self._backend, name)

    @staticmethod
    def out(number):
        return None if number is None else f"job-{number}"

    @staticmethod
    def back(text):
        if isinstance(text, str) and text.startswith("job-") and text[4:].isdigit():
            return int(text[4:])
        return 10**17  # an id this backend never gave out: unknown

    def info(self, info):
        if info is None:
            return None
        return info._replace(id=self.out(info.id), retry_of=self.out(info.retry_of),
                             retried_as=self.out(info.retried_as))

    def get(self, task_id):
        return self.info(self._backend.get(self.back(task_id)))

    def submit(self, kind, /, **params):
        return self.submit_many(kind, 1, params)[0]

    def enqueue(self, kind, params=None, **options):
        done = self._backend.enqueue(kind, params, **options)
        return done._replace(id=self.out(done.id))

    def submit_many(self, kind, count, params, **options):
        return [self.out(n) for n in self._backend.submit_many(kind, count, params, **options)]

    def cancel(self, task_id):
        return self._backend.cancel(self.back(task_id))

    def retry(self, task_id):
        retried = self._backend.retry(self.back(task_id))
        return retried._replace(id=self.out(retried.id))

    def stats(self, recent=20, upcoming=0):
        snap = self._backend.stats(recent, upcoming)
        return snap._replace(
            recent=tuple(map(self.info, snap.recent)),
            upcoming=tuple(map(self.info, snap.upcoming)),
            workers=tuple(w._replace(task=self.info(w.task)) for w in snap.workers),
        )


def test_a_backend_with_string_ids_serves_every_page_and_call(make_app, monkeypatch):
    """Nothing in the views or templates assumes integer ids: with ids like
    RQ's, every link, form, redirect and JSON answer carries them unchanged."""
    app = make_app()
    real = QueueExtension.queue_for
    inner = real(app.extensions["dashboard"], app)
    monkeypatch.setattr(QueueExtension, "queue_for", lambda self, a: StringIds(real(self, a)))
    client = app.test_client()

    added = client.post("/api/tasks", json={"kind": "flaky", "count": 2,
                                            "params": {"seconds": 0, "fail_rate": 1}})
    assert added.status_code == 202
    first, second = added.json["ids"]
    assert first.startswith("job-") and second.startswith("job-")
    assert client.get(f"/api/tasks/{first}").json["id"] == first

    page = client.get("/").data.decode()
    assert f'href="/tasks/{first}"' in page and f'action="/tasks/{first}/cancel"' in page
    assert f"#{first}" in page

    cancelled = client.post(f"/tasks/{second}/cancel", data={"view": "task"})
    assert cancelled.status_code == 303 and cancelled.headers["Location"] == f"/tasks/{second}"
    inner.run_pending()  # the first fails
    retried = client.post(f"/api/tasks/{first}/retry")
    assert retried.status_code == 202
    assert retried.json["retry_of"] == first and retried.json["id"].startswith("job-")
    again = client.post(f"/tasks/{first}/retry", data={"view": "task"})
    assert again.headers["Location"] == f"/tasks/{retried.json['id']}"

    detail = client.get(f"/tasks/{first}").data.decode()
    assert f'href="/tasks/{retried.json["id"]}"' in detail
    assert client.get(f"/tasks/{first}/live", headers=HTMX).status_code == 200
    assert client.get(f"/tasks/lookup?id=%23{first}").headers["Location"] == f"/tasks/{first}"
    # The in-process stores' own ids mean nothing to this backend: unknown, not an error.
    assert client.get(f"/tasks/{StringIds.back(first)}").status_code == 404
    assert client.get("/api/tasks/job-999").status_code == 404
    monkeypatch.undo()  # before make_app shuts the real queue down


def test_a_backend_without_delays_keys_or_time_limits_says_so_instead_of_pretending(
        make_app, monkeypatch):
    app = make_app()
    monkeypatch.setattr(WorkQueue, "capabilities", property(
        lambda self: Capabilities(delays=False, keys=False, time_limits=False)))
    client = app.test_client()
    assert 'name="delay"' not in client.get("/").text
    for field, body in (("delay", {"delay": 5}), ("key", {"key": "k"}),
                        ("time_limit", {"time_limit": 5})):
        refused = client.post("/api/tasks", json={"kind": "pretend", **body})
        assert refused.status_code == 400
        assert refused.json == {"error": f"{field} is not available with this backend (the "
                                         "queue in this process's memory)"}
    refused = client.post("/tasks", data={"kind": "pretend", "delay": "5"},
                          headers={"HX-Request": "true"})
    assert refused.status_code == 400 and "delay is not available" in refused.text
    assert client.post("/api/tasks", json={"kind": "pretend"}).status_code == 202
    assert get_queue(app).stats().submitted == 1
