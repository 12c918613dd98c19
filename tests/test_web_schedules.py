"""Periodic schedules on the dashboard, in its forms and in the JSON API.

Each test builds an app of its own kinds and schedules, with no worker
threads: ``run_schedules(now=...)`` queues a due run and ``run_pending()``
runs it, in the test's thread. The schedules are due on a leap day and once
in 366 days, so no due time passes while a test runs and only the test
queues a run.
"""

from __future__ import annotations

import re

import pytest
from flask import Flask

from dashboard import Int, QueueExtension, Registry, create_app, get_queue
from dashboard.backend import Capabilities
from dashboard.local.queue import WorkQueue
from dashboard.web import bp

HTMX = {"HX-Request": "true"}
SECRET = "schedules-secret-0123456789"


@pytest.fixture
def make():
    """``make(schedules=True, **config)``: an app with a kind ``tidy`` and, unless told
    not to, two schedules of it; its queue shut down at the end."""
    made = []

    def build(schedules=True, **config):
        registry = Registry()

        @registry.task("tidy", params={"level": Int(0, 9)})
        def tidy(ctx, level=1):
            return level

        if schedules:
            registry.schedule("leap-tidy", "tidy", cron="0 3 29 2 *", params={"level": 2})
            registry.schedule("yearly", "tidy", every=366 * 24 * 3600)
        app = Flask("schedules_test_app")
        app.config.update(TESTING=True, QUEUE_WORKERS=0, QUEUE_HANDLE_SIGNALS=False,
                          QUEUE_WORK_TIME=0, **config)
        QueueExtension(registry=registry).init_app(app)
        app.register_blueprint(bp)
        made.append(app)
        return app

    yield build
    for app in made:
        get_queue(app).shutdown(timeout=5)


def region(html: str) -> str:
    """The Schedules section of a page or poll."""
    match = re.search(r'<section id="schedules"[^>]*>.*?</section>', html, re.S)
    assert match, "no Schedules section"
    return match.group(0)


def row(html: str, name: str) -> str:
    match = re.search(rf'<tr id="schedule-{re.escape(name)}">.*?</tr>', region(html), re.S)
    assert match, f"no row for schedule {name}"
    return match.group(0)


def queued(queue):
    return list(queue.stats(0, 100).upcoming)


# -- the region ----------------------------------------------------------------------


def test_without_schedules_the_region_is_hidden_and_empty(make):
    client = make(schedules=False).test_client()
    for path in ("/", "/live/schedules"):
        section = region(client.get(path, headers=HTMX).text)
        assert section.startswith('<section id="schedules" class="schedules" '
                                  'aria-labelledby="schedules-title" hidden>')
        assert "<table" not in section and "Run now" not in section


def test_each_schedule_is_listed_after_the_history_with_a_countdown(make):
    app = make()
    client = app.test_client()
    page = client.get("/").text
    section = region(page)
    assert " hidden" not in section.split(">", 1)[0]
    # Below the burn-down: the history comes first.
    assert page.index('id="history"') < page.index('id="schedules"')
    infos = {s.name: s for s in get_queue(app).schedules()}
    leap = row(page, "leap-tidy")
    assert '<th scope="row">leap-tidy</th>' in leap
    assert '<span class="kind">tidy</span> <span class="params">level=2 </span>' in leap
    assert '<code title="At 03:00 on February 29 (UTC)">0 3 29 2 *</code>' in leap
    assert f'data-due="{int(infos["leap-tidy"].next_due * 1000)}"' in leap
    assert '<time class="countdown"' in leap
    assert '<td class="last">—</td>' in leap and '<td class="num">0</td>' in leap
    assert 'action="/schedules/leap-tidy/run"' in leap and ">Run now</button>" in leap
    yearly = row(page, "yearly")
    assert "every 366 days" in yearly
    assert f'data-due="{int(infos["yearly"].next_due * 1000)}"' in yearly
    # A table a screen reader can name and navigate.
    assert '<table aria-labelledby="schedules-title">' in section
    assert section.count('<th scope="col">') == 7


