"""Migrations build the schema from nothing, seed it, and match the models exactly."""

import pytest
import sqlalchemy as sa

from tests.conftest import create_database, drop_database, migrate
from vmapi import create_app
from vmapi.extensions import db


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
