"""No hypervisor call while the request holds a row lock (issue 7's claim path).

Every libvirt call of a create, resize, state change, disk create and delete is made
after the request's transaction has ended: a slow host must never keep other requests
waiting on a node's capacity row or on address rows. A spy in front of the driver asks
PostgreSQL, from its own connection, at the moment of each call, whether any backend of
the test database holds a transaction id (which a transaction gets with its first write
or row lock, and keeps until it ends).
"""

import sqlalchemy as sa

from tests.conftest import GIB, vm_body
from vmapi.services.nodes.hosts import DRIVER_KEY

HOLDING = sa.text(
    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()"
    " AND l.locktype = 'transactionid'"
)


class LockSpy:
    def __init__(self, real, url: str) -> None:
        self.real = real
        self.engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        self.seen: list[tuple[str, int]] = []

    def __getattr__(self, name):
        target = getattr(self.real, name)
        if not callable(target):
            return target

        def call(uri, *args, **kwargs):
            with self.engine.connect() as conn:
                self.seen.append((name, conn.execute(HOLDING).scalar()))
            return target(uri, *args, **kwargs)

        return call


def test_no_libvirt_call_while_a_row_lock_is_held(app, api, vm_host, test_method):
    vm_host(cores=16, ram=64 * GIB)
    spy = LockSpy(app.extensions[DRIVER_KEY], app.config["DATABASE_URL"])
    app.extensions[DRIVER_KEY] = spy
    vm = api.post("vm", json=vm_body(test_method, customer_id=4))
    assert vm.status_code == 201, vm.json
    ident = vm.json["data"]["id"]
    assert api.update(f"vm/{ident}", json={"cores": 3}).status_code == 200
    assert api.update(f"vm/{ident}", json={"vm_state": {"id": 4}}).status_code == 200  # shutoff
    disk = {"size": GIB, "vm": {"id": ident}, "storage_type": {"id": 1}}
    assert api.post("storage", json=disk).status_code == 201
    assert api.delete(f"vm/{ident}?cascade=storage").status_code == 200
    calls = {name for name, _ in spy.seen}
    assert {"define", "start", "destroy", "undefine", "create_volume"} <= calls, calls
    assert [(name, held) for name, held in spy.seen if held] == []
    spy.engine.dispose()


def test_the_spy_sees_an_open_write(app, api):
    """The detector itself: a transaction that wrote and has not ended is counted."""
    spy = LockSpy(None, app.config["DATABASE_URL"])
    writer = sa.create_engine(app.config["DATABASE_URL"], poolclass=sa.pool.NullPool)
    with writer.connect() as conn:
        conn.execute(sa.text("UPDATE node_state SET schedulable = schedulable"))
        with spy.engine.connect() as probe:
            assert probe.execute(HOLDING).scalar() >= 1
        conn.rollback()
    with spy.engine.connect() as probe:
        assert probe.execute(HOLDING).scalar() == 0
    writer.dispose()
    spy.engine.dispose()
