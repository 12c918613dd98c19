"""The operator's view: find any task, act on every task a filter shows, see each kind's
health.

``GET /tasks`` is a list with a filter form (state, kind, text, order), paged with the
backend's cursors (keyset: never an offset) and with each kind's health below. The
filter and the page live in the URL: the form is a plain GET (it works with JavaScript
off), which htmx sends instead and pushes into the history, so a view can be
bookmarked, shared and restored with the back button. ``GET /tasks/live`` is its one
poll, answered 304 while nothing it shows changed.

A bulk action goes through a confirmation that says how many tasks and which filter
(``GET /tasks/bulk``), then ``POST /tasks/bulk`` with the filter and the count it
showed; the answer is one line, and the list shown again.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

from flask import Response, current_app, make_response, render_template, request, url_for

from ..errors import QueueError
from ..ext import current_queue
from ..records import State
from ..tasks import Int
from . import notices, security
from .actions import CountChanged, bulk
from .answers import (error_status, is_htmx, message_page, not_modified_response, other_queue,
                      page, see_other)
from .blueprint import bp
from .search import (PAGE_SIZES, VERBS, Shown, View, action_count, button_label, check_search,
                     gather, question, quick_tag, read_action, read_view)


#: Characters of a task's error and of its params the list shows (its page has them all).
ERROR_SHOWN = 140
PARAMS_SHOWN = 100


@bp.app_template_filter("queue_excerpt")
def _excerpt(text: str | None, limit: int = ERROR_SHOWN) -> str:
    """The first line of ``text``, cut to ``limit`` characters with an ellipsis."""
    if not text:
        return ""
    line = text.strip().splitlines()[0] if text.strip() else ""
    if len(line) > limit or line != text.strip():
        return line[:limit].rstrip() + "…"
    return line


class FormValues(NamedTuple):
    """What the filter form shows: the view's values, or what a refused request gave."""

    states: frozenset[str] = frozenset()
    kind: str = ""
    text: str = ""
    order: str = "newest"
    limit: str = str(View().limit)

    @classmethod
    def of_view(cls, view: View) -> FormValues:
        return cls(frozenset(view.states), view.query.kind or "", view.query.text or "",
                   view.order, str(view.limit))

    @classmethod
    def given(cls, values: Mapping[str, Any]) -> FormValues:
        """As a request gave them (each cut short): the form shows what was refused."""
        states = frozenset(part.strip().lower()[:40] for value in values.getlist("state")
                           for part in value.split(","))
        return cls(states, values.get("kind", "")[:100], values.get("text", "")[:1000],
                   (values.get("order") or "newest")[:20],
                   (values.get("limit") or str(View().limit))[:20])


def _partial() -> bool:
    """An htmx request for the list alone: not a history restore, which needs the page."""
    return (is_htmx() and request.headers.get("HX-Request-Type") != "full"
            and request.headers.get("HX-History-Restore-Request") != "true")


def _polls(view: View | None) -> bool:
    capabilities = current_queue.capabilities
    return (view is not None and capabilities.search) or capabilities.kind_health


def list_data(view: View | None, shown: Shown, can_act: bool, **extra: Any) -> dict[str, Any]:
    """What the list's templates use: plain data and URLs, no queue."""
    queue = current_queue
    capabilities = queue.capabilities
    identity = queue.identity
    tag = f"{quick_tag(view, can_act)}.{shown.digest}"
    data: dict[str, Any] = {
        "view": view,
        "shown": shown,
        "tag": tag,
        "can_act": can_act,
        "present": False,
        "can_search": capabilities.search,
        "can_text": capabilities.text_search,
        "can_health": capabilities.kind_health,
        "queue_description": queue.description,
        "queue_id": identity,
        "poll_interval": current_app.config["QUEUE_POLL_INTERVAL"],
        "polls": extra.pop("polls", True) and _polls(view),
        "poll_url": url_for(".task_list_live", **(view.args() if view else {}), queue=identity),
        "kind_names": queue.registry.names(),
        "all_states": [s.value for s in State],
        "page_sizes": PAGE_SIZES,
        "form": FormValues.of_view(view) if view is not None else FormValues(),
        "error": None,
        "notice": None,
    }
    if view is not None and shown.page is not None:
        page_ = shown.page
        back, on = ("Newer", "Older") if not view.oldest_first else ("Older", "Newer")
        data.update(
            tasks=page_.tasks,
            back_label=back,
            on_label=on,
            back_url=url_for(".task_list", **view.args(page_.newer)) if page_.newer else None,
            on_url=url_for(".task_list", **view.args(page_.older)) if page_.older else None,
            first_url=url_for(".task_list", **view.args(None)) if view.cursor else None,
            bulk_buttons=[
                {"action": action, "count": count,
                 "label": button_label(action, view.query, count),
                 "args": {"action": action, **view.args()}}
                for action, count in shown.actions
            ],
        )
    data.update(extra)
    return data


@bp.get("/tasks")
def task_list() -> Response:
    """The list of tasks, filtered by ``state`` (repeated), ``kind``, ``text``, in
    ``order`` (newest or oldest first), ``limit`` per page, from ``cursor``.

    A bad value is a 400 naming the field: the page then shows the form as given and
    the error. An htmx request gets the list's region alone (the form and the pager
    links put it in place and push the URL); a history restore gets the page.
    """
    queue = current_queue
    can_act = security.may_act()
    view, error = None, None
    if queue.capabilities.search:
        try:
            view = read_view(request.args)
            check_search(view.query)
            shown = gather(view, can_act)
        except QueueError as exc:
            if not 400 <= exc.status < 500:
                raise
            current_app.logger.info("GET %s refused (%d): %s",
                                    security.printable(request.path), exc.status,
                                    security.printable(str(exc), 300))
            view, error = None, exc
    if view is None:
        shown = gather(None, can_act)
    if error is not None:
        if _partial():
            return make_response(render_template("dashboard/_error.html", error=str(error)),
                                 error.status)
        data = list_data(None, shown, can_act, polls=False, error=str(error),
                         form=FormValues.given(request.args))
        return page("dashboard/tasks.html", error.status, **data)
    data = list_data(view, shown, can_act)
    if _partial():
        return make_response(render_template("dashboard/_tasks_after_get.html", **data))
    if request.query_string:
        data["notice"] = notices.read_done(request.args.get(notices.DONE))
        data["error"] = notices.read(request.args.get(notices.PARAM))
    return page("dashboard/tasks.html", **data)


