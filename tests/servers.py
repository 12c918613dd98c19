"""Run the real app under a real server in a subprocess, for test_servers.py.

Each :class:`Server` gets a free port on 127.0.0.1, a session of its own (so
its whole process group can be killed: a gunicorn or uWSGI master and its
workers, the reloader's parent and child) and a log file in the test's
``tmp_path`` that takes the server's stdout and stderr.

Nothing here sleeps and hopes: readiness, task completion and exit are polled
with a deadline that only bounds a failure. What ran where is read from the
app's own log lines::

    started 2 worker thread(s) in pid 1234
    task 12 (pretend) done in 0.20s [pid 1234 worker-1]
    shutdown: dropped 3 queued task(s)
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from support import wait_for

ROOT = Path(__file__).resolve().parent.parent
#: The venv's scripts: the tests run under .venv/bin/python.
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"

#: Deadlines that only bound a failure; a passing run takes a small part of them.
START_TIMEOUT = 60.0
TASK_TIMEOUT = 60.0
EXIT_TIMEOUT = 60.0
HTTP_TIMEOUT = 10.0

DONE_RE = re.compile(r"task (\d+) \((\w+)\) done in [0-9.]+s \[pid (\d+) ([\w-]+)\]")
STARTED_RE = re.compile(r"started (\d+) worker thread\(s\) in pid (\d+)")
DROPPED_RE = re.compile(r"shutdown: dropped (\d+) queued task\(s\)")
ABANDONED_RE = re.compile(r"shutdown: (\d+) thread\(s\) still running a task after ([0-9.]+)s")

#: Environment a server under test must not inherit: it would change what we test.
_ENV_DROP_PREFIXES = ("FLASK_", "WERKZEUG_", "UWSGI_", "GUNICORN_")
_ENV_DROP = ("BIND", "PORT", "WEB_CONCURRENCY")

T = TypeVar("T")


#: Ports for servers under test: below Linux's ephemeral range (32768-60999),
#: where bind(0) and outgoing connections never land.
PORT_RANGE = (20000, 32000)
_PORT_LOCKS = Path(tempfile.gettempdir()) / "dashboard-test-ports"
_held_ports: list[int] = []  # lock descriptors, open (so held) until this process ends


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, reserved for this process.

    A port picked with bind(0) and closed again is free for anyone until the
    server binds it, and the kernel hands the same one to the next bind(0):
    two test sessions on one machine then started servers on one port, and
    one session's requests reached the other's server. So the port is drawn
    at random and held with a lock file for this process's life: no other
    session (nor this one, a second time) can pick it.
    """
    _PORT_LOCKS.mkdir(exist_ok=True)
    draw = random.SystemRandom().randint
    for _ in range(500):
        port = draw(*PORT_RANGE)
        fd = os.open(_PORT_LOCKS / f"{port}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((HOST, port))
        except OSError:  # locked by another session, or in use
            os.close(fd)
            continue
        _held_ports.append(fd)
        return port
    raise RuntimeError(f"no free port in {PORT_RANGE} after 500 tries")


def server_env(settings: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without server settings, plus ``settings``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_ENV_DROP_PREFIXES) and key not in _ENV_DROP
    }
    env["PYTHONUNBUFFERED"] = "1"
    env["FLASK_QUEUE_SCHEDULES"] = "false"  # (as in conftest: a test asks for schedules)
    env.update(settings)
    return env




