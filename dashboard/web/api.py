"""The JSON API (``/api/...``) and ``/healthz``: what scripts and load balancers use.

Errors are JSON ``{"error": "..."}`` with the refusal's own status.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

from flask import Response, current_app, jsonify, make_response, request

from ..backend import TaskId
from ..errors import QueueError, StoreUnavailable
from ..ext import current_queue
from ..records import Retried, Submitted, TaskFilter, TaskInfo
from ..tasks import Int
from . import security
from .actions import bulk, retry, run_schedule, set_workers, submit, submit_keyed
from .answers import (TASK_ID_RULE, default_kind, error_status, json_error, parse_task_id,
                      printable_id, read_task_id)
from .blueprint import bp
from .live import RECENT
from .search import BULK_FIELDS, acted_on, check_search, read_action, read_filter, read_view


API_TASK_KEYS = frozenset({"kind", "count", "params", "key", "delay", "time_limit"})

#: How deeply a JSON body may nest lists and objects. Ours need two levels (the
#: body and its ``params``); a deeper body is refused before anything reads it,
#: since what reads it (and what quotes it in an error) recurses.
MAX_JSON_DEPTH = 10


def _json_body(allowed: frozenset[str]) -> dict[str, Any] | Response:
    """The request's JSON object, or a 4xx answer saying what is wrong with the body."""
    if not request.is_json:
        return json_error("send a JSON object with Content-Type: application/json", 415)
    # Parsed here rather than by request.get_json(silent=True): that lets a
    # RecursionError through (a 500), and answers every other fault with None.
    try:
        data = current_app.json.loads(request.get_data())
    except RecursionError:
        return json_error(_TOO_DEEP, 400)
    except json.JSONDecodeError as exc:
        return json_error(f"body must be a JSON object; it is not valid JSON: {exc}", 400)
    except UnicodeDecodeError:
        return json_error("body must be a JSON object in UTF-8; it is not UTF-8", 400)
    except ValueError:  # an integer of more digits than int() takes
        return json_error("body must be a JSON object; a number in it has more than "
                           f"{sys.get_int_max_str_digits()} digits", 400)
    if _nests_deeper(data, MAX_JSON_DEPTH):
        return json_error(_TOO_DEEP, 400)
    if not isinstance(data, dict):
        example = ", ".join(f'"{k}": ...' for k in sorted(allowed))
        return json_error(f"body must be a JSON object like {{{example}}}", 400)
    unknown = sorted(set(data) - allowed)
    if unknown:
        return json_error(
            f"unknown field(s): {', '.join(map(str, unknown))}; allowed: "
            f"{', '.join(sorted(allowed))}",
            400,
        )
    return data

_TOO_DEEP = f"body nests too deeply: at most {MAX_JSON_DEPTH} levels of lists and objects"


