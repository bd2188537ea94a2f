"""The error responses of the OpenAPI document, generated from the error-id registry.

Each operation documents one response per status it may answer, listing the ids
(:func:`vmapi.error_ids.answered_by`) in its description for people and in
``x-error-ids`` for machines; an id the code raises cannot be missing from the document.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vmapi.error_ids import (
    GENERAL_AUTHENTICATION_FAILED,
    GENERAL_AUTHENTICATION_REQUIRED,
    GENERAL_AUTHORIZATION_FORBIDDEN,
    answered_by,
    status_of,
)

#: What each error status means, in the document's words (the ids say the rest).
ERROR_STATUSES = {
    400: "Invalid request",
    401: "No or bad token",
    403: "The token may not do this",
    404: "No such object, route or version",
    405: "Method not allowed on this URL",
    409: "Conflict with the current state",
    413: "Body larger than the configured limit",
    415: "Body neither JSON nor MessagePack",
    429: "Too many in flight; retry after the Retry-After header's seconds",
    500: "Unexpected failure; data.request_id names it in the server log",
    502: "The hypervisor failed; its message is in the answer",
    503: "The database did not answer; retry",
    504: "The hypervisor did not answer in time",
}
#: What an endpoint that needs a token answers (and one that needs an admin's).
TOKEN_ERRORS = [GENERAL_AUTHENTICATION_REQUIRED, GENERAL_AUTHENTICATION_FAILED]
ADMIN_ERRORS = [*TOKEN_ERRORS, GENERAL_AUTHORIZATION_FORBIDDEN]


def _response(status: int, ids: list[str]) -> dict[str, Any]:
    return {
        "description": f"{ERROR_STATUSES[status]}: {', '.join(ids)}.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        "x-error-ids": ids,
    }


def error_responses(ids: Iterable[str]) -> dict[str, Any]:
    """The responses of an endpoint that may answer ``ids``: one per status."""
    by_status: dict[int, list[str]] = {}
    for error_id in ids:
        by_status.setdefault(status_of(error_id), []).append(error_id)
    return {
        str(status): _response(status, sorted(by_status[status])) for status in sorted(by_status)
    }


def errors_of(resource: str, operation: str) -> dict[str, Any]:
    """The error responses of an operation on a resource, as the registry has them."""
    return error_responses(
        error_id for error_id, _status, _meaning in answered_by(resource, operation)
    )
