"""The security layer in a real browser: Chromium, driven by Playwright, against the
app under gunicorn (the fixtures of tests/browser.py).

* A whole session under the Content-Security-Policy raises no violation, and
  every response of the dashboard, page or htmx fragment, carries the policy.
* A page on another site that posts a form, a no-cors fetch and a JSON-looking
  text/plain form to the dashboard gets 403 and changes nothing; the dashboard
  itself still adds work.
* With an access token: no credentials, 401; the browser's saved password,
  the whole dashboard; ``QUEUE_PUBLIC_READ``, a read-only page that still updates.
* The submit limit: a second batch over it shows its message in the form and
  queues nothing.

No Chromium? The same policy as tests/test_browser.py: fail under CI=true,
skip loudly elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest
from browser import (
    Server,
    Tab,
    expect,
    open_tab,
)
from support import wait_for

from dashboard.web.security import CONTENT_SECURITY_POLICY

try:
    from playwright.sync_api import Error as PlaywrightError
except ImportError:  # pragma: no cover - the fixtures then skip, or fail under CI, saying why
    PlaywrightError = Exception

QUICK = 10_000  # ms: far above what a busy two-core machine needs
DRAIN = 30_000  # ms

TOKEN = "browser-test-secret-1234"


# -- helpers ---------------------------------------------------------------------------


def add_button(page, name: str = "Add work"):
    return page.get_by_role("button", name=name, exact=True)


def count(page, selector: str) -> int:
    return int(page.locator(selector).inner_text().strip())


def path_of(url: str) -> str:
    return urlsplit(url).path


def live_responses(page) -> list:
    responses: list = []
    page.on("response", lambda r: path_of(r.url) == "/live" and responses.append(r))
    return responses


def wait_for_polls(page, responses: list, n: int, what: str = "polls") -> None:
    """Let the page run (its events are delivered meanwhile) until ``n`` more have come."""
    target = len(responses) + n
    wait_for(lambda: page.wait_for_timeout(50) or len(responses) >= target, QUICK / 1000,
             f"{n} more {what}", interval=0)


def api(server: Server, method: str, path: str, body: Any = None,
        token: str | None = None) -> tuple[int, Any]:
    """The JSON API as a script would call it: no browser headers, maybe a Bearer token."""
    return server.request(method, path, body, token=token)


def stats(server: Server, token: str | None = None) -> dict[str, Any]:
    status, body = api(server, "GET", "/api/stats", token=token)
    assert status == 200, body
    return body


def changes(stats_: dict[str, Any]) -> tuple:
    return (stats_["submitted"], stats_["queued"], stats_["running"], stats_["done"],
            stats_["paused"], stats_["workers_target"])


# -- CSP: the listener, and what every response carries ---------------------------------

#: Runs in every document of the context before its own scripts: reports each
#: violation to the test (across navigations) and keeps it on the page too.
CSP_LISTENER = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation', e => {
  const v = {directive: e.violatedDirective, blocked: e.blockedURI, source: e.sourceFile,
             line: e.lineNumber, sample: e.sample, page: location.href};
  window.__cspViolations.push(v);
  window.__reportCsp?.(v);
}, true);
"""


def watch_csp(context) -> list[dict]:
    """Every CSP violation any page of ``context`` sees from now on."""
    violations: list[dict] = []
    context.expose_function("__reportCsp", lambda violation: violations.append(violation))
    context.add_init_script(CSP_LISTENER)
    return violations


def record_responses(page, server: Server) -> list[dict]:
    """What the dashboard answered this page: path, status, kind, and its policy header."""
    seen: list[dict] = []

    def note(response) -> None:
        if not response.url.startswith(server.url + "/"):
            return
        headers = response.headers
        seen.append({
            "what": f"{response.request.method} {path_of(response.url)} {response.status}",
            "status": response.status,
            "type": response.request.resource_type,
            "htmx": response.request.headers.get("hx-request") == "true",
            "html": headers.get("content-type", "").startswith("text/html"),
            "csp": headers.get("content-security-policy"),
            "nosniff": headers.get("x-content-type-options"),
        })

    page.on("response", note)
    return seen


