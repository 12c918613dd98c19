"""The page never lies, in real Chromium: it says when it lost the server and
recovers by itself (showing the new process), a task page notices that the
server it talks to now serves another queue, an error answering a click goes
once the queue has moved on, a poll sent before a click never undoes it, and
the keys do what the footer says, once per press, on the pages that list them.

Each test stops or slows its own server (``start_server``, ``restart``), never
the shared one.
"""

from __future__ import annotations

import re
import socket
import urllib.request
from typing import Callable
from urllib.parse import urlsplit

import pytest

from browser import Server, expect, open_tab, stop
from support import wait_for

QUICK = 10_000  # ms: far above what a busy machine needs for one step

pytestmark = pytest.mark.browser


# -- helpers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def restartable(start_server) -> Callable[..., Server]:
    """``start(**env)``: a quick server on this test's own port; call again after
    ``stop(server)`` for the next one on the same address, as after a restart."""
    port = free_port()
    return lambda **env: start_server(port=port, **env)


def banner(page):
    return page.locator("#connection")


def count_failed_polls(page) -> None:
    """From now on, count the polls that fail (window.__failed), and note how
    many had failed when the lost-server banner first showed (window.__atBanner)."""
    page.evaluate(
        """() => {
          window.__failed = 0;
          window.__atBanner = null;
          document.addEventListener('htmx:error', e => {
            if (e.target.hasAttribute?.('data-poll')) window.__failed += 1;
          });
          const banner = document.getElementById('connection');
          if (!banner) return;  // (a page without one says nothing)
          new MutationObserver(() => {
            if (!banner.hidden && window.__atBanner === null) window.__atBanner = window.__failed;
          }).observe(banner, {attributes: true});
        }"""
    )


def pid_of(server: Server) -> int:
    return server.stats()["pid"]


# -- the server goes away and comes back --------------------------------------------------------


def test_a_stopped_server_is_said_within_two_polls_and_its_successor_is_shown(
    chromium_browser, restartable
):
    first = restartable()
    with open_tab(chromium_browser, first) as tab:
        page = tab.page
        tab.expect_lost_server()
        page.goto("/")
        old_pid = pid_of(first)
        expect(page.locator("#pid")).to_have_text(str(old_pid))
        meta = page.locator("header .meta")
        expect(meta).to_contain_text("updates every")
        expect(banner(page)).to_be_hidden()
        count_failed_polls(page)

        stop(first)
        expect(banner(page)).to_be_visible(timeout=QUICK)
        expect(banner(page)).to_contain_text("Lost the server")
        assert page.evaluate("window.__atBanner") <= 2, "more than two polls failed unsaid"
        expect(meta).not_to_contain_text("updates every")
        expect(meta).to_contain_text("not updating")
        # A click says it went nowhere, instead of nothing visible.
        page.get_by_role("button", name="Add work", exact=True).click()
        expect(page.locator("#form-errors")).to_contain_text("did not reach the server")
        tab.screenshot("lost-server.png")

        second = restartable()
        assert pid_of(second) != old_pid
        # It finds the new process by itself: header, title and regions.
        expect(page.locator("#pid")).to_have_text(str(pid_of(second)), timeout=QUICK)
        expect(page).to_have_title(re.compile(f"pid {pid_of(second)}"))
        expect(banner(page)).to_be_hidden()
        expect(meta).to_contain_text("updates every")
        expect(page.locator("#workers-title")).to_contain_text(str(pid_of(second)))
        expect(page.locator("#form-errors")).to_be_empty()


