"""Regression tests for the defects a hostile review found in the web layer.

Each test is named after its defect (``d05``: item 5 of the review, ``sx``: a
suspected defect that was confirmed) and failed before the fix. The rules
they pin: refused input gets a 4xx naming what was wrong and changes
nothing; only what was queued is charged to the submit limit; a retry is
queued once however often it is asked for; the dashboard answers only to
the names it is served as; and what a request says reaches the log escaped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
from urllib.parse import quote

import pytest
from werkzeug.test import EnvironBuilder, run_wsgi_app

from dashboard import ConfigError, create_app, get_queue
from dashboard.records import State

from servers import BIN, HOST, ROOT, Server, free_port, server_env

HTMX = {"HX-Request": "true"}
SAME_ORIGIN = {"Sec-Fetch-Site": "same-origin"}
EXPOSED = "beyond this machine, with no QUEUE_ACCESS_TOKEN"



def state(app):
    queue = get_queue(app)
    snap = queue.stats()
    return (snap.tag, snap.queued, snap.running, snap.done, snap.failed, snap.cancelled,
            snap.submitted, snap.paused, queue.workers)


def failed_task(app) -> int:
    queue = get_queue(app)
    task_id = queue.submit("flaky", seconds=0, fail_rate=1)
    queue.run_pending()
    assert queue.get(task_id).state is State.FAILED
    return task_id


# -- d05: refused input is a 4xx, never a 500 --------------------------------------------


def nested(depth: int, closed: bool = True) -> str:
    return "[" * depth + ("]" * depth if closed else "")


@pytest.mark.parametrize("body", [
    pytest.param(nested(30_000), id="array-30000-deep"),
    pytest.param(nested(60_000, closed=False), id="unclosed-60000-deep"),
    pytest.param(nested(990), id="array-990-deep"),
    pytest.param('{"params": %s}' % nested(30_000), id="in-params"),
    pytest.param('{"params": {"seconds": %s}}' % nested(990), id="in-a-param"),
    pytest.param('{"count": %s}' % nested(990), id="in-count"),
    pytest.param('{"kind": %s}' % nested(500), id="in-kind"),
])
def test_d05_deeply_nested_json_is_a_400_not_a_500(make_app, body):
    app = make_app()
    client = app.test_client()
    before = state(app)
    for path in ("/api/tasks", "/api/workers"):
        response = client.post(path, data=body, content_type="application/json")
        assert response.status_code == 400, (path, response.data[:200])
        assert response.json["error"] == ("body nests too deeply: at most 10 levels of lists "
                                          "and objects")
    assert state(app) == before


def test_d05_json_nested_100k_deep_is_a_400_where_bodies_may_be_that_large(make_app):
    """The 64 KiB body limit stops 100k levels with a 413 first; an app that
    allows larger bodies must still not answer with a 500."""
    app = make_app(MAX_CONTENT_LENGTH=1024 * 1024)
    before = state(app)
    for body in (nested(100_000), '{"params": %s}' % nested(100_000)):
        response = app.test_client().post("/api/tasks", data=body,
                                          content_type="application/json")
        assert response.status_code == 400
        assert response.json["error"].startswith("body nests too deeply")
    assert state(app) == before


@pytest.mark.parametrize("origin", ["http://[", "http://[::1", "http://a]b", "http://a:99999"])
def test_d05_a_malformed_origin_is_a_4xx_naming_it_not_a_500(make_app, origin):
    app = make_app()
    client = app.test_client()
    before = state(app)
    api = client.post("/api/tasks", json={}, headers={"Origin": origin})
    assert api.status_code == 403
    assert api.json["error"] == (f"cross-site request refused (Origin {origin!r} is not an "
                                 "origin like https://example.com:8443)")
    form = client.post("/tasks", data={"count": "1"}, headers={"Origin": origin, **HTMX})
    assert form.status_code == 403 and origin.encode() in form.data
    assert state(app) == before


def test_d05_a_number_too_long_for_int_is_a_400_saying_so(make_app):
    app = make_app()
    before = state(app)
    response = app.test_client().post(
        "/api/tasks", data='{"count": %s}' % ("9" * 5_000), content_type="application/json")
    assert response.status_code == 400
    assert response.json["error"] == (
        f"body must be a JSON object; a number in it has more than "
        f"{sys.get_int_max_str_digits()} digits")
    form = app.test_client().post("/tasks", data={"count": "9" * 5_000}, headers=HTMX)
    assert form.status_code == 400 and b"count must be an integer from 1 to 100" in form.data
    assert state(app) == before


@pytest.mark.parametrize("host", ["a..b", "a" * 70 + ".example"])
def test_d05_a_malformed_host_is_a_400_naming_the_host(make_app, host):
    app = make_app()
    before = state(app)
    client = app.test_client()
    page = client.get("/", headers={"Host": host})
    assert page.status_code == 400
    assert f"Host &#39;{host}&#39; is not a valid host name".encode() in page.data
    api = client.post("/api/tasks", json={}, headers={"Host": host})
    assert api.status_code == 400 and f"Host '{host}' is not a valid host name" in api.json["error"]
    assert state(app) == before


@pytest.mark.parametrize("host", ["xn--", "xn--zz", "[", "a b", "0.0.0.0"])
def test_d05_hosts_no_name_has_are_a_4xx(make_app, host):
    """Straight through WSGI: Werkzeug's test client itself raises on an "xn--" Host."""
    app = make_app()
    before = state(app)
    for method, path in (("GET", "/"), ("POST", "/api/tasks"), ("GET", "/api/stats")):
        environ = EnvironBuilder(path=path, method=method, headers={"Host": host},
                                 json={} if method == "POST" else None).get_environ()
        _, status, _ = run_wsgi_app(app, environ, buffered=True)
        assert status.startswith("400 "), (host, path, status)
    assert state(app) == before


