"""Whether a live request runs an idempotency key: PostgreSQL's own answer.

The request that runs a key holds a session-level advisory lock named after the key
(token and key) on a connection of its own, from before it claims the key until its
answer is stored. Such a lock lives exactly as long as its session: it goes when the
request ends, when its process dies, when its connection is cut, and when its server
goes (after a failover the new primary holds no locks at all). So a retry that can take
the lock knows at once that no live request runs the key, and takes the key over; one
that cannot waits on the lock itself (PostgreSQL wakes it the moment the holder ends,
whether it finished or died), at most ``IDEMPOTENCY_WAIT`` seconds. No request waits on
a key whose owner is gone.

The lock is the liveness signal only, never the safety: a request whose lock session
broke while the request itself still runs (its connection cut, its process alive) may
be taken over; it then loses at its commit, because the key's row is fenced by its
``owner`` column (:mod:`vmapi.services.idempotency`).
"""

from __future__ import annotations

import hashlib
import logging

from sqlalchemy import func, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from vmapi.extensions import db

log = logging.getLogger(__name__)

#: the first half of the two-int advisory lock ids: the keys' own space ("idem")
NAMESPACE = int.from_bytes(b"idem", "big", signed=True)
#: SQLSTATE lock_not_available: lock_timeout ended the wait
LOCK_NOT_AVAILABLE = "55P03"


def lock_ids(token_id: int, key: str) -> tuple[int, int]:
    """The (namespace, hash) pair of a key's lock. Two keys that share a hash only make
    a retry wait on the other's live request; the row decides what happens then."""
    digest = hashlib.sha256(f"{token_id}\x00{key}".encode()).digest()
    return NAMESPACE, int.from_bytes(digest[:4], "big", signed=True)


class KeyLock:
    """The lock of one key, on a pooled connection held for the request."""

    def __init__(self, token_id: int, key: str) -> None:
        self.ids = lock_ids(token_id, key)
        self.conn: Connection | None = None
        self.held = False

    def _connection(self) -> Connection:
        if self.conn is None:
            self.conn = db.engine.connect()
        return self.conn

    def try_take(self) -> bool:
        """Take the lock if it is free: then no live request runs the key."""
        conn = self._connection()
        self.held = bool(conn.execute(select(func.pg_try_advisory_lock(*self.ids))).scalar())
        conn.commit()  # a session lock: no transaction stays open while it is held
        return self.held

    def wait(self, seconds: float) -> bool:
        """Wait until the lock is ours (True) or ``seconds`` passed (False)."""
        conn = self._connection()
        timeout = f"{max(1, int(seconds * 1000))}ms"
        try:
            conn.execute(select(func.set_config("lock_timeout", timeout, True)))  # this tx
            conn.execute(select(func.pg_advisory_lock(*self.ids)))
            conn.commit()
        except OperationalError as exc:
            if getattr(exc.orig, "pgcode", None) != LOCK_NOT_AVAILABLE:
                raise
            conn.rollback()
            return False
        self.held = True
        return True

    def release(self) -> None:
        """Give the lock up and hand the connection back; a connection that cannot say
        it gave the lock up is closed instead (its lock goes with its session), never
        pooled. Never raises: the request's own answer goes on."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            if self.held:
                conn.rollback()
                freed = conn.execute(select(func.pg_advisory_unlock(*self.ids))).scalar()
                conn.commit()
                if not freed:
                    conn.invalidate()
        except Exception:
            log.warning("could not free an idempotency key's lock; its connection is closed")
            try:
                conn.invalidate()
            except Exception:
                log.debug("invalidating the lock's connection failed", exc_info=True)
        finally:
            self.held = False
            try:
                conn.close()
            except Exception:
                log.debug("closing the lock's connection failed", exc_info=True)
