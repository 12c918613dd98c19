"""The dashboard blueprint: the page, its live partials, the controls and the JSON API.

Views read one snapshot per request and hand templates plain data. A poll
whose ``HX-PTag`` (or ``If-None-Match``) equals the queue's current tag gets
a 304 before anything is rendered.

Every state-changing form answers an htmx request with the live regions
(the click shows at once) and a plain post with a 303 back to the page it
came from, so the page works without JavaScript: a refused plain post too,
the reason signed into that page's address (see :mod:`dashboard.notices`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    jsonify,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from markupsafe import Markup

from . import notices, security
from .chart import depth_chart
from .ext import EXTENSION_KEY, current_queue
from .records import Snapshot, State, TaskInfo
from .errors import InvalidParam, QueueError, QueueFull, StoreUnavailable, TaskNotFound
from .tasks import Int, TaskKind

_HERE = os.path.dirname(os.path.abspath(__file__))


def _folder(name: str) -> str:
    """``name`` inside the package (an installed wheel), else beside it (a checkout)."""
    inside = os.path.join(_HERE, name)
    return inside if os.path.isdir(inside) else os.path.join(os.path.dirname(_HERE), name)


bp = Blueprint(
    "dashboard",
    __name__,
    template_folder=_folder("templates"),
    static_folder=_folder("static"),
    static_url_path="/static",
)

#: Finished tasks the page lists.
RECENT = 20
#: Queued tasks the page lists, oldest first, each with a Cancel button.
UPCOMING = 10
#: Tasks the page's batch button adds, unless QUEUE_MAX_BATCH or QUEUE_SUBMIT_LIMIT allow fewer.
BATCH = 10

#: The live regions: each is a template ``_<name>.html`` of its own.
REGIONS = ("counts", "controls", "chart", "workers", "upcoming", "history")

API_TASK_KEYS = frozenset({"kind", "count", "params"})

#: How deeply a JSON body may nest lists and objects. Ours need two levels (the
#: body and its ``params``); a deeper body is refused before anything reads it,
#: since what reads it (and what quotes it in an error) recurses.
MAX_JSON_DEPTH = 10


@bp.record_once
def _set_up(state: Any) -> None:
    """The dashboard's own submit limiter, made when the blueprint is mounted: an
    app that uses the queue without the dashboard gets none of it."""
    security.init_app(state.app)


@bp.before_request
def _guard() -> Response | None:
    """A Host we are not served as gets 400, a cross-site request 403, and one
    without the secret (if one is set) 401."""
    _check_exposure()
    reason = security.host_refusal()
    if reason is not None:
        return _refuse(reason, 400)
    reason = security.cross_site_reason()
    if reason is not None:
        return _refuse(reason, 403)
    refusal = security.access_refusal()
    if refusal is None and request.method in security.UNSAFE_METHODS:
        # Read the body now: one over MAX_CONTENT_LENGTH is refused (413) before
        # any action runs, not after it (a view reads the form only at its end).
        request.get_data(cache=True, parse_form_data=True)
    return refusal


def _refuse(reason: str, status: int) -> Response:
    """Log a refusal (what came from the request escaped) and answer it, as JSON to the API."""
    current_app.logger.warning("%s %s: %s", request.method, security.printable(request.path),
                               reason)
    if security.is_api_request():
        return _json_error(reason, status)
    return Response(reason, status, mimetype="text/plain")


def _check_exposure() -> None:
    """security.first_request_check once per app, address and secret, not per request:
    it parses the address each time, a few percent of answering a poll."""
    address = security.served_address(request.environ)
    key = (address, current_app.config["QUEUE_ACCESS_TOKEN"])
    checked = current_app.extensions.setdefault("dashboard.exposure_checked", set())
    if key not in checked:
        security.first_request_check(address)
        # A few addresses per process; SERVER_NAME, the fallback where the server
        # names no socket, may come from the Host header: stay bounded.
        if len(checked) >= 64:
            checked.clear()
        checked.add(key)


@bp.after_request
def _headers(response: Response) -> Response:
    # What security.add_security_headers and response.vary.add do, in one pass
    # over the headers: every poll comes through here, and each missed lookup
    # of werkzeug's Headers raises and catches an exception.
    headers = response.headers
    present = {name.lower() for name, _ in headers}
    for name, value in security.SECURITY_HEADERS.items():
        if name.lower() not in present:
            headers.add(name, value)
    if request.endpoint != "dashboard.static":
        headers["Cache-Control"] = "no-store"
        if "vary" in present:
            response.vary.add("HX-Request")
        else:
            headers.add("Vary", "HX-Request")
    return response


def _is_htmx() -> bool:
    return request.headers.get("HX-Request") == "true"


def _presenting() -> bool:
    """Presenter mode: ``?present=1`` on a page, or ``present=1`` in a form."""
    # request.values would build a combined dict for one lookup, and
    # request.args parses an empty query string into a dict of its own.
    value = request.args.get("present") if request.query_string else None
    if value is None and request.method != "GET":
        value = request.form.get("present")
    return bool(value) and value.lower() in ("1", "true", "on", "yes")


def _snapshot() -> Snapshot:
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
        if len(values) == 1 and type(task_id) is int:
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
               task.retried_as, self._variant)
        html = self._cache.get(key)
        if html is None:
            html = Markup(
                current_app.jinja_env.get_template(template).render(task=task, **self._context)
            )
            if len(self._cache) >= _ROWS_SIZE:
                self._cache.clear()
            self._cache[key] = html
        return html


def _page_data(snap: Snapshot, **extra: Any) -> dict[str, Any]:
    config = current_app.config
    queue = current_queue
    urls = _Urls()
    can_act = security.may_act()
    present = _presenting()
    return {
        "url_for": urls,
        "row": _Rows(urls, can_act, present),
        "snap": snap,
        "chart": depth_chart(snap),
        "kinds": queue.registry.kinds(),
        "default_kind": _default_kind(),
        "poll_interval": config["QUEUE_POLL_INTERVAL"],
        "work_time": config["QUEUE_WORK_TIME"],
        "batch_size": _batch_size(),
        "workers_target": queue.workers,
        "max_workers": config["QUEUE_MAX_WORKERS"],
        "present": present,
        "shared_store": queue.capabilities.shared,
        "queue_description": queue.description,
        "can_scale": queue.capabilities.scale_workers,
        "can_act": can_act,
        "pids": sorted({w.pid for w in snap.workers}),
        "stall": queue.stall(snap),
        "queue_id": queue.identity,
        **extra,
    }


def _batch_size() -> int:
    """What the batch button adds: as many as one request and one client's limit allow."""
    allowance = security.submit_allowance()
    size = min(BATCH, current_app.config["QUEUE_MAX_BATCH"])
    return size if allowance is None else min(size, allowance)


