"""Task kinds: the registry of named functions a queue may run, and their params.

Only a registered kind can ever run. A request names a kind (a string), never
a function or a module, and every parameter it passes is checked against the
kind's declared :class:`Param` specs before anything is queued.

This module imports nothing from Flask.
"""

from __future__ import annotations

import inspect
import math
import random
import time
from datetime import datetime, timedelta
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .errors import InvalidParam, ScheduleNotFound, UnknownKind
from .errors import short as _short
from .periodic import Schedule


class Param:
    """The spec of one task parameter: how to parse it and which values are allowed."""

    kind_name = "value"

    def parse(self, name: str, value: object) -> Any:
        """Return the checked value or raise :class:`.InvalidParam` naming ``name``."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short text of the allowed values, used in error messages and docs."""
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Param):
    """An integer from ``min`` to ``max`` inclusive. Form strings like ``"12"`` are accepted."""

    min: int
    max: int

    def describe(self) -> str:
        return f"an integer from {self.min} to {self.max}"

    def parse(self, name: str, value: object) -> int:
        if isinstance(value, bool):
            raise InvalidParam(name, f"must be {self.describe()}, got {_short(value)}")
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise InvalidParam(name, f"must be {self.describe()}, got {_short(value)}") from None
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or not self.min <= value <= self.max:
            raise InvalidParam(name, f"must be {self.describe()}, got {_short(value)}")
        return value


@dataclass(frozen=True)
class Float(Param):
    """A finite number from ``min`` to ``max`` inclusive."""

    min: float
    max: float

    def describe(self) -> str:
        return f"a number from {self.min:g} to {self.max:g}"

    def parse(self, name: str, value: object) -> float:
        if isinstance(value, bool):
            raise InvalidParam(name, f"must be {self.describe()}, got {_short(value)}")
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise InvalidParam(name, f"must be {self.describe()}, got {_short(value)}") from None
        if not isinstance(value, (int, float)):
            raise InvalidParam(name, f"must be {self.describe()}, got {_short(value)}")
        if isinstance(value, int) and not -1e308 < value < 1e308:
            # A JSON integer too big for a float: float() would raise OverflowError.
            raise InvalidParam(name, f"must be {self.describe()}, got an integer of "
                               f"{value.bit_length()} bits")
        value = float(value)
        if not math.isfinite(value) or not self.min <= value <= self.max:
            raise InvalidParam(name, f"must be {self.describe()}, got {_short(value)}")
        return value


@dataclass(frozen=True)
class Str(Param):
    """A string of at most ``max_length`` characters, optionally one of ``choices``."""

    max_length: int = 200
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.choices:
            return "one of: " + ", ".join(self.choices)
        return f"a string of at most {self.max_length} characters"

    def parse(self, name: str, value: object) -> str:
        if not isinstance(value, str) or len(value) > self.max_length:
            raise InvalidParam(name, f"must be {self.describe()}, got {_short(value)}")
        if self.choices and value not in self.choices:
            raise InvalidParam(name, f"must be {self.describe()}, got {_short(value)}")
        return value


@dataclass(frozen=True)
class Bool(Param):
    """``true`` or ``false``; form and environment spellings like ``"1"`` or ``"off"`` too."""

    TRUE = frozenset({"1", "true", "yes", "on"})
    FALSE = frozenset({"0", "false", "no", "off"})

    def describe(self) -> str:
        return "true or false"

    def parse(self, name: str, value: object) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in self.TRUE | self.FALSE:
            return value.strip().lower() in self.TRUE
        raise InvalidParam(name, f"must be {self.describe()}, got {_short(value)}")


