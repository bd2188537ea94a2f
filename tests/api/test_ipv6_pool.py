"""An IPv6 pool's counter row is locked only for the moment its next address is made
(in a transaction of its own), not for the rest of a create; an address made for a
create that then fails stays free and goes to the next create. PostgreSQL only: SQLite
has one writer at a time and does it all in the create's transaction."""

import sqlalchemy as sa
from sqlalchemy import event

from tests.conftest import vm_body
from tests.faults import FaultyDriver
from vmapi.extensions import db
from vmapi.services.hosts import DRIVER_KEY


def test_the_pool_row_is_free_while_the_create_goes_on(app, api, vm_host, test_method):
    vm_host()
    probe = sa.create_engine(app.config["DATABASE_URL"], poolclass=sa.pool.NullPool)
    seen = []

    def before_audit(conn, cursor, statement, parameters, context, executemany):
        # the create's last statement before its commit: the pool row must not be locked
        if statement.startswith("INSERT INTO event") and not seen:
            with probe.connect() as other:
                other.execute(sa.text("SET lock_timeout = '100ms'"))
                try:
                    other.execute(sa.text("SELECT id FROM ipv6_pool FOR UPDATE NOWAIT"))
                    seen.append("free")
                except sa.exc.OperationalError:
                    seen.append("locked")
                other.rollback()

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", before_audit)
    try:
        assert api.post("vm", json=vm_body(test_method)).status_code == 201
    finally:
        event.remove(engine, "before_cursor_execute", before_audit)
        probe.dispose()
    assert seen == ["free"]


def test_an_address_made_for_a_failed_create_is_reused(app, api, vm_host, test_method):
    vm_host()
    faults = FaultyDriver(app.extensions[DRIVER_KEY])
    app.extensions[DRIVER_KEY] = faults
    faults.fail("define")
    assert api.post("vm", json=vm_body(test_method)).status_code >= 500
    free = [a for a in api.get("ipv6").json["data"].values() if a["interface"] is None]
    assert len(free) == 1  # made, not lost, and free again
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    iface = api.get(f"interface/{vm['interfaces'][0]['id']}").json["data"]
    assert iface["ipv6"] == [{"id": free[0]["id"]}]
    assert len(api.get("ipv6").json["data"]) == 1  # the pool did not count up again
