"""The operator's view: find any task, act on many at once, see each kind's health.

Through Flask's test client on the in-memory store (no worker threads; tasks run
with ``run_pending()``): the list page and its filter form, paging with the
backend's cursors, every query parameter checked (400 naming the field, on the page,
to htmx, in the API and to the poll), the poll's 304 while nothing it shows changed,
the bulk actions' confirmation step (and what happens when more tasks match by the
time Confirm is pressed, when a retry would pass QUEUE_SUBMIT_LIMIT or fill the
queue), the read-only view, the JSON API, and a backend whose capabilities say it
cannot search, search text or keep each kind's health: the page says so.
"""

from __future__ import annotations

import base64
import html as htmlib
import re
from dataclasses import replace
from urllib.parse import parse_qs, urlsplit

import pytest

from dashboard import get_queue
from dashboard.backend import SEAM, Backend
from dashboard.ext import QueueExtension
from dashboard.records import MAX_SEARCH_TEXT, State

HTMX = {"HX-Request": "true"}
SECRET = "operator-secret-0123456789"


def basic(secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"op:{secret}".encode()).decode()}


def said(response) -> str:
    """A response's text as a person reads it (entities undone)."""
    return htmlib.unescape(response.get_data(as_text=True))


def ids_on(html: str) -> list[int]:
    """The task ids the list shows, in order."""
    return [int(n) for n in re.findall(r'<tr id="task-(\d+)"', html)]


def ptag(html: str) -> str:
    match = re.search(r'id="view".*?hx-ptag="([^"]+)"', html, re.S)
    assert match, "the list's region carries no tag"
    return match.group(1)


def link(html: str, element_id: str) -> str | None:
    match = re.search(rf'href="([^"]+)" id="{element_id}"', html)
    return None if match is None else match.group(1).replace("&amp;", "&")


@pytest.fixture
def filled(queue):
    """Five flaky tasks that failed ("gave up"), three pretend tasks done, two queued."""
    failed = queue.submit_many("flaky", 5, {"seconds": 0, "fail_rate": 1})
    done = queue.submit_many("pretend", 3, {"seconds": 0})
    queue.run_pending()
    waiting = queue.submit_many("pretend", 2, {"seconds": 0.5})
    return {"failed": failed, "done": done, "waiting": waiting}


# -- the page -------------------------------------------------------------------------


def test_the_dashboard_header_links_to_the_list(client):
    assert b'href="/tasks" id="nav-tasks"' in client.get("/").data


def test_the_list_shows_every_task_newest_first_with_its_facts(client, filled):
    page = client.get("/tasks")
    assert page.status_code == 200
    html = page.text
    everything = filled["failed"] + filled["done"] + filled["waiting"]
    assert ids_on(html) == sorted(everything, reverse=True)
    assert '<span id="match-count">10</span> tasks match' in html
    first = filled["failed"][0]
    row = re.search(rf'<tr id="task-{first}".*?</tr>', html, re.S).group(0)
    assert f'href="/tasks/{first}"' in row and 'class="state-failed"' in row
    assert '<span class="badge">failed</span>' in row
    assert "seconds=0.0" in row and "fail_rate=1.0" in row
    assert "RuntimeError: flaky task gave up" in row
    assert row.count("<time ") == 2  # queued and finished
    # Each kind's health below, each kind linking to the list filtered to it.
    assert 'href="/tasks?kind=flaky"' in html
    kind_row = re.search(r'<tr id="kind-flaky">.*?</tr>', html, re.S).group(0)
    assert re.findall(r'<td class="num[^"]*">([^<]*)</td>', kind_row)[:5] == [
        "0", "0", "0", "5", "100%"]


