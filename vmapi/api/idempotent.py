"""``POST`` with an ``Idempotency-Key`` header (API.md): the first request runs, a repeat
is answered with the first answer (``Idempotent-Replayed: true``).

On PostgreSQL the request running a key holds the key's lock
(:mod:`vmapi.services.idempotency_lock`) for as long as it runs. A repeat that finds the
lock free knows that no live request runs the key: it answers what the key's row holds
(the stored answer, or the objects the request committed), or takes the key over and
runs the create itself — at once, never after a wait. A repeat that finds the lock held
waits on it (``IDEMPOTENCY_WAIT`` at most). SQLite has no such lock: a repeat waits for
the answer as before.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import TYPE_CHECKING, Any

from flask import Response, current_app, g, request

from vmapi.api.errors import for_the_caller
from vmapi.auth import Principal
from vmapi.error_ids import GENERAL_IDEMPOTENCY_CONFLICT
from vmapi.errors import ApiError, Conflict, NotFound, OutcomeUnknown, ValidationError
from vmapi.extensions import db
from vmapi.models import IdempotencyKey
from vmapi.representations import error_response, parse_body
from vmapi.services import idempotency
from vmapi.services.crud import Outcome
from vmapi.services.idempotency_lock import KeyLock

if TYPE_CHECKING:
    from vmapi.api.resource import ResourceApi


IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def not_finished() -> Conflict:
    return Conflict(
        "The first request with this Idempotency-Key has not finished; retry later.",
        error_id=GENERAL_IDEMPOTENCY_CONFLICT,
    )


def idempotent_create(resource: ResourceApi, who: Principal) -> Response:
    """POST with an Idempotency-Key: run once, answer repeats with the first answer."""
    key = request.headers["Idempotency-Key"]
    if not IDEMPOTENCY_KEY.match(key):
        raise ValidationError(
            data={"Idempotency-Key": ["Use 1 to 255 printable ASCII characters, no spaces."]}
        )
    body = parse_body()
    stamp = idempotency.fingerprint(request.method, request.path, body)
    running = idempotency.Running(who.token_id, key, uuid.uuid4().hex)
    lock = KeyLock(who.token_id, key) if db.engine.dialect.name == "postgresql" else None
    try:
        replay = settle(resource, who, running, stamp, lock, body)
        if replay is not None:
            replay.headers["Idempotent-Replayed"] = "true"
            return replay
        g.idempotency = running
        return run(resource, who, running)
    finally:
        g.pop("idempotency", None)
        if lock is not None:
            lock.release()


def settle(resource: ResourceApi, who: Principal, running: idempotency.Running, stamp: str,
           lock: KeyLock | None, body: Any) -> Response | None:  # fmt: skip
    """The answer to replay, or None when this request now runs the key."""
    config = current_app.config
    deadline = time.monotonic() + float(config["IDEMPOTENCY_WAIT"])
    token_id, key = running.token_id, running.key
    if lock is not None and not lock.try_take():
        # a live request runs the key: its answer if it is there, else wait on its lock
        record = idempotency.find(token_id, key)
        done = record and replay_of(resource, who, record, stamp, body)
        if done is not None:
            return done
        db.session.commit()  # nothing stays open while we wait
        if not lock.wait(deadline - time.monotonic()):
            raise not_finished()
    while True:
        record = idempotency.claim(token_id, key, stamp, config["IDEMPOTENCY_TTL"], running.owner)
        if record is None:
            return None
        done = replay_of(resource, who, record, stamp, body)
        if done is not None:
            return done
        if lock is not None or record.made is not None:
            # the lock is ours: the request that ran the key is gone (or, SQLite, what
            # it made is undone: it failed)
            left = idempotency.abandoned_ids(record)
            if idempotency.take_over(record, running.owner, left):
                running.building = left  # (still named, with what this request builds)
                resource.service.remove_abandoned(left)
                return None
            continue  # the row changed meanwhile: look again
        record = idempotency.wait_for_answer(token_id, key, deadline - time.monotonic())
        if record is not None and record.status_code is None and record.made is None:
            raise not_finished()
        if record is not None:
            done = replay_of(resource, who, record, stamp, body)
            if done is not None:
                return done
        if time.monotonic() >= deadline:
            raise not_finished()


def replay_of(resource: ResourceApi, who: Principal, record: IdempotencyKey, stamp: str,
              body: Any) -> Response | None:  # fmt: skip
    """What a repeat is answered from the key's row: its stored answer, or (when its
    request died after committing) the objects it made as they are now; None when the
    row holds neither (or names objects of which none exists any more: undone)."""
    if record.fingerprint != stamp:
        raise Conflict(
            "This Idempotency-Key was used for a different request.",
            error_id=GENERAL_IDEMPOTENCY_CONFLICT,
        )
    if record.status_code is not None:
        return Response(record.body, status=record.status_code, mimetype=record.mimetype)
    ids = idempotency.made_ids(record)
    if not ids:
        return None
    indexed = isinstance(body, list)
    found = []
    for ident in ids:
        try:
            found.append(resource.service.get(ident, who))
        except NotFound:
            continue
    if not found:
        return None  # all undone: nothing of it is left
    if len(found) != (len(body) if indexed else 1):
        raise Conflict(
            "The first request with this Idempotency-Key died part-way and made only "
            f"{resource.name} {', '.join(map(str, ids))}; delete them and use a new key.",
            error_id=GENERAL_IDEMPOTENCY_CONFLICT,
            data={"made": ids},
        )
    return resource.answer(Outcome(found), indexed, status=201)


def run(resource: ResourceApi, who: Principal, running: idempotency.Running) -> Response:
    """Run the create as the key's request; store its answer (or give the key up)."""
    kept = False
    try:
        response = resource.create(who)
    except ApiError as exc:  # (answered here, not by the error handler: the same view)
        response = error_response(for_the_caller(exc))
        # its work is kept, not undone: the row stays for the retry, which takes the key
        # over and removes what is still building (or answers what landed)
        kept = isinstance(exc, OutcomeUnknown)
    except BaseException:
        idempotency.release(running)
        raise
    if response.status_code >= 500:
        if not kept:
            idempotency.release(running)  # (not if it made something: that is answered)
    else:
        body = response.get_data()
        idempotency.store_answer(running, response.status_code, response.mimetype, body)
    return response
