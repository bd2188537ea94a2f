"""Idempotent creates: the first request with a key runs, repeats get its answer.

The key is claimed with one ``INSERT ... ON CONFLICT DO NOTHING`` committed before the
create runs, so of two racing requests exactly one runs; the other waits for the
stored answer. Keys are per token and expire after IDEMPOTENCY_TTL seconds.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from vmapi.extensions import db
from vmapi.models import IdempotencyKey


def fingerprint(method: str, path: str, body: Any) -> str:
    """The request a key stands for: method, path and body (key order does not matter)."""
    canonical = json.dumps([method, path, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def claim(token_id: int, key: str, print_: str, ttl: int) -> IdempotencyKey | None:
    """None when this request owns the key; otherwise the record of the one that does."""
    now = datetime.now(UTC)
    db.session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.token_id == token_id,
            IdempotencyKey.key == key,
            IdempotencyKey.created_at < now - timedelta(seconds=ttl),
        )
    )
    dialect = postgresql if db.engine.dialect.name == "postgresql" else sqlite
    stmt = (
        dialect.insert(IdempotencyKey)
        .values(token_id=token_id, key=key, fingerprint=print_, created_at=now)
        .on_conflict_do_nothing(index_elements=["token_id", "key"])
        .returning(IdempotencyKey.id)
    )
    mine = db.session.execute(stmt).scalar()
    db.session.commit()
    if mine is not None:
        return None
    return _find(token_id, key)


def _find(token_id: int, key: str) -> IdempotencyKey | None:
    stmt = select(IdempotencyKey).where(
        IdempotencyKey.token_id == token_id, IdempotencyKey.key == key
    )
    return db.session.scalars(stmt.execution_options(populate_existing=True)).first()


def wait_for_answer(token_id: int, key: str, timeout: float) -> IdempotencyKey | None:
    """The record once the first request stored its answer (None if it did not in time,
    or gave the key up after a server error)."""
    deadline = time.monotonic() + timeout
    while True:
        db.session.rollback()  # see other transactions' commits
        record = _find(token_id, key)
        if record is None or record.status_code is not None:
            return record
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def store_answer(token_id: int, key: str, status: int, mimetype: str, body: bytes) -> None:
    db.session.rollback()
    db.session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.token_id == token_id, IdempotencyKey.key == key)
        .values(status_code=status, mimetype=mimetype, body=body)
    )
    db.session.commit()


def release(token_id: int, key: str) -> None:
    """Give the key up (the first request failed on our side; a retry may run again)."""
    db.session.rollback()
    db.session.execute(
        delete(IdempotencyKey).where(IdempotencyKey.token_id == token_id, IdempotencyKey.key == key)
    )
    db.session.commit()
