"""Pooled connections are checked only after sitting idle (vmapi/database.py).

The server ends a pooled connection (as a restart or an idle timeout would). Once the
connection has been idle longer than DB_PING_AFTER, the next request finds it dead
before using it and gets a new one: no error. A connection that broke a moment after
its last use is not checked (that would cost a round trip per request): the request
that meets it answers 503 and the pool drops it, so the next one succeeds.
"""

import pytest
import sqlalchemy as sa

from vmapi.api.errors import RETRY_AFTER_DATABASE
from vmapi.database import CHECKED_IN
from vmapi.extensions import db


def end_pooled_connections(app) -> None:
    """Terminate the server side of every idle connection in the app's pool."""
    with app.app_context():
        pids = []
        pool = db.engine.pool
        for record in list(pool._pool.queue):  # the idle connections, as the pool holds them
            pids.append(record.dbapi_connection.get_backend_pid())
    admin = sa.create_engine(app.config["DATABASE_URL"], poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        for pid in pids:
            conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    admin.dispose()
    assert pids


def age_pooled_connections(app, seconds: float) -> None:
    with app.app_context():
        for record in list(db.engine.pool._pool.queue):
            record.info[CHECKED_IN] -= seconds


def test_an_idle_connection_that_died_is_replaced_unseen(app, api):
    assert api.get("vm_state").status_code == 200
    end_pooled_connections(app)
    age_pooled_connections(app, app.config["DB_PING_AFTER"] + 1)
    assert api.get("vm_state").status_code == 200


def test_a_connection_used_a_moment_ago_is_not_pinged(app, api):
    assert api.get("vm_state").status_code == 200
    end_pooled_connections(app)
    response = api.get("vm_state")
    assert response.status_code == 503, response.json
    assert api.get("vm_state").status_code == 200


@pytest.mark.parametrize("app_config", [{"DB_PING_AFTER": 0}])
def test_ping_after_zero_checks_every_checkout(app, api):
    assert api.get("vm_state").status_code == 200
    end_pooled_connections(app)
    assert api.get("vm_state").status_code == 200


def test_a_broken_connection_answers_503_with_retry_after(app, api):
    """The primary went away under a pooled connection (a failover): 503, retry later."""
    assert api.get("vm_state").status_code == 200
    end_pooled_connections(app)
    response = api.get("vm_state")
    assert response.status_code == 503, response.json
    assert response.json["error_id"] == "general/unavailable"
    assert int(response.headers["Retry-After"]) == RETRY_AFTER_DATABASE > 0


def test_a_connection_closed_on_our_side_is_a_503_too(app, api):
    """psycopg2 answers a connection it already knows to be closed with InterfaceError
    ("connection already closed"), not OperationalError: still the database gone, not a bug."""
    assert api.get("vm_state").status_code == 200
    with app.app_context():
        records = list(db.engine.pool._pool.queue)
        for record in records:
            record.dbapi_connection.close()  # the fault: what a dead socket leaves behind
    assert records
    response = api.get("vm_state")
    assert response.status_code == 503, response.json
    assert response.json["error_id"] == "general/unavailable"
    assert response.headers["Retry-After"] == str(RETRY_AFTER_DATABASE)
    assert api.get("vm_state").status_code == 200
