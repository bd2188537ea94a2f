"""Idempotent creates: the first request with a key runs, repeats get its answer.

The key's row is claimed with one ``INSERT ... ON CONFLICT DO NOTHING`` committed before
the create runs, so of two racing requests exactly one runs. The row names the request
running it (``owner``, a random token), the objects it committed before they were whole
(``building``, :func:`note_building`: a VM ``building``, a storage row before its volume)
and, written in the very transaction that commits each object the create makes, the ids
of those objects (``made``, :func:`commit_made`): a request that dies after its commit
but before its answer was stored still left the answer's content behind, and of one that
died before it the retry that takes the key over removes what the row names building,
so nothing is made twice. Every write of the running request to the row is fenced by
its ``owner``: once a retry took the key over (:func:`take_over`, only while nothing is
made yet), the old request's commit matches no row and is rolled back and undone.
Whether the request running a key is alive is PostgreSQL's lock
(:mod:`.idempotency_lock`); the fence keeps it correct even when that signal is wrong.
Keys are per token and expire after IDEMPOTENCY_TTL seconds.

A COMMIT whose connection broke may have landed or not, and may still be landing: the
server can read it after the client saw the connection break. So the row is asked about
on a new connection with ``FOR UPDATE``, which waits until the old transaction ended
(:func:`_landed`). :func:`commit_made` goes on as committed if its commit landed;
:func:`commit_building` answers 503 keeping the key's row, which names the building
objects for the retry to remove (given up, it would name nothing and the retry would
make them twice). If the database cannot be asked, the work on the nodes is kept for
reconcile (:class:`~vmapi.errors.OutcomeUnknown`) rather than undone under a row that
may be committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import g, has_request_context
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm.exc import StaleDataError

from vmapi.errors import DatabaseLost, OutcomeUnknown
from vmapi.extensions import db
from vmapi.models import IdempotencyKey

log = logging.getLogger(__name__)

#: seconds a request waits, after its COMMIT failed, for the server to end that
#: transaction before it says the outcome is unknown
LANDED_WAIT = 10.0


@dataclass
class Running:
    """The key this request runs (kept in ``g`` while the create runs)."""

    token_id: int
    key: str
    owner: str
    made: list[int] = field(default_factory=list)
    building: list[int] = field(default_factory=list)
    #: whether the key's row must outlive a failure (:func:`keep`), not be given up
    kept: bool = False


def fingerprint(method: str, path: str, body: Any) -> str:
    """The request a key stands for: method, path and body (key order does not matter)."""
    canonical = json.dumps([method, path, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _where(token_id: int, key: str) -> Any:
    return (IdempotencyKey.token_id == token_id) & (IdempotencyKey.key == key)


def claim(token_id: int, key: str, print_: str, ttl: int, owner: str) -> IdempotencyKey | None:
    """None when this request now runs the key (``owner``); otherwise the key's row."""
    now = datetime.now(UTC)
    db.session.execute(
        delete(IdempotencyKey).where(
            _where(token_id, key), IdempotencyKey.created_at < now - timedelta(seconds=ttl)
        )
    )
    dialect = postgresql if db.engine.dialect.name == "postgresql" else sqlite
    stmt = (
        dialect.insert(IdempotencyKey)
        .values(token_id=token_id, key=key, fingerprint=print_, created_at=now, owner=owner)
        .on_conflict_do_nothing(index_elements=["token_id", "key"])
        .returning(IdempotencyKey.id)
    )
    mine = db.session.execute(stmt).scalar()
    db.session.commit()
    if mine is not None:
        return None
    return find(token_id, key)


def find(token_id: int, key: str) -> IdempotencyKey | None:
    stmt = select(IdempotencyKey).where(_where(token_id, key))
    return db.session.scalars(stmt.execution_options(populate_existing=True)).first()


def made_ids(record: IdempotencyKey) -> list[int] | None:
    return None if record.made is None else list(json.loads(record.made))


