"""The dashboard's forms at their limits, in a real browser (Chromium, Playwright,
the app under gunicorn): what a person sees when the server says no.

* Without JavaScript a refused post returns to the page the form is on, which
  says why; the address bar then holds a page, so a reload posts nothing.
* The − and + buttons stop at the ends: a double click at 2 workers, twenty
  clicks on +, give no error.
* The batch button adds what QUEUE_MAX_BATCH and QUEUE_SUBMIT_LIMIT allow, so it can succeed.
* The history's heading tells how many finished and how many it lists.

Each test has a server of its own (``start_server``): they pause, scale and
rate-limit it.
"""

from __future__ import annotations

import http.client
import re
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import pytest

from browser import expect, open_tab
from support import wait_for

QUICK = 10_000  # ms: far above what a busy machine needs, far below a hang


# -- helpers -------------------------------------------------------------------------------


def path_of(url: str) -> str:
    return urlsplit(url).path


def posts_sent(page) -> list[str]:
    """The path of every POST the page sends from now on."""
    posts: list[str] = []
    page.on("request", lambda r: r.method == "POST" and posts.append(path_of(r.url)))
    return posts


def fully_loaded(page):
    """Wait, around a navigation, for the new page's icon too: Chromium asks for it after
    the load event, and leaving the page before it came would abort it (a failed request)."""
    return page.expect_response(lambda r: path_of(r.url) == "/static/favicon.svg")


def responses_to(page, method: str, path: str) -> list:
    responses: list = []
    page.on("response", lambda r: r.request.method == method and path_of(r.url) == path
            and responses.append(r))
    return responses


def record_form_errors(page) -> None:
    """From now on, note every text #form-errors ever shows (it is swapped whole, so
    watch the document, not the element)."""
    page.evaluate(
        """() => {
          window.__formErrors = [];
          const read = () => {
            const text = document.getElementById('form-errors')?.textContent.trim();
            if (text) window.__formErrors.push(text);
          };
          new MutationObserver(read).observe(document.body,
            {subtree: true, childList: true, characterData: true});
          read();
        }"""
    )


def form_errors_seen(page) -> list[str]:
    return page.evaluate("window.__formErrors")


def hold_first(page, path: str) -> Callable[[], None]:
    """Hold the page's first POST to ``path`` until the returned function is called.

    Every click made meanwhile lands while that post is in flight, on a button
    no answer has changed yet: the fast double click of a person on a slow
    link, made certain. Later posts go straight through.
    """
    held: list = []
    holding = True

    def handle(route) -> None:
        if holding and route.request.method == "POST" and not held:
            held.append(route)
        else:
            route.continue_()

    page.route(re.compile(rf"^[a-z]+://[^/]+{re.escape(path)}$"), handle)

    def release() -> None:
        nonlocal holding
        holding = False
        for route in held:
            route.continue_()

    return release


def wait_for_responses(page, responses: list, n: int, what: str) -> None:
    """Let the page run (events are delivered meanwhile) until ``n`` responses came."""
    wait_for(lambda: page.wait_for_timeout(20) or len(responses) >= n, QUICK / 1000,
             f"{n} {what} (saw {len(responses)})", interval=0)


def batch_buttons(page):
    return page.get_by_role("button", name=re.compile(r"^Add work ×"))


# -- without JavaScript, a refusal returns to the page, which says why ---------------------


@pytest.mark.browser
def test_without_javascript_a_refused_cancel_returns_to_the_task_page_which_says_why(
    chromium_browser, start_server
):
    server = start_server()
    assert server.request("POST", "/api/pause")[0] == 200  # the task waits, with its Cancel
    (task,) = server.submit("pretend", seconds=0)
    with open_tab(chromium_browser, server, java_script_enabled=False) as tab:
        page = tab.page
        posts = posts_sent(page)
        with fully_loaded(page):
            page.goto(f"/tasks/{task}")
        cancel = page.get_by_role("button", name="Cancel", exact=True)
        expect(cancel).to_be_visible()
        # Cancelled meanwhile (another tab, a script): this page's button is refused.
        assert server.request("POST", f"/api/tasks/{task}/cancel")[0] == 200

        with fully_loaded(page), page.expect_navigation() as back:
            cancel.click()

        # A GET page of ours, the task's own, saying why; not the post's address.
        assert (back.value.request.method, back.value.status) == ("GET", 200)
        assert posts == [f"/tasks/{task}/cancel"]
        assert path_of(page.url) == f"/tasks/{task}", page.url
        why = f"task {task} is cancelled; only scheduled, queued or running tasks can be cancelled"
        expect(page.locator("#form-errors")).to_have_text(why)
        expect(page.locator("#task-state")).to_have_text("cancelled")

        page.reload()
        expect(page.locator("#task-state")).to_have_text("cancelled")
        assert posts == [f"/tasks/{task}/cancel"], "the reload posted again"


