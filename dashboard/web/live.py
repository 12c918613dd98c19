"""The live regions: the dashboard's polled fragments and a task's, each
answered with a 304 when the page holds the current tag, and rendered once
per state for every page that watches it (the render caches).

Views read one snapshot per request and hand templates plain data.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Response, current_app, make_response, render_template, request, url_for
from markupsafe import Markup

from ..errors import TaskNotFound
from ..ext import current_queue
from ..records import Snapshot, TaskInfo
from . import security
from .answers import (TASK_ID, default_kind, is_htmx, message_page, not_modified,
                      not_modified_response, other_queue, parse_task_id, presenting)
from .blueprint import bp
from .chart import depth_chart


#: Finished tasks the page lists.
RECENT = 20

#: Queued tasks the page lists, oldest first, each with a Cancel button.
UPCOMING = 10

#: Tasks the page's batch button adds, unless QUEUE_MAX_BATCH or QUEUE_SUBMIT_LIMIT allow fewer.
BATCH = 10

#: The live regions: each is a template ``_<name>.html`` of its own. The periodic
#: schedules come last: most pages have none, and the burn-down comes first.
REGIONS = ("counts", "controls", "chart", "workers", "scheduled", "upcoming", "history",
           "schedules")


def snapshot() -> Snapshot:
    return current_queue.stats(RECENT, UPCOMING)


class _Urls:
    """``url_for`` for one render: each endpoint is built once, task ids spliced in.

    A page lists up to 20 finished and 10 queued tasks, each with links and
    buttons to its own URLs; building each through the URL map was a fifth
    of a poll's render time.
    """

    _MARK = "TASKID0MARK"

    def __init__(self) -> None:
        self._built: dict[Any, Any] = {}

    def __call__(self, endpoint: str, **values: Any) -> str:
        task_id = values.get("task_id")
        if len(values) == 1 and (type(task_id) is int or (type(task_id) is str
                                                           and TASK_ID.fullmatch(task_id))):
            parts = self._built.get(endpoint)
            if parts is None:
                parts = url_for(endpoint, task_id=self._MARK).split(self._MARK)
                self._built[endpoint] = parts
            if len(parts) == 2:
                return f"{parts[0]}{task_id}{parts[1]}"
            return url_for(endpoint, **values)
        key = (endpoint, *sorted(values.items()))
        url = self._built.get(key)
        if url is None:
            url = self._built[key] = url_for(endpoint, **values)
        return url

#: Rendered rows kept per app (a page shows 20 finished and 10 queued tasks).
_ROWS_KEY = "dashboard.rows"

_ROWS_SIZE = 512


class _Rows:
    """``row(template, task)`` for one render: a task's row, rendered once and reused.

    The rows of the history and of the queue were most of a changed poll's
    render (20 finished and 10 queued tasks, each with links and a button),
    yet what they show of a task does not change while it sits there: a
    finished task changes only when it is retried, a queued one only by
    leaving the queue. So each row is rendered once per task, state and
    variant of the page, and a changed poll renders only what changed.
    A row template may use only ``task``, ``can_act``, ``present`` and
    ``url_for``: the key below covers those and nothing else.
    """

    def __init__(self, urls: _Urls, can_act: bool, present: bool) -> None:
        self._context = {"url_for": urls, "can_act": can_act, "present": present}
        self._variant = (can_act, present, request.script_root, request.blueprint)
        self._cache: dict[tuple[Any, ...], Markup] = current_app.extensions.setdefault(
            _ROWS_KEY, {}
        )

    def __call__(self, template: str, task: TaskInfo) -> Markup:
        key = (template, task.id, task.state, task.enqueued_at, task.finished_at,
               task.retried_as, task.due_at, self._variant)  # (a retry is due anew)
        html = self._cache.get(key)
        if html is None:
            html = Markup(
                current_app.jinja_env.get_template(template).render(task=task, **self._context)
            )
            if len(self._cache) >= _ROWS_SIZE:
                self._cache.clear()
            self._cache[key] = html
        return html


def page_data(snap: Snapshot, **extra: Any) -> dict[str, Any]:
    config = current_app.config
    queue = current_queue
    urls = _Urls()
    capabilities = queue.capabilities  # (a backend may build it anew on each read)
    can_act = security.may_act()
    present = presenting()
    return {
        "url_for": urls,
        "row": _Rows(urls, can_act, present),
        "snap": snap,
        "chart": depth_chart(snap),
        "kinds": queue.registry.kinds(),
        "default_kind": default_kind(),
        "poll_interval": config["QUEUE_POLL_INTERVAL"],
        "work_time": config["QUEUE_WORK_TIME"],
        "batch_size": _batch_size(),
        "workers_target": queue.workers,
        "max_workers": config["QUEUE_MAX_WORKERS"],
        "present": present,
        "shared_store": capabilities.shared,
        "queue_description": queue.description,
        "can_scale": capabilities.scale_workers,
        "scale_hint": capabilities.scale_hint,
        "can_delay": capabilities.delays,
        "can_schedule": capabilities.schedules,
        # Declared in code, whether or not this backend runs them (it lists none then).
        "has_schedules": queue.registry.has_schedules,
        "can_act": can_act,
        # The workers' processes: a pid, or host:pid where they run on other machines.
        "pids": sorted({f"{w.host}:{w.pid}" if w.host else w.pid for w in snap.workers},
                       key=str),
        "stall": queue.stall(snap),
        "queue_id": queue.identity,
        **extra,
    }


def _batch_size() -> int:
    """What the batch button adds: as many as one request and one client's limit allow."""
    allowance = security.submit_allowance()
    size = min(BATCH, current_app.config["QUEUE_MAX_BATCH"])
    return size if allowance is None else min(size, allowance)