def take_over(record: IdempotencyKey, owner: str, building: list[int] | None = None) -> bool:
    """Run the key of a request that is gone and answered nothing, if its row is still
    as ``record`` says (the caller saw that nothing it names exists); whether this
    request runs it now. The row goes on naming ``building`` (what the gone request
    left, :func:`abandoned_ids`) until the new request is answered: should their
    removal fail, the next retry that takes the key over finds them still named."""
    was, made = IdempotencyKey.owner, IdempotencyKey.made
    stmt = (
        update(IdempotencyKey)
        .where(
            IdempotencyKey.id == record.id,
            was.is_(None) if record.owner is None else was == record.owner,
            made.is_(None) if record.made is None else made == record.made,
            IdempotencyKey.status_code.is_(None),
        )
        .values(owner=owner, made=None, building=json.dumps(building) if building else None)
    )
    taken = db.session.execute(stmt.execution_options(synchronize_session=False)).rowcount
    db.session.commit()
    if taken:
        log.warning("idempotency key %r of token %s taken over: its request is gone",
                    record.key, record.token_id)  # fmt: skip
    return taken == 1


def wait_for_answer(token_id: int, key: str, timeout: float) -> IdempotencyKey | None:
    """The key's row once its request stored its answer or made what it makes (or
    the row is gone, or ``timeout`` passed: then as it is). For SQLite, which has no
    lock to wait on."""
    deadline = time.monotonic() + timeout
    while True:
        db.session.rollback()  # see other transactions' commits
        record = find(token_id, key)
        if record is None or record.status_code is not None or record.made is not None:
            return record
        if time.monotonic() >= deadline:
            return record
        time.sleep(0.05)


def current() -> Running | None:
    """The key the request runs, if it runs one."""
    return g.get("idempotency") if has_request_context() else None


def _fenced(running: Running) -> Any:
    return (
        update(IdempotencyKey)
        .where(
            _where(running.token_id, running.key),
            IdempotencyKey.owner == running.owner,
            IdempotencyKey.status_code.is_(None),
        )
        .execution_options(synchronize_session=False)
    )


def commit_building(ids: list[int]) -> None:
    """Commit the session's transaction, which commits the objects ``ids`` before they
    are whole, named building on the key's row (:func:`note_building`). A COMMIT that
    failed but landed is a 503 that keeps the key's row (:class:`OutcomeUnknown`: not
    undone, not given up), so the retry that takes the key over removes them; one that
    did not land raises as it failed (an IntegrityError stays one)."""
    running = current()
    if running is None:
        db.session.commit()
        return
    note_building(ids)
    try:
        db.session.commit()
    except DBAPIError:
        if not _landed(running, IdempotencyKey.building, running.building):
            raise
        log.warning("a COMMIT failed but had landed (idempotency key %r): kept for its retry",
                    running.key)  # fmt: skip
        raise OutcomeUnknown(
            "The database connection broke as this request committed; what it began is "
            "removed by a retry with the same Idempotency-Key, which makes it once."
        ) from None


def note_building(ids: list[int]) -> None:
    """Under an Idempotency-Key: name the objects ``ids``, about to be committed before
    they are whole (a VM as ``building``, a storage row before its volume and disk),
    on the key's row in the same transaction: a retry that takes the key over from a
    dead request removes those it did not name ``made`` (:func:`abandoned_ids`, the
    resource's ``remove_abandoned``); the caller commits."""
    running = current()
    if running is None:
        return
    building = running.building + ids
    if db.session.execute(_fenced(running).values(building=json.dumps(building))).rowcount != 1:
        raise DatabaseLost(
            "Another request took this Idempotency-Key over while this one ran (its "
            "database session was lost); retry to get its answer."
        )
    running.building = building


def building_ids(record: IdempotencyKey) -> list[int]:
    return [] if record.building is None else list(json.loads(record.building))