@pytest.mark.browser
def test_a_whole_session_raises_no_csp_violation_and_every_answer_carries_the_policy(
    chromium_browser, start_server
):
    server = start_server()
    with open_tab(chromium_browser, server) as tab:
        page, context = tab.page, tab.page.context
        violations = watch_csp(context)
        seen = record_responses(page, server)
        tab.expect_aborted_polls()  # the session navigates between polling pages
        tab.expect_http_error(400, "/tasks/lookup")

        polls = live_responses(page)
        page.goto("/")
        wait_for_polls(page, polls, 2)
        page.get_by_label("Seconds").fill("0.05")

        # Add work, then ×10 while paused; cancel one of them; scale up and down; resume.
        add_button(page).click()
        expect(page.locator("#count-done")).to_have_text("1", timeout=QUICK)
        page.get_by_role("button", name="Pause", exact=True).click()
        expect(page.locator("#paused-flag")).to_be_visible()
        add_button(page, "Add work ×10").click()
        expect(page.locator("#queue-depth")).to_have_text("10")
        page.locator("#upcoming").get_by_role("button", name=re.compile(r"^Cancel task")).first.click()
        expect(page.locator("#count-cancelled")).to_have_text("1")
        more = page.get_by_role("button", name="More workers")
        more.click()
        more.click()
        expect(page.locator("#workers-target")).to_have_text("3")
        page.get_by_role("button", name="Fewer workers").click()
        expect(page.locator("#workers-target")).to_have_text("2")
        page.get_by_role("button", name="Resume", exact=True).click()
        expect(page.locator("#queue-depth")).to_have_text("0", timeout=DRAIN)
        expect(page.locator("#count-done")).to_have_text("10", timeout=QUICK)

        # A failure, retried from its row; then its own page, and the retry's.
        status, body = api(server, "POST", "/api/tasks",
                           {"kind": "flaky", "params": {"seconds": 0, "fail_rate": 1}})
        assert status == 202, body
        (failed,) = body["ids"]
        row = page.locator(f"#history #task-{failed}")
        expect(row).to_have_class(re.compile(r"\bstate-failed\b"), timeout=QUICK)
        row.get_by_role("button", name=f"Retry task {failed}").click()
        retried = row.get_by_role("link", name=re.compile(r"^retried as #\d+$"))
        expect(retried).to_be_visible()
        with page.expect_navigation():
            row.get_by_role("link", name=str(failed), exact=True).click()
        expect(page.locator("#task-error")).to_contain_text("flaky task gave up")

        # A running task's page polls until the task is done.
        status, body = api(server, "POST", "/api/tasks", {"kind": "pretend",
                                                          "params": {"seconds": 1}})
        assert status == 202, body
        (running,) = body["ids"]
        task_polls = []
        page.on("response", lambda r: path_of(r.url) == f"/tasks/{running}/live"
                and task_polls.append(r))
        page.goto(f"/tasks/{running}")
        expect(page.locator("#task-state")).to_have_text("done", timeout=QUICK)
        assert task_polls, "the running task's page never polled"

        # An error page: the header's lookup with a bad id.
        page.get_by_label("Task", exact=True).fill("a b")
        with page.expect_response(lambda r: path_of(r.url) == "/tasks/lookup") as looked:
            page.get_by_role("button", name="Find").click()
        assert looked.value.status == 400
        expect(page.locator("#message")).to_contain_text("id must be a task id")

        # Clear history, and Reset after its confirm (htmx asks with window.confirm).
        page.goto("/")
        page.get_by_role("button", name="Clear history", exact=True).click()
        expect(page.locator("#history tbody tr")).to_have_count(0)
        dialogs: list[str] = []
        page.once("dialog", lambda dialog: dialogs.append(dialog.message) or dialog.accept())
        page.get_by_role("button", name="Reset", exact=True).click()
        expect(page.locator("#count-done")).to_have_text("0")
        assert len(dialogs) == 1, dialogs

        # Presenter mode, driven by the keys.
        with page.expect_navigation():
            page.get_by_role("link", name="Presenter mode").click()
        page.evaluate("document.activeElement?.blur()")
        page.keyboard.type("p")
        expect(page.locator("#paused-flag")).to_be_visible()
        page.keyboard.type("+")
        expect(page.locator("#workers-target")).to_have_text("3")
        page.keyboard.type("-")
        expect(page.locator("#workers-target")).to_have_text("2")
        page.keyboard.type("a")
        expect(page.locator("#queue-depth")).to_have_text("1")
        page.keyboard.type("p")
        expect(page.locator("#queue-depth")).to_have_text("0", timeout=QUICK)
        presenter_polls = live_responses(page)
        wait_for_polls(page, presenter_polls, 2, "presenter polls")

        # This session leaves pages quickly: the browser may drop the icon of the page it
        # leaves before it is loaded. That is no fault of the page (and no CSP violation).
        icon = f"GET {server.url}/static/favicon.svg: net::ERR_ABORTED"
        tab.failed_requests[:] = [f for f in tab.failed_requests if f != icon]

        # No violation anywhere, on any of the pages the session saw.
        assert violations == [], f"CSP violations: {violations}"
        assert page.evaluate("window.__cspViolations") == []

        # Every answer carried the policy: pages, fragments (200 and 304), errors, files.
        missing = [r["what"] for r in seen if r["csp"] != CONTENT_SECURITY_POLICY]
        assert not missing, f"answers without the policy: {missing}"
        assert all(r["nosniff"] == "nosniff" for r in seen)
        documents = [r for r in seen if r["type"] == "document"]
        fragments = [r for r in seen if r["htmx"]]
        assert all(r["html"] for r in documents), documents
        assert {r["status"] for r in documents} == {200, 400}, documents
        assert {r["status"] for r in fragments} >= {200, 304}, fragments
        assert any(r["what"].startswith("POST ") for r in fragments)
        assert any(r["what"].startswith(f"GET /tasks/{running}/live ") for r in fragments)
        print(f"\n{len(seen)} answers checked: {len(documents)} documents, "
              f"{len(fragments)} htmx fragments, no CSP violation")

        # The control: the listener does catch a violation (inline code, on a page of
        # its own that the watcher does not fail on), and the policy blocks it.
        control = context.new_page()
        control.goto("/")
        control.evaluate(
            """() => {
              const s = document.createElement('script');
              s.textContent = 'window.__inlineRan = true';
              document.body.append(s);
            }"""
        )
        wait_for(lambda: control.wait_for_timeout(20) or violations, 10, "the control violation",
                 interval=0)
        assert control.evaluate("window.__inlineRan") is None, "an inline script ran"
        assert [v["directive"] for v in violations] == ["script-src-elem"], violations
        # And htmx's own eval (hx-on, js: values, trigger filters), which the dashboard
        # does not use: blocked too, and caught, naming htmx as the source.
        control.evaluate(
            """() => {
              const b = document.createElement('button');
              b.id = 'eval-control';
              b.setAttribute('hx-on:click', 'window.__hxOnRan = true');
              document.body.append(b);
              htmx.process(b);
            }"""
        )
        control.locator("#eval-control").click()
        wait_for(lambda: control.wait_for_timeout(20) or len(violations) > 1, 10,
                 "the eval control violation", interval=0)
        assert control.evaluate("window.__hxOnRan") is None, "hx-on code ran"
        assert (violations[1]["directive"], violations[1]["blocked"]) == ("script-src", "eval")
        assert violations[1]["source"].endswith("/static/htmx/htmx.min.js"), violations
        control.close()