def render_live(template: str, snap: Snapshot, status: int = 200, **extra: Any) -> Response:
    response = make_response(render_template(template, **page_data(snap, **extra)), status)
    response.headers["HX-PTag"] = snap.tag
    response.set_etag(snap.tag)
    return response

#: Seconds a poll's rendered regions are reused for the next polls of the same
#: state (the same tag): a changed state is rendered once for every dashboard
#: watching it, not once per dashboard. What a tag does not cover (the rates
#: over the last minute, the chart's time axis) is then at most this old;
#: a dashboard that holds the tag sees those only at the next change anyway.
LIVE_CACHE_SECONDS = 1.0

_LIVE_CACHE_KEY = "dashboard.live_cache"

_LIVE_CACHE_SIZE = 32


def _live_regions(template: str) -> Response:
    """A poll: 304 when the page holds the current tag, else the regions,
    rendered or reused from a poll of the same state less than a second ago."""
    queue = current_queue._get_current_object()  # type: ignore[attr-defined]
    if other_queue(queue.identity):
        # The page was rendered for a queue this server no longer serves (it
        # restarted with an empty in-memory queue, or onto another file): its
        # header, title and links are about that one. htmx reloads the page.
        response = current_app.response_class(status=200)
        response.headers["HX-Refresh"] = "true"
        return response
    tag = queue.tag
    if not_modified(tag):
        return not_modified_response(tag)
    if LIVE_CACHE_SECONDS <= 0:
        return render_live(template, snapshot())
    # Everything a render reads besides the snapshot, so a variant never
    # reaches a request it was not rendered for.
    key = (template, presenting(), security.may_act(), queue.workers, request.script_root,
           request.blueprint)
    cache = current_app.extensions.setdefault(_LIVE_CACHE_KEY, {})
    now = time.monotonic()
    entry = cache.get(key)
    if entry is None or entry[0] != tag or now - entry[2] >= LIVE_CACHE_SECONDS:
        snap = snapshot()
        body = render_template(template, **page_data(snap)).encode()
        if len(cache) >= _LIVE_CACHE_SIZE:
            cache.clear()
        cache[key] = entry = (snap.tag, body, now)
    response = current_app.response_class(entry[1], mimetype="text/html")
    response.headers["HX-PTag"] = entry[0]
    response.set_etag(entry[0])
    return response


@bp.get("/live")
def live() -> Response:
    """Every live region in one response: the page polls this once per tick."""
    return _live_regions("dashboard/_live.html")


@bp.get("/live/<region>")
def live_region(region: str) -> Response:
    """One live region alone, for pages that poll regions separately."""
    if region not in REGIONS:
        return Response(
            f"unknown region {region[:40]!r}; regions are: {', '.join(REGIONS)}",
            404,
            mimetype="text/plain",
        )
    return _live_regions(f"dashboard/_{region}.html")


def render_task(task_id: int | str, tag: str, info: TaskInfo | None = None) -> Response:
    """The task's region, with ``tag``: the queue's tag read *before* the task was.

    Read after, a task finishing between the two reads would leave the page
    holding the newer tag with the older content: every poll would then get
    a 304, and the page would say "running" for ever.
    """
    if info is None:
        info = current_queue.get(task_id)
    if info is None:
        return message_page(f"no task {task_id}: unknown, or no longer in the history", 404)
    response = make_response(render_template("dashboard/_task.html", **task_data(info, tag)))
    response.headers["HX-PTag"] = tag
    return response


def task_data(info: TaskInfo, tag: str) -> dict[str, Any]:
    registry = current_queue.registry
    policy = registry.get(info.kind).retry if info.kind in registry else None
    return {
        "task": info,
        "attempts_allowed": None if policy is None else policy.attempts,
        "poll_interval": current_app.config["QUEUE_POLL_INTERVAL"],
        "tag": tag,
        "present": False,
        "can_act": security.may_act(),
        "queue_id": current_queue.identity,
    }


@bp.get("/tasks/<task_id>/live")
def task_live(task_id: str) -> Response:
    """The task's detail region, polled while the task is not finished."""
    if other_queue(current_queue.identity):
        # Ids are unique only within one queue: this one may have a task of
        # that number too, and it is not the task the page is about.
        return _task_gone(task_id, 410, "the server now serves another queue (it restarted, "
                          "and the old queue is gone with its tasks)")
    tag = current_queue.tag  # before the task: see render_task
    if not_modified(tag):
        return not_modified_response(tag)
    try:
        info = current_queue.get(parse_task_id(task_id))
    except TaskNotFound:
        info = None
    if info is None:
        return _task_gone(task_id, 404, "the server no longer knows it (dropped from the "
                          "history, or the server restarted)")
    return render_task(info.id, tag, info)


def _task_gone(task_id: str, status: int, why: str) -> Response:
    """A polled task that cannot be shown any more: a region that says so and
    polls no more (it replaces the polling one). A person who opened the URL
    gets a page that says the same."""
    if not is_htmx():
        return message_page(f"no task {task_id[:40]!r}: {why}", status)
    return make_response(render_template("dashboard/_task_gone.html", task_id=task_id[:40], why=why), status)