def abandoned_ids(record: IdempotencyKey) -> list[int]:
    """What the key's request committed unfinished and never named made: abandoned
    once its owner is gone and the key was taken over (:func:`take_over`, which holds
    only while the row is as ``record`` says, no answer stored)."""
    made = set(made_ids(record) or [])
    return [ident for ident in building_ids(record) if ident not in made]


def commit_made(ids: list[int]) -> None:
    """Commit the session's transaction, which makes the objects ``ids``. Under an
    Idempotency-Key the key's row names them in the same transaction (so the key and
    the objects are committed together or not at all); a key taken over meanwhile is a
    503 here, before anything is committed (the caller's undo runs)."""
    running = current()
    if running is None:
        db.session.commit()
        return
    try:
        db.session.flush()
    except StaleDataError as exc:  # a retry that took the key over removed our row
        db.session.rollback()
        raise DatabaseLost("Another request took this Idempotency-Key over while this one "
                           "ran; retry to get its answer.") from exc  # fmt: skip
    made = running.made + ids
    bound = db.session.execute(_fenced(running).values(made=json.dumps(made))).rowcount
    if bound != 1:
        db.session.rollback()
        raise DatabaseLost(
            "Another request took this Idempotency-Key over while this one ran (its "
            "database session was lost); retry to get its answer."
        )
    try:
        db.session.commit()
    except DBAPIError:
        if not _landed(running, IdempotencyKey.made, made):
            raise
        log.warning("a COMMIT failed but had landed (idempotency key %r)", running.key)
    running.made = made


def _landed(running: Running, column: Any, ids: list[int]) -> bool:
    """After a COMMIT that failed: whether it landed (the key's row owned by ``running``
    with ``column`` naming ``ids``), asked on a new connection. The old transaction
    wrote the row, so ``FOR UPDATE`` waits (LANDED_WAIT at most) until the server has
    ended it: a COMMIT still on its way in is read as it ends, not as not landed."""
    try:
        db.session.rollback()
        if db.engine.dialect.name == "postgresql":
            timeout = f"{int(LANDED_WAIT * 1000)}ms"
            db.session.execute(select(func.set_config("lock_timeout", timeout, True)))
        row = db.session.execute(
            select(IdempotencyKey.owner, column.label("ids"))
            .where(_where(running.token_id, running.key))
            .with_for_update()
        ).first()
        db.session.rollback()  # (the row's lock)
    except DBAPIError as exc:
        _rollback_quietly()
        raise OutcomeUnknown(
            "The database went away during a commit and cannot say whether it landed; "
            "retry with the same Idempotency-Key to get what was made."
        ) from exc
    return row is not None and row.owner == running.owner and row.ids == json.dumps(ids)


def store_answer(running: Running, status: int, mimetype: str, body: bytes) -> None:
    db.session.rollback()
    db.session.execute(_fenced(running).values(status_code=status, mimetype=mimetype, body=body))
    db.session.commit()


def keep() -> None:
    """The request's failure must not give its key up (:func:`release`): an undo step
    lost the database, so what the row names building may still be there for the retry
    that takes the key over to remove."""
    running = current()
    if running is not None:
        running.kept = True


def release(running: Running) -> None:
    """Give the key up (the request failed on our side; a retry may run again), unless
    it made something or must be kept (:func:`keep`). A database that fails here too
    leaves the row: its owner gone, the next retry takes it over (PostgreSQL), so this
    never raises."""
    if running.kept:
        return
    try:
        db.session.rollback()
        db.session.execute(
            delete(IdempotencyKey).where(
                _where(running.token_id, running.key),
                IdempotencyKey.owner == running.owner,
                IdempotencyKey.made.is_(None),
            )
        )
        db.session.commit()
    except DBAPIError:
        _rollback_quietly()
        log.warning("could not release idempotency key %r; a retry takes it over", running.key)


def _rollback_quietly() -> None:
    try:
        db.session.rollback()
    except Exception:
        log.debug("rollback failed", exc_info=True)
