"""Support for the real-browser tests: Debian's Chromium through Playwright's
sync API, and the real app under gunicorn in a subprocess.

Policy when no browser is available: under ``CI=true`` the browser tests
fail (CI must run them); elsewhere they are skipped, loudly, with the way to
get one. ``make browser`` (run by ``make test``) installs it when run as root.

Fixtures (tests/conftest.py loads this module as a plugin, so every test module
shares them; importing them into a module would give it a second Chromium):

``chromium_browser``
    One Chromium for the whole session.
``dashboard_server``
    The app under gunicorn with short tasks and fast polls, one per module.
    Tests share it, so they wait for it to be idle and assert on deltas.
``tab``
    A fresh context and page per test, watched for console errors, page
    errors, failed requests and HTTP errors; any that the test did not
    declare expected fail it.
``start_server``
    Starts a quick server of the test's own (``QUICK`` plus the environment
    it is given), stopped when the test ends; for tests that pause the
    queue, change its workers or reset it. One starts in well under a second.
``fresh_server``, ``fresh_tab``
    One such server with the ``QUICK`` settings, and a watched page on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NoReturn
from urllib.parse import urlsplit

import pytest

from support import wait_for

try:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Response, expect
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright
except ImportError as exc:  # pragma: no cover - requirements-dev.txt pins playwright
    _PLAYWRIGHT_MISSING: ImportError | None = exc
    expect = None  # type: ignore[assignment]
else:
    _PLAYWRIGHT_MISSING = None

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"

DEFAULT_CHROMIUM = "/usr/bin/chromium"
#: Set to a path to use that binary instead; set to "" (or a missing path) to hide Chromium.
CHROMIUM_ENV = "CHROMIUM_PATH"
INSTALL_HINT = "run as root: apt-get install chromium  (`make browser` does it when run as root)"

# Without the background-networking flags Chromium dials out at start, and this
# machine's closed network refuses it.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

#: Environment the server under test must not inherit: it would change which queue we see.
_SERVER_ENV_DROP = ("BIND", "PORT", "WEB_CONCURRENCY", "GUNICORN_THREADS")

#: The quick server most tests share.
QUICK = {
    "FLASK_QUEUE_WORK_TIME": "0.5",
    "FLASK_QUEUE_POLL_INTERVAL": "0.3",
    "FLASK_QUEUE_WORKERS": "1",
    "FLASK_QUEUE_SHUTDOWN_TIMEOUT": "2",
}


# -- browser availability policy ------------------------------------------------


def is_ci(env: Mapping[str, str] = os.environ) -> bool:
    return env.get("CI", "").strip().lower() in ("true", "1", "yes")


def find_chromium(env: Mapping[str, str] = os.environ, default: str = DEFAULT_CHROMIUM) -> str | None:
    """The Chromium binary to drive: ``$CHROMIUM_PATH`` if set, else ``default``,
    else ``chromium`` on ``$PATH``; None when there is none."""
    if CHROMIUM_ENV in env:
        chosen = env[CHROMIUM_ENV]
        return chosen if chosen and os.access(chosen, os.X_OK) and os.path.isfile(chosen) else None
    if os.path.isfile(default) and os.access(default, os.X_OK):
        return default
    return shutil.which("chromium", path=env.get("PATH", ""))


def unavailable_message(reason: str) -> str:
    return f"browser tests need Chromium, but {reason}. To get it: {INSTALL_HINT}"


def browser_unavailable(
    reason: str, env: Mapping[str, str] = os.environ, config: pytest.Config | None = None
) -> NoReturn:
    """Fail under CI (the browser tests must run there), else skip, loudly."""
    message = unavailable_message(reason)
    if is_ci(env):
        pytest.fail(f"CI=true and {message}", pytrace=False)
    if config is not None:
        _warn_loudly(config, f"WARNING: SKIPPING the browser tests: {message}")
    pytest.skip(message)


class _SkipWarning:
    """Repeats the warning in the terminal summary, where it is hard to miss."""

    def __init__(self, line: str):
        self.line = line

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.write_sep("=", "browser tests skipped", yellow=True, bold=True)
        terminalreporter.write_line(self.line, yellow=True, bold=True)


def _warn_loudly(config: pytest.Config, line: str) -> None:
    """Print ``line`` now, past output capturing, and again in the summary."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.ensure_newline()
        reporter.write_line(line, yellow=True, bold=True)
    if not config.pluginmanager.has_plugin("browser-skip-warning"):
        config.pluginmanager.register(_SkipWarning(line), "browser-skip-warning")


# -- the server under test ------------------------------------------------------


