"""The private redis-server the Redis tests run on (tests/redis_server.py): it
answers, listens where it says, starts each test empty, and is gone after."""

from __future__ import annotations

import os
import socket

import pytest

import redis_server as helper
from redis_server import RedisServer
from support import wait_for

pytestmark = pytest.mark.redis


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def refused(family: socket.AddressFamily, address) -> bool:
    """Nothing listens at ``address`` (a socket file removed is refused too)."""
    with socket.socket(family) as sock:
        sock.settimeout(1)
        try:
            sock.connect(address)
        except OSError:
            return True
    return False


def test_the_session_server_answers_on_its_unix_socket(redis_server, redis_url):
    assert redis_url == redis_server.url == f"unix://{redis_server.socket}"
    assert oct(redis_server.socket.stat().st_mode & 0o777) == "0o700"
    with redis_server.client() as redis:
        assert redis.ping()
        assert redis.config_get("save") == {"save": ""}
        redis.set("left-behind", "1")  # the next test must not see it


def test_each_test_starts_from_an_empty_redis(redis_server, redis_url):
    with redis_server.client() as redis:
        assert redis.dbsize() == 0


def test_a_tcp_server_listens_on_loopback_and_is_gone_after_it(redis_server):
    with RedisServer(tcp=True) as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        with server.client() as redis:
            assert redis.ping()
            assert redis.config_get("bind") == {"bind": "127.0.0.1"}
        pid, path, port, where = server.pid, server.socket, server.port, server.dir
        assert pid != redis_server.pid and not gone(pid)
    wait_for(lambda: gone(pid), what=f"redis-server {pid} to exit")
    assert not where.exists()
    assert refused(socket.AF_UNIX, str(path))
    assert refused(socket.AF_INET, ("127.0.0.1", port))
    with redis_server.client() as redis:
        assert redis.ping()  # the session's server is not touched


def test_a_server_that_exits_at_start_says_why(redis_server, monkeypatch):
    with RedisServer(tcp=True) as first:
        monkeypatch.setattr(helper, "free_port", lambda: first.port)  # already taken
        second = RedisServer(tcp=True)
        with pytest.raises(RuntimeError, match="exited with status") as failed:
            second.__enter__()
        assert "Address already in use" in str(failed.value)
        assert second.process is None and not second.dir.exists()
        with first.client() as redis:
            assert redis.ping()
