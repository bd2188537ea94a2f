"""The error hierarchy and the one place that turns any failure into the error envelope.

Every error the API answers is an :class:`ApiError` (or is converted into one here):
``status_code``, a stable ``error_id`` (``area/what``, never reused) and a message
template filled from keyword arguments. Domain code raises; it never calls ``abort()``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask, g
from sqlalchemy.exc import OperationalError as SQLAlchemyOperationalError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Base of every error answered to a client."""

    status_code: int = 500
    error_id: str = "general/internal"
    template: str = "An internal error occurred."

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
    error_id = "general/validation"
    template = "The request is invalid; see data for the fields at fault."


class MalformedBody(ApiError):
    status_code = 400
    error_id = "general/malformed_body"
    template = "The request body could not be parsed as {kind}: {reason}"


class AuthenticationRequired(ApiError):
    status_code = 401
    error_id = "general/authentication/required"
    template = "Send an API token as 'Authorization: Bearer <token>'."


class AuthenticationFailed(ApiError):
    status_code = 401
    error_id = "general/authentication/failed"
    template = "The API token is unknown, revoked or expired."


class Forbidden(ApiError):
    status_code = 403
    error_id = "general/authorization/forbidden"
    template = "This token may not {action}."


class NotFound(ApiError):
    status_code = 404
    error_id = "general/not_found"
    template = "No {resource} with id {id}."


class Conflict(ApiError):
    status_code = 409
    error_id = "general/conflict"
    template = "The request conflicts with the current state."


class BodyTooLarge(ApiError):
    status_code = 413
    error_id = "general/body_too_large"
    template = "The request body is larger than the limit of {limit} bytes."


class UnsupportedMediaType(ApiError):
    status_code = 415
    error_id = "general/unsupported_media_type"
    template = "Send the body as application/json or application/msgpack, not {content_type}."


class HypervisorFailure(ApiError):
    """A hypervisor answered with an error (502)."""

    status_code = 502
    error_id = "general/hypervisor_error"
    template = "The hypervisor failed: {reason}"


class HypervisorTimeout(ApiError):
    """A hypervisor did not answer in time (504)."""

    status_code = 504
    error_id = "general/hypervisor_timeout"
    template = "The hypervisor did not answer within {timeout} s."


class ServiceUnavailable(ApiError):
    status_code = 503
    error_id = "general/unavailable"
    template = "The service is unavailable: {reason}"


# Werkzeug's HTTP errors that reach us without our own exception.
_HTTP_ERROR_IDS = {
    400: ("general/bad_request", "The request is malformed."),
    404: ("general/not_found", "There is nothing at this URL."),
    405: ("general/method_not_allowed", "This URL does not accept the {method} method."),
    413: ("general/body_too_large", "The request body is larger than the limit of {limit} bytes."),
    415: ("general/unsupported_media_type", "Send the body as application/json."),
}


def from_http_exception(exc: HTTPException) -> ApiError:
    """Translate werkzeug's 404/405/413/... into our envelope's error."""
    from flask import current_app, request

    code = exc.code or 500
    error_id, template = _HTTP_ERROR_IDS.get(code, (f"general/http_{code}", exc.description))
    message = template.format(
        method=request.method, limit=current_app.config.get("MAX_CONTENT_LENGTH")
    )
    err = ApiError(message, error_id=error_id)
    err.status_code = code
    if code == 405 and getattr(exc, "valid_methods", None):
        err.data = {"allowed": sorted(exc.valid_methods)}
    return err


def register_error_handlers(app: Flask) -> None:
    """Route every failure, ours or not, into :func:`vmapi.representations.error_response`."""
    from vmapi.representations import error_response

    @app.errorhandler(ApiError)
    def handle_api_error(exc: ApiError):
        return error_response(exc)

    @app.errorhandler(HTTPException)
    def handle_http_exception(exc: HTTPException):
        response = error_response(from_http_exception(exc))
        if exc.code == 405 and getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        return response

    @app.errorhandler(SQLAlchemyOperationalError)
    def handle_database_down(exc: SQLAlchemyOperationalError):
        # The database went away (restart, failover, network): retryable, not a bug.
        request_id = getattr(g, "request_id", "-")
        log.error("database error, request_id=%s: %s", request_id, str(exc).splitlines()[0])
        _rollback_quietly()
        return error_response(
            ServiceUnavailable(
                f"The database did not answer; retry. Request id {request_id}.",
                data={"request_id": request_id},
            )
        )

    @app.errorhandler(Exception)
    def handle_unexpected(exc: Exception):
        # HTTPException has its own handler above, but Flask hands it here when that
        # handler is missing for a subclass; never turn a 404 into a 500.
        if isinstance(exc, HTTPException):
            return handle_http_exception(exc)
        request_id = getattr(g, "request_id", "-")
        log.exception("unhandled error, request_id=%s", request_id)
        err = ApiError(
            f"An internal error occurred; quote request id {request_id} to the operator.",
            data={"request_id": request_id},
        )
        return error_response(err)


def _rollback_quietly() -> None:
    from vmapi.extensions import db

    try:
        db.session.rollback()
    except Exception:  # the connection may be gone for good; the pool replaces it
        log.debug("rollback after a database error failed", exc_info=True)
