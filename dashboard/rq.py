"""The RQ backend: ``QUEUE_URL=redis://...`` runs the same tasks as RQ jobs on Redis.

The web processes only submit and read; the tasks run in ``flask queue worker``
processes (RQ workers, :class:`QueueWorker`) on any number of machines, each
job inside the app's context with the app's registry.

**Only registered kinds ever run.** A job carries a kind and JSON params (RQ's
JSON serializer, never a pickle), and its function is always :func:`run_task`,
the single entry point. The worker refuses, without importing or calling
anything, any job whose function, callbacks or arguments are not that (a job
written straight into Redis with ``os.system`` as its function is failed with
the reason, and nothing runs).

What RQ keeps is read from RQ: the queue, its registries (started, scheduled,
finished, failed, canceled), its workers and their heartbeats, its suspension
(pause), ``enqueue_at`` (delays), ``Retry`` (automatic retries) and job
timeouts (time limits). What the dashboard needs and RQ does not keep lives in
a few keys of our own, under ``flq:<queue>:``, written by one Lua script at
each submit, start and end, so they never disagree with each other:

* ``stats``: the version (the page's tag), the counters, and each kind's
  totals and wait and run time histograms (for ``/metrics``);
* ``sec`` and ``secs``: per second over the last five minutes, the depth at
  its end and its highest, tasks started and ended, wait and run time summed:
  the chart, the rates and the ETA;
* ``history``: finished task ids, newest first, capped at ``QUEUE_HISTORY``
  (the job of an id dropped from it is deleted);
* ``key:<key>``: the task holding a unique key, until it ends;
* ``log:<id>``: a task's last log lines.

Every read is bounded: a poll reads the counters, the first few ids of the
queue and the history and those jobs, and the workers; never a whole registry.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import threading
import time
import traceback
import weakref
from contextlib import nullcontext
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

from redis import Redis
from redis.exceptions import NoScriptError, RedisError
from rq import Queue, Worker
from rq.command import send_stop_job_command
from rq.job import Job, JobStatus, get_current_job
from rq.job import Retry as RQRetry
from rq.serializers import JSONSerializer
from rq.suspension import WORKERS_SUSPENDED, is_suspended, resume as rq_resume
from rq.suspension import suspend as rq_suspend
from rq.timeouts import JobTimeoutException, TimerDeathPenalty
from rq.worker import SimpleWorker, WorkerStatus

from .backend import Backend, Capabilities
from .errors import (CannotScale, InvalidParam, QueueError, QueueFull, ScheduleNotFound, StoreUnavailable,
                     TaskNotFound, WrongState)
from .local import tasklog
from .local.queue import encode_result
from .local.store import MAX_LOG_LINES
from .records import (HEALTH_WINDOW, BulkResult, KindHealth, TaskFilter, TaskPage, percentile)
from .records import (CANNOT_CANCEL, CANNOT_RETRY, DURATION_BUCKETS, SERIES_SECONDS,
                      CANCELLABLE_STATES, RETRYABLE_STATES, Histogram, KindStats, Metrics,
                      NO_DURATIONS, Retried, ScheduleInfo, Snapshot, State, Submitted, TaskId,
                      TaskInfo, WorkerInfo, WorkerState, clean_progress, progress_changed,
                      task_logger)
from .signals import (send as send_signal, task_cancelled, task_failed, task_retried,
                      task_started, task_submitted, task_succeeded)
from .tasks import Registry, check_delay, check_key, check_time_limit

logger = logging.getLogger("dashboard.rq")

#: The one function an RQ job of ours may name.
ENTRY = "dashboard.rq.run_task"
#: URL schemes that select this backend.
SCHEMES = ("redis://", "rediss://", "unix://")

#: Seconds between a worker's heartbeats while it waits for work, and while a job runs.
HEARTBEAT = 5
#: A worker whose last heartbeat is older than this is taken for dead; a job whose
#: worker (and its work horse) died is failed as abandoned this long after the last one.
WORKER_TIMEOUT = 3 * HEARTBEAT
#: Seconds between sweeps for abandoned jobs and dead workers (any process may sweep).
SWEEP_EVERY = 2.0
#: How often a running task's ``ctx.cancelled`` asks Redis (it is read in loops).
CANCEL_CHECK_EVERY = 0.1

SCALE_HINT = ("Workers are separate processes here: change their number where they run "
              "(with your process manager, or start another: flask queue worker).")


# -- the Lua scripts: each one atomic, so the counters, the series and the job agree -------

_TOUCH = """
local function touch(sec, depth)
  local s = tostring(sec)
  redis.call('HSET', KEYS[2], s .. ':d', depth)
  local m = tonumber(redis.call('HGET', KEYS[2], s .. ':m') or '-1')
  if depth > m then redis.call('HSET', KEYS[2], s .. ':m', depth) end
  if redis.call('ZADD', KEYS[3], 'NX', sec, s) == 1 then
    local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', sec - %(keep)d)
    for _, o in ipairs(old) do
      redis.call('HDEL', KEYS[2], o .. ':d', o .. ':m', o .. ':s', o .. ':w', o .. ':e', o .. ':r')
    end
    if #old > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', sec - %(keep)d) end
  end
end

-- Each kind's last hour (kind_health), a hash per wall-clock minute, gone after the hour.
local function per_minute(sec, field)
  local key = KEYS[1] .. ':min:' .. math.floor(sec / 60)
  redis.call('HINCRBY', key, field, 1)
  redis.call('EXPIRE', key, %(minute_ttl)d)
end
""" % {"keep": SERIES_SECONDS + 5, "minute_ttl": HEALTH_WINDOW + 120}

# KEYS: stats, sec, secs, queue. ARGV: second, count, kind.
_SUBMITTED = _TOUCH + """
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HINCRBY', KEYS[1], 'submitted', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'k:' .. ARGV[3] .. ':submitted', ARGV[2])
redis.call('HINCRBY', KEYS[1] .. ':waiting', ARGV[3], ARGV[2])
redis.call('SADD', KEYS[1] .. ':kinds', ARGV[3])
touch(tonumber(ARGV[1]), redis.call('LLEN', KEYS[4]))
return 1
"""

# The submit of tasks due now, in one round trip: the room check, RQ's own job hashes
# (made by RQ: Job.to_dict()) and its push, and our bookkeeping, all or none.
# KEYS: stats, sec, secs, queue, RQ's set of queues. ARGV: second, count, kind, max queued,
# job key prefix, then per job: id, field count, fields and values...
_ENQUEUED = _TOUCH + """
local depth = redis.call('LLEN', KEYS[4])
local count = tonumber(ARGV[2])
if depth + count > tonumber(ARGV[4]) then return {0, depth} end
local i = 6
while i <= #ARGV do
  local id, n = ARGV[i], tonumber(ARGV[i + 1])
  redis.call('HSET', ARGV[5] .. id, unpack(ARGV, i + 2, i + 1 + n))
  redis.call('RPUSH', KEYS[4], id)
  i = i + 2 + n
end
redis.call('SADD', KEYS[5], KEYS[4])
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HINCRBY', KEYS[1], 'submitted', count)
redis.call('HINCRBY', KEYS[1], 'k:' .. ARGV[3] .. ':submitted', count)
redis.call('HINCRBY', KEYS[1] .. ':waiting', ARGV[3], count)
redis.call('SADD', KEYS[1] .. ':kinds', ARGV[3])
touch(tonumber(ARGV[1]), depth + count)
return {1, depth + count}
"""

# KEYS: stats, sec, secs, queue, job. ARGV: second, wait, kind, wait bucket.
_STARTED = _TOUCH + """
local attempt = redis.call('HINCRBY', KEYS[5], 'flq_attempts', 1)
redis.call('HINCRBY', KEYS[1], 'version', 1)
local sec = tonumber(ARGV[1])
touch(sec, redis.call('LLEN', KEYS[4]))
redis.call('HINCRBY', KEYS[2], ARGV[1] .. ':s', 1)
redis.call('HINCRBYFLOAT', KEYS[2], ARGV[1] .. ':w', ARGV[2])
if ARGV[3] ~= '' then
  redis.call('HINCRBY', KEYS[1], 'k:' .. ARGV[3] .. ':wb:' .. ARGV[4], 1)
  redis.call('HINCRBYFLOAT', KEYS[1], 'k:' .. ARGV[3] .. ':ws', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'k:' .. ARGV[3] .. ':wc', 1)
  per_minute(sec, ARGV[3] .. ':w:' .. ARGV[4])
