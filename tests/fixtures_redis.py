"""A real Redis for the tests: Debian's /usr/bin/redis-server on a free loopback port, in a temporary
directory, without persistence. `redis_server` is one per session; tests that stop Redis (an
outage) start their own with `RedisServer(...).start()` and restart it on the same port."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.stack import ServiceProcess, free_port

REDIS_SERVER = "/usr/bin/redis-server"


def redis_server_binary() -> str:
    found = REDIS_SERVER if Path(REDIS_SERVER).exists() else shutil.which("redis-server")
    if found is None:
        pytest.fail("redis-server is missing: install Debian's redis-server (`make redis`)")
    return found


class RedisServer:
    """One redis-server process on `port` (a free one by default); `stop` and `start` again keep
    the port, as a restarted Redis keeps its address."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="redis-"))
        self.process: ServiceProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = ServiceProcess(
            "redis",
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.workdir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ],
        ).start()
        self.process.wait_until_port_open(self.port, timeout=30)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, decode_responses=True)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(grace=10)
            self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()