def _nests_deeper(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists and objects more than ``limit`` deep (no recursion)."""
    if not isinstance(value, (dict, list)):
        return False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, (dict, list)))
    return False


def _json_action(action: Callable[[], Any], ok: Callable[[Any], Response]) -> Response:
    try:
        result = action()
    except QueueError as exc:
        status, headers = error_status(exc)
        return json_error(str(exc), status, headers)
    return ok(result)


@bp.get("/api/stats")
def api_stats() -> Response:
    """The queue in one read: ``queued``, ``scheduled``, ``running``, ``done``,
    ``failed``, ``cancelled``, ``paused``, ``workers`` (``name``, ``state``, ``task``),
    ``pid`` and more. ``304`` when ``If-None-Match`` holds the current tag."""
    snap = current_queue.stats(RECENT)
    if snap.tag in request.if_none_match:
        return make_response("", 304)
    data = snap.to_dict()
    data["workers_target"] = current_queue.workers
    response = jsonify(data)
    response.set_etag(snap.tag)
    return response


@bp.post("/api/tasks")
def api_add_tasks() -> Response:
    """``{"kind": ..., "count": n, "params": {...}}`` → 202 with the new ids. With
    ``"key"``: 202 ``{"ids": [id], "count": 1, "created": true}`` when it queued the
    task, 200 ``{"ids": [id], "count": 0, "created": false}`` when a task with the
    key was queued or running already (``id`` is that task)."""
    data = _json_body(API_TASK_KEYS)
    if isinstance(data, Response):
        return data

    def ok(ids: list[TaskId]) -> Response:
        response = jsonify(ids=ids, count=len(ids))
        response.status_code = 202
        return response

    if data.get("key") is not None:
        def keyed(done: Submitted) -> Response:
            response = jsonify(ids=[done.id], count=int(done.created), created=done.created)
            response.status_code = 202 if done.created else 200
            return response

        return _json_action(lambda: submit_keyed(data.get("kind", default_kind()),
                                                 data.get("count", 1), data.get("params", {}),
                                                 data["key"], data.get("delay"),
                                                 data.get("time_limit")), keyed)

    return _json_action(
        lambda: submit(
            data.get("kind", default_kind()),
            data.get("count", 1),
            data.get("params", {}),
            data.get("delay"),
            data.get("time_limit"),
        ),
        ok,
    )


def _task_dict(info: TaskInfo, can_act: bool) -> dict[str, Any]:
    data = info.to_dict()
    if not can_act:  # QUEUE_PUBLIC_READ: like a traceback, for the token only
        del data["result"], data["logs"]
    return data


@bp.get("/api/tasks/<task_id>")
def api_task(task_id: str) -> Response:
    """One task as JSON; ``404`` when unknown or gone from the history."""
    if read_task_id(task_id) is None:
        return json_error(f"no task {printable_id(task_id)}: {TASK_ID_RULE}", 404)
    info = current_queue.get(task_id)
    if info is None:
        return json_error(f"no task {task_id}: unknown, or no longer in the history", 404)
    return jsonify(_task_dict(info, security.may_act()))


@bp.get("/api/tasks")
def api_find() -> Response:
    """``?state=failed&state=queued&kind=...&text=...&order=oldest&cursor=...&limit=...``
    → ``{"tasks": [...], "newer": cursor or null, "older": cursor or null, "count": n}``:
    one page of the tasks that match, newest first unless ``order=oldest``, ``limit`` per
    page (1 to 500, default 50), and how many match in all. Give a page's ``older`` (or
    ``newer``) as ``cursor`` for the next (or the one before). With ``action`` (retry,
    cancel, purge): only the tasks that bulk action would act on now. A bad or unknown
    parameter is a 400 naming it; a backend that cannot search says so (400)."""

    def find() -> Response:
        view = read_view(request.args, strict=("action",))
        check_search(view.query)
        query: TaskFilter | None = view.query
        if request.args.get("action") is not None:
            query = acted_on(view.query, read_action(request.args["action"]))
        if query is None:  # the action acts on none of the states asked for
            return jsonify(tasks=[], newer=None, older=None, count=0)
        page = current_queue.find(query, limit=view.limit, cursor=view.cursor,
                                  oldest_first=view.oldest_first)
        can_act = security.may_act()
        return jsonify(tasks=[_task_dict(t, can_act) for t in page.tasks], newer=page.newer,
                       older=page.older, count=current_queue.count(query))

    return _json_action(find, lambda response: response)


@bp.post("/api/tasks/bulk")
def api_bulk() -> Response:
    """``{"action": "retry", "state": [...], "kind": ..., "text": ...}`` → 200
    ``{"action", "count", "ids", "line"}``: every task the filter matches that the action
    applies to (retry: failed or cancelled, not retried yet; cancel: scheduled or queued;
    purge: finished). ``"expected"``: the count a person confirmed; more matching now is
    a 409 and nothing done. A retry is charged to QUEUE_SUBMIT_LIMIT as a submit of that
    many (more than it ever allows at once: 429) and needs the room in the queue (503)."""
    data = _json_body(BULK_FIELDS)
    if isinstance(data, Response):
        return data

    def act() -> Any:
        action = read_action(data.get("action"))
        query = read_filter(data)
        expected = data.get("expected")
        if expected is not None:
            expected = Int(0, 10**9).parse("expected", expected)
        result = bulk(action, query, expected)
        current_app.logger.info("bulk %s by %s (%s): %s", action,
                                security.printable(request.remote_addr or "unknown", 60),
                                security.printable(repr(query.to_dict()), 300), result.line())
        return result

    return _json_action(act, lambda result: jsonify(result.to_dict()))


@bp.get("/api/kinds")
def api_kinds() -> Response:
    """``{"kinds": [{"kind", "queued", "running", "done", "failed", "failure_rate",
    "run_p50", "run_p95", "wait_p95"}]}``: each registered kind, by name; done, failed
    and the times over the last hour. A backend that does not keep them says so (400)."""

    def kinds() -> Response:
        if not current_queue.capabilities.kind_health:
            raise QueueError(f"each kind's health is not available with this backend (the "
                             f"queue {current_queue.description})")
        return jsonify(kinds=[k.to_dict() for k in current_queue.kind_health()])

    return _json_action(kinds, lambda response: response)


@bp.post("/api/tasks/<task_id>/cancel")
def api_cancel(task_id: str) -> Response:
    """Cancel a queued or scheduled task, or ask a running one to stop; ``409``
    once it finished."""
    def cancel() -> TaskInfo | None:
        checked = parse_task_id(task_id)
        current_queue.cancel(checked)
        return current_queue.get(checked)

    return _json_action(cancel, lambda info: jsonify(info.to_dict() if info else {}))


@bp.post("/api/tasks/<task_id>/stop")
def api_stop(task_id: str) -> Response:
    """``202 {"id": ..., "stopping": true}``: a running task is being stopped by force (the
    RQ backend, on a forking worker); it ends cancelled. 400 where the backend cannot."""

    def stop() -> str:
        checked = parse_task_id(task_id)
        current_queue.force_stop(checked)
        return checked

    def ok(checked: str) -> Response:
        response = jsonify(id=checked, stopping=True)
        response.status_code = 202
        return response

    return _json_action(stop, ok)


@bp.post("/api/tasks/<task_id>/retry")
def api_retry(task_id: str) -> Response:
    """``202 {"id": new, "retry_of": old, "created": true}`` when this request queued the
    retry; ``200`` with ``"created": false`` when the task had been retried already
    (nothing queued: a second click, or a client sending again after a lost answer)."""

    def ok(answer: tuple[Retried, TaskId]) -> Response:
        retried, of = answer
        response = jsonify(id=retried.id, retry_of=of, created=retried.created)
        response.status_code = 202 if retried.created else 200
        return response

    return _json_action(lambda: retry(task_id), ok)


@bp.get("/api/schedules")
def api_schedules() -> Response:
    """``{"schedules": [...]}``: each periodic schedule, by name, with its next and
    last runs (the same objects as the ``"schedules"`` of ``/api/stats``)."""
    return jsonify(schedules=[s.to_dict() for s in current_queue.schedules()])


@bp.post("/api/schedules/<name>/run")
def api_run_schedule(name: str) -> Response:
    """Queue the schedule's task now: 202 ``{"id": task id, "schedule": name}``; an
    unknown name is a 404 that names the schedules there are."""

    def ok(task_id: TaskId) -> Response:
        response = jsonify(id=task_id, schedule=name)
        response.status_code = 202
        return response

    return _json_action(lambda: run_schedule(name), ok)


@bp.post("/api/history/clear")
def api_clear_history() -> Response:
    """Forget the finished tasks: ``{"forgotten": n}`` (the counters keep their totals)."""
    return _json_action(current_queue.clear_history, lambda n: jsonify(forgotten=n))


@bp.post("/api/pause")
def api_pause() -> Response:
    """Pause the workers: they finish what they run and take nothing new."""
    return _json_action(current_queue.pause, lambda _: jsonify(paused=True))


@bp.post("/api/resume")
def api_resume() -> Response:
    """Resume the workers after a pause."""
    return _json_action(current_queue.resume, lambda _: jsonify(paused=False))


@bp.post("/api/workers")
def api_workers() -> Response:
    """``{"count": n}`` or ``{"delta": ±n}`` (clamped) → the number of worker threads now
    asked for."""
    data = _json_body(frozenset({"count", "delta"}))
    if isinstance(data, Response):
        return data
    return _json_action(lambda: set_workers(data), lambda n: jsonify(workers=n))


@bp.get("/healthz")
def healthz() -> Response:
    """200 while this process's workers run and take work; 503 saying why when not."""
    queue = current_queue
    problem = queue.health()
    body: dict[str, Any] = {
        "status": "ok" if problem is None else ("stopping" if queue.closed else "unhealthy"),
        "pid": os.getpid(),
        "workers": queue.workers,
        "started": queue.started,
    }
    if problem is not None:
        body["reason"] = problem
    try:
        snap = queue.stats(0)
    except StoreUnavailable:
        pass
    else:
        body["alive"] = sum(1 for w in snap.workers if w.state != "stopped")
    response = jsonify(body)
    response.status_code = 200 if problem is None else 503
    return response
