"""Background work through a lost database (issue 27): ``ha watch`` gives up acting the
moment its lock's session is gone and takes the lock again on a new session; the
one-shot commands (node check timers, reconcile, drain) stop with one clear line and
exit status 3, and run again cleanly once the database answers.

The database is the real test PostgreSQL behind a relay the test cuts
(tests/dbproxy.py), or a session ended with ``pg_terminate_backend``; libvirt is its
test driver.
"""

import threading
import time

import pytest
import sqlalchemy as sa

from tests.conftest import vm_body
from vmapi.cli import DATABASE_GONE
from vmapi.config import database_url
from vmapi.extensions import db
from vmapi.services.ha.watch import LEADER_KEY, watch


@pytest.fixture
def app_config(relay):
    return {"DATABASE_URL": relay.url, "HA_INTERVAL": 0.05, "HA_MISSES": 1000}


class Watching:
    """A watcher in a thread of its own, and what it said."""

    def __init__(self, app) -> None:
        self.said: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(app,))
        self.thread.start()

    def _run(self, app) -> None:
        with app.app_context():
            watch(self.stop, self.said.append)
            db.session.remove()

    def until(self, predicate, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while not predicate(self.said):
            assert time.monotonic() < deadline, self.said
            time.sleep(0.02)

    def end(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def actives(watching):
    return sum(line.startswith("active:") for line in watching.said)


def said(line):
    return lambda lines: any(x.startswith(line) for x in lines)


def leader_pids(pg_database):
    engine = sa.create_engine(database_url(pg_database), poolclass=sa.pool.NullPool)
    hi, lo = (LEADER_KEY >> 32) & 0xFFFFFFFF, LEADER_KEY & 0xFFFFFFFF
    with engine.connect() as conn:
        pids = conn.execute(sa.text(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
            " AND classid::bigint = :hi AND objid::bigint = :lo AND database = (SELECT oid"
            " FROM pg_database WHERE datname = current_database())"), {"hi": hi, "lo": lo}
        ).scalars().all()  # fmt: skip
    engine.dispose()
    return pids


def terminate(pg_database, pids):
    engine = sa.create_engine(database_url(pg_database), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        for pid in pids:
            conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    engine.dispose()


def test_the_watcher_waits_out_a_lost_database_and_leads_again(app, vm_host, relay,
                                                               pg_database):  # fmt: skip
    vm_host()
    first = Watching(app)
    try:
        first.until(said("active:"))
        relay.cut()  # the primary is gone: the lock's session with it
        first.until(said("lost the leader lock"))
        first.until(said("standby: the database does not answer"))
        assert leader_pids(pg_database) == []
        relay.restore()
        first.until(lambda lines: [x for x in lines if x.startswith("active:")][1:] != [])
        assert len(leader_pids(pg_database)) == 1
    finally:
        first.end()


def test_a_watcher_whose_lock_session_ends_stops_acting_and_one_leads_again(
    app, vm_host, relay, pg_database, faults
):
    node = vm_host()
    first = Watching(app)
    second = None
    try:
        first.until(said("active:"))
        second = Watching(app)
        second.until(said("standby: another"))
        probed = []
        faults.before = lambda name, uri, args: probed.append(threading.get_ident())
        (pid,) = leader_pids(pg_database)
        terminate(pg_database, [pid])  # the first one's lock session, and only it, ends
        first.until(said("lost the leader lock"))
        # one of them takes the lock on a new session (whichever tries first), one only
        deadline = time.monotonic() + 20
        while actives(first) + actives(second) < 2:
            assert time.monotonic() < deadline, (first.said, second.said)
            time.sleep(0.02)
        time.sleep(0.3)
        assert actives(first) + actives(second) == 2, (first.said, second.said)
        assert len(leader_pids(pg_database)) == 1
        del probed[:]
        time.sleep(0.3)  # and rounds go on under it
        assert probed and node["libvirt_uri"]
    finally:
        first.end()
        if second is not None:
            second.end()


def cli(runner, *args):
    result = runner.invoke(args=["vmapi", *args])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("args", "call"),
    [(("node", "check"), "host_info"), (("reconcile", "--fix"), "domains")],
)
def test_a_command_that_loses_the_database_stops_clearly_and_reruns(
    api, runner, vm_host, test_method, relay, faults, args, call
):
    node = vm_host()
    assert api.post("vm", json=vm_body(test_method)).status_code == 201

    def before(name, uri, _args):
        if name == call and relay.up:
            relay.cut()

    faults.before = before
    code, output = cli(runner, *args)
    assert code == DATABASE_GONE, output
    assert "the database did not answer" in output and "run it again" in output
    assert "Traceback" not in output
    faults.before = None
    relay.restore()
    code, output = cli(runner, *args)
    assert code == 0, output
    assert api.get(f"node/{node['id']}").json["data"]["allocated_cores"] == 2


def test_a_drain_that_loses_the_database_runs_again(api, runner, vm_host, test_method, relay,
                                                    faults):  # fmt: skip
    a, _b = vm_host(), vm_host()
    vm = api.post("vm", json=vm_body(test_method, node={"id": a["id"]})).json["data"]

    def before(name, uri, _args):
        if name.startswith("migrate") and relay.up:
            relay.cut()

    faults.before = before
    code, output = cli(runner, "node", "drain", a["fqdn"])
    assert code == DATABASE_GONE, output
    faults.before = None
    relay.restore()
    # again: the test driver cannot migrate, so the VM stays, said as every drain says it
    code, output = cli(runner, "node", "drain", a["fqdn"])
    assert code == 1 and f"NOT moved  vm-{vm['id']}" in output, output
    code, output = cli(runner, "reconcile")
    assert "interrupted_move" not in output, output
    assert api.get(f"vm/{vm['id']}").json["data"]["node"]["id"] == a["id"]
