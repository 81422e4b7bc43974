"""Real services for scale-out and fault tests: an ``mlflow server``, PostgreSQL roles and restarts.

Everything listens on 127.0.0.1 only. The MLflow server runs with job execution off (two
processes) and stops on SIGTERM to its parent; PostgreSQL comes from :mod:`tests.postgres`.
"""

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.postgres import free_port, postgres_bin

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


@dataclass
class MlflowServer:
    url: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        """SIGTERM to the server's parent (its worker follows); wait until the port is shut."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while answers(self.url) and time.monotonic() < deadline:
            time.sleep(0.2)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, folder: Path,
                  env: dict[str, str] | None = None) -> Iterator[MlflowServer]:
    """``mlflow server`` on 127.0.0.1 and a free port, artifacts proxied into ``folder/artifacts``
    (``env``: extra environment, e.g. ``PGPASSWORD``); stopped at the end, whatever happens."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = folder / "server.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", backend_store_uri,
             "--artifacts-destination", str(folder / "artifacts")],
            stdout=output, stderr=subprocess.STDOUT,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})})
    server = MlflowServer(url, process, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers(url):
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited: {log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.3)
        yield server
    finally:
        server.stop()


# --- PostgreSQL ---------------------------------------------------------------------------------

def _superuser_connection(server_url: str):
    import psycopg2

    host, port = server_url.rsplit("@", 1)[1].split(":")
    conn = psycopg2.connect(host=host, port=int(port), user="postgres", dbname="postgres")
    conn.autocommit = True
    return conn


def _server_user() -> str | None:
    return "postgres" if os.geteuid() == 0 else None


def _pg_ctl(*args: str) -> subprocess.CompletedProcess:
    pg_ctl = postgres_bin("pg_ctl")
    return subprocess.run([str(pg_ctl), *args], user=_server_user(), capture_output=True,
                          text=True, check=True, timeout=120)


def role_with_password(server_url: str, role: str, password: str) -> str:
    """A login role that must give ``password`` over TCP (scram-sha-256; the test server trusts
    everyone else) and a database it owns; returns the database's URL *without* the password."""
    conn = _superuser_connection(server_url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD %s", (password,))
            cur.execute(f'CREATE DATABASE "{role}" OWNER "{role}"')
            cur.execute("SHOW hba_file")
            hba = Path(cur.fetchone()[0])
            rule = f"host all {role} 127.0.0.1/32 scram-sha-256\n"
            hba.write_text(rule + hba.read_text())
            cur.execute("SELECT pg_reload_conf()")
    finally:
        conn.close()
    return f"{server_url.replace('postgres@', f'{role}@', 1)}/{role}"


@contextlib.contextmanager
def postgres_down(server_url: str) -> Iterator[None]:
    """The server stopped (fast shutdown: sessions are cut) inside the block, started again on
    the same port and options at its end."""
    conn = _superuser_connection(server_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW data_directory")
            data = Path(cur.fetchone()[0])
    finally:
        conn.close()
    # postmaster.opts holds the command line the server was started with (port, socket folder).
    command = shlex.split((data / "postmaster.opts").read_text())
    options = [arg for i, arg in enumerate(command[1:], 1)
               if arg != "-D" and command[i - 1] != "-D"]
    _pg_ctl("-D", str(data), "-m", "fast", "-w", "stop")
    try:
        yield
    finally:
        _pg_ctl("-D", str(data), "-l", str(data.parent / "restart.log"), "-w", "-t", "60",
                "-o", shlex.join(options), "start")


def restart_postgres(server_url: str, down_seconds: float) -> None:
    with postgres_down(server_url):
        time.sleep(down_seconds)
