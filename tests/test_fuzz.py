"""Arbitrary requests at every endpoint: never a 5xx, and a refusal never changes anything.

Hypothesis throws methods, content types, bodies, form and JSON values,
query strings and headers (htmx's, Fetch Metadata, Origin, Authorization,
Host) at each route, including the shapes that once made a 500: JSON nested
thousands deep, origins urlsplit cannot parse, numbers too long for int().
Two properties must hold for every example:

1. the status is 2xx, 3xx or 4xx, never 5xx;
2. when the answer is 4xx, the queue is exactly as it was (counts, paused,
   worker count, the version every poll compares).
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flask.testing import FlaskClient
from werkzeug.test import run_wsgi_app

from dashboard import create_app, get_queue

SECRET = "fuzz-secret-0123456789"

PATHS = [
    "/", "/live", "/live/counts", "/live/history", "/live/{text}", "/tasks", "/tasks/{id}",
    "/tasks/{id}/live", "/tasks/lookup", "/tasks/{id}/cancel", "/tasks/{id}/retry", "/pause",
    "/resume", "/workers", "/history/clear", "/reset", "/api/stats", "/api/tasks",
    "/api/tasks/{id}", "/api/tasks/{id}/cancel", "/api/tasks/{id}/retry", "/api/pause",
    "/api/resume", "/api/workers", "/healthz", "/live/schedules", "/schedules/{text}/run",
    "/api/schedules", "/api/schedules/{text}/run", "/metrics",
    # the operator's view: the list's poll, a bulk action's confirmation and post, each
    # kind's health ("/tasks" and "/api/tasks" above are the list and its API)
    "/tasks/live", "/tasks/bulk", "/api/tasks/bulk", "/api/kinds",
]
# (Not the demo schedule's own run URLs: each run that passes is a 2 s task to run
# here; test_web_schedules.py sends those its bad and good requests.)

FIELDS = ["kind", "count", "seconds", "fail_rate", "limit", "delta", "present", "view", "id",
          "params", "extra", "state", "text", "order", "cursor", "action", "expected"]

#: Values the operator's view takes (states, an order, actions, a cursor's form), so the
#: examples reach its answers as well as its refusals.
SEARCH_VALUES = ["failed", "queued,done", "flaky", "oldest", "retry", "purge", "cancel",
                 "a1", "b99", "50", "gave"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["pretend", "flaky", "primes", "1", "10", "-1", "0", "1e9", "nan", "NaN",
                     "<script>alert(1)</script>", "' OR 1=1 --", "{{7*7}}", "%00", "\u202e"]),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8),
                                                 inner, max_size=5)), max_leaves=12)


@st.composite
def hostile_json(draw):
    """JSON text that breaks parsers rather than validators: nesting deeper than any
    recursion limit (closed or not, at the top or inside a field) and numbers of more
    digits than int() takes. Each fits in the 64 KiB body limit."""
    depth = draw(st.sampled_from([50, 990, 1_000, 5_000, 30_000]))
    deep = draw(st.sampled_from(["[" * depth + "]" * depth, "[" * depth,
                                 '{"a":' * depth + "1" + "}" * depth]))
    digits = "9" * draw(st.sampled_from([4_300, 4_301, 20_000]))
    return draw(st.sampled_from([
        deep, f'{{"params": {deep}}}', f'{{"count": {deep}}}', f'{{"kind": {deep}}}',
        f'{{"params": {{"seconds": {deep}}}}}', f'{{"count": {digits}}}',
        f'{{"params": {{"seconds": {digits}}}}}', f'{{"delta": {deep}}}',
    ]))

#: Origins urlsplit cannot take apart (each once raised ValueError: a 500).
BAD_ORIGINS = ["http://[", "http://[::1", "http://a]b", "http://localhost:99999", "http://:80"]

# What can travel in a header line at all: latin-1, no line breaks.
header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255,
                                             blacklist_characters="\x7f"), max_size=30)

headers = st.fixed_dictionaries({}, optional={
    "HX-Request": st.sampled_from(["true", "false", ""]),
    "HX-PTag": header_text,
    "If-None-Match": header_text,
    "Sec-Fetch-Site": st.sampled_from(["same-origin", "same-site", "cross-site", "none", "x"]),
    "Origin": st.sampled_from(["http://localhost", "https://evil.example", "null", "", "::",
                               "https://localhost", "http://localhost:80",
                               "http://user@localhost", "http://localhost/", *BAD_ORIGINS]),
    # Names we are served as, names we are not (DNS rebinding), and what no host is.
    "Host": st.sampled_from(["localhost", "127.0.0.1:5000", "[::1]:5000", "app.localhost",
                             "evil.example:5000", "0.0.0.0", "a b", "[", "[::1", "a..b",
                             "xn--", "a" * 70, "localhost:99999", "", "LOCALHOST"]),
    "Authorization": st.sampled_from([f"Bearer {SECRET}", "Bearer nope", "Basic %%%", "Basic",
                                      "Basic OmZ1enotc2VjcmV0LTAxMjM0NTY3ODk="]),
    "Accept": st.sampled_from(["text/html", "application/json", "*/*"]),
})


@st.composite
def requests(draw, path_template):
    task_id = draw(st.sampled_from(["1", "2", "0", "-1", "abc", "99999999999999999999", "%20",
                                    "١", "3.5"]))
    path = path_template.format(id=task_id, text=draw(st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/?#%"),
        min_size=1, max_size=12)))
    kind = draw(st.sampled_from(["form", "json", "hostile", "raw", "none"]))
    # Hostile bodies and origins reach a parser only in a POST.
    method = "POST" if kind == "hostile" else draw(
        st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]))
    request = {"method": method, "headers": dict(draw(headers)),
               "query_string": draw(st.dictionaries(st.sampled_from(FIELDS), st.text(
                   max_size=12) | st.sampled_from(SEARCH_VALUES), max_size=3))}
    if kind == "form":
        request["data"] = draw(st.dictionaries(st.sampled_from(FIELDS),
                                               st.text(max_size=20) | st.sampled_from(
                                                   ["1", "10", "0", "pretend", "0.5", "x",
                                                    "9" * 5_000, *SEARCH_VALUES]),
                                               max_size=6))
    elif kind == "json":
        request["data"] = json.dumps(draw(json_values))
        request["content_type"] = draw(st.sampled_from(
            ["application/json", "application/json; charset=utf-8", "text/plain"]))
    elif kind == "hostile":
        request["data"] = draw(hostile_json())
        request["content_type"] = "application/json"
        if draw(st.booleans()):  # an Origin no parser takes, with no Fetch Metadata before it
            request["headers"].pop("Sec-Fetch-Site", None)
            request["headers"]["Origin"] = draw(st.sampled_from(BAD_ORIGINS))
    elif kind == "raw":
        request["data"] = draw(st.binary(max_size=300))
        request["content_type"] = draw(st.sampled_from([
            "application/x-www-form-urlencoded", "multipart/form-data",
            "multipart/form-data; boundary=xyz", "application/json", "text/plain",
            "application/octet-stream", "", "text/html; charset=klingon"]))
    return path, request


class RawClient(FlaskClient):
    """Flask's test client, without its cookie jar: after every request that jar
    decodes the Host as IDNA and raises on names like "xn--", which the app itself
    answers with a 4xx. We send no cookies anyway."""

    def run_wsgi_app(self, environ, buffered=False):
        return run_wsgi_app(self.application, environ, buffered=buffered)


def state(queue):
    snap = queue.stats()
    return (snap.tag, snap.queued, snap.running, snap.done, snap.failed, snap.cancelled,
            snap.submitted, snap.paused, queue.workers)


@pytest.fixture(params=["open", "secret"])
def app(request):
    """One app per mode and route: its examples share it, as real clients would.

    Per test, not per module: a fuzzed ``POST /workers`` that succeeds starts
    worker threads, which this test's shutdown stops before the leak check
    looks (a module's app outlived the test, and failed it). And it is built
    after the environment is cleared (conftest), never from the shell's."""
    config = {"TESTING": False, "QUEUE_WORKERS": 0, "QUEUE_HANDLE_SIGNALS": False, "QUEUE_WORK_TIME": 0,
              "QUEUE_SUBMIT_LIMIT": "", "QUEUE_MAX_QUEUED": 100_000, "QUEUE_MAX_BATCH": 50}
    if request.param == "secret":
        config.update(QUEUE_ACCESS_TOKEN=SECRET, QUEUE_PUBLIC_READ=True)
    app = create_app(config)
    queue = get_queue(app)
    queue.submit("flaky", seconds=0, fail_rate=1)  # a failed task 1 and a done task 2 to
    queue.submit("pretend", seconds=0)              # aim cancels and retries at
    queue.run_pending()
    yield app
    queue.shutdown()


@pytest.mark.parametrize("path_template", PATHS)
def test_no_request_gets_a_5xx_and_refusals_change_nothing(app, path_template):
    queue = get_queue(app)
    client = RawClient(app, app.response_class)

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(requests(path_template))
    def check(example):
        path, kwargs = example
        before = state(queue)
        response = client.open(path, **kwargs)
        try:
            assert response.status_code < 500, (path, repr(kwargs)[:500], response.data[:300])
            if 400 <= response.status_code < 500:
                assert state(queue) == before, (path, repr(kwargs)[:500], response.status_code)
            body = response.get_data()
            if response.mimetype == "text/html":
                assert b"<script>alert(1)</script>" not in body  # echoed input is escaped
            if response.status_code >= 400:  # an error never shows the server's insides
                assert not re.search(rb"Traceback \(most recent call last\)", body)
        finally:
            response.close()
        queue.run_pending(5)  # work that was accepted runs, as it would

    check()
