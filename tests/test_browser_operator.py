"""The operator's view in a real browser: Chromium, driven by Playwright, against the
app under gunicorn (servers of each test's own: ``start_server``, each stopped when
its test ends).

a. Filter to the failed tasks of one kind, retry them all through the confirmation
   (it says how many and which filter), and watch the list follow: the retries wait,
   the "Cancel N queued" count falls as they run, and they fail again.
b. Page through 5,000 tasks with Older and back with Newer: every id once, in order,
   none twice; the back button restores the page before.
c. A filtered URL (made by the form, pushed into the address bar) opened in a new
   page shows the same view, and the form works with JavaScript off.
d. The list updates live while a queue burns down, and an idle list's polls are 304s.

docs/operator.png (docs/operator.md's screenshot) is made by (a): written when missing, refreshed with
``UPDATE_SCREENSHOT=1``. No Chromium? The same policy as tests/test_browser.py.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qs, urlsplit

import pytest

from browser import ROOT, Server, expect, open_tab

QUICK = 10_000  # ms: far above what a busy machine needs, far below a test's patience

SCREENSHOT = ROOT / "docs" / "operator.png"
UPDATE_SCREENSHOT_ENV = "UPDATE_SCREENSHOT"


def row_ids(page) -> list[int]:
    """The ids of the tasks the list shows, in order."""
    return page.locator("#results tbody tr").evaluate_all(
        "rows => rows.map(r => Number(r.id.slice('task-'.length)))")


def failed_of(server: Server, kind: str) -> list[int]:
    status, body = server.request("GET", f"/api/tasks?state=failed&kind={kind}&limit=500")
    assert status == 200, body
    return [t["id"] for t in body["tasks"]]


# -- a. retry every failed task of a kind, through the confirmation ------------------------


@pytest.mark.browser
def test_retry_every_failed_task_of_a_kind_through_the_confirmation(chromium_browser,
                                                                    start_server):
    server = start_server(FLASK_QUEUE_WORKERS="1")
    server.submit("flaky", 6, seconds=0.3, fail_rate=1)
    server.submit("pretend", 2, seconds=0)
    server.submit("flaky", 1, seconds=0, fail_rate=0)  # a flaky task that did not fail
    server.wait_idle()
    failed = sorted(failed_of(server, "flaky"), reverse=True)
    assert len(failed) == 6
    with open_tab(chromium_browser, server, viewport={"width": 1200, "height": 800},
                  color_scheme="light") as tab:
        page = tab.page
        tab.expect_aborted_polls()  # leaving the dashboard may leave a poll behind
        page.goto("/")
        page.get_by_role("link", name="Find tasks").click()
        expect(page).to_have_url(re.compile(r"/tasks$"))
        expect(page.locator("#match-count")).to_have_text("9")

        page.get_by_label("failed", exact=True).check()
        page.locator("#filter-kind").select_option("flaky")
        page.get_by_role("button", name="Show", exact=True).click()
        expect(page).to_have_url(re.compile(r"/tasks\?state=failed&kind=flaky"))
        expect(page.locator("#match-count")).to_have_text("6")
        assert row_ids(page) == failed

        page.locator("#bulk-retry").click()
        question = page.locator("#bulk-question")
        expect(question).to_have_text("Retry 6 failed tasks of kind flaky?")
        expect(page.locator("#bulk-confirm-button")).to_be_focused()
        shot = tab.screenshot("operator.png")
        assert len(failed_of(server, "flaky")) == 6 and server.stats()["queued"] == 0

        status, body = server.request("POST", "/api/pause")  # to watch them go
        assert status == 200, body
        page.get_by_role("button", name="Confirm").click()
        expect(page.locator("#bulk-result")).to_have_text(re.compile(r"^6 tasks retried as #"))
        # The list comes back with the answer: each failed task links to its retry.
        expect(page.locator("#results tbody a.retried")).to_have_count(6)
        assert server.stats()["queued"] == 6
        page.get_by_label("queued", exact=True).check()
        page.get_by_label("running", exact=True).check()
        page.get_by_role("button", name="Show", exact=True).click()
        cancel = page.locator("#bulk-cancel")
        expect(cancel).to_have_text("Cancel 6 queued")
        expect(page.locator("#match-count")).to_have_text("12")
        page.evaluate("""() => {
          window.__cancels = new Set();
          const note = () => window.__cancels.add(
            document.getElementById('bulk-cancel')?.textContent ?? 'none');
          new MutationObserver(note).observe(document.body, {subtree: true, childList: true,
                                                             characterData: true});
        }""")
        status, body = server.request("POST", "/api/resume")
        assert status == 200, body
        # The retries run (the cancel count falls) and fail again: more to retry.
        expect(page.locator("#bulk-retry")).to_have_text("Retry 6 failed", timeout=30_000)
        expect(cancel).to_have_count(0)
        expect(page.locator("#match-count")).to_have_text("12")
        expect(page.locator("#kind-flaky td").nth(3)).to_have_text("12")
        seen = page.evaluate("[...window.__cancels]")
        between = [t for t in seen if re.fullmatch(r"Cancel [1-5] queued", t)]
        assert between, seen  # watched it fall

    image = shot.read_bytes()
    assert image[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(image[16:20], "big") == 1200
    assert len(image) < 250_000, f"the screenshot would be {len(image) // 1000} KB"
    if os.environ.get(UPDATE_SCREENSHOT_ENV) == "1" or not SCREENSHOT.exists():
        SCREENSHOT.parent.mkdir(exist_ok=True)
        SCREENSHOT.write_bytes(image)


# -- b. page through 5,000 tasks -----------------------------------------------------------


@pytest.mark.browser
def test_page_through_5000_tasks_with_older_and_back_with_newer(chromium_browser,
                                                                start_server):
    server = start_server(FLASK_QUEUE_MAX_QUEUED="6000", FLASK_QUEUE_MAX_BATCH="1000",
                          FLASK_QUEUE_SUBMIT_LIMIT="")
    status, body = server.request("POST", "/api/pause")
    assert status == 200, body  # they all stay queued: the list holds still
    submitted = []
    for _ in range(5):
        submitted += server.submit("pretend", 1000, seconds=0)
    newest_first = sorted(submitted, reverse=True)
    assert len(set(submitted)) == 5000
    with open_tab(chromium_browser, server) as tab:
        page = tab.page
        page.goto("/tasks?state=queued&limit=200")
        expect(page.locator("#match-count")).to_have_text("5000")
        pages = [row_ids(page)]
        older = page.locator("#on-page")
        while older.count():
            last = pages[-1][-1]
            older.click()
            expect(page.locator("#results tbody tr").first).not_to_have_id(
                f"task-{pages[-1][0]}")
            ids = row_ids(page)
            assert ids[0] < last, "Older continues past the last task shown"
            pages.append(ids)
            assert "cursor=a" in page.url  # the page's address, for a bookmark
        seen = [i for ids in pages for i in ids]
        assert len(pages) == 25 and seen == newest_first  # every id once, in order

        # Back with the browser's button: the page before, from its address.
        page.go_back()
        expect(page.locator("#results tbody tr").first).to_have_id(f"task-{pages[-2][0]}")
        assert row_ids(page) == pages[-2]
        page.go_forward()
        expect(page.locator("#results tbody tr").first).to_have_id(f"task-{pages[-1][0]}")

        back = []
        newer = page.locator("#back-page")
        while newer.count():
            shown = row_ids(page)
            newer.click()
            expect(page.locator("#results tbody tr").first).not_to_have_id(f"task-{shown[0]}")
            ids = row_ids(page)
            assert ids[-1] > shown[0], "Newer goes back before the first task shown"
            back = ids + back
        assert back == newest_first[:-len(pages[-1])]
        assert row_ids(page) == pages[0] and newer.count() == 0
        # Reached through a cursor, the page is held in place; "Newest first" is the live one.
        page.locator("#first-page").click()
        expect(page).to_have_url(re.compile(r"/tasks\?state=queued&limit=200$"))
        assert row_ids(page) == pages[0]


# -- c. a filtered URL is the view -----------------------------------------------------------


@pytest.mark.browser
def test_a_filtered_url_opened_in_a_new_page_shows_the_same_view(chromium_browser,
                                                                start_server):
    server = start_server()
    server.submit("flaky", 3, seconds=0, fail_rate=1)
    server.submit("pretend", 2, seconds=0)
    server.wait_idle()
    with open_tab(chromium_browser, server) as tab:
        page = tab.page
        page.goto("/tasks")
        page.get_by_label("failed", exact=True).check()
        page.get_by_label("done", exact=True).check()
        page.locator("#filter-text").fill("GAVE")
        page.locator("#filter-order").select_option("oldest")
        page.get_by_role("button", name="Show", exact=True).click()
        expect(page).to_have_url(re.compile(r"text=GAVE"))
        query = parse_qs(urlsplit(page.url).query)
        assert query["state"] == ["done", "failed"] and query["order"] == ["oldest"]
        expect(page.locator("#match-count")).to_have_text("3")
        shown = row_ids(page)
        assert shown == sorted(shown)  # oldest first

        other = tab.new_page()
        other.goto(page.url)
        expect(other.locator("#match-count")).to_have_text("3")
        assert row_ids(other) == shown
        for state in ("failed", "done"):
            expect(other.get_by_label(state, exact=True)).to_be_checked()
        expect(other.get_by_label("queued", exact=True)).not_to_be_checked()
        expect(other.locator("#filter-text")).to_have_value("GAVE")
        expect(other.locator("#filter-order")).to_have_value("oldest")
        other.close()

    # Without JavaScript the form is a plain GET: the same address, the same list.
    with open_tab(chromium_browser, server, java_script_enabled=False) as tab:
        page = tab.page
        page.goto("/tasks")
        page.get_by_label("failed", exact=True).check()
        page.get_by_role("button", name="Show", exact=True).click()
        expect(page).to_have_url(re.compile(r"/tasks\?state=failed"))
        expect(page.locator("#match-count")).to_have_text("3")
        assert sorted(row_ids(page)) == sorted(failed_of(server, "flaky"))


# -- d. live while a queue burns down ---------------------------------------------------------


@pytest.mark.browser
def test_the_list_updates_live_while_a_queue_burns_down(chromium_browser, start_server):
    server = start_server()
    status, body = server.request("POST", "/api/pause")
    assert status == 200, body
    ids = server.submit("pretend", 8, seconds=0.2)
    with open_tab(chromium_browser, server) as tab:
        page = tab.page
        page.goto("/tasks?state=queued&state=running")
        expect(page.locator("#match-count")).to_have_text("8")
        assert row_ids(page) == sorted(ids, reverse=True)
        assert [next_poll(page) for _ in range(3)] == [304] * 3  # nothing changed
        page.evaluate("""() => {
          window.__counts = new Set();
          const note = () => window.__counts.add(
            document.getElementById('match-count')?.textContent);
          new MutationObserver(note).observe(document.body, {subtree: true, childList: true,
                                                             characterData: true});
        }""")
        status, body = server.request("POST", "/api/resume")
        assert status == 200, body
        expect(page.locator("#no-tasks")).to_have_text("No task matches.", timeout=30_000)
        seen = page.evaluate("[...window.__counts]")
        assert [c for c in seen if c not in (None, "8", "0")], seen  # it counted down
        # The queue as a whole: done, in the health table, without a reload.
        expect(page.locator("#kind-pretend td").nth(2)).to_have_text("8", timeout=QUICK)
        next_poll(page)
        assert [next_poll(page) for _ in range(3)] == [304] * 3  # idle again


def next_poll(page) -> int:
    """The status of the list's next poll."""
    response = page.wait_for_event(
        "response", lambda r: urlsplit(r.url).path == "/tasks/live", timeout=QUICK)
    return response.status
