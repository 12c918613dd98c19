"""The SQLite rows: submits and end to end against a bare single-row INSERT + commit."""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time

from dashboard.local.sqlite import SqliteStore
from dashboard.local.queue import WorkQueue

from .engine import drain_rate, registry


def sqlite_submit_rate(n: int) -> float:
    """Submits per second into a fresh SQLite store, no worker running."""
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(os.path.join(tmp, "q.db"), max_queued=n)
        q = WorkQueue(0, registry=registry, store=store)
        try:
            start = time.perf_counter()
            submit = q.submit
            for _ in range(n):
                submit("noop")
            return n / (time.perf_counter() - start)
        finally:
            q.shutdown(timeout=5)


def sqlite_bare_insert_rate(n: int) -> float:
    """The limit for a durable submit: one single-row INSERT and commit per task, same mode."""
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(os.path.join(tmp, "bare.db"), isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, kind TEXT, params TEXT, at REAL)")
            start = time.perf_counter()
            execute = conn.execute
            for _ in range(n):
                execute("BEGIN IMMEDIATE")
                execute("INSERT INTO t (kind, params, at) VALUES ('noop', '{}', ?)", (time.time(),))
                execute("COMMIT")
            return n / (time.perf_counter() - start)
        finally:
            conn.close()


def sqlite_end_to_end_rate(n: int) -> float:
    """Submit ``n`` and join, one worker thread, SQLite store."""
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(os.path.join(tmp, "q.db"), max_queued=n, poll_interval=0.05)
        return drain_rate(WorkQueue(1, registry=registry, store=store), n)