def _not_modified(tag: str) -> bool:
    return request.headers.get("HX-PTag") == tag or tag in request.if_none_match


def _not_modified_response(tag: str | None = None) -> Response:
    response = current_app.response_class(status=304)
    response.headers["HX-PTag"] = current_queue.tag if tag is None else tag
    return response


def _render_live(template: str, snap: Snapshot, status: int = 200, **extra: Any) -> Response:
    response = make_response(render_template(template, **_page_data(snap, **extra)), status)
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
    if _other_queue(queue.identity):
        # The page was rendered for a queue this server no longer serves (it
        # restarted with an empty in-memory queue, or onto another file): its
        # header, title and links are about that one. htmx reloads the page.
        response = current_app.response_class(status=200)
        response.headers["HX-Refresh"] = "true"
        return response
    tag = queue.tag
    if _not_modified(tag):
        return _not_modified_response(tag)
    if LIVE_CACHE_SECONDS <= 0:
        return _render_live(template, _snapshot())
    # Everything a render reads besides the snapshot, so a variant never
    # reaches a request it was not rendered for.
    key = (template, _presenting(), security.may_act(), queue.workers, request.script_root,
           request.blueprint)
    cache = current_app.extensions.setdefault(_LIVE_CACHE_KEY, {})
    now = time.monotonic()
    entry = cache.get(key)
    if entry is None or entry[0] != tag or now - entry[2] >= LIVE_CACHE_SECONDS:
        snap = _snapshot()
        body = render_template(template, **_page_data(snap)).encode()
        if len(cache) >= _LIVE_CACHE_SIZE:
            cache.clear()
        cache[key] = entry = (snap.tag, body, now)
    response = current_app.response_class(entry[1], mimetype="text/html")
    response.headers["HX-PTag"] = entry[0]
    response.set_etag(entry[0])
    return response


