"""The app's configuration keys: defaults, allowed values, and the check at start.

Every key can be set in the environment with the ``FLASK_`` prefix
(``FLASK_QUEUE_WORKERS=4``); values there are parsed as JSON first, so numbers
and ``true``/``false`` arrive typed. A value that is not allowed stops the
app at start with a message that names the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, MutableMapping
from urllib.parse import urlsplit

import click

from .errors import InvalidParam
from .tasks import Bool, Float, Int, Param, Str


class ConfigError(click.ClickException, ValueError):
    """The app cannot start as configured. The message names the key or the file.

    A click exception, so ``flask run`` shows it as one line ("Error: ...")
    instead of a traceback.
    """


@dataclass(frozen=True)
class Origins(Param):
    """A list of origins like ``https://admin.example.com``: a JSON list or a comma list."""

    def describe(self) -> str:
        return "a list of origins like https://admin.example.com"

    def parse(self, name: str, value: object) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise InvalidParam(name, f"must be {self.describe()}, got {value!r}")
        origins = []
        for origin in value:
            parts = urlsplit(origin) if isinstance(origin, str) else None
            if (parts is None or parts.scheme not in ("http", "https") or not parts.netloc
                    or parts.path or parts.query or parts.fragment):
                raise InvalidParam(name, f"must be {self.describe()}, got {origin!r}")
            origins.append(origin)
        return tuple(origins)


_HOST_NAME = re.compile(r"\.?[a-z0-9-]+(\.[a-z0-9-]+)*(:[0-9]{1,5})?", re.ASCII | re.IGNORECASE)


@dataclass(frozen=True)
class Hosts(Param):
    """Flask's ``TRUSTED_HOSTS``: a JSON list or a comma list of host names, or unset.

    Flask hands the list to Werkzeug, which would take a comma list as one
    name that no request ever matches, and compares names only up to the
    first ``:``, so an IPv6 address can never match: both are refused here.
    """

    def describe(self) -> str:
        return ("a list of host names like dash.example.com (a leading dot accepts every "
                "subdomain; no IPv6 addresses), or unset")

    def parse(self, name: str, value: object) -> list[str] | None:
        if value is None or value == "":
            return None
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise InvalidParam(name, f"must be {self.describe()}, got {value!r}")
        for host in value:
            if not isinstance(host, str) or not _HOST_NAME.fullmatch(host):
                raise InvalidParam(name, f"must be {self.describe()}, got {host!r}")
        return [host.lower() for host in value]


@dataclass(frozen=True)
class OrStoreDefault(Param):
    """``inner``'s values, or unset (``None`` or empty) for the store's own default."""

    inner: Param

    def describe(self) -> str:
        return f"{self.inner.describe()}, or unset for the store's default"

    def parse(self, name: str, value: object) -> Any:
        if value is None or value == "":
            return None
        try:
            return self.inner.parse(name, value)
        except InvalidParam:
            raise InvalidParam(name, f"must be {self.describe()}, got {value!r}") from None


#: ``QUEUE_HISTORY`` when it is unset, by store. A SQLite file finds and pages a
#: large history as fast as a small one (``make bench`` row 10) and keeps it on
#: disk; memory keeps it in RAM and searches it linearly; each RQ job is a few
#: KB of Redis's memory.
HISTORY_DEFAULTS = {"memory": 1_000, "sqlite": 100_000, "redis": 1_000}


def history_for(config: Mapping[str, Any]) -> int:
    """The finished tasks the configured store keeps: ``QUEUE_HISTORY``, else its default."""
    if config.get("QUEUE_HISTORY") is not None:
        return int(config["QUEUE_HISTORY"])
    url = str(config.get("QUEUE_URL") or "memory://")
    store = ("sqlite" if url.startswith("sqlite:") else
             "redis" if url.startswith(("redis://", "rediss://", "unix://")) else "memory")
    return HISTORY_DEFAULTS[store]


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    spec: Param
    doc: str