def test_filters_by_state_kind_and_text_and_the_form_shows_them(client, filled, queue):
    (other,) = queue.submit_many("flaky", 1, {"seconds": 0.25, "fail_rate": 0})
    html = client.get("/tasks?state=failed&state=queued&kind=flaky").text
    assert ids_on(html) == sorted(filled["failed"] + [other], reverse=True)
    assert 'value="failed" checked' in html and 'value="queued" checked' in html
    assert 'value="done" checked' not in html
    assert "<option selected>flaky</option>" in html
    # Text in params (as JSON) or in the error, in any case.
    assert ids_on(client.get("/tasks?text=GAVE%20UP").text) == sorted(filled["failed"],
                                                                       reverse=True)
    assert ids_on(client.get("/tasks?text=0.25").text) == [other]
    assert 'value="0.25"' in client.get("/tasks?text=0.25").text
    # Commas work as well as repeats; oldest first.
    html = client.get("/tasks?state=done,queued&order=oldest").text
    assert ids_on(html) == sorted(filled["done"] + filled["waiting"] + [other])
    assert '<option value="oldest" selected>' in html
    assert "No task matches." in client.get("/tasks?state=running").text


def test_pages_follow_the_cursors_and_a_page_holds_in_place_while_work_arrives(client, queue):
    ids = queue.submit_many("pretend", 25, {"seconds": 0})
    html = client.get("/tasks?limit=10").text
    seen, pages = ids_on(html), [html]
    assert link(html, "back-page") is None and link(html, "first-page") is None
    while (older := link(html, "on-page")) is not None:
        assert "cursor=" in older and "offset" not in older
        html = client.get(older).text
        pages.append(html)
        seen += ids_on(html)
    assert seen == sorted(ids, reverse=True), "every task once, in order, across the pages"
    assert len(pages) == 3 and len(ids_on(pages[-1])) == 5
    # Newer goes back, page by page, to the first.
    back = []
    while (newer := link(html, "back-page")) is not None:
        html = client.get(newer).text
        back = ids_on(html) + back
    assert back == sorted(ids, reverse=True)[:20]  # the two pages before the last
    assert ids_on(html) == sorted(ids, reverse=True)[:10]
    # A page reached through a cursor does not shift when tasks are added; the first does.
    second_url = link(pages[0], "on-page")
    before = ids_on(client.get(second_url).text)
    later = queue.submit_many("pretend", 3, {"seconds": 0})
    assert ids_on(client.get(second_url).text) == before
    assert ids_on(client.get("/tasks?limit=10").text)[:3] == sorted(later, reverse=True)
    assert link(client.get(second_url).text, "first-page") == "/tasks?limit=10"


def test_oldest_first_pages_name_their_links_by_what_they_lead_to(client, queue):
    ids = queue.submit_many("pretend", 5, {"seconds": 0})
    html = client.get("/tasks?order=oldest&limit=2").text
    assert ids_on(html) == ids[:2] and "Newer →" in html
    html = client.get(link(html, "on-page")).text
    assert ids_on(html) == ids[2:4] and "← Older" in html


@pytest.mark.parametrize("query, field, says", [
    ("state=nope", "state", "state must be some of: scheduled, queued, running, done, failed, "
                            "cancelled; got 'nope'"),
    ("kind=nope", "kind", "kind must be one of: flaky, pretend, primes, shaky; got 'nope'"),
    ("text=" + "x" * (MAX_SEARCH_TEXT + 1), "text",
     f"text must be at most {MAX_SEARCH_TEXT} characters, got {MAX_SEARCH_TEXT + 1}"),
    ("text=a%00b", "text", "text must be printable text"),
    ("cursor=zzz", "cursor", "cursor is not one this list gave out"),
    ("cursor=a!", "cursor", "cursor is not one this list gave out"),
    ("order=sideways", "order", "order must be newest or oldest, got 'sideways'"),
    ("limit=0", "limit", "limit must be an integer from 1 to 500, got 0"),
    ("limit=" + "9" * 5000, "limit", "limit must be an integer from 1 to 500"),
])
def test_a_bad_parameter_is_a_400_naming_the_field_everywhere(client, filled, query, field,
                                                              says):
    before = get_queue(client.application).stats().tag
    page = client.get(f"/tasks?{query}")
    assert page.status_code == 400 and says in said(page), said(page)[-2000:]
    assert 'id="form-errors" role="alert"><p class="error">' in page.text
    assert "Nothing is listed until the filter above" in page.text
    assert 'data-poll=' not in page.text  # no poll of a view that cannot be shown
    if field == "kind":
        assert '<option value="nope" selected>nope (unknown)</option>' in page.text
    fragment = client.get(f"/tasks?{query}", headers=HTMX)
    assert fragment.status_code == 400 and says in said(fragment)
    assert "<html" not in fragment.text
    poll = client.get(f"/tasks/live?{query}", headers=HTMX)
    assert poll.status_code == 400 and says in said(poll)
    api = client.get(f"/api/tasks?{query}")
    assert api.status_code == 400 and says in api.json["error"]
    confirm = client.get(f"/tasks/bulk?action=retry&{query}")
    assert confirm.status_code == 400 and says in said(confirm)
    assert get_queue(client.application).stats().tag == before


