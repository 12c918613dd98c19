"""gunicorn settings for the dashboard: `gunicorn -c gunicorn.conf.py`.

One worker process with several threads is the default on purpose: the
in-memory queue lives in one process, so one process means one queue, and
every poll sees the same one. Threads serve the pages and the polls; the
queue's own worker threads run the tasks. With the SQLite store
(FLASK_QUEUE_URL=sqlite:///...), WEB_CONCURRENCY processes share one queue.
"""

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time

wsgi_app = "dashboard:create_app()"
bind = [os.environ.get("BIND", f"127.0.0.1:{os.environ.get('PORT', '5000')}")]
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "8"))

# gunicorn 27's control socket sits at one path per user, so two instances
# (two checkouts, parallel tests) would fight over it; the demo needs none.
control_socket_disable = True

# Running tasks get FLASK_QUEUE_SHUTDOWN_TIMEOUT seconds when a worker stops; give
# gunicorn a little longer before it kills the worker. A value given on the
# command line must be longer too: on_starting refuses one that is not.
graceful_timeout = math.ceil(float(os.environ.get("FLASK_QUEUE_SHUTDOWN_TIMEOUT", "10"))) + 5

log = logging.getLogger("dashboard.gunicorn")

#: Seconds a stopping worker keeps telling the master it is alive beyond
#: QUEUE_SHUTDOWN_TIMEOUT, while the queue lets go of its tasks and its file.
EXIT_MARGIN = 5.0


def on_starting(server):
    # Build the app once in the master, before any worker is forked: a bad
    # setting or an unusable queue file then stops gunicorn with one line,
    # instead of every worker failing to boot with a traceback. Nothing it
    # builds starts a thread or keeps a file open, so nothing crosses the fork.
    from gunicorn.util import import_app

    from dashboard.config import ConfigError
    from dashboard.ext import CHECKED_ENV, vouch_for_store

    global _access_token
    # This master checks the file itself, whatever the one that started it
    # (a USR2 upgrade) vouched for.
    os.environ.pop(CHECKED_ENV, None)
    try:
        app = import_app(server.app.app_uri)
    except ConfigError as exc:
        server.log.error("cannot start: %s", exc.message)
        raise SystemExit(1) from None
    _access_token = getattr(app, "config", {}).get("QUEUE_ACCESS_TOKEN", "")
    queue = _queue_of(app)
    if queue is None:
        return
    problem = _settings_problem(server.cfg, queue)
    if problem:
        server.log.error("cannot start: %s", problem)
        raise SystemExit(1)
    # The file is good: the workers, and every worker forked later to replace
    # one, build their store without touching it, so a file that is busy at
    # that moment cannot make a replacement fail to boot (which halts gunicorn).
    vouch_for_store(app)
    if server.cfg.max_requests > 0 and not queue.capabilities.durable:
        log.warning(
            "\n"
            "  ************************************************************************\n"
            "  gunicorn restarts each worker after max_requests (%d) requests, and the\n"
            "  in-memory queue (QUEUE_URL=memory://) ends with its process: the tasks\n"
            "  still queued at each restart are dropped (running ones get QUEUE_SHUTDOWN_TIMEOUT\n"
            "  to finish). A dashboard polls once a second, so this happens often.\n"
            "  Use the SQLite store (FLASK_QUEUE_URL=sqlite:///queue.db), or leave\n"
            "  max_requests at 0 (README: 'Servers and processes').\n"
            "  ************************************************************************",
            server.cfg.max_requests,
        )


_access_token = ""


def _queue_of(app):
    from dashboard.ext import EXTENSION_KEY, get_queue

    if EXTENSION_KEY not in getattr(app, "extensions", {}):
        return None
    return get_queue(app)


def _settings_problem(cfg, queue):
    """What makes these settings unable to keep the queue's promises, or None."""
    shutdown_timeout = queue.shutdown_timeout
    if cfg.graceful_timeout < shutdown_timeout + 1:
        # On a stop, the master kills each worker graceful_timeout after the
        # signal, whatever the worker is doing: the running tasks would be cut
        # off before the QUEUE_SHUTDOWN_TIMEOUT they were promised.
        return (
            f"gunicorn's graceful_timeout ({cfg.graceful_timeout}s) must be longer than the "
            f"queue's QUEUE_SHUTDOWN_TIMEOUT ({shutdown_timeout:g}s), by a second at least, or a "
            "stopping worker is killed while its tasks finish: raise --graceful-timeout "
            "(gunicorn.conf.py sets QUEUE_SHUTDOWN_TIMEOUT + 5) or lower FLASK_QUEUE_SHUTDOWN_TIMEOUT"
        )
    return None


