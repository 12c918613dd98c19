"""Strangers and other sites: what is refused, with which status, and that nothing changes."""

from __future__ import annotations

import base64
import logging
import re

import pytest

from dashboard import ConfigError, create_app, get_queue
from dashboard.web.security import CONTENT_SECURITY_POLICY, warn_if_exposed

SECRET = "correct-horse-battery-staple"



def counts(app):
    snap = get_queue(app).stats()
    return (snap.queued, snap.submitted, snap.done, snap.failed, snap.cancelled, snap.paused,
            get_queue(app).workers)


def post_routes(app):
    """Every state-changing route of the dashboard, with a task id filled in."""
    rules = [r for r in app.url_map.iter_rules() if "POST" in r.methods]
    return sorted(re.sub(r"<[^>]+>", "1", r.rule) for r in rules)


# -- cross-site requests ----------------------------------------------------------------


CROSS_SITE = [
    {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
    {"Sec-Fetch-Site": "same-site", "Origin": "https://evil.localhost"},  # a sibling subdomain
    {"Origin": "https://evil.example"},  # an older browser: no Fetch Metadata
    {"Origin": "null"},  # a sandboxed frame or a data: URL
]


@pytest.mark.parametrize("headers", CROSS_SITE)
def test_a_cross_site_form_post_is_refused_and_changes_nothing(make_app, headers):
    app = make_app()
    client = app.test_client()
    before = counts(app)
    for path in post_routes(app):
        response = client.post(path, data={"count": "10"}, headers=headers)
        assert response.status_code == 403, path
        assert b"cross-site request refused" in response.data
    assert counts(app) == before


@pytest.mark.parametrize("headers", CROSS_SITE)
def test_a_cross_site_json_post_is_refused_and_changes_nothing(make_app, headers):
    app = make_app()
    client = app.test_client()
    before = counts(app)
    response = client.post("/api/tasks", json={"count": 5}, headers=headers)
    assert response.status_code == 403
    assert response.json["error"].startswith("cross-site request refused")
    assert client.post("/api/pause", headers=headers).status_code == 403
    assert counts(app) == before


def test_same_origin_requests_and_non_browser_clients_pass(make_app):
    app = make_app()
    client = app.test_client()
    same = {"Sec-Fetch-Site": "same-origin", "Origin": "http://localhost", "HX-Request": "true"}
    assert client.post("/tasks", data={"count": "1"}, headers=same).status_code == 200
    assert client.post("/tasks", data={"count": "1"},
                       headers={"Origin": "http://localhost"}).status_code == 303
    assert client.post("/api/tasks", json={}).status_code == 202  # curl: neither header
    assert client.post("/tasks", headers={"Sec-Fetch-Site": "none"}).status_code == 303
    assert get_queue(app).stats().submitted == 4


def test_trusted_origins_may_post(make_app):
    app = make_app(QUEUE_TRUSTED_ORIGINS="https://admin.example.com, https://ops.example.com")
    assert app.config["QUEUE_TRUSTED_ORIGINS"] == ("https://admin.example.com",
                                             "https://ops.example.com")
    client = app.test_client()
    ok = client.post("/api/tasks", json={},
                     headers={"Sec-Fetch-Site": "cross-site", "Origin": "https://ops.example.com"})
    assert ok.status_code == 202
    no = client.post("/api/tasks", json={},
                     headers={"Sec-Fetch-Site": "cross-site", "Origin": "https://x.example.com"})
    assert no.status_code == 403


def test_reading_is_never_refused_as_cross_site(make_app):
    client = make_app().test_client()
    headers = {"Sec-Fetch-Site": "cross-site"}
    for path in ("/", "/live", "/api/stats", "/healthz"):
        assert client.get(path, headers=headers).status_code == 200


# -- the access token ----------------------------------------------------------------


def basic(secret, user="anyone"):
    token = base64.b64encode(f"{user}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_with_a_secret_requests_without_it_are_refused(make_app):
    app = make_app(QUEUE_ACCESS_TOKEN=SECRET)
    client = app.test_client()
    before = counts(app)
    for method, path in [("GET", "/"), ("GET", "/live"), ("GET", "/api/stats"),
                         ("POST", "/tasks"), ("POST", "/api/tasks"), ("POST", "/pause"),
                         ("GET", "/tasks/1")]:
        for headers in ({}, basic("wrong"), {"Authorization": "Bearer wrong"},
                        {"Authorization": "Basic %%%"}, {"Authorization": "Digest x"}):
            response = client.open(path, method=method, headers=headers, json={})
            assert response.status_code == 401, (method, path, headers)
            assert response.headers["WWW-Authenticate"].startswith('Basic realm="Work queue"')
    assert counts(app) == before
    assert client.get("/api/stats").json["error"].startswith("this dashboard needs its access")


def test_with_the_secret_everything_works(make_app):
    app = make_app(QUEUE_ACCESS_TOKEN=SECRET)
    client = app.test_client()
    assert client.get("/", headers=basic(SECRET)).status_code == 200
    assert client.post("/tasks", data={"count": "2"}, headers=basic(SECRET, "")).status_code == 303
    bearer = {"Authorization": f"Bearer {SECRET}"}
    assert client.post("/api/tasks", json={"count": 3}, headers=bearer).status_code == 202
    assert client.get("/api/stats", headers=bearer).json["submitted"] == 5
    assert client.get("/healthz").status_code == 200  # load balancers need no secret


def test_public_read_leaves_the_pages_open_but_not_the_actions(make_app):
    app = make_app(QUEUE_ACCESS_TOKEN=SECRET, QUEUE_PUBLIC_READ=True)
    client = app.test_client()
    page = client.get("/")
    assert page.status_code == 200
    assert b'id="read-only"' in page.data and b"Add work</button>" not in page.data
    assert b">Pause</button>" not in page.data
    assert client.get("/live").status_code == 200
    assert client.post("/tasks", data={}).status_code == 401
    assert client.post("/api/pause").status_code == 401
    authed = client.get("/", headers=basic(SECRET)).data
    assert b"Add work</button>" in authed and b">Pause</button>" in authed


def test_rows_rendered_for_an_operator_never_reach_a_reader(make_app):
    """Rows are reused between polls (views._Rows): never across who may act."""
    app = make_app(QUEUE_ACCESS_TOKEN=SECRET, QUEUE_PUBLIC_READ=True)
    queue = get_queue(app)
    failed = queue.submit("flaky", seconds=0, fail_rate=1)
    queue.run_pending()
    waiting = queue.submit("pretend", seconds=0)
    client = app.test_client()
    buttons = (f'action="/tasks/{failed}/retry"'.encode(),
               f'action="/tasks/{waiting}/cancel"'.encode())
    for who in ("reader", "operator", "reader", "operator"):
        body = client.get("/live", headers={"HX-Request": "true",
                                            **(basic(SECRET) if who == "operator" else {})}).data
        assert f'id="task-{failed}"'.encode() in body and f'id="queued-{waiting}"'.encode() in body
        for button in buttons:
            assert (button in body) == (who == "operator"), (who, button)


@pytest.mark.parametrize(
    "config,message",
    [
        ({"QUEUE_ACCESS_TOKEN": "short"}, "QUEUE_ACCESS_TOKEN must be at least 12 characters"),
        ({"QUEUE_TRUSTED_ORIGINS": "evil.example"}, "QUEUE_TRUSTED_ORIGINS must be a list of origins"),
        ({"QUEUE_TRUSTED_ORIGINS": ["https://a.example/path"]}, "QUEUE_TRUSTED_ORIGINS must be a list"),
        ({"QUEUE_SUBMIT_LIMIT": "lots"}, "QUEUE_SUBMIT_LIMIT must be empty (no limit) or like"),
        ({"QUEUE_PUBLIC_READ": "perhaps"}, "QUEUE_PUBLIC_READ must be true or false"),
    ],
)
def test_bad_security_settings_fail_at_start(config, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        create_app({"QUEUE_HANDLE_SIGNALS": False, **config})


# -- headers --------------------------------------------------------------------------


def test_every_html_response_carries_the_policy_and_hardening_headers(make_app):
    app = make_app()
    queue = get_queue(app)
    queue.submit("pretend", seconds=0)
    client = app.test_client()
    responses = [
        client.get("/"), client.get("/?present=1"), client.get("/live"),
        client.get("/live/counts"), client.get("/tasks/1"), client.get("/tasks/99"),
        client.get("/tasks/lookup?id=x"), client.get("/no/such/page"),
        client.post("/tasks", data={"count": "0"}),
        client.post("/tasks", data={"count": "0"}, headers={"HX-Request": "true"}),
        client.post("/tasks", headers={"Sec-Fetch-Site": "cross-site"}),
        client.get("/tasks"), client.get("/tasks?state=nope"), client.get("/tasks/live"),
        client.get("/tasks/bulk?action=purge"), client.post("/tasks/bulk", data={}),
    ]
    for response in responses:
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "same-origin"
        assert response.headers["X-Frame-Options"] == "DENY"
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
    assert "'unsafe-eval'" not in CONTENT_SECURITY_POLICY
    assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY


def test_templates_need_no_inline_code_or_style():
    from pathlib import Path

    paths = sorted((Path(__file__).resolve().parent.parent / "templates").rglob("*.html"))
    assert len(paths) > 20  # (it looked in templates/ only, where there are none, for a while)
    for path in paths:
        html = path.read_text()
        assert " style=" not in html and "<style" not in html, path.name
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), path.name
        assert "hx-on" not in html and "js:" not in html, path.name
        assert not re.search(r'hx-trigger="[^"]*\[', html), path.name  # no eval'd filters


# -- the submit limit -------------------------------------------------------------------


def test_the_submit_limit_counts_tasks_per_client(make_app):
    app = make_app(QUEUE_SUBMIT_LIMIT="12/minute")
    client = app.test_client()
    queue = get_queue(app)
    assert client.post("/tasks", data={"count": "10"}).status_code == 303
    refused = client.post("/api/tasks", json={"count": 3})
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.json["error"].startswith("too much work from this client: the limit is "
                                            "12 tasks per minute; try again in ")
    assert queue.stats().submitted == 10  # nothing of the refused batch
    htmx = client.post("/tasks", data={"count": "3"}, headers={"HX-Request": "true"})
    assert htmx.status_code == 429 and b"too much work from this client" in htmx.data
    other = client.post("/api/tasks", json={"count": 2},
                        environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert other.status_code == 202  # another client has its own allowance
    assert client.post("/api/tasks", json={"count": 2}).status_code == 202  # 12 for this one


@pytest.mark.parametrize("spec,words", [
    ("600 per minute", "600 tasks per minute"),
    ("1/second", "1 task per second"),
    ("10 per 2 minutes", "10 tasks per 2 minutes"),
    ("5 per 30 second", "5 tasks per 30 seconds"),
    ("100/hour", "100 tasks per hour"),
])
def test_the_limit_reads_as_words(spec, words):
    from dashboard.web.security import SubmitLimiter

    limiter = SubmitLimiter(spec)
    assert limiter.described == words and limiter.amount == int(words.split()[0])
    assert SubmitLimiter("").amount is None


def test_bad_requests_cost_nothing(make_app):
    app = make_app(QUEUE_SUBMIT_LIMIT="5/minute")
    client = app.test_client()
    for _ in range(20):
        assert client.post("/api/tasks", json={"count": 500}).status_code == 400
        assert client.post("/api/tasks", json={"kind": "nope"}).status_code == 400
    assert client.post("/api/tasks", json={"count": 5}).status_code == 202


def test_no_limit_when_empty(make_app):
    app = make_app(QUEUE_SUBMIT_LIMIT="", QUEUE_MAX_BATCH=100, QUEUE_MAX_QUEUED=10_000)
    client = app.test_client()
    for _ in range(20):
        assert client.post("/api/tasks", json={"count": 100}).status_code == 202


# -- exposure ----------------------------------------------------------------------------


def test_serving_beyond_loopback_without_a_secret_warns(make_app, caplog, monkeypatch):
    monkeypatch.delenv("DASHBOARD_EXPOSURE_WARNED", raising=False)
    with caplog.at_level(logging.WARNING, logger="dashboard.security"):
        assert warn_if_exposed("0.0.0.0", "") is True
        assert warn_if_exposed("0.0.0.0", "") is False  # once per process and address
        assert warn_if_exposed("127.0.0.1", "") is False
        assert warn_if_exposed("::1", "") is False
        assert warn_if_exposed("localhost", "") is False
        assert warn_if_exposed("10.1.2.3", SECRET) is False
    assert caplog.text.count("beyond this machine, with no QUEUE_ACCESS_TOKEN") == 1

    app = make_app()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dashboard.security"):
        app.test_client().get("/", base_url="http://192.0.2.10/")  # SERVER_NAME: our address
    assert "served on 192.0.2.10, beyond this machine" in caplog.text


def test_the_read_only_view_does_not_show_tracebacks(make_app):
    app = make_app(QUEUE_ACCESS_TOKEN=SECRET, QUEUE_PUBLIC_READ=True)
    queue = get_queue(app)
    task_id = queue.submit("flaky", seconds=0, fail_rate=1)
    queue.run_pending()
    client = app.test_client()
    public = client.get(f"/tasks/{task_id}").data
    assert b"RuntimeError: flaky task gave up" in public  # the error message, yes
    assert b"Traceback (most recent call last)" not in public  # the server's insides, no
    assert b"Traceback (most recent call last)" in client.get(
        f"/tasks/{task_id}", headers=basic(SECRET)).data


def test_a_numeric_token_from_the_environment_stays_text(monkeypatch):
    monkeypatch.setenv("FLASK_QUEUE_ACCESS_TOKEN", "0123456789012345")
    monkeypatch.setenv("FLASK_QUEUE_SUBMIT_LIMIT", "")
    app = create_app({"QUEUE_WORKERS": 0, "QUEUE_HANDLE_SIGNALS": False})
    try:
        assert app.config["QUEUE_ACCESS_TOKEN"] == "0123456789012345"
        assert app.config["QUEUE_SUBMIT_LIMIT"] == ""
        client = app.test_client()
        assert client.get("/api/stats", headers={
            "Authorization": "Bearer 0123456789012345"}).status_code == 200
    finally:
        get_queue(app).shutdown()


def test_a_result_like_a_traceback_is_for_those_with_the_token(make_app):
    """A result may hold what a task made for one person (a link, a figure): with
    QUEUE_PUBLIC_READ a reader sees that there is one, not what it is."""
    app = make_app(QUEUE_ACCESS_TOKEN=SECRET, QUEUE_PUBLIC_READ=True)
    queue = get_queue(app)
    task_id = queue.submit("primes", limit=100)
    queue.run_pending()
    client = app.test_client()
    page = client.get(f"/tasks/{task_id}").text
    assert "The result is shown to those with the access token." in page
    assert '<pre class="result"' not in page
    assert "result" not in client.get(f"/api/tasks/{task_id}").json
    operator = basic(SECRET)
    assert '<pre class="result" id="task-result" tabindex="0" role="region" aria-label="Result">25</pre>' in client.get(
        f"/tasks/{task_id}", headers=operator).text
    assert client.get(f"/api/tasks/{task_id}", headers=operator).json["result"] == 25


def test_what_a_task_logged_is_for_those_with_the_token(make_app):
    app = make_app(QUEUE_ACCESS_TOKEN=SECRET, QUEUE_PUBLIC_READ=True)
    queue = get_queue(app)
    task_id = queue.submit("pretend", seconds=0)
    queue.run_pending()
    with queue.store._lock:  # a line as if the task had logged it
        queue.store._tasks[task_id].logs = ["09:00:00 INFO app: a secret link"]
    client = app.test_client()
    page = client.get(f"/tasks/{task_id}").text
    assert "a secret link" not in page
    assert "What the task logged is shown to those with the access token." in page
    assert "a secret link" in client.get(f"/tasks/{task_id}", headers=basic(SECRET)).text
    assert "logs" not in client.get(f"/api/tasks/{task_id}").json
    assert client.get(f"/api/tasks/{task_id}", headers=basic(SECRET)).json["logs"] == [
        "09:00:00 INFO app: a secret link"]