SETTINGS: tuple[Setting, ...] = (
    Setting("QUEUE_WORKERS", 1, Int(0, 64), "Worker threads per process. 0 starts none: "
            "tasks then run only when code calls `run_pending()` (tests). Up to 64, and not more "
            "than `QUEUE_MAX_WORKERS` (the app refuses to start)."),
    Setting("QUEUE_MAX_WORKERS", 16, Int(1, 64), "Most worker threads the dashboard's + button "
            "(or `POST /workers`) can reach."),
    Setting("QUEUE_WORK_TIME", 3.0, Float(0, 3600), "Seconds one demo `pretend` or `flaky` task "
            "takes when the request does not say."),
    Setting("QUEUE_MAX_QUEUED", 10_000, Int(1, 10_000_000), "Most tasks that may wait in the queue; "
            "beyond it submits are refused (503 with `Retry-After`)."),
    Setting("QUEUE_MAX_BATCH", 100, Int(1, 100_000), "Most tasks one request may add (`count`). "
            "Must not be larger than `QUEUE_MAX_QUEUED` (the app refuses to start)."),
    Setting("QUEUE_HISTORY", None, OrStoreDefault(Int(0, 1_000_000)), "Finished tasks kept for "
            "the dashboard, the task list and `GET /api/tasks/<id>`; counters keep the totals "
            "beyond it. Unset: the store's default, 1,000 in memory and on Redis, 100,000 in a "
            "SQLite file. See [What each store keeps](stores.md#what-each-store-keeps)."),
    Setting("QUEUE_MAX_RESULT_BYTES", 64 * 1024, Int(0, 16 * 1024 * 1024), "Most bytes of a "
            "task's result (its return value, as JSON) kept with the task; a larger result "
            "fails the task, saying so."),
    Setting("QUEUE_POLL_INTERVAL", 1.0, Float(0.2, 60), "Seconds between dashboard polls."),
    Setting("QUEUE_SHUTDOWN_TIMEOUT", 10.0, Float(0, 3600), "Seconds running tasks get to finish "
            "when the process is asked to stop."),
    Setting("QUEUE_DEFAULT_KIND", "", Str(100), "The task kind the \"Add work\" button "
            "and requests without `kind` submit; empty: the first registered, by name. "
            "The demo app sets `pretend`."),
    Setting("QUEUE_URL", "memory://", Str(1000), "Where tasks live: `memory://` (this "
            "process, lost on restart) or `sqlite:///path/to/queue.db` (one file shared by "
            "every process on the machine, kept across restarts; a relative path is under "
            "the app's instance folder), or `redis://host:6379/0` (also `rediss://`, "
            "`unix:///path/to/redis.sock`): RQ jobs on Redis, run by `flask queue worker` "
            "processes on any machine. See [Choosing a store](stores.md#choosing-a-store) and "
            "[Scaling out with RQ](rq.md#scaling-out-with-rq)."),
    Setting("QUEUE_LEASE_TIME", 30.0, Float(1, 3600), "SQLite store: seconds a running task's claim "
            "lasts without its process renewing it, where no process can tell whether that "
            "one still runs (another container sharing the file); then the task is queued "
            "again. Keep it above the longest time the file may stay locked. On one machine "
            "a live process keeps its tasks and a dead one's are queued again at once."),
    Setting("QUEUE_MAX_ATTEMPTS", 3, Int(1, 100), "SQLite store: starts a task gets before it is "
            "failed for good when its process keeps dying under it."),
    Setting("QUEUE_RETENTION", 604800.0, Float(60, 3.2e8), "SQLite and RQ: seconds a finished task "
            "is kept at most (QUEUE_HISTORY caps how many). See [What each store keeps]"
            "(stores.md#what-each-store-keeps)."),
    Setting("QUEUE_ACCESS_TOKEN", "", Str(500), "A secret every request must carry (HTTP Basic "
            "password, or `Authorization: Bearer`); empty: no secret. At least 12 characters. "
            "See [Security](security.md#security)."),
    Setting("QUEUE_PUBLIC_READ", False, Bool(), "With `QUEUE_ACCESS_TOKEN`: leave the pages and polls "
            "open (a projector), and ask for the secret only for actions."),
    Setting("QUEUE_METRICS_PUBLIC", False, Bool(), "With `QUEUE_ACCESS_TOKEN`: leave `GET "
            "/metrics` open, for a Prometheus scraper on a private network that cannot send "
            "the secret (one that can sends it as `Authorization: Bearer`). See "
            "[Monitoring](monitoring.md#monitoring)."),
    Setting("TRUSTED_HOSTS", None, Hosts(), "Flask's own: the names the dashboard answers "
            "to, like `dash.example.com, localhost` (a leading dot: every subdomain; `[]`: any "
            "name). Unset: on loopback only loopback names (`localhost`, `127.0.0.1`, `[::1]`), "
            "elsewhere any. See [Security](security.md#security)."),
    Setting("QUEUE_TRUSTED_ORIGINS", (), Origins(), "Other origins whose pages may post here "
            "(everything else cross-site gets 403)."),
    Setting("QUEUE_SUBMIT_LIMIT", "600 per minute", Str(100), "Most tasks one client (IP address) "
            "may add, like `600 per minute` or `20/second`; empty for no limit. Per process."),
    Setting("QUEUE_HANDLE_SIGNALS", True, Bool(), "Close the queue on SIGTERM/SIGINT before the "
            "server's own handler runs, so no new work is taken while stopping."),
    Setting("QUEUE_RUN_WORKERS", True, Bool(), "Run worker threads in the web processes. Off: "
            "they run none, whatever the worker count (it is passed on to the store), and the "
            "work runs in `flask queue worker` processes sharing a SQLite store."),
    Setting("QUEUE_SCHEDULES", True, Bool(), "Run a scheduler thread in each process, which "
            "queues the runs of the [periodic tasks](tasks.md#periodic-tasks) as they fall due. Off: "
            "this process queues none (the page still lists them; another process sharing "
            "the store must run them)."),
)

