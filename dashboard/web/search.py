"""The operator's view as a request asks for it, and what it shows.

A view is which tasks (a :class:`~dashboard.records.TaskFilter`), in which order, from
which page and how many per page. It is read from a query string, a form or a JSON
body, every value checked (a 400 naming the field and what is allowed), and turned back
into the query string that shows it, so a filtered list can be bookmarked, shared and
restored with the back button.

:func:`gather` reads what a view shows through the Backend seam; its :attr:`Shown.digest`
changes exactly when something shown changes, which is what lets the page's poll answer
304 while a burn-down elsewhere moves the queue's own tag.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Iterable, Mapping, NamedTuple

from ..backend import decode_cursor
from ..errors import InvalidParam, QueueError
from ..ext import current_queue
from ..records import (BULK_ACTIONS, FINISHED_STATES, MAX_SEARCH_TEXT, KindHealth, State,
                       TaskFilter, TaskInfo, TaskPage)
from ..tasks import Int
from . import security

#: The orders a list can be shown in.
ORDERS = ("newest", "oldest")
#: Tasks per page: the default, the most, and what the form offers.
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
PAGE_SIZES = (20, 50, 100, 200, 500)
#: The query parameters of a view; ``GET /api/tasks`` refuses any other (but ``action``:
#: the tasks a bulk action would act on).
VIEW_PARAMS = ("state", "kind", "text", "order", "cursor", "limit")
#: The fields of ``POST /api/tasks/bulk``.
BULK_FIELDS = frozenset({"action", "state", "kind", "text", "expected"})
#: The verbs a bulk action is said with, in the order the page offers them.
VERBS = {"retry": "Retry", "cancel": "Cancel", "purge": "Purge"}
STATE_NAMES = ", ".join(s.value for s in State)


class BadQuery(QueueError):
    """A query string with parameters a view does not take (400)."""


class View(NamedTuple):
    """Which tasks a list shows, and which page of them."""

    query: TaskFilter = TaskFilter()
    oldest_first: bool = False
    cursor: str | None = None
    limit: int = DEFAULT_LIMIT

    @property
    def order(self) -> str:
        return "oldest" if self.oldest_first else "newest"

    @property
    def states(self) -> list[str]:
        """The states asked for, in the order the states are listed everywhere."""
        return [s.value for s in State if s in self.query.states]

    def filter_args(self) -> dict[str, Any]:
        """The query string of the filter alone: what a bulk action acts on."""
        args: dict[str, Any] = {}
        if self.query.states:
            args["state"] = self.states
        if self.query.kind is not None:
            args["kind"] = self.query.kind
        if self.query.text:
            args["text"] = self.query.text
        return args

    def args(self, cursor: str | None | bool = True) -> dict[str, Any]:
        """The query string that shows this view (defaults left out); ``cursor``: this
        view's own (True), another page's, or None for the first page."""
        args = self.filter_args()
        if self.oldest_first:
            args["order"] = "oldest"
        if self.limit != DEFAULT_LIMIT:
            args["limit"] = self.limit
        page = self.cursor if cursor is True else cursor
        if page:
            args["cursor"] = page
        return args


def _getlist(values: Mapping[str, Any], name: str) -> list[Any]:
    getlist = getattr(values, "getlist", None)
    if getlist is not None:
        return getlist(name)
    value = values.get(name)
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _text(values: Mapping[str, Any], name: str) -> str:
    """A single text parameter; empty when absent. A JSON body's null is absent too."""
    value = values.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidParam(name, f"must be text, got {type(value).__name__}")
    return value.strip()


def read_states(raw: Iterable[Any]) -> frozenset[State]:
    """States by name, from repeated parameters or commas (``state=failed,cancelled``)."""
    states = set()
    for item in raw:
        if not isinstance(item, str):
            raise InvalidParam("state", f"must be state names ({STATE_NAMES}), got "
                               f"{type(item).__name__}")
        for name in item.split(","):
            name = name.strip().lower()
            if not name:
                continue
            try:
                states.add(State(name))
            except ValueError:
                raise InvalidParam("state", f"must be some of: {STATE_NAMES}; got "
                                   f"{security.printable(name, 40)!r}") from None
    return frozenset(states)


def read_filter(values: Mapping[str, Any]) -> TaskFilter:
    """The filter a query string, a form or a JSON object asks for."""
    states = read_states(_getlist(values, "state"))
    kind = _text(values, "kind") or None
    if kind is not None:
        kind = current_queue.registry.get(kind).name  # unknown: 400 naming the kinds
    text = _text(values, "text") or None
    if text is not None:
        if len(text) > MAX_SEARCH_TEXT:
            raise InvalidParam("text", f"must be at most {MAX_SEARCH_TEXT} characters, got "
                               f"{len(text)}")
        if not text.isprintable():
            raise InvalidParam("text", "must be printable text, without control characters")
    return TaskFilter(states, kind, text)


def read_view(values: Mapping[str, Any], strict: Iterable[str] = ()) -> View:
    """The view a query string (or a form) asks for; ``strict``: no parameters but the
    view's and these."""
    if strict:
        allowed = (*VIEW_PARAMS, *strict)
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            shown = ", ".join(security.printable(str(name), 40) for name in unknown[:5])
            raise BadQuery(f"unknown parameter(s): {shown}; allowed: {', '.join(allowed)}")
    query = read_filter(values)
    order = _text(values, "order").lower() or "newest"
    if order not in ORDERS:
        raise InvalidParam("order", f"must be newest or oldest, got "
                           f"{security.printable(order, 40)!r}")
    cursor = _text(values, "cursor") or None
    decode_cursor(cursor)  # the form; the backend knows whether it gave it out
    raw_limit = values.get("limit")
    limit = DEFAULT_LIMIT if raw_limit in (None, "") else Int(1, MAX_LIMIT).parse("limit",
                                                                                raw_limit)
    return View(query, order == "oldest", cursor, limit)


