"""Every refusal carries the HTTP status that answers it (dashboard/errors.py), so
the web layer keeps no table of exception types, and a fault of the server's is
never answered as the request's."""

from __future__ import annotations

import pytest

from dashboard import errors
from dashboard.errors import QueueError, StoreError


@pytest.mark.parametrize("error, status, retry_after", [
    (errors.UnknownKind("x", ["a"]), 400, None),
    (errors.InvalidParam("count", "must be an integer from 1 to 100, got 0"), 400, None),
    (errors.TaskNotFound(7), 404, None),
    (errors.WrongState(7, "done", "only a queued or running task can be cancelled"), 409, None),
    (errors.RateLimited("3 tasks per minute", 20), 429, "20"),
    (errors.QueueFull(5, 5, 1), 503, None),
    (errors.QueueClosed(), 503, "5"),
    (errors.StoreUnavailable("the file is locked", 3), 503, "3"),
    (StoreError("disk I/O error"), 503, "5"),
])
def test_each_refusal_carries_its_status(error, status, retry_after):
    assert isinstance(error, QueueError)
    assert error.status == status
    assert error.headers().get("Retry-After") == retry_after


def test_a_store_failing_mid_request_is_a_503_not_the_requests_fault(app, client, queue,
                                                                     monkeypatch):
    """Before: StoreError was a plain TaskError, and a database that failed while
    answering a submit was a 400, "bad request", to the client."""
    def failing_add(*args, **kwargs):
        raise StoreError("cannot write the queue database /tmp/q.db: disk I/O error")

    monkeypatch.setattr(queue.store, "add", failing_add)
    before = queue.stats().submitted
    response = client.post("/api/tasks", json={"kind": "pretend", "count": 1})
    assert response.status_code == 503, response.json
    assert response.headers["Retry-After"] == "5"
    assert "disk I/O error" in response.json["error"]
    htmx = client.post("/tasks", data={"kind": "pretend"}, headers={"HX-Request": "true"})
    assert htmx.status_code == 503 and b"disk I/O error" in htmx.data
    assert queue.stats().submitted == before