def test_a_cursor_of_the_right_form_that_names_no_task_is_refused(client, queue):
    queue.submit_many("pretend", 3, {"seconds": 0})
    refused = client.get("/api/tasks?cursor=anot-a-number")
    assert refused.status_code == 400 and refused.json["error"].startswith("cursor ")


def test_the_api_refuses_parameters_it_does_not_take(client):
    refused = client.get("/api/tasks?colour=red&state=failed")
    assert refused.status_code == 400
    assert refused.json["error"] == ("unknown parameter(s): colour; allowed: state, kind, text, "
                                     "order, cursor, limit, action")
    bad = client.get("/api/tasks?action=explode")
    assert bad.status_code == 400
    assert bad.json["error"] == "action must be one of: retry, cancel, purge; got 'explode'"


def test_input_is_escaped_on_the_page(client, queue):
    queue.submit_many("flaky", 1, {"seconds": 0, "fail_rate": 1})
    html = client.get("/tasks?text=%3Cscript%3Ealert(1)%3C/script%3E").text
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    html = client.get("/tasks?kind=%3Cb%3E").text
    assert "<b>" not in html


# -- htmx: the form, the links, the back button ----------------------------------------


def test_htmx_gets_the_region_and_a_history_restore_gets_the_page(client, filled):
    fragment = client.get("/tasks?state=failed", headers=HTMX)
    assert fragment.status_code == 200 and "<html" not in fragment.text
    assert fragment.text.lstrip().startswith('<div id="view"')
    assert 'hx-get="/tasks/live?state=failed&amp;queue=' in fragment.text
    # (and the error and confirmation of the view before go)
    assert '<div id="form-errors" role="alert" hx-swap-oob="true"></div>' in fragment.text
    assert '<div id="bulk-confirm" aria-live="polite" hx-swap-oob="true"></div>' in fragment.text
    for headers in ({**HTMX, "HX-History-Restore-Request": "true"},
                    {**HTMX, "HX-Request-Type": "full"}):
        whole = client.get("/tasks?state=failed", headers=headers)
        assert whole.status_code == 200 and "<!doctype html>" in whole.text
    # The form and the pager push their URL; the poll does not.
    page = client.get("/tasks").text
    form = page.split('<form id="filter"', 1)[1].split(">", 1)[0]
    assert 'method="get"' in form and 'hx-push-url="true"' in form
    assert 'hx-target="#view"' in form and 'hx-swap="outerHTML"' in form
    region = page.split('<div id="view"', 1)[1].split(">", 1)[0]
    assert "hx-push-url" not in region and 'hx-swap="innerMorph"' in region


# -- live: one poll, 304 while nothing shown changes -------------------------------------


