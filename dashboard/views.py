"""The dashboard blueprint: the page, its live partials, the forms and the JSON API.

Views read one snapshot per request and hand templates plain data. A poll
whose ``HX-PTag`` (or ``If-None-Match``) equals the queue's current tag gets
a 304 before anything is rendered.
"""

from __future__ import annotations

import math
import os
import time
from datetime import datetime, timezone
from typing import Any, Mapping

from flask import (
    Blueprint,
    Response,
    current_app,
    jsonify,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)

from .ext import current_queue
from .records import Snapshot
from .store import QueueClosed, QueueFull
from .tasks import Int, TaskError, TaskKind

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

bp = Blueprint(
    "dashboard",
    __name__,
    template_folder=os.path.join(_ROOT, "templates"),
    static_folder=os.path.join(_ROOT, "static"),
    static_url_path="/static",
)

#: Finished tasks the page lists.
RECENT = 20

#: The live regions: each is a template ``_<name>.html`` of its own.
REGIONS = ("counts", "workers", "history")

API_TASK_KEYS = frozenset({"kind", "count", "params"})


@bp.after_request
def _no_store(response: Response) -> Response:
    if request.endpoint != "dashboard.static":
        response.headers["Cache-Control"] = "no-store"
        response.vary.add("HX-Request")
    return response


def _is_htmx() -> bool:
    return request.headers.get("HX-Request") == "true"


def _page_data(snap: Snapshot, **extra: Any) -> dict[str, Any]:
    config = current_app.config
    queue = current_queue
    return {
        "snap": snap,
        "kinds": queue.registry.kinds(),
        "default_kind": config["DEFAULT_KIND"],
        "poll_interval": config["POLL_INTERVAL"],
        "work_time": config["WORK_TIME"],
        "max_batch": config["MAX_BATCH"],
        "workers_configured": queue.workers,
        "recent_size": RECENT,
        **extra,
    }


def _not_modified(tag: str) -> bool:
    return request.headers.get("HX-PTag") == tag or tag in request.if_none_match


def _render_live(template: str, snap: Snapshot, status: int = 200, **extra: Any) -> Response:
    response = make_response(render_template(template, **_page_data(snap, **extra)), status)
    response.headers["HX-PTag"] = snap.tag
    response.set_etag(snap.tag)
    return response


# -- the page and its live regions -------------------------------------------


@bp.get("/")
def index() -> Response:
    return make_response(render_template("index.html", **_page_data(current_queue.stats(RECENT))))


@bp.get("/live")
def live() -> Response:
    """Every live region in one response: the page polls this once per tick."""
    if _not_modified(current_queue.tag):
        return _not_modified_response()
    return _render_live("_live.html", current_queue.stats(RECENT))


@bp.get("/live/<region>")
def live_region(region: str) -> Response:
    """One live region alone, for pages that poll regions separately."""
    if region not in REGIONS:
        return Response(
            f"unknown region {region[:40]!r}; regions are: {', '.join(REGIONS)}",
            404,
            mimetype="text/plain",
        )
    if _not_modified(current_queue.tag):
        return _not_modified_response()
    return _render_live(f"_{region}.html", current_queue.stats(RECENT))


def _not_modified_response() -> Response:
    response = make_response("", 304)
    response.headers["HX-PTag"] = current_queue.tag
    return response


# -- adding work ---------------------------------------------------------------


class BadField(TaskError):
    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field} {message}")


def _count_spec() -> Int:
    return Int(1, current_app.config["MAX_BATCH"])


def _form_params(kind: TaskKind, form: Mapping[str, str]) -> dict[str, Any]:
    """The kind's parameters from a form; an empty field means the default."""
    params = {}
    for name in kind.params:
        value = form.get(name, "").strip()
        if value:
            params[name] = value
    return params


def _submit(kind_name: Any, count: Any, params: Any) -> list[int]:
    """Check the request's count and params shape; the queue checks kind and params."""
    count = _count_spec().parse("count", count)
    if not isinstance(params, dict):
        raise BadField("params", f"must be an object of parameters, got {type(params).__name__}")
    return current_queue.submit_many(kind_name, count, params)


def _retry_after(requested: int) -> str:
    """Seconds until ``requested`` places are likely free, from the mean run time."""
    snap = current_queue.stats(0)
    run = snap.mean_run or current_app.config["WORK_TIME"] or 1.0
    per_worker = max(1, current_queue.workers)
    return str(max(1, min(60, math.ceil(requested * run / per_worker))))