# -- d06: only what was queued is charged --------------------------------------------------


def test_d06_refused_submits_cost_nothing(make_app):
    app = make_app(QUEUE_SUBMIT_LIMIT="3/minute", QUEUE_MAX_QUEUED=3, QUEUE_MAX_BATCH=3)
    queue = get_queue(app)
    client = app.test_client()
    queue.submit_many("pretend", 3, {"seconds": 0})  # the queue is full
    for _ in range(5):
        full = client.post("/api/tasks", json={"count": 1})
        assert full.status_code == 503 and "Retry-After" in full.headers
        assert client.post("/tasks", data={"count": "1"}, headers=HTMX).status_code == 503
    queue.run_pending()
    accepted = client.post("/api/tasks", json={"count": 3})
    assert accepted.status_code == 202, accepted.json  # the ten refusals cost nothing
    queue.run_pending()
    over = client.post("/api/tasks", json={"count": 1})
    assert over.status_code == 429  # and the limit still holds


def test_d06_a_store_that_cannot_answer_costs_nothing(make_app, monkeypatch):
    from dashboard.errors import StoreUnavailable

    app = make_app(QUEUE_SUBMIT_LIMIT="2/minute")
    queue = get_queue(app)
    client = app.test_client()

    def unavailable(*args, **kwargs):
        raise StoreUnavailable("the file is locked")

    with monkeypatch.context() as patch:
        patch.setattr(queue.store, "add", unavailable)
        for _ in range(5):
            refused = client.post("/api/tasks", json={"count": 2})
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
    assert client.post("/api/tasks", json={"count": 2}).status_code == 202


def test_d06_a_closed_queue_costs_nothing(make_app):
    app = make_app(QUEUE_SUBMIT_LIMIT="2/minute")
    client = app.test_client()
    get_queue(app).close()
    for _ in range(5):
        assert client.post("/api/tasks", json={"count": 2}).status_code == 503
    limiter = app.extensions["dashboard.limiter"]
    stats = limiter.strategy.get_window_stats(limiter.item, "127.0.0.1")
    assert stats.remaining == 2


