"""The dashboard on a phone, and controls that stay still: Chromium, driven by
Playwright, against the app under gunicorn (the fixtures of tests/browser.py).

* At 390 px, light, dark and presenter mode, with failed, cancelled-while-running
  and long-error tasks in the history, and on the message pages that quote a
  40-character id: the page is no wider than the screen, and an error gets the
  width of the screen, not a column a few letters wide. So too at 320 px, on a
  phone on its side (667 px) and on a small tablet (800 px). At 1280 px the
  history is still a table with its error column.
* A poll does not dim the buttons (the live region it refreshes holds every
  control); a form that is posting still dims its own.

Screenshots land in test-artifacts/. No Chromium? The same policy as
tests/test_browser.py: fail under CI=true, skip loudly elsewhere.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest
from browser import Server, Tab, expect, open_tab
from support import wait_for

QUICK = 10_000  # ms: far above what a busy two-core machine needs

PHONE = {"width": 390, "height": 844}
WIDE = {"width": 1280, "height": 800}

#: What a task's error can be: any exception's message, like a path with no space to break at.
LONG_ERROR = "FileNotFoundError:/srv/queue/spool/" + "0123456789abcdef" * 10

# Every element's and every text's right edge, but for what sits inside an element
# that scrolls or clips on purpose (that element itself must still fit), and
# optionally a history error made long first: in the same script, so no poll's
# morph can put the real text back between the change and the measurement.
MEASURE = r"""([longError]) => {
  if (longError) {
    const cell = document.querySelector('#history tr.state-failed td.error');
    cell.textContent = longError;
    cell.closest('tr').dataset.longError = '1';
  }
  const inScroller = node => {
    for (let el = node.parentElement; el && el !== document.body; el = el.parentElement) {
      const overflow = getComputedStyle(el).overflowX;
      if (['auto', 'scroll', 'hidden', 'clip'].includes(overflow)) return true;
    }
    return false;
  };
  const name = el => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '')
    + [...el.classList].map(c => '.' + c).join('');
  const beyond = [];
  const right = (what, rects) => {
    for (const r of rects) if (r.width > 0 && r.right + window.scrollX > window.innerWidth + 0.5)
      beyond.push(`${what} ends at ${Math.round(r.right + window.scrollX)}px`);
  };
  for (const el of document.body.querySelectorAll('*')) {
    if (!inScroller(el)) right(name(el), [el.getBoundingClientRect()]);
  }
  const texts = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const range = document.createRange();
  for (let text = texts.nextNode(); text; text = texts.nextNode()) {
    if (!text.textContent.trim() || inScroller(text)) continue;
    range.selectNodeContents(text);
    right(`text "${text.textContent.trim().slice(0, 30)}" in ${name(text.parentElement)}`,
          range.getClientRects());
  }
  // How an error reads: its box, its height, and how many characters a line holds.
  const errors = [...document.querySelectorAll('#history td.error, p.error')]
    .filter(el => el.textContent.trim()).map(el => {
      range.selectNodeContents(el);
      const lines = Math.round(range.getBoundingClientRect().height
                               / parseFloat(getComputedStyle(el).lineHeight));
      const row = el.closest('tr');
      return {
        text: el.textContent.trim().slice(0, 40), chars: el.textContent.trim().length,
        lines,
        width: el.getBoundingClientRect().width, display: getComputedStyle(el).display,
        row: row ? {height: row.getBoundingClientRect().height, long: !!row.dataset.longError,
                    state: row.className} : null,
      };
    });
  return {viewport: window.innerWidth, scrollWidth: document.documentElement.scrollWidth,
          beyond: beyond.slice(0, 8), errors};
}"""


def measure(page, long_error: str | None = None) -> dict:
    return page.evaluate(MEASURE, [long_error])


def assert_fits(page, where: str, long_error: str | None = None) -> dict:
    """The page is no wider than the screen; returns what ``MEASURE`` found."""
    found = measure(page, long_error)
    assert found["scrollWidth"] <= found["viewport"], (
        f"{where}: the page is {found['scrollWidth']} px wide on a {found['viewport']} px "
        f"screen; beyond the edge: {found['beyond']}"
    )
    assert not found["beyond"], f"{where}: past the {found['viewport']} px edge: {found['beyond']}"
    return found


def full_lines(error: dict) -> bool:
    """Lines of 25 characters or more, but for two cut short where a word did not fit."""
    return error["lines"] <= 2 + error["chars"] / 25


def assert_readable(error: dict, viewport: int, where: str) -> None:
    """An error gets most of the screen's width, and lines of many characters."""
    assert error["width"] >= 0.6 * viewport, f"{where}: the error is narrow: {error}"
    assert full_lines(error), f"{where}: the error has short lines: {error}"


