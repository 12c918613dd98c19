"""The dashboard's pages a person opens: the dashboard (with its "Add work" form,
made from the kinds the app registered), a task's page, and the "find a task" form."""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple

from flask import Response, abort, redirect, request, url_for

from ..errors import TaskNotFound
from ..ext import current_queue
from ..records import TaskInfo
from ..tasks import Bool, Float, Int, Param, Str, TaskKind
from . import notices
from .answers import TASK_ID_RULE, message_page, page, parse_task_id, printable_id, read_task_id
from .blueprint import bp
from .live import page_data, snapshot, task_data


@bp.get("/")
def index() -> Response:
    """The dashboard; ``?refused=`` shows why a plain form post was refused."""
    fields = form_fields(current_queue.registry.kinds())
    return page("dashboard/index.html", **page_data(snapshot(), error=refusal(), fields=fields))


class Field(NamedTuple):
    """One parameter field of the "Add work" form, for every kind that declares it."""

    name: str
    label: str
    #: "number", "text" or "choice" (a select whose first option is the default).
    widget: str
    #: What the input allows: min, max, step, maxlength, inputmode, and for a choice the options.
    attrs: dict[str, Any]
    choices: tuple[str, ...]
    #: The kinds that take it (the page shows it while one of them is chosen).
    kinds: tuple[str, ...]
    #: The kinds that cannot run without it.
    required_by: tuple[str, ...]
    #: What an empty field means: the default when its kinds agree on one, "required"
    #: when every kind needs it, else "default".
    placeholder: str

    @property
    def hint(self) -> str:
        """Which kinds take it, and which need it: "(pretend, flaky)", "(send_report, required)"."""
        if self.required_by == self.kinds:
            return f"({', '.join(self.kinds)}, required)"
        if self.required_by:
            return f"({', '.join(self.kinds)}; required by {', '.join(self.required_by)})"
        return f"({', '.join(self.kinds)})"


def form_fields(kinds: Iterable[TaskKind]) -> list[Field]:
    """A field per parameter name the registered kinds declare, in the order they
    first appear. Kinds that share a name share the field, drawn from the first
    kind's spec: the server checks each submit against its own kind's."""
    seen: dict[str, tuple[Param, list[TaskKind]]] = {}
    for kind in kinds:
        for name, spec in kind.params.items():
            seen.setdefault(name, (spec, []))[1].append(kind)
    fields = []
    for name, (spec, users) in seen.items():
        widget, attrs, choices = _widget(spec)
        required_by = tuple(k.name for k in users if name in k.required)
        defaults = {repr(k.defaults.get(name)) for k in users}
        default = users[0].defaults.get(name) if len(defaults) == 1 else None
        if default is not None:
            placeholder = _shown(default)
        else:
            placeholder = "required" if len(required_by) == len(users) else "default"
        fields.append(Field(name, name.replace("_", " ").capitalize(), widget, attrs, choices,
                            tuple(k.name for k in users), required_by, placeholder))
    return fields


def _shown(value: Any) -> str:
    """A default as a form would spell it: 0.3, true, pdf."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _widget(spec: Param) -> tuple[str, dict[str, Any], tuple[str, ...]]:
    if isinstance(spec, Int):
        return "number", {"min": spec.min, "max": spec.max, "step": 1,
                          "inputmode": "numeric"}, ()
    if isinstance(spec, Float):
        return "number", {"min": f"{spec.min:g}", "max": f"{spec.max:g}", "step": "any",
                          "inputmode": "decimal"}, ()
    if isinstance(spec, Bool):
        return "choice", {}, ("true", "false")
    if isinstance(spec, Str) and spec.choices:
        return "choice", {}, spec.choices
    if isinstance(spec, Str):
        return "text", {"maxlength": spec.max_length}, ()
    return "text", {}, ()  # a Param of the app's own: the server's check says what it takes


def refusal() -> str | None:
    """The refusal this page was sent back with (:mod:`.notices`), if any."""
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
