"""Connection-pool policy: check a pooled connection only when it has been idle.

SQLAlchemy's ``pool_pre_ping`` costs a round trip on every checkout, i.e. on every
request — a quarter of a ``GET /vm/<id>``. A connection handed back a moment ago is
alive as far as anyone can know without using it, so vmapi pings only connections
that sat in the pool longer than ``DB_PING_AFTER`` seconds (a server restart, an idle
timeout in a proxy or firewall); a dead one is replaced before the request sees it.
A connection that breaks while in use still fails that request (503) and is dropped.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.engine import Engine

CHECKED_IN = "vmapi_checked_in"


def ping_idle_connections(engine: Engine, idle_seconds: float) -> None:
    @event.listens_for(engine, "checkin")
    def checked_in(dbapi_connection: Any, record: Any) -> None:
        record.info[CHECKED_IN] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def checked_out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.get(CHECKED_IN)
        if since is None or time.monotonic() - since < idle_seconds:
            return  # new, or back in the pool only a moment ago
        try:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
            dbapi_connection.rollback()
        except Exception as error:  # any failure: the pool retries with a new connection
            raise exc.DisconnectionError(f"idle connection is gone: {error}") from error