# -- cross-site requests ------------------------------------------------------------------


FAVICON = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 1 1"/>'


@contextlib.contextmanager
def other_site(pages: dict[str, str]) -> Iterator[int]:
    """A tiny web server of another site: serves ``pages`` (path → HTML) on a free port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/favicon.ico":  # what the browser asks every site for
                body, content_type = FAVICON, "image/svg+xml"
            else:
                body, content_type = pages.get(self.path), "text/html; charset=utf-8"
            data = (body or "not here").encode()
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, name="other-site", daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def attack_pages(target: str) -> dict[str, str]:
    """The attacker's pages, each doing its thing on load. ``target`` is the dashboard."""
    # A text/plain form sends "name=value": split the JSON so that "=" lands in a string.
    json_name = '{"kind": "pretend", "count": 7, "pad": "'
    return {
        "/form": f"""<!doctype html><title>win a prize</title>
<form id="f" method="post" action="{target}/tasks">
  <input name="kind" value="pretend"><input name="count" value="10">
</form>
<script>document.getElementById('f').submit()</script>""",
        "/fetch": f"""<!doctype html><title>win a prize</title>
<script>
window.__sent = fetch('{target}/api/tasks', {{method: 'POST', mode: 'no-cors',
  headers: {{'Content-Type': 'text/plain'}}, body: '{{"count": 5}}'}})
  .then(r => 'answered: ' + r.type, e => 'failed: ' + e);
</script>""",
        "/json-form": f"""<!doctype html><title>win a prize</title>
<form id="f" method="post" enctype="text/plain" action="{target}/api/tasks">
  <input type="hidden" name='{json_name}' value='"}}'>
</form>
<script>document.getElementById('f').submit()</script>""",
    }