@dataclass
class Server:
    """The app running under gunicorn, and a small HTTP client for its JSON API."""

    url: str
    proc: subprocess.Popen
    log: Path

    def request(self, method: str, path: str, body: Any = None,
                token: str | None = None) -> tuple[int, Any]:
        """The JSON API as a script would call it: no browser headers, maybe a Bearer token."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.load(error)

    def stats(self) -> dict[str, Any]:
        status, stats = self.request("GET", "/api/stats")
        assert status == 200, stats
        return stats

    def submit(self, kind: str, count: int = 1, **params: Any) -> list[int]:
        status, body = self.request("POST", "/api/tasks", {"kind": kind, "count": count, "params": params})
        assert status == 202, body
        return body["ids"]

    def wait_idle(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until nothing is queued or running (tests sharing a server start here)."""
        return wait_for(
            lambda: (s := self.stats())["queued"] == 0 and s["running"] == 0 and s,
            timeout,
            "the server under test to be idle",
        )

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])




def gunicorn_bin() -> Path:
    return Path(sys.executable).parent / "gunicorn"


@contextlib.contextmanager
def run_server(log: Path, env: Mapping[str, str], ready_timeout: float = 30.0,
               port: int = 0) -> Iterator[Server]:
    """Start the app under gunicorn and gunicorn.conf.py, wait for /healthz, always stop it.

    We bind the listening socket ourselves (port 0) and hand its descriptor to
    gunicorn (``BIND=fd://N``), so no other process can take the port between
    choosing it and using it. ``port`` binds that one instead: a server
    started again where a stopped one was (see :func:`restart`).
    """
    child_env = {
        k: v for k, v in os.environ.items() if not k.startswith("FLASK_") and k not in _SERVER_ENV_DROP
    }
    child_env.update(env)
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        host, port = listener.getsockname()
        child_env["BIND"] = f"fd://{listener.fileno()}"
        log_file = stack.enter_context(open(log, "wb"))
        proc = subprocess.Popen(
            # No control socket: its default path is shared by every gunicorn of this user.
            [str(gunicorn_bin()), "-c", "gunicorn.conf.py", "--no-control-socket"],
            cwd=ROOT,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            pass_fds=(listener.fileno(),),
            start_new_session=True,
        )
        stack.callback(_stop, proc)
        listener.close()  # gunicorn holds its own copy now
        server = Server(f"http://{host}:{port}", proc, log)
        _wait_ready(server, ready_timeout)
        yield server


def stop(server: Server) -> None:
    """Stop ``server`` now, as an operator would (SIGTERM: a graceful stop), and reap it."""
    _stop(server.proc)


def _wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"gunicorn exited with {server.proc.returncode} before it was ready:\n"
                + server.log_tail()
            )
        try:
            with urllib.request.urlopen(server.url + "/healthz", timeout=2) as response:
                if response.status == 200:
                    return
                last = response.status
        except urllib.error.HTTPError as exc:
            exc.close()  # (it holds the connection: a 503 while an RQ worker comes up)
            last = f"HTTP {exc.code}"
        except (OSError, urllib.error.URLError) as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(
        f"{server.url}/healthz not ready within {timeout:g}s (last: {last!r}):\n" + server.log_tail()
    )


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the whole process group, SIGKILL it if it will not go, and reap it."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # gunicorn's worker is in the same group: make sure nothing of it is left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


# -- a watched page ---------------------------------------------------------------

#: The paths pages poll: the dashboard's regions, a task's detail, the list of tasks.
POLL_PATH = re.compile(r"/live(/[a-z]+)?|/tasks/\d+/live|/tasks/live")


#: How a request fails when the server is gone or the network is off (or when
#: the page gives up on it or leaves it behind meanwhile).
_LOST = frozenset({"net::ERR_CONNECTION_REFUSED", "net::ERR_INTERNET_DISCONNECTED",
                   "net::ERR_CONNECTION_RESET", "net::ERR_EMPTY_RESPONSE",
                   "net::ERR_ABORTED", "net::ERR_CONNECTION_CLOSED"})


