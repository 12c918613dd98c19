"""``flask queue ...``: see and steer the queue from a terminal.

The extension registers this group on every app it is given (``app.cli``), so
``flask --app yourapp queue status`` works wherever ``flask run`` does.

With a shared store (the SQLite file) the commands act on the store itself,
as any process sharing it does. The in-memory store lives inside the server
process, where no command can reach it: the commands say so in one line, and
``--server URL`` acts through that server's JSON API instead (with the access
token when one is set). The messages are the API's: a refused submit names
the field and what is allowed, in the same words.

Exit status: 0 done, 1 refused (the message says why), 2 usage. ``wait``: 0
once nothing is queued or running, 1 when the timeout came first.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, NamedTuple

import click
from flask import current_app
from flask.cli import AppGroup

from .errors import InvalidParam, QueueError, QueueFull
from .ext import current_queue, install_signal_handlers
from .records import BULK_ACTIONS, FINISHED_STATES, MAX_SEARCH_TEXT, State, TaskFilter
from .tasks import Int, check_key

queue_cli = AppGroup("queue", help="See and steer the work queue (the same controls as the "
                                   "dashboard).")

#: Seconds a --server request waits for an answer.
HTTP_TIMEOUT = 10.0


class Refused(click.ClickException):
    """Nothing was done: the message says why. Exit status 1."""

    exit_code = 1


# -- where the queue is -----------------------------------------------------------


class _Local:
    """The queue's store, opened by this process (a file every process shares)."""

    def __init__(self) -> None:
        self.queue = current_queue._get_current_object()  # type: ignore[attr-defined]
        self.where = self.queue.description

    def _do(self, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except QueueError as exc:
            raise Refused(str(exc)) from None

    def stats(self) -> dict[str, Any]:
        return self._do(lambda: self.queue.stats(recent=5).to_dict())

    def submit(self, kind: str, params: dict[str, str], count: int, delay: float | None,
               key: str | None) -> dict[str, Any]:
        def submit() -> dict[str, Any]:
            task_kind = self.queue.registry.get(kind)
            checked = task_kind.check_params(params)
            number = Int(1, current_app.config["QUEUE_MAX_BATCH"]).parse("count", count)
            if key is not None:
                if number != 1:
                    raise InvalidParam("count", "must be 1 with a key: a key names one task")
                done = self.queue.enqueue(kind, checked, key=check_key(key), delay=delay)
                return {"ids": [done.id], "created": done.created}
            return {"ids": self.queue.submit_many(kind, number, checked, delay=delay),
                    "created": True}

        return self._do(submit)

    def pause(self) -> None:
        self._do(self.queue.pause)

    def resume(self) -> None:
        self._do(self.queue.resume)

    def set_workers(self, count: int) -> int:
        top = current_app.config["QUEUE_MAX_WORKERS"]
        return self._do(lambda: self.queue.set_workers(Int(1, top).parse("count", count)))

    def cancel(self, task_id: str) -> str:
        def cancel() -> str:
            return self.queue.cancel(_task_id(task_id)).value

        return self._do(cancel)

    def stop(self, task_id: str) -> None:
        self._do(lambda: self.queue.force_stop(_task_id(task_id)))

    def retry(self, task_id: str) -> dict[str, Any]:
        def retry() -> dict[str, Any]:
            done = self.queue.retry(_task_id(task_id))
            return {"id": done.id, "created": done.created}

        return self._do(retry)

    def clear(self) -> int:
        return self._do(self.queue.clear_history)

    # -- the operator's view: the API's checks and answers, on the store itself --------

    def _filter(self, search: Search) -> TaskFilter:
        if search.kind:
            self.queue.registry.get(search.kind)  # unknown: the API's words
        if search.text and len(search.text) > MAX_SEARCH_TEXT:
            raise InvalidParam("text", f"must be at most {MAX_SEARCH_TEXT} characters, got "
                               f"{len(search.text)}")
        query = TaskFilter(frozenset(State(s) for s in search.states), search.kind or None,
                           search.text or None)
        self.queue.capabilities.check_filter(query, self.queue.description)
        return query

    def find(self, search: Search, oldest: bool, limit: int, cursor: str | None,
             action: str | None = None) -> dict[str, Any]:
        def find() -> dict[str, Any]:
            query = self._filter(search)
            if action is not None:
                query = query.for_action(action)
                if not query.states:
                    return {"tasks": [], "newer": None, "older": None, "count": 0}
            page = self.queue.find(query, limit=limit, cursor=cursor, oldest_first=oldest)
            return {"tasks": [t.to_dict() for t in page.tasks], "newer": page.newer,
                    "older": page.older, "count": self.queue.count(query)}

        return self._do(find)

    def bulk(self, action: str, search: Search, expected: int | None) -> dict[str, Any]:
        def bulk() -> dict[str, Any]:
            query = self._filter(search)
            target = query.for_action(action)
            count = self.queue.count(target) if target.states else 0
            if expected is not None and count > expected:
                raise Refused(f"the filter now matches {count} tasks to {action}, not the "
                              f"{expected} confirmed: nothing was done")
            if action == "retry" and count:
                snap = self.queue.stats(0)  # done whole or not at all
                if count > snap.max_queued - snap.queued:
                    raise QueueFull(snap.queued, snap.max_queued, count)
            return self.queue.bulk(action, query).to_dict()

        return self._do(bulk)

    def kinds(self) -> list[dict[str, Any]]:
        if not self.queue.capabilities.kind_health:
            raise Refused(f"each kind's health is not available with this backend (the "
                          f"queue {self.where})")
        return self._do(lambda: [k.to_dict() for k in self.queue.kind_health()])


class _Remote:
    """A running server, through its JSON API."""

    def __init__(self, server: str, token: str | None) -> None:
        parsed = urllib.parse.urlsplit(server)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise click.BadParameter(f"must be a URL like http://127.0.0.1:5000, got "
                                     f"{server!r}", param_hint="--server")
        self.base = server.rstrip("/")
        self.token = token
        self.where = f"served by {self.base}"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(f"{self.base}{path}", method=method)
        request.add_header("Accept", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, data, timeout=HTTP_TIMEOUT) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise Refused(_api_error(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Refused(f"cannot reach {self.base}: {reason}") from None
        except ValueError:
            raise Refused(f"{self.base}{path} did not answer JSON: is it the dashboard?") \
                from None

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/api/stats")

    def submit(self, kind: str, params: dict[str, str], count: int, delay: float | None,
               key: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": kind, "count": count, "params": params}
        if delay is not None:
            body["delay"] = delay
        if key is not None:
            body["key"] = key
        answer = self._call("POST", "/api/tasks", body)
        return {"ids": answer["ids"], "created": answer.get("created", True)}

    def pause(self) -> None:
        self._call("POST", "/api/pause", {})

    def resume(self) -> None:
        self._call("POST", "/api/resume", {})

    def set_workers(self, count: int) -> int:
        return self._call("POST", "/api/workers", {"count": count})["workers"]

    def cancel(self, task_id: str) -> str:
        answer = self._call("POST", f"/api/tasks/{urllib.parse.quote(task_id)}/cancel", {})
        return answer.get("state", "cancelled") if isinstance(answer, dict) else "cancelled"

    def stop(self, task_id: str) -> None:
        self._call("POST", f"/api/tasks/{urllib.parse.quote(task_id)}/stop", {})

    def retry(self, task_id: str) -> dict[str, Any]:
        answer = self._call("POST", f"/api/tasks/{urllib.parse.quote(task_id)}/retry", {})
        return {"id": answer["id"], "created": answer["created"]}

    def clear(self) -> int:
        return self._call("POST", "/api/history/clear", {})["forgotten"]

    def find(self, search: Search, oldest: bool, limit: int, cursor: str | None,
             action: str | None = None) -> dict[str, Any]:
        params: list[tuple[str, Any]] = [("state", s) for s in search.states]
        for name, value in (("kind", search.kind), ("text", search.text),
                            ("order", "oldest" if oldest else None), ("limit", limit),
                            ("cursor", cursor), ("action", action)):
            if value:
                params.append((name, value))
        return self._call("GET", f"/api/tasks?{urllib.parse.urlencode(params)}")

    def bulk(self, action: str, search: Search, expected: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {"action": action, "state": list(search.states),
                                "kind": search.kind, "text": search.text}
        if expected is not None:
            body["expected"] = expected
        return self._call("POST", "/api/tasks/bulk", body)

    def kinds(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/kinds")["kinds"]


def _api_error(exc: urllib.error.HTTPError) -> str:
    """The API's own message for a refusal, else the status."""
    try:
        message = json.loads(exc.read()).get("error")
    except (ValueError, AttributeError, OSError):
        message = None
    if exc.code == 401 and not message:
        message = "the server asks for the access token: give --token"
    return message or f"the server answered {exc.code} {exc.reason}"


def _task_id(text: str) -> str:
    return text.strip().lstrip("#")


def _target(server: str | None, token: str | None) -> _Local | _Remote:
    if server:
        return _Remote(server, token if token is not None
                       else current_app.config.get("QUEUE_ACCESS_TOKEN") or None)
    local = _Local()
    if not local.queue.capabilities.shared:
        raise Refused(f"the queue lives {local.queue.description}, out of this command's "
                      "reach: give --server URL (the running server), or use a shared store "
                      "(QUEUE_URL=sqlite:///queue.db)")
    return local


def _reach(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--server`` and ``--token``: act through a running server instead of the store."""
    command = click.option(
        "--token", metavar="SECRET", envvar="FLASK_QUEUE_ACCESS_TOKEN", show_envvar=True,
        help="The server's QUEUE_ACCESS_TOKEN (default: the app's).")(command)
    return click.option(
        "--server", metavar="URL", envvar="FLASK_QUEUE_SERVER", show_envvar=True,
        help="Act through this running server's JSON API, e.g. http://127.0.0.1:5000 "
             "(needed with the in-memory store).")(command)


class Search(NamedTuple):
    """The filter a command was given: the same as the list page's and the API's."""

    states: tuple[str, ...] = ()
    kind: str | None = None
    text: str | None = None

    def words(self) -> str:
        """The filter in words: "failed, of kind flaky, matching 'timeout'"."""
        parts = [" or ".join(self.states)] if self.states else []
        if self.kind:
            parts.append(f"of kind {self.kind}")
        if self.text:
            parts.append(f"matching {self.text!r}")
        return ", ".join(parts) or "every task"


def _search(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--state`` (repeat for more), ``--kind``, ``--text``: which tasks."""
    command = click.option("--text", default=None, metavar="TEXT",
                           help="Only tasks with this text in their params or error (any "
                                "case).")(command)
    command = click.option("--kind", default=None, metavar="KIND",
                           help="Only tasks of this kind.")(command)
    return click.option("--state", "states", multiple=True,
                        type=click.Choice([s.value for s in State]),
                        help="Only tasks in this state (repeat for several; none: any)."
                        )(command)


# -- reading ------------------------------------------------------------------------


@queue_cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the stats as JSON, for scripts.")
@_reach
def status(as_json: bool, server: str | None, token: str | None) -> None:
    """Counts, rates, workers and whether the queue is paused."""
    target = _target(server, token)
    stats = target.stats()
    if as_json:
        click.echo(json.dumps(stats, indent=2, sort_keys=True))
        return
    for line in status_lines(stats, target.where):
        click.echo(line)


def status_lines(stats: dict[str, Any], where: str) -> list[str]:
    """``status`` as lines of text."""
    workers = stats.get("workers", [])
    states: dict[str, int] = {}
    for worker in workers:
        states[worker["state"]] = states.get(worker["state"], 0) + 1
    pids = sorted({w.get("pid") for w in workers if w.get("pid")})
    by_state = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    eta = stats.get("eta")
    lines = [
        f"queue {where}{'  (PAUSED)' if stats.get('paused') else ''}",
        f"  queued {stats['queued']}   scheduled {stats.get('scheduled', 0)}   "
        f"running {stats['running']}",
        f"  done {stats['done']}   failed {stats['failed']}   cancelled {stats['cancelled']}"
        f"   submitted {stats.get('submitted', 0)}",
        f"  workers {len(workers)}{': ' + by_state if by_state else ''}"
        f"{f' in {len(pids)} process(es)' if len(pids) > 1 else ''}",
        f"  {stats.get('throughput', 0):.0f} done/min   mean wait {_secs(stats.get('mean_wait'))}"
        f"   mean run {_secs(stats.get('mean_run'))}   "
        f"{'empty now' if eta == 0 else 'not moving' if eta is None else f'empty in ~{_secs(eta)}'}",
    ]
    return lines


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    minutes, seconds = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


@queue_cli.command("wait")
@click.option("--timeout", type=click.FloatRange(0), default=None, metavar="SECONDS",
              help="Give up after this long (exit status 1). Default: wait for ever.")
@_reach
def wait(timeout: float | None, server: str | None, token: str | None) -> None:
    """Block until nothing is queued or running (exit status 0), or the timeout (1)."""
    target = _target(server, token)
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 0.05
    while True:
        stats = target.stats()
        if not stats["queued"] and not stats["running"]:
            click.echo(f"idle: nothing queued or running ({stats['done']} done, "
                       f"{stats['failed']} failed)")
            return
        if deadline is not None and time.monotonic() >= deadline:
            raise Refused(f"still {stats['queued']} queued and {stats['running']} running "
                          f"after {timeout:g}s")
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        time.sleep(pause if left is None else min(pause, left))
        pause = min(0.5, pause * 1.5)


# -- acting -------------------------------------------------------------------------


def _param(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
           ) -> dict[str, str]:
    params: dict[str, str] = {}
    for value in values:
        name, equals, text = value.partition("=")
        if not equals or not name.strip():
            raise click.BadParameter(f"must be NAME=VALUE, got {value!r}")
        params[name.strip()] = text
    return params


@queue_cli.command("submit")
@click.argument("kind")
@click.option("--param", "-p", "params", multiple=True, callback=_param, metavar="NAME=VALUE",
              help="A task parameter (repeat for more), checked as a form's field is.")
@click.option("--count", "-n", default=1, show_default=True, type=int,
              help="How many tasks (1..QUEUE_MAX_BATCH).")
@click.option("--delay", type=float, default=None, metavar="SECONDS",
              help="Schedule them this many seconds from now (at most 30 days).")
@click.option("--key", default=None, help="A unique key: while a task with it is scheduled, "
              "queued or running, that task is the answer and nothing is queued.")
@_reach
def submit(kind: str, params: dict[str, str], count: int, delay: float | None,
           key: str | None, server: str | None, token: str | None) -> None:
    """Add COUNT tasks of KIND, as the dashboard's form and the JSON API do."""
    answer = _target(server, token).submit(kind, params, count, delay, key)
    ids = answer["ids"]
    if not answer["created"]:
        click.echo(f"nothing queued: task #{ids[0]} holds the key {key!r}")
        return
    what = "scheduled" if delay else "queued"
    shown = ", ".join(f"#{i}" for i in ids) if len(ids) <= 5 else f"#{ids[0]} … #{ids[-1]}"
    click.echo(f"{what} {len(ids)} task(s) of {kind}: {shown}"
               f"{f', due in {delay:g}s' if delay else ''}")


@queue_cli.command("pause")
@_reach
def pause(server: str | None, token: str | None) -> None:
    """Workers finish the task they run and take no new one until ``resume``."""
    target = _target(server, token)
    target.pause()
    click.echo(f"paused: the queue {target.where} takes no new task until resumed")


@queue_cli.command("resume")
@_reach
def resume(server: str | None, token: str | None) -> None:
    """Workers take tasks again."""
    target = _target(server, token)
    target.resume()
    click.echo("resumed")


@queue_cli.command("workers")
@click.argument("count", type=int)
@_reach
def workers(count: int, server: str | None, token: str | None) -> None:
    """Run COUNT worker threads (in every process sharing the store)."""
    target = _target(server, token)
    now = target.set_workers(count)
    click.echo(f"workers: {now} per process")


@queue_cli.command("cancel")
@click.argument("task_id", metavar="ID")
@_reach
def cancel(task_id: str, server: str | None, token: str | None) -> None:
    """Cancel a scheduled or queued task, or ask a running one to stop."""
    state = _target(server, token).cancel(task_id)
    if state == "running":
        click.echo(f"task {_task_id(task_id)}: asked to stop (it sees ctx.cancelled)")
    else:
        click.echo(f"task {_task_id(task_id)}: {state}")


@queue_cli.command("stop")
@click.argument("task_id", metavar="ID")
@_reach
def stop(task_id: str, server: str | None, token: str | None) -> None:
    """Stop a running task now, killing the process that runs it (RQ, forking workers)."""
    _target(server, token).stop(task_id)
    click.echo(f"task {_task_id(task_id)}: stopping (it ends cancelled)")


@queue_cli.command("retry")
@click.argument("task_id", metavar="ID")
@_reach
def retry(task_id: str, server: str | None, token: str | None) -> None:
    """Queue a failed or cancelled task again, as a new task linked to it."""
    answer = _target(server, token).retry(task_id)
    if answer["created"]:
        click.echo(f"task {_task_id(task_id)}: retried as #{answer['id']}")
    else:
        click.echo(f"task {_task_id(task_id)}: retried already, as #{answer['id']}; nothing "
                   "queued")


@queue_cli.command("clear")
@_reach
def clear(server: str | None, token: str | None) -> None:
    """Forget the finished tasks (the counters keep their totals)."""
    forgotten = _target(server, token).clear()
    click.echo(f"forgot {forgotten} finished task(s)")


# -- the operator's view ---------------------------------------------------------------


@queue_cli.command("find")
@_search
@click.option("--oldest", is_flag=True, help="Oldest first (default: newest first).")
@click.option("--limit", "-n", type=click.IntRange(1, 500), default=20, show_default=True,
              help="Tasks per page.")
@click.option("--cursor", default=None, metavar="CURSOR",
              help="Start from a page's cursor (what the last line gives for the next).")
@click.option("--json", "as_json", is_flag=True, help="Print the API's answer, for scripts.")
@_reach
def find(states: tuple[str, ...], kind: str | None, text: str | None, oldest: bool,
         limit: int, cursor: str | None, as_json: bool, server: str | None,
         token: str | None) -> None:
    """List the tasks that match a filter, a page at a time (every task the queue holds:
    the dashboard's "Find tasks")."""
    search = Search(states, kind, text)
    answer = _target(server, token).find(search, oldest, limit, cursor)
    if as_json:
        click.echo(json.dumps(answer, indent=2, sort_keys=True))
        return
    for line in find_lines(answer, search, oldest):
        click.echo(line)


def find_lines(answer: dict[str, Any], search: Search, oldest: bool = False) -> list[str]:
    """``find`` as lines: a task per line, then how many match and the next page's cursor."""
    lines = []
    for task in answer["tasks"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(task["enqueued_at"]))
        error = f"  {_cut(task['error'], 80)}" if task.get("error") else ""
        retried = f"  retried as #{task['retried_as']}" if task.get("retried_as") else ""
        lines.append(f"#{task['id']:<8} {task['kind']:<12} {task['state']:<9} {when}"
                     f"{retried}{error}")
    shown, count = len(answer["tasks"]), answer["count"]
    lines.append(f"{shown} of {count} shown ({search.words()}, "
                 f"{'oldest' if oldest else 'newest'} first)" if count else
                 f"no task matches ({search.words()})")
    if answer.get("older"):
        lines.append(f"more: --cursor {answer['older']}")
    return lines


def _cut(text: str, limit: int) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit and line == text.strip() else line[:limit] + "…"


@queue_cli.command("bulk")
@click.argument("action", type=click.Choice(list(BULK_ACTIONS)))
@_search
@click.option("--yes", "-y", is_flag=True, help="Do it without asking.")
@_reach
def bulk(action: str, states: tuple[str, ...], kind: str | None, text: str | None, yes: bool,
         server: str | None, token: str | None) -> None:
    """Retry (failed or cancelled, not retried yet), cancel (scheduled or queued) or purge
    (finished) every task that matches the filter. Without --yes it says how many and
    asks first; more matching by the time it acts: nothing is done."""
    target = _target(server, token)
    search = Search(states, kind, text)
    count = target.find(search, False, 1, None, action=action)["count"]
    if not count:
        click.echo(f"no task to {action} ({search.words()})")
        return
    if not yes and not click.confirm(bulk_question(action, search, count, target.where),
                                     default=False):
        raise Refused("nothing done")
    result = target.bulk(action, search, count)
    click.echo(result["line"])


def bulk_question(action: str, search: Search, count: int, where: str) -> str:
    """"Retry 312 failed tasks of kind flaky matching 'timeout' (the queue ...)?": the
    page's confirmation, in the same words."""
    acts_on = TaskFilter(frozenset(State(s) for s in search.states)).for_action(action).states
    states = ("finished" if acts_on == FINISHED_STATES else
              " or ".join(s.value for s in (State.FAILED, State.CANCELLED, State.QUEUED,
                                            State.SCHEDULED, State.DONE) if s in acts_on))
    words = [action.capitalize(), str(count), states, "task" if count == 1 else "tasks"]
    if search.kind:
        words.append(f"of kind {search.kind}")
    if search.text:
        words.append(f"matching {search.text!r}")
    return f"{' '.join(words)} (the queue {where})?"


@queue_cli.command("kinds")
@click.option("--json", "as_json", is_flag=True, help="Print the API's answer, for scripts.")
@_reach
def kinds(as_json: bool, server: str | None, token: str | None) -> None:
    """Each kind's health: queued and running now, done and failed in the last hour,
    the failure rate, run time (p50, p95) and wait (p95)."""
    answer = _target(server, token).kinds()
    if as_json:
        click.echo(json.dumps({"kinds": answer}, indent=2, sort_keys=True))
        return
    for line in kinds_lines(answer):
        click.echo(line)


def kinds_lines(kinds: list[dict[str, Any]]) -> list[str]:
    """``kinds`` as a table: a kind per line."""
    lines = [f"{'kind':<14} {'queued':>7} {'running':>7} {'done/h':>7} {'failed/h':>8} "
             f"{'fail%':>6} {'run p50':>8} {'run p95':>8} {'wait p95':>8}"]
    for kind in kinds:
        rate = kind.get("failure_rate")
        lines.append(
            f"{kind['kind']:<14} {kind['queued']:>7} {kind['running']:>7} {kind['done']:>7} "
            f"{kind['failed']:>8} {'-' if rate is None else f'{rate:.0%}':>6} "
            f"{_brief(kind.get('run_p50')):>8} {_brief(kind.get('run_p95')):>8} "
            f"{_brief(kind.get('wait_p95')):>8}")
    return lines


def _brief(value: float | None) -> str:
    """A duration that may be a few milliseconds: 5ms, 250ms, 2.5s, 3m05s."""
    if value is not None and value < 1:
        return f"{value * 1000:.0f}ms"
    return _secs(value)


# -- a process that only works --------------------------------------------------------


@queue_cli.command("worker")
@click.option("--workers", "-w", "count", type=click.IntRange(1, 64), default=None,
              help="Worker threads to start with (default QUEUE_WORKERS). The shared count, "
                   "once set from the page or `flask queue workers`, is followed as every "
                   "process follows it.")
@click.option("--no-fork", is_flag=True,
              help="RQ backend: run each job in this process instead of a forked work "
                   "horse (faster; but a task that crashes takes the worker down, and a "
                   "running job cannot be stopped by force).")
@click.option("--burst", is_flag=True,
              help="RQ backend: quit once the queue is empty.")
def worker(count: int | None, no_fork: bool, burst: bool) -> None:
    """Run worker threads and nothing else, until SIGTERM or Ctrl+C.

    For a shared store: the web processes can then run none
    (QUEUE_RUN_WORKERS=false). On SIGTERM the running tasks finish (up to
    QUEUE_SHUTDOWN_TIMEOUT) and the queued ones stay in the store.

    With QUEUE_URL=redis://...: an RQ worker for this app's queue (one per
    process; run more processes for more). Each job runs in the app's
    context. SIGTERM lets the running job finish (RQ's warm shutdown).
    """
    queue = current_queue._get_current_object()  # type: ignore[attr-defined]
    if hasattr(queue, "worker") and hasattr(queue, "rq_queue"):  # the RQ backend
        if count not in (None, 1):
            raise Refused("an RQ worker process runs one job at a time: start more "
                          "`flask queue worker` processes for more")
        from flask import current_app

        rq_worker = queue.worker(current_app._get_current_object(),  # type: ignore[attr-defined]
                                 fork=not no_fork)
        click.echo(f"worker {rq_worker.name}: RQ worker for queue {queue.name!r}, the queue "
                   f"{queue.description}; SIGTERM or Ctrl+C stops it")
        rq_worker.work(burst=burst, with_scheduler=True, logging_level="INFO")
        return
    if not queue.capabilities.shared:
        raise Refused(f"the queue lives {queue.description}: a worker process would see "
                      "none of its tasks. Use a shared store (QUEUE_URL=sqlite:///queue.db)")
    queue.run_workers = True
    if count is not None:
        queue.workers = min(count, queue.max_workers)
    install_signal_handlers(force=True)  # SIGTERM closes the queue, then exits cleanly
    queue.start()
    click.echo(f"worker process {os.getpid()}: {queue.workers} worker thread(s), the queue "
               f"{queue.description}; SIGTERM or Ctrl+C stops it")
    idle = threading.Event()
    try:
        while not queue.closed:
            idle.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        queue.shutdown()
        click.echo(f"worker process {os.getpid()}: stopped")


# -- watching ------------------------------------------------------------------------


@queue_cli.command("watch")
@click.option("--interval", type=click.FloatRange(0.1, 60), default=0.5, show_default=True,
              metavar="SECONDS", help="How often to look.")
@click.option("--count", "times", type=click.IntRange(1), default=None,
              help="Stop after this many looks (default: until Ctrl+C).")
@_reach
def watch(interval: float, times: int | None, server: str | None, token: str | None) -> None:
    """The queue burning down, live: depth, a bar per running task, the last finished.

    In a terminal the view is redrawn in place until Ctrl+C; piped, it prints a
    line whenever the counts change.
    """
    target = _target(server, token)
    terminal = sys.stdout.isatty()
    last = None
    looks = 0
    peak = 1  # the depth bar is out of the deepest the queue was while watched
    try:
        while times is None or looks < times:
            stats = target.stats()
            looks += 1
            peak = max(peak, stats["queued"])
            if terminal:
                width = shutil.get_terminal_size((80, 24)).columns
                lines = watch_lines(stats, target.where, width, peak)
                # Home, each line cleared to its end, then what is left below cleared.
                click.echo("\x1b[H" + "".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J",
                           nl=False)
            else:
                line = watch_line(stats)
                if line != last:
                    click.echo(f"{time.strftime('%H:%M:%S')} {line}")
                    last = line
            if times is None or looks < times:
                time.sleep(interval)
    except KeyboardInterrupt:
        pass


def watch_line(stats: dict[str, Any]) -> str:
    """One line of counts: what ``watch`` prints when stdout is not a terminal."""
    return (f"queued={stats['queued']} scheduled={stats.get('scheduled', 0)} "
            f"running={stats['running']} done={stats['done']} failed={stats['failed']} "
            f"cancelled={stats['cancelled']}{' paused' if stats.get('paused') else ''}")


def watch_lines(stats: dict[str, Any], where: str, width: int = 80, peak: int = 1
                ) -> list[str]:
    """The terminal view: the counts, the depth as a bar (out of ``peak``), a bar per
    running task, and the last finished tasks."""
    width = max(40, width)
    queued = stats["queued"]
    depth_bar = _bar(queued / max(peak, queued, 1), width - 22)
    lines = [
        f"queue {where}"[:width],
        watch_line(stats)[:width],
        f"depth {queued:>6} {depth_bar}",
        "",
    ]
    running = [w for w in stats.get("workers", []) if w.get("task")]
    for worker_info in running:
        task = worker_info["task"]
        label = f"#{task['id']} {task['kind']}"[:20]
        lines.append(f"{label:<20} {_bar(task.get('progress') or 0.0, width - 28)} "
                     f"{int((task.get('progress') or 0) * 100):>3}%")
    if not running:
        lines.append("no task running")
    lines.append("")
    for task in stats.get("recent", [])[:5]:
        error = f"  {task['error']}" if task.get("error") else ""
        lines.append(f"{task['state']:<9} #{task['id']} {task['kind']}{error}"[:width])
    return lines


def _bar(fraction: float, width: int) -> str:
    width = max(10, width)
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"
