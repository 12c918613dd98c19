"""A private ``redis-server`` for the tests that need a real Redis (RQ runs on one).

:class:`RedisServer` starts Debian's ``redis-server`` in a directory of its own
(under the system's temporary directory: a unix socket's path must be short),
listening on a unix socket there and, when asked, on a free loopback TCP port.
Nothing is saved: no RDB, no AOF. It is ready once it answers PING, polled with
a deadline that only bounds a failure; on exit it is stopped (SIGTERM, then
SIGKILL) and its directory removed::

    with RedisServer() as server:
        with server.client() as redis:
            redis.set("k", "v")
        make_app(QUEUE_URL=server.url)

The server's own log (its stdout and stderr) goes to a file in its directory,
and is quoted when it exits before it answers.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from servers import HOST, free_port

#: The binary Debian's redis-server package installs.
REDIS_SERVER = "redis-server"
INSTALL_HINT = ("make test installs Debian's redis-server when run as root; "
                "or apt-get install redis-server")

#: Deadlines that only bound a failure; a passing run takes a small part of them.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def unavailable() -> str | None:
    """Why a private Redis cannot run here (a sentence saying how to get it), or None."""
    if shutil.which(REDIS_SERVER) is None:
        return f"the Redis tests need {REDIS_SERVER}, which is not on PATH. To get it: {INSTALL_HINT}"
    for module in ("redis", "rq"):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return (f"the Redis tests need the {module} package ({exc}). To get it: "
                    ".venv/bin/pip install -r requirements-dev.txt")
    return None


class RedisServer:
    """A ``redis-server`` of this test session's own; a context manager.

    ``tcp=True`` listens on a free port on 127.0.0.1 too, and :attr:`url` names
    it; otherwise :attr:`url` names the unix socket. :attr:`socket` is the
    socket's path, either way.
    """

    def __init__(self, tcp: bool = False, start_timeout: float = START_TIMEOUT):
        self.tcp = tcp
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.dir: Path | None = None
        self.socket: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        #: The server's pid, kept after it stopped (a test may check it is gone).
        self.pid: int | None = None

    @property
    def url(self) -> str:
        if self.port is not None:
            return f"redis://{HOST}:{self.port}/0"
        return f"unix://{self.socket}"

    def client(self, **options: Any) -> Any:
        """A new ``redis.Redis`` on this server (close it, or use it in a ``with``)."""
        import redis

        return redis.Redis.from_url(self.url, **options)

    @property
    def log(self) -> str:
        """What the server wrote so far (its stdout and stderr)."""
        assert self.dir is not None
        try:
            return (self.dir / "redis.log").read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> RedisServer:
        self.dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.socket = self.dir / "redis.sock"
        if self.tcp:
            self.port = free_port()
        listen = ["--port", str(self.port), "--bind", HOST] if self.tcp else ["--port", "0"]
        command = [REDIS_SERVER, *listen, "--unixsocket", str(self.socket),
                   "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                   "--dir", str(self.dir)]
        try:
            with open(self.dir / "redis.log", "wb") as log:
                self.process = subprocess.Popen(command, cwd=self.dir, stdin=subprocess.DEVNULL,
                                                stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)
            self.pid = self.process.pid
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        """Poll PING on the socket until it answers; raise, quoting the log, when the
        server exits first or does not answer within ``start_timeout``."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        # One try per poll: the client's own retries back off for seconds.
        with redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1,
                         socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)) as probe:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{REDIS_SERVER} exited with status "
                                       f"{self.process.returncode} before it answered:\n"
                                       f"{self._tail()}")
                try:
                    if probe.ping():
                        return
                except redis.exceptions.ConnectionError:
                    pass  # not listening yet (or still loading)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{REDIS_SERVER} did not answer PING within "
                                       f"{self.start_timeout:g}s:\n{self._tail()}")
                time.sleep(0.01)

    def _tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.splitlines()[-lines:]) or "(it wrote nothing)"

    def __exit__(self, *exc_info: object) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
