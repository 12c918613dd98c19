"""The queue-depth chart: a snapshot's per-second record as inline SVG data.

The view hands the template plain numbers (a polyline's points, the axis
labels); the template draws them. No chart library, no JavaScript.
"""

from __future__ import annotations

import math
from typing import Any

from ..records import SERIES_SECONDS, Snapshot

WIDTH = 600
HEIGHT = 140


def _nice_ceiling(value: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50... that is at least ``value``."""
    if value <= 1:
        return 1
    power = 10 ** int(math.floor(math.log10(value)))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power  # pragma: no cover - unreachable


def depth_chart(snap: Snapshot, seconds: int | None = None) -> dict[str, Any]:
    """Step-line points of the queue depth over the last ``seconds``, up to now.

    By default the window covers the recorded activity, in whole minutes
    from one to five, so a run that just started fills the chart.

    The depth holds between the seconds in which something happened, so each
    recorded second is a step (up to its peak, then to its final depth); the
    line runs on to now at the last depth.
    """
    end = snap.taken_at
    if seconds is None:
        first = snap.series[0][0] if snap.series else end
        seconds = min(SERIES_SECONDS, max(60, math.ceil((end - first) / 60) * 60))
    start = end - seconds
    points = [entry for entry in snap.series if entry[0] + 1 > start]
    peak = max((high for _, _, high in points), default=snap.queued)
    top = _nice_ceiling(max(peak, snap.queued, 1))

    # A changed poll draws this every time: plain arithmetic in one loop,
    # each point formatted once (it was a sixth of a poll's render).
    x_scale = WIDTH / seconds
    y_scale = HEIGHT / top

    def x(t: float) -> float:
        return round((min(max(t, start), end) - start) * x_scale, 1)

    coords: list[tuple[float, float]] = []
    previous = None
    for second, depth, high in points:
        sx = x(second)
        if previous is not None:
            coords.append((sx, round(HEIGHT - previous * y_scale, 1)))  # hold the old depth
        if high != depth:
            coords.append((sx, round(HEIGHT - high * y_scale, 1)))  # a burst drained within it
        coords.append((sx, round(HEIGHT - depth * y_scale, 1)))
        previous = depth
    if coords:
        coords.append((x(end), round(HEIGHT - snap.queued * y_scale, 1)))
    line = " ".join([f"{a:g},{b:g}" for a, b in coords])
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "points": line,
        "area": f"{coords[0][0]:g},{HEIGHT} {line} {coords[-1][0]:g},{HEIGHT}" if coords else "",
        "top": top,
        "half": top / 2,
        "minutes": seconds // 60,
        "window": "minute" if seconds == 60 else f"{seconds // 60} minutes",
        "peak": peak,
        "label": (
            f"Queue depth over the last {'minute' if seconds == 60 else f'{seconds // 60} minutes'}:"
            f" now {snap.queued}, peak {peak}."
        ),
    }