@pytest.mark.browser
def test_without_javascript_a_refused_submit_returns_to_the_dashboard_in_presenter_mode(
    chromium_browser, start_server
):
    server = start_server(FLASK_QUEUE_SUBMIT_LIMIT="1 per minute")
    with open_tab(chromium_browser, server, java_script_enabled=False) as tab:
        page = tab.page
        posts = posts_sent(page)
        with fully_loaded(page):
            page.goto("/?present=1")
        add = page.get_by_role("button", name="Add work", exact=True)

        with fully_loaded(page), page.expect_navigation():
            add.click()  # the one task this client may add this minute
        expect(page.locator("#form-errors")).to_be_empty()
        with fully_loaded(page), page.expect_navigation() as back:
            add.click()  # refused: 429 to htmx and the API, a 303 back here

        assert (back.value.request.method, back.value.status) == ("GET", 200)
        url = urlsplit(page.url)
        assert url.path == "/" and parse_qs(url.query)["present"] == ["1"], page.url
        expect(page.locator("body")).to_have_class("present")
        expect(page.locator("#form-errors")).to_contain_text(
            "too much work from this client: the limit is 1 task per minute; try again in ")
        assert posts == ["/tasks", "/tasks"]

        page.reload()
        expect(page.locator("#queue-depth")).to_be_visible()
        assert posts == ["/tasks", "/tasks"], "the reload posted again"
        assert server.stats()["submitted"] == 1


@pytest.mark.server
def test_a_refusal_signed_in_one_worker_process_is_shown_by_the_others(start_server, tmp_path):
    """gunicorn's workers share the key without SECRET_KEY: the master makes it before
    it forks them. Each GET on a new connection may reach another process."""
    server = start_server(WEB_CONCURRENCY="3", FLASK_QUEUE_URL=f"sqlite:///{tmp_path / 'q.db'}")
    host = urlsplit(server.url).netloc

    def ask(method: str, path: str, body: str | None = None) -> tuple[int, str | None, str]:
        """``(status, Location, body)``, on a connection of its own."""
        connection = http.client.HTTPConnection(host, timeout=10)
        try:
            connection.request(method, path, body=body, headers={
                "Content-Type": "application/x-www-form-urlencoded"} if body else {})
            response = connection.getresponse()
            return response.status, response.getheader("Location"), response.read().decode()
        finally:
            connection.close()

    status, location, body = ask("POST", "/tasks", "count=0")
    assert status == 303 and location, (status, body[:200])
    shown_by: dict[str, str] = {}

    def seen_in_two_processes() -> bool:
        status, _, page = ask("GET", location)
        assert status == 200, page[:200]
        pid = re.search(r'<main data-drawn-by="(\d+)">', page).group(1)
        shown_by[pid] = re.search(r'id="form-errors" role="alert">(.*?)</div>', page,
                                  re.S).group(1)
        return len(shown_by) >= 2

    wait_for(seen_in_two_processes, 10, "pages from two worker processes", interval=0)
    for pid, shown in shown_by.items():
        assert "count must be an integer from 1 to 100, got 0" in shown, (pid, shown)


# -- − and + stop at the ends, and no click there is an error ------------------------------


@pytest.mark.browser
def test_a_triple_click_on_minus_at_two_workers_stops_at_one_without_an_error(
    chromium_browser, start_server
):
    server = start_server(FLASK_QUEUE_WORKERS="2")
    with open_tab(chromium_browser, server) as tab:
        page = tab.page
        page.goto("/")
        target = page.locator("#workers-target")
        expect(target).to_have_text("2")
        record_form_errors(page)
        answers = responses_to(page, "POST", "/workers")
        release = hold_first(page, "/workers")

        page.get_by_role("button", name="Fewer workers").click(click_count=3)
        release()

        wait_for_responses(page, answers, 3, "answers to the three clicks")
        expect(target).to_have_text("1")
        assert form_errors_seen(page) == []
        expect(page.locator("#form-errors")).to_be_empty()
        assert [r.status for r in answers] == [200, 200, 200]
        expect(page.get_by_role("button", name="Fewer workers")).to_be_disabled()
        assert server.stats()["workers_target"] == 1


