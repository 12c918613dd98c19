"""The queue as a Flask extension in someone else's app: Flask's conventions.

Settings are prefixed ``QUEUE_`` so none collides with the app's own; an app
with its own kinds starts without naming a default; setting up the queue
installs none of the dashboard's parts, which come with mounting its blueprint
and apply to its routes only.
"""

from __future__ import annotations

import logging

import pytest
from flask import Flask, render_template_string

from dashboard import QueueExtension, Registry, get_queue
from support import wait_for


@pytest.fixture
def own_app():
    registry = Registry()

    @registry.task("resize")
    def resize(ctx):
        pass

    @registry.task("email")
    def email(ctx):
        pass

    app = Flask("someone_elses_app")
    # The app's own settings of these names are its business, not the queue's.
    app.config.update(WORKERS=99, HISTORY="the app's own", QUEUE_WORKERS=0,
                      QUEUE_HANDLE_SIGNALS=False)
    extension = QueueExtension(registry=registry)
    extension.init_app(app)

    @app.get("/hello")
    def hello():
        return "hello"

    yield app, extension
    get_queue(app).shutdown()


def test_an_app_with_its_own_kinds_starts_without_naming_a_default(own_app):
    """Before: DEFAULT_KIND must be one of: email, resize; got 'pretend'."""
    app, extension = own_app
    assert extension.default_kind(app) == "email"  # the first by name
    app.config["QUEUE_DEFAULT_KIND"] = "resize"
    assert extension.default_kind(app) == "resize"


def test_the_apps_own_settings_of_the_old_names_are_left_alone(own_app):
    app, _ = own_app
    assert get_queue(app).workers == 0  # QUEUE_WORKERS, not the app's WORKERS=99
    assert app.config["WORKERS"] == 99 and app.config["HISTORY"] == "the app's own"


def test_setting_up_the_queue_installs_nothing_of_the_dashboard(own_app):
    app, _ = own_app
    assert "dashboard.limiter" not in app.extensions
    response = app.test_client().get("/hello")
    assert response.status_code == 200
    assert "Content-Security-Policy" not in response.headers


def test_mounting_the_dashboard_brings_its_parts_for_its_routes_only(own_app):
    from dashboard.web import bp

    app, _ = own_app
    app.register_blueprint(bp, url_prefix="/queue")
    assert "dashboard.limiter" in app.extensions
    client = app.test_client()
    page = client.get("/queue/")
    assert page.status_code == 200 and "Content-Security-Policy" in page.headers
    assert b'<option value="email" selected' in page.data
    hello = client.get("/hello")
    assert hello.status_code == 200 and "Content-Security-Policy" not in hello.headers


def test_an_old_setting_name_in_the_environment_is_named_in_a_warning(monkeypatch, caplog):
    monkeypatch.setenv("FLASK_WORKERS", "4")
    app = Flask("upgraded_app")
    app.config.update(QUEUE_WORKERS=0, QUEUE_HANDLE_SIGNALS=False)
    with caplog.at_level(logging.WARNING, logger="dashboard"):
        QueueExtension(registry=Registry()).init_app(app)
    try:
        assert ("FLASK_WORKERS is set but is no longer read: the setting is now QUEUE_WORKERS "
                "(FLASK_QUEUE_WORKERS in the environment)") in caplog.text
    finally:
        get_queue(app).shutdown()


def test_a_default_kind_that_is_not_registered_is_refused_by_name():
    from dashboard import ConfigError

    app = Flask("misnamed")
    app.config.update(QUEUE_WORKERS=0, QUEUE_HANDLE_SIGNALS=False, QUEUE_DEFAULT_KIND="pretend")
    registry = Registry()

    @registry.task("email")
    def email(ctx):
        pass

    with pytest.raises(ConfigError, match="QUEUE_DEFAULT_KIND must be one of: email; got 'pretend'"):
        QueueExtension(registry=registry).init_app(app)


def test_an_apps_own_index_and_base_templates_do_not_replace_the_dashboards(tmp_path):
    """Flask looks in the app's templates first: the dashboard's plain names
    (index.html, base.html) were replaced by any app that had its own."""
    from dashboard.web import bp

    (tmp_path / "index.html").write_text("THE APP'S OWN INDEX")
    (tmp_path / "base.html").write_text("THE APP'S OWN BASE {% block main %}{% endblock %}")
    app = Flask("templated_app", template_folder=str(tmp_path))
    app.config.update(QUEUE_WORKERS=0, QUEUE_HANDLE_SIGNALS=False)
    registry = Registry()

    @registry.task("email")
    def email(ctx):
        pass

    QueueExtension(registry=registry).init_app(app)
    app.register_blueprint(bp, url_prefix="/queue")
    try:
        page = app.test_client().get("/queue/")
        assert page.status_code == 200
        assert b"THE APP'S OWN" not in page.data and b'id="queue-depth"' in page.data
    finally:
        get_queue(app).shutdown()