def test_the_poll_answers_304_while_nothing_it_shows_changes(client, filled, queue,
                                                             monkeypatch):
    html = client.get("/tasks?state=failed&kind=flaky").text
    tag = ptag(html)
    poll = re.search(r'hx-get="(/tasks/live[^"]+)"', html).group(1).replace("&amp;", "&")
    assert "state=failed" in poll and "kind=flaky" in poll and "queue=" in poll
    unchanged = client.get(poll, headers={**HTMX, "HX-PTag": tag})
    assert unchanged.status_code == 304 and unchanged.headers["HX-PTag"] == tag

    # The queue moves (paused), nothing the page shows does: still 304, with the
    # queue's new tag, so the next poll reads nothing at all.
    queue.pause()
    moved = client.get(poll, headers={**HTMX, "HX-PTag": tag})
    assert moved.status_code == 304 and moved.headers["HX-PTag"] != tag
    assert moved.headers["HX-PTag"].split(".")[1] == tag.split(".")[1]
    reads = []
    monkeypatch.setattr(type(queue), "find", lambda *a, **k: reads.append(a) or 1 / 0)
    again = client.get(poll, headers={**HTMX, "HX-PTag": moved.headers["HX-PTag"]})
    assert again.status_code == 304 and reads == []
    monkeypatch.undo()

    # Something shown changes (a failed task of the kind is retried): rendered.
    queue.retry(filled["failed"][0])
    changed = client.get(poll, headers={**HTMX, "HX-PTag": moved.headers["HX-PTag"]})
    assert changed.status_code == 200 and changed.headers["HX-PTag"] != moved.headers["HX-PTag"]
    assert "retried as #" in changed.text and "<html" not in changed.text
    assert changed.text.lstrip().startswith('<section id="results"')
    # A tag of another view never matches.
    other = client.get(poll.replace("kind=flaky", "kind=pretend"),
                       headers={**HTMX, "HX-PTag": changed.headers["HX-PTag"]})
    assert other.status_code == 200


class HalfwayThere:
    """The in-process queue (the seam's names only), whose queued tasks the list is told
    are running, half done: what a running task looks like, without a thread."""

    def __init__(self, backend: Backend, percent: float):
        self._backend, self.percent = backend, percent

    def __getattr__(self, name: str):
        if name not in SEAM:
            raise AssertionError(f"the web layer used {name!r}, which the Backend seam lacks")
        return getattr(self._backend, name)

    def find(self, query, **options):
        page = self._backend.find(query, **options)
        return page._replace(tasks=tuple(t._replace(state=State.RUNNING, progress=self.percent)
                                         for t in page.tasks))


def test_a_running_tasks_progress_shows_and_a_new_percent_is_news(make_app, monkeypatch):
    app = make_app()
    real = QueueExtension.queue_for
    (task_id,) = real(app.extensions["dashboard"], app).submit_many("pretend", 1, {})
    progress = {"now": 0.5}
    monkeypatch.setattr(QueueExtension, "queue_for",
                        lambda self, a: HalfwayThere(real(self, a), progress["now"]))
    client = app.test_client()
    html = client.get("/tasks?state=queued").text
    assert ids_on(html) == [task_id] and '<span class="pct">50%</span>' in html
    assert '<span class="badge">running</span>' in html
    tag = ptag(html)
    # The queue's tag would move with a visible percent; here only the digest can tell.
    held = f"stale.{tag.split('.')[1]}"
    progress["now"] = 0.504  # the same whole percent: nothing to show
    assert client.get("/tasks/live?state=queued", headers={**HTMX, "HX-PTag": held}
                      ).status_code == 304
    progress["now"] = 0.51
    moved = client.get("/tasks/live?state=queued", headers={**HTMX, "HX-PTag": held})
    assert moved.status_code == 200 and '<span class="pct">51%</span>' in moved.text
    monkeypatch.undo()


def test_a_poll_for_a_queue_no_longer_served_reloads_the_page(client):
    response = client.get("/tasks/live?queue=someone-else", headers=HTMX)
    assert response.status_code == 200 and response.headers["HX-Refresh"] == "true"


# -- bulk actions ---------------------------------------------------------------------


def test_bulk_buttons_say_how_many_each_action_would_touch(client, filled):
    html = client.get("/tasks").text
    assert ">Retry 5 failed/cancelled</button>" in html
    assert ">Cancel 2 queued/scheduled</button>" in html
    assert ">Purge 8 finished</button>" in html
    html = client.get("/tasks?state=failed&kind=flaky").text
    assert ">Retry 5 failed</button>" in html
    assert 'id="bulk-cancel"' not in html and 'id="bulk-purge"' in html
    assert 'class="bulk"' not in client.get("/tasks?state=running").text


