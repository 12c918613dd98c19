"""What keeps strangers and other sites from driving the dashboard.

* **Cross-site requests are refused.** A state-changing request (POST and
  the like) must come from this site: browsers say where a request comes
  from in ``Sec-Fetch-Site`` (Fetch Metadata) and ``Origin``; a request from
  another site gets a 403 and changes nothing. This needs no token in the
  forms and works the same for htmx, plain forms and the JSON API. Clients
  that are not browsers (curl, scripts) send neither header and pass: they
  carry no cookies or saved passwords for another site to ride on.
* **An optional secret.** With ``ACCESS_TOKEN`` set, every request needs it,
  as HTTP Basic auth (any user name, the secret as password: browsers ask
  once) or as ``Authorization: Bearer <secret>``. ``PUBLIC_READ`` leaves the
  pages and polls open for a projector, and only the actions need the secret.
* **Browser hardening.** A Content-Security-Policy that allows our own
  scripts and styles only (no inline code, no eval), no framing, no sniffing,
  no referrer to other sites.
* **A submit limit per client**, counted in tasks, with the ``limits``
  library (the engine of Flask-Limiter): beyond it, 429 with ``Retry-After``.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import os
import time
from base64 import b64decode
from urllib.parse import urlsplit

import limits
from flask import Flask, Response, current_app, jsonify, make_response, request
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from .tasks import TaskError

logger = logging.getLogger("dashboard.security")

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


# -- cross-site requests -----------------------------------------------------------


def cross_site_reason() -> str | None:
    """Why this request must be refused as cross-site, or None when it may go on."""
    if request.method not in UNSAFE_METHODS:
        return None
    site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get("Origin")
    if origin is not None and origin in current_app.config["TRUSTED_ORIGINS"]:
        return None
    if site is not None:
        # "none": the user did it (typed a URL, a bookmark); "same-origin": our page.
        if site in ("same-origin", "none"):
            return None
        return f"cross-site request refused (Sec-Fetch-Site: {site[:40]})"
    if origin is None:
        return None  # not from a browser: nothing to forge
    if origin != "null" and urlsplit(origin).netloc == request.host:
        return None
    return f"cross-site request refused (Origin: {origin[:100]})"


# -- the secret -------------------------------------------------------------------------


def presented_secret() -> str | None:
    """The secret a request carries: Basic auth's password, or a Bearer token."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return value.strip()
    if scheme == "basic":
        try:
            decoded = b64decode(value.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]
    return None


def is_authorised() -> bool:
    secret = current_app.config["ACCESS_TOKEN"]
    if not secret:
        return True
    given = presented_secret()
    return given is not None and hmac.compare_digest(given.encode(), secret.encode())


def may_act() -> bool:
    """Whether this request may change anything (templates hide the controls if not)."""
    return is_authorised()


def access_refusal() -> Response | None:
    """A 401 when a secret is set and the request does not carry it, else None."""
    config = current_app.config
    if not config["ACCESS_TOKEN"] or request.endpoint == "dashboard.healthz":
        return None
    if config["PUBLIC_READ"] and request.method in ("GET", "HEAD", "OPTIONS"):
        return None
    if is_authorised():
        return None
    message = ("this dashboard needs its access token: send it as the password of HTTP Basic "
               "auth, or as 'Authorization: Bearer <token>'")
    if request.path.startswith(api_prefix()):
        response = jsonify(error=message)
        response.status_code = 401
    else:
        response = make_response(message, 401)
        response.mimetype = "text/plain"
    response.headers["WWW-Authenticate"] = 'Basic realm="Work queue", charset="UTF-8"'
    return response


def api_prefix() -> str:
    from .views import bp

    return (bp.url_prefix or "") + "/api/"


# -- headers ----------------------------------------------------------------------------


def add_security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


# -- exposure ---------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_warned: set[tuple[int, str]] = set()
_WARNED_ENV = "DASHBOARD_EXPOSURE_WARNED"


def warn_if_exposed(host: str, secret: str) -> bool:
    """Log a warning (once per process and address) when serving beyond this machine
    with no secret. Returns True when it warned."""
    if secret or is_loopback(host):
        return False
    key = (os.getpid(), host)
    # Once per address: a gunicorn master that warned at start tells the
    # workers it forks through the environment they inherit.
    if key in _warned or os.environ.get(_WARNED_ENV) == host:
        return False
    _warned.add(key)
    os.environ[_WARNED_ENV] = host
    logger.warning(
        "\n"
        "  ************************************************************************\n"
        "  The dashboard is served on %s, beyond this machine, with no ACCESS_TOKEN:\n"
        "  anyone who can reach it can add, cancel and retry work.\n"
        "  Set FLASK_ACCESS_TOKEN to a long random secret (README: 'Security').\n"
        "  ************************************************************************",
        host,
    )
    return True


# -- the submit limit -------------------------------------------------------------------


class RateLimited(TaskError):
    """This client added more tasks than ``SUBMIT_LIMIT`` allows; ``retry_after`` in seconds."""

    def __init__(self, limit: str, retry_after: int):
        self.retry_after = retry_after
        super().__init__(
            f"too much work from this client: the limit is {limit} tasks; "
            f"try again in {retry_after}s"
        )


class SubmitLimiter:
    """Counts the tasks each client adds, in a moving window (per process)."""

    def __init__(self, spec: str):
        self.spec = spec
        self.item = limits.parse(spec) if spec else None
        self.strategy = MovingWindowRateLimiter(MemoryStorage())

    def charge(self, client: str, tasks: int) -> None:
        """Count ``tasks`` for ``client``, or raise :class:`RateLimited` counting nothing."""
        if self.item is None:
            return
        if tasks > self.item.amount:
            raise RateLimited(self.spec, 60)
        if not self.strategy.hit(self.item, client, cost=tasks):
            stats = self.strategy.get_window_stats(self.item, client)
            raise RateLimited(self.spec, max(1, math.ceil(stats.reset_time - time.time())))


def charge_submit(tasks: int) -> None:
    """Charge the current client for ``tasks`` new tasks."""
    limiter: SubmitLimiter = current_app.extensions["dashboard.limiter"]
    limiter.charge(request.remote_addr or "unknown", tasks)


def init_app(app: Flask) -> None:
    """Set up the limiter for ``app`` (the checks themselves run in the blueprint)."""
    try:
        app.extensions["dashboard.limiter"] = SubmitLimiter(app.config["SUBMIT_LIMIT"])
    except ValueError:
        from .config import ConfigError

        raise ConfigError(
            "invalid configuration: SUBMIT_LIMIT must be empty (no limit) or like "
            f"'600 per minute' or '50/second', got {app.config['SUBMIT_LIMIT']!r}"
        ) from None


def first_request_check() -> None:
    """On a process's first request: warn if this server is exposed without a secret."""
    host = request.environ.get("SERVER_NAME", "")
    warn_if_exposed(host, current_app.config["ACCESS_TOKEN"])


__all__ = [
    "CONTENT_SECURITY_POLICY",
    "RateLimited",
    "SubmitLimiter",
    "add_security_headers",
    "access_refusal",
    "cross_site_reason",
    "init_app",
    "may_act",
    "warn_if_exposed",
]
