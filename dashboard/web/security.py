"""What keeps strangers and other sites from driving the dashboard.

* **Only the names it is served as.** On loopback, a request whose ``Host``
  is not a loopback name (``localhost``, ``127.0.0.1``...) is refused: a page
  of another site whose name was pointed at 127.0.0.1 (DNS rebinding) would
  otherwise be "same origin" with the dashboard. Flask's ``TRUSTED_HOSTS``
  lists the names when there are others (a proxy in front).
* **Cross-site requests are refused.** A state-changing request (POST and
  the like) must come from this site: browsers say where a request comes
  from in ``Sec-Fetch-Site`` (Fetch Metadata) and ``Origin``; a request from
  another site gets a 403 and changes nothing. This needs no token in the
  forms and works the same for htmx, plain forms and the JSON API. Clients
  that are not browsers (curl, scripts) send neither header and pass: they
  carry no cookies or saved passwords for another site to ride on.
* **An optional secret.** With ``QUEUE_ACCESS_TOKEN`` set, every request needs it,
  as HTTP Basic auth (any user name, the secret as password: browsers ask
  once) or as ``Authorization: Bearer <secret>``. ``QUEUE_PUBLIC_READ`` leaves the
  pages and polls open for a projector, and only the actions need the secret;
  ``QUEUE_METRICS_PUBLIC`` leaves ``/metrics`` open for a scraper on a private
  network.
* **Browser hardening.** A Content-Security-Policy that allows our own
  scripts and styles only (no inline code, no eval), no framing, no sniffing,
  no referrer to other sites.
* **A submit limit per client**, counted in tasks, with the ``limits``
  library (the engine of Flask-Limiter): beyond it, 429 with ``Retry-After``.
  Only tasks that were queued count; a refused request costs nothing.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import os
import socket
import threading
import time
from base64 import b64decode
from functools import lru_cache
from typing import Any, Callable, Mapping, TypeVar
from urllib.parse import urlsplit

import limits
from flask import Flask, Response, current_app, jsonify, make_response, request
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from ..errors import RateLimited

logger = logging.getLogger("dashboard.security")

T = TypeVar("T")

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


# -- text from a request, in the log ---------------------------------------------------


def printable(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters, with control characters escaped.

    For what a request said (its path, a header) in a log line or an error:
    a ``%0a`` in a path would otherwise start a forged line in the log, and
    escape sequences would reach the terminal that shows it.
    """
    text = text[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# -- where the request came in ------------------------------------------------------------

#: The address of a connection that came in on a Unix socket: only this machine can
#: open it (a proxy beside the app), like loopback.
UNIX_SOCKET = "unix socket"
_LOCAL_KEY = "dashboard.local_address"


def _socket_address(name: Any) -> str:
    if isinstance(name, tuple):
        return str(name[0])
    return UNIX_SOCKET  # a path (str or bytes): AF_UNIX


def _fd_address(fd: int) -> str:
    """The local address of the socket ``fd``, which stays open (uWSGI owns it)."""
    sock = socket.socket(fileno=fd)
    try:
        return _socket_address(sock.getsockname())
    finally:
        sock.detach()


def local_address(environ: Mapping[str, Any]) -> str | None:
    """The address of this machine the request came in on, as the server's socket says.

    gunicorn (``gunicorn.socket``) and Werkzeug's server (``werkzeug.socket``)
    hand the connection's socket to the app; uWSGI tells its descriptor.
    ``None`` when the server does not say (Flask's test client, others).
    ``SERVER_NAME`` is no substitute where a socket is known: gunicorn fills
    it from the Host header, uWSGI with the machine's host name.
    """
    cached = environ.get(_LOCAL_KEY, False)
    if cached is not False:
        return cached
    address = None
    try:
        sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
        if sock is not None:
            address = _socket_address(sock.getsockname())
        elif "uwsgi.version" in environ:
            import uwsgi  # only importable inside uWSGI

            address = _fd_address(uwsgi.connection_fd())
    except (OSError, ImportError, AttributeError, ValueError):
        address = None
    if isinstance(environ, dict):
        environ[_LOCAL_KEY] = address
    return address


_listening: tuple[int, tuple[str, ...]] | None = None


def _uwsgi_listening() -> tuple[str, ...]:
    """The addresses uWSGI listens on in this process (empty outside uWSGI)."""
    global _listening
    pid = os.getpid()
    if _listening is None or _listening[0] != pid:
        addresses: list[str] = []
        try:
            import uwsgi

            for fd in uwsgi.sockets:
                addresses.append(_fd_address(fd))
        except (OSError, ImportError, AttributeError, ValueError):
            pass
        _listening = (pid, tuple(addresses))
    return _listening[1]


def served_address(environ: Mapping[str, Any]) -> str:
    """The address to judge exposure by: where this server can be reached.

    Under uWSGI, an address it listens on beyond loopback if there is one (a
    server on 0.0.0.0 is exposed even while its first request comes from
    this machine); else the connection's own local address; else, when the
    server says neither, ``SERVER_NAME``.
    """
    if "uwsgi.version" in environ:
        for address in _uwsgi_listening():
            if not is_loopback(address):
                return address
    return local_address(environ) or environ.get("SERVER_NAME", "")


# -- the Host a request names --------------------------------------------------------------


def host_refusal() -> str | None:
    """Why this request's ``Host`` must be refused, or None when it may go on.

    A dashboard reached on loopback answers only to loopback names: a page
    on evil.example whose name was made to resolve to 127.0.0.1 (DNS
    rebinding) sends ``Host: evil.example`` and would otherwise be "same
    origin" with us, free to read and post. With ``TRUSTED_HOSTS`` set,
    Flask checks the Host against it before routing and this rule steps
    aside; served on another address, the names are not ours to guess.
    """
    if current_app.config.get("TRUSTED_HOSTS") is not None:
        return None
    environ = request.environ
    local = local_address(environ)
    if local is None:
        local = environ.get("SERVER_NAME", "")
    if not is_loopback(local):
        return None
    given = environ.get("HTTP_HOST")
    if given is None:
        return None  # HTTP/1.0 with no Host: no browser sends that
    # Flask leaves request.host empty when the header has characters no host has.
    if is_loopback(_host_name(request.host)):
        return None
    return (
        f"Host {printable(given, 100)!r} refused: this dashboard is served on this machine "
        f"only ({local}) and answers to localhost, *.localhost, 127.0.0.1 and [::1]; to "
        "serve it under another name, list that name in TRUSTED_HOSTS"
    )


def _host_name(host: str) -> str:
    """The name of ``host:port`` (brackets kept off an IPv6 address), lower case."""
    if host.startswith("["):
        return host[1:].partition("]")[0].lower()
    return host.partition(":")[0].lower()


# -- cross-site requests -----------------------------------------------------------


def cross_site_reason() -> str | None:
    """Why this request must be refused as cross-site, or None when it may go on."""
    if request.method not in UNSAFE_METHODS:
        return None
    site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get("Origin")
    if origin is not None and origin in current_app.config["QUEUE_TRUSTED_ORIGINS"]:
        return None
    if site is not None:
        # "none": the user did it (typed a URL, a bookmark); "same-origin": our page.
        if site in ("same-origin", "none"):
            return None
        return f"cross-site request refused (Sec-Fetch-Site: {printable(site, 40)})"
    if origin is None:
        return None  # not from a browser: nothing to forge
    if origin == "null":
        return "cross-site request refused (Origin: null)"
    given = _origin(origin)
    if given is None:
        return (f"cross-site request refused (Origin {printable(origin, 100)!r} is not an "
                "origin like https://example.com:8443)")
    if given == _origin(f"{request.scheme}://{request.host}"):
        return None
    return f"cross-site request refused (Origin: {printable(origin, 100)})"


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(text: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an origin, the port filled in; None when it is not one.

    Scheme, host and port must all agree: ``https://localhost`` is not the
    origin of a page served as ``http://localhost``.
    """
    try:
        parts = urlsplit(text)
        port = parts.port  # raises ValueError when not a number from 0 to 65535
    except ValueError:  # "http://[" and the like
        return None
    scheme = parts.scheme.lower()
    if (scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path or parts.query
            or parts.fragment or parts.username is not None or parts.password is not None):
        return None
    return scheme, parts.hostname, port if port is not None else _DEFAULT_PORTS[scheme]


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
    secret = current_app.config["QUEUE_ACCESS_TOKEN"]
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
    if not config["QUEUE_ACCESS_TOKEN"] or request.endpoint == "dashboard.healthz":
        return None
    if config["QUEUE_METRICS_PUBLIC"] and request.endpoint == "dashboard.metrics":
        return None  # counts, kinds and durations only: nothing to act on, no task's data
    if config["QUEUE_PUBLIC_READ"] and request.method in ("GET", "HEAD", "OPTIONS"):
        return None
    if is_authorised():
        return None
    message = ("this dashboard needs its access token: send it as the password of HTTP Basic "
               "auth, or as 'Authorization: Bearer <token>'")
    if is_api_request():
        response = jsonify(error=message)
        response.status_code = 401
    else:
        response = make_response(message, 401)
        response.mimetype = "text/plain"
    response.headers["WWW-Authenticate"] = 'Basic realm="Work queue", charset="UTF-8"'
    return response


def is_api_request() -> bool:
    """Whether this request is for the dashboard's JSON API, wherever the app
    mounted it: its views are the blueprint's ``api_*`` endpoints. (The
    blueprint's own ``url_prefix`` is not where an app mounted it.)"""
    endpoint = request.endpoint or ""
    return endpoint.startswith(f"{request.blueprint}.api_") or request.is_json


# -- headers ----------------------------------------------------------------------------


def add_security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


# -- exposure ---------------------------------------------------------------------------


@lru_cache(maxsize=256)
def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) means this machine only.

    Loopback addresses (127.0.0.0/8, ::1, and 127.x written as IPv6),
    ``localhost`` and its subdomains (RFC 6761 keeps them on this machine),
    and connections on a Unix socket.
    """
    host = host.strip("[]").lower()
    if host in ("localhost", UNIX_SOCKET) or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


#: Addresses warned about in this process: a handful (one per listening address),
#: but bounded, so no stream of requests can grow it.
_warned: dict[tuple[int, str], None] = {}
_WARNED_MAX = 64
_warned_lock = threading.Lock()  # request threads of one process check at once
_WARNED_ENV = "DASHBOARD_EXPOSURE_WARNED"


def warn_if_exposed(host: str, secret: str) -> bool:
    """Log a warning (once per process and address) when serving beyond this machine
    with no secret. Returns True when it warned."""
    if secret or is_loopback(host):
        return False
    key = (os.getpid(), host)
    with _warned_lock:
        # Once per address: a gunicorn master that warned at start tells the
        # workers it forks through the environment they inherit.
        if key in _warned or os.environ.get(_WARNED_ENV) == host:
            return False
        if len(_warned) >= _WARNED_MAX:
            del _warned[next(iter(_warned))]  # the oldest
        _warned[key] = None
        os.environ[_WARNED_ENV] = host
    logger.warning(
        "\n"
        "  ************************************************************************\n"
        "  The dashboard is served on %s, beyond this machine, with no QUEUE_ACCESS_TOKEN:\n"
        "  anyone who can reach it can add, cancel and retry work.\n"
        "  Set FLASK_QUEUE_ACCESS_TOKEN to a long random secret (README: 'Security').\n"
        "  ************************************************************************",
        printable(host, 100),
    )
    return True


# -- the submit limit -------------------------------------------------------------------


def describe_limit(item: limits.RateLimitItem) -> str:
    """A limit in words: "1 task per minute", "600 tasks per minute", "5 tasks per 30 seconds"."""
    tasks = f"{item.amount} task{'' if item.amount == 1 else 's'}"
    unit = item.GRANULARITY.name
    if item.multiples == 1:
        return f"{tasks} per {unit}"
    return f"{tasks} per {item.multiples} {unit}s"


class SubmitLimiter:
    """Counts the tasks each client adds, in a moving window (per process).

    Only what was queued is counted: a request refused for any reason (a full
    queue, an unknown task, a retry that found its retry already queued)
    costs nothing, so no client can lock itself out with refused requests.
    """

    #: Locks shared by clients whose addresses hash alike: one lock per client
    #: would grow with the clients, one lock for all would make every submit wait
    #: for every other.
    STRIPES = 64

    def __init__(self, spec: str):
        self.spec = spec
        self.item = limits.parse(spec) if spec else None
        self.described = describe_limit(self.item) if self.item is not None else ""
        self._locks = tuple(threading.Lock() for _ in range(self.STRIPES))
        self._strategy: MovingWindowRateLimiter | None = None
        self._pid = 0

    @property
    def amount(self) -> int | None:
        """The most tasks one client may add within the window; None when there is no limit."""
        return None if self.item is None else self.item.amount

    @property
    def strategy(self) -> MovingWindowRateLimiter:
        """The counts, made in the process that serves, at its first submit.

        ``limits``' memory storage starts a timer thread when it is made:
        made while the app is built in a server's master, that thread could
        be running when the master forks, and uWSGI's fork (which skips
        Python's at-fork handling) then left the new worker hung for good.
        """
        if self._strategy is None or self._pid != os.getpid():
            self._strategy = MovingWindowRateLimiter(MemoryStorage())
            self._pid = os.getpid()
        return self._strategy

    def spend(self, client: str, tasks: int, act: Callable[[], T],
              queued: Callable[[T], int] | None = None) -> T:
        """Run ``act``, which queues ``tasks``, if ``client`` may add that many more.

        Raises :class:`RateLimited` without running ``act`` when the tasks
        would pass the limit; when ``act`` raises (it queued nothing), nothing
        is counted. ``queued(result)``, when given, says how many ``act`` did
        queue (a retry finds one queued already), and that is what is counted. The test, ``act`` and the count happen under the client's
        lock, so concurrent requests of one client cannot pass the limit together.
        """
        item = self.item
        if item is None:
            return act()
        if tasks > item.amount:
            raise RateLimited(self.described, 60)
        with self._locks[hash(client) % self.STRIPES]:
            if not self.strategy.test(item, client, cost=tasks):
                stats = self.strategy.get_window_stats(item, client)
                raise RateLimited(self.described, max(1, math.ceil(stats.reset_time - time.time())))
            result = act()
            cost = tasks if queued is None else queued(result)
            if cost:
                self.strategy.hit(item, client, cost=cost)
        return result


def spend_submit(tasks: int, act: Callable[[], T],
                 queued: Callable[[T], int] | None = None) -> T:
    """:meth:`SubmitLimiter.spend` for the current client."""
    limiter: SubmitLimiter = current_app.extensions["dashboard.limiter"]
    return limiter.spend(request.remote_addr or "unknown", tasks, act, queued)


def submit_allowance() -> int | None:
    """The most tasks one client may add within ``QUEUE_SUBMIT_LIMIT``'s window; None: no limit."""
    limiter: SubmitLimiter = current_app.extensions["dashboard.limiter"]
    return limiter.amount


def submit_limit_words() -> str:
    """``QUEUE_SUBMIT_LIMIT`` in words ("600 tasks per minute"); empty when there is none."""
    limiter: SubmitLimiter = current_app.extensions["dashboard.limiter"]
    return limiter.described


def init_app(app: Flask) -> None:
    """Set up the limiter for ``app`` (the checks themselves run in the blueprint)."""
    try:
        app.extensions["dashboard.limiter"] = SubmitLimiter(app.config["QUEUE_SUBMIT_LIMIT"])
    except ValueError:
        from ..config import ConfigError

        raise ConfigError(
            "invalid configuration: QUEUE_SUBMIT_LIMIT must be empty (no limit) or like "
            f"'600 per minute' or '50/second', got {app.config['QUEUE_SUBMIT_LIMIT']!r}"
        ) from None


def first_request_check(address: str | None = None) -> None:
    """On a process's first request: warn if this server is exposed without a secret.

    ``address`` is :func:`served_address` of the request, when already known.
    """
    if address is None:
        address = served_address(request.environ)
    warn_if_exposed(address, current_app.config["QUEUE_ACCESS_TOKEN"])


__all__ = [
    "CONTENT_SECURITY_POLICY",
    "RateLimited",
    "SubmitLimiter",
    "add_security_headers",
    "access_refusal",
    "cross_site_reason",
    "describe_limit",
    "host_refusal",
    "init_app",
    "local_address",
    "may_act",
    "printable",
    "served_address",
    "spend_submit",
    "submit_allowance",
    "submit_limit_words",
    "warn_if_exposed",
]
