"""gunicorn settings for the dashboard: `gunicorn -c gunicorn.conf.py`.

One worker process with several threads is the default on purpose: the
in-memory queue lives in one process, so one process means one queue, and
every poll sees the same one. Threads serve the pages and the polls; the
queue's own worker threads run the tasks. With the SQLite store
(FLASK_QUEUE_URL=sqlite:///...), WEB_CONCURRENCY processes share one queue.
"""

import logging
import os

wsgi_app = "dashboard:create_app()"
bind = [os.environ.get("BIND", f"127.0.0.1:{os.environ.get('PORT', '5000')}")]
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "8"))

# gunicorn 27's control socket sits at one path per user, so two instances
# (two checkouts, parallel tests) would fight over it; the demo needs none.
control_socket_disable = True

# Running tasks get FLASK_SHUTDOWN_TIMEOUT seconds when a worker stops; give
# gunicorn a little longer before it kills the worker.
graceful_timeout = int(float(os.environ.get("FLASK_SHUTDOWN_TIMEOUT", "10"))) + 5

log = logging.getLogger("dashboard.gunicorn")


def on_starting(server):
    # Build the app once in the master, before any worker is forked: a bad
    # setting or an unusable queue file then stops gunicorn with one line,
    # instead of every worker failing to boot with a traceback. Nothing it
    # builds starts a thread or keeps a file open, so nothing crosses the fork.
    from gunicorn.util import import_app

    from dashboard.config import ConfigError

    global _access_token
    try:
        app = import_app(server.app.app_uri)
    except ConfigError as exc:
        server.log.error("cannot start: %s", exc.message)
        raise SystemExit(1) from None
    _access_token = getattr(app, "config", {}).get("ACCESS_TOKEN", "")


_access_token = ""


def when_ready(server):
    # Listening now: say so loudly if that is beyond this machine with no secret.
    from dashboard.security import warn_if_exposed

    for listener in server.LISTENERS:
        address = listener.sock.getsockname()
        if isinstance(address, tuple):
            warn_if_exposed(address[0], _access_token)


def post_worker_init(worker):
    # The app was loaded (or, with --preload, forked into this process):
    # start its queue's threads here, after gunicorn set its signal handlers.
    from dashboard.ext import get_queue, start_serving

    if start_serving(worker.wsgi) and worker.cfg.workers > 1:
        if not get_queue(worker.wsgi).store.durable:
            log.warning(
                "%d worker processes each have their own in-memory queue: a dashboard "
                "shows whichever process answers its poll. Use one process (the default) "
                "and raise GUNICORN_THREADS, or share one queue with "
                "FLASK_QUEUE_URL=sqlite:///queue.db.",
                worker.cfg.workers,
            )


def worker_exit(server, worker):
    from dashboard.ext import stop_serving

    stop_serving(getattr(worker, "wsgi", None))