def test_an_apps_own_template_filters_and_globals_stay_its_own():
    """Flask registers a blueprint's template filters for the whole app: ours were
    plain names (seconds, duration, clock, isotime) and a State global, so
    mounting the dashboard replaced an app's own filters of those names."""
    from dashboard.web import bp

    app = Flask("filtered_app")
    app.config.update(QUEUE_WORKERS=0, QUEUE_HANDLE_SIGNALS=False)
    registry = Registry()

    @registry.task("email")
    def email(ctx):
        pass

    for name in ("seconds", "duration", "clock", "isotime"):
        app.add_template_filter(lambda value, name=name: f"app {name}({value})", name)

    @app.context_processor
    def states():
        return {"State": "the app State"}

    @app.get("/own")
    def own():
        return render_template_string(
            "{{ 5|seconds }} {{ 5|duration }} {{ 5|clock }} {{ 5|isotime }} {{ State }}")

    QueueExtension(registry=registry).init_app(app)
    app.register_blueprint(bp, url_prefix="/queue")
    try:
        client = app.test_client()
        assert client.get("/own").text == ("app seconds(5) app duration(5) app clock(5) "
                                           "app isotime(5) the app State")
        assert b'id="queue-depth"' in client.get("/queue/").data
    finally:
        get_queue(app).shutdown()


def test_the_api_mounted_under_a_prefix_answers_refusals_as_json():
    """The API's refusals were JSON only under /api/: mounted at /queue, a missing
    token on /queue/api/stats got a text/plain 401 (the check read the
    blueprint's own url_prefix, not where the app mounted it)."""
    from dashboard.web import bp

    app = Flask("mounted_app")
    app.config.update(QUEUE_WORKERS=0, QUEUE_HANDLE_SIGNALS=False,
                      QUEUE_ACCESS_TOKEN="a-long-enough-secret")
    QueueExtension(registry=Registry()).init_app(app)
    app.register_blueprint(bp, url_prefix="/queue")
    try:
        client = app.test_client()
        refused = client.get("/queue/api/stats")
        assert refused.status_code == 401 and refused.is_json, refused.data
        page = client.get("/queue/")
        assert page.status_code == 401 and not page.is_json
    finally:
        get_queue(app).shutdown()


def test_add_work_offers_the_parameters_of_the_apps_own_kinds():
    """The form had one field, "Seconds (pretend, flaky)", in every app: an app's own
    kinds could be chosen but not given their parameters, so one that needs one
    (send_report's user_id) could never be added from the page."""
    from dashboard import Bool, Float, Int, Str
    from dashboard.web import bp

    registry = Registry()

    @registry.task("send_report", params={"user_id": Int(1, 10**9),
                                          "fmt": Str(choices=("pdf", "csv"))})
    def send_report(ctx, user_id, fmt="pdf"):
        pass

    @registry.task("resize", params={"scale": Float(0.1, 4), "note": Str(max_length=30),
                                     "sharpen": Bool()})
    def resize(ctx, scale=1.0, note=None, sharpen=False):
        pass

    app = Flask("reports_app")
    app.config.update(QUEUE_WORKERS=0, QUEUE_HANDLE_SIGNALS=False)
    QueueExtension(registry=registry).init_app(app)
    app.register_blueprint(bp, url_prefix="/queue")
    client = app.test_client()
    try:
        page = client.get("/queue/").text
        assert 'name="seconds"' not in page
        assert ('<input name="user_id" type="number" placeholder="required" min="1" '
                'max="1000000000" step="1" inputmode="numeric">') in page
        assert "User id\n          <span class=\"hint\">(send_report, required)</span>" in page
        assert ('<select name="fmt">\n            <option value="">pdf (default)</option>\n'
                '            <option>pdf</option><option>csv</option>') in page
        assert ('<input name="scale" type="number" placeholder="1" min="0.1" max="4" '
                'step="any" inputmode="decimal">') in page
        assert '<input name="note" type="text" placeholder="default" maxlength="30">' in page
        assert '<option value="">false (default)</option>' in page  # sharpen

        queue = get_queue(app)
        refused = client.post("/queue/tasks", data={"kind": "send_report", "fmt": "csv"},
                              headers={"HX-Request": "true"})
        assert refused.status_code == 400 and "user_id is required by &#39;send_report&#39;" in refused.text
        added = client.post("/queue/tasks", data={"kind": "send_report", "user_id": "42",
                                                  "fmt": "csv", "scale": "2"})
        assert added.status_code == 303
        (task,) = queue.stats(0, 10).upcoming
        assert (task.kind, task.params) == ("send_report", {"user_id": 42, "fmt": "csv"})
    finally:
        get_queue(app).shutdown()


def test_a_task_past_its_time_limit_is_shown_overdue_then_failed_as_timed_out():
    """A thread cannot be killed: past its limit the task holds its worker, and the
    page says so, until it returns."""
    import threading

    from dashboard.web import bp

    registry = Registry()
    release = threading.Event()

    @registry.task("stubborn", time_limit=0.05)
    def stubborn(ctx):
        release.wait(30)  # never looks at ctx.cancelled

    app = Flask("limited_app")
    app.config.update(QUEUE_WORKERS=0, QUEUE_HANDLE_SIGNALS=False)
    QueueExtension(registry=registry).init_app(app)
    app.register_blueprint(bp)
    queue = get_queue(app)
    client = app.test_client()
    task_id = queue.submit("stubborn")
    runner = threading.Thread(target=queue.run_pending)
    runner.start()
    try:
        page = wait_for(lambda: (lambda text: "task-overdue-note" in text and text)(
            client.get(f"/tasks/{task_id}").text), 30, "the page to say overdue")
        assert '<dd id="task-time-limit">0.05s <span class="badge warn" id="task-overdue">' in page
        assert "keeps its worker until it returns" in page
        assert client.get(f"/api/tasks/{task_id}").json["overdue"] is True
    finally:
        release.set()
        runner.join(30)
        queue.shutdown()
    info = queue.get(task_id)
    assert info.state.value == "failed" and info.error == "timed out after 0.05s"
