"""An IPv6 pool's counter row is locked only for the moment its next address is made
(in a transaction of its own), not for the rest of a create; an address made for a
create that then fails stays free and goes to the next create. PostgreSQL only: SQLite
has one writer at a time and does it all in the create's transaction."""

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from tests.api.test_network import held
from tests.conftest import vm_body
from tests.errors import assert_error
from tests.faults import FaultyDriver
from vmapi.extensions import db
from vmapi.services.nodes.hosts import DRIVER_KEY


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
    assert_error(api.post("vm", json=vm_body(test_method)), 502, "vm/hypervisor_error")
    free = [a for a in api.get("ipv6").json["data"].values() if a["interface"] is None]
    assert len(free) == 1  # made, not lost, and free again
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    iface = api.get(f"interface/{vm['interfaces'][0]['id']}").json["data"]
    assert iface["ipv6"] == [{"id": free[0]["id"]}]
    assert len(api.get("ipv6").json["data"]) == 1  # the pool did not count up again


@pytest.mark.embedded
def test_a_pool_skips_an_address_that_exists_already(app, api, vm_host, test_method, backend):
    """The API refuses an address inside a pool, but rows from before the pool (or from
    the database directly) may be there: the pool counts past them."""
    vm_host()
    big = next(iter(api.get("ipv6_pool").json["data"]))
    api.delete(f"ipv6_pool/{big}")
    api.post("ipv6", json={"network": "2001:db8:7::/125", "gateway": "2001:db8:7::1"})
    with app.app_context():
        db.session.execute(sa.text(
            "INSERT INTO ipv6_address (address, prefix, gateway)"
            " VALUES ('2001:db8:7::2', 125, '2001:db8:7::1')"
        ))  # fmt: skip
        db.session.commit()
    first = api.post("vm", json=vm_body(test_method, cores=1))  # takes ::2, being free
    second = api.post("vm", json=vm_body(test_method, cores=1))  # ::1 gateway, ::2 taken
    assert first.status_code == second.status_code == 201
    assert sorted(held(api, "ipv6")) == ["2001:db8:7::2", "2001:db8:7::3"]