def test_d06_refused_retries_cost_nothing(make_app):
    app = make_app(QUEUE_SUBMIT_LIMIT="2/minute")
    queue = get_queue(app)
    client = app.test_client()
    waiting = queue.submit("pretend", seconds=0)
    for _ in range(5):
        assert client.post("/api/tasks/999/retry").status_code == 404
        assert client.post("/tasks/999/retry", headers=HTMX).status_code == 404
        assert client.post(f"/api/tasks/{waiting}/retry").status_code == 409
        assert client.post(f"/tasks/{waiting}/retry", headers=HTMX).status_code == 409
    assert client.post("/api/tasks", json={"count": 2}).status_code == 202


def test_d06_a_retry_that_queues_nothing_costs_nothing(make_app):
    app = make_app(QUEUE_SUBMIT_LIMIT="2/minute")
    client = app.test_client()
    failed = failed_task(app)
    assert client.post(f"/api/tasks/{failed}/retry").status_code == 202  # charged: 1
    for _ in range(5):
        assert client.post(f"/api/tasks/{failed}/retry").status_code == 200  # nothing queued
        assert client.post(f"/tasks/{failed}/retry", headers=HTMX).status_code == 200
    assert client.post("/api/tasks", json={"count": 1}).status_code == 202  # 2 of 2
    assert client.post("/api/tasks", json={"count": 1}).status_code == 429


def test_d06_a_client_at_its_limit_can_still_open_an_existing_retry(make_app):
    app = make_app(QUEUE_SUBMIT_LIMIT="1/minute")
    client = app.test_client()
    failed = failed_task(app)
    first = client.post(f"/api/tasks/{failed}/retry")
    assert first.status_code == 202
    again = client.post(f"/api/tasks/{failed}/retry")
    assert again.status_code == 200 and again.json["id"] == first.json["id"]


def test_d06_concurrent_submits_stop_exactly_at_the_limit(make_app):
    """Test, queue and count are one step per client: eight threads of one client
    sending at once queue exactly the limit, never more."""
    app = make_app(QUEUE_SUBMIT_LIMIT="20/minute", QUEUE_MAX_QUEUED=1_000)
    statuses: list[int] = []
    start = threading.Barrier(8)

    def send():
        client = app.test_client()
        start.wait()
        for _ in range(10):
            statuses.append(client.post("/api/tasks", json={"count": 1}).status_code)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(set(statuses)) == [202, 429]
    assert statuses.count(202) == 20
    assert get_queue(app).stats().queued == 20


# -- d07: a retry is queued once -------------------------------------------------------------

STORES = ["memory", "sqlite"]


@pytest.mark.parametrize("store", STORES)
def test_d07_api_retry_twice_queues_one_task_and_says_which(make_app, store):
    app = make_app(store)
    client = app.test_client()
    failed = failed_task(app)
    first = client.post(f"/api/tasks/{failed}/retry")
    assert first.status_code == 202
    retry = first.json["id"]
    assert first.json == {"id": retry, "retry_of": failed, "created": True}
    second = client.post(f"/api/tasks/{failed}/retry")
    assert second.status_code == 200
    assert second.json == {"id": retry, "retry_of": failed, "created": False}
    snap = get_queue(app).stats()
    assert (snap.queued, snap.submitted) == (1, 2)  # the failed task and one retry


@pytest.mark.parametrize("store", STORES)
def test_d07_a_retry_raced_by_another_process_says_it_queued_nothing(make_app, store,
                                                                     monkeypatch):
    """Another process sharing the store retried the task between this request's read
    and its retry: the request was answered 202 "created" and charged for a task it
    did not queue. The backend now says which retry queued it."""
    app = make_app(store, QUEUE_SUBMIT_LIMIT="1/minute")
    client = app.test_client()
    failed = failed_task(app)
    queue = get_queue(app)
    read = queue.get
    raced = []

    def read_then_race(task_id):
        info = read(task_id)
        if not raced:
            raced.append(queue.store.retry(info.id).id)  # the other process's click
        return info

    monkeypatch.setattr(queue, "get", read_then_race)
    answer = client.post(f"/api/tasks/{failed}/retry")
    monkeypatch.undo()
    assert answer.status_code == 200
    assert answer.json == {"id": raced[0], "retry_of": failed, "created": False}
    assert queue.stats().queued == 1
    assert client.post("/api/tasks", json={"count": 1}).status_code == 202  # nothing charged