def test_presenter_mode_leaves_the_schedules_out(make):
    client = make().test_client()
    assert 'id="schedules"' not in client.get("/?present=1").text
    assert 'id="schedules"' not in client.get("/live?present=1", headers=HTMX).text


# -- Run now -------------------------------------------------------------------------


def test_run_now_from_the_page_queues_the_schedules_task_and_shows_it_as_last_run(make):
    app = make()
    queue = get_queue(app)
    client = app.test_client()
    next_due = queue.schedules()[0].next_due
    answer = client.post("/schedules/leap-tidy/run", data={}, headers=HTMX)
    assert answer.status_code == 200
    (task,) = queued(queue)
    assert (task.kind, task.params, task.schedule) == ("tidy", {"level": 2}, "leap-tidy")
    # The answer is the live regions, the run listed as the schedule's last.
    last = row(answer.text, "leap-tidy")
    assert f'<a href="/tasks/{task.id}">#{task.id}</a>' in last
    assert '<span class="state-queued"><span class="badge">queued</span></span>' in last
    assert '<td class="num">1</td>' in last
    assert 'id="form-errors"' in answer.text
    queue.run_pending()
    assert '<span class="badge">done</span>' in row(client.get("/").text, "leap-tidy")
    # The next due time stays: Run now is a run besides the schedule's own.
    assert queue.schedules()[0].next_due == next_due


def test_run_now_as_a_plain_form_post_answers_303_back_to_the_page_it_came_from(make):
    app = make()
    queue = get_queue(app)
    client = app.test_client()
    home = client.post("/schedules/yearly/run", data={})
    assert home.status_code == 303 and home.headers["Location"] == "/"
    present = client.post("/schedules/yearly/run", data={"present": "1"})
    assert present.status_code == 303 and present.headers["Location"] == "/?present=1"
    assert [t.schedule for t in queued(queue)] == ["yearly", "yearly"]
    assert {s.name: s.runs for s in queue.schedules()} == {"leap-tidy": 0, "yearly": 2}


def test_a_run_the_scheduler_queued_shows_as_last_run_and_on_the_tasks_page(make):
    app = make()
    queue = get_queue(app)
    client = app.test_client()
    client.get("/")
    due = queue.schedules()[0].next_due
    queue.run_schedules(now=due + 1)
    (task,) = [t for t in queued(queue) if t.schedule == "leap-tidy"]
    assert task.due_at == due
    page = client.get("/").text
    leap = row(page, "leap-tidy")
    assert f'href="/tasks/{task.id}"' in leap
    next_due = queue.schedules()[0].next_due
    assert next_due > due and f'data-due="{int(next_due * 1000)}"' in leap

    detail = client.get(f"/tasks/{task.id}").text
    assert ('<dt>schedule</dt><dd id="task-schedule"><a href="/#schedule-leap-tidy">'
            'leap-tidy</a></dd>') in detail
    assert 'id="task-due"' in detail
    plain = queue.submit("tidy")
    assert "task-schedule" not in client.get(f"/tasks/{plain}").text


def test_a_last_run_the_history_forgot_says_so_and_links_nowhere(make):
    app = make()
    queue = get_queue(app)
    client = app.test_client()
    task_id = client.post("/api/schedules/leap-tidy/run").json["id"]
    queue.run_pending()
    queue.clear_history()
    last = row(client.get("/").text, "leap-tidy")
    assert f"#{task_id} <span class=\"hint\">forgotten</span>" in last
    assert "/tasks/" not in last


# -- the JSON API --------------------------------------------------------------------


