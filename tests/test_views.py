"""The web layer through Flask's test client: page, partials, posts, bad input, 304s."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from flask import template_rendered

from dashboard import ConfigError, create_app, get_queue

ROOT = Path(__file__).resolve().parent.parent
HTMX = {"HX-Request": "true"}


def depth(html: bytes) -> int:
    match = re.search(rb'id="queue-depth"[^>]*>(\d+)<', html)
    assert match, "no #queue-depth in the response"
    return int(match.group(1))


@pytest.fixture
def rendered(app):
    """The names of the templates rendered during the test."""
    names: list[str] = []

    def record(sender, template, context, **extra):
        names.append(template.name)

    template_rendered.connect(record, app)
    yield names
    template_rendered.disconnect(record, app)


# -- the page ------------------------------------------------------------------


def test_page_shows_depth_counts_workers_history_buttons_and_pid(client, queue):
    queue.submit_many("pretend", 2, {"seconds": 0})
    queue.run_pending(1)
    html = client.get("/").data
    assert depth(html) == 1
    assert b'id="count-done">1<' in html
    assert b'id="count-running">0<' in html
    assert b'id="count-failed">0<' in html
    assert f'<strong id="pid">{queue.stats().pid}</strong>'.encode() in html
    assert b">Add work</button>" in html and b">Add work \xc3\x9710</button>" in html
    for kind in (b"pretend", b"flaky", b"primes"):
        assert b'<option value="' + kind + b'"' in html
    assert b'value="pretend" selected' in html
    assert b'id="task-1"' in html  # the finished task is listed
    # The page polls one endpoint for every live region, and holds the current tag.
    assert b'hx-get="/live"' in html and f'hx-ptag="{queue.tag}"'.encode() in html


def test_history_lists_at_most_20_newest_first_with_errors(client, queue):
    queue.submit_many("pretend", 25, {"seconds": 0})
    queue.submit("flaky", seconds=0, fail_rate=1)
    queue.run_pending()
    html = client.get("/").data
    rows = re.findall(rb'<tr id="task-(\d+)"', html)
    assert [int(r) for r in rows] == list(range(26, 6, -1))
    assert b"RuntimeError: flaky task gave up (it fails 100% of the time)" in html
    assert b'id="count-failed">1<' in html


@pytest.mark.parametrize("region", ["counts", "workers", "history"])
def test_each_live_region_renders_alone(client, queue, region, rendered):
    response = client.get(f"/live/{region}", headers=HTMX)
    assert response.status_code == 200
    assert response.data.lstrip().startswith(f'<section id="{region}"'.encode())
    assert rendered == [f"_{region}.html"]
    assert response.headers["HX-PTag"] == queue.tag


def test_unknown_region_is_404(client):
    response = client.get("/live/secrets")
    assert response.status_code == 404
    assert b"regions are: counts, workers, history" in response.data
    probe = client.get("/live/<b>bold")
    assert probe.status_code == 404 and probe.mimetype == "text/plain"


def test_the_poll_renders_every_region_from_their_own_templates(client, rendered):
    response = client.get("/live", headers=HTMX)
    assert response.status_code == 200
    for region in ("counts", "workers", "history"):
        assert f'<section id="{region}"'.encode() in response.data
    assert rendered == ["_live.html"]  # includes are not separate renders
    assert b"{% include" not in (ROOT / "templates/_counts.html").read_bytes()
    live = (ROOT / "templates/_live.html").read_text()
    assert all(f'include "_{r}.html"' in live for r in ("counts", "workers", "history"))


# -- 304: an unchanged poll costs no rendering --------------------------------


def test_unchanged_poll_is_304_without_rendering(client, queue, rendered):
    first = client.get("/live", headers=HTMX)
    tag = first.headers["HX-PTag"]
    rendered.clear()
    again = client.get("/live", headers={**HTMX, "HX-PTag": tag})
    assert again.status_code == 304
    assert again.data == b""
    assert rendered == []
    # Standard clients get the same through ETag / If-None-Match.
    assert client.get("/live", headers={"If-None-Match": f'"{tag}"'}).status_code == 304


def test_a_change_makes_the_next_poll_render(client, queue):
    tag = client.get("/live", headers=HTMX).headers["HX-PTag"]
    queue.submit("pretend", seconds=0)
    changed = client.get("/live", headers={**HTMX, "HX-PTag": tag})
    assert changed.status_code == 200
    assert changed.headers["HX-PTag"] != tag
    assert depth(changed.data) == 1
    queue.run_pending()
    ran = client.get("/live", headers={**HTMX, "HX-PTag": changed.headers["HX-PTag"]})
    assert ran.status_code == 200 and depth(ran.data) == 0


def test_a_tag_from_another_queue_never_matches(client, queue):
    other = create_app({"WORKERS": 0, "HANDLE_SIGNALS": False})
    try:
        other_tag = get_queue(other).tag
        assert other_tag.split("-")[-1] == queue.tag.split("-")[-1]  # same version number...
        assert client.get("/live", headers={**HTMX, "HX-PTag": other_tag}).status_code == 200
    finally:
        get_queue(other).shutdown()


def test_headers_forbid_caching_and_vary_on_htmx(client):
    for path in ("/", "/live", "/api/stats"):
        response = client.get(path)
        assert response.headers["Cache-Control"] == "no-store"
        assert "HX-Request" in response.headers["Vary"]


# -- adding work ---------------------------------------------------------------


def test_htmx_post_returns_the_live_regions_at_once(client, queue):
    response = client.post("/tasks", data={"kind": "pretend", "count": "10"}, headers=HTMX)
    assert response.status_code == 200
    assert depth(response.data) == 10
    assert b'id="form-errors"' in response.data and b'hx-swap-oob="true"' in response.data
    assert response.headers["HX-PTag"] == queue.tag
    assert queue.stats().queued == 10


def test_plain_post_redirects_back_with_303(client, queue):
    response = client.post("/tasks", data={"kind": "pretend", "count": "1", "seconds": "2.5"})
    assert response.status_code == 303
    assert response.headers["Location"] == "/"
    (task,) = [queue.get(1)]
    assert (task.kind, task.params) == ("pretend", {"seconds": 2.5})


def test_post_defaults_to_one_task_of_the_default_kind(client, queue):
    assert client.post("/tasks", data={}).status_code == 303
    assert queue.get(1).kind == "pretend" and queue.stats().queued == 1


def test_empty_fields_mean_defaults_and_other_kinds_fields_are_ignored(client, queue):
    client.post("/tasks", data={"kind": "primes", "count": "1", "seconds": "3", "limit": ""})
    assert queue.get(1).params == {}


BAD_FORMS = [
    ({"kind": "nope"}, "kind must be one of: flaky, pretend, primes; got 'nope'"),
    ({"kind": "pretend", "count": "0"}, "count must be an integer from 1 to 100, got 0"),
    ({"kind": "pretend", "count": "101"}, "count must be an integer from 1 to 100, got 101"),
    ({"kind": "pretend", "count": "-1"}, "count must be an integer from 1 to 100"),
    ({"kind": "pretend", "count": "1.5"}, "count must be an integer from 1 to 100, got '1.5'"),
    ({"kind": "pretend", "count": "ten"}, "count must be an integer from 1 to 100, got 'ten'"),
    ({"kind": "pretend", "count": ""}, "count must be an integer from 1 to 100"),
    ({"kind": "pretend", "seconds": "-1"}, "seconds must be a number from 0 to 600, got -1.0"),
    ({"kind": "pretend", "seconds": "601"}, "seconds must be a number from 0 to 600"),
    ({"kind": "pretend", "seconds": "nan"}, "seconds must be a number from 0 to 600"),
    ({"kind": "pretend", "seconds": "1e999"}, "seconds must be a number from 0 to 600"),
    ({"kind": "pretend", "seconds": "soon"}, "seconds must be a number from 0 to 600, got 'soon'"),
    ({"kind": "flaky", "fail_rate": "2"}, "fail_rate must be a number from 0 to 1"),
    ({"kind": "primes", "limit": "1"}, "limit must be an integer from 2 to 100000000, got 1"),
]


@pytest.mark.parametrize("form,message", BAD_FORMS)
@pytest.mark.parametrize("htmx", [True, False], ids=["htmx", "plain"])
def test_bad_form_input_is_400_naming_the_field_and_queues_nothing(
    client, queue, form, message, htmx
):
    before = queue.stats()
    response = client.post("/tasks", data=form, headers=HTMX if htmx else {})
    assert response.status_code == 400
    assert message.encode().replace(b"'", b"&#39;") in response.data
    if htmx:  # a fragment for #form-errors, not a page
        assert response.data.startswith(b'<p class="error">')
    else:  # the whole page again, with the error shown
        assert b"<!doctype html>" in response.data and depth(response.data) == 0
    after = queue.stats()
    assert (after.submitted, after.queued, after.version) == (
        before.submitted, before.queued, before.version,
    )


def test_input_is_escaped_in_error_messages(client):
    response = client.post("/tasks", data={"kind": "<script>alert(1)</script>"}, headers=HTMX)
    assert response.status_code == 400
    assert b"<script>alert(1)" not in response.data
    assert b"&lt;script&gt;alert(1)&lt;/script&gt;" in response.data


def test_a_full_queue_answers_503_with_retry_after_and_queues_nothing():
    app = create_app({"WORKERS": 0, "HANDLE_SIGNALS": False, "MAX_QUEUED": 15, "MAX_BATCH": 10})
    queue = get_queue(app)
    try:
        client = app.test_client()
        assert client.post("/tasks", data={"count": "10"}).status_code == 303
        for headers in (HTMX, {}):
            response = client.post("/tasks", data={"count": "10"}, headers=headers)
            assert response.status_code == 503
            assert int(response.headers["Retry-After"]) >= 1
            assert b"queue is full: 10 of 15 queued, 10 more requested" in response.data
        api = client.post("/api/tasks", json={"count": 6})
        assert api.status_code == 503 and "Retry-After" in api.headers
        assert api.json == {"error": "queue is full: 10 of 15 queued, 6 more requested"}
        assert queue.stats().queued == 10
    finally:
        queue.shutdown()


def test_a_closed_queue_answers_503(client, queue):
    queue.close()
    response = client.post("/tasks", data={"count": "1"}, headers=HTMX)
    assert response.status_code == 503
    assert b"shutting down" in response.data
    assert client.post("/api/tasks", json={}).status_code == 503
    assert queue.stats().submitted == 0


# -- the JSON API ----------------------------------------------------------------


def test_api_stats_has_the_documented_fields(client, queue):
    data = client.get("/api/stats").json
    for key in ("queued", "running", "done", "failed", "cancelled"):
        assert isinstance(data[key], int)
    assert data["paused"] is False
    assert isinstance(data["workers"], list)
    assert data["pid"] == queue.stats().pid


def test_api_stats_workers_show_name_state_and_task():
    app = create_app({"WORKERS": 1, "HANDLE_SIGNALS": False})
    queue = get_queue(app)
    try:
        queue.pause()
        client = app.test_client()
        workers = client.get("/api/stats").json["workers"]  # the first request started them
        assert workers == [{"name": "worker-1", "state": "paused", "task": None, "done": 0}]
    finally:
        queue.shutdown()


def test_api_add_tasks_and_look_them_up(client, queue):
    response = client.post(
        "/api/tasks", json={"kind": "pretend", "count": 3, "params": {"seconds": 0}}
    )
    assert response.status_code == 202
    assert response.json == {"ids": [1, 2, 3], "count": 3}
    assert client.get("/api/tasks/2").json["state"] == "queued"
    queue.run_pending()
    task = client.get("/api/tasks/2").json
    assert (task["state"], task["kind"], task["params"]) == ("done", "pretend", {"seconds": 0.0})
    assert task["progress"] == 1.0


def test_api_defaults(client, queue):
    assert client.post("/api/tasks", json={}).json == {"ids": [1], "count": 1}
    assert queue.get(1).kind == "pretend"


@pytest.mark.parametrize(
    "body,status,message",
    [
        ({"kind": "nope"}, 400, "kind must be one of"),
        ({"kind": ["pretend"]}, 400, "kind must be one of"),
        ({"kind": None}, 400, "kind must be one of"),
        ({"count": 0}, 400, "count must be an integer from 1 to 100, got 0"),
        ({"count": "3"}, 202, None),  # numeric strings are accepted, like in forms
        ({"count": True}, 400, "count must be an integer"),
        ({"count": 1e9}, 400, "count must be an integer from 1 to 100"),
        ({"params": []}, 400, "params must be an object of parameters, got list"),
        ({"params": {"seconds": "x"}}, 400, "seconds must be a number from 0 to 600"),
        ({"params": {"sekonds": 1}}, 400, "sekonds is not a parameter of 'pretend'"),
        ({"kind": "pretend", "extra": 1}, 400, "unknown field(s): extra"),
        ([1, 2], 400, "body must be a JSON object"),
        ("pretend", 400, "body must be a JSON object"),
    ],
)
def test_api_bad_input_is_a_4xx_json_error_and_queues_nothing(client, queue, body, status, message):
    response = client.post("/api/tasks", json=body)
    assert response.status_code == status
    if message:
        assert message in response.json["error"]
        assert queue.stats().submitted == 0


def test_api_needs_json(client, queue):
    response = client.post("/api/tasks", data="kind=pretend")
    assert response.status_code == 415
    assert "application/json" in response.json["error"]
    broken = client.post("/api/tasks", data="{nope", content_type="application/json")
    assert broken.status_code == 400 and "JSON object" in broken.json["error"]
    assert queue.stats().submitted == 0


def test_api_unknown_task_is_404_json(client):
    for path in ("/api/tasks/99", "/api/tasks/abc", "/api/tasks/-1", "/api/tasks/%D9%A1"):
        response = client.get(path)
        assert response.status_code == 404
        assert "no task" in response.json["error"]


def test_api_errors_are_json_even_from_routing(client):
    response = client.get("/api/nothing-here")
    assert response.status_code == 404 and "error" in response.json
    assert client.get("/api/tasks").status_code == 405


def test_request_body_is_limited(client, queue):
    response = client.post("/tasks", data={"kind": "pretend", "pad": "x" * 100_000})
    assert response.status_code == 413
    assert queue.stats().submitted == 0


def test_healthz(client, queue):
    assert client.get("/healthz").json["status"] == "ok"
    queue.shutdown()
    response = client.get("/healthz")
    assert response.status_code == 503 and response.json["status"] == "stopping"


# -- tasks run in an app context ---------------------------------------------------


def test_every_task_runs_in_an_app_context_torn_down_after_it(app, queue):
    from flask import current_app, g

    from dashboard.tasks import Registry

    seen, torn_down = [], []
    registry = queue.registry
    assert isinstance(registry, Registry)

    @app.teardown_appcontext
    def count_teardown(exc):
        torn_down.append(exc)

    def probe(ctx):
        seen.append((current_app.name, getattr(g, "mark", None)))
        g.mark = "set by the task"  # must not leak into the next task

    registry._kinds.pop("probe", None)
    registry.task("probe")(probe)
    try:
        queue.submit("probe")
        queue.submit("probe")
        queue.run_pending()
    finally:
        registry._kinds.pop("probe", None)
    assert seen == [(app.name, None), (app.name, None)]
    assert torn_down == [None, None]


# -- configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    "config,message",
    [
        ({"WORKERS": "many"}, "WORKERS must be an integer from 0 to 64, got 'many'"),
        ({"WORKERS": -1}, "WORKERS must be an integer from 0 to 64, got -1"),
        ({"WORK_TIME": -1}, "WORK_TIME must be a number from 0 to 3600"),
        ({"POLL_INTERVAL": 0}, "POLL_INTERVAL must be a number from 0.2 to 60"),
        ({"MAX_QUEUED": 0}, "MAX_QUEUED must be an integer from 1 to 10000000"),
        ({"MAX_BATCH": 50, "MAX_QUEUED": 10}, "MAX_BATCH must not be larger than MAX_QUEUED"),
        ({"HISTORY": None}, "HISTORY must be an integer"),
        ({"DEFAULT_KIND": "nope"}, "DEFAULT_KIND must be one of: flaky, pretend, primes"),
        ({"HANDLE_SIGNALS": "maybe"}, "HANDLE_SIGNALS must be true or false"),
    ],
)
def test_invalid_config_fails_at_start_naming_the_key(config, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        create_app({"HANDLE_SIGNALS": False, **config})


def test_config_comes_from_flask_prefixed_environment(monkeypatch):
    monkeypatch.setenv("FLASK_WORKERS", "3")
    monkeypatch.setenv("FLASK_WORK_TIME", "0.5")
    monkeypatch.setenv("FLASK_HANDLE_SIGNALS", "false")
    app = create_app({"TESTING": True})
    try:
        assert (app.config["WORKERS"], app.config["WORK_TIME"]) == (3, 0.5)
        assert get_queue(app).workers == 3
    finally:
        get_queue(app).shutdown()
    monkeypatch.setenv("FLASK_WORKERS", "lots")
    with pytest.raises(ConfigError, match="WORKERS must be an integer .* FLASK_WORKERS"):
        create_app()


def test_test_config_wins_over_environment(monkeypatch):
    monkeypatch.setenv("FLASK_WORKERS", "3")
    app = create_app({"WORKERS": 0, "HANDLE_SIGNALS": False})
    assert get_queue(app).workers == 0
    get_queue(app).shutdown()


# -- vendored htmx -------------------------------------------------------------------


def test_vendored_htmx_matches_its_recorded_version_and_hashes(client):
    htmx_dir = ROOT / "static/htmx"
    package, version = (htmx_dir / "VERSION").read_text().split()
    assert package == "htmx.org" and version.startswith("4.")
    sums = {}
    for line in (htmx_dir / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        sums[name] = digest
    assert set(sums) == {"htmx.min.js", "ext/hx-ptag.min.js", "LICENSE"}
    for name, digest in sums.items():
        assert hashlib.sha256((htmx_dir / name).read_bytes()).hexdigest() == digest, name
    assert f'"{version}"'.encode() in (htmx_dir / "htmx.min.js").read_bytes()
    page = client.get("/").data
    for name in ("htmx.min.js", "ext/hx-ptag.min.js"):
        assert f'src="/static/htmx/{name}"'.encode() in page
        with client.get(f"/static/htmx/{name}") as response:
            assert response.status_code == 200
    assert b"https://" not in page  # no CDN