@pytest.mark.parametrize("store", STORES)
def test_d07_form_retry_twice_queues_one_task(make_app, store):
    app = make_app(store)
    queue = get_queue(app)
    client = app.test_client()
    failed = failed_task(app)
    for _ in range(2):  # a double click, with htmx
        response = client.post(f"/tasks/{failed}/retry", headers=HTMX)
        assert response.status_code == 200 and b'id="counts"' in response.data
    retry = queue.get(failed).retried_as
    for _ in range(2):  # the same from the task's page, with JavaScript off
        plain = client.post(f"/tasks/{failed}/retry", data={"view": "task"})
        assert plain.status_code == 303 and plain.headers["Location"] == f"/tasks/{retry}"
    from_page = client.post(f"/tasks/{failed}/retry", data={"view": "task"}, headers=HTMX)
    assert from_page.status_code == 200
    assert f'retried as</dt><dd><a href="/tasks/{retry}">'.encode() in from_page.data
    assert client.post(f"/tasks/{failed}/retry").headers["Location"] == "/"
    snap = queue.stats()
    assert (snap.queued, snap.submitted) == (1, 2)


# -- d08: only the names the dashboard is served as ------------------------------------------


class FakeSocket:
    """What a server hands the app as the connection's socket: only its local address."""

    def __init__(self, address):
        self.address = address

    def getsockname(self):
        return self.address


def test_d08_a_foreign_host_is_refused_on_loopback(make_app, caplog):
    app = make_app()
    client = app.test_client()
    before = state(app)
    rebound = {"Host": "evil.example:5000", **SAME_ORIGIN}
    message = ("Host 'evil.example:5000' refused: this dashboard is served on this machine only "
               "(localhost) and answers to localhost, *.localhost, 127.0.0.1 and [::1]; to serve "
               "it under another name, list that name in TRUSTED_HOSTS")
    api = client.post("/api/tasks", json={"count": 5}, headers=rebound)
    assert api.status_code == 400 and api.json == {"error": message}
    form = client.post("/tasks", data={"count": "5"}, headers={**rebound, **HTMX})
    assert form.status_code == 400 and form.data.decode() == message
    # Reading too: a rebound page could read the tasks, their params and errors.
    for path in ("/", "/live", "/api/stats", "/tasks/1", "/healthz"):
        assert client.get(path, headers=rebound).status_code == 400, path
    assert state(app) == before
    assert "evil.example:5000' refused" in caplog.text


@pytest.mark.parametrize("host", ["localhost", "localhost:5000", "LocalHost", "app.localhost:5000",
                                  "127.0.0.1", "127.0.0.1:5000", "127.8.9.10", "[::1]:5000"])
def test_d08_loopback_names_are_accepted_on_loopback(make_app, host):
    app = make_app()
    client = app.test_client()
    assert client.get("/", headers={"Host": host}).status_code == 200
    origin = f"http://{host.lower()}"
    response = client.post("/api/tasks", json={}, headers={"Host": host, "Origin": origin})
    assert response.status_code == 202, response.json
    assert client.post("/tasks", headers={"Host": host, **SAME_ORIGIN}).status_code == 303


