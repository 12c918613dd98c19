"""The dashboard in a real browser: Chromium, driven by Playwright, against the
app under gunicorn. What a person sees: work added by a click shows at once,
drains by itself without a reload, unchanged polls cost a 304 and no DOM
change, errors land where they belong, and the page works without JavaScript.
And the controls: pause holds the depth and resume drains it, more workers
drain the same backlog sooner, cancel and retry change what the page shows, a
task's own page shows its error or follows it live, the header finds a task,
a hidden tab does not poll, presenter mode, the keys, and reset. Tests that
pause, scale or reset get a server of their own (``fresh_tab``), so no test
depends on what another left behind; the rest share one and assert on deltas.

Screenshots land in test-artifacts/; ``UPDATE_SCREENSHOT=1`` also refreshes
docs/screenshot.png, shown in the README and the docs (written anyway when missing).

No Chromium? Under CI=true these tests fail; elsewhere they are skipped with
the way to get it (see tests/browser.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from support import wait_for

from browser import (
    CHROMIUM_ENV,
    INSTALL_HINT,
    ROOT,
    Tab,
    browser_unavailable,
    Server,
    expect,
    find_chromium,
    open_tab,
    run_server,
)

# Far below every interval the server is configured with where it matters,
# far above what a busy two-core machine needs.
QUICK = 10_000  # ms
DRAIN = 30_000  # ms: five to ten half-second tasks, one worker, a noisy machine


# -- helpers ---------------------------------------------------------------------


def add_button(page, name: str = "Add work"):
    return page.get_by_role("button", name=name, exact=True)


def count(page, selector: str) -> int:
    return int(page.locator(selector).inner_text().strip())


def mark_loaded(page) -> None:
    """A marker that only survives while the page is not navigated or reloaded."""
    page.evaluate("window.__marker = 1")


def still_same_page(page) -> bool:
    return page.evaluate("window.__marker === 1")


def record_peak_depth(page) -> None:
    """Remember the largest #queue-depth the page ever shows from now on."""
    page.evaluate(
        """() => {
          window.__peakDepth = 0;
          const read = () => {
            const depth = parseInt(document.getElementById('queue-depth')?.textContent ?? '', 10);
            if (depth > window.__peakDepth) window.__peakDepth = depth;
          };
          new MutationObserver(read).observe(document.getElementById('live'),
            {subtree: true, childList: true, characterData: true});
          read();
        }"""
    )


def live_responses(page) -> list:
    responses: list = []
    page.on("response", lambda r: urlsplit(r.url).path == "/live" and responses.append(r))
    return responses


def wait_for_count(page, items: list, n: int, timeout_ms: int, what: str) -> None:
    """Let the page run (events are delivered meanwhile) until ``items`` has ``n`` entries."""
    deadline = time.monotonic() + timeout_ms / 1000
    while len(items) < n:
        assert time.monotonic() < deadline, f"saw {len(items)} of {n} {what} within {timeout_ms} ms"
        page.wait_for_timeout(50)


def requests_to(page, path) -> list:
    """Every request the page sends from now on to ``path`` (a string or a compiled pattern)."""
    match = path.fullmatch if isinstance(path, re.Pattern) else path.__eq__
    requests: list = []
    page.on("request", lambda r: match(urlsplit(r.url).path) and requests.append(r))
    return requests


def log_htmx_requests(page) -> None:
    """From now on, note every request htmx is about to send: the element, what
    triggered it, and whether a listener (dashboard.js, in a hidden tab) dropped it.
    This listener runs after dashboard.js's, so it sees the drop."""
    page.evaluate(
        """() => {
          window.__htmx = [];
          document.addEventListener('htmx:before:request', e => window.__htmx.push({
            id: e.target.id, path: new URL(e.detail.ctx.request.action, location.href).pathname,
            trigger: e.detail.ctx.sourceEvent?.type ?? null, dropped: e.defaultPrevented}));
        }"""
    )


def htmx_requests(page, start: int = 0) -> list[dict]:
    return page.evaluate("window.__htmx")[start:]


def keep_checking_for(page, responses: list, n: int, check, what: str) -> int:
    """Run ``check`` again and again until ``n`` more ``responses`` have arrived.

    The way to assert that something did not change: bounded by the page's own
    poll answers, not by a sleep. Returns how many times it checked."""
    target = len(responses) + n
    deadline = time.monotonic() + QUICK / 1000
    checks = 0
    while len(responses) < target:
        assert time.monotonic() < deadline, f"saw {len(responses)} of {target} {what} in {QUICK} ms"
        check()
        checks += 1
        page.wait_for_timeout(50)
    check()
    return checks + 1


def fact(page, name: str):
    """The value (<dd>) of one fact in a task page's list."""
    return page.locator(".facts dt", has_text=re.compile(f"^{name}$")).locator(
        "xpath=following-sibling::dd[1]"
    )


def blur(page) -> None:
    """Focus back on the page itself, where the keyboard shortcuts listen."""
    page.evaluate("document.activeElement?.blur()")
    assert page.evaluate("document.activeElement === document.body")


# -- a. the must-show ---------------------------------------------------------


@pytest.mark.browser
def test_five_clicks_raise_the_depth_which_drains_by_itself_without_a_reload(tab: Tab):
    page = tab.page
    # Document loads, not "framenavigated": htmx stamps the history entry with
    # replaceState on its first swap, which Playwright reports as a navigation.
    loads: list[str] = []
    page.on("domcontentloaded", lambda p: loads.append(p.url))
    page.goto("/")
    mark_loaded(page)
    record_peak_depth(page)
    done_before = count(page, "#count-done")
    url, loads_before, history_before = page.url, len(loads), page.evaluate("history.length")

    # One-second tasks, so five clicks are surely faster than the work they add.
    page.get_by_label("Seconds").fill("1")
    button = add_button(page)
    for _ in range(5):
        button.click()

    # The depth rises: four or five wait while at most one runs.
    wait_for(lambda: page.evaluate("window.__peakDepth") >= 3, 10, "#queue-depth to reach 3")
    # ...then falls to 0 by itself, every task done, on the same page.
    expect(page.locator("#queue-depth")).to_have_text("0", timeout=DRAIN)
    expect(page.locator("#count-done")).to_have_text(str(done_before + 5), timeout=QUICK)
    expect(page.locator("#count-running")).to_have_text("0", timeout=QUICK)
    assert still_same_page(page), "the page was reloaded"
    assert len(loads) == loads_before, f"documents loaded meanwhile: {loads[loads_before:]}"
    assert page.url == url and page.evaluate("history.length") == history_before


