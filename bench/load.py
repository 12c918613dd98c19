"""HTTP load for the benchmarks: wrk when it is installed, else a small Python client.

Both keep ``connections`` keep-alive connections busy for ``seconds`` with one
request, and report requests per second, bytes per response as read off the
wire (status line, headers and body) and the responses that were not 2xx or
3xx. wrk is Debian's package (``make bench`` installs it as root); the Python
client is the fallback, slower per request but measuring the same thing.

:class:`Connection` is also the simulated dashboard of the polling-cost rows:
one keep-alive connection, one request at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Mapping

HERE = os.path.dirname(os.path.abspath(__file__))
WRK_SCRIPT = os.path.join(HERE, "wrk.lua")


@dataclass
class LoadResult:
    requests: int
    bytes: int
    seconds: float
    bad: int  # responses that were not 2xx/3xx, and socket errors

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def bytes_per_response(self) -> float:
        return self.bytes / self.requests if self.requests else 0.0


def wrk_path() -> str | None:
    return shutil.which("wrk")


def build_request(
    method: str, path: str, host: str, headers: Mapping[str, str] | None = None,
    body: bytes = b"", content_type: str | None = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method == "POST":
        lines.append(f"Content-Type: {content_type or 'application/x-www-form-urlencoded'}")
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Connection:
    """One keep-alive HTTP/1.1 connection; reconnects when the server closes it."""

    def __init__(self, host: str, port: int, timeout: float = 10.0):
        self.address = (host, port)
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buffer = b""

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.buffer = sock, b""
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def exchange(self, request: bytes) -> tuple[int, dict[str, str], bytes, int]:
        """Send ``request``; return (status, headers in lower case, body, bytes on the wire)."""
        for attempt in (1, 2):
            sock = self.sock or self._connect()
            try:
                sock.sendall(request)
                return self._read(sock)
            except (ConnectionError, EOFError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _read(self, sock: socket.socket) -> tuple[int, dict[str, str], bytes, int]:
        buffer = self.buffer
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            chunk = sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection")
            buffer += chunk
        head = buffer[:end].decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        start = end + 4
        while len(buffer) < start + length:
            chunk = sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection mid-body")
            buffer += chunk
        body = buffer[start:start + length]
        self.buffer = buffer[start + length:]
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body, start + length


def python_load(host: str, port: int, request: bytes, seconds: float,
                connections: int) -> LoadResult:
    """wrk's job in Python: ``connections`` threads, each one keep-alive connection."""
    deadline = time.monotonic() + seconds
    totals = [[0, 0, 0] for _ in range(connections)]

    def run(total: list[int]) -> None:
        conn = Connection(host, port)
        try:
            while time.monotonic() < deadline:
                try:
                    status, _, _, size = conn.exchange(request)
                except OSError:
                    total[2] += 1
                    continue
                total[0] += 1
                total[1] += size
                if not 200 <= status < 400:
                    total[2] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=run, args=(t,)) for t in totals]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    return LoadResult(
        sum(t[0] for t in totals), sum(t[1] for t in totals), elapsed, sum(t[2] for t in totals)
    )


def wrk_load(host: str, port: int, method: str, path: str, headers: Mapping[str, str],
             body: str, seconds: float, connections: int) -> LoadResult:
    """One wrk run (one thread, ``connections`` connections); its script prints the totals."""
    args = [wrk_path() or "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            "-s", WRK_SCRIPT]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    args.append(f"http://{host}:{port}{path}")
    env = dict(os.environ, BENCH_METHOD=method, BENCH_BODY=body)
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=seconds + 60)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH "):
            data = json.loads(line[len("BENCH "):])
            errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
            return LoadResult(data["requests"], data["bytes"], data["duration_us"] / 1e6, errors)
    raise RuntimeError(f"wrk printed no totals:\n{out.stdout}\n{out.stderr}")


class LoadGenerator:
    """Runs one load: wrk if found (unless ``prefer_python``), else :func:`python_load`."""

    def __init__(self, prefer_python: bool = False, connections: int = 8):
        self.wrk = None if prefer_python else wrk_path()
        self.prefer_python = prefer_python
        self.connections = connections

    @property
    def name(self) -> str:
        if self.wrk:
            out = subprocess.run([self.wrk, "-v"], capture_output=True, text=True)
            version = (out.stdout or out.stderr).split(" [")[0].strip()
            return f"{version or 'wrk'}, 1 thread, {self.connections} connections"
        reason = "asked for" if self.prefer_python else "wrk not found"
        return f"bench.load.python_load, {self.connections} connections ({reason})"

    def run(self, host: str, port: int, method: str, path: str,
            headers: Mapping[str, str] | None = None, body: str = "",
            seconds: float = 3.0) -> LoadResult:
        headers = dict(headers or {})
        if self.wrk:
            return wrk_load(host, port, method, path, headers, body, seconds, self.connections)
        request = build_request(method, path, f"{host}:{port}", headers, body.encode())
        return python_load(host, port, request, seconds, self.connections)