@pytest.mark.parametrize("environ,refused", [
    # The socket the server names decides, whatever SERVER_NAME says (gunicorn
    # fills it from the Host header, uWSGI with the machine's name).
    ({"werkzeug.socket": FakeSocket(("127.0.0.1", 5000))}, True),
    ({"gunicorn.socket": FakeSocket(("::1", 5000, 0, 0))}, True),
    ({"gunicorn.socket": FakeSocket(("::ffff:127.0.0.1", 5000, 0, 0))}, True),
    ({"gunicorn.socket": FakeSocket("/run/dashboard.sock")}, True),  # a proxy beside us
    ({"werkzeug.socket": FakeSocket(("192.0.2.10", 80))}, False),  # served beyond loopback
], ids=["werkzeug-127.0.0.1", "gunicorn-::1", "gunicorn-mapped-127.0.0.1", "unix-socket",
        "werkzeug-public"])
def test_d08_the_servers_socket_decides_not_server_name(make_app, environ, refused):
    app = make_app()
    client = app.test_client()
    base = "http://192.0.2.10/" if refused else "http://localhost/"  # SERVER_NAME says otherwise
    response = client.post("/api/tasks", json={}, base_url=base, environ_base=environ,
                           headers={"Host": "evil.example", **SAME_ORIGIN})
    assert response.status_code == (400 if refused else 202), response.json
    assert get_queue(app).stats().submitted == (0 if refused else 1)


def test_d08_trusted_hosts_lists_the_names_a_proxy_serves(make_app):
    app = make_app(TRUSTED_HOSTS="dash.example.com, .example.org")
    assert app.config["TRUSTED_HOSTS"] == ["dash.example.com", ".example.org"]
    client = app.test_client()
    for host in ("dash.example.com", "dash.example.com:443", "a.example.org"):
        assert client.get("/", headers={"Host": host}).status_code == 200, host
        assert client.post("/api/tasks", json={}, headers={"Host": host}).status_code == 202
    for host in ("evil.example", "localhost"):  # the list replaces the loopback rule
        refused = client.post("/api/tasks", json={}, headers={"Host": host})
        assert refused.status_code == 400
        assert refused.json["error"] == (f"400 Bad Request: Host '{host}' is not one this "
                                         "dashboard answers to: to allow it, add it to "
                                         "TRUSTED_HOSTS")
    assert get_queue(app).stats().submitted == 3


def test_d08_trusted_hosts_from_the_environment(monkeypatch):
    monkeypatch.setenv("FLASK_TRUSTED_HOSTS", "dash.example.com,localhost")
    app = create_app({"QUEUE_WORKERS": 0, "QUEUE_HANDLE_SIGNALS": False})
    try:
        assert app.config["TRUSTED_HOSTS"] == ["dash.example.com", "localhost"]
        assert app.test_client().get("/api/stats").status_code == 200
    finally:
        get_queue(app).shutdown()


@pytest.mark.parametrize("hosts", ["[::1]", "dash.example.com/admin", ["a b"], 5])
def test_d08_trusted_hosts_no_request_could_match_fail_at_start(hosts):
    with pytest.raises(ConfigError, match=re.escape("TRUSTED_HOSTS must be a list of host names")):
        create_app({"QUEUE_HANDLE_SIGNALS": False, "TRUSTED_HOSTS": hosts})


@pytest.mark.parametrize("origin,allowed", [
    ("https://localhost", False),  # same host, another scheme: another origin
    ("http://localhost:80", True),  # the default port, written out
    ("http://localhost:8080", False),
    ("HTTP://LOCALHOST", True),
    ("http://localhost/", False),  # an origin has no path
])
def test_d08_the_origin_must_match_scheme_host_and_port(make_app, origin, allowed):
    app = make_app()
    response = app.test_client().post("/api/tasks", json={}, headers={"Origin": origin})
    assert response.status_code == (202 if allowed else 403), response.json


# -- real servers: d08 and d16b ------------------------------------------------------------------