def test_retry_through_the_confirmation_with_htmx(client, filled, queue):
    query = "action=retry&state=failed&kind=flaky&text=gave"
    confirm = client.get(f"/tasks/bulk?{query}", headers=HTMX)
    assert confirm.status_code == 200 and "<html" not in confirm.text
    assert ('<p id="bulk-question" class="question">Retry 5 failed tasks of kind flaky '
            "matching &#39;gave&#39;?</p>") in confirm.text
    fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">',
                             confirm.text))
    assert fields == {"action": "retry", "expected": "5", "state": "failed", "kind": "flaky",
                      "text": "gave"}
    assert 'id="bulk-back"' in confirm.text and queue.stats().queued == 2  # nothing yet

    done = client.post("/tasks/bulk", data=fields, headers=HTMX)
    assert done.status_code == 200
    line = re.search(r'<p class="notice" id="bulk-result">([^<]+)</p>', done.text).group(1)
    assert line.startswith("5 tasks retried as #")
    # The list comes back with it, in place of the old one.
    assert '<div id="view" class="view" hx-swap-oob="true"' in done.text
    assert "retried as #" in done.text
    assert queue.stats().queued == 7
    retries = [queue.get(i).retried_as for i in filled["failed"]]
    assert all(r is not None for r in retries)
    # Retried once: the same confirmation now finds none.
    again = client.get(f"/tasks/bulk?{query}", headers=HTMX)
    assert "Retry 0 failed tasks" in again.text and "Nothing to retry now." in again.text
    assert client.post("/tasks/bulk", data=fields, headers=HTMX).text.count("no task to retry")


def test_the_confirmation_and_its_answer_work_without_javascript(client, filled, queue):
    page = client.get("/tasks/bulk?action=purge&state=done&kind=pretend&limit=20")
    assert page.status_code == 200 and "<!doctype html>" in page.text
    assert "Purge 3 done tasks of kind pretend?" in page.text
    assert 'hx-post' not in page.text.split('class="confirm-form"')[1].split(">")[0]
    back = link(page.text, "bulk-back")
    assert back == "/tasks?state=done&kind=pretend&limit=20"
    fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', page.text))
    posted = client.post("/tasks/bulk", data=fields)
    assert posted.status_code == 303
    where = urlsplit(posted.headers["Location"])
    assert where.path == "/tasks" and parse_qs(where.query)["kind"] == ["pretend"]
    shown = client.get(posted.headers["Location"])
    assert '<p class="notice" id="bulk-result">3 tasks purged</p>' in shown.text
    assert all(queue.get(i) is None for i in filled["done"])


def test_nothing_is_done_when_more_match_than_were_confirmed(client, filled, queue):
    fields = {"action": "cancel", "state": "queued", "expected": "2"}
    queue.submit_many("pretend", 3, {"seconds": 0})
    refused = client.post("/tasks/bulk", data=fields, headers=HTMX)
    assert refused.status_code == 409
    assert "the filter now matches 5 tasks to cancel, not the 2 you confirmed" in refused.text
    assert "Cancel 5 queued tasks?" in refused.text and 'name="expected" value="5"' in refused.text
    assert queue.stats().queued == 5
    plain = client.post("/tasks/bulk", data=fields)
    assert plain.status_code == 303 and plain.headers["Location"].startswith("/tasks/bulk?")
    again = client.get(plain.headers["Location"])
    assert "not the 2 you confirmed" in again.text and "Cancel 5 queued tasks?" in again.text
    # Fewer than confirmed (some ran meanwhile) is fine: it does what is there.
    done = client.post("/tasks/bulk", data={**fields, "expected": "9"}, headers=HTMX)
    assert done.status_code == 200 and ">5 tasks cancelled<" in done.text
    assert queue.stats().queued == 0