def test_after_a_graceful_stop_the_page_says_so_and_recovers_on_a_shared_queue(
    chromium_browser, restartable, tmp_path
):
    """A SQLite queue is the same queue after a restart, with the same tags: the
    page must not keep "Shutting down" (true once) nor the old process, and must
    not name a process in its header at all (the file outlives them)."""
    env = {"FLASK_QUEUE_URL": f"sqlite:///{tmp_path / 'queue.db'}", "FLASK_QUEUE_SHUTDOWN_TIMEOUT": "30"}
    first = restartable(**env)
    first.submit("pretend", seconds=2)
    wait_for(lambda: first.stats()["running"] == 1, 10, "the task to start")
    with open_tab(chromium_browser, first) as tab:
        page = tab.page
        tab.expect_lost_server()
        page.goto("/")
        mark = page.evaluate("window.__marker = 1")
        del mark
        expect(page.locator("#pid")).to_have_count(0)
        expect(page).to_have_title("Work queue")
        expect(page.locator("#workers-title")).to_contain_text(str(pid_of(first)))
        count_failed_polls(page)

        stop(first)  # waits for the running task: the page may see "Shutting down"
        expect(banner(page)).to_be_visible(timeout=QUICK)
        expect(page.locator(".flag.closed")).to_be_hidden()
        assert page.evaluate("window.__atBanner") <= 2

        second = restartable(**env)
        expect(banner(page)).to_be_hidden(timeout=QUICK)
        expect(page.locator("#workers-title")).to_contain_text(str(pid_of(second)))
        expect(page.locator(".flag.closed")).to_have_count(0)
        expect(page.locator("#count-done")).to_have_text("1")
        assert page.evaluate("window.__marker === 1"), "the page reloaded: same queue, no need"


def test_network_gone_is_said_and_the_page_recovers_when_it_is_back(chromium_browser, start_server):
    server = start_server()
    with open_tab(chromium_browser, server) as tab:
        page = tab.page
        tab.expect_lost_server()
        page.goto("/")
        page.evaluate("window.__marker = 1")
        count_failed_polls(page)
        page.context.set_offline(True)
        expect(banner(page)).to_be_visible(timeout=QUICK)
        assert page.evaluate("window.__atBanner") <= 2
        expect(page.locator("body")).to_have_class(re.compile(r"\blost\b"))

        server.submit("pretend", seconds=0)  # what the page should see once back
        page.context.set_offline(False)
        expect(banner(page)).to_be_hidden(timeout=QUICK)
        expect(page.locator("#count-done")).to_have_text("1", timeout=QUICK)
        expect(page.locator("#freshness")).to_have_text(re.compile(r"updates every"))
        assert page.evaluate("window.__marker === 1"), "the same server: no reload needed"


def test_a_task_page_notices_the_restarted_server_serves_another_queue(
    chromium_browser, restartable
):
    """Old ids restarted at 1, so after a restart an open task page showed
    another task under the same number. Now it says the task is gone, and stops."""
    first = restartable()
    (task_id,) = first.submit("pretend", seconds=20)
    wait_for(lambda: first.stats()["running"] == 1, 10, "the task to start")
    with open_tab(chromium_browser, first) as tab:
        page = tab.page
        tab.expect_lost_server()
        tab.expect_http_error(410, f"/tasks/{task_id}/live")
        page.goto(f"/tasks/{task_id}")
        expect(page.locator("#task-state")).to_have_text("running")
        polls = []
        page.on("request", lambda r: urlsplit(r.url).path.endswith("/live") and polls.append(r))

        stop(first)  # cancels the task after QUEUE_SHUTDOWN_TIMEOUT
        expect(banner(page)).to_be_visible(timeout=QUICK)
        second = restartable()
        # The new queue may well have a task of that number: it is another one.
        second.submit("flaky", seconds=20, fail_rate=0)
        expect(page.locator("#task-gone")).to_be_visible(timeout=QUICK)
        expect(page.locator("#task-gone")).to_contain_text("another queue")
        expect(page.locator("#task-state")).to_have_text("gone")
        expect(banner(page)).to_be_hidden()
        # It polls no more: what replaced the region has no trigger.
        expect(page.locator("#task-detail")).not_to_have_attribute("hx-trigger", re.compile(".*"))
        expect(page.locator("[data-poll]")).to_have_count(0)
        expect(page.get_by_text("flaky")).to_have_count(0)


