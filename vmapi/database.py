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
from urllib.parse import quote

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


def libpq_multihost_url(url: str) -> str:
    """libpq's multi-host URL in SQLAlchemy's own form; any other URL unchanged.

    ``postgresql://u:p@h1:5432,[::1]:5433/vmapi?target_session_attrs=read-write`` (what
    Patroni's and pg_auto_failover's documentation hand out) stops SQLAlchemy's URL
    parser, which reads ``5432,[::1]:5433`` as one port. The same servers as
    ``postgresql://u:p@/vmapi?host=h1,::1&port=5432,5433&target_session_attrs=read-write``
    parse, and psycopg2 passes them to libpq as they are: libpq tries the hosts in order
    and keeps the first that matches ``target_session_attrs``. A host without a port gets
    libpq's default (an empty entry in the list). Every other option of the query stays.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0] not in ("postgresql", "postgres"):
        return url
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hostlist = netloc.rpartition("@")
    if "," not in hostlist:
        return url
    if "host=" in tail or "port=" in tail:
        raise ValueError("hosts both in the URL's authority and in its query")
    hosts: list[str] = []
    ports: list[str] = []
    for entry in hostlist.split(","):
        if entry.startswith("["):  # an IPv6 address: [addr] or [addr]:port
            address, _, after = entry[1:].partition("]")
            port = after[1:] if after.startswith(":") else after
        else:
            address, _, port = entry.partition(":")
        if not address or (port and not port.isdigit()):
            raise ValueError(f"not a host[:port] of a libpq URL: {entry!r}")
        hosts.append(address)
        ports.append(port)
    path, _, query = tail.partition("?")
    options = [f"host={quote(','.join(hosts), safe=',:')}"]
    if any(ports):
        options.append(f"port={','.join(ports)}")
    if query:
        options.append(query)
    return f"{scheme}://{userinfo}{at}{path or '/'}?{'&'.join(options)}"