def test_the_api_lists_the_schedules_and_runs_one(make):
    app = make()
    queue = get_queue(app)
    client = app.test_client()
    listed = client.get("/api/schedules")
    assert listed.status_code == 200
    assert listed.json == {"schedules": [s.to_dict() for s in queue.schedules()]}
    assert [s["name"] for s in listed.json["schedules"]] == ["leap-tidy", "yearly"]
    assert listed.json["schedules"][0]["expression"] == "0 3 29 2 *"

    ran = client.post("/api/schedules/leap-tidy/run")
    assert ran.status_code == 202
    assert ran.json == {"id": ran.json["id"], "schedule": "leap-tidy"}
    assert queue.get(ran.json["id"]).schedule == "leap-tidy"
    again = client.get("/api/schedules").json["schedules"][0]
    assert (again["last_task"], again["last_state"], again["runs"]) == (ran.json["id"],
                                                                        "queued", 1)
    assert client.get("/api/stats").json["schedules"] == client.get(
        "/api/schedules").json["schedules"]


def test_the_api_answers_an_unknown_schedule_with_404_naming_the_known_ones(make):
    app = make()
    client = app.test_client()
    unknown = client.post("/api/schedules/weekly/run")
    assert unknown.status_code == 404
    assert unknown.json == {"error": "no schedule 'weekly'; schedules are: leap-tidy, yearly"}
    assert queued(get_queue(app)) == []


def test_the_run_url_takes_posts_only():
    """On the demo app, whose nightly schedule this is, and whose API answers a 405 in JSON."""
    app = create_app({"TESTING": True, "QUEUE_WORKERS": 0, "QUEUE_HANDLE_SIGNALS": False})
    try:
        client = app.test_client()
        answer = client.get("/api/schedules/nightly-cleanup/run")
        assert answer.status_code == 405 and "405 Method Not Allowed" in answer.json["error"]
        assert client.get("/schedules/nightly-cleanup/run").status_code == 405
        assert queued(get_queue(app)) == []
        assert client.post("/api/schedules/nightly-cleanup/run").status_code == 202
    finally:
        get_queue(app).shutdown(timeout=5)


def test_bad_names_get_a_clean_404_and_queue_nothing(make):
    app = make()
    client = app.test_client()
    for name in ("a" * 300, "%00", "%3Cscript%3E", "..%2Fx", "leap-tidy%0A"):
        for headers in (HTMX, {}):
            form = client.post(f"/schedules/{name}/run", data={"view": "task"}, headers=headers)
            # "..%2Fx" is no name the URL map takes; a plain post of another goes back
            # home with the reason (see test_views), htmx gets the reason itself.
            wanted = 404 if headers or name == "..%2Fx" else 303
            assert form.status_code == wanted, (name, headers, form.status_code)
            assert "<script>" not in form.text
        api = client.post(f"/api/schedules/{name}/run")
        assert api.status_code == 404, name
    assert queued(get_queue(app)) == []
    long = client.post(f"/api/schedules/{'a' * 300}/run").json["error"]
    assert len(long) < 120 and long.endswith("schedules are: leap-tidy, yearly")
    # A "view" field on a form that is about no task gets the live regions, not a 500.
    assert client.post("/schedules/yearly/run", data={"view": "task"},
                       headers=HTMX).status_code == 200


def test_a_backend_that_runs_no_schedules_says_so_and_refuses_run_now(make, monkeypatch):
    app = make()
    monkeypatch.setattr(WorkQueue, "capabilities", property(
        lambda self: Capabilities(schedules=False)))
    client = app.test_client()
    section = region(client.get("/").text)
    assert " hidden" not in section.split(">", 1)[0]
    assert "This backend does not run schedules" in section and "Run now" not in section
    refused = client.post("/api/schedules/leap-tidy/run")
    assert refused.status_code == 400
    assert refused.json == {"error": "schedules are not run by this backend (the queue in "
                                     "this process's memory)"}
    form = client.post("/schedules/leap-tidy/run", data={}, headers=HTMX)
    assert form.status_code == 400 and "not run by this backend" in form.text
    assert queued(get_queue(app)) == []


