"""The dashboard's pages a person opens: the dashboard, a task's page, and the
"find a task" form."""

from __future__ import annotations

from flask import Response, abort, redirect, request, url_for

from ..errors import TaskNotFound
from ..ext import current_queue
from ..records import TaskInfo
from . import notices
from .answers import TASK_ID_RULE, message_page, page, parse_task_id, printable_id, read_task_id
from .blueprint import bp
from .live import page_data, snapshot, task_data


@bp.get("/")
def index() -> Response:
    """The dashboard; ``?refused=`` shows why a plain form post was refused."""
    return page("dashboard/index.html", **page_data(snapshot(), error=refusal()))


def refusal() -> str | None:
    """The refusal this page was sent back with (:mod:`dashboard.notices`), if any."""
    if not request.query_string:
        return None
    return notices.read(request.args.get(notices.PARAM))


def _task_or_404(raw: str) -> TaskInfo:
    """The task, or a 404 page: templates never receive ``None``.

    Read the queue's tag before calling this: see :func:`render_task`.
    """
    try:
        info = current_queue.get(parse_task_id(raw))
    except TaskNotFound:
        info = None
    if info is None:
        abort(message_page(f"no task {raw[:40]!r}: unknown, or no longer in the history", 404))
    return info


@bp.get("/tasks/<task_id>")
def task_detail(task_id: str) -> Response:
    """A task's page; ``?refused=`` shows why a plain form post on it was refused."""
    tag = current_queue.tag  # before the task: see render_task
    info = _task_or_404(task_id)
    return page("dashboard/task.html", error=refusal(), **task_data(info, tag))


@bp.get("/tasks/lookup")
def task_lookup() -> Response:
    """The page's "find a task" form: ``?id=42`` (or ``#42``) → the task's page."""
    raw = request.args.get("id", "").strip().lstrip("#")
    task_id = read_task_id(raw)
    if task_id is None:
        return message_page(f"id must be a task id like 42 ({TASK_ID_RULE}), got "
                            f"{printable_id(raw)}", 400)
    return redirect(url_for(".task_detail", task_id=task_id), 303)
