"""How the dashboard answers: full pages, fragments, JSON errors, 303s and 304s,
and the one reading of a task id from a request.

Every view module answers through these, so a refusal, a page and a poll look
the same whichever view gives them.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from flask import Response, current_app, jsonify, make_response, render_template, request, url_for

from ..errors import QueueError, QueueFull, TaskNotFound
from ..ext import EXTENSION_KEY, current_queue


def is_htmx() -> bool:
    return request.headers.get("HX-Request") == "true"


def presenting() -> bool:
    """Presenter mode: ``?present=1`` on a page, or ``present=1`` in a form."""
    # request.values would build a combined dict for one lookup, and
    # request.args parses an empty query string into a dict of its own.
    value = request.args.get("present") if request.query_string else None
    if value is None and request.method != "GET":
        value = request.form.get("present")
    return bool(value) and value.lower() in ("1", "true", "on", "yes")


def not_modified(tag: str) -> bool:
    return request.headers.get("HX-PTag") == tag or tag in request.if_none_match


def not_modified_response(tag: str | None = None) -> Response:
    response = current_app.response_class(status=304)
    response.headers["HX-PTag"] = current_queue.tag if tag is None else tag
    return response


def other_queue(identity: str) -> bool:
    """Whether a poll names (``?queue=``) a queue other than the one served now."""
    wanted = request.args.get("queue") if request.query_string else None
    return wanted is not None and wanted != identity


def default_kind() -> str | None:
    """``QUEUE_DEFAULT_KIND``, else the first kind registered (the extension's rule)."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    return app.extensions[EXTENSION_KEY].default_kind(app)


def page(template: str, code: int = 200, **data: Any) -> Response:
    return make_response(render_template(template, **data), code)


def message_page(message: str, status: int) -> Response:
    """A small full page for an error a person reached by a link or a plain form."""
    return page("dashboard/message.html", status, message=message, status=status)


def error_status(exc: QueueError) -> tuple[int, dict[str, str]]:
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


def see_other(location: str) -> Response:
    """A bare 303 to a URL of ours (werkzeug's redirect adds an HTML body no browser shows)."""
    response = current_app.response_class(status=303)
    response.headers["Location"] = location
    return response


def home() -> str:
    return url_for(".index", present=1) if presenting() else url_for(".index")


#: What a task id may look like in a request: whatever a backend gives out (the
#: in-process stores' integers, RQ's job ids) fits, and nothing else reaches one.
TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Said where an id cannot be one.
TASK_ID_RULE = "task ids are 1 to 64 letters, digits, '-' and '_'"


def read_task_id(raw: object) -> str | None:
    """The one reading of a task id from a request: the id as text, or None when
    ``raw`` cannot be one. What the id means is the backend's affair: it takes
    the text and answers "unknown" for an id it never gave out."""
    if isinstance(raw, str) and TASK_ID.fullmatch(raw):
        return raw
    return None


def parse_task_id(raw: str) -> str:
    """:func:`read_task_id`, or :class:`TaskNotFound` (a 404) when it cannot be one."""
    task_id = read_task_id(raw)
    if task_id is None:
        raise TaskNotFound(printable_id(raw))
    return task_id


def printable_id(raw: object) -> str:
    """What an error quotes of an id it was given: at most 40 characters, repr'd."""
    return repr(str(raw)[:40])


def json_error(message: str, status: int, headers: Mapping[str, str] | None = None) -> Response:
    response = jsonify(error=message)
    response.status_code = status
    if headers:
        response.headers.update(headers)
    return response