# -- who may run one -----------------------------------------------------------------


def test_public_read_shows_the_schedules_but_run_now_needs_the_token(make):
    app = make(QUEUE_ACCESS_TOKEN=SECRET, QUEUE_PUBLIC_READ=True)
    client = app.test_client()
    section = region(client.get("/").text)
    assert "leap-tidy" in section and "Run now" not in section
    assert client.get("/api/schedules").status_code == 200
    assert client.post("/schedules/leap-tidy/run", data={}).status_code == 401
    assert client.post("/schedules/leap-tidy/run", data={}, headers=HTMX).status_code == 401
    assert client.post("/api/schedules/leap-tidy/run").status_code == 401
    assert queued(get_queue(app)) == []
    bearer = {"Authorization": f"Bearer {SECRET}"}
    assert "Run now" in region(client.get("/", headers=bearer).text)
    assert client.post("/api/schedules/leap-tidy/run", headers=bearer).status_code == 202


def test_a_cross_site_run_now_is_refused(make):
    app = make()
    refused = app.test_client().post("/schedules/leap-tidy/run", data={}, headers={
        "Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"})
    assert refused.status_code == 403
    assert queued(get_queue(app)) == []


def test_run_now_counts_against_the_submit_limit(make):
    app = make(QUEUE_SUBMIT_LIMIT="1 per minute")
    client = app.test_client()
    assert client.post("/api/schedules/yearly/run").status_code == 202
    limited = client.post("/api/schedules/yearly/run")
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert client.post("/schedules/yearly/run", data={}, headers=HTMX).status_code == 429
    # An unknown name is answered before the limit: a 404, not a 429.
    assert client.post("/api/schedules/weekly/run").status_code == 404
    assert len(queued(get_queue(app))) == 1


# -- the poll ------------------------------------------------------------------------


def test_the_poll_is_304_until_a_run_then_shows_it(make):
    app = make()
    queue = get_queue(app)
    client = app.test_client()
    tag = client.get("/live", headers=HTMX).headers["HX-PTag"]
    assert client.get("/live", headers={**HTMX, "HX-PTag": tag}).status_code == 304
    task_id = queue.run_schedule("yearly")
    changed = client.get("/live", headers={**HTMX, "HX-PTag": tag})
    assert changed.status_code == 200 and changed.headers["HX-PTag"] != tag
    assert f'href="/tasks/{task_id}"' in row(changed.text, "yearly")


# -- the seam ------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_the_schedule_views_use_only_the_backend_seam(make_app, monkeypatch, store):
    """As test_backend_seam does for the other views: the demo's nightly schedule
    listed, run from the page and from the API, through a queue that answers only
    the seam's names."""
    from test_backend_seam import SeamOnly

    from dashboard.ext import QueueExtension

    app = make_app(store=store)
    real = QueueExtension.queue_for
    queue = real(app.extensions["dashboard"], app)
    monkeypatch.setattr(QueueExtension, "queue_for", lambda self, a: SeamOnly(real(self, a)))
    client = app.test_client()
    assert "nightly-cleanup" in region(client.get("/").text)
    assert client.get("/live/schedules", headers=HTMX).status_code == 200
    assert client.get("/api/schedules").json["schedules"][0]["name"] == "nightly-cleanup"
    assert client.post("/schedules/nightly-cleanup/run", data={}, headers=HTMX).status_code == 200
    assert client.post("/schedules/nightly-cleanup/run", data={}).status_code == 303
    ran = client.post("/api/schedules/nightly-cleanup/run")
    assert ran.status_code == 202
    assert client.post("/api/schedules/weekly/run").status_code == 404
    assert f"#{ran.json['id']}" in client.get(f"/tasks/{ran.json['id']}").text
    monkeypatch.undo()  # before make_app shuts the real queue down
    assert [t.schedule for t in queued(queue)] == ["nightly-cleanup"] * 3