@pytest.mark.browser
def test_twenty_fast_clicks_on_plus_stop_at_max_workers_without_an_error(
    chromium_browser, start_server
):
    server = start_server(FLASK_QUEUE_MAX_WORKERS="6")
    with open_tab(chromium_browser, server) as tab:
        page = tab.page
        page.goto("/")
        target = page.locator("#workers-target")
        expect(target).to_have_text("1")
        record_form_errors(page)
        answers = responses_to(page, "POST", "/workers")
        release = hold_first(page, "/workers")

        page.get_by_role("button", name="More workers").click(click_count=20)
        release()

        wait_for_responses(page, answers, 20, "answers to the twenty clicks")
        expect(target).to_have_text("6")
        assert form_errors_seen(page) == []
        expect(page.locator("#form-errors")).to_be_empty()
        assert {r.status for r in answers} == {200}
        expect(page.get_by_role("button", name="More workers")).to_be_disabled()
        assert server.stats()["workers_target"] == 6


# -- the batch button adds what the limits allow -------------------------------------------


@pytest.mark.browser
@pytest.mark.parametrize("env,size", [
    ({"FLASK_QUEUE_MAX_BATCH": "4"}, 4),
    ({"FLASK_QUEUE_SUBMIT_LIMIT": "3 per minute"}, 3),
], ids=["max-batch-4", "submit-limit-3"])
def test_the_batch_button_adds_what_the_limits_allow_and_succeeds(
    chromium_browser, start_server, env, size
):
    server = start_server(**env)
    assert server.request("POST", "/api/pause")[0] == 200  # the depth counts every task added
    with open_tab(chromium_browser, server) as tab:
        page = tab.page
        page.goto("/")
        record_form_errors(page)
        batch = batch_buttons(page)
        expect(batch).to_have_count(1)
        expect(batch).to_have_text(f"Add work ×{size}")

        with page.expect_response(lambda r: path_of(r.url) == "/tasks") as posted:
            batch.click()
        assert posted.value.status == 200
        expect(page.locator("#queue-depth")).to_have_text(str(size))
        assert form_errors_seen(page) == []
        assert server.stats()["submitted"] == size


@pytest.mark.browser
@pytest.mark.parametrize("env", [{"FLASK_QUEUE_MAX_BATCH": "1"}, {"FLASK_QUEUE_SUBMIT_LIMIT": "1/minute"}],
                         ids=["max-batch-1", "submit-limit-1"])
def test_no_batch_button_when_one_task_is_all_a_request_may_add(
    chromium_browser, start_server, env
):
    server = start_server(**env)
    with open_tab(chromium_browser, server) as tab:
        page = tab.page
        page.goto("/")
        expect(page.get_by_role("button", name="Add work", exact=True)).to_be_visible()
        expect(batch_buttons(page)).to_have_count(0)


# -- the history's heading is true ---------------------------------------------------------


@pytest.mark.browser
def test_the_history_heading_tells_what_it_lists_of_how_many(chromium_browser, start_server):
    server = start_server(FLASK_QUEUE_WORKERS="4")
    with open_tab(chromium_browser, server) as tab:
        page = tab.page
        page.goto("/")
        heading = page.locator("#history-title")
        rows = page.locator("#history tbody tr")
        expect(heading).to_have_text("Finished 0")
        expect(page.locator("#history .empty")).to_have_text("Nothing has finished yet.")

        server.submit("pretend", 4, seconds=0)
        expect(heading).to_have_text("Finished 4", timeout=QUICK)
        expect(rows).to_have_count(4)

        server.submit("pretend", 20, seconds=0)
        expect(heading).to_have_text("Last 20 finished of 24", timeout=QUICK)
        expect(heading.locator(".sub")).to_have_text("of 24")
        expect(rows).to_have_count(20)

        page.get_by_role("button", name="Clear history", exact=True).click()
        expect(heading).to_have_text("Finished 24")
        expect(page.locator("#history .empty")).to_have_text(
            "None of them is listed: the history was cleared, or has forgotten them.")


# -- the Add work form offers the chosen kind's parameters -------------------------------------