@pytest.fixture
def troubled_server(start_server) -> tuple[Server, list[int]]:
    """A server of this test's own whose history holds two failed tasks and one
    cancelled while running (its error: "cancelled while running"), and the
    failed tasks' ids."""
    server = start_server()
    failed = server.submit("flaky", 2, seconds=0, fail_rate=1)
    (running,) = server.submit("pretend", seconds=60)  # ends early only by being cancelled

    def state(task_id: int) -> str:
        status, info = server.request("GET", f"/api/tasks/{task_id}")
        assert status == 200, info
        return info["state"]

    wait_for(lambda: state(running) == "running", 10, f"task {running} to run")
    status, info = server.request("POST", f"/api/tasks/{running}/cancel")
    assert status == 200, info
    server.wait_idle(timeout=10)
    assert [state(i) for i in failed] == ["failed", "failed"]
    assert state(running) == "cancelled"
    return server, failed


# -- a phone's width ------------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.parametrize(
    "mode, scheme, home",
    [("light", "light", "/"), ("dark", "dark", "/"), ("present", "dark", "/?present=1")],
)
def test_a_phone_screen_fits_failed_cancelled_and_long_errors_and_they_stay_readable(
    chromium_browser, troubled_server, mode: str, scheme: str, home: str
):
    server, failed = troubled_server
    long_id = "x" * 40
    with open_tab(chromium_browser, server, viewport=PHONE, color_scheme=scheme) as tab:
        page = tab.page
        tab.expect_http_error(400, "/tasks/lookup")
        tab.expect_http_error(404, f"/tasks/{long_id}")
        # Leaving a polling page aborts the poll in flight.
        tab.expect_aborted_polls()

        page.goto(home)
        expect(page.locator("#queue-depth")).to_have_text("0")
        if mode == "present":
            expect(page.locator("#history")).to_have_count(0)  # presenter mode has no history
            assert_fits(page, home)
        else:
            rows = page.locator("#history tr.state-failed, #history tr.state-cancelled")
            expect(rows).to_have_count(3)
            expect(page.locator("#history tr.state-cancelled td.error")).to_have_text(
                "cancelled while running"
            )
            found = assert_fits(page, home)
            errors = [e for e in found["errors"] if e["row"]]
            assert len(errors) == 3, found["errors"]
            for error in errors:
                assert_readable(error, found["viewport"], f"{home}, {error['row']['state']}")
                # One line for the id, kind and state, two or so for the error: not 280 px.
                assert error["row"]["height"] <= 160, f"a history row is absurdly tall: {error}"
            tab.screenshot(f"phone-{mode}-history.png")

            # A task's error can be one long word: a path, a URL, an id.
            found = assert_fits(page, f"{home}, a {len(LONG_ERROR)}-character error", LONG_ERROR)
            (long,) = [e for e in found["errors"] if e["row"] and e["row"]["long"]]
            assert long["chars"] == len(LONG_ERROR)
            assert_readable(long, found["viewport"], f"{home}, the long error")
            tab.screenshot(f"phone-{mode}-long-error.png")

        # The message pages quote what they were given, 40 characters of it in one word.
        for path, status, says in (
            (f"/tasks/lookup?id={long_id}!", 400, "id must be a task id like 42"),
            (f"/tasks/{long_id}", 404, f"no task '{long_id}'"),
        ):
            response = page.goto(path)
            assert response is not None and response.status == status
            expect(page.locator("#message")).to_contain_text(says)
            found = assert_fits(page, path)
            (message,) = [e for e in found["errors"] if not e["row"]]
            assert_readable(message, found["viewport"], path)
        tab.screenshot(f"phone-{mode}-message.png")

        # A failed task's own page: its error, and the traceback that scrolls on its own.
        page.goto(f"/tasks/{failed[0]}")
        expect(page.locator("#task-error")).to_contain_text("RuntimeError: flaky task gave up")
        expect(page.locator("pre.traceback")).to_be_visible()
        found = assert_fits(page, f"/tasks/{failed[0]}")
        (error,) = [e for e in found["errors"] if not e["row"]]
        assert_readable(error, found["viewport"], f"/tasks/{failed[0]}")
        tab.screenshot(f"phone-{mode}-failed-task.png")


@pytest.mark.browser
def test_a_small_phone_a_phone_on_its_side_and_a_small_tablet_fit_and_errors_stay_readable(
    chromium_browser, troubled_server
):
    server, _ = troubled_server
    with open_tab(chromium_browser, server, viewport={"width": 320, "height": 640}) as tab:
        page = tab.page
        page.goto("/")
        expect(page.locator("#history tr.state-failed")).to_have_count(2)
        for width, height in ((320, 640), (667, 375), (800, 1000)):
            page.set_viewport_size({"width": width, "height": height})
            for long_error in (None, LONG_ERROR):
                found = assert_fits(page, f"/ at {width} px", long_error)
                errors = [e for e in found["errors"] if e["row"]]
                assert len(errors) == 3, found["errors"]
                for error in errors:
                    assert_readable(error, found["viewport"], f"/ at {width} px")
            tab.screenshot(f"width-{width}-history.png")


