"""Periodic tasks: schedules declared in code, a cron expression or an interval each.

A :class:`Schedule` says when a task of one kind (with fixed params) is due:
``cron="0 2 * * *"`` (read by `cronsim`_, in UTC unless ``tz`` names a zone)
or ``every=60`` (seconds, counted from the epoch, so every process and every
restart agrees on the due times: ``every=3600`` is due on the hour). Its
``next_after(t)`` gives the first due time after ``t``; when a due time comes,
the queue's scheduler claims it in the store and queues one task for it
(see :meth:`dashboard.local.WorkQueue.run_schedules`).

This module imports nothing from Flask.

.. _cronsim: https://pypi.org/project/cronsim/
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from datetime import datetime, timezone
from typing import Any, Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

#: A due time the scheduler finds later than this was missed while no process ran the
#: queue (it was stopped, or restarting): every such due time is run once, together,
#: for the latest of them. Due times found less late each get their own run.
CATCH_UP = 60.0

#: The shortest and longest interval.
MIN_EVERY = 1.0
MAX_EVERY = 366 * 24 * 3600.0

#: A schedule's name: it is part of the "run now" URL.
NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")


@dataclass(frozen=True)
class Schedule:
    """When a task of ``kind`` with ``params`` is due: ``cron`` or ``every`` seconds."""

    name: str
    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)
    cron: str | None = None
    every: float | None = None
    tz: str = "UTC"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME.fullmatch(self.name):
            raise ValueError(f"schedule name must be 1 to 100 letters, digits, '_', '.' or "
                             f"'-', got {self.name!r}")
        if (self.cron is None) == (self.every is None):
            raise ValueError(f"schedule {self.name!r}: give cron or every, not "
                             f"{'both' if self.cron is not None else 'neither'}")
        try:
            zone = timezone.utc if self.tz == "UTC" else ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ValueError(f"schedule {self.name!r}: unknown time zone {self.tz!r} "
                             "(a name such as 'Europe/Riga', or 'UTC')") from None
        object.__setattr__(self, "_zone", zone)
        if self.every is not None:
            every = self.every
            if (isinstance(every, bool) or not isinstance(every, (int, float))
                    or not math.isfinite(every) or not MIN_EVERY <= every <= MAX_EVERY):
                raise ValueError(f"schedule {self.name!r}: every must be a number of seconds "
                                 f"from {MIN_EVERY:g} to {MAX_EVERY:.0f} (366 days), got "
                                 f"{every!r}")
            object.__setattr__(self, "every", float(every))
            return
        if not isinstance(self.cron, str):
            raise ValueError(f"schedule {self.name!r}: cron must be a string such as "
                             f"'0 2 * * *', got {self.cron!r}")
        try:
            next(CronSim(self.cron, datetime.now(zone)))
        except CronSimError as exc:
            raise ValueError(f"schedule {self.name!r}: {self.cron!r} is not a cron expression "
                             f"cronsim reads ({exc})") from None
        except StopIteration:
            raise ValueError(f"schedule {self.name!r}: {self.cron!r} is never due") from None

    @property
    def spec(self) -> str:
        """What decides the due times: a store that holds another spec for this name
        forgets its next due time (the code changed) and starts from this one."""
        if self.every is not None:
            return f"every {self.every:g}"
        return f"cron {self.cron} {self.tz}"

    @property
    def expression(self) -> str:
        """As the code gave it: the cron expression, or the interval."""
        if self.every is not None:
            return f"every {_seconds(self.every)}"
        return self.cron if self.tz == "UTC" else f"{self.cron} ({self.tz})"

    @cached_property
    def description(self) -> str:
        """In words: "Every 10th second of every minute (UTC)", "every 5 minutes"."""
        if self.every is not None:
            return f"every {_seconds(self.every)}, counted from the epoch (UTC)"
        try:
            words = CronSim(self.cron, datetime.now(self._zone)).explain()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - the words are a nicety; the expression stands
            words = self.cron
        return f"{words} ({self.tz})"

    def next_after(self, moment: float) -> float:
        """The first due time after ``moment`` (seconds since the epoch)."""
        if self.every is not None:
            return (math.floor(moment / self.every) + 1) * self.every
        start = datetime.fromtimestamp(moment, self._zone)  # type: ignore[attr-defined]
        return next(CronSim(self.cron, start)).timestamp()  # type: ignore[arg-type]


def _seconds(value: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if value >= size and value % size == 0:
            count = int(value // size)
            return f"{count} {unit}s" if count != 1 else unit
    return f"{value:g} seconds" if value != 1 else "second"


__all__ = ["CATCH_UP", "Schedule"]