@pytest.mark.browser
def test_a_burst_of_clicks_adds_every_task(tab: Tab):
    """Clicks faster than the server answers are queued, not dropped (hx-sync)."""
    page = tab.page
    page.goto("/")
    before = tab.server.stats()["submitted"]
    page.evaluate(
        """() => {
          const button = [...document.querySelectorAll('button')]
            .find(b => b.textContent.trim() === 'Add work');
          for (let i = 0; i < 5; i++) button.click();
        }"""
    )
    wait_for(lambda: tab.server.stats()["submitted"] == before + 5, 10, "5 tasks submitted")
    expect(page.locator("#queue-depth")).to_have_text("0", timeout=DRAIN)
    assert tab.server.stats()["submitted"] == before + 5


# -- b. a click shows its effect at once -------------------------------------------


@pytest.mark.browser
def test_a_click_shows_its_effect_at_once_not_at_the_next_poll(chromium_browser, tmp_path):
    slow = {
        "FLASK_QUEUE_POLL_INTERVAL": "30",  # the next poll is 30 s away
        "FLASK_QUEUE_WORK_TIME": "60",  # nothing finishes meanwhile
        "FLASK_QUEUE_WORKERS": "1",
        "FLASK_QUEUE_SHUTDOWN_TIMEOUT": "1",
    }
    with run_server(tmp_path / "slow.log", slow) as server, open_tab(chromium_browser, server) as tab:
        page = tab.page
        polls = live_responses(page)
        page.goto("/")
        expect(page.locator("#queue-depth")).to_have_text("0")
        with page.expect_response(lambda r: urlsplit(r.url).path == "/tasks") as posted:
            add_button(page, "Add work ×10").click()
        assert posted.value.status == 200
        # Ten added; the one worker may have taken one already.
        expect(page.locator("#queue-depth")).to_have_text(re.compile(r"^(9|10)$"), timeout=QUICK)
        # No poll ran (the first is 30 s away): the post's own response did it.
        assert polls == [], "a poll ran, so the update may not have come from the click"


# -- c. unchanged polls answer 304 and change nothing ---------------------------------


@pytest.mark.browser
def test_unchanged_polls_are_304_and_swap_nothing(tab: Tab, record_property):
    page = tab.page
    polls = live_responses(page)
    page.goto("/")
    page.evaluate(
        """() => {
          const live = document.getElementById('live');
          window.__swaps = [];
          live.addEventListener('htmx:finally:swap', e => window.__swaps.push(
            {status: e.detail.ctx.response?.status, swap: String(e.detail.ctx.swap)}));
          // Changes inside the live regions (htmx's own class on #live itself is not one,
          // nor dashboard.js counting down to a schedule's next run every second).
          const ticking = m => (m.target.nodeType === Node.ELEMENT_NODE ? m.target
                                : m.target.parentElement)?.closest('time.countdown');
          window.__mutations = 0;
          new MutationObserver(list => window.__mutations +=
              list.filter(m => m.target !== live && !ticking(m)).length)
            .observe(live, {subtree: true, childList: true, attributes: true, characterData: true});
        }"""
    )
    # Once a poll has been handled, whatever it brought, mark the page.
    wait_for(lambda: page.evaluate("window.__swaps.length") >= 1, 10, "a poll to be handled")
    baseline = page.evaluate(
        """async () => {
          // A morph swap makes #queue-depth's attributes match the server's, dropping this.
          document.getElementById('queue-depth').setAttribute('data-probe', 'kept');
          await new Promise(resolve => setTimeout(resolve));  // count our own change first
          return {mutations: window.__mutations, swaps: window.__swaps.length};
        }"""
    )
    first = len(polls)
    assert first >= 1
    wait_for_count(page, polls, first + 5, QUICK, "polls")

    unchanged = polls[first:first + 5]
    assert [r.status for r in unchanged] == [304] * 5
    for previous, response in zip(polls[first - 1:], unchanged):
        # The ptag extension sends the tag of the last answer, which is what earns the 304.
        assert response.request.headers.get("hx-ptag") == previous.headers.get("hx-ptag")
        assert response.request.sizes()["responseBodySize"] == 0
    swaps = page.evaluate("window.__swaps")[baseline["swaps"]:]
    assert swaps and all(s == {"status": 304, "swap": "none"} for s in swaps), swaps
    assert page.evaluate("window.__mutations") == baseline["mutations"], "a 304 poll changed the DOM"
    expect(page.locator("#queue-depth")).to_have_attribute("data-probe", "kept")

    # The control: a real change is swapped in, and the morph drops the probe.
    seen = len(polls)
    tab.server.submit("pretend", seconds=0)
    expect(page.locator("#queue-depth")).not_to_have_attribute("data-probe", "kept", timeout=QUICK)
    assert page.evaluate("window.__mutations") > baseline["mutations"]
    changed = next(r for r in polls[seen:] if r.status == 200)

    sizes_304 = unchanged[-1].request.sizes()
    sizes_200 = changed.request.sizes()
    bytes_304 = sizes_304["responseHeadersSize"] + sizes_304["responseBodySize"]
    bytes_200 = sizes_200["responseHeadersSize"] + sizes_200["responseBodySize"]
    record_property("unchanged_poll_response_bytes", bytes_304)
    record_property("changed_poll_response_bytes", bytes_200)
    print(
        f"\npoll response bytes (headers + body): unchanged 304 = {bytes_304} "
        f"({sizes_304['responseHeadersSize']} + {sizes_304['responseBodySize']}), "
        f"changed 200 = {bytes_200} "
        f"({sizes_200['responseHeadersSize']} + {sizes_200['responseBodySize']}); "
        f"request headers {sizes_304['requestHeadersSize']} bytes each"
    )
    assert bytes_304 < bytes_200