@pytest.mark.parametrize("fields, says", [
    ({"action": "explode", "expected": "1"}, "action must be one of: retry, cancel, purge"),
    ({"action": "retry"}, "expected must be an integer from 0 to"),
    ({"action": "retry", "expected": "x"}, "expected must be an integer"),
    ({"action": "retry", "expected": "1", "state": "nope"}, "state must be some of"),
    ({"action": "retry", "expected": "1", "text": "y" * 300}, "text must be at most 200"),
])
def test_a_bad_bulk_post_is_refused_and_changes_nothing(client, filled, queue, fields, says):
    before = queue.stats().tag
    refused = client.post("/tasks/bulk", data=fields, headers=HTMX)
    assert refused.status_code == 400 and says in refused.text
    plain = client.post("/tasks/bulk", data=fields)
    assert plain.status_code == 303 and "refused=" in plain.headers["Location"]
    assert says in client.get(plain.headers["Location"]).text
    assert queue.stats().tag == before


def test_a_bulk_retry_past_the_submit_limit_is_refused_whole_and_costs_nothing(make_app):
    app = make_app(QUEUE_SUBMIT_LIMIT="12/minute")
    queue = get_queue(app)
    failed = queue.submit_many("flaky", 15, {"seconds": 0, "fail_rate": 1})
    queue.run_pending()
    client = app.test_client()
    refused = client.post("/tasks/bulk", data={"action": "retry", "expected": "15"},
                          headers=HTMX)
    assert refused.status_code == 429
    assert ("retrying 15 tasks at once is refused: QUEUE_SUBMIT_LIMIT allows 12 tasks per "
            "minute from one client") in refused.text
    assert "at most 12 tasks" in refused.text
    api = client.post("/api/tasks/bulk", json={"action": "retry", "kind": "flaky"})
    assert api.status_code == 429 and "QUEUE_SUBMIT_LIMIT allows 12" in api.json["error"]
    assert queue.stats().queued == 0 and all(queue.get(i).retried_as is None for i in failed)
    # Refused, it cost nothing: the client may still add its twelve.
    assert client.post("/api/tasks", json={"kind": "pretend", "count": 12}).status_code == 202
    assert client.post("/api/tasks", json={"kind": "pretend"}).status_code == 429


def test_a_bulk_retry_that_fits_the_limit_uses_it_up(make_app):
    app = make_app(QUEUE_SUBMIT_LIMIT="12/minute")
    queue = get_queue(app)
    queue.submit_many("flaky", 10, {"seconds": 0, "fail_rate": 1})
    queue.run_pending()
    client = app.test_client()
    done = client.post("/api/tasks/bulk", json={"action": "retry", "expected": 10})
    assert done.status_code == 200 and done.json["count"] == 10
    assert client.post("/api/tasks", json={"kind": "pretend", "count": 2}).status_code == 202
    late = client.post("/api/tasks", json={"kind": "pretend"})
    assert late.status_code == 429


def test_a_bulk_retry_that_would_overfill_the_queue_is_refused_whole(make_app):
    app = make_app(QUEUE_MAX_QUEUED=20, QUEUE_MAX_BATCH=20)
    queue = get_queue(app)
    failed = queue.submit_many("flaky", 12, {"seconds": 0, "fail_rate": 1})
    queue.run_pending()
    queue.submit_many("pretend", 10, {"seconds": 0})
    refused = app.test_client().post("/api/tasks/bulk", json={"action": "retry"})
    assert refused.status_code == 503 and "Retry-After" in refused.headers
    assert refused.json["error"] == "queue is full: 10 of 20 queued, 12 more requested"
    assert queue.stats().queued == 10 and all(queue.get(i).retried_as is None for i in failed)


