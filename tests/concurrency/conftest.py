"""A real gunicorn with several workers over one PostgreSQL database, for racing clients.

All nodes point at libvirtd's test driver (``test+unix:///default``), so every worker
sees the same hypervisor. Domains carry a test installation id and are removed after.
One server per module (``served``: a database, gunicorn with its workers); each test gets
it back as new (``server``): its domains removed, the database emptied and seeded again,
a new admin token.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.conftest import (
    create_database,
    drop_database,
    make_token,
    migrate,
    unavailable,
)
from tests.domains import tagged_domains
from tests.pg_reset import full_reset
from vmapi.app import create_app
from vmapi.extensions import db

ROOT = Path(__file__).resolve().parents[2]
SHARED_URI = "test+unix:///default"
RACE_MARKER = "vmapi-r-"  # the installation ids of this tier's servers begin so


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running gunicorn and a small JSON client for it."""

    def __init__(
        self, url: str, db_url: str, token: str, installation: str, pid: int, env: dict
    ) -> None:
        self.url = url
        self.db_url = db_url
        self.token = token
        self.installation = installation
        self.pid = pid  # gunicorn's master
        self.env = env

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}/api/v1/{path}", data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")


@contextlib.contextmanager
def gunicorn(app: str, env: dict[str, str], workers: int) -> Iterator[tuple[str, int]]:
    """Serve ``app`` with deploy/gunicorn.conf.py on a free port until the block ends;
    yield (base URL, master pid). Also used by the benchmarks (bench/)."""
    port = free_port()
    # The log goes to a file: a pipe nobody reads fills up and blocks the workers.
    log_fd, log_name = tempfile.mkstemp(prefix="vmapi-gunicorn-", suffix=".log")
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py",
         "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
         "--access-logfile", "/dev/null", app],
        cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=log_fd,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(Path(log_name).read_text()[-3000:]) from None
                time.sleep(0.2)
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        os.close(log_fd)
        Path(log_name).unlink()


def remove_domains(marker: str) -> None:
    conn = libvirt.open(SHARED_URI)
    try:
        for dom in tagged_domains(conn, marker):
            if dom.isActive():
                dom.destroy()
            dom.undefine()
    finally:
        conn.close()


def our_domains(installation: str) -> list[str]:
    conn = libvirt.open(SHARED_URI)
    try:
        return [dom.name() for dom in tagged_domains(conn, installation)]
    finally:
        conn.close()


@pytest.fixture(scope="module")
def served(pg_server) -> Iterator[Server]:
    """The module's gunicorn (5 workers) over a database of its own."""
    try:
        libvirt.open(SHARED_URI).close()
    except libvirt.libvirtError as exc:
        unavailable(f"libvirtd's test driver does not answer on {SHARED_URI}: {exc}")
    remove_domains(RACE_MARKER)
    installation = f"{RACE_MARKER}{uuid.uuid4().hex[:8]}"  # at most 16 characters
    db_url = create_database(pg_server)
    migrate(db_url)
    env = {**os.environ, "VMAPI_DATABASE_URL": db_url, "VMAPI_INSTALLATION_ID": installation,
           "VMAPI_LIBVIRT_TIMEOUT": "20"}  # fmt: skip
    flask = [sys.executable, "-m", "flask", "--app", "wsgi", "vmapi"]
    subprocess.run([*flask, "seed"], cwd=ROOT, env=env, check=True, capture_output=True)
    try:
        with gunicorn("wsgi:app", env, workers=5) as (url, master):
            yield Server(url, db_url, "", installation, master, env)
    finally:
        remove_domains(installation)
        drop_database(pg_server, db_url)


@pytest.fixture
def server(served: Server) -> Server:
    """The module's server as new: no domain of its installation, the database as the
    seed leaves it (ids from 1 again), and an admin token."""
    remove_domains(served.installation)
    app = create_app({"DATABASE_URL": served.db_url, "TESTING": True,
                      "INSTALLATION_ID": served.installation})  # fmt: skip
    full_reset(app)  # the served database: a few tests a module, gunicorn's workers on it
    token = make_token(app, "admin")
    with app.app_context():
        db.engine.dispose()
    return Server(served.url, served.db_url, token, served.installation, served.pid, served.env)