@pytest.mark.browser
def test_a_wide_screen_keeps_the_history_a_table_with_an_error_column(
    chromium_browser, troubled_server
):
    server, _ = troubled_server
    with open_tab(chromium_browser, server, viewport=WIDE, color_scheme="light") as tab:
        page = tab.page
        page.goto("/")
        history = page.locator("#history")
        expect(history.locator("tr.state-failed")).to_have_count(2)
        for header in ("#", "kind", "state", "waited", "ran", "finished", "error"):
            expect(history.get_by_role("columnheader", name=header, exact=True)).to_be_visible()
        assert history.locator("table").evaluate("t => getComputedStyle(t).display") == "table"

        for long_error in (None, LONG_ERROR):
            found = assert_fits(page, "/ at 1280 px", long_error)
            errors = [e for e in found["errors"] if e["row"]]
            assert len(errors) == 3, found["errors"]
            for error in errors:
                assert error["display"] == "table-cell", error
                assert error["width"] >= 200, f"the error column is narrow: {error}"
                assert full_lines(error), error
        tab.screenshot("wide-history.png")


# -- controls that stay still ----------------------------------------------------------------

# Every button of the live regions, with its computed opacity, and which forms are posting.
BUTTONS = """() => ({
  live: document.getElementById('live').classList.contains('htmx-request'),
  posting: [...document.querySelectorAll('form.htmx-request')].map(f => f.getAttribute('action')),
  buttons: [...document.querySelectorAll('#live button')].map(b => ({
    label: b.getAttribute('aria-label') || b.textContent.trim(), disabled: b.disabled,
    opacity: getComputedStyle(b).opacity, form: b.form?.getAttribute('action')})),
})"""

# From now on, each time a class changes anywhere (htmx marks a request in flight so),
# note any enabled button of the live regions that is dimmed while no form posts.
WATCH_BLINKS = """() => {
  window.__blinks = [];
  window.__classChanges = 0;
  new MutationObserver(records => {
    window.__classChanges += records.length;
    if (document.querySelector('form.htmx-request')) return;
    for (const b of document.querySelectorAll('#live button')) {
      const opacity = getComputedStyle(b).opacity;
      if (!b.disabled && opacity !== '1') __blinks.push(`${b.textContent.trim()}: ${opacity}`);
    }
  }).observe(document.body, {subtree: true, attributes: true, attributeFilter: ['class']});
}"""


def assert_no_button_dimmed_by_the_poll(seen: dict, when: str) -> None:
    for button in seen["buttons"]:
        if button["form"] in seen["posting"]:
            continue
        # Enabled: fully opaque. Disabled (the "−" of one worker): its own .45, no other.
        wanted = "0.45" if button["disabled"] else "1"
        assert button["opacity"] == wanted, f"{when}: {button} while posting {seen['posting']}"


@pytest.mark.browser
def test_a_poll_leaves_the_buttons_alone_and_only_a_posting_form_dims_its_own(fresh_tab: Tab):
    page = fresh_tab.page
    # Hold each poll, and the post below, until the test has looked: the request is
    # in flight for exactly as long as it takes to check.
    held: list = []
    holding = True

    def hold(route) -> None:
        if holding:
            held.append(route)
        else:
            route.continue_()

    page.route(lambda url: urlsplit(url).path in ("/live", "/history/clear"), hold)

    def next_held(path: str):
        deadline = time.monotonic() + QUICK / 1000
        while True:
            for route in held:
                if urlsplit(route.request.url).path == path:
                    return route
            assert time.monotonic() < deadline, f"no request to {path} within {QUICK} ms"
            page.wait_for_timeout(20)  # lets Playwright deliver the route events

    def release(route) -> None:
        held.remove(route)
        route.continue_()

    try:
        page.goto("/")
        expect(page.locator("#workers-target")).to_have_text("1")  # so "−" is disabled
        page.evaluate(WATCH_BLINKS)
        polls = 4
        for n in range(polls):
            poll = next_held("/live")
            seen = page.evaluate(BUTTONS)
            assert seen["live"], "the poll is not in flight"  # else the check below proves nothing
            assert seen["posting"] == []
            assert len(seen["buttons"]) >= 5, seen
            assert_no_button_dimmed_by_the_poll(seen, f"poll {n + 1} in flight")
            if n < polls - 1:
                release(poll)

        # The last poll still in flight, a click posts a form of the live regions.
        clear = page.locator("#live").get_by_role("button", name="Clear history", exact=True)
        clear.click()
        next_held("/history/clear")
        seen = page.evaluate(BUTTONS)
        assert seen["live"] and seen["posting"] == ["/history/clear"], seen
        (mine,) = [b for b in seen["buttons"] if b["label"] == "Clear history"]
        assert float(mine["opacity"]) < 1, f"the posting form's button is not dimmed: {mine}"
        assert_no_button_dimmed_by_the_poll(seen, "a post and a poll in flight")
        assert page.evaluate("window.__classChanges") >= 2 * polls, "the watch saw no requests"
        assert page.evaluate("window.__blinks") == []
    finally:
        holding = False
        while held:
            release(held[0])
    # The answer arrives: the button is whole again.
    expect(clear).to_have_css("opacity", "1")
    fresh_tab.screenshot("buttons-after-post.png")