def test_the_bulk_api(client, filled, queue):
    listed = client.get("/api/tasks?state=failed&kind=flaky&limit=2")
    assert listed.status_code == 200
    body = listed.json
    assert set(body) == {"tasks", "newer", "older", "count"} and body["count"] == 5
    assert [t["id"] for t in body["tasks"]] == sorted(filled["failed"], reverse=True)[:2]
    assert body["newer"] is None and body["older"].startswith("a")
    rest = client.get(f"/api/tasks?state=failed&kind=flaky&limit=2&cursor={body['older']}")
    assert [t["id"] for t in rest.json["tasks"]] == sorted(filled["failed"], reverse=True)[2:4]
    assert client.get("/api/tasks?action=retry&state=queued").json == {
        "tasks": [], "newer": None, "older": None, "count": 0}
    assert client.get("/api/tasks?action=cancel").json["count"] == 2

    cancelled = client.post("/api/tasks/bulk", json={"action": "cancel", "state": ["queued"]})
    assert cancelled.status_code == 200
    assert cancelled.json == {"action": "cancel", "count": 2, "ids": filled["waiting"],
                              "line": "2 tasks cancelled"}
    retried = client.post("/api/tasks/bulk", json={"action": "retry", "kind": "pretend",
                                                   "expected": 2})
    assert retried.status_code == 200 and retried.json["count"] == 2
    grew = client.post("/api/tasks/bulk", json={"action": "retry", "expected": 1})
    assert grew.status_code == 409 and "not the 1 you confirmed" in grew.json["error"]
    for body, says in [
        ({"action": "retry", "colour": "red"}, "unknown field(s): colour"),
        ({"action": "retry", "state": "nope"}, "state must be some of"),
        ({"action": "retry", "state": [1]}, "state must be state names"),
        ({"action": "retry", "kind": 5}, "kind must be text, got int"),
        ({"action": "retry", "expected": -1}, "expected must be an integer from 0"),
        ({"state": ["failed"]}, "action must be one of: retry, cancel, purge; got nothing"),
        ([], "body must be a JSON object"),
    ]:
        refused = client.post("/api/tasks/bulk", json=body)
        assert refused.status_code == 400 and says in refused.json["error"], (body, refused.json)
    purged = client.post("/api/tasks/bulk", json={"action": "purge"})
    assert purged.json["line"].endswith("tasks purged")


def test_the_kinds_api(client, filled):
    kinds = client.get("/api/kinds")
    assert kinds.status_code == 200
    by_name = {k["kind"]: k for k in kinds.json["kinds"]}
    assert list(by_name) == ["flaky", "pretend", "primes", "shaky"]
    assert by_name["flaky"]["failed"] == 5 and by_name["flaky"]["failure_rate"] == 1.0
    assert by_name["pretend"]["queued"] == 2 and by_name["pretend"]["done"] == 3
    assert by_name["primes"]["failure_rate"] is None
    assert set(by_name["flaky"]) == {"kind", "queued", "running", "done", "failed",
                                     "failure_rate", "run_p50", "run_p95", "wait_p95"}


# -- who may act ------------------------------------------------------------------------


def test_a_read_only_view_lists_but_cannot_act(make_app):
    app = make_app(QUEUE_ACCESS_TOKEN=SECRET, QUEUE_PUBLIC_READ=True)
    queue = get_queue(app)
    failed = queue.submit_many("flaky", 2, {"seconds": 0, "fail_rate": 1})
    queue.run_pending()
    client = app.test_client()
    page = client.get("/tasks")
    assert page.status_code == 200 and ids_on(page.text) == sorted(failed, reverse=True)
    assert 'id="read-only"' in page.text and 'class="bulk"' not in page.text
    assert 'id="bulk-confirm"' not in page.text
    assert client.get("/tasks/live").status_code == 200
    asked = client.get("/tasks/bulk?action=retry")
    assert asked.status_code == 401 and "WWW-Authenticate" in asked.headers
    fields = {"action": "retry", "expected": "2"}
    assert client.post("/tasks/bulk", data=fields).status_code == 401
    assert client.post("/api/tasks/bulk", json={"action": "retry"}).status_code == 401
    listed = client.get("/api/tasks").json["tasks"][0]
    assert "result" not in listed and "logs" not in listed
    assert all(queue.get(i).retried_as is None for i in failed)
    # With the token: the buttons, and the action.
    authed = client.get("/tasks", headers=basic(SECRET)).text
    assert ">Retry 2 failed/cancelled</button>" in authed
    assert "result" in client.get("/api/tasks", headers=basic(SECRET)).json["tasks"][0]
    done = client.post("/tasks/bulk", data=fields, headers={**HTMX, **basic(SECRET)})
    assert done.status_code == 200 and "2 tasks retried as" in done.text