@dataclass
class Tab:
    """A page plus what went wrong on it: console errors, page errors, failed
    requests and HTTP errors. ``expect_http_error`` declares one a test causes."""

    page: Page
    server: Server
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    http_errors: list[tuple[int, str]] = field(default_factory=list)
    expected: set[tuple[int, str]] = field(default_factory=set)
    aborted_polls_expected: bool = False
    lost_server_expected: bool = False
    watching: bool = True

    def expect_http_error(self, status: int, path: str) -> None:
        self.expected.add((status, path))

    def expect_aborted_polls(self) -> None:
        """Declare that the test navigates away from a polling page: the browser
        aborts the poll then in flight (``net::ERR_ABORTED``), which is no fault."""
        self.aborted_polls_expected = True

    def expect_lost_server(self) -> None:
        """Declare that the test stops the server (or the network) under an open
        page: polls and clicks then fail, and the browser and htmx say so in the
        console, which is no fault of the page."""
        self.lost_server_expected = True

    def new_page(self) -> Page:
        """Another page in the same context, watched like the first."""
        page = self.page.context.new_page()
        self.watch(page)
        return page

    def watch(self, page: Page | None = None) -> None:
        page = page or self.page
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.watching and self.page_errors.append(str(error)))
        page.on("requestfailed", self._on_request_failed)
        page.on("response", self._on_response)

    def _on_console(self, message: ConsoleMessage) -> None:
        if not self.watching or message.type != "error":
            return
        # Chromium logs each HTTP error response; expected ones are not problems.
        url = (message.location or {}).get("url", "")
        if self.lost_server_expected and (
            message.text.startswith("Failed to load resource: net::ERR_")
            or message.text.startswith("htmx: htmx:error")
        ):
            return
        if message.text.startswith("Failed to load resource: the server responded with a status of "):
            status = int(message.text.split("status of ")[1].split()[0])
            if (status, urlsplit(url).path) in self.expected:
                return
        self.console_errors.append(f"{message.text} ({url})")

    def _on_request_failed(self, request: Request) -> None:
        if (
            self.aborted_polls_expected
            and request.method == "GET"
            and request.failure == "net::ERR_ABORTED"
            and POLL_PATH.fullmatch(urlsplit(request.url).path)
        ):
            return
        if self.lost_server_expected and request.failure in _LOST:
            return
        if self.watching:
            self.failed_requests.append(f"{request.method} {request.url}: {request.failure}")

    def _on_response(self, response: Response) -> None:
        if not self.watching or response.status < 400:
            return
        path = urlsplit(response.url).path
        if (response.status, path) not in self.expected:
            self.http_errors.append((response.status, f"{response.request.method} {path}"))

    def problems(self) -> list[str]:
        return (
            [f"console error: {m}" for m in self.console_errors]
            + [f"uncaught page error: {m}" for m in self.page_errors]
            + [f"request failed: {m}" for m in self.failed_requests]
            + [f"HTTP {status} for {what}" for status, what in self.http_errors]
        )

    def screenshot(self, name: str, page: Page | None = None) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        (page or self.page).screenshot(path=str(path), full_page=True)
        return path


@contextlib.contextmanager
def open_tab(browser: Browser, server: Server, **context_options: Any) -> Iterator[Tab]:
    """A fresh context and page on ``server``; fails on problems nobody expected."""
    context = browser.new_context(base_url=server.url, **context_options)
    try:
        context.set_default_timeout(15_000)
        tab = Tab(context.new_page(), server)
        tab.watch()
        yield tab
        # Closing aborts the page's in-flight polls: stop watching first.
        tab.watching = False
        problems = tab.problems()
        assert not problems, "the page had problems:\n  " + "\n  ".join(problems)
    finally:
        context.close()


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium_browser(request: pytest.FixtureRequest) -> Iterator[Browser]:
    """One Chromium per session, or the availability policy: fail under CI, else skip."""
    if _PLAYWRIGHT_MISSING is not None:
        browser_unavailable(
            f"the playwright package is missing ({_PLAYWRIGHT_MISSING}); "
            "install it with: .venv/bin/pip install -r requirements-dev.txt",
            config=request.config,
        )
    path = find_chromium()
    if path is None:
        where = (
            f"${CHROMIUM_ENV} is {os.environ[CHROMIUM_ENV]!r}, not an executable"
            if CHROMIUM_ENV in os.environ
            else f"neither {DEFAULT_CHROMIUM} nor `chromium` on PATH exists"
        )
        browser_unavailable(where, config=request.config)
    manager = sync_playwright().start()
    try:
        try:
            browser = manager.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, timeout=60_000)
        except PlaywrightError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            browser_unavailable(f"{path} cannot launch ({first})", config=request.config)
        try:
            yield browser
        finally:
            browser.close()
    finally:
        manager.stop()


@pytest.fixture(scope="module")
def dashboard_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The quick server: half-second tasks, polls every 0.3 s, one queue worker."""
    log = tmp_path_factory.mktemp("gunicorn") / "quick.log"
    with run_server(log, QUICK) as server:
        yield server


@pytest.fixture
def tab(chromium_browser: Browser, dashboard_server: Server) -> Iterator[Tab]:
    """A fresh, watched page on the quick server, once that server is idle."""
    dashboard_server.wait_idle()
    with open_tab(chromium_browser, dashboard_server) as tab:
        yield tab


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``start_server(**env)``: a quick server of this test's own, ``QUICK`` plus ``env``
    (``FLASK_QUEUE_WORKERS="3"``); every one started is stopped when the test ends.
    ``port=`` binds that port (a server started again where a stopped one was)."""
    with contextlib.ExitStack() as stack:
        started = 0

        def start(port: int = 0, **env: str) -> Server:
            nonlocal started
            started += 1
            log = tmp_path / f"gunicorn-{started}.log"
            return stack.enter_context(run_server(log, {**QUICK, **env}, port=port))

        yield start


@pytest.fixture
def fresh_server(start_server: Callable[..., Server]) -> Server:
    """A quick server for this test alone: its pauses, workers and resets stay here."""
    return start_server()


@pytest.fixture
def fresh_tab(chromium_browser: Browser, fresh_server: Server) -> Iterator[Tab]:
    """A watched page on this test's own quick server."""
    with open_tab(chromium_browser, fresh_server) as tab:
        yield tab
