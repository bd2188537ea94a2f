"""A libpq multi-host URL works end to end: libpq tries the hosts in order.

The first host is a loopback port nobody listens on, the second the test PostgreSQL.
"""

import socket

import pytest
import sqlalchemy as sa

from tests.conftest import create_database, drop_database, migrate
from vmapi.app import create_app
from vmapi.config import database_url
from vmapi.extensions import db


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def multihost(url: str) -> str:
    """``url``'s server after a closed one, written as libpq's multi-host URL."""
    parsed = sa.engine.make_url(url)
    user = parsed.username or ""
    if parsed.password:
        user += f":{parsed.password}"
    at = "@" if user else ""
    hosts = f"127.0.0.1:{closed_port()},{parsed.host}:{parsed.port or 5432}"
    return f"postgresql://{user}{at}{hosts}/{parsed.database}?target_session_attrs=read-write"


@pytest.fixture
def empty_pg(pg_server):
    url = create_database(pg_server)
    yield url
    drop_database(pg_server, url)


def test_engine_skips_the_closed_host(pg_server):
    engine = sa.create_engine(database_url(multihost(pg_server)), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT NOT pg_is_in_recovery()")) is True


def test_flask_db_upgrade_and_the_app_on_a_multihost_url(empty_pg):
    url = multihost(empty_pg)
    migrate(url)  # flask db upgrade: SQLAlchemy's parser stopped it here
    app = create_app({"DATABASE_URL": url, "TESTING": True})
    with app.app_context():
        assert db.session.scalar(sa.text("SELECT count(*) FROM node_state")) == 3
        db.engine.dispose()
