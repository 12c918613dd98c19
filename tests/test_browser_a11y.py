"""The pages against axe-core's WCAG 2.1 A and AA rules, in a real Chromium:
light and dark, and presenter mode (in both schemes) for the dashboard.

* The dashboard with something in every region: a worker busy with a task
  that shows progress and a Cancel button, tasks waiting in "Up next", and a
  done, a failed and a cancelled task in the history; then the same queue
  paused (the paused banner, the Resume button).
* A failed task's page (its error and traceback, wide and on a phone, where
  the traceback scrolls) and a running task's page (its progress and Cancel
  button). The dashboard is checked at a phone's width too.
* The read-only view a projector gets (``QUEUE_ACCESS_TOKEN`` with
  ``QUEUE_PUBLIC_READ``): the dashboard and a failed task's page.
* A message page: the 400 for a task id that is not one.
* The list of tasks with each kind's health (wide and on a phone), a bulk action's
  confirmation (above the list, and as a page of its own), the list with a refused
  filter (400), and the read-only list.
* The dashboard once its server is gone: the lost-server banner, and the
  error a click then gets. The regions it greys out on purpose (old news) are
  left out of that check.

axe-core is vendored in tests/vendor/axe-core/ (``make vendor-axe``), so these
tests need no network; it is for the tests only and never served to users.
The pages' Content-Security-Policy (``script-src 'self'``) would refuse the
inline script ``add_script_tag`` makes, so the test contexts bypass it: no
template has an inline style or script the policy would otherwise stop, so
the pages look and behave as they do for users.

axe checks what is on the page: states the tests do not bring about (a
shutdown, a stall) and what axe cannot measure (text in the SVG chart,
placeholders) are kept to the same contrast in the stylesheet by hand.

No Chromium? The same policy as tests/test_browser.py: fail under CI=true,
skip loudly elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
from browser import QUICK, Server, Tab, expect, open_tab, run_server, stop
from support import wait_for

AXE_DIR = Path(__file__).resolve().parent / "vendor" / "axe-core"
AXE_JS = AXE_DIR / "axe.min.js"

#: axe-core's tags for the WCAG 2.0 and 2.1 success criteria at levels A and AA.
WCAG_21_AA = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]

RUN_AXE = """async ([tags, context]) => {
  const results = await axe.run(context || document, {runOnly: {type: 'tag', values: tags}});
  return results.violations.map(v => ({
    id: v.id, impact: v.impact, help: v.help, helpUrl: v.helpUrl,
    nodes: v.nodes.map(n => ({target: n.target, summary: n.failureSummary})),
  }));
}"""

TOKEN = "a11y-token-0123456789"

PHONE = {"width": 390, "height": 844}
WIDE = {"width": 1280, "height": 720}  # Playwright's default

#: Slow polls: the server draws the page complete, and a poll's morph in the
#: middle of a check would only make the result depend on timing. One worker, so
#: one long task keeps the others waiting in "Up next".
SETTINGS = {**QUICK, "FLASK_QUEUE_POLL_INTERVAL": "10", "FLASK_QUEUE_WORKERS": "1"}

#: (name, color_scheme): the pages with no presenter mode.
SCHEMES = [("light", "light"), ("dark", "dark")]
#: (name, color_scheme, presenter mode): presenter mode has its own palette, but
#: the scheme still picks some colours (a button's text once did).
DASHBOARD_MODES = [
    ("light", "light", False),
    ("dark", "dark", False),
    ("present-light", "light", True),
    ("present-dark", "dark", True),
]


def describe(violations: list[dict[str, Any]], where: str) -> str:
    lines = [f"{where}: {len(violations)} axe-core WCAG 2.1 AA violation(s):"]
    for violation in violations:
        lines.append(f"- {violation['id']} ({violation['impact']}): {violation['help']}"
                     f"  <{violation['helpUrl']}>")
        for node in violation["nodes"]:
            target = " ".join(t if isinstance(t, str) else json.dumps(t) for t in node["target"])
            lines.append(f"    at {target}")
            lines.extend(f"      {line}" for line in (node["summary"] or "").splitlines())
    return "\n".join(lines)


def axe_violations(tab: Tab, context: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Inject the vendored axe-core into the current page and run the WCAG 2.1 AA
    rules on the document (or on axe's ``context``: what to include, exclude)."""
    page = tab.page
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.add_script_tag(path=str(AXE_JS))
    return page.evaluate(RUN_AXE, [WCAG_21_AA, context])