@pytest.mark.browser
def test_another_sites_form_and_json_posts_get_403_and_the_dashboard_still_works(
    chromium_browser, fresh_server
):
    server = fresh_server
    pages = attack_pages(server.url)
    with other_site(pages) as port, open_tab(chromium_browser, server) as tab:
        page = tab.page
        tab.expect_http_error(403, "/tasks")
        tab.expect_http_error(403, "/api/tasks")
        # The dashboard's 403 is plain text, with no icon of its own: the browser asks for one.
        tab.expect_http_error(404, "/favicon.ico")
        before = changes(stats(server))
        evil = f"http://localhost:{port}"  # localhost is another site than 127.0.0.1
        assert urlsplit(server.url).hostname == "127.0.0.1"

        # (a) A form that posts itself: the browser lands on the dashboard's 403.
        with page.expect_response(lambda r: r.url == f"{server.url}/tasks") as posted:
            page.goto(f"{evil}/form")
        response = posted.value
        assert response.request.method == "POST"
        assert response.request.all_headers().get("sec-fetch-site") == "cross-site"
        assert response.status == 403
        expect(page.locator("body")).to_contain_text(
            "cross-site request refused (Sec-Fetch-Site: cross-site)")
        assert changes(stats(server)) == before

        # (b) A no-cors fetch of JSON as text/plain: the page cannot read the answer,
        # the browser saw the 403, the server counted nothing.
        with page.expect_response(lambda r: r.url == f"{server.url}/api/tasks") as fetched:
            page.goto(f"{evil}/fetch")
        assert page.evaluate("window.__sent") == "answered: opaque"
        assert fetched.value.request.post_data == '{"count": 5}'
        assert fetched.value.status == 403
        # Chromium's opaque-response blocking then drops the JSON body a no-cors
        # fetch may not read: the watcher sees that as a failed request. Expected.
        blocked = f"POST {server.url}/api/tasks: net::ERR_ABORTED"
        wait_for(lambda: page.wait_for_timeout(20) or blocked in tab.failed_requests, 10,
                 "the blocked no-cors answer", interval=0)
        tab.failed_requests.remove(blocked)
        assert changes(stats(server)) == before

        # (c) A text/plain form whose body reads as JSON.
        with page.expect_response(lambda r: r.url == f"{server.url}/api/tasks") as posted:
            page.goto(f"{evil}/json-form")
        assert posted.value.request.post_data.startswith('{"kind": "pretend", "count": 7,')
        assert posted.value.request.all_headers().get("content-type") == "text/plain"
        assert posted.value.status == 403
        assert json.loads(page.locator("body").inner_text())["error"].startswith(
            "cross-site request refused")
        assert changes(stats(server)) == before

        # The server says so too: three refusals, one per attack, each by Fetch Metadata.
        refusals = re.findall(r"POST (/\S+): cross-site request refused "
                              r"\(Sec-Fetch-Site: cross-site\)", server.log.read_text())
        assert refusals == ["/tasks", "/api/tasks", "/api/tasks"], server.log_tail()

        # The dashboard itself, in the same browser, still adds work.
        page.goto("/")
        done = count(page, "#count-done")
        with page.expect_response(lambda r: path_of(r.url) == "/tasks") as added:
            add_button(page).click()
        assert added.value.status == 200
        assert added.value.request.all_headers().get("sec-fetch-site") == "same-origin"
        expect(page.locator("#count-done")).to_have_text(str(done + 1), timeout=QUICK)
        assert stats(server)["submitted"] == before[0] + 1


