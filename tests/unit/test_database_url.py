"""libpq's multi-host URL (what Patroni hands out) in SQLAlchemy's own form."""

import pytest
import sqlalchemy as sa

from vmapi.config import database_url
from vmapi.database import libpq_multihost_url


@pytest.mark.parametrize(
    ("libpq", "sqlalchemy"),
    [
        (
            "postgresql://h1:5432,h2:5433/vmapi?target_session_attrs=read-write",
            "postgresql:///vmapi?host=h1,h2&port=5432,5433&target_session_attrs=read-write",
        ),
        (  # default ports: no port list at all
            "postgresql://db1.example.com,db2.example.com/vmapi",
            "postgresql:///vmapi?host=db1.example.com,db2.example.com",
        ),
        (  # one port given, one default: an empty entry, as libpq reads it
            "postgresql://user:s%40cret@[::1]:5432,[fd00::2]/vmapi?connect_timeout=3",
            "postgresql://user:s%40cret@/vmapi?host=::1,fd00::2&port=5432,&connect_timeout=3",
        ),
        (  # no database, a user only
            "postgres://vmapi@10.0.0.1:5432,10.0.0.2:5432",
            "postgres://vmapi@/?host=10.0.0.1,10.0.0.2&port=5432,5432",
        ),
    ],
)
def test_multihost_becomes_query_lists(libpq, sqlalchemy):
    assert libpq_multihost_url(libpq) == sqlalchemy


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://user@127.0.0.1:5432/vmapi",
        "postgresql://user@[::1]:5432/vmapi",
        "postgresql+psycopg2:///vmapi?host=h1:5432&host=h2:5433",
        "sqlite:////var/lib/vmapi/vmapi.sqlite3",
    ],
)
def test_other_urls_unchanged(url):
    assert libpq_multihost_url(url) == url


@pytest.mark.parametrize(
    "url", ["postgresql://h1:x,h2/db", "postgresql://h1,h2/db?host=h3", "postgresql://h1,/db"]
)
def test_malformed_multihost_refused(url):
    with pytest.raises(ValueError):
        libpq_multihost_url(url)


def test_configured_url_reaches_libpq_as_lists():
    """What config makes of it is what psycopg2 hands libpq: host and port lists."""
    url = database_url("postgresql://u:pw@[::1]:5432,h2:5433/vmapi?target_session_attrs=read-write")
    engine = sa.create_engine(url)
    assert engine.dialect.driver == "psycopg2"
    _args, params = engine.dialect.create_connect_args(engine.url)
    assert params == {
        "dbname": "vmapi", "user": "u", "password": "pw", "host": "::1,h2",
        "port": "5432,5433", "target_session_attrs": "read-write",
    }  # fmt: skip