def test_a_task_page_whose_task_is_forgotten_says_so_instead_of_polling_404s(
    chromium_browser, start_server
):
    server = start_server()
    server.request("POST", "/api/pause")
    (task_id,) = server.submit("pretend", seconds=0)
    with open_tab(chromium_browser, server) as tab:
        page = tab.page
        tab.expect_lost_server()
        tab.expect_http_error(404, f"/tasks/{task_id}/live")
        page.goto(f"/tasks/{task_id}")
        expect(page.locator("#task-state")).to_have_text("queued")
        # While the page cannot see it, the task is cancelled and forgotten.
        page.context.set_offline(True)
        assert server.request("POST", f"/api/tasks/{task_id}/cancel")[0] == 200
        with urllib.request.urlopen(urllib.request.Request(
                server.url + "/history/clear", data=b"", method="POST"), timeout=10) as cleared:
            assert cleared.status in (200, 303)
        assert server.request("GET", f"/api/tasks/{task_id}")[0] == 404
        page.context.set_offline(False)

        expect(page.locator("#task-gone")).to_be_visible(timeout=QUICK)
        expect(page.locator("#task-gone")).to_contain_text("no longer knows it")
        expect(page.locator("[data-poll]")).to_have_count(0)


# -- errors that clear, and clicks that a late poll cannot undo -------------------------------


def test_an_error_goes_once_the_queue_has_moved_on(chromium_browser, start_server):
    """"queue is full: 5 of 5 queued" stayed beside a big "0 queued" until the next
    successful click. It answers a click; it goes once the queue has moved on."""
    server = start_server(FLASK_QUEUE_MAX_QUEUED="5", FLASK_QUEUE_MAX_BATCH="5")
    server.request("POST", "/api/pause")
    server.submit("pretend", count=5, seconds=0)
    with open_tab(chromium_browser, server) as tab:
        page = tab.page
        tab.expect_http_error(503, "/tasks")
        page.goto("/")
        expect(page.locator("#queue-depth")).to_have_text("5")
        page.get_by_role("button", name="Add work", exact=True).click()
        errors = page.locator("#form-errors")
        expect(errors).to_contain_text("queue is full")

        # While nothing moves, the error is still true, and stays.
        server.request("POST", "/api/resume")
        expect(page.locator("#queue-depth")).to_have_text("0", timeout=QUICK)
        expect(errors).to_be_empty(timeout=QUICK)


SLOW_POLLS = """
// Polls (GET …/live) answered late, as on a slow network: the answer is held
// window.__slow ms, and an abort still ends it.
(() => {
  const real = window.fetch.bind(window);
  window.__slow = 0; window.__pollsSent = 0; window.__pollsDone = 0;
  window.fetch = async (url, init = {}) => {
    const poll = (init.method || 'GET') === 'GET' && new URL(url, location.href).pathname.endsWith('/live');
    if (!poll || !window.__slow) return real(url, init);
    window.__pollsSent += 1;
    try {
      // Read it all now (a body left unread is cut off by the browser), hand it over late.
      const response = await real(url, init);
      const read = await response.arrayBuffer();
      const body = [204, 304].includes(response.status) ? null : read;
      await new Promise((resolve, reject) => {
        const timer = setTimeout(resolve, window.__slow);
        init.signal?.addEventListener('abort', () => { clearTimeout(timer);
          reject(new DOMException('aborted', 'AbortError')); });
      });
      return new Response(body, {status: response.status, statusText: response.statusText,
                                 headers: response.headers});
    } finally { window.__pollsDone += 1; }
  };
})();
"""


