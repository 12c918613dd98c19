"""The web layer through Flask's test client: page, partials, posts, bad input, 304s."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from flask import template_rendered

from dashboard import ConfigError, create_app, get_queue
from dashboard.web.live import REGIONS
from support import wait_for

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


def queued(queue):
    """The queued tasks, oldest first (ids are whatever the store gave out)."""
    return list(queue.stats(0, 100).upcoming)


# -- the page ------------------------------------------------------------------


def test_page_shows_depth_counts_workers_history_buttons_and_pid(client, queue):
    first, _ = queue.submit_many("pretend", 2, {"seconds": 0})
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
    assert f'id="task-{first}"'.encode() in html  # the finished task is listed
    assert b'<h2 id="history-title">Finished <span class="sub">1</span></h2>' in html
    # The page polls one endpoint for every live region, and holds the current tag.
    assert f'hx-get="/live?queue={queue.identity}"'.encode() in html and f'hx-ptag="{queue.tag}"'.encode() in html


@pytest.mark.parametrize("config,size", [
    ({}, 10),
    ({"QUEUE_MAX_BATCH": 4}, 4),
    ({"QUEUE_SUBMIT_LIMIT": "3 per minute"}, 3),
    ({"QUEUE_SUBMIT_LIMIT": ""}, 10),
    ({"QUEUE_MAX_BATCH": 1}, None),
    ({"QUEUE_SUBMIT_LIMIT": "1/second"}, None),
])
def test_the_batch_button_adds_what_the_limits_allow(make_app, config, size):
    html = make_app(**config).test_client().get("/").data
    buttons = re.findall(
        rb'<button type="submit" name="count" value="(\d+)"[^>]*>Add work([^<]*)<', html)
    batch = [] if size is None else [(str(size).encode(), f" ×{size}".encode())]
    assert buttons == [(b"1", b"")] + batch


def test_history_lists_at_most_20_newest_first_with_errors(client, queue):
    ids = queue.submit_many("pretend", 25, {"seconds": 0})
    ids.append(queue.submit("flaky", seconds=0, fail_rate=1))
    queue.run_pending()
    html = client.get("/").data
    rows = re.findall(rb'<tr id="task-(\d+)"', html)
    assert [int(r) for r in rows] == ids[:-21:-1]
    assert b'<h2 id="history-title">Last 20 finished <span class="sub">of 26</span></h2>' in html
    assert b"RuntimeError: flaky task gave up (it fails 100% of the time)" in html
    assert b'id="count-failed">1<' in html


@pytest.mark.parametrize("region", REGIONS)
def test_each_live_region_renders_alone(client, queue, region, rendered):
    response = client.get(f"/live/{region}", headers=HTMX)
    assert response.status_code == 200
    assert response.data.lstrip().startswith(f'<section id="{region}"'.encode())
    assert rendered == [f"dashboard/_{region}.html"]
    assert response.headers["HX-PTag"] == queue.tag


def test_unknown_region_is_404(client):
    response = client.get("/live/secrets")
    assert response.status_code == 404
    assert (b"regions are: counts, controls, chart, workers, scheduled, upcoming, history"
            in response.data)
    probe = client.get("/live/<b>bold")
    assert probe.status_code == 404 and probe.mimetype == "text/plain"


def test_the_poll_renders_every_region_from_their_own_templates(client, rendered):
    response = client.get("/live", headers=HTMX)
    assert response.status_code == 200
    for region in REGIONS:
        assert f'<section id="{region}"'.encode() in response.data
    assert rendered[0] == "dashboard/_live.html"  # the regions are included, not rendered apart
    live = (ROOT / "templates/dashboard/_live.html").read_text()
    assert all(f'include "dashboard/_{r}.html"' in live for r in REGIONS)


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
    other = create_app({"QUEUE_WORKERS": 0, "QUEUE_HANDLE_SIGNALS": False})
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
    (task,) = queued(queue)
    assert (task.kind, task.params) == ("pretend", {"seconds": 2.5})


def test_post_defaults_to_one_task_of_the_default_kind(client, queue):
    assert client.post("/tasks", data={}).status_code == 303
    (task,) = queued(queue)
    assert task.kind == "pretend"


def test_empty_fields_mean_defaults_and_other_kinds_fields_are_ignored(client, queue):
    client.post("/tasks", data={"kind": "primes", "count": "1", "seconds": "3", "limit": ""})
    (task,) = queued(queue)
    assert task.params == {}


BAD_FORMS = [
    ({"kind": "nope"}, "kind must be one of: flaky, pretend, primes, shaky; got 'nope'"),
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


def form_errors(html: bytes) -> bytes:
    """What a page shows in #form-errors."""
    match = re.search(rb'<div id="form-errors" role="alert">(.*?)</div>', html, re.S)
    assert match, "no #form-errors in the page"
    return match.group(1)