end
if redis.call('HGET', KEYS[5], 'flq_w') == '1' then
  redis.call('HSET', KEYS[5], 'flq_w', '0')
  redis.call('HINCRBY', KEYS[1] .. ':waiting', ARGV[3], -1)
end
return attempt
"""

# The end of an attempt, recorded once (the job's flq_ended holds the last attempt
# recorded: a worker and a sweep that both see a death count it once).
# KEYS: stats, sec, secs, queue, job, history, key holder (or the job again).
# ARGV: second, attempt ('' : the next one, for a task that never started), state
# (done|failed|cancelled|retry), run seconds ('' : it did not run), kind, run bucket,
# error, traceback, result, history cap, id, now, job key prefix, registry prefixes...
_ENDED = _TOUCH + """
if redis.call('EXISTS', KEYS[5]) == 0 then return 0 end
local attempt = tonumber(ARGV[2])
if attempt == nil then attempt = tonumber(redis.call('HGET', KEYS[5], 'flq_attempts') or '0') + 1 end
local ended = tonumber(redis.call('HGET', KEYS[5], 'flq_ended') or '0')
if ended >= attempt then return 0 end
redis.call('HSET', KEYS[5], 'flq_ended', attempt)
local state = ARGV[3]
local kind = ARGV[5]
local sec = tonumber(ARGV[1])
redis.call('HINCRBY', KEYS[1], 'version', 1)
touch(sec, redis.call('LLEN', KEYS[4]))
if ARGV[4] ~= '' and kind ~= '' then
  redis.call('HINCRBY', KEYS[1], 'k:' .. kind .. ':rb:' .. ARGV[6], 1)
  redis.call('HINCRBYFLOAT', KEYS[1], 'k:' .. kind .. ':rs', ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'k:' .. kind .. ':rc', 1)
end
local waiting = redis.call('HGET', KEYS[5], 'flq_w') == '1'
if state == 'retry' then
  if kind ~= '' then redis.call('HINCRBY', KEYS[1], 'k:' .. kind .. ':retried', 1) end
  if not waiting and kind ~= '' then
    redis.call('HSET', KEYS[5], 'flq_w', '1')
    redis.call('HINCRBY', KEYS[1] .. ':waiting', kind, 1)
  end
  local errors = redis.call('HGET', KEYS[5], 'flq_errors') or ''
  local entry = cjson.encode({attempt = attempt, error = ARGV[7], at = tonumber(ARGV[12])})
  if errors == '' then errors = entry else errors = errors .. '\\n' .. entry end
  redis.call('HSET', KEYS[5], 'flq_errors', errors)
  return 1
end
redis.call('HINCRBY', KEYS[1], state, 1)
if kind ~= '' then redis.call('HINCRBY', KEYS[1], 'k:' .. kind .. ':' .. state, 1) end
if waiting then
  redis.call('HSET', KEYS[5], 'flq_w', '0')
  redis.call('HINCRBY', KEYS[1] .. ':waiting', kind, -1)
end
if kind ~= '' and (state == 'done' or state == 'failed') then
  per_minute(sec, kind .. (state == 'done' and ':d' or ':f'))
  if ARGV[4] ~= '' then per_minute(sec, kind .. ':r:' .. ARGV[6]) end
end
redis.call('HINCRBY', KEYS[2], ARGV[1] .. ':e', 1)
if ARGV[4] ~= '' then redis.call('HINCRBYFLOAT', KEYS[2], ARGV[1] .. ':r', ARGV[4]) end
redis.call('HSET', KEYS[5], 'flq_state', state, 'flq_finished', ARGV[12],
           'flq_error', ARGV[7], 'flq_trace', ARGV[8], 'flq_result', ARGV[9])
redis.call('LPUSH', KEYS[6], ARGV[11])
if redis.call('LLEN', KEYS[6]) > tonumber(ARGV[10]) then
  local old = redis.call('RPOP', KEYS[6])
  if old then
    redis.call('DEL', ARGV[13] .. old, 'rq:results:' .. old, KEYS[1] .. ':log:' .. old)
    for i = 14, #ARGV do redis.call('ZREM', ARGV[i], old) end
  end
end
if KEYS[7] ~= KEYS[5] and redis.call('GET', KEYS[7]) == ARGV[11] then
  redis.call('DEL', KEYS[7])
end
return 1
"""

# Forget the finished tasks. KEYS: stats, history. ARGV: job key prefix, registry keys...
_CLEAR = """
local ids = redis.call('LRANGE', KEYS[2], 0, -1)
for _, id in ipairs(ids) do
  redis.call('DEL', ARGV[1] .. id, 'rq:results:' .. id, KEYS[1] .. ':log:' .. id)
  for i = 2, #ARGV do redis.call('ZREM', ARGV[i], id) end
end
redis.call('DEL', KEYS[2])
redis.call('HINCRBY', KEYS[1], 'version', 1)
return #ids
"""


# A job a worker took while paused goes back where it was: before the first of the next
# hundred queued jobs that was queued after it (RQ writes enqueued_at at a fixed width, so
# the text compares as the time does). KEYS: queue, intermediate queue. ARGV: job id, job
# key prefix.
_PUT_BACK = """
redis.call('LREM', KEYS[2], 1, ARGV[1])
local mine = redis.call('HGET', ARGV[2] .. ARGV[1], 'enqueued_at') or ''
local head = redis.call('LRANGE', KEYS[1], 0, 99)
for i, id in ipairs(head) do
  local at = redis.call('HGET', ARGV[2] .. id, 'enqueued_at')
  if at and at > mine then
    return redis.call('LINSERT', KEYS[1], 'BEFORE', id, ARGV[1])
  end