@bp.get("/tasks/live")
def task_list_live() -> Response:
    """The list's poll (the same parameters as ``GET /tasks``): its region, or a 304
    while nothing it shows changed. The tag it answers with has two halves: the queue's
    own tag with the view (cheap: while it holds, nothing is read), and a digest of what
    is shown (while that holds, nothing is rendered)."""
    queue = current_queue._get_current_object()  # type: ignore[attr-defined]
    if other_queue(queue.identity):
        response = current_app.response_class(status=200)
        response.headers["HX-Refresh"] = "true"  # another queue now: the page reloads
        return response
    can_act = security.may_act()
    view = None
    if queue.capabilities.search:
        view = read_view(request.args)
        check_search(view.query)
    held = request.headers.get("HX-PTag", "")
    quick = quick_tag(view, can_act)
    if held.partition(".")[0] == quick:
        return not_modified_response(held)
    shown = gather(view, can_act)
    tag = f"{quick}.{shown.digest}"
    if held.partition(".")[2] == shown.digest or tag in request.if_none_match:
        return not_modified_response(tag)
    response = make_response(render_template("dashboard/_tasks_results.html",
                                              **list_data(view, shown, can_act)))
    response.headers["HX-PTag"] = tag
    response.set_etag(tag)
    return response


# -- bulk actions -----------------------------------------------------------------------


def _needs_token() -> Response:
    """A bulk action's confirmation asked for without the access token (a read-only
    view): 401, so that a browser asks for it."""
    message = ("acting on tasks needs the access token: send it as the password of HTTP "
               "Basic auth, or as 'Authorization: Bearer <token>'")
    if is_htmx():
        response = make_response(render_template("dashboard/_error.html", error=message), 401)
    else:
        response = message_page(message, 401)
    response.headers["WWW-Authenticate"] = 'Basic realm="Work queue", charset="UTF-8"'
    return response


def confirm_data(action: str, view: View, count: int, **extra: Any) -> dict[str, Any]:
    return {
        "action": action,
        "verb": VERBS[action],
        "count": count,
        "question": question(action, view.query, count),
        "fields": {"action": action, "expected": count, **view.args()},
        "back_url": url_for(".task_list", **view.args()),
        "error": None,
        **extra,
    }


@bp.get("/tasks/bulk")
def bulk_confirm() -> Response:
    """The confirmation of a bulk action (``action`` and a view's parameters): how many
    tasks it would act on now, and which filter; Confirm posts it, Back returns."""
    if not security.may_act():
        return _needs_token()
    action = read_action(request.args.get("action"))
    view = read_view(request.args)
    check_search(view.query)
    count = action_count(view.query, action)
    refused = notices.read(request.args.get(notices.PARAM)) if request.query_string else None
    data = confirm_data(action, view, count, error=refused)
    if _partial():
        return make_response(render_template("dashboard/_bulk_confirm.html", **data))
    return page("dashboard/bulk.html", queue_description=current_queue.description, **data)


@bp.post("/tasks/bulk")
def bulk_tasks() -> Response:
    """Do a confirmed bulk action: form fields ``action``, ``expected`` (the count the
    confirmation showed) and the view's parameters. htmx gets the one line that says
    what was done and the list again; a plain post a 303 back to the list, which says
    it. Refused, nothing is done: htmx gets why with the status (409 with a new
    confirmation when more tasks match than were confirmed), a plain post a 303 back
    to the confirmation or the list, which says why."""
    form = request.form
    view = action = None
    try:
        action = read_action(form.get("action"))
        view = read_view(form)
        expected = Int(0, 10**9).parse("expected", form.get("expected"))
        result = bulk(action, view.query, expected)
    except QueueError as exc:
        status, headers = error_status(exc)
        message = str(exc)
        current_app.logger.info("POST %s refused (%d): %s", security.printable(request.path),
                                status, security.printable(message, 300))
        if isinstance(exc, CountChanged) and view is not None and action is not None:
            if is_htmx():
                data = confirm_data(action, view, exc.count, error=message)
                return make_response(render_template("dashboard/_bulk_confirm.html", **data),
                                     status, headers)
            return see_other(url_for(".bulk_confirm", action=action, **view.args(),
                                     **{notices.PARAM: notices.sign(message)}))
        if is_htmx():
            return make_response(render_template("dashboard/_error.html", error=message),
                                 status, headers)
        return see_other(url_for(".task_list", **(view.args() if view else {}),
                                 **{notices.PARAM: notices.sign(message)}))
    line = result.line()
    current_app.logger.info("bulk %s by %s (%s): %s", action,
                            security.printable(request.remote_addr or "unknown", 60),
                            security.printable(repr(view.query.to_dict()), 300), line)
    if is_htmx():
        can_act = security.may_act()
        data = list_data(view, gather(view, can_act), can_act, line=line)
        return make_response(render_template("dashboard/_bulk_done.html", **data))
    return see_other(url_for(".task_list", **view.args(),
                             **{notices.DONE: notices.sign(line, notices.DONE)}))