def follow_refusal(client, response, path: str = "/") -> bytes:
    """A refused plain post's 303 back to ``path``: the page it leads to, and what it shows."""
    assert response.status_code == 303, response.data[:300]
    location = urlsplit(response.headers["Location"])
    assert location.path == path and "refused=" in location.query, location
    page = client.get(response.headers["Location"])
    assert page.status_code == 200
    return page.data


@pytest.mark.parametrize("form,message", BAD_FORMS)
@pytest.mark.parametrize("htmx", [True, False], ids=["htmx", "plain"])
def test_bad_form_input_is_400_naming_the_field_and_queues_nothing(
    client, queue, form, message, htmx
):
    before = queue.stats()
    response = client.post("/tasks", data=form, headers=HTMX if htmx else {})
    shown = message.encode().replace(b"'", b"&#39;")
    if htmx:  # a 400 and a fragment for #form-errors, not a page
        assert response.status_code == 400
        assert shown in response.data
        assert response.data.startswith(b'<p class="error">')
    else:  # a 303 back to the dashboard, which shows the error
        page = follow_refusal(client, response)
        assert shown in form_errors(page) and depth(page) == 0
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
    app = create_app({"QUEUE_WORKERS": 0, "QUEUE_HANDLE_SIGNALS": False, "QUEUE_MAX_QUEUED": 15, "QUEUE_MAX_BATCH": 10})
    queue = get_queue(app)
    try:
        client = app.test_client()
        assert client.post("/tasks", data={"count": "10"}).status_code == 303
        full = b"queue is full: 10 of 15 queued, 10 more requested"
        response = client.post("/tasks", data={"count": "10"}, headers=HTMX)
        assert response.status_code == 503
        assert int(response.headers["Retry-After"]) >= 1
        assert full in response.data
        # Without JavaScript: back to the dashboard, which says so.
        plain = client.post("/tasks", data={"count": "10"})
        assert full in form_errors(follow_refusal(client, plain))
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
    app = create_app({"QUEUE_WORKERS": 1, "QUEUE_HANDLE_SIGNALS": False})
    queue = get_queue(app)
    try:
        queue.pause()
        client = app.test_client()
        workers = client.get("/api/stats").json["workers"]  # the first request started them
        pid = queue.stats().pid
        assert workers == [
            {"name": "worker-1", "state": "paused", "task": None, "done": 0, "pid": pid,
             "host": ""}
        ]
    finally:
        queue.shutdown()


def test_api_add_tasks_and_look_them_up(client, queue):
    response = client.post(
        "/api/tasks", json={"kind": "pretend", "count": 3, "params": {"seconds": 0}}
    )
    assert response.status_code == 202
    ids = response.json["ids"]
    assert response.json == {"ids": ids, "count": 3} and ids == list(range(ids[0], ids[0] + 3))
    assert client.get(f"/api/tasks/{ids[1]}").json["state"] == "queued"
    queue.run_pending()
    task = client.get(f"/api/tasks/{ids[1]}").json
    assert (task["state"], task["kind"], task["params"]) == ("done", "pretend", {"seconds": 0.0})
    assert task["progress"] == 1.0