def test_a_cross_site_bulk_post_is_refused(client, filled, queue):
    for path, kwargs in (("/tasks/bulk", {"data": {"action": "purge", "expected": "9"}}),
                         ("/api/tasks/bulk", {"json": {"action": "purge"}})):
        refused = client.post(path, headers={"Sec-Fetch-Site": "cross-site",
                                             "Origin": "https://evil.example"}, **kwargs)
        assert refused.status_code == 403
    assert all(queue.get(i) is not None for i in filled["done"])


# -- a backend that cannot --------------------------------------------------------------


class Lacking:
    """The in-process queue, answering only the seam's names, saying it lacks some of
    the operator's view (as the RQ backend does, and the SQLite store did)."""

    def __init__(self, backend: Backend, **lacks: bool):
        self._backend = backend
        self._capabilities = replace(backend.capabilities, **lacks)

    @property
    def capabilities(self):
        return self._capabilities

    def __getattr__(self, name: str):
        if name not in SEAM:
            raise AssertionError(f"the web layer used {name!r}, which the Backend seam lacks")
        if name in ("find", "count", "bulk") and not self._capabilities.search:
            raise AssertionError(f"the web layer called {name} on a backend that cannot search")
        if name == "kind_health" and not self._capabilities.kind_health:
            raise AssertionError("the web layer asked for health a backend does not keep")
        return getattr(self._backend, name)


@pytest.fixture
def lacking(make_app, monkeypatch):
    """``lacking(**capabilities)``: a client whose queue says it cannot do those."""
    app = make_app()
    real = QueueExtension.queue_for
    inner = real(app.extensions["dashboard"], app)
    inner.submit_many("flaky", 2, {"seconds": 0, "fail_rate": 1})
    inner.run_pending()

    def make(**lacks: bool):
        monkeypatch.setattr(QueueExtension, "queue_for",
                            lambda self, a: Lacking(real(self, a), **lacks))
        return app.test_client()

    yield make
    monkeypatch.undo()


def test_a_backend_that_cannot_search_says_so_instead_of_pretending(lacking):
    client = lacking(search=False, text_search=False, kind_health=False)
    page = client.get("/tasks?state=failed")
    assert page.status_code == 200
    assert "Finding tasks is not available with this backend (the queue in this process" \
        in page.text
    assert "Each kind's health is not available with this backend" in said(page)
    assert 'id="filter"' not in page.text and 'data-poll' not in page.text
    assert 'class="bulk"' not in page.text and "<tr id=\"task-" not in page.text
    for path in ("/api/tasks", "/api/tasks?state=failed", "/tasks/bulk?action=retry"):
        refused = client.get(path)
        assert refused.status_code == 400 and "search is not available with this backend" \
            in refused.get_data(as_text=True), path
    refused = client.post("/api/tasks/bulk", json={"action": "retry"})
    assert refused.status_code == 400 and refused.json["error"].startswith(
        "search is not available with this backend")
    assert client.post("/tasks/bulk", data={"action": "retry", "expected": "2"},
                       headers=HTMX).status_code == 400
    kinds = client.get("/api/kinds")
    assert kinds.status_code == 400
    assert kinds.json["error"] == ("each kind's health is not available with this backend "
                                   "(the queue in this process's memory)")


def test_a_backend_that_searches_but_not_text_leaves_the_text_out(lacking):
    client = lacking(text_search=False)
    page = client.get("/tasks")
    assert 'name="text"' not in page.text and 'id="text-unavailable"' in page.text
    assert len(ids_on(page.text)) == 2 and "<tr id=\"kind-flaky\">" in page.text
    refused = client.get("/tasks?text=gave")
    assert refused.status_code == 400 and "text search is not available" in refused.text
    api = client.get("/api/tasks?text=gave")
    assert api.status_code == 400 and api.json["error"].startswith("text search is not")


def test_a_backend_without_health_still_lists(lacking):
    client = lacking(kind_health=False)
    page = client.get("/tasks")
    assert len(ids_on(page.text)) == 2 and 'id="kinds-unavailable"' in page.text
    assert 'data-poll' in page.text
    tag = ptag(page.text)
    poll = client.get("/tasks/live", headers={**HTMX, "HX-PTag": tag})
    assert poll.status_code == 304