def check(tab: Tab, where: str, found: dict[str, str], context: dict[str, Any] | None = None) -> None:
    """Run axe on the page as it is; record what it finds under ``where``."""
    violations = axe_violations(tab, context)
    if violations:
        found[where] = describe(violations, where)


def assert_none(found: dict[str, str]) -> None:
    assert not found, "\n\n".join(found.values())


def a11y_tab(chromium_browser, server: Server, scheme: str):
    """A watched page on ``server`` in ``scheme``, with the CSP bypassed so axe can be injected."""
    return open_tab(chromium_browser, server, color_scheme=scheme, bypass_csp=True)


def task_state(server: Server, task_id: int, token: str | None = None) -> str:
    status, info = server.request("GET", f"/api/tasks/{task_id}", token=token)
    assert status == 200, info
    return info["state"]


def fill_history(server: Server, token: str | None = None) -> dict[str, int]:
    """A done, a failed and a cancelled task in the history; one task running for
    minutes (progress, a Cancel button) and two waiting behind it. Their ids."""

    def submit(kind: str, count: int = 1, **params: Any) -> list[int]:
        status, body = server.request(
            "POST", "/api/tasks", {"kind": kind, "count": count, "params": params}, token=token)
        assert status == 202, body
        return body["ids"]

    (failed,) = submit("flaky", seconds=0, fail_rate=1)
    (done,) = submit("primes", limit=1000)  # done, with a result on its page
    status, body = server.request("POST", "/api/tasks", {"kind": "pretend", "delay": 3600},
                                  token=token)
    assert status == 202, body  # scheduled: the Scheduled list shows, counting down
    (running,) = submit("pretend", seconds=600)  # ends only when the server stops
    wait_for(lambda: task_state(server, running, token) == "running", 10, f"task {running} to run")
    assert task_state(server, failed, token) == "failed"
    assert task_state(server, done, token) == "done"
    cancelled, *waiting = submit("pretend", 3, seconds=0)
    status, info = server.request("POST", f"/api/tasks/{cancelled}/cancel", token=token)
    assert status == 200, info
    assert task_state(server, cancelled, token) == "cancelled"
    return {"failed": failed, "done": done, "running": running, "cancelled": cancelled,
            "waiting": waiting[0]}


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, int]]]:
    """A server whose dashboard has something in every region, and the tasks' ids."""
    log = tmp_path_factory.mktemp("gunicorn") / "a11y.log"
    with run_server(log, SETTINGS) as server:
        ids = fill_history(server)
        yield server, ids
        server.request("POST", f"/api/tasks/{ids['running']}/cancel")  # a quick stop


@pytest.fixture(scope="module")
def read_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, int]]]:
    """A server with an access token and public reading: a page without the token is read-only."""
    log = tmp_path_factory.mktemp("gunicorn") / "a11y-read-only.log"
    env = {**SETTINGS, "FLASK_QUEUE_ACCESS_TOKEN": TOKEN, "FLASK_QUEUE_PUBLIC_READ": "true"}
    with run_server(log, env) as server:
        ids = fill_history(server, token=TOKEN)
        yield server, ids
        server.request("POST", f"/api/tasks/{ids['running']}/cancel", token=TOKEN)


def open_dashboard(tab: Tab, present: bool, queued: int, can_act: bool = True) -> None:
    page = tab.page
    page.goto("/?present=1" if present else "/")
    expect(page.locator("#queue-depth")).to_have_text(str(queued))
    expect(page.locator("#workers .worker.state-running")).to_have_count(1)
    if present:
        expect(page.locator("body")).to_have_class("present")
    else:
        expect(page.locator("#history tbody tr")).to_have_count(3)
        expect(page.locator("#upcoming li")).to_have_count(queued)
        expect(page.locator("#scheduled li time.countdown")).to_have_text(re.compile(r"^in "))
    expect(page.locator("#read-only")).to_have_count(0 if can_act else 1)


