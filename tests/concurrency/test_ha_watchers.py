"""Two real ``flask vmapi ha watch`` processes over one PostgreSQL database: one is
active (it holds the watcher's advisory lock), the other a standby; the active one is
killed (SIGKILL: no clean-up of its own, its lock goes with its database connection) and
the standby takes over, then finds a node that died afterwards and fences it, once.

No guest is needed: the node is libvirtd's test driver (``test+unix:///default``), and it
dies by its URI naming a socket nobody listens on (what a stopped libvirtd leaves).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
import sqlalchemy as sa

from tests.concurrency.conftest import ROOT, SHARED_URI
from tests.conftest import (
    Api,
    create_database,
    drop_database,
    make_token,
    migrate,
    node_body,
    unavailable,
)
from tests.fence_agent import calls, install
from vmapi.app import create_app
from vmapi.extensions import db

pytestmark = [pytest.mark.concurrency, pytest.mark.needs_postgres]

STANDBY = "standby: another `ha watch` is active; taking over when it stops"
INTERVAL = 0.5


class Watcher:
    """One ``flask vmapi ha watch`` process, its output in a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "flask", "--app", "wsgi", "vmapi", "ha", "watch"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def said(self, start: str) -> bool:
        return any(line.startswith(start) for line in self.lines())

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> int:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(sig)
        return self.process.wait(30)


def wait(condition, what: str, timeout: float = 60.0) -> float:
    """Wait for ``condition``; the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"waited {timeout:g} s for {what}"
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.fixture
def fleet(pg_server, tmp_path) -> Iterator[tuple[dict[str, str], Api, sa.Engine, Path]]:
    """A database, the environment of a watcher over it (test fence agents installed), an
    API client and an engine on it, and the agents' folder."""
    try:
        libvirt.open(SHARED_URI).close()
    except libvirt.libvirtError as exc:
        unavailable(f"libvirtd's test driver does not answer on {SHARED_URI}: {exc}")
    agents = install(tmp_path / "agents")
    url = create_database(pg_server)
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))
    try:
        migrate(url)
        settings = {"DATABASE_URL": url, "INSTALLATION_ID": f"vmapi-w-{uuid.uuid4().hex[:8]}",
                    "HA_INTERVAL": INTERVAL, "HA_MISSES": 2, "HA_FENCE_TIMEOUT": 30.0,
                    "HA_FENCE_AGENT_DIRS": str(agents), "LIBVIRT_TIMEOUT": 5.0}  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               **{f"VMAPI_{key}": str(value) for key, value in settings.items()}}  # fmt: skip
        app = create_app({**settings, "TESTING": True})
        with app.app_context():
            db.engine.dispose()
        yield env, Api(app.test_client(), make_token(app, "admin")), engine, agents
        with app.app_context():
            db.session.remove()
            db.engine.dispose()
    finally:
        engine.dispose()
        drop_database(pg_server, url)


def test_the_standby_takes_over_when_the_active_watcher_is_killed(fleet, tmp_path):
    env, api, engine, agents = fleet
    body = node_body(libvirt_uri=SHARED_URI, fence_agent="fence_test", fence_address="n1",
                     fence_user="admin")  # fmt: skip
    made = api.post("node", json=body)
    assert made.status_code == 201, made.json
    node_id = made.json["data"]["id"]

    def ha_state() -> str:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT ha_state FROM node WHERE id = :id"),
                                {"id": node_id}).scalar_one()  # fmt: skip

    def lock_holders() -> int:
        with engine.connect() as conn:
            return conn.execute(sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
                "database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )).scalar_one()  # fmt: skip

    first = Watcher(env, tmp_path / "first.log")
    second = None
    try:
        wait(lambda: first.said("active:"), "the first watcher to be active")
        second = Watcher(env, tmp_path / "second.log")
        wait(lambda: second.said(STANDBY), "the second watcher to wait")
        time.sleep(4 * INTERVAL)  # rounds of the first: the node answers
        assert ha_state() == "ok" and lock_holders() == 1
        assert not second.said("active:") and second.process.poll() is None

        assert first.kill() == -signal.SIGKILL
        seconds = wait(lambda: second.said("active:"), "the standby to take over", 30)
        print(f"\nthe standby was active {seconds:.2f} s after the active one was killed")
        assert seconds < 4 * INTERVAL + 5  # its next try of the lock, and a database's notice
        assert lock_holders() == 1

        # the node dies now: the new active watcher finds it, fences it once
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE node SET libvirt_uri = :uri WHERE id = :id"),
                         {"uri": f"qemu+unix:///system?socket={tmp_path}/no-such-sock",
                          "id": node_id})  # fmt: skip
        wait(lambda: ha_state() == "fenced", "the node fenced", 60)
        fqdn = body["fqdn"]
        assert any(line.startswith(f"{fqdn}: fenced") for line in second.lines()), second.lines()
        assert not any(fqdn in line for line in first.lines())  # the dead one did nothing
        time.sleep(4 * INTERVAL)
        assert [(c["agent"], c["options"]["action"]) for c in calls(agents)] == [
            ("fence_test", "off"), ("fence_test", "status")]  # fmt: skip
        assert second.kill(signal.SIGTERM) == 0  # a clean stop after its round
        assert lock_holders() == 0
    finally:
        for watcher in (first, second):
            if watcher is not None and watcher.process.poll() is None:
                watcher.kill()