# -- the access token -------------------------------------------------------------------


def refused_by_challenge(tab: Tab, server: Server):
    """Open the dashboard; it must answer 401 with a Basic challenge the browser cannot meet."""
    tab.expect_http_error(401, "/")
    with (tab.page.expect_response(lambda r: r.url == f"{server.url}/") as answered,
          pytest.raises(PlaywrightError, match="net::ERR_INVALID_AUTH_CREDENTIALS")):
        tab.page.goto("/")
    response = answered.value
    assert response.status == 401
    assert response.headers["www-authenticate"] == 'Basic realm="Work queue", charset="UTF-8"'
    # The browser gave the page up there: that is the refusal, not a fault.
    gave_up = f"GET {server.url}/: net::ERR_INVALID_AUTH_CREDENTIALS"
    wait_for(lambda: tab.page.wait_for_timeout(20) or gave_up in tab.failed_requests, 10,
             "the browser to give the page up", interval=0)
    tab.failed_requests.remove(gave_up)
    assert tab.failed_requests == [], tab.failed_requests
    return response


@pytest.mark.browser
def test_with_a_token_a_browser_needs_it_and_with_it_the_dashboard_works(
    chromium_browser, start_server
):
    server = start_server(FLASK_QUEUE_ACCESS_TOKEN=TOKEN)

    # No credentials: 401 with a Basic challenge, and no dashboard. (Headless Chromium
    # has no dialog to ask for a password: it gives the navigation up at the challenge.)
    with open_tab(chromium_browser, server) as tab:
        refused = refused_by_challenge(tab, server)
        assert refused.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        answer = tab.page.request.get("/")  # the same, without the browser's auth handling
        assert answer.status == 401 and "needs its access token" in answer.text()

    # A wrong password: the browser offers it, is refused again, and shows the refusal.
    with open_tab(chromium_browser, server,
                  http_credentials={"username": "me", "password": "not-the-token"}) as tab:
        tab.expect_http_error(401, "/")
        tab.expect_http_error(404, "/favicon.ico")  # the refusal is plain text: no icon of its own
        response = tab.page.goto("/")
        assert response.status == 401
        assert response.headers["www-authenticate"].startswith("Basic ")
        expect(tab.page.locator("body")).to_contain_text("needs its access token")
        expect(add_button(tab.page)).to_have_count(0)

    # The right one (any user name): the page, its polls, and Add work.
    with open_tab(chromium_browser, server,
                  http_credentials={"username": "anyone", "password": TOKEN}) as tab:
        page = tab.page
        statuses: list[int] = []
        page.on("response", lambda r: statuses.append(r.status))
        polls = live_responses(page)
        assert page.goto("/").status == 200
        wait_for_polls(page, polls, 3)
        done = count(page, "#count-done")
        with page.expect_response(lambda r: path_of(r.url) == "/tasks") as added:
            add_button(page).click()
        assert added.value.status == 200
        expect(page.locator("#count-done")).to_have_text(str(done + 1), timeout=QUICK)
        wait_for_polls(page, polls, 2)
        poll_statuses = {r.status for r in polls}
        assert poll_statuses == {200, 304}, [r.status for r in polls]
        assert 401 not in statuses, statuses
        assert stats(server, TOKEN)["submitted"] == 1


