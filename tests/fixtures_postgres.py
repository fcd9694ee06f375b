"""A real PostgreSQL server for the tests, started from Debian's binaries (initdb + pg_ctl) in a
temporary folder on a free loopback port, trust auth, for the whole session.

`postgres_server` is the server; `postgres_url` a database on it for the session; suites that
must not see each other's rows take `postgres_module_url` (a fresh database per test module) or
call `postgres_server.create_database()` themselves. Skipped, with the reason, where PostgreSQL
is not installed (`make test` installs it)."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.stack import free_port

USER = "postgres"


def find_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin that has initdb and pg_ctl."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    found = [d for d in found if (d / "pg_ctl").exists()]
    if not found:
        return None
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    folder: Path

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{USER}@{self.host}:{self.port}/{database}"

    def create_database(self, prefix: str = "test", timezone: str | None = None) -> str:
        """Creates an empty database with a fresh name (sessions on it in `timezone`, if given);
        returns its SQLAlchemy URL."""
        name = f"{prefix}_{secrets.token_hex(4)}"
        with psycopg.connect(
            host=self.host, port=self.port, user=USER, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            if timezone:
                conn.execute(
                    sql.SQL("ALTER DATABASE {} SET timezone TO {}").format(
                        sql.Identifier(name), sql.Literal(timezone)
                    )
                )
        return self.url(name)


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the package's `postgres` user then."""
    return ["runuser", "-u", USER, "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; `make test` installs it)"
        )
    folder = Path(tempfile.mkdtemp(prefix="predictions-pg-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam(USER)
        os.chown(folder, user.pw_uid, user.pw_gid)
    data, log = folder / "data", folder / "server.log"
    port = free_port()
    subprocess.run(
        _as_postgres(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync"]
        ),
        check=True,
        capture_output=True,
    )
    # No fsync: a test server's data need not survive a power cut, and it is much faster.
    options = (
        f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off -c synchronous_commit=off -c max_connections=200"
    )
    started = subprocess.run(
        _as_postgres(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(log),
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
            ]
        ),
        capture_output=True,
        text=True,
    )
    if started.returncode != 0:
        shown = log.read_text() if log.exists() else ""
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"pg_ctl start failed: {started.stdout}{started.stderr}\n{shown}")
    try:
        yield PostgresServer(host="127.0.0.1", port=port, folder=folder)
    finally:
        subprocess.run(
            _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """`postgresql+psycopg://postgres@127.0.0.1:PORT/DB`: one database for the session."""
    return postgres_server.create_database("session")


@pytest.fixture(scope="module")
def postgres_module_url(postgres_server: PostgresServer) -> str:
    """A fresh database for one test module, so suites do not see each other's rows."""
    return postgres_server.create_database("module")
