"""The page's controls: each state-changing form.

Every form answers an htmx request with the live regions (the click shows at
once) and a plain post with a 303 back to the page it came from, so the page
works without JavaScript: a refused plain post too, the reason signed into
that page's address (see :mod:`.notices`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flask import Response, current_app, make_response, render_template, request, url_for

from ..backend import TaskId
from ..errors import QueueError
from ..ext import current_queue
from ..tasks import TaskKind
from . import notices, security
from .actions import retry, run_schedule, set_workers, submit
from .answers import (default_kind, error_status, home, is_htmx, parse_task_id, presenting,
                      read_task_id, see_other)
from .blueprint import bp
from .live import render_live, render_task, snapshot


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
        status, headers = error_status(exc)
        message = str(exc)
        current_app.logger.info("%s %s refused (%d): %s", request.method,
                                security.printable(request.path), status,
                                security.printable(message, 300))
        if is_htmx():
            return make_response(render_template("dashboard/_error.html", error=message), status, headers)
        return see_other(_refused_location(exc, message))
    if is_htmx():
        task_id = (request.view_args or {}).get("task_id")
        if request.form.get("view") == "task" and task_id is not None:
            # From a task's page: show that task again (now cancelled, or
            # linking to its retry), not the dashboard's regions. A form
            # about no task (Run now) gets the regions whatever it sends.
            return render_task(parse_task_id(task_id), current_queue.tag)
        return render_live("dashboard/_live_after_post.html", snapshot())
    return see_other(back(result))


def _refused_location(exc: QueueError, message: str) -> str:
    """The page a refused plain post came from, with the reason signed into its address:
    the task's page for a form on it (``view=task``) unless the task is unknown, else
    the dashboard (in presenter mode if the form was)."""
    refused = {notices.PARAM: notices.sign(message)}
    number = read_task_id((request.view_args or {}).get("task_id"))
    if request.form.get("view") == "task" and number is not None and exc.status != 404:
        return url_for(".task_detail", task_id=number, **refused)
    if presenting():
        return url_for(".index", present=1, **refused)
    return url_for(".index", **refused)


def _form_params(kind: TaskKind, form: Mapping[str, str]) -> dict[str, Any]:
    """The kind's parameters from a form; an empty field means the default."""
    params = {}
    for name in kind.params:
        value = form.get(name, "").strip()
        if value:
            params[name] = value
    return params


@bp.post("/tasks")
def add_tasks() -> Response:
    """Add work from the page's form."""
    form = request.form

    def add() -> list[TaskId]:
        kind = current_queue.registry.get(form.get("kind", "").strip()
                                          or default_kind())
        return submit(kind.name, form.get("count", "1"), _form_params(kind, form),
                      form.get("delay", "").strip())

    return _form_action(add, lambda ids: home())


@bp.post("/pause")
def pause() -> Response:
    """The page's *Pause* (a form, or htmx): the workers take nothing new."""
    return _form_action(current_queue.pause, lambda _: home())


@bp.post("/resume")
def resume() -> Response:
    """The page's *Resume* (a form, or htmx)."""
    return _form_action(current_queue.resume, lambda _: home())


@bp.post("/workers")
def workers() -> Response:
    """Form field ``delta`` (+1 or -1 from the buttons; clamped) or ``count``."""
    return _form_action(lambda: set_workers(request.form), lambda _: home())


@bp.post("/history/clear")
def clear_history() -> Response:
    """The page's *Clear history*: forget the finished tasks (the counters keep
    their totals)."""
    return _form_action(current_queue.clear_history, lambda _: home())


@bp.post("/reset")
def reset() -> Response:
    """Clear counters and history for the next run; queued and running work stays."""
    return _form_action(current_queue.reset, lambda _: home())


def _back_to_task(task_id: TaskId) -> str:
    if request.form.get("view") == "task":
        return url_for(".task_detail", task_id=task_id)
    return home()


@bp.post("/tasks/<task_id>/cancel")
def cancel_task(task_id: str) -> Response:
    """A task's *Cancel* (a form, or htmx); ``409`` once it finished."""
    def cancel() -> str:
        checked = parse_task_id(task_id)
        current_queue.cancel(checked)
        return checked

    return _form_action(cancel, _back_to_task)


@bp.post("/tasks/<task_id>/retry")
def retry_task(task_id: str) -> Response:
    """Retry from a form; a second click answers like the first, and queues nothing."""
    return _form_action(lambda: retry(task_id), lambda answer: _back_to_task(answer[0].id))


@bp.post("/schedules/<name>/run")
def run_schedule_now(name: str) -> Response:
    """A schedule's "Run now": its task is queued now, and its next due time stays."""
    return _form_action(lambda: run_schedule(name), lambda _: home())