@dataclass(frozen=True)
class Retry:
    """A kind's automatic retries: a failing attempt is tried again, up to ``attempts``
    tries in all, after a wait that doubles from ``backoff`` seconds up to
    ``max_backoff``, each wait a random 50% to 100% of that (so retries of many
    tasks that failed together spread out). Only exceptions of the types in ``on``
    retry; any other fails the task at once, as does a cancel."""

    attempts: int = 3
    backoff: float = 1.0
    max_backoff: float = 300.0
    on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) \
                or not 1 <= self.attempts <= 100:
            raise ValueError(f"Retry: attempts must be an integer from 1 to 100, got "
                             f"{self.attempts!r}")
        if not 0 <= self.backoff <= self.max_backoff <= MAX_DELAY:
            raise ValueError("Retry: need 0 <= backoff <= max_backoff <= 30 days, got "
                             f"backoff={self.backoff!r}, max_backoff={self.max_backoff!r}")
        on = self.on if isinstance(self.on, tuple) else (self.on,)
        if not on or not all(isinstance(t, type) and issubclass(t, BaseException) for t in on):
            raise ValueError(f"Retry: on must be exception types, got {self.on!r}")
        object.__setattr__(self, "on", on)

    def wait(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds before the try after ``attempt`` (1 for the first) failed."""
        capped = min(self.max_backoff, self.backoff * 2 ** min(attempt - 1, 60))
        return capped * (rng or random).uniform(0.5, 1.0)

    def retries(self, exc: BaseException, attempt: int) -> bool:
        """Whether a failure ``exc`` of try ``attempt`` is tried again."""
        return attempt < self.attempts and isinstance(exc, self.on)


@dataclass(frozen=True)
class TaskKind:
    """A registered task: its name, the function, and the parameters it accepts."""

    name: str
    fn: Callable[..., Any]
    params: Mapping[str, Param] = field(default_factory=dict)
    description: str = ""
    #: Parameters the function has no default for: a submit without one is refused.
    required: tuple[str, ...] = ()
    #: The function's defaults for its declared parameters (None left out): what an
    #: empty field in the dashboard's form means.
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: Automatic retries of a failing attempt, or None.
    retry: Retry | None = None
    #: Seconds a task of this kind may run (a submit may give its own), or None.
    time_limit: float | None = None

    def check_params(self, given: Mapping[str, object]) -> dict[str, Any]:
        """Return ``given`` parsed against the specs; unknown names, and a missing
        required one, are refused (at submit, not when the task runs)."""
        specs = self.params
        if not given:
            self._check_required({})
            return {}
        checked = {}
        for name, value in given.items():
            spec = specs.get(name)
            if spec is None:
                allowed = ", ".join(specs) or "none"
                raise InvalidParam(
                    name, f"is not a parameter of {self.name!r} (allowed: {allowed})"
                )
            checked[name] = spec.parse(name, value)
        self._check_required(checked)
        return checked

    def _check_required(self, given: Mapping[str, object]) -> None:
        for name in self.required:
            if name not in given:
                raise InvalidParam(name, f"is required by {self.name!r}: it must be "
                                   f"{self.params[name].describe()}")


class Registry:
    """A set of task kinds, looked up by name.

    Most apps use the module-level default registry through :func:`task`.
    Tests and embedding apps that want isolation make their own.
    """

    def __init__(self) -> None:
        self._kinds: dict[str, TaskKind] = {}
        self._schedules: dict[str, Schedule] = {}

    def task(
        self,
        name: str | None = None,
        *,
        params: Mapping[str, Param] | None = None,
        description: str | None = None,
        retry: Retry | int | None = None,
        time_limit: float | None = None,
        cron: str | None = None,
        every: float | None = None,
        tz: str = "UTC",
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register the decorated function as a task kind called ``name``.

        The function is called as ``fn(ctx, **params)``; ``ctx`` is a
        :class:`~dashboard.TaskContext`. ``params`` declares each keyword
        argument that may be passed when the task is submitted, with its type
        and range; anything else is refused at submit time. ``retry`` tries a
        failing attempt again (:class:`Retry`; a number: that many attempts).
        ``time_limit`` (seconds): past it ``ctx.cancelled`` turns true, and a task
        that then ends is failed as timed out (a submit may give its own limit).
        ``cron`` or ``every`` also makes it periodic: a schedule of the kind's name
        with no params (see :meth:`~dashboard.Registry.schedule`).
        """
        limit = None if time_limit is None else check_time_limit(time_limit)
        policy = Retry(retry) if isinstance(retry, int) and not isinstance(retry, bool) else retry
        if policy is not None and not isinstance(policy, Retry):
            raise TypeError(f"retry must be a Retry or a number of attempts, got {retry!r}")

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            kind_name = name or fn.__name__
            specs = dict(params or {})
            required, defaults = _check_signature(kind_name, fn, specs)
            if kind_name in self._kinds and self._kinds[kind_name].fn is not fn:
                raise ValueError(f"task kind {kind_name!r} is already registered")
            doc = description if description is not None else inspect.getdoc(fn) or ""
            self._kinds[kind_name] = TaskKind(
                kind_name, fn, specs, doc.split("\n\n")[0].replace("\n", " "), required,
                defaults, policy, limit,
            )
            if cron is not None or every is not None:
                self.schedule(kind_name, cron=cron, every=every, tz=tz)
            return fn

        return decorator

    def schedule(self, name: str, kind: str | None = None, *, cron: str | None = None,
                 every: float | None = None, params: Mapping[str, Any] | None = None,
                 tz: str = "UTC") -> Schedule:
        """Run a task of ``kind`` (by default the one called ``name``) with ``params``
        periodically: ``cron`` (a cron expression, 5 fields, or 6 with seconds first,
        in UTC unless ``tz`` names a zone) or ``every`` (seconds, counted from the
        epoch: ``every=3600`` is due on the hour). Each due time runs once: once per
        process with the in-memory store, once in all with a shared store.

        The kind must be registered first, and ``params`` must be what a submit of
        it would accept: a mistake fails here, when the app starts.
        """
        kind_name = name if kind is None else kind
        if kind_name not in self._kinds:
            raise ValueError(f"schedule {name!r}: no task kind {kind_name!r} is registered "
                             f"(registered: {', '.join(self.names()) or 'none'}); register "
                             "the kind first")
        try:
            checked = self._kinds[kind_name].check_params(dict(params or {}))
        except InvalidParam as exc:
            raise ValueError(f"schedule {name!r}: {exc}") from None
        made = Schedule(name, kind_name, checked, cron, every, tz)
        known = self._schedules.get(name)
        if known is not None and known != made:
            raise ValueError(f"schedule {name!r} is already registered, as {known.expression} "
                             f"of {known.kind!r}")
        self._schedules[name] = made
        return made

    @property
    def has_schedules(self) -> bool:
        return bool(self._schedules)

    def schedules(self) -> list[Schedule]:
        """Every schedule, by name."""
        return [self._schedules[n] for n in sorted(self._schedules)]

    def get_schedule(self, name: object) -> Schedule:
        """The schedule called ``name``, or :class:`ScheduleNotFound`."""
        try:
            return self._schedules[name]  # type: ignore[index]
        except (KeyError, TypeError):
            raise ScheduleNotFound(name, sorted(self._schedules)) from None

    def get(self, name: object) -> TaskKind:
        """Return the kind called ``name`` or raise :class:`UnknownKind`."""
        try:
            return self._kinds[name]  # type: ignore[index]
        except (KeyError, TypeError):
            raise UnknownKind(name, self.names()) from None

    def names(self) -> list[str]:
        return sorted(self._kinds)

    def kinds(self) -> list[TaskKind]:
        return [self._kinds[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._kinds


def _check_signature(name: str, fn: Callable[..., Any],
                     specs: Mapping[str, Param]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Fail at registration, not at run time, when specs and function disagree;
    the declared parameters the function has no default for, and the defaults
    (other than None) of those it has."""
    sig = inspect.signature(fn)
    positional = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    if not positional:
        raise TypeError(f"task {name!r}: the function must take the task context first")
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    for param_name in sorted(RESERVED & (set(specs) | set(sig.parameters))):
        raise TypeError(f"task {name!r}: a parameter may not be named {param_name!r}: "
                        f"submit() takes it for itself (reserved: {', '.join(sorted(RESERVED))})")
    for param_name, spec in specs.items():
        if not isinstance(spec, Param):
            raise TypeError(f"task {name!r}: spec for {param_name!r} must be a Param")
        if param_name not in sig.parameters and not accepts_kwargs:
            raise TypeError(f"task {name!r}: the function has no parameter {param_name!r}")
    required = []
    defaults = {}
    for param in list(sig.parameters.values())[1:]:  # after the task context
        if param.default is not param.empty:
            if param.name in specs and param.default is not None:
                defaults[param.name] = param.default
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.name not in specs:
            raise TypeError(f"task {name!r}: the function's parameter {param.name!r} has no "
                            "default and no spec, so no submit could give it")
        required.append(param.name)
    return tuple(required), defaults


#: Names submit() takes for itself, so no task parameter may have them.
RESERVED = frozenset({"key", "delay", "at", "time_limit"})

#: Longest unique key.
MAX_KEY_LENGTH = 200


def check_key(value: object) -> str:
    """A unique key as given to submit: 1 to MAX_KEY_LENGTH printable characters."""
    if (not isinstance(value, str) or not 0 < len(value) <= MAX_KEY_LENGTH
            or not value.isprintable()):
        raise InvalidParam("key", f"must be a string of 1 to {MAX_KEY_LENGTH} printable "
                           f"characters, got {_short(value)}")
    return value


#: The longest delay a submit may ask for: 30 days.
MAX_DELAY = 30 * 24 * 3600.0


def check_delay(delay: object = None, at: object = None) -> float | None:
    """Seconds from now until a task is due, from ``delay`` (seconds) or ``at`` (a
    datetime, or seconds since the epoch); None when it is due now. A time past
    is now; more than MAX_DELAY ahead is refused, naming the field."""
    if delay is not None and at is not None:
        raise InvalidParam("at", "cannot be given with delay: give one of them")
    if at is not None:
        if isinstance(at, datetime):
            at = at.timestamp()  # naive: local time, as datetime.timestamp() reads it
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
            raise InvalidParam("at", f"must be a datetime or seconds since the epoch, got "
                               f"{_short(at)}")
        delay = max(0.0, at - time.time())
        if delay > MAX_DELAY:
            raise InvalidParam("at", f"must be at most {MAX_DELAY:.0f}s (30 days) from now, "
                               f"got {delay:.0f}s from now")
        return delay or None
    if delay is None:
        return None
    if isinstance(delay, timedelta):
        delay = delay.total_seconds()
    if (isinstance(delay, bool) or not isinstance(delay, (int, float))
            or not math.isfinite(delay) or not 0 <= delay <= MAX_DELAY):
        raise InvalidParam("delay", f"must be a number of seconds from 0 to {MAX_DELAY:.0f} "
                           f"(30 days), got {_short(delay)}")
    return float(delay) or None


def check_time_limit(value: object) -> float:
    """A time limit in seconds: more than 0, at most 30 days."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or not 0 < value <= MAX_DELAY):
        raise InvalidParam("time_limit", f"must be a number of seconds above 0, at most "
                           f"{MAX_DELAY:.0f} (30 days), got {_short(value)}")
    return float(value)


registry = Registry()
task = registry.task