@pytest.mark.browser
def test_public_read_shows_a_read_only_dashboard_that_keeps_updating(
    chromium_browser, start_server
):
    server = start_server(FLASK_QUEUE_ACCESS_TOKEN=TOKEN, FLASK_QUEUE_PUBLIC_READ="true")
    with open_tab(chromium_browser, server) as tab:
        page = tab.page
        polls = live_responses(page)
        assert page.goto("/").status == 200
        expect(page.locator("#read-only")).to_be_visible()
        for name in ("Add work", "Add work ×10", "Pause", "Reset"):
            expect(add_button(page, name)).to_have_count(0)
        expect(page.locator("footer.keys")).to_have_count(0)
        wait_for_polls(page, polls, 2)

        # Work added by someone with the token shows up here by the polls alone.
        done = count(page, "#count-done")
        status, body = api(server, "POST", "/api/tasks", {"params": {"seconds": 0}}, token=TOKEN)
        assert status == 202, body
        expect(page.locator("#count-done")).to_have_text(str(done + 1), timeout=QUICK)
        assert {r.status for r in polls} == {200, 304}, [r.status for r in polls]

        # The keys do nothing here, and this browser still may not act.
        posts: list = []
        page.on("request", lambda r: r.method == "POST" and posts.append(r.url))
        page.evaluate("document.activeElement?.blur()")
        page.keyboard.type("ap+")
        wait_for_polls(page, polls, 1)
        assert posts == []
        refused = page.request.post("/tasks", form={"count": "1"})
        assert refused.status == 401
        assert stats(server)["submitted"] == 1


# -- the submit limit --------------------------------------------------------------------


@pytest.mark.browser
def test_over_the_submit_limit_the_form_says_so_and_nothing_is_queued(
    chromium_browser, start_server
):
    server = start_server(FLASK_QUEUE_SUBMIT_LIMIT="12/minute")
    with open_tab(chromium_browser, server) as tab:
        page = tab.page
        tab.expect_http_error(429, "/tasks")
        polls = live_responses(page)
        page.goto("/")
        # Paused, so the depth counts every task added.
        page.get_by_role("button", name="Pause", exact=True).click()
        expect(page.locator("#paused-flag")).to_be_visible()
        depth, errors = page.locator("#queue-depth"), page.locator("#form-errors")

        ten = add_button(page, "Add work ×10")
        with page.expect_response(lambda r: path_of(r.url) == "/tasks") as first:
            ten.click()
        assert first.value.status == 200
        expect(depth).to_have_text("10")
        expect(errors).to_be_empty()

        with page.expect_response(lambda r: path_of(r.url) == "/tasks") as second:
            ten.click()
        assert second.value.status == 429
        assert 1 <= int(second.value.headers["retry-after"]) <= 60
        expect(errors).to_contain_text(
            "too much work from this client: the limit is 12 tasks per minute")

        # Not grown, over a few polls: the second batch queued nothing.
        wait_for_polls(page, polls, 3)
        expect(depth).to_have_text("10")
        assert (s := stats(server))["submitted"] == 10 and s["queued"] == 10, s