@pytest.mark.browser
def test_the_first_poll_sends_the_pages_tag_even_if_the_extension_loads_slowly(tab: Tab):
    """htmx must not start polling before the ptag extension is there to send the tag."""
    page = tab.page

    def slow_extension(route):
        time.sleep(0.5)  # a slow network for this one script, not a wait for the app
        route.continue_()

    page.route("**/hx-ptag.min.js", slow_extension)
    polls = live_responses(page)
    page.goto("/")
    tag = page.locator("#live").get_attribute("hx-ptag")
    wait_for_count(page, polls, 1, QUICK, "polls")
    assert polls[0].request.headers.get("hx-ptag") == tag, "the first poll went without HX-PTag"
    assert polls[0].status == 304  # the queue is idle: nothing changed since the page


# -- d. a failure shows in the history ----------------------------------------------------


@pytest.mark.browser
def test_a_failing_tasks_error_appears_in_the_history_without_reload(tab: Tab):
    page = tab.page
    page.goto("/")
    mark_loaded(page)
    failed_before = count(page, "#count-failed")
    response = page.request.post(
        "/api/tasks", data={"kind": "flaky", "count": 1, "params": {"seconds": 0, "fail_rate": 1}}
    )
    assert response.status == 202, response.text()
    (task_id,) = response.json()["ids"]

    row = page.locator(f"#history #task-{task_id}")
    expect(row).to_have_class(re.compile(r"\bstate-failed\b"), timeout=QUICK)
    expect(row.locator(".badge")).to_have_text("failed")
    expect(row.locator("td.error")).to_contain_text(
        "RuntimeError: flaky task gave up (it fails 100% of the time)"
    )
    expect(page.locator("#count-failed")).to_have_text(str(failed_before + 1))
    assert still_same_page(page)


# -- e. without JavaScript ------------------------------------------------------------------


@pytest.mark.browser
def test_without_javascript_the_form_posts_and_redirects_back(chromium_browser, dashboard_server):
    dashboard_server.wait_idle()
    with open_tab(chromium_browser, dashboard_server, java_script_enabled=False) as tab:
        page = tab.page
        seen: list[tuple[str, str, int]] = []
        page.on("response", lambda r: seen.append((r.request.method, urlsplit(r.url).path, r.status)))
        page.goto("/")
        # (Not checked: the <noscript> hint. Playwright turns scripts off through
        # DevTools, which Chromium's parser ignores, so it keeps <noscript> as text.)
        cells = ("#queue-depth", "#count-running", "#count-done", "#count-failed", "#count-cancelled")
        before = sum(count(page, c) for c in cells)
        submitted = dashboard_server.stats()["submitted"]

        with page.expect_navigation():
            add_button(page).click()

        # The plain form post, its 303, and the page again.
        posted = seen.index(("POST", "/tasks", 303))
        assert ("GET", "/", 200) in seen[posted + 1:], seen
        assert urlsplit(page.url).path == "/"
        assert sum(count(page, c) for c in cells) == before + 1  # the new task, wherever it is now
        assert dashboard_server.stats()["submitted"] == submitted + 1
        assert not any(path == "/live" for _, path, _ in seen), "polled without JavaScript"


# -- f. a validation error stays in the form ---------------------------------------------


@pytest.mark.browser
def test_a_validation_error_shows_in_the_form_and_leaves_the_live_region(tab: Tab):
    page = tab.page
    tab.expect_http_error(400, "/tasks")
    page.goto("/")
    mark_loaded(page)
    depth = page.locator("#queue-depth")
    depth_before = depth.inner_text()
    submitted = tab.server.stats()["submitted"]

    seconds = page.get_by_label("Seconds")
    # The browser would refuse 9999 itself (max="600"); drop its check, as an old
    # browser or a hand-made request would, so the server's check is the one shown.
    seconds.evaluate("input => input.removeAttribute('max')")
    seconds.fill("9999")
    with page.expect_response(lambda r: urlsplit(r.url).path == "/tasks") as posted:
        add_button(page).click()
    assert posted.value.status == 400

    errors = page.locator("#form-errors")
    expect(errors).to_contain_text("seconds must be a number from 0 to 600")
    expect(depth).to_be_visible()
    expect(depth).to_have_text(depth_before)
    for region in ("#counts", "#workers", "#history"):
        expect(page.locator(f"#live > .regions > {region}")).to_have_count(1)
    expect(page.locator("#live p.error")).to_have_count(0)
    assert tab.server.stats()["submitted"] == submitted, "a refused form queued work"

    # A good submit clears the message (out of band) and adds the work.
    done = count(page, "#count-done")
    seconds.fill("0")
    add_button(page).click()
    expect(errors).to_be_empty()
    expect(page.locator("#count-done")).to_have_text(str(done + 1), timeout=QUICK)
    assert still_same_page(page)


# -- g. a clean session -----------------------------------------------------------------


@pytest.mark.browser
def test_a_normal_session_has_no_console_errors_or_failed_requests(tab: Tab):
    page = tab.page
    polls = live_responses(page)
    page.goto("/")
    done = count(page, "#count-done")
    add_button(page).click()
    expect(page.locator("#count-done")).to_have_text(str(done + 1), timeout=DRAIN)
    seen = len(polls)
    wait_for_count(page, polls, seen + 3, QUICK, "polls after the work")
    assert any(r.status == 304 for r in polls[seen:]), "no 304 once the queue is idle again"

    icon = page.locator("link[rel=icon]").get_attribute("href")
    response = page.request.get(icon)
    assert response.status == 200 and response.headers["content-type"].startswith("image/svg+xml")
    assert tab.problems() == []  # the fixture checks this again at the end, for every test


# -- h. screenshots ------------------------------------------------------------------------


@pytest.mark.browser
def test_screenshots_busy_and_idle(tab: Tab):
    page = tab.page
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto("/")
    add_button(page, "Add work ×10").click()
    progress = page.locator("#workers progress").first
    expect(progress).to_be_visible(timeout=QUICK)
    expect(progress).to_have_attribute("value", re.compile(r"^[1-9]"), timeout=QUICK)
    busy = tab.screenshot("dashboard-busy.png")

    expect(page.locator("#queue-depth")).to_have_text("0", timeout=DRAIN)
    expect(page.locator("#count-running")).to_have_text("0", timeout=QUICK)
    expect(page.locator("#workers progress")).to_have_count(0)
    idle = tab.screenshot("dashboard-idle.png")
    for path in (busy, idle):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- i. pause holds the depth, resume burns it down ---------------------------------------


