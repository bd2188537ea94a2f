"""``POST`` with an ``Idempotency-Key`` header (API.md): the first request runs, a repeat
is answered with the first answer (``Idempotent-Replayed: true``)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from flask import Response, current_app, request

from vmapi.api.errors import for_the_caller
from vmapi.auth import Principal
from vmapi.error_ids import GENERAL_IDEMPOTENCY_CONFLICT
from vmapi.errors import ApiError, Conflict, ValidationError
from vmapi.representations import error_response, parse_body
from vmapi.services import idempotency

if TYPE_CHECKING:
    from vmapi.api.resource import ResourceApi


IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def idempotent_create(resource: ResourceApi, who: Principal) -> Response:
    """POST with an Idempotency-Key: run once, answer repeats with the first answer."""
    key = request.headers["Idempotency-Key"]
    if not IDEMPOTENCY_KEY.match(key):
        raise ValidationError(
            data={"Idempotency-Key": ["Use 1 to 255 printable ASCII characters, no spaces."]}
        )
    config = current_app.config
    stamp = idempotency.fingerprint(request.method, request.path, parse_body())
    first = idempotency.claim(who.token_id, key, stamp, config["IDEMPOTENCY_TTL"])
    if first is not None:
        if first.fingerprint != stamp:
            raise Conflict(
                "This Idempotency-Key was used for a different request.",
                error_id=GENERAL_IDEMPOTENCY_CONFLICT,
            )
        done = idempotency.wait_for_answer(who.token_id, key, config["IDEMPOTENCY_WAIT"])
        if done is None or done.status_code is None:
            raise Conflict(
                "The first request with this Idempotency-Key has not finished; retry later.",
                error_id=GENERAL_IDEMPOTENCY_CONFLICT,
            )
        replay = Response(done.body, status=done.status_code, mimetype=done.mimetype)
        replay.headers["Idempotent-Replayed"] = "true"
        return replay
    try:
        response = resource.create(who)
    except ApiError as exc:  # (answered here, not by the error handler: the same view)
        response = error_response(for_the_caller(exc))
    except BaseException:
        idempotency.release(who.token_id, key)
        raise
    if response.status_code >= 500:
        idempotency.release(who.token_id, key)
    else:
        body = response.get_data()
        idempotency.store_answer(who.token_id, key, response.status_code, response.mimetype, body)
    return response