DEFAULTS = {s.key: s.default for s in SETTINGS}


#: Settings that never had another name.
_BORN_PREFIXED = frozenset({"QUEUE_URL", "QUEUE_MAX_RESULT_BYTES", "QUEUE_SCHEDULES",
                            "QUEUE_RUN_WORKERS", "QUEUE_METRICS_PUBLIC"})

#: What each setting was called before it took the ``QUEUE_`` prefix (Flask's
#: convention for an extension's settings, so they cannot collide with an app's own).
OLD_NAMES = {s.key: s.key.removeprefix("QUEUE_") for s in SETTINGS
             if s.key.startswith("QUEUE_") and s.key not in _BORN_PREFIXED}


def old_names_in(environ: Mapping[str, str]) -> list[str]:
    """Lines for each ``FLASK_<old name>`` set in ``environ`` whose new name is not:
    a deployment still configured by the old names would silently get defaults."""
    return [
        f"FLASK_{old} is set but is no longer read: the setting is now {key} "
        f"(FLASK_{key} in the environment)"
        for key, old in OLD_NAMES.items()
        if f"FLASK_{old}" in environ and f"FLASK_{key}" not in environ
    ]


def check_config(config: MutableMapping[str, Any]) -> None:
    """Parse every setting in place, or raise :class:`ConfigError` naming the key."""
    for setting in SETTINGS:
        try:
            config[setting.key] = setting.spec.parse(setting.key, config.get(setting.key))
        except InvalidParam as exc:
            raise ConfigError(
                f"invalid configuration: {exc} (set it in the app config or as "
                f"FLASK_{setting.key} in the environment)"
            ) from None
    if config["QUEUE_WORKERS"] > config["QUEUE_MAX_WORKERS"]:
        raise ConfigError(
            "invalid configuration: QUEUE_WORKERS must not be larger than QUEUE_MAX_WORKERS "
            f"({config['QUEUE_WORKERS']} > {config['QUEUE_MAX_WORKERS']})"
        )
    token = config["QUEUE_ACCESS_TOKEN"]
    if token and len(token) < 12:
        raise ConfigError(
            "invalid configuration: QUEUE_ACCESS_TOKEN must be at least 12 characters; make one with "
            "python -c 'import secrets; print(secrets.token_urlsafe())'"
        )
    url = config["QUEUE_URL"]
    if url != "memory://" and not (url.startswith("sqlite:///") and len(url) > len("sqlite:///")) \
            and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            "invalid configuration: QUEUE_URL must be memory://, sqlite:///path/to/queue.db or "
            f"redis://host:6379/0 (also rediss:// and unix:///path/to/redis.sock), got {url!r}"
        )
    if config["QUEUE_MAX_BATCH"] > config["QUEUE_MAX_QUEUED"]:
        raise ConfigError(
            "invalid configuration: QUEUE_MAX_BATCH must not be larger than QUEUE_MAX_QUEUED "
            f"({config['QUEUE_MAX_BATCH']} > {config['QUEUE_MAX_QUEUED']})"
        )
