"""The examples of the task features guide (docs/tasks.md), each between two
``# [name]`` markers that the page includes; tests/test_docs_examples.py runs them."""

import http.client
import time
from urllib.parse import urlsplit

from flask import current_app

from dashboard import Int, Registry, Str, current_queue

registry = Registry()


@registry.task("primes", params={"limit": Int(2, 10**7)})
def primes(ctx, limit=1000):
    """Counts the primes below ``limit``."""
    sieve = bytearray([1]) * limit
    sieve[:2] = b"\0\0"
    for n in range(2, int(limit**0.5) + 1):
        if sieve[n]:
            sieve[n * n::n] = bytearray(len(sieve[n * n::n]))
    return sum(sieve)


@registry.task("send_report", params={"user_id": Int(1, 10**9)})
def send_report(ctx, user_id):
    return f"report-{user_id}.pdf"


def results():
    # [results]
    task_id = current_queue.submit("primes", limit=1000)
    count = current_queue.result(task_id, timeout=10)  # 168, once the task is done
    info = current_queue.wait(task_id, timeout=10)     # the task as it ended (state, error, result...)
    # [/results]
    return count, info


def delays():
    # [delays]
    from datetime import date, datetime, time, timedelta

    soon = current_queue.submit("send_report", user_id=42, delay=600)  # in ten minutes
    later = current_queue.submit("send_report", user_id=42, delay=timedelta(hours=1))
    tomorrow_2am = datetime.combine(date.today() + timedelta(days=1), time(2, 0))  # local time
    then = current_queue.submit("send_report", user_id=42, at=tomorrow_2am)
    # [/delays]
    return soon, later, then


# [retries]
from dashboard import Retry


@registry.task("fetch", params={"url": Str(500)},
               retry=Retry(attempts=4, backoff=2.0, max_backoff=60.0, on=(ConnectionError,)))
def fetch(ctx, url):
    parts = urlsplit(url)
    answer = http.client.HTTPConnection(parts.netloc, timeout=10)  # refused: a ConnectionError
    answer.request("GET", parts.path or "/")
    return answer.getresponse().status
# [/retries]


# [time-limits]
@registry.task("render", params={"pages": Int(1, 10_000)}, time_limit=60)  # every task of the kind
def render(ctx, pages=10):
    for page in range(pages):
        if ctx.cancelled:                        # true at the limit, as when cancelled
            return
        time.sleep(0.01)                         # render one page
        ctx.progress((page + 1) / pages)


def render_a_long_one():
    return current_queue.submit("render", pages=5000, time_limit=300)  # this one may take longer
# [/time-limits]


# [logs]
@registry.task("import_file", params={"path": Str(500)})
def import_file(ctx, path):
    ctx.logger.info("reading %s", path)          # dashboard.task.import_file, at INFO
    current_app.logger.warning("3 rows skipped") # any logger the configuration lets through
# [/logs]


def unique_keys():
    # [unique-keys]
    first = current_queue.submit("send_report", user_id=42, key="report-42")  # queues it
    again = current_queue.submit("send_report", user_id=42, key="report-42")  # same id, nothing queued
    submitted = current_queue.enqueue("send_report", {"user_id": 42}, key="report-42")
    submitted.id, submitted.created                                           # that id, False
    # [/unique-keys]
    return first, again, submitted


# [periodic]
@registry.task("cleanup", cron="0 3 * * *")           # every night at 03:00 UTC
def cleanup(ctx):
    current_app.logger.info("cleaning up")


@registry.task("heartbeat", every=30)                 # every 30 s (on :00 and :30)
def heartbeat(ctx):
    return "alive"


registry.schedule("weekly-report", "send_report",     # a kind with params
                  cron="0 8 * * MON", tz="Europe/Riga", params={"user_id": 42})
# [/periodic]