def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` (Linux /proc), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after it.
    return int(stat.rsplit(")", 1)[1].split()[1])


def ignored_signals(pid: int) -> set[int]:
    """The signals ``pid`` ignores (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask >> (n - 1) & 1}
    raise AssertionError(f"no SigIgn in /proc/{pid}/status")


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of the process group ``pgid`` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


@dataclass(frozen=True)
class Run:
    """One ``done`` log line: task ``task_id`` ran to the end in ``pid``."""

    task_id: int
    kind: str
    pid: int
    worker: str


@dataclass
class Reply:
    status: int
    body: Any  # parsed JSON, else the text
    close: bool  # the server closes the connection after this reply


def _parse(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode(errors="replace")


#: Runs the server command in place (same pid) with SIGINT and SIGTERM set as
#: given: a terminal or a process manager starts a server with both at their
#: default, even when these tests run with SIGINT ignored (as a background job
#: of a non-interactive shell is).
_LAUNCHER = """\
import os, signal, sys
for name in sys.argv[1].split(","):
    signal.signal(getattr(signal, name), signal.SIG_DFL)
for name in filter(None, sys.argv[2].split(",")):
    signal.signal(getattr(signal, name), signal.SIG_IGN)
os.execv(sys.argv[3], sys.argv[3:])
"""


class Server:
    """One server command, started in its own session; see the module docstring.

    ``ignore`` names signals the server starts with ignored (``("SIGINT",)``);
    SIGINT and SIGTERM are otherwise at their defaults.
    """

    def __init__(self, name: str, args: Sequence[str], log_path: Path, env: Mapping[str, str],
                 port: int, ignore: Sequence[str] = (), cwd: Path = ROOT):
        self.name = name
        self.cwd = cwd
        self.args = [
            sys.executable, "-c", _LAUNCHER, "SIGINT,SIGTERM", ",".join(ignore), *args
        ]
        self.log_path = log_path
        self.env = dict(env)
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<Server {self.name} on {HOST}:{self.port}>"

    # -- processes ---------------------------------------------------------

    def start(self) -> Server:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.args,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        """The process we started: the dev server, the reloader's parent, the master."""
        assert self.proc is not None, "not started"
        return self.proc.pid

    def send(self, signum: int) -> None:
        """Send ``signum`` to the process we started (not to its group)."""
        os.kill(self.pid, signum)

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Wait for the started process to exit by itself; fail (never hang) after ``timeout``."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running {timeout:.0f}s after it was asked to stop; "
                f"log:\n{self.log_tail()}"
            ) from None

    def members(self) -> list[int]:
        """Live processes left in the server's process group (its session)."""
        return group_members(self.pid) if self.proc is not None else []

    def wait_group_gone(self, timeout: float = EXIT_TIMEOUT) -> None:
        wait_for(lambda: not self.members(), timeout,
                 f"every process of {self.name} gone (left: {self.members()})")

    def stop(self) -> None:
        """Kill the whole process group and reap what we started. Safe to call twice."""
        if self.proc is None:
            return
        if self.members():
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        # A child of the process we started (the reloader's child, a worker) is
        # not ours to reap: wait until the kernel has ended it.
        self.wait_group_gone(timeout=30)

    # -- the log -------------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def runs(self) -> list[Run]:
        """Every task that ran to the end, in log order."""
        return [
            Run(int(m[1]), m[2], int(m[3]), m[4]) for m in DONE_RE.finditer(self.log())
        ]

    def starts(self) -> Counter[int]:
        """How many times worker threads were started, per pid."""
        return Counter(int(m[2]) for m in STARTED_RE.finditer(self.log()))

    def dropped(self) -> list[int]:
        """The counts of every ``shutdown: dropped N queued task(s)`` line."""
        return [int(m[1]) for m in DROPPED_RE.finditer(self.log())]

    def wait_log(self, what: str, predicate: Callable[[str], T],
                 timeout: float = TASK_TIMEOUT) -> T:
        try:
            return wait_for(lambda: predicate(self.log()), timeout,
                            f"{what} in the log of {self.name}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n{self.log_tail()}") from None

    # -- HTTP ----------------------------------------------------------------

    def connect(self, timeout: float = HTTP_TIMEOUT) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(HOST, self.port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None,
                conn: http.client.HTTPConnection | None = None,
                headers: Mapping[str, str] | None = None) -> Reply:
        """One request; on a fresh connection (closed after) unless ``conn`` is given."""
        own = conn is None
        conn = conn or self.connect()
        try:
            headers = dict(headers or {})
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            close = response.will_close
        finally:
            if own:
                conn.close()
        return Reply(response.status, _parse(raw), close)

    def stats(self) -> dict[str, Any]:
        reply = self.request("GET", "/api/stats")
        assert reply.status == 200, reply
        return reply.body

    def submit(self, count: int = 1, seconds: float = 0.0) -> list[int]:
        """Submit ``count`` pretend tasks of ``seconds`` each; return their ids (asserts 202)."""
        reply = self.request(
            "POST", "/api/tasks",
            {"kind": "pretend", "count": count, "params": {"seconds": seconds}},
        )
        assert reply.status == 202, reply
        assert len(reply.body["ids"]) == count, reply
        return reply.body["ids"]

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """Poll GET /api/stats until it answers 200 (the first request starts workers)."""

        def answer() -> dict[str, Any] | None:
            if self.exited():
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode} before it answered; "
                    f"log:\n{self.log_tail()}"
                )
            try:
                reply = self.request("GET", "/api/stats")
            except (OSError, http.client.HTTPException):
                return None
            if reply.status != 200:
                return None
            answering = reply.body["pid"]
            if answering != self.pid and parent_pid(answering) != self.pid:
                raise AssertionError(
                    f"pid {answering} answers on port {self.port}, and it is not {self.name} "
                    f"(pid {self.pid}) nor its child: another server holds the port"
                )
            return reply.body

        try:
            return wait_for(answer, timeout, f"{self.name} answering on port {self.port}", 0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n{self.log_tail()}") from None

    def wait_stats(self, what: str, predicate: Callable[[dict[str, Any]], bool],
                   timeout: float = TASK_TIMEOUT) -> dict[str, Any]:
        """Poll GET /api/stats until ``predicate(stats)``; return those stats."""

        def check() -> dict[str, Any] | None:
            try:
                stats = self.stats()
            except (OSError, http.client.HTTPException):
                return None  # between two serving processes (a reload)
            return stats if predicate(stats) else None

        try:
            return wait_for(check, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n{self.log_tail()}") from None

    def wait_done(self, done: int, timeout: float = TASK_TIMEOUT) -> dict[str, Any]:
        """Wait until this serving process has finished ``done`` tasks and is idle."""
        stats = self.wait_stats(
            f"{done} task(s) done and nothing queued or running",
            lambda s: s["done"] + s["failed"] >= done and not s["queued"] and not s["running"],
            timeout,
        )
        assert (stats["done"], stats["failed"]) == (done, 0), stats
        return stats


UWSGI = BIN / "uwsgi"


def server_command(kind: str, port: int, extra: Sequence[str] = ()
                   ) -> tuple[list[str], dict[str, str]]:
    """The command line for ``kind`` and the environment it takes its address from.

    ``kind`` is flask, flask-debug, gunicorn (with gunicorn.conf.py) or uwsgi
    (with uwsgi.ini); ``extra`` goes at the end of the command line.
    """
    if kind == "flask":
        return [str(BIN / "flask"), "--app", "dashboard", "run", "--host", HOST,
                "--port", str(port), *extra], {}
    if kind == "flask-debug":
        return [str(BIN / "flask"), "--app", "dashboard", "run", "--debug", "--host", HOST,
                "--port", str(port), *extra], {}
    bind = {"BIND": f"{HOST}:{port}"}
    if kind == "gunicorn":
        return [str(BIN / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py"), *extra], bind
    if kind == "uwsgi":
        return [str(UWSGI), "--ini", str(ROOT / "uwsgi.ini"), *extra], bind
    raise ValueError(kind)


class Servers:
    """Starts servers for one test, each on a free port with its log in ``directory``.

    ``servers(kind, *extra, ignore=(), **env)`` starts one with ``defaults``
    and ``env`` in its environment; :meth:`stop_all` kills every one started.
    """

    def __init__(self, directory: Path, defaults: Mapping[str, str]):
        self.directory = directory
        self.defaults = dict(defaults)
        self.started: list[Server] = []

    def __call__(self, kind: str, *extra: str, ignore: Sequence[str] = (),
                 **settings: str) -> Server:
        port = free_port()
        args, address = server_command(kind, port, extra)
        env = server_env({**self.defaults, **settings, **address})
        log = self.directory / f"{kind}-{len(self.started)}.log"
        server = Server(kind, args, log, env, port, tuple(ignore))
        self.started.append(server)
        return server.start()

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()


class HeldSubmit:
    """A submission in flight: the server has read its headers, its body is held back.

    Opened before a stop signal and finished after it, it shows what a request
    that arrived before the signal gets once the queue has closed. The
    ``Expect: 100-continue`` header makes the server say when it has read the
    headers (the dev server and gunicorn do; uWSGI's http-socket does not), so
    the request is surely in its hands before the signal.
    """

    def __init__(self, server: Server, body: Mapping[str, Any] | None = None):
        if body is None:
            body = {"kind": "pretend", "count": 1, "params": {"seconds": 0}}
        self.data = json.dumps(body).encode()
        self.conn = server.connect()
        try:
            self.conn.putrequest("POST", "/api/tasks")
            self.conn.putheader("Content-Type", "application/json")
            self.conn.putheader("Content-Length", str(len(self.data)))
            self.conn.putheader("Expect", "100-continue")
            # The server closes the connection after answering (nothing is left
            # for it to hand to a thread when we close ours).
            self.conn.putheader("Connection", "close")
            self.conn.endheaders()
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = self.conn.sock.recv(4096)
                assert chunk, f"{server.name} closed the connection before 100 Continue: {head!r}"
                head += chunk
            assert head.startswith(b"HTTP/1.1 100"), head
        except BaseException:
            self.conn.close()
            raise

    def finish(self) -> Reply:
        """Send the body; return the reply (http.client skips a second 100 Continue)."""
        self.conn.send(self.data)
        response = self.conn.getresponse()
        return Reply(response.status, _parse(response.read()), response.will_close)

    def close(self) -> None:
        self.conn.close()


@dataclass
class Refusal:
    """What submissions sent after a stop signal got.

    ``reply`` is the first answer that was not a 202, or None when nothing
    answered any more. ``accepted`` were queued before the queue closed (the
    shutdown drops them with the rest); ``unknown`` were sent but got no
    answer, so they may or may not have been queued.
    """

    reply: Reply | None
    accepted: int = 0
    unknown: int = 0


def fill_thread_pool(server: Server, threads: int) -> None:
    """Make a gthread worker start all ``threads`` of its request pool now.

    Each held request keeps one pool thread busy, so ``threads`` of them at
    once need them all; finished with a body that is refused (400), they
    queue nothing. Afterwards the worker's main thread never starts a thread
    while handing a request to the pool, which is what it must not be doing
    when gthread's SIGQUIT handler shuts that pool down (see test_servers).
    """
    helds = []
    try:
        for _ in range(threads):
            helds.append(HeldSubmit(server, {"kind": "pretend", "count": 0}))
        for held in helds:
            assert held.finish().status == 400
    finally:
        for held in helds:
            held.close()


def finish_held(helds: Sequence[HeldSubmit]) -> Refusal:
    """Finish held submissions one at a time until one is not accepted."""
    result = Refusal(None)
    for held in helds:
        try:
            reply = held.finish()
        except (OSError, http.client.HTTPException):
            result.unknown += 1
            continue
        if reply.status != 202:
            result.reply = reply
            return result
        result.accepted += 1
    return result


def probe_new_connections(server: Server, timeout: float = TASK_TIMEOUT) -> Refusal:
    """Submit on new connections until one is not accepted or nothing answers."""
    result = Refusal(None)
    deadline = time.monotonic() + timeout
    body = {"kind": "pretend", "count": 1, "params": {"seconds": 0}}
    while time.monotonic() < deadline:
        conn = server.connect(timeout=5)
        try:
            conn.connect()
        except OSError:
            conn.close()
            return result  # nothing listens any more: nothing was sent
        try:
            reply = server.request("POST", "/api/tasks", body, conn)
        except (OSError, http.client.HTTPException):
            result.unknown += 1
            return result
        finally:
            conn.close()
        if reply.status != 202:
            result.reply = reply
            return result
        result.accepted += 1
    raise AssertionError(f"{server.name} kept accepting work {timeout:.0f}s after the signal")


def assert_each_ran_once(runs: Sequence[Run], pid: int, ids: Sequence[int]) -> None:
    """Exactly the tasks ``ids`` ran in ``pid``, each once."""
    in_pid = Counter(r.task_id for r in runs if r.pid == pid)
    twice = {task_id: n for task_id, n in in_pid.items() if n > 1}
    assert not twice, f"tasks ran more than once in pid {pid}: {twice}"
    assert sorted(in_pid) == sorted(ids), f"pid {pid} ran {sorted(in_pid)}, expected {sorted(ids)}"


def run_to_exit(args: list[str], env: dict[str, str], timeout: float = 30.0):
    """Run a server that should refuse to start; kill its group if it does not exit."""
    with subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"still running {timeout:.0f}s later; stderr:\n{err[-3000:]}")
    return proc.returncode, out, err


# -- the count file -----------------------------------------------------------------


class CountLog:
    """The ``count`` task's record: ``(task id, pid, "start" | "end")`` per line."""

    def __init__(self, path: Path):
        self.path = path

    def events(self) -> list[tuple[int, int, str]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        # Everything after the last newline may be a line still being written.
        events = []
        for line in text.split("\n")[:-1]:
            task_id, pid, event = line.split()
            events.append((int(task_id), int(pid), event))
        return events

    def count(self, event: str) -> Counter[int]:
        return Counter(t for t, _, e in self.events() if e == event)

    def pids(self, event: str) -> dict[int, list[int]]:
        """The pids that wrote ``event`` for each task, in file order."""
        seen: dict[int, list[int]] = defaultdict(list)
        for task_id, pid, e in self.events():
            if e == event:
                seen[task_id].append(pid)
        return seen

    def unfinished(self) -> set[int]:
        """Tasks with more starts than ends: running, or cut off."""
        starts, ends = self.count("start"), self.count("end")
        return {t for t, n in starts.items() if n > ends[t]}

    def wait_ended(self, ids: list[int], timeout: float = TASK_TIMEOUT * 2) -> Counter[int]:
        wanted = set(ids)

        def ended() -> Counter[int] | None:
            ends = self.count("end")
            return ends if wanted <= set(ends) else None

        try:
            return wait_for(ended, timeout, f"all {len(ids)} tasks ended", 0.05)
        except AssertionError as exc:
            missing = sorted(wanted - set(self.count("end")))
            raise AssertionError(f"{exc}; no end line for {missing[:20]}") from None
