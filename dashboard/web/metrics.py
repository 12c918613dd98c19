"""``GET /metrics``: the queue in Prometheus's text format, for a scraper.

Written with the official client library, ``prometheus_client``, on a registry
made for each scrape: never the library's global one, which an app may fill
with metrics of its own (and which would add this process's own numbers to a
queue's). Its one collector turns one :meth:`~dashboard.backend.Backend.metrics`
read into the metric families, so the numbers of a scrape agree with each other
(the stores keep the totals as tasks change state: a scrape reads no history).

With the SQLite store every process reads the one shared queue: a scrape of any
process of a server gives the same totals, so scrape one address and add
nothing up. The route is behind the access token like the others (a scraper
sends it as ``Authorization: Bearer``), unless ``QUEUE_METRICS_PUBLIC`` opens it
for a scraper on a private network (see :func:`.security.access_refusal`).
"""

from __future__ import annotations

from typing import Iterator

from flask import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.utils import floatToGoString

from ..ext import current_queue
from ..records import DURATION_BUCKETS, Metrics
from .blueprint import bp

#: The per-kind counters: a KindStats field, and what it counts.
COUNTERS = (
    ("submitted", "Tasks submitted (queued, or scheduled for later) since the last reset."),
    ("done", "Tasks that finished done since the last reset."),
    ("failed", "Tasks that failed for good since the last reset."),
    ("cancelled", "Tasks cancelled since the last reset (before they started, or running)."),
    ("retried", "Failed attempts that the kind's retry policy scheduled again since the last "
                "reset (a retry from the page is a new task, counted as submitted)."),
)

#: The per-kind histograms: a KindStats field, the metric's name, and what it measures.
HISTOGRAMS = (
    ("wait", "queue_task_wait_seconds", "Seconds from being queued (or falling due) to each "
                                        "start, since the last reset."),
    ("run", "queue_task_run_seconds", "Seconds from each start to the end of that attempt "
                                      "(done, failed, cancelled or retried), since the last "
                                      "reset."),
)

#: The ``le`` labels of the buckets, as the library writes them ("0.005", "1.0", "+Inf").
_BOUNDS = tuple(floatToGoString(bound) for bound in DURATION_BUCKETS)


class QueueCollector:
    """The metric families of one read of the queue (a collector of one scrape)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        for field, text in COUNTERS:
            counter = CounterMetricFamily(f"queue_tasks_{field}", text, labels=["kind"])
            for kind in metrics.kinds:
                counter.add_metric([kind.kind], getattr(kind, field))
            yield counter
        for name, value, text in (
            ("queue_tasks_queued", metrics.queued, "Tasks waiting for a worker now."),
            ("queue_tasks_scheduled", metrics.scheduled,
             "Delayed tasks (and automatic retries) not yet due."),
            ("queue_tasks_running", metrics.running, "Tasks running now."),
            ("queue_workers", metrics.workers,
             "Worker threads alive, of every process sharing the queue."),
            ("queue_paused", int(metrics.paused), "1 while the queue is paused, else 0."),
            ("queue_oldest_queued_seconds", metrics.oldest_wait or 0.0,
             "Seconds the oldest queued task has waited; 0 when none is queued."),
        ):
            yield GaugeMetricFamily(name, text, value=value)
        for field, name, text in HISTOGRAMS:
            histogram = HistogramMetricFamily(name, text, labels=["kind"])
            for kind in metrics.kinds:
                durations = getattr(kind, field)
                histogram.add_metric(
                    [kind.kind], [*zip(_BOUNDS, durations.buckets), ("+Inf", durations.count)],
                    durations.sum)
            yield histogram


def exposition(metrics: Metrics) -> bytes:
    """``metrics`` in the text format, through a registry of their own."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(metrics))
    return generate_latest(registry)


@bp.get("/metrics")
def metrics() -> Response:
    """The queue for Prometheus: counters and histograms by kind, and the gauges. A store
    that cannot be read now is a 503 (the blueprint's answer), a failed scrape."""
    return Response(exposition(current_queue.metrics()), content_type=CONTENT_TYPE_LATEST)