@pytest.mark.browser
def test_the_add_work_form_shows_the_chosen_kinds_fields_and_sends_only_those(
    chromium_browser, start_server
):
    """The form's fields come from the registered kinds (it had one "Seconds" field,
    for the demo's kinds, in every app): the chosen kind's show, the others hide
    and are not sent."""
    server = start_server()
    assert server.request("POST", "/api/pause")[0] == 200  # the tasks wait to be read
    with open_tab(chromium_browser, server) as tab:
        page = tab.page
        page.goto("/")
        kind = page.get_by_label("Kind")
        seconds, fail_rate, limit = (page.get_by_label(name) for name in
                                     ("Seconds", "Fail rate", "Limit"))
        expect(kind).to_have_value("pretend")
        expect(seconds).to_be_visible()
        expect(fail_rate).to_be_hidden()
        expect(limit).to_be_hidden()
        expect(limit).to_have_attribute("placeholder", "20000000")

        seconds.fill("0.5")
        kind.select_option("primes")
        expect(seconds).to_be_hidden()
        expect(limit).to_be_visible()
        limit.fill("1000")
        with page.expect_request(lambda r: path_of(r.url) == "/tasks") as posted:
            page.get_by_role("button", name="Add work", exact=True).click()
        sent = parse_qs(posted.value.post_data)
        assert sent["kind"] == ["primes"] and sent["limit"] == ["1000"]
        assert "seconds" not in sent, "a hidden field was sent"
        expect(page.locator("#queue-depth")).to_have_text("1")

        kind.select_option("flaky")
        expect(seconds).to_be_visible()
        expect(fail_rate).to_be_visible()
        expect(limit).to_be_hidden()


# -- a delayed task counts down, then runs -------------------------------------------------


@pytest.mark.browser
def test_a_scheduled_task_counts_down_then_runs(chromium_browser, start_server):
    server = start_server()
    with open_tab(chromium_browser, server) as tab:
        page = tab.page
        page.goto("/")
        scheduled = page.locator("#scheduled")
        expect(scheduled).to_be_hidden()  # nothing scheduled: no section

        page.get_by_label("Seconds").fill("0")
        page.get_by_label("Delay").fill("3")
        with page.expect_response(lambda r: path_of(r.url) == "/tasks") as posted:
            page.get_by_role("button", name="Add work", exact=True).click()
        assert posted.value.status == 200
        expect(scheduled).to_be_visible(timeout=QUICK)
        expect(page.locator("#count-scheduled")).to_have_text("+ 1 scheduled")
        expect(page.locator("#queue-depth")).to_have_text("0")
        countdown = scheduled.locator("time.countdown")
        expect(countdown).to_have_text(re.compile(r"^in [1-3]s$"), timeout=QUICK)
        first = countdown.inner_text()
        expect(countdown).not_to_have_text(first, timeout=QUICK)  # it counts down
        # Once due it runs, and the section goes away by itself.
        expect(scheduled).to_be_hidden(timeout=QUICK)
        expect(page.locator("#count-done")).to_have_text("1", timeout=QUICK)
        expect(page.locator("#history tbody tr").first).to_contain_text("pretend")


@pytest.mark.browser
def test_a_shaky_task_is_retried_by_itself_and_its_page_shows_each_attempt(
    chromium_browser, start_server
):
    server = start_server()
    status, body = server.request("POST", "/api/tasks", {"kind": "shaky",
                                                         "params": {"seconds": 0, "fail_rate": 1}})
    assert status == 202, body
    (task_id,) = body["ids"]
    with open_tab(chromium_browser, server) as tab:
        page = tab.page
        tab.expect_aborted_polls()
        page.goto(f"/tasks/{task_id}")
        attempt = page.locator("#task-attempt")
        # Attempt 1 failed: scheduled again, counting down to attempt 2 (or already on it).
        expect(attempt).to_contain_text(re.compile(r"^[23] of 3"), timeout=QUICK)
        expect(page.locator("#task-attempts li").first).to_contain_text(
            "attempt 1, ", timeout=QUICK)
        # The page polls by itself until the last attempt has failed.
        expect(page.locator("#task-state")).to_have_text("failed", timeout=QUICK)
        expect(attempt).to_have_text("3 of 3 tried")
        expect(page.locator("#task-attempts li")).to_have_count(2)
        expect(page.locator("#task-error")).to_contain_text("flaky task gave up")
        expect(page.get_by_role("button", name="Retry")).to_be_visible()  # the manual one stays