def test_a_poll_sent_before_a_click_does_not_undo_it(chromium_browser, start_server):
    """With slow polls the depth went 12 → 22 → 12 → 22: the click's answer, then
    the older answer of a poll sent before it, then the next poll."""
    server = start_server()
    server.request("POST", "/api/pause")  # only clicks change the depth
    with open_tab(chromium_browser, server) as tab:
        page = tab.page
        page.add_init_script(SLOW_POLLS)
        page.goto("/")
        page.evaluate(
            """() => {
              window.__depths = [];
              const note = () => {
                const d = document.getElementById('queue-depth')?.textContent.trim();
                if (d !== undefined && d !== window.__depths.at(-1)) window.__depths.push(d);
              };
              new MutationObserver(note).observe(document.getElementById('live'),
                {subtree: true, childList: true, characterData: true});
              note();
              window.__slow = 1500;
            }"""
        )
        button = page.get_by_role("button", name="Add work", exact=True)
        for expected in ("1", "2", "3"):
            # A poll is on its way when the click goes.
            sent = page.evaluate("window.__pollsSent")
            page.wait_for_function("n => window.__pollsSent > n", arg=sent)
            done = page.evaluate("window.__pollsDone")
            button.click()
            expect(page.locator("#queue-depth")).to_have_text(expected)
            # The late poll has come back (and gone nowhere).
            page.wait_for_function("n => window.__pollsDone > n", arg=done, timeout=QUICK)
        depths = page.evaluate("window.__depths")
        assert depths == ["0", "1", "2", "3"], f"a late poll undid a click: {depths}"
        assert server.stats()["queued"] == 3


# -- keys -------------------------------------------------------------------------------------


def test_holding_a_adds_one_task_not_one_per_repeat(chromium_browser, start_server):
    server = start_server()
    server.request("POST", "/api/pause")
    with open_tab(chromium_browser, server) as tab:
        page = tab.page
        posts = []
        page.on("request", lambda r: r.method == "POST" and posts.append(r.url))
        page.goto("/")
        page.evaluate("document.activeElement?.blur()")
        page.evaluate("""() => { window.__repeats = 0;
            document.addEventListener('keydown', e => { if (e.repeat) window.__repeats += 1; }); }""")
        for _ in range(6):  # held: the first press, then the key repeats
            page.keyboard.down("a")
        page.keyboard.up("a")
        assert page.evaluate("window.__repeats") == 5, "the browser did not repeat the key"
        expect(page.locator("#queue-depth")).to_have_text("1")
        server_queued = wait_for(lambda: server.stats()["queued"] or None, 5, "the task")
        assert server_queued == 1 and len(posts) == 1, posts


def test_the_keys_footer_shows_only_where_the_keys_work(chromium_browser, start_server):
    server = start_server()
    server.request("POST", "/api/pause")
    (task_id,) = server.submit("pretend", seconds=0)
    with open_tab(chromium_browser, server, java_script_enabled=False) as tab:
        tab.page.goto("/")
        expect(tab.page.locator("#queue-depth")).to_have_text("1")
        expect(tab.page.locator("footer.keys")).to_be_hidden()
    with open_tab(chromium_browser, server) as tab:
        tab.page.goto("/")
        expect(tab.page.locator("footer.keys")).to_be_visible()
        tab.page.goto(f"/tasks/{task_id}")
        expect(tab.page.locator("footer.keys")).to_be_visible()


def test_keys_on_a_tasks_page_cancel_and_retry_it(chromium_browser, start_server):
    """The docs promised the keys on every page; a task's page had none."""
    server = start_server()
    server.request("POST", "/api/pause")
    (task_id,) = server.submit("pretend", seconds=0)
    with open_tab(chromium_browser, server) as tab:
        page = tab.page
        page.goto(f"/tasks/{task_id}")
        expect(page.locator("#task-state")).to_have_text("queued")
        page.evaluate("document.activeElement?.blur()")
        page.keyboard.press("c")
        expect(page.locator("#task-state")).to_have_text("cancelled")
        # Once htmx has taken the new Retry form over (pressed before, the form
        # posts natively, and the browser follows the 303 to the new task's page).
        expect(page.locator("#task-detail form[data-htmx-powered]", has_text="Retry")).to_have_count(1)
        page.keyboard.press("r")
        retried = page.locator("#task-detail dt:text-is('retried as') + dd a")
        expect(retried).to_be_visible()
        new_id = int(retried.inner_text().lstrip("#"))
        assert server.request("GET", f"/api/tasks/{new_id}")[1]["retry_of"] == task_id