def _server(tmp_path, kind: str, bind: str, **settings: str) -> Server:
    port = free_port()
    if kind == "flask":
        host, _, _ = bind.rpartition(":")
        args = [str(BIN / "flask"), "--app", "dashboard", "run", "--host", host,
                "--port", str(port)]
    elif kind == "gunicorn":
        args = [str(BIN / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py")]
    else:
        args = [str(BIN / "uwsgi"), "--ini", str(ROOT / "uwsgi.ini")]
    env = server_env({"FLASK_QUEUE_WORKERS": "1", "FLASK_QUEUE_WORK_TIME": "0", **settings,
                      "BIND": bind.replace("PORT", str(port))})
    return Server(kind, args, tmp_path / f"{kind}.log", env, port)


def _ask(server: Server, method: str, path: str, host: str, body=None):
    reply = server.request(method, path, body, headers={"Host": host, **SAME_ORIGIN})
    return reply.status, json.dumps(reply.body) if not isinstance(reply.body, str) else reply.body


needs_uwsgi = pytest.mark.skipif(not (BIN / "uwsgi").exists(),
                                 reason=f"uWSGI is not installed in {BIN} (pip install pyuwsgi)")


@pytest.mark.server
@pytest.mark.parametrize("kind", ["flask", "gunicorn", pytest.param("uwsgi", marks=needs_uwsgi)])
def test_d08_real_servers_on_loopback_refuse_a_foreign_host(tmp_path, kind):
    server = _server(tmp_path, kind, f"{HOST}:PORT")
    try:
        server.start()
        server.wait_ready()
        status, body = _ask(server, "POST", "/api/tasks", f"evil.example:{server.port}", {})
        assert status == 400, body
        assert f"Host 'evil.example:{server.port}' refused" in body and "TRUSTED_HOSTS" in body
        status, body = _ask(server, "GET", "/api/stats", f"evil.example:{server.port}")
        assert status == 400, body
        status, body = _ask(server, "POST", "/api/tasks", f"localhost:{server.port}", {})
        assert status == 202, body
        assert server.stats()["submitted"] == 1
    finally:
        server.stop()


@pytest.mark.server
@needs_uwsgi
def test_d16b_uwsgi_on_loopback_does_not_warn(tmp_path):
    """uWSGI sets SERVER_NAME to the machine's name: the warning read it as an address."""
    server = _server(tmp_path, "uwsgi", f"{HOST}:PORT")
    try:
        server.start()
        server.wait_ready()  # its first request has been answered: the check ran
        assert server.request("GET", "/healthz").status == 200
        log = server.log()
        assert "WSGI app 0 " in log and EXPOSED not in log, log
    finally:
        server.stop()


@pytest.mark.server
@needs_uwsgi
def test_d16b_uwsgi_on_every_interface_without_a_token_still_warns(tmp_path):
    server = _server(tmp_path, "uwsgi", "0.0.0.0:PORT")
    try:
        server.start()
        server.wait_ready()  # asked on 127.0.0.1, but listening on every address
        server.wait_log("the exposure warning", lambda log: EXPOSED in log)
        assert f"served on 0.0.0.0, {EXPOSED}" in server.log()
    finally:
        server.stop()


# -- suspected defects, confirmed -------------------------------------------------------------


def test_sx_a_task_page_holds_the_tag_read_before_the_task(make_app, monkeypatch):
    """A task finishing between the page's two reads (the task, then the tag) left the
    page holding the newer tag with the older content: 304 for ever, "running" for ever."""
    app = make_app()
    queue = get_queue(app)
    client = app.test_client()
    read = queue.get

    def read_then_finish(task_id):
        info = read(task_id)
        if info is not None and info.state is State.RUNNING:
            queue.store.finish(running[info.id], State.DONE)
        return info

    running = {}
    monkeypatch.setattr(queue, "get", read_then_finish)
    for path in ("/tasks/{}", "/tasks/{}/live"):
        task_id = queue.submit("pretend", seconds=0)
        running[task_id] = queue.store.claim(None, block=False)
        page = client.get(path.format(task_id), headers=HTMX)
        assert b'id="task-state">running<' in page.data  # what was read, before it finished
        tag = re.search(rb'hx-ptag="([^"]+)"', page.data)[1].decode()
        assert page.headers.get("HX-PTag", tag) == tag
        poll = client.get(f"/tasks/{task_id}/live", headers={**HTMX, "HX-PTag": tag})
        assert poll.status_code == 200, f"{path}: the page would say running for ever"
        assert b'id="task-state">done<' in poll.data


def test_sx_what_a_request_says_reaches_the_log_escaped(make_app, caplog):
    app = make_app()
    client = app.test_client()
    forged = quote("1\n[2038-01-19 03:14:07 +0000] [1] [INFO] dashboard: forged\x1b[2J", safe="")
    with caplog.at_level(logging.INFO, logger="dashboard"):
        client.post(f"/tasks/{forged}/cancel", headers={"Sec-Fetch-Site": "cross-site"})
        client.post(f"/tasks/{forged}/cancel")  # refused as unknown: logged at INFO
        client.post(f"/api/tasks/{forged}/retry", headers={"Origin": "http://x\x7f"})
        client.get("/", headers={"Host": "evil.example\x1b[2J"})
    lines = [r.getMessage() for r in caplog.records if r.name == "dashboard"]
    assert len(lines) == 4, lines
    for line in lines:
        assert "\n" not in line and "\x1b" not in line and "\x7f" not in line, line
    assert "\\n[2038-01-19 03:14:07 +0000]" in lines[0] and "\\x1b[2J" in lines[0]


def test_sx_the_exposure_bookkeeping_stays_bounded(make_app, caplog):
    """Where the server names no socket, SERVER_NAME is the address, and some servers
    take it from the Host header: a stream of names must not grow memory."""
    from dashboard.web import security

    app = make_app()
    client = app.test_client()
    with caplog.at_level(logging.WARNING, logger="dashboard.security"):
        for i in range(300):
            client.get("/healthz", base_url=f"http://10.0.{i // 250}.{i % 250 + 1}/")
    assert len(security._warned) <= 64
    assert len(app.extensions["dashboard.exposure_checked"]) <= 64


# -- the suite and the developer's shell ---------------------------------------------------------


def test_settings_exported_in_the_shell_change_no_test(tmp_path):
    """With FLASK_QUEUE_ACCESS_TOKEN exported, 84 view tests failed (401); with FLASK_QUEUE_URL, 46."""
    env = {**os.environ, "FLASK_QUEUE_ACCESS_TOKEN": "abcdefghijklmnop", "FLASK_QUEUE_WORKERS": "3",
           "FLASK_QUEUE_URL": f"sqlite:///{tmp_path / 'shell.db'}",
           "DASHBOARD_EXPOSURE_WARNED": "192.0.2.10"}
    tests = ["tests/test_views.py::test_page_shows_depth_counts_workers_history_buttons_and_pid",
             "tests/test_views.py::test_task_detail_polls_while_running_and_answers_304",
             "tests/test_security.py::test_serving_beyond_loopback_without_a_secret_warns",
             "tests/test_security.py::test_same_origin_requests_and_non_browser_clients_pass"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    assert not (tmp_path / "shell.db").exists()


@pytest.mark.parametrize("path", ["/history/clear", "/reset", "/pause", "/workers",
                                  "/tasks/1/cancel", "/api/pause", "/api/tasks"])
@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded",
                                          "application/json", "text/plain"])
def test_fuzz_found_a_body_over_the_limit_is_refused_before_the_action_runs(
        make_app, path, content_type):
    """Found by the fuzz test: /history/clear with a 100 kB body cleared the
    history, then answered 413 when the view read the form at its end."""
    app = make_app()
    queue = get_queue(app)
    queue.submit("pretend", seconds=0)
    queue.run_pending()
    before = state(app)
    body = "count=1&delta=1&" + "x" * 100_000
    response = app.test_client().post(path, data=body, content_type=content_type)
    assert response.status_code == 413
    assert state(app) == before