def test_api_defaults(client, queue):
    answer = client.post("/api/tasks", json={}).json
    assert answer["count"] == 1 and answer["ids"] == [t.id for t in queued(queue)]
    assert queue.get(answer["ids"][0]).kind == "pretend"


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
    refused = client.delete("/api/tasks")  # (GET lists the tasks: see test_web_operator.py)
    assert refused.status_code == 405 and "error" in refused.json


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
        ({"QUEUE_WORKERS": "many"}, "QUEUE_WORKERS must be an integer from 0 to 64, got 'many'"),
        ({"QUEUE_WORKERS": -1}, "QUEUE_WORKERS must be an integer from 0 to 64, got -1"),
        ({"QUEUE_WORK_TIME": -1}, "QUEUE_WORK_TIME must be a number from 0 to 3600"),
        ({"QUEUE_POLL_INTERVAL": 0}, "QUEUE_POLL_INTERVAL must be a number from 0.2 to 60"),
        ({"QUEUE_MAX_QUEUED": 0}, "QUEUE_MAX_QUEUED must be an integer from 1 to 10000000"),
        ({"QUEUE_MAX_BATCH": 50, "QUEUE_MAX_QUEUED": 10}, "QUEUE_MAX_BATCH must not be larger than QUEUE_MAX_QUEUED"),
        ({"QUEUE_HISTORY": "lots"}, "QUEUE_HISTORY must be an integer from 0 to 1000000, or unset "
                                    "for the store's default, got 'lots'"),
        ({"QUEUE_HISTORY": -1}, "QUEUE_HISTORY must be an integer from 0 to 1000000"),
        ({"QUEUE_DEFAULT_KIND": "nope"}, "QUEUE_DEFAULT_KIND must be one of: flaky, pretend, primes, shaky"),
        ({"QUEUE_HANDLE_SIGNALS": "maybe"}, "QUEUE_HANDLE_SIGNALS must be true or false"),
    ],
)
def test_invalid_config_fails_at_start_naming_the_key(config, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        create_app({"QUEUE_HANDLE_SIGNALS": False, **config})


def test_config_comes_from_flask_prefixed_environment(monkeypatch):
    monkeypatch.setenv("FLASK_QUEUE_WORKERS", "3")
    monkeypatch.setenv("FLASK_QUEUE_WORK_TIME", "0.5")
    monkeypatch.setenv("FLASK_QUEUE_HANDLE_SIGNALS", "false")
    app = create_app({"TESTING": True})
    try:
        assert (app.config["QUEUE_WORKERS"], app.config["QUEUE_WORK_TIME"]) == (3, 0.5)
        assert get_queue(app).workers == 3
    finally:
        get_queue(app).shutdown()
    monkeypatch.setenv("FLASK_QUEUE_WORKERS", "lots")
    with pytest.raises(ConfigError, match="QUEUE_WORKERS must be an integer .* FLASK_QUEUE_WORKERS"):
        create_app()


@pytest.mark.parametrize("url,setting,kept", [
    ("memory://", None, 1_000),
    ("sqlite:///queue.db", None, 100_000),
    ("sqlite:///queue.db", "", 100_000),
    ("sqlite:///queue.db", 50, 50),
    ("memory://", "0", 0),
])
def test_history_defaults_to_what_the_store_keeps_well(tmp_path, url, setting, kept):
    """Unset, QUEUE_HISTORY is the store's default: a SQLite file pages a large history
    as fast as a small one (bench row 10); memory searches its history linearly."""
    url = url.replace("queue.db", f"{tmp_path}/queue.db")
    app = create_app({"QUEUE_URL": url, "QUEUE_HISTORY": setting, "QUEUE_WORKERS": 0,
                      "QUEUE_HANDLE_SIGNALS": False, "TESTING": True})
    try:
        assert get_queue(app).store.history_size == kept
    finally:
        get_queue(app).shutdown()


def test_test_config_wins_over_environment(monkeypatch):
    monkeypatch.setenv("FLASK_QUEUE_WORKERS", "3")
    app = create_app({"QUEUE_WORKERS": 0, "QUEUE_HANDLE_SIGNALS": False})
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


# -- controls (issue: a dashboard worth putting on a projector) -----------------------


def post(client, path, data=None, htmx=True):
    return client.post(path, data=data or {}, headers=HTMX if htmx else {})


def test_pause_and_resume_from_the_page(client, queue):
    response = post(client, "/pause")
    assert response.status_code == 200
    assert b'id="paused-flag"' in response.data and b">Resume</button>" in response.data
    assert queue.stats().paused
    plain = post(client, "/resume", htmx=False)
    assert plain.status_code == 303 and plain.headers["Location"] == "/"
    assert not queue.stats().paused
    assert b">Pause</button>" in client.get("/").data


def test_presenter_forms_come_back_to_presenter_mode(client):
    page = client.get("/?present=1").data
    assert b'<body class="present">' in page
    assert b'name="present" value="1"' in page
    assert b'id="history"' not in page and b'id="upcoming"' not in page
    response = client.post("/pause", data={"present": "1"})
    assert response.headers["Location"] == "/?present=1"


def test_workers_plus_minus_and_count():
    app = create_app({"QUEUE_WORKERS": 1, "QUEUE_MAX_WORKERS": 3, "QUEUE_HANDLE_SIGNALS": False})
    queue = get_queue(app)
    try:
        client = app.test_client()
        response = post(client, "/workers", {"delta": "1"})
        assert response.status_code == 200 and b'id="workers-target">2<' in response.data
        assert queue.workers == 2 and len(queue.stats().workers) == 2
        assert post(client, "/workers", {"count": "3"}).status_code == 200
        page = client.get("/").data
        assert b'aria-label="More workers" disabled' in page  # at the maximum
        # A delta past the end (a double click on +) stops there, and is no error.
        response = post(client, "/workers", {"delta": "1"})
        assert response.status_code == 200 and b'id="workers-target">3<' in response.data
        assert post(client, "/workers", {"delta": "-3"}).status_code == 200
        assert queue.workers == 1
        assert post(client, "/workers", {"count": "3"}).status_code == 200
        for data, message in [
            ({"count": "0"}, b"count must be an integer from 1 to 3, got 0"),
            ({"count": "4"}, b"count must be an integer from 1 to 3, got 4"),
            ({"delta": "4"}, b"delta must be an integer from -3 to 3, got 4"),
            ({"delta": "x"}, b"delta must be an integer from -3 to 3, got &#39;x&#39;"),
            ({}, b"delta must be an integer"),
        ]:
            response = post(client, "/workers", data)
            assert response.status_code == 400 and message in response.data
        assert queue.workers == 3
        api = client.post("/api/workers", json={"count": 1})
        assert api.json == {"workers": 1}
        assert client.post("/api/workers", json={"delta": -1}).json == {"workers": 1}
        assert client.post("/api/workers", json={"delta": 3}).json == {"workers": 3}
        assert client.post("/api/workers", json={"count": 9}).status_code == 400
        assert client.post("/api/workers", json={"n": 1}).status_code == 400
    finally:
        queue.shutdown()


def test_cancel_a_queued_task_from_the_page(client, queue):
    ids = queue.submit_many("pretend", 3, {"seconds": 0})
    page = client.get("/").data
    assert f'id="queued-{ids[1]}"'.encode() in page  # listed under Up next, with a button
    assert f'action="/tasks/{ids[1]}/cancel"'.encode() in page
    response = post(client, f"/tasks/{ids[1]}/cancel")
    assert response.status_code == 200
    assert f'id="queued-{ids[1]}"'.encode() not in response.data
    assert b'id="count-cancelled">1<' in response.data
    queue.run_pending()
    assert queue.get(ids[1]).started_at is None
    again = post(client, f"/tasks/{ids[1]}/cancel")
    assert again.status_code == 409 and b"only scheduled, queued or running tasks can be cancelled" in again.data
    assert post(client, "/tasks/999/cancel").status_code == 404
    assert post(client, "/tasks/abc/cancel").status_code == 404


# -- a refused plain post: 303 back, the reason signed into the page's address --------------


def test_a_refused_plain_post_returns_to_its_page_and_says_why(client, queue):
    done = queue.submit("pretend", seconds=0)
    queue.run_pending()
    why = f"task {done} is done; only scheduled, queued or running tasks can be cancelled".encode()
    # From the dashboard, in presenter mode: back there.
    response = client.post(f"/tasks/{done}/cancel", data={"present": "1"})
    assert response.headers["Location"].startswith("/?present=1&refused=")
    page = follow_refusal(client, response)
    assert why in form_errors(page)
    # Its "reload" link (JavaScript off) is the page itself, without the refusal.
    assert b'JavaScript is off: <a href="/?present=1">reload</a>' in page
    # From the task's own page: back to it.
    response = client.post(f"/tasks/{done}/cancel", data={"view": "task"})
    assert why in form_errors(follow_refusal(client, response, f"/tasks/{done}"))
    # A task that is gone has no page: the dashboard says so.
    response = client.post("/tasks/999/retry", data={"view": "task"})
    assert b"no task 999" in form_errors(follow_refusal(client, response))
    # htmx and the JSON API keep their status codes.
    assert post(client, f"/tasks/{done}/cancel").status_code == 409
    assert client.post(f"/api/tasks/{done}/cancel").status_code == 409


def test_a_page_shows_only_refusals_it_signed_for_this_client(make_app, monkeypatch):
    from dashboard.web import notices

    app = make_app(QUEUE_SUBMIT_LIMIT="1/minute")
    client = app.test_client()
    assert client.post("/tasks", data={"count": "1"}).status_code == 303
    refused = client.post("/tasks", data={"count": "1"})
    location = refused.headers["Location"]
    token = urlsplit(location).query.partition("refused=")[2]
    assert b"the limit is 1 task per minute" in form_errors(client.get(location).data)

    # Text in the address is never shown: not plain, not tampered with, not another's.
    forged = client.get("/?refused=Call+555-0100+now").data
    assert b"555" not in forged and form_errors(forged) == b'<p class="error">' + (
        notices.UNVERIFIED.encode() + b"</p>")
    assert notices.UNVERIFIED.encode() in form_errors(client.get(location[:-3] + "AAA").data)
    other = client.get(location, environ_base={"REMOTE_ADDR": "192.0.2.7"}).data
    assert b"the limit is" not in other and notices.UNVERIFIED.encode() in other
    other_app = make_app(SECRET_KEY="another key").test_client().get(location).data
    assert b"the limit is" not in other_app and notices.UNVERIFIED.encode() in other_app
    assert form_errors(client.get("/?refused=").data) == b""
    # Too old: nothing at all (a bookmark, a tab left open).
    monkeypatch.setattr(notices, "MAX_AGE", -1)
    assert form_errors(client.get(location).data) == b""
    monkeypatch.undo()

    # Apps that share SECRET_KEY (processes of one deployment) read each other's.
    first = make_app(SECRET_KEY="shared secret", QUEUE_SUBMIT_LIMIT="1/minute")
    second = make_app(SECRET_KEY="shared secret")
    first.test_client().post("/tasks", data={"count": "1"})
    location = first.test_client().post("/tasks", data={"count": "1"}).headers["Location"]
    assert token not in location
    assert b"the limit is 1 task per minute" in second.test_client().get(location).data


def test_retry_a_failed_task_from_the_page(client, queue):
    failed = queue.submit("flaky", seconds=0, fail_rate=1)
    queue.run_pending()
    page = client.get("/").data
    assert f'action="/tasks/{failed}/retry"'.encode() in page
    response = post(client, f"/tasks/{failed}/retry", htmx=False)
    assert response.status_code == 303
    new = queue.get(failed).retried_as
    assert queue.get(new).retry_of == failed and queue.get(new).params == queue.get(failed).params
    assert f"retried as #{new}".encode() in client.get("/").data
    done = queue.submit("pretend", seconds=0)
    queue.run_pending()
    assert post(client, f"/tasks/{done}/retry").status_code == 409


def test_a_reused_row_still_shows_what_its_task_is_now(client, queue):
    """Rows are rendered once per task, state and page variant and then reused
    (views._Rows): a retried, a cancelled and a finished task show their new selves."""
    failed = queue.submit("flaky", seconds=0, fail_rate=1)
    queue.run_pending()
    waiting = queue.submit("pretend", seconds=0)
    doomed = queue.submit("pretend", seconds=0)
    live = {"HX-Request": "true"}
    for _ in range(2):  # the second poll reuses the rows of the first
        body = client.get("/live", headers=live).data
        assert f'action="/tasks/{failed}/retry"'.encode() in body
        assert f'action="/tasks/{waiting}/cancel"'.encode() in body
    assert post(client, f"/tasks/{failed}/retry").status_code == 200
    assert post(client, f"/tasks/{doomed}/cancel").status_code == 200
    new = queue.get(failed).retried_as
    body = client.get("/live", headers=live).data
    assert f"retried as #{new}".encode() in body
    assert f'action="/tasks/{failed}/retry"'.encode() not in body
    assert f'id="queued-{doomed}"'.encode() not in body
    assert f'<tr id="task-{doomed}" class="state-cancelled">'.encode() in body
    assert f'action="/tasks/{doomed}/retry"'.encode() in body
    queue.run_pending()
    body = client.get("/live", headers=live).data
    assert f'id="queued-{waiting}"'.encode() not in body
    assert f'<tr id="task-{waiting}" class="state-done">'.encode() in body


def test_clear_history_and_reset(client, queue):
    queue.submit_many("pretend", 3, {"seconds": 0})
    queue.run_pending()
    response = post(client, "/history/clear")
    assert b'id="count-done">3<' in response.data
    assert b'<h2 id="history-title">Finished <span class="sub">3</span></h2>' in response.data
    assert b"None of them is listed: the history was cleared" in response.data
    response = post(client, "/reset")
    assert b'id="count-done">0<' in response.data
    assert b"Nothing has finished yet" in response.data
    assert b'hx-confirm="Reset clears the counters' in client.get("/").data


def test_task_detail_page_shows_params_times_error_and_traceback(client, queue):
    failed = queue.submit("flaky", seconds=0, fail_rate=1)
    queue.run_pending()
    page = client.get(f"/tasks/{failed}")
    assert page.status_code == 200
    html = page.data
    assert b'id="task-state">failed<' in html
    assert b"<code>fail_rate=1.0</code>" in html
    assert b'id="task-error">RuntimeError: flaky task gave up' in html
    assert b'class="traceback">Traceback (most recent call last)' in html
    assert b"hx-trigger" not in html.split(b'id="task-detail"')[1].split(b">")[0]  # finished: no poll
    assert f'action="/tasks/{failed}/retry"'.encode() in html


def test_task_detail_polls_while_running_and_answers_304(client, queue):
    task_id = queue.submit("pretend", seconds=0)
    html = client.get(f"/tasks/{task_id}").data
    assert f'hx-get="/tasks/{task_id}/live?queue={queue.identity}"'.encode() in html
    live = client.get(f"/tasks/{task_id}/live", headers=HTMX)
    assert live.status_code == 200 and live.data.lstrip().startswith(b'<section id="task-detail"')
    tag = live.headers["HX-PTag"]
    assert client.get(f"/tasks/{task_id}/live", headers={**HTMX, "HX-PTag": tag}).status_code == 304
    queue.run_pending()
    assert b'id="task-state">done<' in client.get(f"/tasks/{task_id}/live", headers=HTMX).data


def test_cancel_from_the_task_page_shows_that_task_again(client, queue):
    task_id = queue.submit("pretend", seconds=0)
    response = post(client, f"/tasks/{task_id}/cancel", {"view": "task"})
    assert response.data.lstrip().startswith(b'<section id="task-detail"')
    assert b'id="task-state">cancelled<' in response.data
    plain = post(client, f"/tasks/{task_id}/retry", {"view": "task"}, htmx=False)
    assert plain.headers["Location"] == f"/tasks/{queue.get(task_id).retried_as}"  # the new one


def test_unknown_task_pages_are_404_pages(client):
    for path in ("/tasks/99", "/tasks/abc", "/tasks/99/live"):
        response = client.get(path)
        assert response.status_code == 404
        assert b'id="message">no task' in response.data


def test_lookup_by_id(client, queue):
    task_id = queue.submit("pretend", seconds=0)
    response = client.get(f"/tasks/lookup?id=%23{task_id}")
    assert response.status_code == 303 and response.headers["Location"] == f"/tasks/{task_id}"
    bad = client.get("/tasks/lookup?id=<b>1")
    assert bad.status_code == 400
    assert (b"id must be a task id like 42 (task ids are 1 to 64 letters, digits, &#39;-&#39; "
            b"and &#39;_&#39;), got &#39;&lt;b&gt;1&#39;" in bad.data)


def test_params_and_errors_are_escaped_everywhere(client, queue):
    from dashboard.tasks import Str

    registry = queue.registry

    def echo(ctx, text=""):
        raise ValueError(text)

    registry._kinds.pop("echo", None)
    registry.task("echo", params={"text": Str(100)})(echo)
    try:
        probe = "<script>alert(1)</script>"
        task_id = queue.submit("echo", text=probe)
        page = client.get("/").data
        assert probe.encode() not in page  # queued: params shown in Up next
        queue.run_pending()
        for html in (client.get("/").data, client.get(f"/tasks/{task_id}").data):
            assert probe.encode() not in html
            assert b"&lt;script&gt;alert(1)&lt;/script&gt;" in html
    finally:
        registry._kinds.pop("echo", None)


def test_api_controls(client, queue):
    assert client.post("/api/pause").json == {"paused": True}
    assert client.get("/api/stats").json["paused"] is True
    assert client.post("/api/resume").json == {"paused": False}
    task_id = queue.submit("pretend", seconds=0)
    cancelled = client.post(f"/api/tasks/{task_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json["state"] == "cancelled"
    retried = client.post(f"/api/tasks/{task_id}/retry")
    assert retried.status_code == 202 and retried.json["retry_of"] == task_id
    queued_retry = retried.json["id"]
    assert client.post(f"/api/tasks/{queued_retry}/retry").status_code == 409  # not failed
    assert client.post("/api/tasks/777/cancel").status_code == 404


def test_chart_draws_the_depth_over_time(client, queue):
    queue.submit_many("pretend", 5, {"seconds": 0})
    queue.run_pending(2)
    html = client.get("/live/chart").data
    assert b'<svg viewBox="0 0 600 158" role="img"' in html
    assert b'aria-label="Queue depth over the last minute: now 3, peak 5."' in html
    assert b'<polyline class="line" points="' in html
    assert b"style=" not in html  # nothing a strict CSP would block


def test_chart_window_follows_the_activity_from_one_to_five_minutes(queue):
    from dashboard.web.chart import depth_chart

    snap = queue.stats()
    now = 10_000.0
    at = lambda ago, depth: (int(now - ago), depth, depth)  # noqa: E731
    cases = [((), 1), ((at(20, 3),), 1), ((at(150, 3), at(10, 1)), 3), ((at(299, 9),), 5)]
    for series, minutes in cases:
        chart = depth_chart(snap._replace(series=series, taken_at=now, queued=1))
        assert chart["minutes"] == minutes, series
    chart = depth_chart(snap._replace(series=(at(30, 4), at(10, 2)), taken_at=now, queued=2))
    # A step line: up to 4 at -30 s, down to 2 at -10 s, on to now at 2.
    assert chart["points"] == "300,28 500,28 500,84 600,84"
    assert chart["top"] == 5


def test_a_tasks_result_is_on_its_page_and_in_the_api(client, queue):
    task_id = queue.submit("primes", limit=1000)
    assert client.get(f"/api/tasks/{task_id}").json["result"] is None
    assert 'id="task-result"' not in client.get(f"/tasks/{task_id}").text
    queue.run_pending()
    assert client.get(f"/api/tasks/{task_id}").json["result"] == 168
    page = client.get(f"/tasks/{task_id}").text
    assert '<h3>Result</h3>\n  <pre class="result" id="task-result" tabindex="0" role="region" aria-label="Result">168</pre>' in page


def test_a_keyed_submit_through_the_api_says_whether_it_queued(client, queue):
    body = {"kind": "pretend", "params": {"seconds": 0}, "key": "report-42"}
    first = client.post("/api/tasks", json=body)
    assert first.status_code == 202
    (task_id,) = first.json["ids"]
    assert first.json == {"ids": [task_id], "count": 1, "created": True}
    again = client.post("/api/tasks", json={**body, "params": {"seconds": 1}})
    assert again.status_code == 200
    assert again.json == {"ids": [task_id], "count": 0, "created": False}
    assert queue.stats().submitted == 1
    assert '<dd id="task-key"><code>report-42</code></dd>' in client.get(f"/tasks/{task_id}").text
    assert client.get(f"/api/tasks/{task_id}").json["key"] == "report-42"

    many = client.post("/api/tasks", json={**body, "count": 2})
    assert many.status_code == 400
    assert many.json == {"error": "count must be 1 with a key: a key names one task"}
    bad = client.post("/api/tasks", json={**body, "key": ""})
    assert bad.status_code == 400 and bad.json["error"].startswith("key must be a string of 1 to")
    assert queue.stats().submitted == 1


def test_a_keyed_submit_that_queues_nothing_costs_nothing(make_app):
    app = make_app(QUEUE_SUBMIT_LIMIT="2/minute")
    client = app.test_client()
    body = {"kind": "pretend", "key": "once"}
    assert client.post("/api/tasks", json=body).status_code == 202  # 1 of 2
    for _ in range(3):
        assert client.post("/api/tasks", json=body).status_code == 200  # nothing queued
    assert client.post("/api/tasks", json={"kind": "pretend"}).status_code == 202  # 2 of 2
    assert client.post("/api/tasks", json={"kind": "pretend"}).status_code == 429


def test_a_delayed_task_from_the_api_and_the_form_is_listed_as_scheduled(client, queue):
    empty = client.get("/live/scheduled", headers=HTMX).text
    assert empty.startswith('<section id="scheduled"') and " hidden>" in empty.split("\n")[0]
    added = client.post("/api/tasks", json={"kind": "pretend", "count": 2, "delay": 600})
    assert added.status_code == 202
    first, second = added.json["ids"]
    assert client.post("/tasks", data={"kind": "pretend", "delay": "30"}).status_code == 303
    stats = client.get("/api/stats").json
    assert (stats["queued"], stats["scheduled"]) == (0, 3)
    page = client.get("/").text
    assert '<span class="hint" id="count-scheduled">+ 3 scheduled</span>' in page
    region = page[page.index('<section id="scheduled"'):page.index('<section id="upcoming"')]
    assert " hidden" not in region.split("\n")[0]
    assert region.index(f'id="scheduled-{first}"') > region.index('id="scheduled-')  # soonest first
    assert f'action="/tasks/{first}/cancel"' in region and 'class="countdown"' in region
    detail = client.get(f"/tasks/{first}").text
    assert 'id="task-state">scheduled<' in detail and 'id="task-due"' in detail
    assert client.get(f"/api/tasks/{second}").json["due_at"] is not None
    assert client.post(f"/api/tasks/{second}/cancel").json["state"] == "cancelled"

    bad = client.post("/api/tasks", json={"kind": "pretend", "delay": -5})
    assert bad.status_code == 400
    assert bad.json == {"error": "delay must be a number of seconds from 0 to 2592000 (30 days), "
                                 "got -5"}
    assert client.get("/api/stats").json["submitted"] == 3


def test_a_task_retried_automatically_shows_its_attempts(client, queue):
    task_id = queue.submit("shaky", seconds=0, fail_rate=1)
    queue.run_pending()  # attempt 1 fails: scheduled again, a second or so later
    scheduled = client.get(f"/tasks/{task_id}").text
    assert 'id="task-state">scheduled<' in scheduled
    assert '<dd id="task-attempt">2 of 3, next <time class="countdown"' in scheduled
    assert "<h3>Earlier attempts</h3>" in scheduled and "<h3>Last error</h3>" in scheduled
    assert client.get("/api/stats").json["scheduled"] == 1
    wait_for(lambda: queue.run_pending() and queue.get(task_id).finished, 30,
             "the last attempt")
    failed = client.get(f"/tasks/{task_id}").text
    assert '<dd id="task-attempt">3 of 3 tried</dd>' in failed
    attempts = failed[failed.index('id="task-attempts"'):failed.index("</ol>", failed.index('id="task-attempts"'))]
    assert attempts.count("<li>attempt ") == 2 and attempts.count("flaky task gave up") == 2
    data = client.get(f"/api/tasks/{task_id}").json
    assert data["state"] == "failed" and [e["attempt"] for e in data["errors"]] == [1, 2]
    assert client.get("/api/stats").json["failed"] == 1


def test_a_time_limit_through_the_api(client, queue):
    added = client.post("/api/tasks", json={"kind": "pretend", "params": {"seconds": 5},
                                            "time_limit": 0.05})
    assert added.status_code == 202
    (task_id,) = added.json["ids"]
    assert client.get(f"/api/tasks/{task_id}").json["time_limit"] == 0.05
    queue.run_pending()  # pretend looks at ctx.cancelled: it stops at the limit
    info = client.get(f"/api/tasks/{task_id}").json
    assert (info["state"], info["error"]) == ("failed", "timed out after 0.05s")
    assert '<dd id="task-time-limit">0.05s</dd>' in client.get(f"/tasks/{task_id}").text
    bad = client.post("/api/tasks", json={"kind": "pretend", "time_limit": 0})
    assert bad.status_code == 400 and bad.json["error"].startswith(
        "time_limit must be a number of seconds above 0")


def test_what_a_task_logs_shows_on_its_page_as_it_runs_escaped(make_app):
    import threading

    app = make_app()
    queue = get_queue(app)
    client = app.test_client()
    task_id = queue.submit("primes", limit=200_000)
    runner = threading.Thread(target=queue.run_pending)
    original = queue.registry.get("primes").fn  # the demo's kind, talking first (undone below)
    release = threading.Event()

    def talk_then_wait(ctx, limit):
        ctx.logger.info("counting below %d <script>", limit)
        release.wait(30)
        return original(ctx, limit=limit)

    kind = queue.registry.get("primes")
    object.__setattr__(kind, "fn", talk_then_wait)
    try:
        runner.start()
        live = wait_for(lambda: (lambda text: "task-log" in text and text)(
            client.get(f"/tasks/{task_id}/live", headers=HTMX).text), 30, "the line to show")
        assert "INFO dashboard.task.primes: counting below 200000 &lt;script&gt;" in live
        assert "<h3>Log <span class=\"sub\">1 line</span></h3>" in live
    finally:
        release.set()
        runner.join(30)
        object.__setattr__(kind, "fn", original)
    assert client.get(f"/api/tasks/{task_id}").json["logs"][0].endswith(
        "INFO dashboard.task.primes: counting below 200000 <script>")
