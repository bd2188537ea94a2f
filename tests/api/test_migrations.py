"""Migrations build the schema from nothing, seed it, and match the models exactly."""

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from tests.conftest import create_database, drop_database, migrate
from vmapi.app import create_app
from vmapi.extensions import db
from vmapi.services.names import device_suffix


@pytest.fixture
def empty_pg(pg_server):
    url = create_database(pg_server)
    yield url
    drop_database(pg_server, url)


def test_upgrade_empty_postgres_seeds_and_has_no_drift(empty_pg):
    migrate(empty_pg)
    app = create_app({"DATABASE_URL": empty_pg})
    with app.app_context():
        states = db.session.execute(
            sa.text("SELECT id, name, schedulable FROM node_state ORDER BY id")
        ).all()
        assert [tuple(r) for r in states] == [
            (1, "running", True),
            (2, "maintenance", False),
            (3, "offline", False),
        ]
        vm_states = db.session.scalars(sa.text("SELECT name FROM vm_state ORDER BY id")).all()
        assert vm_states == ["building", "running", "paused", "shutoff", "crashed", "error"]
        methods = db.session.execute(
            sa.text("SELECT name, domain_type FROM virt_method ORDER BY id")
        ).all()
        assert [tuple(r) for r in methods] == [("KVM", "kvm"), ("QEMU", "qemu")]
        assert db.session.scalar(sa.text("SELECT count(*) FROM cache_option WHERE seeded")) == 6
        assert db.session.scalar(sa.text("SELECT count(*) FROM storage_type WHERE seeded")) == 2
        db.session.remove()
        db.engine.dispose()
    result = app.test_cli_runner().invoke(args=["db", "check"])
    assert result.exit_code == 0, result.output
    assert_no_drift(app)


