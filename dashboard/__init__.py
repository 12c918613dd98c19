"""A Flask app with an in-process work queue and a live htmx dashboard.

``create_app`` builds the demo app. To use the queue in your own app, see
:class:`~dashboard.ext.QueueExtension`, :func:`~dashboard.tasks.task` and
:data:`~dashboard.ext.current_queue`; to act on what happens to tasks (send
failures to an error tracker), the signals of :mod:`dashboard.signals`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from flask import Flask, jsonify, request
from werkzeug.exceptions import BadHost, HTTPException, SecurityError

from .config import ConfigError
from .ext import QueueExtension, current_queue, get_queue
from .records import State
from .errors import (InvalidParam, QueueClosed, QueueError, QueueFull, ScheduleNotFound,
                     TaskFailed, TaskNotFound, UnknownKind)
from .periodic import Schedule
from .signals import (task_cancelled, task_failed, task_retried, task_started, task_submitted,
                      task_succeeded)
from .tasks import Bool, Float, Int, Registry, Retry, Str, registry, task
from .local import TaskContext, WorkQueue

__all__ = [
    "create_app",
    "QueueExtension",
    "current_queue",
    "get_queue",
    "WorkQueue",
    "TaskContext",
    "State",
    "task",
    "registry",
    "Registry",
    "Retry",
    "Schedule",
    "Int",
    "Float",
    "Str",
    "Bool",
    "ConfigError",
    "QueueError",
    "QueueFull",
    "QueueClosed",
    "InvalidParam",
    "UnknownKind",
    "TaskFailed",
    "TaskNotFound",
    "ScheduleNotFound",
    "task_submitted",
    "task_started",
    "task_succeeded",
    "task_failed",
    "task_retried",
    "task_cancelled",
]

# The shape of gunicorn's own lines, so the two read as one log.
LOG_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"
LOG_DATEFMT = "%Y-%m-%d %H:%M:%S %z"


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the dashboard app: config defaults, then ``FLASK_*`` environment
    variables, then ``test_config``; a bad value raises :class:`ConfigError`.
    """
    from . import demo  # noqa: F401  registers the demo task kinds
    from .config import DEFAULTS
    from .web import bp

    app = Flask(__name__, static_folder=None)
    # Polled fragments are sent every second: leave out the template's indentation.
    app.jinja_env.trim_blocks = True
    app.jinja_env.lstrip_blocks = True
    app.config.from_mapping(DEFAULTS)
    app.config["QUEUE_DEFAULT_KIND"] = "pretend"  # the demo's; an app's own has no default
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    app.config.from_prefixed_env()
    _keep_strings_raw(app.config)
    if test_config is not None:
        app.config.from_mapping(test_config)

    _configure_logging()
    QueueExtension(app)
    app.register_blueprint(bp)
    app.register_error_handler(HTTPException, _http_error)
    # The blueprint hardens its own responses; the app's own (a 404 outside
    # the blueprint, say) get the same headers.
    from .web.security import add_security_headers

    app.after_request(add_security_headers)
    return app


def _keep_strings_raw(config: dict) -> None:
    """Text settings from the environment stay text.

    ``from_prefixed_env`` reads values as JSON first, so a token like
    ``FLASK_QUEUE_ACCESS_TOKEN=0123456789012`` would arrive as a number and lose
    its leading zero; for text settings the raw string is what was meant.
    """
    from .config import SETTINGS
    from .tasks import Str

    for setting in SETTINGS:
        raw = os.environ.get(f"FLASK_{setting.key}")
        if raw is not None and isinstance(setting.spec, Str):
            config[setting.key] = raw


def _configure_logging() -> None:
    """Log INFO and up from this package to stderr, unless logging is set up already."""
    logger = logging.getLogger("dashboard")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
        logger.addHandler(handler)


def _http_error(exc: HTTPException):
    """JSON errors under /api/, Flask's short HTML page elsewhere; never a traceback.

    A refused Host says which setting would allow it (Werkzeug's own words
    name neither the header's value nor the setting).
    """
    if isinstance(exc, BadHost) or (isinstance(exc, SecurityError)
                                    and str(exc.description).startswith("Host ")):
        from .web.security import printable

        host = printable(request.environ.get("HTTP_HOST", ""), 100)
        if isinstance(exc, SecurityError):
            exc.description = (f"Host {host!r} is not one this dashboard answers to: "
                               "to allow it, add it to TRUSTED_HOSTS")
        else:
            exc.description = (f"Host {host!r} is not a valid host name: labels of 1 to 63 "
                               "letters, digits and '-' joined by '.', then an optional :port")
    if request.path.startswith("/api/"):
        response = jsonify(error=f"{exc.code} {exc.name}: {exc.description}")
        response.status_code = exc.code or 500
        return response
    return exc
