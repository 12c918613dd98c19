"""The dashboard blueprint and what holds for all of its routes: the guard (Host,
cross-site, the access token, the body size), the security headers, the answer
to a refusal no view caught, and the template filters.

The routes themselves register on :data:`bp` from :mod:`.pages`, :mod:`.live`,
:mod:`.controls`, :mod:`.api` and :mod:`.metrics`. Nothing here touches an app's own routes:
the guard and the headers are the blueprint's, and the filters carry the
``queue_`` prefix so they cannot replace an app's own.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, Response, current_app, make_response, render_template, request

from ..errors import QueueError
from . import security
from .answers import error_status, is_htmx, json_error, message_page


#: The package's folder: dashboard/, above this web/ folder.
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _folder(name: str) -> str:
    """``name`` inside the package (an installed wheel), else beside it (a checkout)."""
    inside = os.path.join(_PACKAGE, name)
    return inside if os.path.isdir(inside) else os.path.join(os.path.dirname(_PACKAGE), name)


bp = Blueprint(
    "dashboard",
    __name__,
    template_folder=_folder("templates"),
    static_folder=_folder("static"),
    static_url_path="/static",
)


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
        return json_error(reason, status)
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


@bp.errorhandler(QueueError)
def _refused(exc: QueueError) -> Response:
    """A refusal no view answered itself; most often the store could not be read
    or written (a file locked for long, or gone, or failing): a 503 that says so
    and when to try again. A poll keeps what it shows."""
    message = str(exc)
    current_app.logger.warning("%s %s: %s", request.method, security.printable(request.path),
                               message)
    status, headers = error_status(exc)
    if security.is_api_request():
        return json_error(message, status, headers)
    if is_htmx():
        return make_response(render_template("dashboard/_error.html", error=message), status, headers)
    response = message_page(message, status)
    response.headers.update(headers)
    return response


@bp.app_template_global("queue_poll_timeout_ms")
def poll_timeout_ms(interval: float) -> int:
    """How long a poll may go unanswered before the page drops it and sends the
    next: five intervals, at least 5 s. (The page says it lost the server well
    before that: dashboard.js watches the answers.)"""
    return int(max(5.0, 5 * interval) * 1000)


@bp.app_template_filter("queue_seconds")
def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 10:
        return f"{value:.2f}s"
    if value < 600:
        return f"{value:.1f}s"
    return f"{value / 60:.0f}m"


@bp.app_template_filter("queue_duration")
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


#: Characters of a result the task page shows; the JSON API gives it whole.
RESULT_SHOWN = 10_000


@bp.app_template_filter("queue_json")
def _json(value: Any) -> str:
    """A task's result as indented JSON, cut to RESULT_SHOWN characters."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    if len(text) > RESULT_SHOWN:
        text = f"{text[:RESULT_SHOWN]}\n… ({len(text):,} characters; GET /api/tasks/<id> has it all)"
    return text


@bp.app_template_filter("queue_clock")
def _clock(value: float | None) -> str:
    return "—" if value is None else time.strftime("%H:%M:%S", time.localtime(value))


@bp.app_template_filter("queue_isotime")
def _isotime(value: float | None) -> str:
    if value is None:
        return ""
    return datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="seconds")
