"""Transfer slots: at most one upload per image, and a cap per customer on the image
transfers (uploads and Python-streamed downloads) in flight.

On PostgreSQL each slot is a session advisory lock held on a connection of its own
(taken from the pool, no transaction left open), so the count holds across workers and
API hosts, and a worker that dies frees its slots with its connection. The customer's
``VMAPI_TRANSFERS_PER_CUSTOMER`` slots are that many keys; a transfer takes the first
free one. SQLite (the embedded single-process default, ``make run``) counts in the
process instead.

Admins have no customer and are not capped (their transfers are the operator's); the
per-image upload lock holds for them too. A download answered with X-Accel-Redirect is
not counted here: Python's part ends with the header, and nginx's ``limit_conn``
(deploy/nginx/vmapi-site.conf) bounds what nginx then sends, per token.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter

from flask import current_app
from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from vmapi.auth import Principal
from vmapi.error_ids import IMAGE_BUSY
from vmapi.errors import Conflict, TooManyRequests
from vmapi.extensions import db

#: seconds a refused transfer is told to wait (a transfer of a few GiB takes minutes)
RETRY_AFTER = 10

_GUARD = threading.Lock()
_UPLOADING: set[int] = set()  # SQLite: image ids with an upload in this process
_IN_FLIGHT: Counter[int] = Counter()  # SQLite: customer id -> transfers in this process


def _key(text: str) -> int:
    """A signed 64-bit advisory lock key (one-key locks never meet the VM locks' two-key
    ones; the texts keep these apart from the image copy locks)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big", signed=True)


def upload_key(image_id: int) -> int:
    return _key(f"vmapi image upload {image_id}")


def customer_key(customer_id: int, slot: int) -> int:
    return _key(f"vmapi transfer {customer_id} {slot}")


def busy(image_id: int) -> Conflict:
    return Conflict(
        f"Image {image_id} is being uploaded by another request; at most one upload of an "
        "image at a time.",
        error_id=IMAGE_BUSY,
        data={"image": {"id": image_id}},
    )


def too_many(customer_id: int, cap: int) -> TooManyRequests:
    return TooManyRequests(
        f"Customer {customer_id} has {cap} image transfers in flight, the most "
        f"VMAPI_TRANSFERS_PER_CUSTOMER allows; retry after {RETRY_AFTER} s.",
        retry_after=RETRY_AFTER,
        data={"customer_id": customer_id, "limit": cap},
    )


class Slot:
    """A transfer's hold on its slots until :meth:`release` (idempotent)."""

    def __init__(self, upload_of: int | None, customer_id: int | None) -> None:
        self.upload_of = upload_of
        self.customer_id = customer_id
        self.conn: Connection | None = None
        self.local = False
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if self.conn is not None:
            conn, self.conn = self.conn, None
            try:
                conn.rollback()
                conn.execute(select(func.pg_advisory_unlock_all()))
                conn.commit()
            finally:
                conn.close()
        if self.local:
            with _GUARD:
                _UPLOADING.discard(self.upload_of)  # type: ignore[arg-type]
                if self.customer_id is not None:
                    _IN_FLIGHT[self.customer_id] -= 1
                    if _IN_FLIGHT[self.customer_id] <= 0:
                        del _IN_FLIGHT[self.customer_id]

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def take(principal: Principal, image_id: int, upload: bool) -> Slot:
    """Hold a transfer slot of the principal's customer (none for admins) and, for an
    upload, the image's upload lock; 409 ``image/busy`` or 429
    ``general/too_many_requests`` (Retry-After) when they are taken."""
    cap = int(current_app.config["TRANSFERS_PER_CUSTOMER"])
    counted = None if principal.is_admin or cap <= 0 else principal.customer_id
    slot = Slot(image_id if upload else None, counted)
    if slot.upload_of is None and counted is None:
        return slot
    if db.engine.dialect.name != "postgresql":
        _take_local(slot, cap)
        return slot
    slot.conn = db.engine.connect()
    try:
        if (
            upload
            and not slot.conn.execute(
                select(func.pg_try_advisory_lock(upload_key(image_id)))
            ).scalar()
        ):
            raise busy(image_id)
        if counted is not None and not any(
            slot.conn.execute(select(func.pg_try_advisory_lock(customer_key(counted, n)))).scalar()
            for n in range(cap)
        ):
            raise too_many(counted, cap)
        slot.conn.commit()  # session locks: no transaction stays open while they are held
    except BaseException:
        slot.release()
        raise
    return slot


def _take_local(slot: Slot, cap: int) -> None:
    with _GUARD:
        if slot.upload_of is not None and slot.upload_of in _UPLOADING:
            raise busy(slot.upload_of)
        if slot.customer_id is not None and _IN_FLIGHT[slot.customer_id] >= cap:
            raise too_many(slot.customer_id, cap)
        if slot.upload_of is not None:
            _UPLOADING.add(slot.upload_of)
        if slot.customer_id is not None:
            _IN_FLIGHT[slot.customer_id] += 1
        slot.local = True