def assert_no_drift(app):
    """The models and the migrated schema agree (what autogenerate would write is nothing)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with app.app_context(), db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, db.metadata)
        db.engine.dispose()
    assert diff == []


def test_downgrade_and_upgrade_again(empty_pg):
    migrate(empty_pg)
    app = create_app({"DATABASE_URL": empty_pg})
    runner = app.test_cli_runner()
    assert runner.invoke(args=["db", "downgrade", "base"]).exit_code == 0
    with app.app_context():
        assert "node" not in sa.inspect(db.engine).get_table_names()
        db.engine.dispose()
    assert runner.invoke(args=["db", "upgrade"]).exit_code == 0


def test_sqlite_has_no_drift(tmp_path):
    url = f"sqlite:///{tmp_path}/check.sqlite3"
    migrate(url)
    app = create_app({"DATABASE_URL": url})
    result = app.test_cli_runner().invoke(args=["db", "check"])
    assert result.exit_code == 0, result.output
    assert_no_drift(app)


# Rows as a database before revision 0010 has them (names were computed from the ids).
LEGACY_ROWS = [
    "INSERT INTO node (id, fqdn, ipv4_addr_ext, ipv6_addr_ext, ipv4_gw_ext, ipv6_gw_ext,"
    " node_state_id, cores, ram, free_cores, free_ram) VALUES (1, 'hv1.example.com',"
    " '198.51.100.10/24', '2001:db8::10/64', '198.51.100.1', '2001:db8::1', 1, 8, 1024, 8, 1024)",
    "INSERT INTO vm (id, cores, ram, uuid, node_id, virt_method_id, vm_state_id, created_at)"
    " VALUES (:vm, 1, 64, '4d7c3c2e-6a3b-4b8f-9f0e-1d2c3b4a5968', 1, 1, 2, :now)",
    "INSERT INTO vm (id, cores, ram, uuid, node_id, virt_method_id, vm_state_id, created_at)"
    " VALUES (:big_vm, 1, 64, '4d7c3c2e-6a3b-4b8f-9f0e-1d2c3b4a5969', 1, 1, 2, :now)",
    "INSERT INTO interface (id, vm_id, mac) VALUES (7, :vm, '52:54:00:0a:0b:0c')",
    # br-<vm>-<interface> would be 21 characters: no device ever had that name
    "INSERT INTO interface (id, vm_id, mac) VALUES (:big_iface, :big_vm, '52:54:00:0d:0e:0f')",
    "INSERT INTO storage (id, size, vm_id, storage_type_id, target, path)"
    " VALUES (5, 1048576, :vm, 2, 'vdb', '/var/lib/libvirt/images/vmapi/vmapi/vmapi-storage-5')",
]
LEGACY_VALUES = {"vm": 3, "big_vm": 1234567, "big_iface": 7654321}


def migrated_from_0008(url, configured=None):
    """A database at revision 0008 with rows in it, then upgraded to the head."""
    from flask_migrate import downgrade, upgrade

    config = {"DATABASE_URL": url, "TESTING": True, "INSTALLATION_ID": configured}
    app = create_app(config)
    with app.app_context():
        upgrade(revision="0008")
        with db.engine.begin() as conn:
            for statement in LEGACY_ROWS:
                conn.execute(sa.text(statement), {**LEGACY_VALUES, "now": datetime.now(UTC)})
        upgrade()
        with db.engine.connect() as conn:
            rows = {
                "installation": conn.scalars(
                    sa.text("SELECT installation_id FROM installation")
                ).all(),
                "vm": conn.execute(sa.text("SELECT id, domain_name FROM vm ORDER BY id")).all(),
                "storage": conn.execute(
                    sa.text("SELECT node_id, pool, volume_name, path FROM storage")
                ).all(),
                "interface": conn.execute(
                    sa.text("SELECT id, device_suffix FROM interface ORDER BY id")
                ).all(),
            }
        downgrade(revision="0008")
        inspector = sa.inspect(db.engine)
        columns = {t: {c["name"] for c in inspector.get_columns(t)}
                   for t in ("vm", "storage", "interface")}  # fmt: skip
        tables = inspector.get_table_names()
        with db.engine.connect() as conn:
            kept = conn.scalar(sa.text("SELECT count(*) FROM storage"))
        upgrade()  # and up again, over the same rows
        with db.engine.connect() as conn:
            again = conn.scalars(sa.text("SELECT domain_name FROM vm ORDER BY id")).all()
        db.engine.dispose()
    return rows, columns, tables, kept, again


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_0010_keeps_todays_names_for_what_exists(dialect, request, tmp_path):
    if dialect == "postgresql":
        url = request.getfixturevalue("empty_pg")
    else:
        url = f"sqlite:///{tmp_path}/legacy.sqlite3"
    rows, columns, tables, kept, again = migrated_from_0008(url)
    # a database that already ran VMs keeps the id its domains' metadata carries
    assert rows["installation"] == ["vmapi"]
    assert [tuple(r) for r in rows["vm"]] == [(3, "vm-3"), (1234567, "vm-1234567")]
    assert [tuple(r) for r in rows["storage"]] == [
        (1, "vmapi", "vmapi-storage-5", "/var/lib/libvirt/images/vmapi/vmapi/vmapi-storage-5")
    ]
    suffixes = dict(rows["interface"])
    assert suffixes[7] == "3-7"  # tap vm3-7, bridge br-3-7, as the host has them
    assert suffixes[7654321] == device_suffix("vmapi", "52:54:00:0d:0e:0f")  # never fitted
    assert len(f"br-{suffixes[7654321]}") <= 15
    # the downgrade drops what 0010 added and keeps the rows
    assert "installation" not in tables and kept == 1
    assert not columns["vm"] & {"domain_name"}
    assert not columns["storage"] & {"node_id", "pool", "volume_name"}
    assert "device_suffix" not in columns["interface"]
    assert again == ["vm-3", "vm-1234567"]


def test_0010_on_a_new_database_makes_an_id_or_keeps_the_configured_one(empty_pg, tmp_path):
    migrate(empty_pg)
    app = create_app({"DATABASE_URL": empty_pg})
    with app.app_context():
        made = db.session.scalars(sa.text("SELECT installation_id FROM installation")).all()
        db.session.remove()
        db.engine.dispose()
    assert len(made) == 1 and made[0].startswith("vmapi-") and len(made[0]) == 14
    url = f"sqlite:///{tmp_path}/configured.sqlite3"
    rows, *_ = migrated_from_0008(url, configured="staging")
    assert rows["installation"] == ["staging"]