# -- the vendored axe-core ----------------------------------------------------------------


def test_vendored_axe_matches_its_recorded_version_and_hashes():
    package, version = (AXE_DIR / "VERSION").read_text().split()
    assert package == "axe-core"
    sums = dict(reversed(line.split()) for line in (AXE_DIR / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {"axe.min.js", "LICENSE"}
    for name, digest in sums.items():
        assert hashlib.sha256((AXE_DIR / name).read_bytes()).hexdigest() == digest, name
    assert f"axe v{version}".encode() in AXE_JS.read_bytes()[:200]


# -- the pages ----------------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.parametrize("mode, scheme, present", DASHBOARD_MODES, ids=[m[0] for m in DASHBOARD_MODES])
def test_the_busy_then_paused_dashboard_passes_wcag_21_aa(
    chromium_browser, busy, mode: str, scheme: str, present: bool
):
    server, _ = busy
    found: dict[str, str] = {}
    with a11y_tab(chromium_browser, server, scheme) as tab:
        open_dashboard(tab, present, queued=2)
        check(tab, f"the dashboard ({mode})", found)
        tab.page.set_viewport_size(PHONE)  # the history's rows become cards
        check(tab, f"the dashboard on a phone ({mode})", found)
        tab.page.set_viewport_size(WIDE)

        status, body = server.request("POST", "/api/pause")
        assert status == 200, body
        try:
            tab.expect_aborted_polls()  # the reload leaves a poll behind
            open_dashboard(tab, present, queued=2)
            expect(tab.page.locator("#paused-flag")).to_be_visible()
            check(tab, f"the paused dashboard ({mode})", found)
        finally:
            status, body = server.request("POST", "/api/resume")
            assert status == 200, body
    assert_none(found)


@pytest.mark.browser
@pytest.mark.parametrize("mode, scheme", SCHEMES, ids=[m[0] for m in SCHEMES])
def test_task_pages_and_a_message_page_pass_wcag_21_aa(chromium_browser, busy, mode: str, scheme: str):
    server, ids = busy
    found: dict[str, str] = {}
    with a11y_tab(chromium_browser, server, scheme) as tab:
        page = tab.page
        tab.expect_aborted_polls()  # leaving a running task's page leaves its poll behind
        tab.expect_http_error(400, "/tasks/lookup")

        page.goto(f"/tasks/{ids['failed']}")
        expect(page.locator("#task-state")).to_have_text("failed")
        expect(page.locator("#task-error")).to_contain_text("flaky task gave up")
        expect(page.locator("pre.traceback")).to_be_visible()
        check(tab, f"a failed task's page ({mode})", found)

        # On a phone the traceback scrolls sideways on its own: a keyboard must reach it too.
        page.set_viewport_size(PHONE)
        expect(page.locator("pre.traceback")).to_be_visible()
        assert page.evaluate("(pre => pre.scrollWidth > pre.clientWidth)(document.querySelector('pre.traceback'))")
        check(tab, f"a failed task's page on a phone ({mode})", found)
        page.set_viewport_size(WIDE)

        page.goto(f"/tasks/{ids['done']}")
        expect(page.locator("#task-result")).to_have_text("168")
        check(tab, f"a done task's page, with its result ({mode})", found)

        page.goto(f"/tasks/{ids['running']}")
        expect(page.locator("#task-state")).to_have_text("running")
        expect(page.locator("#task-detail progress")).to_be_visible()
        check(tab, f"a running task's page ({mode})", found)

        response = page.goto("/tasks/lookup?id=a%20b")
        assert response is not None and response.status == 400
        expect(page.locator("#message")).to_be_visible()
        check(tab, f"a message page, HTTP 400 ({mode})", found)
    assert_none(found)


@pytest.mark.browser
@pytest.mark.parametrize("mode, scheme", SCHEMES, ids=[m[0] for m in SCHEMES])
def test_the_list_of_tasks_a_confirmation_and_a_refused_filter_pass_wcag_21_aa(
    chromium_browser, busy, mode: str, scheme: str
):
    server, ids = busy
    found: dict[str, str] = {}
    with a11y_tab(chromium_browser, server, scheme) as tab:
        page = tab.page
        tab.expect_aborted_polls()  # leaving a page that polls leaves its poll behind
        tab.expect_http_error(400, "/tasks")

        page.goto("/tasks")
        expect(page.locator(f"#task-{ids['failed']} .badge")).to_have_text("failed")
        expect(page.locator(f"#task-{ids['running']} .pct")).to_be_visible()
        expect(page.locator("#kind-flaky")).to_be_visible()
        check(tab, f"the list of tasks and each kind's health ({mode})", found)
        page.set_viewport_size(PHONE)
        check(tab, f"the list of tasks on a phone ({mode})", found)
        page.set_viewport_size(WIDE)

        page.locator("#bulk-retry").click()  # asks; nothing is done until Confirm
        expect(page.locator("#bulk-question")).to_contain_text("Retry 2 failed or cancelled")
        check(tab, f"a bulk action's confirmation ({mode})", found)

        response = page.goto("/tasks?state=failed&kind=nope")
        assert response is not None and response.status == 400
        expect(page.locator("#form-errors .error")).to_contain_text("kind must be one of")
        check(tab, f"the list with a refused filter, HTTP 400 ({mode})", found)

        page.goto("/tasks/bulk?action=purge&state=done")
        expect(page.locator("#bulk-question")).to_have_text("Purge 1 done task?")
        check(tab, f"a bulk action's confirmation as a page ({mode})", found)
    assert_none(found)


@pytest.mark.browser
@pytest.mark.parametrize("mode, scheme, present", DASHBOARD_MODES, ids=[m[0] for m in DASHBOARD_MODES])
def test_the_read_only_view_passes_wcag_21_aa(
    chromium_browser, read_only, mode: str, scheme: str, present: bool
):
    server, ids = read_only
    found: dict[str, str] = {}
    with a11y_tab(chromium_browser, server, scheme) as tab:
        page = tab.page
        open_dashboard(tab, present, queued=2, can_act=False)
        check(tab, f"the read-only dashboard ({mode})", found)
        if not present:
            tab.expect_aborted_polls()
            page.goto(f"/tasks/{ids['failed']}")
            expect(page.locator("#task-state")).to_have_text("failed")
            expect(page.locator("#task-detail p.hint")).to_contain_text("access token")
            check(tab, f"a failed task's read-only page ({mode})", found)
            page.goto("/tasks")
            expect(page.locator("#read-only")).to_contain_text("access token")
            expect(page.locator(f"#task-{ids['failed']}")).to_be_visible()
            check(tab, f"the read-only list of tasks ({mode})", found)
    assert_none(found)


@pytest.mark.browser
def test_the_lost_server_banner_and_a_click_that_went_nowhere_pass_wcag_21_aa(
    chromium_browser, start_server
):
    server = start_server()  # QUICK's fast polls: the page notices the loss in a second or so
    found: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        tabs = []
        for mode, scheme, present in DASHBOARD_MODES:
            tab = stack.enter_context(a11y_tab(chromium_browser, server, scheme))
            tab.expect_lost_server()
            tab.page.goto("/?present=1" if present else "/")
            expect(tab.page.locator("#queue-depth")).to_have_text("0")
            tabs.append((mode, tab))
        stop(server)
        for mode, tab in tabs:
            page = tab.page
            expect(page.locator("#connection")).to_contain_text("Lost the server", timeout=10_000)
            page.get_by_role("button", name="Add work", exact=True).click()
            expect(page.locator("#form-errors")).to_contain_text("did not reach the server")
            # #live is greyed out on purpose: what it shows is from before the loss.
            check(tab, f"the dashboard without its server ({mode})", found, {"exclude": [["#live"]]})
    assert_none(found)