def _error_status(exc: Exception) -> tuple[int, dict[str, str]]:
    if isinstance(exc, QueueFull):
        return 503, {"Retry-After": _retry_after(exc.requested)}
    if isinstance(exc, QueueClosed):
        return 503, {"Retry-After": "5"}
    return 400, {}


@bp.post("/tasks")
def add_tasks() -> Response:
    """Add work from the page's form: htmx gets the live regions, a plain post a 303."""
    form = request.form
    kind_name = form.get("kind", "").strip() or current_app.config["DEFAULT_KIND"]
    try:
        kind = current_queue.registry.get(kind_name)
        _submit(kind.name, form.get("count", "1"), _form_params(kind, form))
    except TaskError as exc:
        status, headers = _error_status(exc)
        message = str(exc)
        current_app.logger.info("POST /tasks refused (%d): %s", status, message)
        if _is_htmx():
            return make_response(render_template("_error.html", error=message), status, headers)
        page = render_template("index.html", **_page_data(current_queue.stats(RECENT), error=message))
        return make_response(page, status, headers)
    if _is_htmx():
        return _render_live("_live_after_post.html", current_queue.stats(RECENT))
    return redirect(url_for(".index"), 303)


# -- JSON API ------------------------------------------------------------------


def _json_error(message: str, status: int, headers: Mapping[str, str] | None = None) -> Response:
    response = jsonify(error=message)
    response.status_code = status
    if headers:
        response.headers.update(headers)
    return response


@bp.get("/api/stats")
def api_stats() -> Response:
    snap = current_queue.stats(RECENT)
    if snap.tag in request.if_none_match:
        return make_response("", 304)
    response = jsonify(snap.to_dict())
    response.set_etag(snap.tag)
    return response


@bp.post("/api/tasks")
def api_add_tasks() -> Response:
    """``{"kind": ..., "count": n, "params": {...}}`` → 202 with the new ids."""
    if not request.is_json:
        return _json_error("send a JSON object with Content-Type: application/json", 415)
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        return _json_error(
            'body must be a JSON object like {"kind": "pretend", "count": 1, "params": {}}', 400
        )
    unknown = sorted(set(data) - API_TASK_KEYS)
    if unknown:
        return _json_error(
            f"unknown field(s): {', '.join(map(str, unknown))}; allowed: count, kind, params", 400
        )
    try:
        ids = _submit(
            data.get("kind", current_app.config["DEFAULT_KIND"]),
            data.get("count", 1),
            data.get("params", {}),
        )
    except TaskError as exc:
        status, headers = _error_status(exc)
        return _json_error(str(exc), status, headers)
    response = jsonify(ids=ids, count=len(ids))
    response.status_code = 202
    return response


@bp.get("/api/tasks/<task_id>")
def api_task(task_id: str) -> Response:
    if not (task_id.isascii() and task_id.isdigit()) or len(task_id) > 18:
        return _json_error(f"no task {task_id[:40]!r}: task ids are positive integers", 404)
    info = current_queue.get(int(task_id))
    if info is None:
        return _json_error(f"no task {task_id}: unknown, or no longer in the history", 404)
    return jsonify(info.to_dict())


@bp.get("/healthz")
def healthz() -> Response:
    queue = current_queue
    snap = queue.stats(0)
    healthy = queue.is_healthy()
    body = {
        "status": "ok" if healthy else ("stopping" if snap.closed else "unhealthy"),
        "pid": snap.pid,
        "workers": queue.workers,
        "alive": sum(1 for w in snap.workers if w.state not in ("stopped",)),
        "started": queue.started,
    }
    response = jsonify(body)
    response.status_code = 200 if healthy else 503
    return response


# -- template filters ------------------------------------------------------------


@bp.app_template_filter("seconds")
def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 10:
        return f"{value:.2f}s"
    if value < 600:
        return f"{value:.1f}s"
    return f"{value / 60:.0f}m"


@bp.app_template_filter("clock")
def _clock(value: float | None) -> str:
    return "—" if value is None else time.strftime("%H:%M:%S", time.localtime(value))


@bp.app_template_filter("isotime")
def _isotime(value: float | None) -> str:
    if value is None:
        return ""
    return datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="seconds")