end
if #head < 100 then return redis.call('RPUSH', KEYS[1], ARGV[1]) end
return redis.call('LINSERT', KEYS[1], 'AFTER', head[#head], ARGV[1])
"""


def _bucket(seconds: float) -> int:
    """The index of the first histogram bound at or above ``seconds`` (the last: +Inf)."""
    for index, bound in enumerate(DURATION_BUCKETS):
        if seconds <= bound:
            return index
    return len(DURATION_BUCKETS)


def _ts(value: datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def redis_url_problem(url: str) -> str | None:
    """Why ``url`` cannot name a Redis (a sentence), or None when it can."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return f"it is not a URL ({exc})"
    if parts.scheme == "unix":
        return None if parts.path else "unix:// needs the socket's path: unix:///run/redis.sock"
    if not parts.hostname:
        return f"{parts.scheme}:// needs a host: {parts.scheme}://localhost:6379/0"
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return f"the database must be a number (redis://host:6379/0), got {db!r}"
    try:
        parts.port  # noqa: B018 - raises for a bad port
    except ValueError:
        return "the port must be a number from 1 to 65535"
    return None


def connect(url: str) -> Redis:
    """A Redis client for ``url`` (redis://, rediss:// or unix://) that gives bytes, as RQ
    needs; it does not connect until used."""
    return Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)


class RQBackend(Backend):
    """A queue whose tasks are RQ jobs on Redis, behind the :class:`Backend` seam.

    ``name`` names the RQ queue (and our keys); every web and worker process of
    one app uses the same. Nothing here starts a thread or a process.
    """

    def __init__(self, url: str, registry: Registry, *, name: str = "default",
                 max_queued: int = 10_000, history: int = 1000, retention: float = 604800.0,
                 max_result_bytes: int = 64 * 1024, connection: Redis | None = None):
        self.url = url
        self.registry = registry
        self.name = name
        self.max_queued = max_queued
        self.history = max(1, history)
        self.retention = int(retention)
        self.max_result_bytes = max_result_bytes
        self.connection = connection if connection is not None else connect(url)
        self.shutdown_timeout = 0.0  # (a server process waits for no task: none runs here)
        self.rq_queue = Queue(name, connection=self.connection, serializer=JSONSerializer,
                              default_timeout=-1)
        self._prefix = f"flq:{name}:"
        self._stats = self._prefix + "stats"
        self._sec = self._prefix + "sec"
        self._secs = self._prefix + "secs"
        self._history = self._prefix + "history"
        self._job_prefix = Job.redis_job_namespace_prefix
        self._registries = [f"rq:finished:{name}", f"rq:failed:{name}", f"rq:canceled:{name}"]
        self._submitted = self.connection.register_script(_SUBMITTED)
        self._started = self.connection.register_script(_STARTED)
        self._ended = self.connection.register_script(_ENDED)
        self._clear = self.connection.register_script(_CLEAR)
        self._put_back = self.connection.register_script(_PUT_BACK)
        self._shas: dict[str, str] = {}
        self._ids: list[int] = []
        self._ids_lock = threading.Lock()
        self._identity: str | None = None
        self._swept = 0.0
        self._sweep_lock = threading.Lock()
        self._closed = False
        self._sender: Callable[[], Any] = lambda: self
        self._signal_context: Callable[[], Any] = nullcontext
        parts = urlsplit(url)
        where = parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}"
        self._where = where

    # -- what it is ------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(scale_workers=False, shared=True, durable=True, delays=True,
                            keys=True, time_limits=True, schedules=False,
                            scale_hint=SCALE_HINT, search=False, text_search=False,
                            kind_health=True)

    @property
    def description(self) -> str:
        return f"on Redis at {self._where}, run by RQ workers"

    @property
    def identity(self) -> str:
        if self._identity is None:
            key = self._prefix + "run"
            self.connection.set(key, secrets.token_hex(6), nx=True)
            self._identity = f"rq-{self.name}-{_text(self.connection.get(key))}"
        return self._identity

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def workers(self) -> int:  # type: ignore[override]
        """The RQ workers of this queue that Redis knows (their processes say how many)."""
        try:
            return int(self.connection.scard(f"rq:workers:{self.name}"))
        except RedisError:
            return 0

    @property
    def started(self) -> bool:
        return True  # nothing to start: the workers are other processes

    def start(self) -> None:
        """Nothing to start here: tasks run in ``flask queue worker`` processes."""

    def close_nowait(self) -> None:
        self._closed = True

    def shutdown(self, timeout: float | None = None) -> None:
        self._closed = True

    # -- signals -----------------------------------------------------------------

    def send_signals_as(self, sender: Any, context: Callable[[], Any] | None = None) -> None:
        """Send the task signals as ``sender`` (held weakly), handlers inside ``context()``.
        Each is sent where its event happens: ``task_submitted`` in the process that
        submitted, the start and the end in the worker (or its work horse) that ran the
        task, an abandoned task's failure in the process whose sweep found it."""
        ref = weakref.ref(sender)
        self._sender = lambda: ref() or self
        self._signal_context = context or nullcontext

    def _send(self, signal: Any, task: Callable[[], TaskInfo | None], **extra: Any) -> None:
        if signal.receivers:
            send_signal(signal, self._sender(), task, self._signal_context, **extra)

    def _send_end(self, state: str, task_id: str, error: str | None,
                  exception: BaseException | None = None) -> None:
        signal = {"done": task_succeeded, "failed": task_failed, "retry": task_retried,
                  "cancelled": task_cancelled}[state]
        extra = {"error": error, "exception": exception} if state in ("failed", "retry") else {}
        self._send(signal, lambda: self.get(task_id), **extra)

    # -- ids -------------------------------------------------------------------

    def _new_ids(self, count: int) -> list[int]:
        """``count`` fresh task ids: taken from Redis a block at a time, so a submit
        costs no round trip of its own for its id."""
        with self._ids_lock:
            while len(self._ids) < count:
                block = max(64, count - len(self._ids))
                top = self.connection.incrby(self._prefix + "ids", block)
                self._ids.extend(range(top - block + 1, top + 1))
            taken, self._ids = self._ids[:count], self._ids[count:]
            return taken

    # -- submitting ------------------------------------------------------------

    def _job_options(self, kind: str, limit: float | None) -> dict[str, Any]:
        policy = self.registry.get(kind).retry
        retry = None
        if policy is not None and policy.attempts > 1:
            retry = RQRetry(max=policy.attempts - 1,
                            interval=[math.ceil(policy.wait(n)) for n in
                                      range(1, policy.attempts)])
        return {"timeout": math.ceil(limit) if limit else -1, "result_ttl": self.retention,
                "failure_ttl": self.retention, "retry": retry}

    def _record_submitted(self, pipe: Any, kind: str, count: int) -> None:
        self._submitted(keys=[self._stats, self._sec, self._secs, self.rq_queue.key],
                        args=[int(time.time()), count, kind], client=pipe)

    def enqueue(self, kind: str, params: dict[str, Any] | None = None, *,
                key: str | None = None, delay: Any = None, at: Any = None,
                time_limit: Any = None) -> Submitted:
        self._refuse_if_closed()
        task_kind = self.registry.get(kind)
        checked = task_kind.check_params(params or {})
        due_in = check_delay(delay, at)
        limit = task_kind.time_limit if time_limit is None else check_time_limit(time_limit)
        task_id = self._new_ids(1)[0]
        holder = None
        if key is not None:
            key = check_key(key)
            holder = self._prefix + "key:" + key
            if not self.connection.set(holder, task_id, nx=True):
                held = self._holder_of(holder, task_id)
                if held is not None:
                    return Submitted(held, False)
        try:
            self._push(kind, checked, [task_id], limit, due_in, key=key)
        except BaseException:
            if holder is not None and _text(self.connection.get(holder) or b"") == str(task_id):
                self.connection.delete(holder)
            raise
        return Submitted(task_id, True)

    def _holder_of(self, holder: str, task_id: int) -> int | None:
        """The task that holds a key, or None after taking the key over from a task that
        no longer exists or has ended."""
        for _ in range(10):
            held = self.connection.get(holder)
            if held is None:
                if self.connection.set(holder, task_id, nx=True):
                    return None
                continue
            info = self.get(_text(held))
            if info is not None and not info.finished:
                return info.id
            with self.connection.pipeline() as pipe:  # taken over only if still that one's
                try:
                    pipe.watch(holder)
                    if pipe.get(holder) != held:
                        continue
                    pipe.multi()
                    pipe.set(holder, task_id)
                    pipe.execute()
                    return None
                except Exception:  # noqa: BLE001 - WatchError: another took it; look again
                    continue
        raise QueueError(f"key {holder.removeprefix(self._prefix + 'key:')!r} is contended; "
                         "try again")

    def submit_many(self, kind: str, count: int, params: dict[str, Any], *,
                    delay: Any = None, time_limit: Any = None) -> list[TaskId]:
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"count must be a positive integer, got {count!r}")
        self._refuse_if_closed()
        task_kind = self.registry.get(kind)
        checked = task_kind.check_params(params or {})
        limit = task_kind.time_limit if time_limit is None else check_time_limit(time_limit)
        due_in = check_delay(delay)
        ids = self._new_ids(count)
        self._push(kind, checked, ids, limit, due_in)
        return list(ids)

    def _push(self, kind: str, params: dict[str, Any], ids: list[int], limit: float | None,
              due_in: float | None, key: str | None = None,
              retry_of: TaskId | None = None) -> None:
        options = self._job_options(kind, limit)
        description = f"{kind} {json.dumps(params, separators=(',', ':'))[:200]}"
        extra = {"flq_w": "1"}  # waiting: counted in each kind's queued until it starts
        if key is not None:
            extra["flq_key"] = key
        if retry_of is not None:
            extra["flq_retry_of"] = str(retry_of)
        if limit:
            extra["flq_limit"] = repr(float(limit))
        if due_in is None:
            self._push_now(kind, params, ids, options, description, extra)
        else:
            self._push_later(kind, params, ids, options, description, extra, due_in)
        if task_submitted.receivers:
            for task_id in ids:
                self._send(task_submitted, lambda t=task_id: self.get(t))

    def _push_now(self, kind: str, params: dict[str, Any], ids: list[int],
                  options: dict[str, Any], description: str, extra: dict[str, str]) -> None:
        """RQ's jobs, made by RQ, written and queued by one script with the room check."""
        args: list[Any] = [int(time.time()), len(ids), kind, self.max_queued, self._job_prefix]
        for task_id in ids:
            job = self.rq_queue.create_job(run_task, args=(kind, params), job_id=str(task_id),
                                           description=description, **options)
            self.rq_queue._prepare_for_queue(job)  # (what Queue.enqueue_job sets: rq 2.12)
            mapping = job.to_dict()
            mapping.update(extra)
            args += [job.id, 2 * len(mapping)]
            for field, value in mapping.items():
                args += [field, value]
        depth_ok, depth = self._eval(_ENQUEUED, [self._stats, self._sec, self._secs,
                                                  self.rq_queue.key, self.rq_queue.redis_queues_keys],
                                     args)
        if not depth_ok:
            raise QueueFull(int(depth), self.max_queued, len(ids))

    def _eval(self, source: str, keys: list[str], args: list[Any]) -> Any:
        """Run a script by its hash (loaded once per process, again after a Redis restart):
        one round trip, where a registered script in a pipeline costs two."""
        sha = self._shas.get(source)
        if sha is None:
            sha = self._shas[source] = self.connection.script_load(source)
        try:
            return self.connection.evalsha(sha, len(keys), *keys, *args)
        except NoScriptError:
            self._shas[source] = self.connection.script_load(source)
            return self.connection.evalsha(self._shas[source], len(keys), *keys, *args)

    def _push_later(self, kind: str, params: dict[str, Any], ids: list[int],
                    options: dict[str, Any], description: str, extra: dict[str, str],
                    due_in: float) -> None:
        # RQ's scheduler keeps whole seconds: the next one, never before.
        due = datetime.fromtimestamp(math.ceil(time.time() + due_in), timezone.utc)
        extra = {**extra, "flq_due": repr(due.timestamp())}
        with self.connection.pipeline() as pipe:
            for task_id in ids:
                job = self.rq_queue.create_job(run_task, args=(kind, params),
                                               job_id=str(task_id), description=description,
                                               **options)
                self.rq_queue.schedule_job(job, due, pipeline=pipe)
                pipe.hset(self._job_prefix + job.id, mapping=extra)
            self._record_submitted(pipe, kind, len(ids))
            pipe.execute()

    def run_schedule(self, name: str) -> TaskId:
        raise ScheduleNotFound(name, [])

    def schedules(self) -> list[ScheduleInfo]:
        return []

    def _refuse_if_closed(self) -> None:
        if self._closed:
            from .errors import QueueClosed
            raise QueueClosed()

    # -- reading ---------------------------------------------------------------

    @property
    def tag(self) -> str:
        self.sweep()
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hget(self._stats, "version")
            pipe.exists(WORKERS_SUSPENDED)
            pipe.scard(f"rq:workers:{self.name}")
            version, paused, workers = pipe.execute()
        return f"{self.identity}.{_text(version or 0)}.{paused}.{workers}"

    def _load(self, ids: Iterable[Any], logs: bool = False) -> list[TaskInfo]:
        """The tasks with these ids that still exist, in order, in one round trip; with
        their log lines only when asked (a task's page), never for a poll's lists."""
        ids = [_text(i) for i in ids]
        if not ids:
            return []
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self._job_prefix + job_id)
            for job_id in ids:
                pipe.zscore(self.rq_queue.scheduled_job_registry.key, job_id)
            if logs:
                for job_id in ids:
                    pipe.lrange(self._prefix + "log:" + job_id, 0, -1)
            rows = pipe.execute()
        n = len(ids)
        lines = rows[2 * n:] if logs else [None] * n
        return [self._info(job_id, raw, log, due) for job_id, raw, due, log
                in zip(ids, rows[:n], rows[n:2 * n], lines) if raw]

    def _info(self, job_id: str, raw: dict[bytes, bytes], logs: list[bytes] | None = None,
              due_score: float | None = None) -> TaskInfo:
        job = Job(job_id, connection=self.connection, serializer=JSONSerializer)
        job.restore(raw)
        mine = {k.decode()[4:]: v.decode() for k, v in raw.items() if k.startswith(b"flq_")}
        try:
            kind, params = job.args if job.func_name == ENTRY else ("?", {})
            params = dict(params) if isinstance(params, dict) else {}
        except Exception:  # noqa: BLE001 - a job not ours, or not JSON: shown, never run
            kind, params = "?", {}
        state = _STATES.get(mine.get("state", ""))
        status = job.get_status(refresh=False)
        if state is None:
            state = _RQ_STATES.get(status, State.QUEUED)
        meta = job.meta or {}
        error = mine.get("error") or None
        trace = mine.get("trace") or None
        if state is State.FAILED and error is None:  # failed by RQ itself (abandoned, refused)
            error = _rq_error(job)
        errors = tuple(json.loads(line) for line in mine.get("errors", "").splitlines() if line)
        if error is None and errors and state in (State.SCHEDULED, State.QUEUED):
            error = errors[-1]["error"]  # the attempt that failed, until the next one ends
        due = mine.get("due") or due_score  # (a retry's: when RQ's scheduler queues it)
        limit = mine.get("limit")
        lines = tuple(_text(line) for line in reversed(logs or ()))
        dropped = 0 if logs is None else max(0, int(mine.get("logs", 0) or 0) - len(lines))
        return TaskInfo(
            id=int(job_id) if job_id.isdigit() else job_id,
            kind=str(kind), params=params, state=state,
            enqueued_at=_ts(job.enqueued_at) or _ts(job.created_at) or 0.0,
            started_at=_ts(job.started_at) if state is not State.QUEUED else None,
            finished_at=(float(mine["finished"]) if mine.get("finished")
                         else _ts(job.ended_at) if state in _FINISHED else None),
            progress=float(meta.get("progress", 0.0)) if state is State.RUNNING else (
                1.0 if state is State.DONE else float(meta.get("progress", 0.0))),
            message=meta.get("message"), error=error, traceback=trace,
            worker=job.worker_name or None,
            cancel_requested=bool(mine.get("cancel")),
            retry_of=_id(mine.get("retry_of")), retried_as=_id(mine.get("retried_as")),
            attempts=int(mine.get("attempts", 0) or 0),
            result_json=mine.get("result") or None, key=mine.get("key"),
            due_at=float(due) if due else None, errors=errors,
            time_limit=float(limit) if limit else None,
            logs=lines[-MAX_LOG_LINES:],
            logs_dropped=dropped)

    def get(self, task_id: TaskId) -> TaskInfo | None:
        text = str(task_id)
        if not text or len(text) > 64:
            return None
        self.sweep()  # (a task page polls only this: its abandoned task must show)
        found = self._load([text], logs=True)
        return found[0] if found else None

    def wait(self, task_id: TaskId, timeout: float | None = None) -> TaskInfo:
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.005
        while True:
            info = self.get(task_id)
            if info is None:
                raise TaskNotFound(task_id)
            if info.finished:
                return info
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"task {task_id} has not finished after {timeout}s")
            time.sleep(pause if deadline is None else
                       max(0.0, min(pause, deadline - time.monotonic())))
            pause = min(0.2, pause * 2)

    def _workers(self) -> list[Worker]:
        return Worker.all(queue=self.rq_queue, serializer=JSONSerializer)

    def stats(self, recent: int = 20, upcoming: int = 0) -> Snapshot:
        self.sweep()
        now = time.time()
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._stats)
            pipe.llen(self.rq_queue.key)
            pipe.zcard(self.rq_queue.scheduled_job_registry.key)
            pipe.zcard(self.rq_queue.started_job_registry.key)
            pipe.exists(WORKERS_SUSPENDED)
            pipe.lrange(self._history, 0, max(0, recent) - 1)
            pipe.lrange(self.rq_queue.key, 0, max(1, upcoming) - 1)
            pipe.zrange(self.rq_queue.scheduled_job_registry.key, 0, 9)
            pipe.hgetall(self._sec)
            (stats, queued, scheduled, running, paused, history, head, soon_ids,
             seconds) = pipe.execute()
        stats = {k.decode(): v.decode() for k, v in stats.items()}
        workers = self._workers()
        busy = {w.name: w.get_current_job_id() for w in workers}
        loaded = self._load(list(history[:recent] if recent else []) + list(head) +
                            list(soon_ids) + [j for j in busy.values() if j])
        by_id = {str(t.id): t for t in loaded}
        recent_tasks = tuple(by_id[_text(i)] for i in history[:recent] if _text(i) in by_id)
        head_tasks = [by_id[_text(i)] for i in head if _text(i) in by_id]
        worker_infos = []
        for w in sorted(workers, key=lambda w: w.name):
            task = by_id.get(busy[w.name] or "")
            state = w.get_state()
            worker_infos.append(WorkerInfo(
                name=w.name,
                state=(WorkerState.RUNNING if task is not None else WorkerState.PAUSED
                       if paused or state == WorkerStatus.SUSPENDED else WorkerState.IDLE),
                task=task, done=w.successful_job_count + w.failed_job_count, pid=w.pid or 0,
                host=w.hostname or ""))
        series, throughput, mean_wait, mean_run = _series(seconds, now)
        oldest = head_tasks[0].enqueued_at if head_tasks else None
        return Snapshot(
            tag=f"{self.identity}.{stats.get('version', '0')}.{paused}.{len(workers)}",
            version=int(stats.get("version", 0)), pid=os.getpid(), queued=queued,
            running=running, done=int(stats.get("done", 0)), failed=int(stats.get("failed", 0)),
            cancelled=int(stats.get("cancelled", 0)),
            submitted=int(stats.get("submitted", 0)), restarts=0, paused=bool(paused),
            closed=self._closed, max_queued=self.max_queued, workers=tuple(worker_infos),
            recent=recent_tasks, upcoming=tuple(head_tasks[:upcoming]),
            mean_wait=mean_wait, mean_run=mean_run, throughput=throughput, series=series,
            taken_at=now, oldest_wait=None if oldest is None else max(0.0, now - oldest),
            idle_for=None, scheduled=scheduled,
            soon=tuple(by_id[_text(i)] for i in soon_ids if _text(i) in by_id))

    def metrics(self) -> Metrics:
        now = time.time()
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._stats)
            pipe.smembers(self._stats + ":kinds")
            pipe.llen(self.rq_queue.key)
            pipe.zcard(self.rq_queue.scheduled_job_registry.key)
            pipe.zcard(self.rq_queue.started_job_registry.key)
            pipe.exists(WORKERS_SUSPENDED)
            pipe.lindex(self.rq_queue.key, 0)
            stats, kinds, queued, scheduled, running, paused, first = pipe.execute()
        stats = {k.decode(): v.decode() for k, v in stats.items()}
        oldest = None
        if first is not None:
            head = self._load([first])
            oldest = max(0.0, now - head[0].enqueued_at) if head else None
        return Metrics(queued=queued, scheduled=scheduled, running=running,
                       workers=len(self._workers()), paused=bool(paused), oldest_wait=oldest,
                       kinds=tuple(_kind_stats(stats, _text(k)) for k in sorted(kinds)),
                       taken_at=now, pid=os.getpid())

    def health(self) -> str | None:
        try:
            self.connection.ping()
        except RedisError as exc:
            return f"Redis at {self._where} does not answer: {exc}"
        if self._closed:
            return "the queue is shutting down"
        fresh = [w for w in self._workers() if _fresh(w)]
        if not fresh:
            return (f"no RQ worker of queue {self.name!r} has a fresh heartbeat (within "
                    f"{WORKER_TIMEOUT}s): start one with `flask queue worker`")
        return None

    def stall(self, snapshot: Snapshot) -> str | None:
        if snapshot.queued and not snapshot.paused and not snapshot.workers:
            return ("tasks are waiting and no worker is running: start one with "
                    "`flask --app <your app> queue worker`")
        return None

    # -- acting ---------------------------------------------------------------

    def cancel(self, task_id: TaskId) -> State:
        info = self.get(task_id)
        if info is None:
            raise TaskNotFound(task_id)
        if info.state not in CANCELLABLE_STATES or info.cancel_requested:
            raise WrongState(info.id, info.state, CANNOT_CANCEL)
        job_id = str(info.id)
        if info.state is State.RUNNING:
            with self.connection.pipeline() as pipe:
                pipe.hset(self._job_prefix + job_id, "flq_cancel", "1")
                pipe.hincrby(self._stats, "version", 1)
                pipe.execute()
            return State.RUNNING
        job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
        with self.connection.pipeline() as pipe:
            pipe.zrem(self.rq_queue.scheduled_job_registry.key, job_id)
            job.cancel(pipeline=pipe)
            pipe.execute()
        why = "was due" if info.state is State.SCHEDULED else "started"
        if self._record_end(job_id, info.kind, "cancelled", attempt=None, run=None,
                            error=f"cancelled before it {why}", key=info.key):
            self._send_end("cancelled", job_id, None)
        return State.CANCELLED

    def force_stop(self, task_id: TaskId) -> None:
        """Stop a running task now, by RQ's stop-job command: its worker kills the work
        horse running it (a forking worker only; a worker that runs jobs in its own
        process cannot). The task ends cancelled."""
        info = self.get(task_id)
        if info is None:
            raise TaskNotFound(task_id)
        if info.state is not State.RUNNING:
            raise WrongState(info.id, info.state, "only a running task can be stopped")
        send_stop_job_command(self.connection, str(info.id), serializer=JSONSerializer)

    def retry(self, task_id: TaskId) -> Retried:
        info = self.get(task_id)
        if info is None:
            raise TaskNotFound(task_id)
        if info.retried_as is not None:
            return Retried(info.retried_as, False)
        if info.state not in RETRYABLE_STATES:
            raise WrongState(info.id, info.state, CANNOT_RETRY)
        self._refuse_if_closed()
        new_id = self._new_ids(1)[0]
        if not self.connection.hsetnx(self._job_prefix + str(info.id), "flq_retried_as",
                                      new_id):
            again = self.get(task_id)
            return Retried(again.retried_as if again else new_id, False)
        try:
            self._push(info.kind, info.params, [new_id], info.time_limit, None,
                       retry_of=info.id)
        except BaseException:
            self.connection.hdel(self._job_prefix + str(info.id), "flq_retried_as")
            raise
        return Retried(new_id, True)

    # -- the operator's view: not on this backend yet -------------------------------

    def _no_search(self) -> QueueError:
        return InvalidParam("search", f"is not available with this backend (the queue "
                            f"{self.description})")

    def find(self, query: TaskFilter, *, limit: int = 50, cursor: str | None = None,
             oldest_first: bool = False) -> TaskPage:
        raise self._no_search()

    def count(self, query: TaskFilter) -> int:
        raise self._no_search()

    def bulk(self, action: str, query: TaskFilter) -> BulkResult:
        raise InvalidParam("action", f"bulk actions are not available with this backend "
                           f"(the queue {self.description})")

    def kind_health(self) -> tuple[KindHealth, ...]:
        """Each registered kind's health: kept by the scripts as tasks are submitted, start
        and end (a hash per wall-clock minute, and each kind's tasks still waiting), never
        counted from the jobs; the running ones are the workers' current jobs."""
        minute = int(time.time() // 60)
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._stats + ":waiting")
            for number in range(minute - HEALTH_WINDOW // 60 + 1, minute + 1):
                pipe.hgetall(f"{self._stats}:min:{number}")
            waiting, *minutes = pipe.execute()
        waiting = {_text(k): int(v) for k, v in waiting.items()}
        hour: dict[str, int] = {}
        for counts in minutes:
            for field, value in counts.items():
                name = _text(field)
                hour[name] = hour.get(name, 0) + int(value)
        busy = [job_id for w in self._workers() if (job_id := w.get_current_job_id())]
        running: dict[str, int] = {}
        for info in self._load(busy):
            if info.state is State.RUNNING:
                running[info.kind] = running.get(info.kind, 0) + 1
        health = []
        buckets = range(len(DURATION_BUCKETS) + 1)
        for kind in self.registry.names():
            runs = [hour.get(f"{kind}:r:{i}", 0) for i in buckets]
            waits = [hour.get(f"{kind}:w:{i}", 0) for i in buckets]
            health.append(KindHealth(
                kind, max(0, waiting.get(kind, 0)), running.get(kind, 0),
                hour.get(f"{kind}:d", 0), hour.get(f"{kind}:f", 0), percentile(runs, 0.5),
                percentile(runs, 0.95), percentile(waits, 0.95)))
        return tuple(health)

    def pause(self) -> None:
        rq_suspend(self.connection)
        self.connection.hincrby(self._stats, "version", 1)

    def resume(self) -> None:
        rq_resume(self.connection)
        self.connection.hincrby(self._stats, "version", 1)

    def set_workers(self, count: int) -> int:
        raise CannotScale(SCALE_HINT)

    def clear_history(self) -> int:
        return int(self._clear(keys=[self._stats, self._history],
                               args=[self._job_prefix, *self._registries]))

    def reset(self) -> None:
        forgotten = self.clear_history()
        with self.connection.pipeline() as pipe:
            pipe.hget(self._stats, "version")
            version = pipe.execute()[0]
        with self.connection.pipeline() as pipe:
            pipe.delete(self._stats, self._stats + ":kinds", self._sec, self._secs,
                        *(f"{self._stats}:min:{n}" for n in range(
                            int(time.time() // 60) - HEALTH_WINDOW // 60 - 2,
                            int(time.time() // 60) + 2)))
            pipe.hset(self._stats, "version", int(version or 0) + 1)
            pipe.execute()
        logger.info("queue %s reset (%d finished tasks forgotten)", self.name, forgotten)

    # -- what workers and sweeps record ----------------------------------------

    def _record_start(self, job: Job, kind: str) -> int:
        wait = max(0.0, time.time() - (_ts(job.enqueued_at) or time.time()))
        return int(self._started(
            keys=[self._stats, self._sec, self._secs, self.rq_queue.key,
                  self._job_prefix + job.id],
            args=[int(time.time()), repr(wait), kind, _bucket(wait)]))

    def _record_end(self, job_id: str, kind: str, state: str, *, attempt: int | None,
                    run: float | None, error: str | None = None, trace: str | None = None,
                    result: str | None = None, key: str | None = None) -> bool:
        holder = self._prefix + "key:" + key if key else self._job_prefix + job_id
        now = time.time()
        return bool(self._ended(
            keys=[self._stats, self._sec, self._secs, self.rq_queue.key,
                  self._job_prefix + job_id, self._history, holder],
            args=[int(now), "" if attempt is None else attempt, state,
                  "" if run is None else repr(run), kind if kind != "?" else "",
                  _bucket(run or 0.0), error or "", trace or "", result or "", self.history,
                  job_id, repr(now), self._job_prefix, *self._registries]))

    def sweep(self, force: bool = False) -> None:
        """Fail (or retry, per its kind) each job whose worker stopped answering, through
        RQ's own cleanup, and record it; at most every SWEEP_EVERY seconds per process."""
        now = time.monotonic()
        if not force and now - self._swept < SWEEP_EVERY:
            return
        if not self._sweep_lock.acquire(blocking=False):
            return
        try:
            self._swept = now
            self._workers()  # RQ forgets the workers whose key expired (the tag counts them)
            registry = self.rq_queue.started_job_registry
            expired = registry.get_expired_job_ids(time.time())
            if not expired:
                return
            registry.cleanup()
            for info in self._load(expired):
                if info.state is State.FAILED:
                    error = (f"abandoned: its worker stopped answering (no heartbeat for "
                             f"{WORKER_TIMEOUT}s; killed, or its machine went away)")
                    if self._record_end(str(info.id), info.kind, "failed",
                                        attempt=info.attempts, run=None, error=error,
                                        key=info.key):
                        logger.warning("task %s (%s) %s", info.id, info.kind, error)
                        self._send_end("failed", str(info.id), error)
                elif info.state in (State.QUEUED, State.SCHEDULED):
                    self._record_end(str(info.id), info.kind, "retry", attempt=info.attempts,
                                     run=None, error="abandoned: its worker stopped answering")
        except RedisError:
            logger.warning("could not sweep for abandoned tasks", exc_info=True)
        finally:
            self._sweep_lock.release()

    # -- working ---------------------------------------------------------------------

    def worker(self, app: Any = None, *, fork: bool = True, name: str | None = None,
               **kwargs: Any) -> QueueWorker:
        """An RQ worker for this queue, running each job in ``app``'s context."""
        cls = QueueWorker if fork else SimpleQueueWorker
        return cls([self.rq_queue], connection=self.connection, app=app, backend=self,
                   name=name, **kwargs)


def _unavailable_when_redis_fails(cls: type) -> type:
    """Each method of the seam answers a Redis that does not answer (down, unreachable,
    refusing our password) with StoreUnavailable, a 503 that says so, never a 500."""
    import functools

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(self: RQBackend, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(self, *args, **kwargs)
            except RedisError as exc:
                raise StoreUnavailable(f"Redis at {self._where} does not answer ({exc})") \
                    from None
        return call

    for name in ("enqueue", "submit_many", "submit", "get", "wait", "stats", "metrics",
                 "cancel", "force_stop", "retry", "pause", "resume", "clear_history",
                 "reset"):
        setattr(cls, name, wrap(getattr(cls, name)))
    for name in ("tag", "identity"):
        prop = getattr(cls, name)
        setattr(cls, name, property(wrap(prop.fget)))
    return cls


RQBackend = _unavailable_when_redis_fails(RQBackend)


def _fresh(worker: Worker) -> bool:
    beat = _ts(worker.last_heartbeat)
    return beat is not None and time.time() - beat <= WORKER_TIMEOUT


def _id(text: str | None) -> TaskId | None:
    if not text:
        return None
    return int(text) if text.isdigit() else text


def _rq_error(job: Job) -> str:
    try:
        result = job.latest_result()
        text = (result.exc_string or "") if result is not None else ""
    except Exception:  # noqa: BLE001
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:1000] if lines else "failed"


_STATES = {"done": State.DONE, "failed": State.FAILED, "cancelled": State.CANCELLED}
_RQ_STATES = {
    JobStatus.QUEUED: State.QUEUED, JobStatus.STARTED: State.RUNNING,
    JobStatus.SCHEDULED: State.SCHEDULED, JobStatus.DEFERRED: State.SCHEDULED,
    JobStatus.FINISHED: State.DONE, JobStatus.FAILED: State.FAILED,
    JobStatus.STOPPED: State.CANCELLED, JobStatus.CANCELED: State.CANCELLED,
}
_FINISHED = frozenset({State.DONE, State.FAILED, State.CANCELLED})


def _series(seconds: Mapping[bytes, bytes], now: float
            ) -> tuple[tuple[tuple[float, int, int], ...], float, float | None, float | None]:
    """The chart's series and the last minute's rates, from the per-second hash."""
    by_sec: dict[int, dict[str, float]] = {}
    for field, value in seconds.items():
        sec, _, what = field.decode().partition(":")
        by_sec.setdefault(int(sec), {})[what] = float(value)
    low = now - SERIES_SECONDS
    series = tuple((float(s), int(v.get("d", 0)), int(v.get("m", v.get("d", 0))))
                   for s, v in sorted(by_sec.items()) if s >= low)
    minute = [v for s, v in by_sec.items() if s >= now - 60]
    ended = sum(v.get("e", 0) for v in minute)
    started = sum(v.get("s", 0) for v in minute)
    mean_wait = sum(v.get("w", 0.0) for v in minute) / started if started else None
    mean_run = sum(v.get("r", 0.0) for v in minute) / ended if ended else None
    return series, float(ended), mean_wait, mean_run


def _kind_stats(stats: Mapping[str, str], kind: str) -> KindStats:
    def count(what: str) -> int:
        return int(stats.get(f"k:{kind}:{what}", 0))

    def histogram(letter: str) -> Histogram:
        counts = [count(f"{letter}b:{i}") for i in range(len(DURATION_BUCKETS) + 1)]
        if not any(counts):
            return NO_DURATIONS
        cumulative, total = [], 0
        for n in counts[:-1]:
            total += n
            cumulative.append(total)
        return Histogram(tuple(cumulative), count(f"{letter}c"),
                         float(stats.get(f"k:{kind}:{letter}s", 0.0)))

    return KindStats(kind, submitted=count("submitted"), done=count("done"),
                     failed=count("failed"), cancelled=count("cancelled"),
                     retried=count("retried"), wait=histogram("w"), run=histogram("r"))


# -- the worker side ---------------------------------------------------------------------

#: The backend (and app) of this worker process, for run_task in it and its work horses.
_RUNTIME: dict[str, Any] = {}


def refusal(job: Job) -> str | None:
    """Why ``job`` must not run here (a sentence), or None when it is one of ours: its
    function is the entry point, with (kind, params) as JSON and no callbacks."""
    try:
        func = job.func_name
        args, kwargs, instance = job.args, job.kwargs, job.instance
    except Exception as exc:  # noqa: BLE001 - a pickle, or anything that is not our JSON
        return f"refused: its data is not a JSON job of this queue ({type(exc).__name__})"
    if func != ENTRY:
        return f"refused: its function {str(func)[:100]!r} is not {ENTRY}"
    if instance is not None or kwargs or not (
            isinstance(args, (list, tuple)) and len(args) == 2 and isinstance(args[0], str)
            and isinstance(args[1], dict)):
        return "refused: its arguments are not (kind, params)"
    for name in ("_success_callback_name", "_failure_callback_name",
                 "_stopped_callback_name"):
        if getattr(job, name, None):
            return "refused: it names callbacks, which this queue never sets"
    return None


class _Ours:
    """What our workers add to RQ's: the refusal, the pause without rq#526's leak, the
    app's context, and the bookkeeping of our keys."""

    connection: Redis
    name: str
    log: logging.Logger

    def __init__(self, queues: Any = None, *args: Any, app: Any = None,
                 backend: RQBackend | None = None, **kwargs: Any):
        if app is None:
            from flask.cli import ScriptInfo  # `rq worker -w dashboard.rq.QueueWorker`
            app = ScriptInfo(app_import_path=os.environ.get("FLASK_APP")).load_app()
        if backend is None:
            from .ext import get_queue
            backend = get_queue(app)
            if not isinstance(backend, RQBackend):
                raise RuntimeError("this app's QUEUE_URL is not a redis:// one")
        kwargs["serializer"] = JSONSerializer
        kwargs.setdefault("worker_ttl", WORKER_TIMEOUT + HEARTBEAT)
        kwargs.setdefault("job_monitoring_interval", HEARTBEAT)
        kwargs.setdefault("connection", backend.connection)
        if not kwargs.get("name"):
            kwargs["name"] = f"{socket.gethostname()}.{os.getpid()}"
        super().__init__(queues or [backend.rq_queue], *args, **kwargs)  # type: ignore[call-arg]
        self.backend = backend
        self.app = app
        self.ran = 0  # jobs this worker started
        _RUNTIME["backend"] = backend
        _RUNTIME["app"] = weakref.ref(app)

    @property
    def dequeue_timeout(self) -> int:
        return HEARTBEAT

    def work(self, *args: Any, **kwargs: Any) -> bool:
        if threading.current_thread() is not threading.main_thread():
            # (a test's drain, or an app's own thread: no signals there)
            self.death_penalty_class = TimerDeathPenalty
            self._install_signal_handlers = lambda: None  # type: ignore[method-assign]
        return super().work(*args, **kwargs)  # type: ignore[misc]

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        # RQ keeps a worker's key for its ttl + 60 s (minutes); ours says within
        # WORKER_TIMEOUT that a worker is gone.
        limit = WORKER_TIMEOUT + HEARTBEAT
        super().heartbeat(min(timeout or limit, limit), pipeline)  # type: ignore[misc]

    def get_heartbeat_ttl(self, job: Job) -> int:
        return WORKER_TIMEOUT

    def register_birth(self) -> None:
        super().register_birth()  # type: ignore[misc]
        self.backend.connection.hincrby(self.backend._stats, "version", 1)

    def register_death(self) -> None:
        super().register_death()  # type: ignore[misc]
        self.backend.connection.hincrby(self.backend._stats, "version", 1)

    def clean_registries(self) -> None:
        super().clean_registries()  # type: ignore[misc]

    def run_maintenance_tasks(self) -> None:
        self.backend.sweep(force=True)  # records what RQ's cleanup fails, then RQ's own
        super().run_maintenance_tasks()  # type: ignore[misc]

    def execute_job(self, job: Job, queue: Queue) -> None:
        why = refusal(job)
        if why is not None:
            self._refuse(job, queue, why)
            return
        if is_suspended(self.connection):
            # rq#526: a worker blocked on the queue when the pause came took this job
            # after it; it goes back in its place, untouched, until resumed.
            self.backend._put_back(keys=[queue.key, queue.intermediate_queue_key],
                                   args=[job.id, Job.redis_job_namespace_prefix])
            self.log.info("Worker %s: paused: job %s put back in its place", self.name, job.id)
            return
        if job.get_status(refresh=True) != JobStatus.QUEUED:
            self.connection.lrem(queue.intermediate_queue_key, 1, job.id)
            return  # cancelled between leaving the queue and here
        self.ran += 1
        super().execute_job(job, queue)  # type: ignore[misc]

    def _refuse(self, job: Job, queue: Queue, why: str) -> None:
        logger.error("job %s refused and failed, nothing of it run: %s", job.id, why)
        with self.connection.pipeline() as pipe:
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            queue.failed_job_registry.add(job, ttl=self.backend.retention, exc_string=why,
                                          pipeline=pipe)
            pipe.execute()
        self.backend._record_end(job.id, "?", "failed", attempt=1, run=None, error=why)

    # Our end is recorded before RQ's: a reader never sees RQ's end without ours (the
    # task's error, result, state), and the signals go once both are written.

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: Any) -> None:
        outcome = getattr(job, "_flq_outcome", None) or ("done", None, None, None)
        state, error, result, run = outcome
        recorded = self.backend._record_end(job.id, _kind_of(job), state, attempt=_attempt(job),
                                            run=run, error=error, result=result,
                                            key=_key_of(job))
        super().handle_job_success(job, queue, started_job_registry)  # type: ignore[misc]
        if recorded:
            self.backend._send_end(state, job.id, error)

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry: Any = None,
                           exc_string: str = "") -> None:
        stopped = getattr(self, "_stopped_job_id", None) == job.id
        retry = job.should_retry and not stopped
        error, trace = getattr(job, "_flq_error", None), getattr(job, "_flq_trace", None)
        if error is None:
            lines = [line for line in (exc_string or "").strip().splitlines() if line.strip()]
            error = lines[-1][:1000] if lines else "failed"
            if stopped:
                error = "stopped by force (its work horse was killed)"
            elif "Work-horse terminated unexpectedly" in (exc_string or ""):
                error = f"its process died while it ran ({error.strip()})"
        run = getattr(job, "_flq_run", None)
        if run is None and job.started_at is not None:
            run = max(0.0, time.time() - (_ts(job.started_at) or time.time()))
        state = "retry" if retry else "cancelled" if stopped else "failed"
        recorded = self.backend._record_end(job.id, _kind_of(job), state, attempt=_attempt(job),
                                            run=run, error=error, trace=trace, key=_key_of(job))
        super().handle_job_failure(job, queue, started_job_registry, exc_string)  # type: ignore[misc]
        if recorded:
            self.backend._send_end(state, job.id, error, getattr(job, "_flq_exception", None))


def _kind_of(job: Job) -> str:
    try:
        return str(job.args[0])
    except Exception:  # noqa: BLE001
        return "?"


def _key_of(job: Job) -> str | None:
    raw = job.connection.hget(job.key, "flq_key")
    return None if raw is None else _text(raw)


def _attempt(job: Job) -> int | None:
    attempt = getattr(job, "_flq_attempt", None)
    if attempt is None:
        raw = job.connection.hget(job.key, "flq_attempts")
        attempt = int(raw) if raw else None
    return attempt


class QueueWorker(_Ours, Worker):
    """RQ's forking worker, for this app's queue: each job in a work horse of its own
    (a task that crashes its process fails alone; RQ's stop-job command works)."""


class SimpleQueueWorker(_Ours, SimpleWorker):
    """RQ's worker that runs each job in its own process (no fork: faster, but a
    task that crashes takes the worker with it, and a job cannot be stopped by force)."""


class RQTaskContext:
    """What a task receives as ``ctx`` on an RQ worker: the same as in-process."""

    def __init__(self, job: Job, backend: RQBackend, kind: str, limit: float | None):
        self._job = job
        self._backend = backend
        self._kind = kind
        self._deadline = time.monotonic() + limit if limit else 0.0
        self._checked = 0.0
        self._cancel = False
        self.cancel_seen = False
        self._progress = 0.0
        self._message: str | None = None
        self._log_key = backend._prefix + "log:" + job.id

    @property
    def task_id(self) -> TaskId:
        return int(self._job.id) if self._job.id.isdigit() else self._job.id

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def logger(self) -> logging.Logger:
        return task_logger(self._kind)

    @property
    def cancelled(self) -> bool:
        if self._deadline and time.monotonic() >= self._deadline:
            return True
        now = time.monotonic()
        if not self._cancel and now - self._checked >= CANCEL_CHECK_EVERY:
            self._checked = now
            self._cancel = bool(self._backend.connection.hget(self._job.key, "flq_cancel"))
        if self._cancel:
            self.cancel_seen = True
        return self._cancel

    def log_line(self, line: str) -> None:
        with self._backend.connection.pipeline(transaction=False) as pipe:
            pipe.lpush(self._log_key, line)
            pipe.hincrby(self._job.key, "flq_logs", 1)
            pipe.ltrim(self._log_key, 0, MAX_LOG_LINES - 1)
            pipe.expire(self._log_key, self._backend.retention)
            pipe.hincrby(self._backend._stats, "version", 1)
            pipe.execute()

    def progress(self, fraction: float, message: str | None = None) -> None:
        value, message = clean_progress(fraction, message)
        if not progress_changed(self._progress, value, self._message, message):
            self._progress = value
            return
        self._progress, self._message = value, message
        self._job.meta["progress"] = value
        self._job.meta["message"] = message
        with self._backend.connection.pipeline(transaction=False) as pipe:
            pipe.hset(self._job.key, "meta", json.dumps(self._job.meta))
            pipe.hincrby(self._backend._stats, "version", 1)
            pipe.execute()


def run_task(kind: str, params: dict[str, Any]) -> Any:
    """The single function every job of ours names: run one registered kind with its
    params, in the app's context. Only our workers call it (they refuse any job that
    names another function)."""
    backend: RQBackend | None = _RUNTIME.get("backend")
    app_ref = _RUNTIME.get("app")
    app = app_ref() if app_ref is not None else None
    job = get_current_job()
    if backend is None or app is None or job is None:
        raise RuntimeError("run_task runs only in a `flask queue worker` of this app")
    task_kind = backend.registry.get(kind)  # a kind no longer registered fails here
    checked = task_kind.check_params(params)
    attempt = job._flq_attempt = backend._record_start(job, kind)
    backend._send(task_started, lambda: backend.get(job.id))
    raw_limit = job.connection.hget(job.key, "flq_limit")
    limit = float(raw_limit) if raw_limit else None
    ctx = RQTaskContext(job, backend, kind, limit)
    started = time.monotonic()
    tasklog.ensure_installed()
    tasklog.running.task = ctx
    try:
        with app.app_context():
            value = task_kind.fn(ctx, **checked)
    except BaseException as exc:
        job._flq_run = time.monotonic() - started
        if task_failed.receivers or task_retried.receivers:
            job._flq_exception = exc  # (for the signals' handlers: it holds the task's locals)
        message = f"{type(exc).__name__}: {exc}"[:1000]
        job._flq_trace = traceback.format_exc()
        policy = task_kind.retry
        if isinstance(exc, JobTimeoutException) or (ctx._deadline and
                                                    time.monotonic() > ctx._deadline):
            job._flq_error = f"timed out after {limit or job.timeout:g}s"
            if not isinstance(exc, JobTimeoutException):
                job._flq_error += f" (it then raised {message})"
        else:
            job._flq_error = message
        if not (isinstance(exc, Exception) and policy is not None
                and policy.retries(exc, attempt) and not ctx.cancel_seen
                and not isinstance(exc, JobTimeoutException)):
            job.retries_left = 0
        raise
    finally:
        tasklog.running.task = None
    run = time.monotonic() - started
    if ctx._deadline and time.monotonic() > ctx._deadline:
        job._flq_error = f"timed out after {limit:g}s"
        job.retries_left = 0
        raise JobTimeoutException(job._flq_error)
    text = None
    if value is not None:
        text, refused = encode_result(value, backend.max_result_bytes)
        if refused is not None:
            job._flq_error = refused
            job.retries_left = 0
            raise ValueError(refused)
    job._flq_outcome = (("cancelled", "cancelled while running", None, run) if ctx.cancel_seen
                        else ("done", None, text, run))
    return value