def _other_queue(identity: str) -> bool:
    """Whether a poll names (``?queue=``) a queue other than the one served now."""
    wanted = request.args.get("queue") if request.query_string else None
    return wanted is not None and wanted != identity


def _default_kind() -> str | None:
    """``QUEUE_DEFAULT_KIND``, else the first kind registered (the extension's rule)."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    return app.extensions[EXTENSION_KEY].default_kind(app)


def _page(template: str, code: int = 200, **data: Any) -> Response:
    return make_response(render_template(template, **data), code)


def _message_page(message: str, status: int) -> Response:
    """A small full page for an error a person reached by a link or a plain form."""
    return _page("dashboard/message.html", status, message=message, status=status)


# -- the page and its live regions -------------------------------------------


@bp.get("/")
def index() -> Response:
    """The dashboard; ``?refused=`` shows why a plain form post was refused."""
    return _page("dashboard/index.html", **_page_data(_snapshot(), error=_refusal()))


def _refusal() -> str | None:
    """The refusal this page was sent back with (:mod:`dashboard.notices`), if any."""
    if not request.query_string:
        return None
    return notices.read(request.args.get(notices.PARAM))


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


# -- answering a state-changing form -----------------------------------------------


def _error_status(exc: QueueError) -> tuple[int, dict[str, str]]:
    """The status and headers that answer a refusal: the refusal's own. A full
    queue cannot know when places free up; the recent run time says."""
    if isinstance(exc, QueueFull) and exc.retry_after is None:
        exc.retry_after = int(_retry_after(exc.requested))
    return exc.status, exc.headers()


def _retry_after(requested: int) -> str:
    """Seconds until ``requested`` places are likely free, from the recent run time."""
    snap = current_queue.stats(0)
    run = snap.mean_run or current_app.config["QUEUE_WORK_TIME"] or 1.0
    per_worker = max(1, current_queue.workers)
    return str(max(1, min(60, math.ceil(requested * run / per_worker))))


def _form_action(action: Callable[[], Any], back: Callable[[Any], str]) -> Response:
    """Run a form's ``action``; answer htmx with the live regions, a plain post with a 303.

    ``back(result)`` is where a plain post returns. A refused action answers
    htmx with an error fragment for ``#form-errors`` and its 4xx/503; a plain
    post with a 303 back to the page the form is on, which shows why (a
    page answered to the post itself would leave the browser on the post's
    address: a reload would post again, a link to "" would be a 405).
    """
    try:
        result = action()
    except QueueError as exc:
        status, headers = _error_status(exc)
        message = str(exc)
        current_app.logger.info("%s %s refused (%d): %s", request.method,
                                security.printable(request.path), status,
                                security.printable(message, 300))
        if _is_htmx():
            return make_response(render_template("dashboard/_error.html", error=message), status, headers)
        return _see_other(_refused_location(exc, message))
    if _is_htmx():
        if request.form.get("view") == "task" and request.view_args:
            # From a task's page: show that task again (now cancelled, or
            # linking to its retry), not the dashboard's regions.
            return _render_task(_parse_task_id(request.view_args["task_id"]), current_queue.tag)
        return _render_live("dashboard/_live_after_post.html", _snapshot())
    return _see_other(back(result))


def _see_other(location: str) -> Response:
    """A bare 303 to a URL of ours (werkzeug's redirect adds an HTML body no browser shows)."""
    response = current_app.response_class(status=303)
    response.headers["Location"] = location
    return response


def _home() -> str:
    return url_for(".index", present=1) if _presenting() else url_for(".index")


def _refused_location(exc: QueueError, message: str) -> str:
    """The page a refused plain post came from, with the reason signed into its address:
    the task's page for a form on it (``view=task``) unless the task is unknown, else
    the dashboard (in presenter mode if the form was)."""
    refused = {notices.PARAM: notices.sign(message)}
    number = _task_id((request.view_args or {}).get("task_id"))
    if request.form.get("view") == "task" and number is not None and exc.status != 404:
        return url_for(".task_detail", task_id=number, **refused)
    if _presenting():
        return url_for(".index", present=1, **refused)
    return url_for(".index", **refused)


# -- adding work ---------------------------------------------------------------


def _count_spec() -> Int:
    return Int(1, current_app.config["QUEUE_MAX_BATCH"])


def _form_params(kind: TaskKind, form: Mapping[str, str]) -> dict[str, Any]:
    """The kind's parameters from a form; an empty field means the default."""
    params = {}
    for name in kind.params:
        value = form.get(name, "").strip()
        if value:
            params[name] = value
    return params


def _submit(kind_name: Any, count: Any, params: Any) -> list[int]:
    """Check everything the request says, then queue, charging the client for what was queued."""
    count = _count_spec().parse("count", count)
    if not isinstance(params, dict):
        raise InvalidParam("params", f"must be an object of parameters, got {type(params).__name__}")
    current_queue.registry.get(kind_name).check_params(params)  # bad input: 400, not 429
    return security.spend_submit(count, lambda: current_queue.submit_many(kind_name, count, params))


#: One retry at a time in this process: whether a retry queued a task or found one
#: queued by an earlier click decides both the answer and what the client is charged.
_RETRY_LOCK = threading.Lock()


def _retry(task_id: str) -> tuple[int, bool]:
    """Retry a task: ``(the id of its retry, whether this request queued it)``.

    A task retried already is not queued again (a double click queues one
    task): its retry's id comes back, and costs the client nothing.
    """
    number = _parse_task_id(task_id)
    with _RETRY_LOCK:
        info = current_queue.get(number)
        if info is None:
            raise TaskNotFound(number)  # before the limit: an unknown task is a 404, not a 429
        if info.retried_as is not None:
            return current_queue.retry(number), False
        # Another process sharing the store may retry it in between; then its
        # retry comes back, and this request is charged for it all the same.
        return security.spend_submit(1, lambda: current_queue.retry(number)), True


@bp.post("/tasks")
def add_tasks() -> Response:
    """Add work from the page's form."""
    form = request.form

    def add() -> list[int]:
        kind = current_queue.registry.get(form.get("kind", "").strip()
                                          or _default_kind())
        return _submit(kind.name, form.get("count", "1"), _form_params(kind, form))

    return _form_action(add, lambda ids: _home())


# -- controlling the queue ---------------------------------------------------------


#: One change of the worker count at a time in this process: a ``delta`` reads the
#: count and sets it, and two clicks at once must not both start from the same count.
_WORKERS_LOCK = threading.Lock()


def _set_workers(data: Mapping[str, Any]) -> int:
    """Set the worker count a request asks for: ``count`` outright (1..QUEUE_MAX_WORKERS, else
    a 400), or ``delta`` from now, clamped to that range.

    The page's − and + post ``delta``: a click more than the range allows (a
    double click at 2 workers, twenty clicks on +) stops at the end and is
    no error. A ``delta`` never moves the count against its sign (from 0
    workers, − stays at 0).
    """
    top = current_app.config["QUEUE_MAX_WORKERS"]
    if data.get("count") not in (None, ""):
        return current_queue.set_workers(Int(1, top).parse("count", data["count"]))
    delta = Int(-top, top).parse("delta", data.get("delta"))
    with _WORKERS_LOCK:
        now = current_queue.workers
        if delta > 0:
            wanted = max(now, min(now + delta, top))
        elif delta < 0:
            wanted = min(now, max(now + delta, 1))
        else:
            wanted = now
        return current_queue.set_workers(wanted)


@bp.post("/pause")
def pause() -> Response:
    return _form_action(current_queue.pause, lambda _: _home())


@bp.post("/resume")
def resume() -> Response:
    return _form_action(current_queue.resume, lambda _: _home())


@bp.post("/workers")
def workers() -> Response:
    """Form field ``delta`` (+1 or -1 from the buttons; clamped) or ``count``."""
    return _form_action(lambda: _set_workers(request.form), lambda _: _home())


@bp.post("/history/clear")
def clear_history() -> Response:
    return _form_action(current_queue.clear_history, lambda _: _home())


@bp.post("/reset")
def reset() -> Response:
    """Clear counters and history for the next run; queued and running work stays."""
    return _form_action(current_queue.reset, lambda _: _home())


# -- one task --------------------------------------------------------------------------


def _task_id(raw: object) -> int | None:
    """The one reading of a task id from a request: the id, or None when ``raw``
    cannot be one (the stores give out positive integers of at most 18 digits)."""
    if isinstance(raw, str) and 0 < len(raw) <= 18 and raw.isascii() and raw.isdigit():
        return int(raw)
    return None


def _parse_task_id(raw: str) -> int:
    """:func:`_task_id`, or :class:`TaskNotFound` (a 404) when it cannot be one."""
    number = _task_id(raw)
    if number is None:
        raise TaskNotFound(printable_id(raw))
    return number


def printable_id(raw: object) -> str:
    """What an error quotes of an id it was given: at most 40 characters, repr'd."""
    return repr(str(raw)[:40])


def _task_or_404(raw: str) -> TaskInfo:
    """The task, or a 404 page: templates never receive ``None``.

    Read the queue's tag before calling this: see :func:`_render_task`.
    """
    try:
        info = current_queue.get(_parse_task_id(raw))
    except TaskNotFound:
        info = None
    if info is None:
        abort(_message_page(f"no task {raw[:40]!r}: unknown, or no longer in the history", 404))
    return info


def _render_task(task_id: int, tag: str, info: TaskInfo | None = None) -> Response:
    """The task's region, with ``tag``: the queue's tag read *before* the task was.

    Read after, a task finishing between the two reads would leave the page
    holding the newer tag with the older content: every poll would then get
    a 304, and the page would say "running" for ever.
    """
    if info is None:
        info = current_queue.get(task_id)
    if info is None:
        return _message_page(f"no task {task_id}: unknown, or no longer in the history", 404)
    response = make_response(render_template("dashboard/_task.html", **_task_data(info, tag)))
    response.headers["HX-PTag"] = tag
    return response


def _task_data(info: TaskInfo, tag: str) -> dict[str, Any]:
    return {
        "task": info,
        "poll_interval": current_app.config["QUEUE_POLL_INTERVAL"],
        "tag": tag,
        "present": False,
        "can_act": security.may_act(),
        "queue_id": current_queue.identity,
    }


@bp.get("/tasks/<task_id>")
def task_detail(task_id: str) -> Response:
    """A task's page; ``?refused=`` shows why a plain form post on it was refused."""
    tag = current_queue.tag  # before the task: see _render_task
    info = _task_or_404(task_id)
    return _page("dashboard/task.html", error=_refusal(), **_task_data(info, tag))


@bp.get("/tasks/<task_id>/live")
def task_live(task_id: str) -> Response:
    """The task's detail region, polled while the task is not finished."""
    if _other_queue(current_queue.identity):
        # Ids are unique only within one queue: this one may have a task of
        # that number too, and it is not the task the page is about.
        return _task_gone(task_id, 410, "the server now serves another queue (it restarted, "
                          "and the old queue is gone with its tasks)")
    tag = current_queue.tag  # before the task: see _render_task
    if _not_modified(tag):
        return _not_modified_response(tag)
    try:
        info = current_queue.get(_parse_task_id(task_id))
    except TaskNotFound:
        info = None
    if info is None:
        return _task_gone(task_id, 404, "the server no longer knows it (dropped from the "
                          "history, or the server restarted)")
    return _render_task(info.id, tag, info)


def _task_gone(task_id: str, status: int, why: str) -> Response:
    """A polled task that cannot be shown any more: a region that says so and
    polls no more (it replaces the polling one). A person who opened the URL
    gets a page that says the same."""
    if not _is_htmx():
        return _message_page(f"no task {task_id[:40]!r}: {why}", status)
    return make_response(render_template("dashboard/_task_gone.html", task_id=task_id[:40], why=why), status)


@bp.get("/tasks/lookup")
def task_lookup() -> Response:
    """The page's "find a task" form: ``?id=N`` → the task's page."""
    raw = request.args.get("id", "").strip().lstrip("#")
    number = _task_id(raw)
    if number is None:
        return _message_page(f"id must be a task number like 42, got {printable_id(raw)}", 400)
    return redirect(url_for(".task_detail", task_id=number), 303)


def _back_to_task(task_id: int) -> str:
    if request.form.get("view") == "task":
        return url_for(".task_detail", task_id=task_id)
    return _home()


@bp.post("/tasks/<task_id>/cancel")
def cancel_task(task_id: str) -> Response:
    def cancel() -> int:
        number = _parse_task_id(task_id)
        current_queue.cancel(number)
        return number

    return _form_action(cancel, _back_to_task)


@bp.post("/tasks/<task_id>/retry")
def retry_task(task_id: str) -> Response:
    """Retry from a form; a second click answers like the first, and queues nothing."""
    return _form_action(lambda: _retry(task_id), lambda retried: _back_to_task(retried[0]))


# -- JSON API ------------------------------------------------------------------


def _json_error(message: str, status: int, headers: Mapping[str, str] | None = None) -> Response:
    response = jsonify(error=message)
    response.status_code = status
    if headers:
        response.headers.update(headers)
    return response


def _json_body(allowed: frozenset[str]) -> dict[str, Any] | Response:
    """The request's JSON object, or a 4xx answer saying what is wrong with the body."""
    if not request.is_json:
        return _json_error("send a JSON object with Content-Type: application/json", 415)
    # Parsed here rather than by request.get_json(silent=True): that lets a
    # RecursionError through (a 500), and answers every other fault with None.
    try:
        data = current_app.json.loads(request.get_data())
    except RecursionError:
        return _json_error(_TOO_DEEP, 400)
    except json.JSONDecodeError as exc:
        return _json_error(f"body must be a JSON object; it is not valid JSON: {exc}", 400)
    except UnicodeDecodeError:
        return _json_error("body must be a JSON object in UTF-8; it is not UTF-8", 400)
    except ValueError:  # an integer of more digits than int() takes
        return _json_error("body must be a JSON object; a number in it has more than "
                           f"{sys.get_int_max_str_digits()} digits", 400)
    if _nests_deeper(data, MAX_JSON_DEPTH):
        return _json_error(_TOO_DEEP, 400)
    if not isinstance(data, dict):
        example = ", ".join(f'"{k}": ...' for k in sorted(allowed))
        return _json_error(f"body must be a JSON object like {{{example}}}", 400)
    unknown = sorted(set(data) - allowed)
    if unknown:
        return _json_error(
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
        status, headers = _error_status(exc)
        return _json_error(str(exc), status, headers)
    return ok(result)


@bp.get("/api/stats")
def api_stats() -> Response:
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
    """``{"kind": ..., "count": n, "params": {...}}`` → 202 with the new ids."""
    data = _json_body(API_TASK_KEYS)
    if isinstance(data, Response):
        return data

    def ok(ids: list[int]) -> Response:
        response = jsonify(ids=ids, count=len(ids))
        response.status_code = 202
        return response

    return _json_action(
        lambda: _submit(
            data.get("kind", _default_kind()),
            data.get("count", 1),
            data.get("params", {}),
        ),
        ok,
    )


@bp.get("/api/tasks/<task_id>")
def api_task(task_id: str) -> Response:
    number = _task_id(task_id)
    if number is None:
        return _json_error(f"no task {printable_id(task_id)}: task ids are positive integers", 404)
    info = current_queue.get(number)
    if info is None:
        return _json_error(f"no task {task_id}: unknown, or no longer in the history", 404)
    return jsonify(info.to_dict())


@bp.post("/api/tasks/<task_id>/cancel")
def api_cancel(task_id: str) -> Response:
    def cancel() -> TaskInfo | None:
        number = _parse_task_id(task_id)
        current_queue.cancel(number)
        return current_queue.get(number)

    return _json_action(cancel, lambda info: jsonify(info.to_dict() if info else {}))


@bp.post("/api/tasks/<task_id>/retry")
def api_retry(task_id: str) -> Response:
    """``202 {"id": new, "retry_of": old, "created": true}`` when this request queued the
    retry; ``200`` with ``"created": false`` when the task had been retried already
    (nothing queued: a second click, or a client sending again after a lost answer)."""

    def ok(retried: tuple[int, bool]) -> Response:
        new_id, created = retried
        response = jsonify(id=new_id, retry_of=int(task_id), created=created)
        response.status_code = 202 if created else 200
        return response

    return _json_action(lambda: _retry(task_id), ok)


@bp.post("/api/pause")
def api_pause() -> Response:
    return _json_action(current_queue.pause, lambda _: jsonify(paused=True))


@bp.post("/api/resume")
def api_resume() -> Response:
    return _json_action(current_queue.resume, lambda _: jsonify(paused=False))


@bp.post("/api/workers")
def api_workers() -> Response:
    """``{"count": n}`` or ``{"delta": ±n}`` (clamped) → the number of worker threads now
    asked for."""
    data = _json_body(frozenset({"count", "delta"}))
    if isinstance(data, Response):
        return data
    return _json_action(lambda: _set_workers(data), lambda n: jsonify(workers=n))


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


@bp.errorhandler(QueueError)
def _refused(exc: QueueError) -> Response:
    """A refusal no view answered itself; most often the store could not be read
    or written (a file locked for long, or gone, or failing): a 503 that says so
    and when to try again. A poll keeps what it shows."""
    message = str(exc)
    current_app.logger.warning("%s %s: %s", request.method, security.printable(request.path),
                               message)
    status, headers = _error_status(exc)
    if security.is_api_request():
        return _json_error(message, status, headers)
    if _is_htmx():
        return make_response(render_template("dashboard/_error.html", error=message), status, headers)
    response = _message_page(message, status)
    response.headers.update(headers)
    return response


# -- template filters ------------------------------------------------------------


@bp.app_template_global()
def poll_timeout_ms(interval: float) -> int:
    """How long a poll may go unanswered before the page drops it and sends the
    next: five intervals, at least 5 s. (The page says it lost the server well
    before that: dashboard.js watches the answers.)"""
    return int(max(5.0, 5 * interval) * 1000)


@bp.app_template_filter("seconds")
def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 10:
        return f"{value:.2f}s"
    if value < 600:
        return f"{value:.1f}s"
    return f"{value / 60:.0f}m"


@bp.app_template_filter("duration")
def _duration(value: float | None) -> str:
    """A rounded human duration for estimates: 45s, 3m 20s, 2h 05m."""
    if value is None:
        return "—"
    value = int(round(value))
    if value < 60:
        return f"{value}s"
    if value < 3600:
        return f"{value // 60}m {value % 60:02d}s"
    return f"{value // 3600}h {value % 3600 // 60:02d}m"


@bp.app_template_filter("clock")
def _clock(value: float | None) -> str:
    return "—" if value is None else time.strftime("%H:%M:%S", time.localtime(value))


@bp.app_template_filter("isotime")
def _isotime(value: float | None) -> str:
    if value is None:
        return ""
    return datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="seconds")


@bp.app_context_processor
def _states() -> dict[str, Any]:
    return {"State": State}
