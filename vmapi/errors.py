"""The error hierarchy: what every layer raises when a request cannot be done.

Every error the API answers is an :class:`ApiError` (vmapi.api.errors converts anything
else into one): ``status_code``, a stable ``error_id`` from :mod:`vmapi.error_ids`
(``area/what``, never reused) and a message template filled from keyword arguments.
Domain code raises; it never calls ``abort()``. This module knows nothing of Flask or of
the wire formats, so every layer may import it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vmapi.error_ids import (
    GENERAL_AUTHENTICATION_FAILED,
    GENERAL_AUTHENTICATION_REQUIRED,
    GENERAL_AUTHORIZATION_FORBIDDEN,
    GENERAL_BODY_TOO_LARGE,
    GENERAL_CONFLICT,
    GENERAL_HYPERVISOR_ERROR,
    GENERAL_HYPERVISOR_TIMEOUT,
    GENERAL_INTERNAL,
    GENERAL_MALFORMED_BODY,
    GENERAL_NOT_FOUND,
    GENERAL_TOO_MANY_REQUESTS,
    GENERAL_UNAVAILABLE,
    GENERAL_UNSUPPORTED_MEDIA_TYPE,
    GENERAL_VALIDATION,
)


class ApiError(Exception):
    """Base of every error answered to a client."""

    status_code: int = 500
    error_id: str = GENERAL_INTERNAL
    template: str = "An internal error occurred."
    #: seconds answered in a Retry-After header (None: no header)
    retry_after: int | None = None

    def __init__(
        self,
        message: str | None = None,
        *,
        error_id: str | None = None,
        data: Any = None,
        **fields: Any,
    ) -> None:
        if error_id is not None:
            self.error_id = error_id
        self.message = message if message is not None else self.template.format(**fields)
        self.data = data
        super().__init__(self.message)

    def with_index(self, index: int) -> ApiError:
        """Name the failing element of an array request in ``data.index``."""
        if isinstance(self.data, dict):
            self.data = {**self.data, "index": index}
        elif self.data is None:
            self.data = {"index": index}
        else:
            self.data = {"index": index, "details": self.data}
        return self


@contextmanager
def at_index(index: int | None) -> Iterator[None]:
    """Errors raised inside name the array element at ``index`` (None: not an array)."""
    try:
        yield
    except ApiError as exc:
        if index is not None:
            exc.with_index(index)
        raise


class ValidationError(ApiError):
    status_code = 400
    error_id = GENERAL_VALIDATION
    template = "The request is invalid; see data for the fields at fault."


class MalformedBody(ApiError):
    status_code = 400
    error_id = GENERAL_MALFORMED_BODY
    template = "The request body could not be parsed as {kind}: {reason}"


class AuthenticationRequired(ApiError):
    status_code = 401
    error_id = GENERAL_AUTHENTICATION_REQUIRED
    template = "Send an API token as 'Authorization: Bearer <token>'."


class AuthenticationFailed(ApiError):
    status_code = 401
    error_id = GENERAL_AUTHENTICATION_FAILED
    template = "The API token is unknown, revoked or expired."


class Forbidden(ApiError):
    status_code = 403
    error_id = GENERAL_AUTHORIZATION_FORBIDDEN
    template = "This token may not {action}."


class NotFound(ApiError):
    status_code = 404
    error_id = GENERAL_NOT_FOUND
    template = "No {resource} with id {id}."


class Conflict(ApiError):
    status_code = 409
    error_id = GENERAL_CONFLICT
    template = "The request conflicts with the current state."


class BodyTooLarge(ApiError):
    status_code = 413
    error_id = GENERAL_BODY_TOO_LARGE
    template = "The request body is larger than the limit of {limit} bytes."


class TooManyRequests(ApiError):
    status_code = 429
    error_id = GENERAL_TOO_MANY_REQUESTS
    template = "Too many requests in flight; retry after {retry_after} s."

    def __init__(self, message: str | None = None, *, retry_after: int, **kwargs: Any) -> None:
        super().__init__(message, retry_after=retry_after, **kwargs)
        self.retry_after = retry_after


class UnsupportedMediaType(ApiError):
    status_code = 415
    error_id = GENERAL_UNSUPPORTED_MEDIA_TYPE
    template = "Send the body as application/json or application/msgpack, not {content_type}."


class HypervisorFailure(ApiError):
    """A hypervisor answered with an error (502)."""

    status_code = 502
    error_id = GENERAL_HYPERVISOR_ERROR
    template = "The hypervisor failed: {reason}"


class HypervisorTimedOut(ApiError):
    """The answer when a hypervisor did not answer in time (504); the driver's exception
    for it is :class:`vmapi.hypervisor.HypervisorTimeout`."""

    status_code = 504
    error_id = GENERAL_HYPERVISOR_TIMEOUT
    template = "The hypervisor did not answer within {timeout} s."


class ServiceUnavailable(ApiError):
    status_code = 503
    error_id = GENERAL_UNAVAILABLE
    template = "The service is unavailable: {reason}"


class DatabaseLost(ServiceUnavailable):
    """503 when the database went away mid-write (retryable: Retry-After, as for any
    database error)."""

    retry_after = 5


class OutcomeUnknown(DatabaseLost):
    """The connection broke during a COMMIT and the database could not be asked whether
    it landed, or it landed with rows still building (the key's row names them:
    :func:`vmapi.services.idempotency.commit_building`): what the request did on the
    nodes is left for the retry with its key (or reconcile), not undone (it may belong
    to a committed row), and the key is not given up.
    :func:`vmapi.services.undo.apply_all` keeps it."""
