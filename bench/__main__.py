"""Run the benchmarks and print one table of ratios: ``python -m bench``.

Each row compares our code to a baseline doing the same work in the same
run, alternating rounds so both see the same machine; the ratio of medians
is what holds from one machine to another, not the rates themselves. The
rows are those of issue 6, plus the poll's render time after many tasks:

1. the engine against ``ThreadPoolExecutor(1)`` and a bare ``queue.Queue``;
2. dispatch latency to an idle worker, against the bare queue's hand-off;
3. memory per queued task, and RSS as a million tasks pass a bounded history;
4. HTTP under ``gunicorn -c gunicorn.conf.py``, against a bare route;
5. the SQLite store against a bare INSERT + commit loop;
6. the server's CPU time with 50 dashboards polling;
7. a changed poll's render after 10,000 tasks against after 20;
8. delayed tasks: how late one starts after its due time, the bytes a
   scheduled task holds, and the plain engine's rate while 1,000 wait;
9. the RQ backend on a private redis-server: its submit against RQ's own
   ``Queue.enqueue``, no-op tasks drained by 2 worker processes against 1,
   and a changed poll's render with many finished jobs in Redis against 100;
10. the operator's view on the SQLite store: a filtered page with 1,000,000
    finished tasks in the file against 1,000 (the first page, and one 90% down by
    its cursor), and a bulk retry of 10,000 failed tasks while workers run, with
    the worst wait of a submit made every 2 ms meanwhile.

HTTP load comes from wrk when it is installed (``make bench`` installs
Debian's package when it can), else from :mod:`bench.load`'s Python client.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

from . import engine, sqlite, web
from .load import LoadGenerator

ROWS = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10")


@dataclass
class Row:
    key: str
    name: str
    ours: str
    base: str
    ratio: float | None
    target: str = "-"
    met: bool | None = None


def compare(ours: Callable[[int], float], base: Callable[[int], float], n: int, rounds: int):
    mine, theirs = [], []
    for _ in range(rounds):
        mine.append(ours(n))
        theirs.append(base(n))
    return statistics.median(mine), statistics.median(theirs)


def rate(value: float) -> str:
    return f"{value:,.0f}/s"


def micros(value: float) -> str:
    return f"{value * 1e6:,.0f} µs"


def size(value: float) -> str:
    return f"{value:,.0f} B"


def mib(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


def at_least(ratio: float, target: float) -> tuple[str, bool]:
    return f">= {target:g}x", ratio >= target


def engine_rows(n: int, rounds: int) -> list[Row]:
    ours, executor = compare(engine.engine_rate, engine.executor_rate, n, rounds)
    ours2, raw = compare(engine.engine_rate, engine.raw_queue_rate, n, rounds)
    return [
        Row("1a", f"engine submit+join, {n:,} tasks vs ThreadPoolExecutor(1)", rate(ours),
            rate(executor), ours / executor, *at_least(ours / executor, 1.2)),
        Row("1b", f"engine submit+join, {n:,} tasks vs queue.Queue + 1 thread", rate(ours2),
            rate(raw), ours2 / raw, *at_least(ours2 / raw, 0.3)),
    ]


def latency_rows(tries: int) -> list[Row]:
    lat = engine.dispatch_latency(tries)
    ours, raw = lat["ours"], lat["raw"]
    return [
        Row("2a", f"dispatch to an idle worker, p50 of {tries:,} vs queue.Queue",
            micros(ours["p50"]), micros(raw["p50"]), ours["p50"] / raw["p50"]),
        Row("2b", f"dispatch to an idle worker, p99 of {tries:,} vs queue.Queue",
            micros(ours["p99"]), micros(raw["p99"]), ours["p99"] / raw["p99"],
            "p99 < 2 ms", ours["p99"] < 0.002),
    ]


def memory_rows(total: int) -> list[Row]:
    queued = engine.queued_bytes(100_000)
    run = engine.rss_run(total)
    rss = run["rss"]
    first, last = rss[min(rss)], rss[max(rss)]
    growth = last / first
    return [
        Row("3a", "bytes per queued task beyond params, 100,000 queued vs queue.Queue item",
            size(queued["ours"]), size(queued["raw"]), queued["ours"] / queued["raw"],
            "< 1 KiB", queued["ours"] < 1024),
        Row("3b", f"RSS after {max(rss):,} tasks vs after {min(rss):,} (history 1,000)",
            mib(last), mib(first), growth, "<= 1.1x (flat)", growth <= 1.1),
    ]


def http_rows(load: LoadGenerator, rounds: int, seconds: float) -> tuple[list[Row], str]:
    routes = web.http_rows(load, rounds, seconds, log=progress)
    bare = routes["bare"]
    rows = []
    names = {
        "post": ("POST /tasks (form, 303) vs bare route", 0.7),
        "changed": ("changed poll (GET /live, all regions) vs bare route", 0.5),
        "fresh": ("  the same, rendered anew for every request", 0.5),
        "unchanged": ("unchanged poll (GET /live, 304) vs bare route", 0.85),
    }
    for letter, key in zip("abcd", ("post", "changed", "fresh", "unchanged")):
        name, target = names[key]
        route = routes[key]
        ratio = route.rate / bare.rate
        text, met = at_least(ratio, target)
        rows.append(Row(f"4{letter}", name, rate(route.rate), rate(bare.rate), ratio, text,
                        met and not route.bad))
    for letter, key in zip("efg", ("post", "changed", "unchanged")):
        route = routes[key]
        rows.append(Row(f"4{letter}", f"bytes per response (headers + body): {key} vs bare",
                        size(route.bytes), size(bare.bytes), route.bytes / bare.bytes))
    bad = {k: r.bad for k, r in routes.items() if r.bad}
    total = sum(r.requests for r in routes.values())
    mix = (f"{total:,} measured responses, all 2xx/3xx" if not bad else
           f"{total:,} measured responses; not 2xx/3xx or failed: {bad}")
    return rows, (f"{mix}; 4b reuses a state's render for up to 1s (every page polling "
                  "that state gets it), 4c renders the page for every request "
                  "(the rows of unchanged tasks reused, as every poll does)")


def sqlite_rows(n: int, rounds: int) -> list[Row]:
    submits, bare = compare(sqlite.sqlite_submit_rate, sqlite.sqlite_bare_insert_rate, n, rounds)
    durable, memory = compare(sqlite.sqlite_end_to_end_rate, engine.engine_rate, n, rounds)
    return [
        Row("5a", f"SQLite submit, {n:,} tasks vs bare INSERT+commit loop (WAL)",
            rate(submits), rate(bare), submits / bare, *at_least(submits / bare, 0.5)),
        Row("5b", f"SQLite submit+join, {n:,} tasks vs in-memory store", rate(durable),
            rate(memory), durable / memory),
    ]


def polling_rows(dashboards: int, seconds: float) -> tuple[list[Row], str]:
    cost = web.polling_cost(dashboards, seconds, log=progress)
    idle, busy, alone = cost["idle"], cost["busy"], cost["busy_alone"]

    def per_min(value: float) -> str:
        return f"{value:.2f} CPU s/min"

    rows = [
        Row("6a", f"server CPU, {dashboards} dashboards polling 1/s: burning down vs unchanged",
            per_min(busy.cpu_per_minute), per_min(idle.cpu_per_minute),
            busy.cpu_per_minute / idle.cpu_per_minute if idle.cpu_per_minute else None),
        Row("6b", f"server CPU, burning down: {dashboards} dashboards vs none",
            per_min(busy.cpu_per_minute), per_min(alone.cpu_per_minute),
            busy.cpu_per_minute / alone.cpu_per_minute if alone.cpu_per_minute else None),
    ]
    note = (f"{seconds:g}s windows; burning down: 4 workers on 2s tasks reporting progress "
            f"10 times a second; polls answered: unchanged {dict(sorted(idle.statuses.items()))}"
            f", burning down {dict(sorted(busy.statuses.items()))}")
    return rows, note


def render_rows() -> list[Row]:
    render = engine.poll_render_seconds((20, 10_000))
    twenty, many = render[20], render[10_000]
    return [
        Row("7", "changed poll render (in process) after 10,000 tasks vs after 20",
            micros(many), micros(twenty), many / twenty, "<= 1.2x", many / twenty <= 1.2),
    ]


def delay_rows(n: int, rounds: int, tries: int) -> list[Row]:
    late = engine.delay_lateness(tries)
    ours, base = late["ours"], late["base"]
    held = engine.scheduled_bytes()
    with_scheduled, plain = compare(engine.engine_rate_with_scheduled, engine.engine_rate, n,
                                    rounds)
    return [
        Row("8a", f"delayed task's start after its due time, p50 of {tries:,} vs OS timer",
            micros(ours["p50"]), micros(base["p50"]), ours["p50"] / max(base["p50"], 1e-9)),
        Row("8b", f"delayed task's start after its due time, p99 of {tries:,} vs OS timer",
            micros(ours["p99"]), micros(base["p99"]), ours["p99"] / max(base["p99"], 1e-9),
            "p99 < 50 ms", ours["p99"] < 0.050),
        Row("8c", "bytes per scheduled task beyond params, 100,000 vs per queued task",
            size(held["scheduled"]), size(held["queued"]), held["scheduled"] / held["queued"],
            "< 1 KiB", held["scheduled"] < 1024),
        Row("8d", f"engine submit+join, {n:,} tasks, 1,000 scheduled for later vs none",
            rate(with_scheduled), rate(plain), with_scheduled / plain,
            *at_least(with_scheduled / plain, 0.9)),
    ]


def rq_rows(n: int, rounds: int, tasks: int, finished: int) -> tuple[list[Row], str]:
    try:
        from . import rq
    except ImportError as exc:
        return [], f"skipped: the RQ backend needs rq and redis ({exc})"
    if not rq.redis_available():
        return [], "skipped: no redis-server (Debian: apt-get install redis-server)"
    with rq.redis_server() as url:
        progress("  9a submit ...")
        ours, base = compare(lambda k: rq.submit_rate(url, k),
                             lambda k: rq.rq_enqueue_rate(url, k), n, rounds)
        drain_rounds = min(rounds, 2)
        progress(f"  9b {tasks:,} tasks, 1 and 2 worker processes ...")
        one, two = rq.scaling(url, tasks, drain_rounds, fork=True)
        one_simple, two_simple = rq.scaling(url, tasks, drain_rounds, fork=False)
        progress(f"  9c fill {finished:,} finished jobs ...")
        render = rq.poll_render_seconds(url, (100, finished))
    few, many = render["render"][100], render["render"][finished]
    (few_fill, _), (many_fill, many_bytes) = render["fill"][100], render["fill"][finished]
    filled_few, filled_many = render["as_filled"][100], render["as_filled"][finished]
    series = render["series"]
    rows = [
        Row("9a", f"RQ backend submit, {n:,} no-op tasks vs RQ's Queue.enqueue (same Redis)",
            rate(ours), rate(base), ours / base, *at_least(ours / base, 0.8)),
        Row("9b", f"RQ end to end, {tasks:,} no-op tasks: 2 forking worker processes vs 1",
            rate(two), rate(one), two / one),
        Row("9c", f"RQ changed poll render, {finished:,} finished jobs in Redis vs 100",
            micros(many), micros(few), many / few, "<= 1.2x", many / few <= 1.2),
    ]
    note = (f"private redis-server on a unix socket; 9a: {rounds} rounds each, FLUSHDB "
            f"between; 9b: median of {drain_rounds} rounds, workers started and idle "
            f"before the submit, timed from its end to the last done; no fork "
            f"(SimpleQueueWorker): 1 process {rate(one_simple)}, 2 processes "
            f"{rate(two_simple)}, {two_simple / one_simple:.2f}x; 9c: QUEUE_HISTORY "
            f"{rq.HISTORY:,}, each poll after a submit; {finished:,} filled by "
            f"{render['workers']} worker processes (no fork) in {many_fill:.0f}s "
            f"({finished / many_fill:,.0f}/s, 100 in {few_fill:.1f}s), Redis "
            f"{many_bytes / finished:,.0f} B per finished job; timed with the fills' "
            f"per-second record dropped from both; as filled ({series[finished]} s of it "
            f"vs {series[100]} s): {micros(filled_many)} vs {micros(filled_few)}, "
            f"{filled_many / filled_few:.2f}x")
    return rows, note


def millis(value: float) -> str:
    return f"{value * 1e3:,.1f} ms"


def operator_rows(big: int, small: int, bulk: int, rounds: int) -> tuple[list[Row], str]:
    from . import operator

    pages = operator.page_times(big, small, rounds, log=progress)
    times, sizes = pages["times"], pages["rows"]
    first, few, deep = times["big"], times["small"], times["deep"]
    bulk_rounds = max(1, min(rounds, 3))
    progress(f"  10c bulk retry of {bulk:,}, {bulk_rounds} round(s) ...")
    runs = [operator.bulk_round(bulk) for _ in range(bulk_rounds)]
    took = statistics.median(r["bulk"] for r in runs)
    one_by_one = statistics.median(r["one_by_one"] for r in runs)
    during = [w for r in runs for w in r["during"]]
    alone = [w for r in runs for w in r["alone"]]
    worst, worst_alone = max(during, default=0.0), max(alone, default=0.0)
    tail, tail_alone = operator.p99(during), operator.p99(alone)
    retried = runs[0]["retried"]
    query = f"failed {operator.FLAKY!r} tasks, newest first, {operator.PAGE} a page"
    rows = [
        Row("10a", f"SQLite find: first page of {query}, {big:,} finished vs {small:,}",
            micros(first), micros(few), first / few, "<= 1.5x", first / few <= 1.5),
        Row("10b", f"SQLite find: the page {pages['position']:,} matches down by its cursor "
            f"({big:,}) vs the first ({small:,})", micros(deep), micros(few), deep / few,
            "<= 1.5x", deep / few <= 1.5),
        Row("10c", f"SQLite bulk retry of {retried:,} failed tasks (2 workers, a submit every "
            f"2 ms) vs {retried:,} submits one by one", f"{took:.2f} s", f"{one_by_one:.2f} s",
            took / one_by_one if one_by_one else None),
        Row("10d", "  worst submit wait meanwhile (and p99) vs the same submits without it",
            f"{millis(worst)} (p99 {millis(tail)})",
            f"{millis(worst_alone)} (p99 {millis(tail_alone)})",
            worst / worst_alone if worst_alone else None, "< 100 ms (worst and p99)",
            worst < 0.1 and tail < 0.1),
    ]
    fills = ", ".join(f"{n:,} in {s:.1f}s" for n, s in pages["fill"].items())
    refused = sum(len(r["refused"]) for r in runs)
    note = (f"finished tasks written straight into the store's file (5 kinds, 10% failed; "
            f"fill {fills}, {pages['bytes'] / 2**20:,.0f} MiB); matches "
            f"{pages['matches'][big]:,} vs {pages['matches'][small]:,}, rows per page "
            f"{sizes['big']}/{sizes['deep']}/{sizes['small']} (first/deep/small); median of "
            f"{rounds} rounds of 200 finds each, the three in turn; the deep page against "
            f"the first with {big:,}: {deep / first:.2f}x; 10c-d: median of {bulk_rounds} "
            f"round(s), each on a file of {10 * bulk:,} finished tasks "
            f"({runs[0]['failed']:,} failed, filled in {runs[0]['fill']:.1f}s), "
            f"{len(during):,} submits during the bulks, "
            f"{len(alone):,} without (workers running, no bulk)"
            + (f"; {refused} submits refused" if refused else ""))
    return rows, note


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_table(rows: list[Row]) -> None:
    width = max(len(r.name) for r in rows)
    ours_w = max(8, *(len(r.ours) for r in rows))
    base_w = max(8, *(len(r.base) for r in rows))
    target_w = max(6, *(len(r.target) for r in rows))
    print(f"{'#':<3} {'row':<{width}}  {'ours':>{ours_w}}  {'baseline':>{base_w}}  "
          f"{'ratio':>7}  {'target':<{target_w}}  met")
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        met = "" if r.met is None else ("yes" if r.met else "NO")
        print(f"{r.key:<3} {r.name:<{width}}  {r.ours:>{ours_w}}  {r.base:>{base_w}}  "
              f"{ratio:>7}  {r.target:<{target_w}}  {met}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=20_000, help="tasks per engine round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the in-process rows")
    parser.add_argument("--http-rounds", type=int, default=3)
    parser.add_argument("--http-seconds", type=float, default=4.0, help="seconds per HTTP load")
    parser.add_argument("--poll-seconds", type=float, default=15.0,
                        help="seconds of each polling-cost window")
    parser.add_argument("--dashboards", type=int, default=50,
                        help="simulated dashboards of the polling-cost rows")
    parser.add_argument("--tries", type=int, default=2000, help="dispatch latency samples")
    parser.add_argument("--tasks", type=int, default=1_000_000,
                        help="tasks run through the history for the RSS row")
    parser.add_argument("--rq-tasks", type=int, default=300,
                        help="no-op tasks per round of the RQ end-to-end row (9b)")
    parser.add_argument("--rq-finished", type=int, default=15_000,
                        help="finished jobs in Redis for the RQ poll-render row (9c)")
    parser.add_argument("--history-big", type=int, default=1_000_000,
                        help="finished tasks in the SQLite file of the operator's rows (10a-b)")
    parser.add_argument("--history-small", type=int, default=1_000,
                        help="finished tasks in the file 10a-b compare it to")
    parser.add_argument("--bulk", type=int, default=10_000,
                        help="failed tasks retried in bulk (10c-d)")
    parser.add_argument("--load", choices=("auto", "wrk", "python"), default="auto",
                        help="HTTP load generator (auto: wrk if installed)")
    parser.add_argument("--only", default=",".join(ROWS),
                        help="comma-separated row numbers to run (default: all)")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))

    load = LoadGenerator(prefer_python=args.load == "python")
    if args.load == "wrk" and not load.wrk:
        parser.error("wrk is not installed (Debian: apt-get install wrk)")
    started = time.monotonic()
    rows: list[Row] = []
    notes: list[str] = []
    sections = [
        ("1", "engine rate", lambda: engine_rows(args.n, args.rounds)),
        ("2", "dispatch latency", lambda: latency_rows(args.tries)),
        ("3", "memory", lambda: memory_rows(args.tasks)),
        ("4", "HTTP", lambda: http_rows(load, args.http_rounds, args.http_seconds)),
        ("5", "SQLite", lambda: sqlite_rows(max(500, args.n // 10), args.rounds)),
        ("6", "polling cost", lambda: polling_rows(args.dashboards, args.poll_seconds)),
        ("7", "poll render", render_rows),
        ("8", "delayed tasks", lambda: delay_rows(args.n, args.rounds, min(1000, args.tries))),
        ("9", "RQ backend", lambda: rq_rows(max(200, args.n // 10), args.rounds,
                                            args.rq_tasks, args.rq_finished)),
        ("10", "operator's view (SQLite)", lambda: operator_rows(
            args.history_big, args.history_small, args.bulk, args.rounds)),
    ]
    for key, title, run in sections:
        if key not in only:
            continue
        progress(f"[{time.monotonic() - started:5.0f}s] {title} ...")
        result = run()
        if isinstance(result, tuple):
            result, note = result
            notes.append(f"row {key}: {note}")
        rows += result

    print(f"python -m bench: Python {sys.version.split()[0]}, {args.rounds} rounds in process, "
          f"{args.http_rounds} x {args.http_seconds:g}s per HTTP route; HTTP load: "
          f"{load.name if '4' in only else '-'}")
    if rows:
        print_table(rows)
    for note in notes:
        print(note)
    print(f"took {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