@pytest.mark.browser
def test_pause_holds_the_depth_and_resume_burns_it_down(fresh_tab: Tab):
    page, server = fresh_tab.page, fresh_tab.server
    polls = live_responses(page)
    page.goto("/")
    mark_loaded(page)
    page.get_by_role("button", name="Pause", exact=True).click()
    expect(page.locator("#paused-flag")).to_contain_text("Paused")
    expect(page.get_by_role("button", name="Resume", exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Pause", exact=True)).to_have_count(0)
    assert server.stats()["paused"] is True

    page.get_by_label("Seconds").fill("0.1")
    add_button(page, "Add work ×10").click()
    depth = page.locator("#queue-depth")
    expect(depth).to_have_text("10")
    expect(page.locator("#eta")).to_have_text("paused")

    # Held: over five poll answers, nothing is taken and the page keeps showing 10.
    def held() -> None:
        stats = server.stats()
        assert (stats["queued"], stats["running"], stats["done"]) == (10, 0, 0), stats
        assert depth.inner_text() == "10"

    checks = keep_checking_for(page, polls, 5, held, "polls while paused")
    assert checks >= 5

    page.get_by_role("button", name="Resume", exact=True).click()
    expect(page.locator("#paused-flag")).to_have_count(0)
    expect(page.get_by_role("button", name="Pause", exact=True)).to_be_visible()
    expect(depth).to_have_text("0", timeout=DRAIN)
    expect(page.locator("#count-done")).to_have_text("10", timeout=QUICK)
    assert server.stats()["paused"] is False
    assert still_same_page(page)


@pytest.mark.browser
def test_without_javascript_pause_and_resume_post_and_redirect_back(chromium_browser, fresh_server):
    with open_tab(chromium_browser, fresh_server, java_script_enabled=False) as tab:
        page = tab.page
        seen: list[tuple[str, str, int]] = []
        page.on("response",
                lambda r: seen.append((r.request.method, urlsplit(r.url).path, r.status)))
        page.goto("/")
        expect(page.locator("#paused-flag")).to_have_count(0)

        with page.expect_navigation():
            page.get_by_role("button", name="Pause", exact=True).click()
        posted = seen.index(("POST", "/pause", 303))
        assert ("GET", "/", 200) in seen[posted + 1:], seen
        expect(page.locator("#paused-flag")).to_contain_text("Paused")
        expect(page.get_by_role("button", name="Resume", exact=True)).to_be_visible()
        assert fresh_server.stats()["paused"] is True

        with page.expect_navigation():
            page.get_by_role("button", name="Resume", exact=True).click()
        assert ("POST", "/resume", 303) in seen, seen
        expect(page.locator("#paused-flag")).to_have_count(0)
        expect(page.get_by_role("button", name="Pause", exact=True)).to_be_visible()
        assert fresh_server.stats()["paused"] is False
        assert not any(path == "/live" for _, path, _ in seen), "polled without JavaScript"


# -- j. more workers finish the same backlog sooner -----------------------------------------


def time_to_drain(server: Server, count: int, seconds: float) -> tuple[float, int]:
    """Queue ``count`` pretend tasks at once; how long until all are done, and the
    most that ever ran at the same time."""
    done = server.stats()["done"]
    peak = 0

    def drained() -> bool:
        nonlocal peak
        stats = server.stats()
        peak = max(peak, stats["running"])
        return stats["queued"] == 0 and stats["running"] == 0

    start = time.monotonic()
    server.submit("pretend", count, seconds=seconds)
    wait_for(drained, 60, f"{count} tasks to drain", interval=0.01)
    elapsed = time.monotonic() - start
    assert server.stats()["done"] == done + count
    return elapsed, peak


@pytest.mark.browser
def test_more_workers_finish_the_same_backlog_sooner_than_one(fresh_tab: Tab, record_property):
    page, server = fresh_tab.page, fresh_tab.server
    page.goto("/")
    target = page.locator("#workers-target")
    expect(target).to_have_text("1")
    backlog, seconds = 8, 0.6

    one, peak_one = time_to_drain(server, backlog, seconds)
    assert peak_one == 1

    more = page.get_by_role("button", name="More workers")
    for _ in range(3):
        more.click()
    expect(target).to_have_text("4")
    expect(page.locator("#workers li.worker")).to_have_count(4)
    assert server.stats()["workers_target"] == 4
    wait_for(
        lambda: sum(w["state"] != "stopped" for w in server.stats()["workers"]) == 4,
        10, "four live worker threads",
    )

    four, peak_four = time_to_drain(server, backlog, seconds)
    assert peak_four == 4, "four workers never ran four tasks at once"
    ratio = four / one
    record_property("drain_seconds_1_worker", round(one, 3))
    record_property("drain_seconds_4_workers", round(four, 3))
    record_property("drain_ratio_4_to_1", round(ratio, 3))
    print(f"\n{backlog} x {seconds}s tasks: 1 worker {one:.2f}s, 4 workers {four:.2f}s, "
          f"ratio {ratio:.2f}")
    assert ratio < 0.6, f"4 workers took {ratio:.2f} of the time one took"
    expect(page.locator("#count-done")).to_have_text(str(2 * backlog), timeout=QUICK)


@pytest.mark.browser
def test_keyboard_shortcuts_scale_pause_and_add(fresh_tab: Tab):
    page, server = fresh_tab.page, fresh_tab.server
    posts = requests_to(page, "/tasks")
    page.goto("/")
    target, flag = page.locator("#workers-target"), page.locator("#paused-flag")
    expect(target).to_have_text("1")
    blur(page)

    page.keyboard.type("+")
    expect(target).to_have_text("2")
    page.keyboard.type("+")
    expect(target).to_have_text("3")
    page.keyboard.type("-")
    expect(target).to_have_text("2")
    assert server.stats()["workers_target"] == 2

    page.keyboard.type("p")
    expect(flag).to_be_visible()
    assert server.stats()["paused"] is True
    page.keyboard.type("p")
    expect(flag).to_have_count(0)
    assert server.stats()["paused"] is False

    # Typed into a field, "a" is text, not a shortcut...
    page.get_by_label("Seconds").press("a")
    blur(page)
    # ...on the page it adds one task.
    submitted = server.stats()["submitted"]
    with page.expect_response(lambda r: urlsplit(r.url).path == "/tasks") as posted:
        page.keyboard.type("a")
    assert posted.value.status == 200
    assert len(posts) == 1, "the 'a' typed into the field added work too"
    assert server.stats()["submitted"] == submitted + 1
    expect(page.locator("#count-done")).to_have_text("1", timeout=QUICK)


# -- k. cancel --------------------------------------------------------------------------------


@pytest.mark.browser
def test_cancelling_a_queued_task_takes_it_out_of_up_next_and_it_never_runs(fresh_tab: Tab):
    page, server = fresh_tab.page, fresh_tab.server
    fresh_tab.expect_aborted_polls()  # we open the task's page from the dashboard
    page.goto("/")
    page.get_by_role("button", name="Pause", exact=True).click()
    expect(page.locator("#paused-flag")).to_be_visible()
    first, victim, last = server.submit("pretend", 3, seconds=0.1)
    upcoming = page.locator("#upcoming")
    for task_id in (first, victim, last):
        expect(upcoming.locator(f"#queued-{task_id}")).to_be_visible(timeout=QUICK)
    expect(page.locator("#count-cancelled")).to_have_text("0")

    upcoming.get_by_role("button", name=f"Cancel task {victim}").click()
    expect(upcoming.locator(f"#queued-{victim}")).to_have_count(0)
    expect(upcoming.locator(f"#queued-{first}")).to_be_visible()
    expect(upcoming.locator(f"#queued-{last}")).to_be_visible()
    expect(page.locator("#count-cancelled")).to_have_text("1")
    expect(page.locator("#queue-depth")).to_have_text("2")
    row = page.locator(f"#history #task-{victim}")
    expect(row).to_have_class(re.compile(r"\bstate-cancelled\b"))
    expect(row.locator(".badge")).to_have_text("cancelled")
    expect(row.locator("td.error")).to_have_text("cancelled before it started")

    page.get_by_role("button", name="Resume", exact=True).click()
    expect(page.locator("#queue-depth")).to_have_text("0", timeout=DRAIN)
    expect(page.locator("#count-done")).to_have_text("2", timeout=QUICK)
    for task_id in (first, last):
        expect(page.locator(f"#history #task-{task_id}")).to_have_class(
            re.compile(r"\bstate-done\b")
        )
    assert server.stats()["done"] == 2

    with page.expect_navigation():
        row.get_by_role("link", name=str(victim)).click()
    expect(page.locator("#task-state")).to_have_text("cancelled")
    expect(fact(page, "started")).to_have_text("—")
    expect(page.locator("#task-error")).to_have_text("cancelled before it started")
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    expect(page.get_by_role("button", name="Retry")).to_be_visible()
    status, info = server.request("GET", f"/api/tasks/{victim}")
    assert status == 200 and info["state"] == "cancelled" and info["started_at"] is None, info


@pytest.mark.browser
def test_cancelling_a_running_task_stops_it(tab: Tab):
    page, server = tab.page, tab.server
    page.goto("/")
    seconds = 60  # far longer than any wait below: it can only end early by being cancelled
    (task_id,) = server.submit("pretend", seconds=seconds)
    worker = page.locator("#workers li.worker", has=page.locator(f"a[href$='/tasks/{task_id}']"))
    expect(worker.locator("progress")).to_be_visible(timeout=QUICK)

    worker.get_by_role("button", name=f"Cancel task {task_id}").click()
    row = page.locator(f"#history #task-{task_id}")
    expect(row).to_have_class(re.compile(r"\bstate-cancelled\b"), timeout=QUICK)
    expect(row.locator("td.error")).to_have_text("cancelled while running")
    expect(page.locator("#count-running")).to_have_text("0")
    status, info = server.request("GET", f"/api/tasks/{task_id}")
    assert status == 200 and info["state"] == "cancelled", info
    assert info["started_at"] is not None and info["progress"] < 1, info
    assert info["finished_at"] - info["started_at"] < seconds / 2, "it ran on after the cancel"


@pytest.mark.browser
def test_cancel_on_a_running_tasks_page_follows_it_to_cancelled(tab: Tab):
    page, server = tab.page, tab.server
    (task_id,) = server.submit("pretend", seconds=60)
    wait_for(
        lambda: server.request("GET", f"/api/tasks/{task_id}")[1]["state"] == "running",
        10, "the task to start",
    )
    page.goto(f"/tasks/{task_id}")
    mark_loaded(page)
    expect(page.locator("#task-state")).to_have_text("running")
    page.get_by_role("button", name="Cancel", exact=True).click()
    # The answer shows the request; the page's polls then bring the end.
    expect(page.locator("#task-state")).to_have_text("cancelled", timeout=QUICK)
    expect(page.locator("#task-error")).to_have_text("cancelled while running")
    expect(page.get_by_role("button", name="Cancel", exact=True)).to_have_count(0)
    expect(page.get_by_role("button", name="Retry", exact=True)).to_be_visible()
    expect(page.locator("#task-detail")).not_to_have_attribute("data-poll", re.compile(".*"))
    assert still_same_page(page) and urlsplit(page.url).path == f"/tasks/{task_id}"


# -- l. retry -----------------------------------------------------------------------------------


@pytest.mark.browser
def test_retrying_a_failed_task_links_the_two(tab: Tab):
    page, server = tab.page, tab.server
    tab.expect_aborted_polls()
    page.goto("/")
    (old,) = server.submit("flaky", seconds=0, fail_rate=1)
    row = page.locator(f"#history #task-{old}")
    expect(row).to_have_class(re.compile(r"\bstate-failed\b"), timeout=QUICK)
    submitted = server.stats()["submitted"]

    row.get_by_role("button", name=f"Retry task {old}").click()
    link = row.get_by_role("link", name=re.compile(r"^retried as #\d+$"))
    expect(link).to_be_visible()
    new = int(link.inner_text().rsplit("#", 1)[1])
    assert new > old
    assert server.stats()["submitted"] == submitted + 1
    expect(row.get_by_role("button", name=f"Retry task {old}")).to_have_count(0)
    # The retry has the same parameters, so it fails too, and shows in the history.
    expect(page.locator(f"#history #task-{new}")).to_have_class(
        re.compile(r"\bstate-failed\b"), timeout=QUICK
    )

    with page.expect_navigation():
        link.click()
    assert urlsplit(page.url).path == f"/tasks/{new}"
    expect(page.locator("#task-id")).to_have_text(f"#{new}")
    expect(fact(page, "retry of")).to_have_text(f"#{old}")
    expect(fact(page, "params")).to_contain_text("fail_rate=1")
    with page.expect_navigation():
        fact(page, "retry of").get_by_role("link").click()
    expect(page.locator("#task-id")).to_have_text(f"#{old}")
    expect(fact(page, "retried as")).to_have_text(f"#{new}")


# -- m. a task's own page -------------------------------------------------------------------------


@pytest.mark.browser
def test_a_failed_tasks_page_shows_its_error_and_traceback(tab: Tab):
    page, server = tab.page, tab.server
    tab.expect_aborted_polls()
    page.goto("/")
    (task_id,) = server.submit("flaky", seconds=0, fail_rate=1)
    row = page.locator(f"#history #task-{task_id}")
    expect(row).to_have_class(re.compile(r"\bstate-failed\b"), timeout=QUICK)

    with page.expect_navigation():
        row.get_by_role("link", name=str(task_id), exact=True).click()
    assert urlsplit(page.url).path == f"/tasks/{task_id}"
    expect(page.locator("#task-state")).to_have_text("failed")
    message = "RuntimeError: flaky task gave up (it fails 100% of the time)"
    expect(page.locator("#task-error")).to_have_text(message)
    traceback = page.locator("pre.traceback")
    expect(traceback).to_be_visible()
    expect(traceback).to_contain_text("Traceback (most recent call last)")
    expect(traceback).to_contain_text(message)
    expect(page.locator("#task-detail")).not_to_have_attribute("data-poll", re.compile(".*"))

    # Its Retry button answers with this task again, now linked to the retry.
    mark_loaded(page)
    page.get_by_role("button", name="Retry", exact=True).click()
    expect(fact(page, "retried as")).to_have_text(re.compile(r"^#\d+$"))
    expect(page.get_by_role("button", name="Retry", exact=True)).to_have_count(0)
    expect(page.locator("#task-error")).to_have_text(message)
    new = int(fact(page, "retried as").inner_text().lstrip("#"))
    assert new > task_id
    assert still_same_page(page) and urlsplit(page.url).path == f"/tasks/{task_id}"
    status, info = server.request("GET", f"/api/tasks/{new}")
    assert status == 200 and info["retry_of"] == task_id, info


@pytest.mark.browser
def test_a_running_tasks_page_follows_it_live_and_stops_polling_when_done(tab: Tab):
    page, server = tab.page, tab.server
    (task_id,) = server.submit("pretend", seconds=2.5)
    wait_for(
        lambda: server.request("GET", f"/api/tasks/{task_id}")[1]["state"] == "running",
        10, "the task to start",
    )
    task_polls = requests_to(page, f"/tasks/{task_id}/live")
    page.goto(f"/tasks/{task_id}")
    mark_loaded(page)
    log_htmx_requests(page)
    expect(page.locator("#task-state")).to_have_text("running")

    # Progress moves without a reload: note each value the bar shows.
    page.evaluate(
        """() => {
          window.__progress = new Set();
          const note = () => {
            const bar = document.querySelector('#task-detail progress');
            if (bar) window.__progress.add(bar.getAttribute('value'));
          };
          new MutationObserver(note).observe(document.body,
            {subtree: true, childList: true, attributes: true});
          note();
        }"""
    )
    wait_for(lambda: page.evaluate("window.__progress.size") >= 2, 10, "the progress to move")
    expect(page.locator("#task-state")).to_have_text("done", timeout=QUICK)
    expect(page.locator("#task-detail progress")).to_have_count(0)
    expect(fact(page, "finished")).not_to_have_text("—")
    assert still_same_page(page), "the page was reloaded"
    assert task_polls, "it never polled"
    expect(page.locator("#task-detail")).not_to_have_attribute("data-poll", re.compile(".*"))

    # Finished: no more polls, over five polls of a dashboard open alongside.
    seen, events = len(task_polls), len(htmx_requests(page))
    dashboard = tab.new_page()
    dashboard_polls = live_responses(dashboard)
    dashboard.goto("/")
    keep_checking_for(dashboard, dashboard_polls, 5, lambda: None, "dashboard polls")
    assert len(task_polls) == seen, "the finished task's page kept polling"
    assert htmx_requests(page, events) == []


# -- n. finding a task by its id -------------------------------------------------------------------


@pytest.mark.browser
def test_the_header_finds_a_task_by_id_and_refuses_a_bad_one(tab: Tab):
    page, server = tab.page, tab.server
    tab.expect_aborted_polls()
    tab.expect_http_error(400, "/tasks/lookup")
    tab.expect_http_error(404, "/tasks/987654321")
    (task_id,) = server.submit("pretend", seconds=0)
    page.goto("/")

    page.get_by_label("Task", exact=True).fill(str(task_id))
    with page.expect_navigation():
        page.get_by_role("button", name="Find").click()
    assert urlsplit(page.url).path == f"/tasks/{task_id}"
    expect(page.locator("#task-id")).to_have_text(f"#{task_id}")

    # The field is on every page; what cannot be an id gets a clear 400 page.
    page.get_by_label("Task", exact=True).fill("a b")
    with page.expect_response(lambda r: urlsplit(r.url).path == "/tasks/lookup") as found:
        page.get_by_role("button", name="Find").click()
    assert found.value.status == 400
    expect(page.locator("#message")).to_have_text(
        "id must be a task id like 42 (task ids are 1 to 64 letters, digits, '-' and '_'), "
        "got 'a b'")
    expect(page).to_have_title(re.compile(r"^400 "))

    # A good-looking id of no task: its page says so (404).
    page.get_by_label("Task", exact=True).fill("#987654321")
    with page.expect_response(lambda r: urlsplit(r.url).path == "/tasks/987654321") as missing:
        page.get_by_role("button", name="Find").click()
    assert missing.value.status == 404
    expect(page.locator("#message")).to_contain_text("no task '987654321'")


# -- o. a hidden tab does not poll -----------------------------------------------------------------


HIDE = """hidden => {
  if (hidden) {
    Object.defineProperty(document, 'hidden', {configurable: true, get: () => true});
    Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => 'hidden'});
  } else {
    delete document.hidden;  // back to Document.prototype's own getters
    delete document.visibilityState;
  }
  const mark = window.__htmx.length;
  document.dispatchEvent(new Event('visibilitychange'));
  return mark;
}"""


@pytest.mark.browser
def test_a_hidden_tab_stops_polling_and_polls_at_once_when_shown(tab: Tab):
    """Headless Chromium has no way to hide a page (minimising its window or opening
    a tab over it leaves it "visible", and DevTools has no visibility override), so
    the page is told it is hidden the way a browser would: the two properties and
    the event."""
    page = tab.page
    sent = requests_to(page, "/live")
    answers = live_responses(page)
    page.goto("/")
    log_htmx_requests(page)
    wait_for_count(page, answers, 1, QUICK, "polls")

    mark = page.evaluate(HIDE, True)
    assert page.evaluate("document.visibilityState") == "hidden"

    def ticks() -> list[dict]:
        return [r for r in htmx_requests(page, mark) if r["id"] == "live"]

    # A poll already on its way may still land; after the first dropped tick none is sent.
    wait_for(lambda: len(ticks()) >= 1, 10, "a poll tick while hidden")
    sent_while_hidden = len(sent)
    wait_for(lambda: len(ticks()) >= 5, 10, "five poll ticks while hidden")
    assert all(t["dropped"] and t["trigger"] == "every" for t in ticks()), ticks()
    assert len(sent) == sent_while_hidden, "a poll was sent from the hidden tab"

    shown = page.evaluate(HIDE, False)
    assert page.evaluate("document.visibilityState") == "visible"
    with page.expect_response(lambda r: urlsplit(r.url).path == "/live", timeout=QUICK):
        pass
    after = [r for r in htmx_requests(page, shown) if r["id"] == "live"]
    # Promptly: the first poll after showing is the one the event itself asked for.
    assert after and after[0] == {"id": "live", "path": "/live", "trigger": "poll-now",
                                  "dropped": False}, after
    assert len(sent) > sent_while_hidden


# -- p. presenter mode -----------------------------------------------------------------------------


@pytest.mark.browser
def test_presenter_mode_shows_big_numbers_and_the_controls_only(fresh_tab: Tab):
    page, server = fresh_tab.page, fresh_tab.server
    fresh_tab.expect_aborted_polls()
    page.set_viewport_size({"width": 1280, "height": 900})
    # (through a locator, which waits for the element: a poll may be swapping its region
    # in at that moment, and document.getElementById then found nothing)
    def depth_size() -> float:
        return page.locator("#queue-depth").evaluate(
            "el => parseFloat(getComputedStyle(el).fontSize)")
    page.goto("/")
    expect(page.locator("#history")).to_be_visible()
    expect(page.locator("#upcoming")).to_be_visible()
    normal = depth_size()

    with page.expect_navigation():
        page.get_by_role("link", name="Presenter mode").click()
    assert page.url.endswith("/?present=1")
    presented = depth_size()
    assert presented >= 2 * normal, (normal, presented)
    expect(page.locator("#history")).to_have_count(0)
    expect(page.locator("#upcoming")).to_have_count(0)
    for name in ("Pause", "More workers", "Add work"):
        expect(page.get_by_role("button", name=name, exact=True)).to_be_visible()
    expect(page.get_by_label("Seconds")).to_be_hidden()

    # The keys work here too, and what comes back is still the presenter's view.
    polls = requests_to(page, "/live")
    blur(page)
    page.keyboard.type("p")
    expect(page.locator("#paused-flag")).to_be_visible()
    page.keyboard.type("+")
    expect(page.locator("#workers-target")).to_have_text("2")
    page.keyboard.type("a")
    expect(page.locator("#queue-depth")).to_have_text("1")
    stats = server.stats()
    assert (stats["paused"], stats["workers_target"], stats["queued"]) == (True, 2, 1), stats
    expect(page.locator("#history")).to_have_count(0)
    expect(page.locator("#upcoming")).to_have_count(0)
    wait_for_count(page, polls, 1, QUICK, "polls")
    assert all(parse_qs(urlsplit(r.url).query).get("present") == ["1"] for r in polls), [
        r.url for r in polls]
    page.keyboard.type("p")
    expect(page.locator("#count-done")).to_have_text("1", timeout=QUICK)

    with page.expect_navigation():
        page.get_by_role("link", name="Exit presenter mode").click()
    assert urlsplit(page.url).path == "/" and not urlsplit(page.url).query
    expect(page.locator("#history")).to_be_visible()
    assert depth_size() == normal


# -- q. reset --------------------------------------------------------------------------------------


@pytest.mark.browser
def test_reset_asks_first_then_zeroes_the_counts_and_empties_the_history(fresh_tab: Tab):
    page, server = fresh_tab.page, fresh_tab.server
    server.request("POST", "/api/pause")
    (cancelled,) = server.submit("pretend", seconds=0)
    server.request("POST", f"/api/tasks/{cancelled}/cancel")
    server.request("POST", "/api/resume")
    server.submit("pretend", 2, seconds=0)
    server.submit("flaky", seconds=0, fail_rate=1)
    server.wait_idle()

    page.goto("/")
    counts = {"#count-done": "2", "#count-failed": "1", "#count-cancelled": "1"}
    for selector, value in counts.items():
        expect(page.locator(selector)).to_have_text(value)
    rows = page.locator("#history tbody tr")
    expect(rows).to_have_count(4)

    # Clear history forgets the rows and keeps the counts...
    page.get_by_role("button", name="Clear history", exact=True).click()
    expect(rows).to_have_count(0)
    for selector, value in counts.items():
        expect(page.locator(selector)).to_have_text(value)
    server.submit("pretend", seconds=0)
    expect(rows).to_have_count(1, timeout=QUICK)
    expect(page.locator("#count-done")).to_have_text("3")

    # ...Reset asks first: answered "no", nothing is sent, over two polls...
    dialogs: list[str] = []
    answer = {"accept": False}

    def answer_dialog(dialog) -> None:
        dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.accept() if answer["accept"] else dialog.dismiss()

    page.on("dialog", answer_dialog)
    resets = requests_to(page, "/reset")
    polls = live_responses(page)
    reset = page.get_by_role("button", name="Reset", exact=True)
    reset.click()
    keep_checking_for(page, polls, 2, lambda: None, "polls after a dismissed reset")
    assert len(dialogs) == 1 and resets == []
    expect(rows).to_have_count(1)

    # ...answered "yes", it zeroes the counts and empties the history.
    answer["accept"] = True
    with page.expect_response(lambda r: urlsplit(r.url).path == "/reset") as posted:
        reset.click()
    assert posted.value.status == 200
    question = "Reset clears the counters and the history for a new run. Go on?"
    assert dialogs == [f"confirm: {question}"] * 2
    for selector in counts:
        expect(page.locator(selector)).to_have_text("0")
    expect(rows).to_have_count(0)
    expect(page.locator("#history .empty")).to_have_text("Nothing has finished yet.")
    stats = server.stats()
    assert (stats["done"], stats["failed"], stats["cancelled"], stats["recent"]) == (0, 0, 0, [])


# -- r. screenshots of a busy dashboard, normal and presenter --------------------------------------

SCREENSHOT = ROOT / "docs" / "screenshot.png"
#: Set to 1 to refresh the screenshot (docs/screenshot.png, in the README and the docs) from this run.
UPDATE_SCREENSHOT_ENV = "UPDATE_SCREENSHOT"


@pytest.mark.browser
def test_screenshots_of_the_normal_and_presenter_views_while_tasks_run(
    chromium_browser, start_server
):
    server = start_server(FLASK_QUEUE_WORKERS="3")
    # What a demo looks like a little way in: some done, one failed, three running, more waiting.
    server.submit("pretend", 5, seconds=0.2)
    server.submit("flaky", seconds=0.3, fail_rate=1)
    wait_for(lambda: (s := server.stats())["done"] == 5 and s["failed"] == 1, 20, "the warm-up")
    running = [server.submit("pretend", seconds=s)[0] for s in (6, 8, 10)]
    waiting = server.submit("pretend", 4, seconds=5)

    def progress_shows() -> bool:
        tasks = [w["task"] for w in server.stats()["workers"] if w["task"]]
        return len(tasks) == 3 and all(t["progress"] >= 0.2 for t in tasks)

    try:
        wait_for(progress_shows, 20, "three tasks to be a fifth done")
        with open_tab(chromium_browser, server, viewport={"width": 1200, "height": 800},
                      color_scheme="light") as tab:
            normal = tab.page
            presenter = tab.new_page()
            for page, path in ((normal, "/"), (presenter, "/?present=1")):
                page.goto(path)
                bars = page.locator("#workers progress")
                expect(bars).to_have_count(3, timeout=QUICK)
                for i in range(3):
                    expect(bars.nth(i)).to_have_attribute(
                        "value", re.compile(r"^([1-9]\d)$"), timeout=QUICK
                    )
                expect(page.locator("#queue-depth")).to_have_text("4")
            expect(normal.locator("#history td.error")).to_contain_text(["RuntimeError: flaky"])
            expect(normal.locator("#upcoming li")).to_have_count(4)

            shots = {
                "dashboard-normal.png": tab.screenshot("dashboard-normal.png", normal),
                "dashboard-presenter.png": tab.screenshot("dashboard-presenter.png", presenter),
            }
    finally:
        server.request("POST", "/api/pause")
        for task_id in running + waiting:
            server.request("POST", f"/api/tasks/{task_id}/cancel")
        server.wait_idle()

    for path in shots.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = shots["dashboard-normal.png"].read_bytes()
    size = len(image)
    width = int.from_bytes(image[16:20], "big")
    assert width == 1200, width
    assert size < 250_000, f"the screenshot would be {size // 1000} KB"
    if os.environ.get(UPDATE_SCREENSHOT_ENV) == "1" or not SCREENSHOT.exists():
        SCREENSHOT.parent.mkdir(exist_ok=True)
        SCREENSHOT.write_bytes(image)


# -- the availability policy (no browser needed) -----------------------------------------------


def test_policy_without_chromium_fails_under_ci():
    with pytest.raises(pytest.fail.Exception) as failed:
        browser_unavailable("it is missing", env={"CI": "true"})
    assert "CI=true" in str(failed.value) and INSTALL_HINT in str(failed.value)


@pytest.mark.parametrize("env", [{}, {"CI": "false"}, {"CI": ""}])
def test_policy_without_chromium_skips_elsewhere_saying_how_to_get_it(env):
    with pytest.raises(pytest.skip.Exception) as skipped:
        browser_unavailable("it is missing", env=env)
    assert "apt-get install chromium" in str(skipped.value)


def test_find_chromium_honours_the_override_and_path(tmp_path):
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    nowhere = str(tmp_path / "missing")
    assert find_chromium({"PATH": str(tmp_path)}, default=nowhere) == str(fake)
    assert find_chromium({"PATH": ""}, default=nowhere) is None
    assert find_chromium({CHROMIUM_ENV: str(fake), "PATH": ""}, default=nowhere) == str(fake)
    assert find_chromium({CHROMIUM_ENV: "", "PATH": str(tmp_path)}, default=str(fake)) is None


@pytest.mark.parametrize("ci", [True, False], ids=["CI=true fails", "no CI skips"])
def test_policy_end_to_end_with_chromium_hidden(ci, tmp_path):
    """A real pytest run with Chromium hidden: CI fails it, elsewhere it is skipped, loudly."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env[CHROMIUM_ENV] = str(tmp_path / "no-chromium")
    if ci:
        env["CI"] = "true"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-ra",
         f"{Path(__file__).relative_to(ROOT)}::"
         "test_a_failing_tasks_error_appears_in_the_history_without_reload"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout + result.stderr
    assert "apt-get install chromium" in out, out
    if ci:
        assert result.returncode == 1, out
        assert "1 error" in out and "CI=true and browser tests need Chromium" in out, out
    else:
        assert result.returncode == 0, out
        assert "1 skipped" in out and "WARNING: SKIPPING the browser tests" in out, out
