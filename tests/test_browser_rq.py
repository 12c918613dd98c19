"""The dashboard in Chromium on the RQ backend: the page of a gunicorn web process, the
tasks run by two `flask queue worker` processes, all on a private Redis."""

from __future__ import annotations

from typing import Iterator

import pytest

from browser import QUICK, Tab, expect, open_tab
from servers import BIN, ROOT, Server, server_env
from support import wait_for

pytestmark = [pytest.mark.browser, pytest.mark.redis]

DRAIN = 30_000  # ms: ten half-second tasks on two workers, on a noisy machine


@pytest.fixture
def rq_tab(chromium_browser, start_server, redis_url, tmp_path) -> Iterator[Tab]:
    settings = {**QUICK, "FLASK_QUEUE_URL": redis_url}
    workers = [Server(f"worker-{n}", [str(BIN / "flask"), "--app", "dashboard", "queue",
                                      "worker"], tmp_path / f"worker-{n}.log",
                      server_env(settings), 0, cwd=ROOT).start() for n in range(2)]
    try:
        web = start_server(**settings)  # ready once /healthz sees a worker's heartbeat
        wait_for(lambda: len(web.stats()["workers"]) == 2, 60, "both RQ workers on the page")
        with open_tab(chromium_browser, web) as tab:
            yield tab
    finally:
        for worker in workers:
            worker.stop()


def test_work_added_on_redis_burns_down_on_two_workers_and_scaling_says_how(rq_tab: Tab):
    page = rq_tab.page
    page.goto("/")
    page.evaluate("window.__marker = 1")
    expect(page.locator("header.top")).to_contain_text("run by RQ workers")
    # The worker count is the process manager's: − and + are there, disabled, with why.
    for label in ("Fewer workers", "More workers"):
        expect(page.get_by_role("button", name=label)).to_be_disabled()
    expect(page.locator("#scale-hint")).to_contain_text("process manager")
    workers = page.locator("#workers")
    expect(workers).to_contain_text("2")  # both listed, each with its host and pid
    page.get_by_label("Seconds").fill("0.5")
    page.get_by_role("button", name="Add work ×10", exact=True).click()
    depth = page.locator("#queue-depth")
    expect(page.locator("#count-done")).to_have_text("10", timeout=DRAIN)
    expect(depth).to_have_text("0")
    assert page.evaluate("window.__marker === 1")  # no reload: the polls did it
    stats = rq_tab.server.stats()
    assert (stats["done"], stats["queued"], stats["running"]) == (10, 0, 0)
    names = {t["worker"] for t in stats["recent"][:10]}
    assert len(names) == 2, names  # both workers took a share
    rq_tab.screenshot("dashboard-rq.png")
    # The task list says it cannot search on Redis; each kind's health is there, live.
    page.goto("/tasks")
    expect(page.locator("#search-unavailable")).to_contain_text("not available")
    row = page.locator("#kind-pretend")
    expect(row.locator("td").nth(2)).to_have_text("10")  # done in the last hour
