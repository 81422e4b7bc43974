"""A throw-away PostgreSQL server for tests (Optuna storage, MLflow backend store).

The server runs from Debian's ``postgresql`` binaries (``/usr/lib/postgresql/<v>/bin``): ``initdb``
into a temporary folder, ``pg_ctl start`` on 127.0.0.1 and a free port, ``pg_ctl -m fast stop``
at the end. Root cannot run PostgreSQL, so as root the server runs as the ``postgres`` user.
Tests skip cleanly where the binaries (or that user) are missing.

Use the fixtures by importing them into a test module (``from tests.postgres import
postgres_url``) or listing the module in the root conftest's ``pytest_plugins``.
"""

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

START_ATTEMPTS = 3


def postgres_bin(name: str) -> Path | None:
    """``name`` from the newest installed PostgreSQL (Debian keeps them off the PATH)."""
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                        key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0)
    if candidates:
        return candidates[-1]
    found = shutil.which(name)
    return Path(found) if found else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_user() -> str | None:
    """The user the server runs as: ourselves, or ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and no 'postgres' user to run PostgreSQL as")
    return "postgres"


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server; yield its base URL (``postgresql+psycopg2://postgres@127.0.0.1:<port>``)."""
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="unetops-pg-"))
    if user is not None:
        shutil.chown(root, user=user)
    data = root / "data"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(arg) for arg in args], user=user, cwd=root, check=False,
                              capture_output=True, text=True)

    started = False
    try:
        init = run(initdb, "-D", data, "--username=postgres", "--auth=trust", "--no-sync",
                   "--encoding=UTF8", "--locale=C")
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr.strip()}")
        for _ in range(START_ATTEMPTS):
            port = free_port()
            options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
                       "-c max_connections=50")
            start = run(pg_ctl, "-D", data, "-l", root / "server.log", "-w", "-t", "60",
                        "-o", options, "start")
            if start.returncode == 0:
                started = True
                break
        if not started:
            log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {start.stderr.strip()} {log[-2000:]}")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}"
    finally:
        if started:
            run(pg_ctl, "-D", data, "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def create_database(server_url: str) -> str:
    """A fresh, empty database on the server; returns its SQLAlchemy URL."""
    import psycopg2

    name = f"test_{uuid.uuid4().hex[:12]}"
    host_port = server_url.rsplit("@", 1)[1]
    host, port = host_port.split(":")
    conn = psycopg2.connect(host=host, port=int(port), user="postgres", dbname="postgres")
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return f"{server_url}/{name}"


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """One server per test session (starting one takes a few seconds)."""
    with postgres_server() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_server_url) -> str:
    """A fresh database per test: ``postgresql+psycopg2://postgres@127.0.0.1:<port>/<db>``."""
    return create_database(postgres_server_url)
