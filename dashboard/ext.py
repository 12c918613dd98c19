"""The Flask glue: one WorkQueue per app, started once per serving process.

Workers start in the process that serves requests, and only there:

* on the first request a process handles (any server: the dev server with or
  without the reloader, gunicorn with or without ``--preload``, uWSGI), or
* eagerly from a server hook, :func:`start_serving` (our ``gunicorn.conf.py``
  calls it in each worker process after it is forked), or
* under uWSGI, in each worker as soon as it has the app: when the app is
  built there (``lazy-apps``), or right after the fork when it was built in
  the master.

Creating the app never starts threads (except in a uWSGI worker, which
serves), so a reloader's watching parent or a preloading master that only
imports the app runs no task. A forked child starts its own threads;
:class:`~dashboard.local.WorkQueue` handles that.

With a queue file, a process whose file cannot be written when it starts
(say another program holds its write lock for longer than the busy timeout)
still serves: :meth:`~dashboard.local.WorkQueue.start` waits a moment,
then leaves the workers to its supervisor, which starts them once it can,
and the log says so.

On SIGTERM or SIGINT the queue closes at once (new submissions get 503), and
running tasks get ``QUEUE_SHUTDOWN_TIMEOUT`` seconds when the process exits.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
import weakref
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Mapping

from flask import Flask, current_app, has_app_context
from werkzeug.local import LocalProxy


from .config import DEFAULTS, ConfigError, check_config, history_for, old_names_in
from .errors import StoreError
from .local import MemoryStore, SqliteStore, Store, TaskContext, WorkQueue
from .local.queue import live_queues
from .tasks import Registry
from .tasks import registry as default_registry

#: The QUEUE_URL schemes of the RQ backend (dashboard.rq, imported only when asked for).
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")

logger = logging.getLogger("dashboard.ext")

EXTENSION_KEY = "dashboard"


class QueueExtension:
    """Adds a work queue to a Flask app; the object is kept in ``app.extensions``.

    Use it like any Flask extension::

        queue_ext = QueueExtension()

        def create_app():
            app = Flask(__name__)
            queue_ext.init_app(app)
            return app

    and submit work from a view with ``current_queue.submit("kind", **params)``.
    Every task runs inside ``app.app_context()``, torn down after each task. The
    queue's signals (:mod:`dashboard.signals`) are sent with the app as sender.
    """

    def __init__(self, app: Flask | None = None, *, registry: Registry | None = None):
        self.registry = registry
        self._queues: weakref.WeakKeyDictionary[Flask, WorkQueue] = weakref.WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        check_config(app.config)
        if app.config["QUEUE_URL"].startswith(REDIS_SCHEMES):
            self._init_rq(app)
            return
        queue = WorkQueue(
            workers=app.config["QUEUE_WORKERS"],
            store=make_store(app),
            registry=self.registry,
            runner=_app_context_runner(app),
            shutdown_timeout=app.config["QUEUE_SHUTDOWN_TIMEOUT"],
            max_workers=app.config["QUEUE_MAX_WORKERS"],
            max_result_bytes=app.config["QUEUE_MAX_RESULT_BYTES"],
            scheduler=app.config["QUEUE_SCHEDULES"],
            run_workers=app.config["QUEUE_RUN_WORKERS"],
            name=f"{app.name}-queue",
        )
        # The signals are the app's, as Flask's own are: a handler connected with
        # sender=app hears this app's tasks only, and reads its config.
        queue.send_signals_as(app, _app_context_for(app))
        for line in old_names_in(os.environ):
            logger.warning("%s", line)
        self._check_default_kind(app, queue.registry)
        self._queues[app] = queue
        app.extensions[EXTENSION_KEY] = self
        from .cli import queue_cli  # (it reads the queue through this module)

        app.cli.add_command(queue_cli)
        # The cheapest correct place to start: the first request this process serves.
        app.before_request(queue.start)
        if app.config["QUEUE_HANDLE_SIGNALS"]:
            install_signal_handlers()
        _register_atexit()
        _start_under_uwsgi(app)

    def _init_rq(self, app: Flask) -> None:
        """``QUEUE_URL=redis://...``: the tasks are RQ jobs, run by ``flask queue worker``
        processes; this process only submits and reads, and starts nothing."""
        try:
            from .rq import RQBackend, redis_url_problem
        except ImportError as exc:
            raise ConfigError(
                f"QUEUE_URL: {app.config['QUEUE_URL'].split(':')[0]}:// needs RQ and the Redis "
                f"client: pip install 'flask-live-queue[redis]' ({exc})") from None
        url = app.config["QUEUE_URL"]
        problem = redis_url_problem(url)
        if problem is not None:
            raise ConfigError(f"invalid configuration: QUEUE_URL: {problem}")
        backend = RQBackend(
            url, self.registry if self.registry is not None else default_registry,
            name=app.name, max_queued=app.config["QUEUE_MAX_QUEUED"],
            history=history_for(app.config), retention=app.config["QUEUE_RETENTION"],
            max_result_bytes=app.config["QUEUE_MAX_RESULT_BYTES"])
        self._check_default_kind(app, backend.registry)
        backend.send_signals_as(app, _app_context_for(app))
        self._queues[app] = backend  # type: ignore[assignment]
        app.extensions[EXTENSION_KEY] = self
        from .cli import queue_cli

        app.cli.add_command(queue_cli)

    def _check_default_kind(self, app: Flask, registry: Registry) -> None:
        if app.config["QUEUE_DEFAULT_KIND"] and app.config["QUEUE_DEFAULT_KIND"] not in registry:
            raise ConfigError(
                "invalid configuration: QUEUE_DEFAULT_KIND must be one of: "
                f"{', '.join(registry.names()) or '(none registered)'}; "
                f"got {app.config['QUEUE_DEFAULT_KIND']!r}"
            )

    def default_kind(self, app: Flask) -> str | None:
        """The kind "Add work" and a submit without one use: ``QUEUE_DEFAULT_KIND``,
        else the first kind registered, by name; None when there is none."""
        names = self._queues[app].registry.names()
        return app.config["QUEUE_DEFAULT_KIND"] or (names[0] if names else None)

    def queue_for(self, app: Flask) -> WorkQueue:
        return self._queues[app]

    @property
    def queue(self) -> WorkQueue:
        """The queue of the current app."""
        return self._queues[current_app._get_current_object()]  # type: ignore[attr-defined]


#: Set by a server's master once it has built the app, so checked its queue
#: file: the checked paths (``os.pathsep`` between them), for the processes it
#: starts, which inherit the environment.
CHECKED_ENV = "DASHBOARD_QUEUE_CHECKED"


def make_store(app: Flask) -> Store:
    """The store ``QUEUE_URL`` names; a file that cannot be used fails here, at start.

    In a process started after its master checked the file (see
    :func:`vouch_for_store`) the file is not touched here: a replacement
    worker must boot even while the file is busy or unwritable for a moment;
    problems then show when the file is used.
    """
    config = app.config
    url = config["QUEUE_URL"]
    if url == "memory://":
        return MemoryStore(config["QUEUE_MAX_QUEUED"], history_for(config))
    path = url[len("sqlite:///"):]
    if not os.path.isabs(path):
        os.makedirs(app.instance_path, exist_ok=True)
        path = os.path.join(app.instance_path, path)
    path = os.path.abspath(path)
    try:
        return SqliteStore(
            path,
            config["QUEUE_MAX_QUEUED"],
            history_for(config),
            retention=config["QUEUE_RETENTION"],
            lease_time=config["QUEUE_LEASE_TIME"],
            max_attempts=config["QUEUE_MAX_ATTEMPTS"],
            check=path not in _checked_paths(),
        )
    except StoreError as exc:
        raise ConfigError(f"QUEUE_URL: {exc}") from None


def _checked_paths() -> list[str]:
    return [p for p in os.environ.get(CHECKED_ENV, "").split(os.pathsep) if p]


def vouch_for_store(app: Any) -> bool:
    """Tell the processes this one starts that ``app``'s queue file was checked.

    For a server's master that built the app at start (our
    ``gunicorn.conf.py`` does, in ``on_starting``): the workers it forks, and
    the ones it forks again later to replace them, then build their store
    without opening the file. Returns True when there was a file to vouch for.
    """
    ext = getattr(app, "extensions", {}).get(EXTENSION_KEY)
    if not isinstance(ext, QueueExtension):
        return False
    store = getattr(ext.queue_for(app), "store", None)  # (an RQ backend has none)
    path = getattr(store, "path", None)
    if store is None or not store.durable or not path:
        return False
    paths = _checked_paths()
    if path not in paths:
        os.environ[CHECKED_ENV] = os.pathsep.join([*paths, path])
    return True


def get_queue(app: Flask | None = None) -> WorkQueue:
    """The WorkQueue of ``app``, or of the current app."""
    app = app if app is not None else current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        ext: QueueExtension = app.extensions[EXTENSION_KEY]
    except KeyError:
        raise RuntimeError(
            "this app has no work queue: call QueueExtension().init_app(app) first"
        ) from None
    return ext.queue_for(app)


#: The current app's :class:`~dashboard.local.WorkQueue`.
#: The current app's queue, as the :class:`~dashboard.backend.Backend` seam (the
#: in-process backend is a :class:`WorkQueue`, which adds run_pending, join and shutdown).
current_queue: WorkQueue = LocalProxy(get_queue)  # type: ignore[assignment]


def _app_context_runner(app: Flask) -> Callable[..., Any]:
    # A weak reference: the app owns its queue, the queue must not keep the
    # app alive (the per-app table above is keyed weakly on the app).
    app_ref = weakref.ref(app)

    def run(fn: Callable[..., Any], ctx: TaskContext, params: Mapping[str, Any]) -> Any:
        app = app_ref()
        if app is None:
            raise RuntimeError("the app this queue belonged to is gone")
        with app.app_context():
            return fn(ctx, **params)

    return run


def _app_context_for(app: Flask) -> Callable[[], AbstractContextManager[Any]]:
    """The context a signal's handlers run in: ``app``'s app context, pushed unless it
    is the current one already (a submit from a view sends inside its request)."""
    app_ref = weakref.ref(app)  # (weak, as in _app_context_runner)

    def context() -> AbstractContextManager[Any]:
        app = app_ref()
        if app is None or (has_app_context()
                           and current_app._get_current_object() is app):  # type: ignore[attr-defined]
            return nullcontext()
        return app.app_context()

    return context


def start_serving(app: Any) -> bool:
    """Start the app's workers now, in this serving process; for server hooks.

    ``app`` may be anything a server loaded; if it is not a Flask app with a
    queue, nothing happens and ``False`` is returned. Also installs the signal
    handlers when called in the main thread, after the server installed its own.
    A queue file that cannot be written now does not stop the process: its
    workers start once it can (see the module docstring).
    """
    ext = getattr(app, "extensions", {}).get(EXTENSION_KEY)
    if not isinstance(ext, QueueExtension):
        return False
    queue = ext.queue_for(app)
    if app.config.get("QUEUE_HANDLE_SIGNALS", True):
        install_signal_handlers(force=True)
    queue.start()
    return True


def stop_serving(app: Any) -> None:
    """Shut the app's queue down now (for a server's worker-exit hook)."""
    ext = getattr(app, "extensions", {}).get(EXTENSION_KEY)
    if isinstance(ext, QueueExtension):
        queue = ext.queue_for(app)
        if queue.started:
            queue.shutdown()


def _start_under_uwsgi(app: Flask) -> None:
    """Under uWSGI, start the workers of each worker process without waiting for a request.

    Otherwise only the processes that served a request would run tasks: with
    a shared queue file and ``processes = 2``, half the capacity sat idle.
    Never in the master: there, the start is left to a post-fork hook.
    """
    try:
        import uwsgi  # type: ignore[import-not-found]  # exists only inside uWSGI
    except ImportError:
        return
    if uwsgi.mule_id() or uwsgi.i_am_the_spooler():
        return  # not a process that serves requests
    queue = get_queue(app)
    if uwsgi.worker_id() > 0:
        # The app is built in the worker (lazy-apps): this process serves.
        queue.start()
        return
    # The app is built in the master: uWSGI forks the workers from here,
    # without Python's at-fork handling, and a child forked while another
    # thread of this process runs blocks for ever taking the GIL
    # (unbit/uwsgi#1149). Nothing of ours runs a thread here any more (the
    # submit limiter makes its timer in the serving process), but an app's
    # own code may: let such threads end first, and say so if they do not.
    _let_threads_end(timeout=2.0)
    previous = getattr(uwsgi, "post_fork_hook", None)

    def start_after_fork() -> None:
        if callable(previous):
            previous()
        if uwsgi.worker_id() > 0 and not uwsgi.mule_id():
            queue.start()

    uwsgi.post_fork_hook = start_after_fork


def _let_threads_end(timeout: float) -> None:
    deadline = time.monotonic() + timeout
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    for thread in others:
        try:
            thread.join(max(0.0, deadline - time.monotonic()))
        except RuntimeError:
            pass  # a thread started outside Python: not ours to join
    alive = [t.name for t in others if t.is_alive()]
    if alive:
        logger.warning(
            "uWSGI will fork worker processes while this process runs other threads (%s): "
            "a worker may hang at start. Build the app in each worker (lazy-apps = true).",
            ", ".join(alive),
        )


# -- signals and exit ------------------------------------------------------

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_previous: dict[int, Any] = {}
_installed_in: int | None = None


def _on_signal(signum: int, frame: Any) -> None:
    # Runs in the main thread between two bytecodes, maybe while that thread
    # holds a store's lock or the threading module's own: take no lock and
    # start no thread. close_nowait() only sets flags; the exit-time
    # shutdown wakes idle workers and waits for running tasks.
    for queue in live_queues():
        if queue.started:
            queue.close_nowait()
    previous = _previous.get(signum)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL or previous is None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        # The default would kill the process on the spot, skipping the wait
        # for running tasks; a clean exit runs the atexit shutdown instead.
        raise SystemExit(0)


def install_signal_handlers(force: bool = False) -> bool:
    """Close every started queue on SIGTERM/SIGINT, then do what was there before.

    Installs once per process, and only from the main thread. ``force``
    installs again over handlers a server set since (gunicorn resets them in
    each worker after loading the app).
    """
    global _installed_in
    if threading.current_thread() is not threading.main_thread():
        return False
    pid = os.getpid()
    for signum in _SIGNALS:
        current = signal.getsignal(signum)
        # A signal the process was started to ignore (nohup, a background
        # job) stays ignored: it must not close the queue of a server that
        # keeps running.
        if current is _on_signal or current == signal.SIG_IGN:
            continue
        if _installed_in == pid and not force:
            continue
        _previous[signum] = current
        signal.signal(signum, _on_signal)
    _installed_in = pid
    return True


_atexit_registered = False


def _register_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_shutdown_at_exit)
        _atexit_registered = True


def _shutdown_at_exit() -> None:
    for queue in live_queues():
        if queue.started:
            queue.shutdown()