def when_ready(server):
    # Listening now: say so loudly if that is beyond this machine with no secret.
    from dashboard.web.security import warn_if_exposed

    for listener in server.LISTENERS:
        address = listener.sock.getsockname()
        if isinstance(address, tuple):
            warn_if_exposed(address[0], _access_token)


#: This worker's own descriptor of its heartbeat file (see worker_exit).
_heartbeat_fd = None


def quit_safely(worker, quit):
    """gunicorn's gthread worker handles SIGQUIT/SIGINT with ``quit``, which first
    calls its thread pool's ``shutdown()``; that takes the pool's lock, which the
    main thread holds while it hands a connection to the pool (``submit``). A
    signal landing just then waited on that lock for ever: the worker never
    left, its queue never closed, and the master killed it after graceful_timeout
    (seen under load as a stop that dropped nothing and cut the running task).
    Interrupted there, leave at once instead: the shutdown runs in worker_exit."""

    def handle(signum, frame):
        lock = getattr(getattr(worker, "tpool", None), "_shutdown_lock", None)
        if lock is not None and not lock.acquire(blocking=False):
            worker.alive = False
            worker.cfg.worker_int(worker)
            sys.exit(0)
        if lock is not None:
            lock.release()
        quit(signum, frame)

    return handle


def post_worker_init(worker):
    # The app was loaded (or, with --preload, forked into this process):
    # start its queue's threads here, after gunicorn set its signal handlers.
    from dashboard.ext import get_queue, start_serving

    global _heartbeat_fd
    _heartbeat_fd = os.dup(worker.tmp.fileno())
    for signum in (signal.SIGQUIT, signal.SIGINT):
        current = signal.getsignal(signum)
        if callable(current):
            signal.signal(signum, quit_safely(worker, current))
    if start_serving(worker.wsgi) and worker.cfg.workers > 1:
        if not get_queue(worker.wsgi).capabilities.shared:
            log.warning(
                "%d worker processes each have their own in-memory queue: a dashboard "
                "shows whichever process answers its poll. Use one process (the default) "
                "and raise GUNICORN_THREADS, or share one queue with "
                "FLASK_QUEUE_URL=sqlite:///queue.db.",
                worker.cfg.workers,
            )


def worker_exit(server, worker):
    # Running tasks get QUEUE_SHUTDOWN_TIMEOUT here. A worker that leaves by itself
    # (after max_requests) or is stopped while the master goes on (a HUP
    # reload, fewer workers) is still watched by the master, which kills it
    # once it has not said "alive" for `timeout` seconds: it says so while it
    # waits, for as long as QUEUE_SHUTDOWN_TIMEOUT allows and no longer.
    from dashboard.ext import stop_serving

    app = getattr(worker, "wsgi", None)
    queue = _queue_of(app) if app is not None else None
    with _alive_for(worker, None if queue is None else queue.shutdown_timeout + EXIT_MARGIN):
        stop_serving(app)


@contextlib.contextmanager
def _alive_for(worker, seconds):
    """Tell the master this worker is alive, every second, for at most ``seconds``."""
    fd = _heartbeat_fd
    if fd is None or seconds is None:
        yield
        return
    # gunicorn closes the worker's own heartbeat file before worker_exit
    # runs; the copy of the descriptor taken at start still reaches it. Its
    # mtime is what the master reads, set from the monotonic clock, as
    # gunicorn's WorkerTmp.notify() does.
    interval = min(1.0, worker.timeout / 2) if worker.timeout else 1.0
    deadline = time.monotonic() + seconds
    done = threading.Event()

    def beat():
        while True:
            now = time.monotonic()
            if now >= deadline:
                return  # a shutdown that hangs is the master's to kill
            try:
                os.utime(fd, (now, now))
            except OSError:
                return
            if done.wait(interval):
                return

    thread = threading.Thread(target=beat, name="gunicorn-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(interval + 1)