def read_action(raw: Any) -> str:
    """A bulk action's name: retry, cancel or purge (else a 400 saying so)."""
    if isinstance(raw, str) and raw in BULK_ACTIONS:
        return raw
    got = "nothing" if raw is None or raw == "" else repr(security.printable(str(raw), 40))
    raise InvalidParam("action", f"must be one of: {', '.join(BULK_ACTIONS)}; got {got}")


def acted_on(query: TaskFilter, action: str) -> TaskFilter | None:
    """``query`` narrowed to the tasks ``action`` acts on; None when it can act on none
    (a filter for queued tasks, and a retry): an empty filter would mean every state."""
    target = query.for_action(action)
    return target if target.states else None


def action_count(query: TaskFilter, action: str) -> int:
    """How many tasks ``action`` would act on now (what a confirmation says)."""
    target = acted_on(query, action)
    return 0 if target is None else current_queue.count(target)


def check_search(query: TaskFilter) -> None:
    """A 400 naming the field when this backend cannot do the search."""
    current_queue.capabilities.check_filter(query, current_queue.description)


# -- what a view shows, in words ---------------------------------------------------------


def state_words(states: Iterable[State], joiner: str = " or ") -> str:
    """"failed", "queued or scheduled", "finished" (all three finished states)."""
    states = frozenset(states)
    if states == FINISHED_STATES:
        return "finished"
    order = [State.FAILED, State.CANCELLED, State.QUEUED, State.SCHEDULED, State.RUNNING,
             State.DONE]
    return joiner.join(s.value for s in order if s in states)


def button_label(action: str, query: TaskFilter, count: int) -> str:
    """"Retry 312 failed", "Cancel 5 queued/scheduled", "Purge 40 finished"."""
    return f"{VERBS[action]} {count} {state_words(query.for_action(action).states, '/')}"


def question(action: str, query: TaskFilter, count: int) -> str:
    """"Retry 312 failed tasks of kind flaky matching 'timeout'?": what Confirm will do."""
    noun = "task" if count == 1 else "tasks"
    words = [VERBS[action], str(count), state_words(query.for_action(action).states), noun]
    if query.kind is not None:
        words.append(f"of kind {query.kind}")
    if query.text:
        words.append(f"matching {query.text!r}")
    return " ".join(words) + "?"


# -- what a view shows ---------------------------------------------------------------------


class Shown(NamedTuple):
    """What the list page shows of the queue, read through the seam."""

    #: The page of tasks, and how many match in all (None: search is not available).
    page: TaskPage | None
    total: int | None
    #: ``(action, count)`` for each bulk action with something to act on (for those who
    #: may act; empty for the others).
    actions: tuple[tuple[str, int], ...]
    #: Each kind's health (None: not available).
    health: tuple[KindHealth, ...] | None

    @property
    def digest(self) -> str:
        """Changes when anything shown changes: each task's id, state, whole percent and
        retry, the page's cursors, the counts, each kind's health."""
        tasks = () if self.page is None else tuple(_row_key(t) for t in self.page.tasks)
        cursors = None if self.page is None else (self.page.newer, self.page.older)
        return _hash(repr((tasks, cursors, self.total, self.actions, self.health)))


def _row_key(task: TaskInfo) -> tuple[Any, ...]:
    return (task.id, task.state.value, task.percent, task.retried_as, task.cancel_requested,
            task.finished_at)


def _hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=9).hexdigest()


def gather(view: View | None, can_act: bool) -> Shown:
    """Read what the page shows: ``view``'s page (None: search is not available) and its
    counts, the bulk actions' counts for those who may act, and each kind's health."""
    queue = current_queue
    capabilities = queue.capabilities
    page = total = None
    actions: list[tuple[str, int]] = []
    if view is not None:
        page = queue.find(view.query, limit=view.limit, cursor=view.cursor,
                          oldest_first=view.oldest_first)
        total = queue.count(view.query)
        if can_act:
            for action in BULK_ACTIONS:
                count = action_count(view.query, action)
                if count:
                    actions.append((action, count))
    health = tuple(queue.kind_health()) if capabilities.kind_health else None
    return Shown(page, total, tuple(actions), health)


def quick_tag(view: View | None, can_act: bool) -> str:
    """The cheap half of the page's tag: the queue's own tag (which moves whenever
    anything a snapshot shows moves), the view, who looks, and the minute (each kind's
    last hour slides by the minute). While it holds, nothing shown can have changed."""
    queue = current_queue
    key = (queue.tag, queue.identity, None if view is None else view.args(), can_act,
           int(time.time() // 60))
    return _hash(repr(key))


__all__ = ["BULK_FIELDS", "acted_on", "action_count", "DEFAULT_LIMIT", "MAX_LIMIT", "ORDERS", "PAGE_SIZES", "VIEW_PARAMS",
           "BadQuery", "Shown", "View", "button_label", "check_search", "gather", "question",
           "quick_tag", "read_action", "read_filter", "read_states", "read_view",
           "state_words"]
