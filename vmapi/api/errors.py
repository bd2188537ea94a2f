"""The error edge: every failure of a request, ours or not, becomes the error envelope here.

Our own :class:`~vmapi.errors.ApiError` is written as it is; werkzeug's HTTP errors (no
route, a method the URL does not take, a body over the limit) get the registry's ids; a
database that went away is 503 ``general/unavailable``; anything else is logged with the
request id and answered as 500 ``general/internal`` without a traceback.
"""

from __future__ import annotations

import logging
import re

from flask import Flask, Response, current_app, g, request
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import OperationalError as SQLAlchemyOperationalError
from werkzeug.exceptions import HTTPException

from vmapi.api.version import check_version
from vmapi.error_ids import (
    GENERAL_BAD_REQUEST,
    GENERAL_BODY_TOO_LARGE,
    GENERAL_METHOD_NOT_ALLOWED,
    GENERAL_NOT_FOUND,
    GENERAL_UNSUPPORTED_MEDIA_TYPE,
    http_fallback,
)
from vmapi.errors import ApiError, ServiceUnavailable
from vmapi.extensions import db
from vmapi.node_detail import NODE_DETAIL, NodeNote, for_admins
from vmapi.representations import error_response

#: seconds a client is told to wait (Retry-After) when the database did not answer: a
#: failover manager promotes a standby in about this time (Patroni, ../shared/recipes)
RETRY_AFTER_DATABASE = 5

log = logging.getLogger(__name__)

# Werkzeug's HTTP errors that reach us without our own exception.
_HTTP_ERROR_IDS = {
    400: (GENERAL_BAD_REQUEST, "The request is malformed."),
    404: (GENERAL_NOT_FOUND, "There is nothing at this URL."),
    405: (GENERAL_METHOD_NOT_ALLOWED, "This URL does not accept the {method} method."),
    413: (GENERAL_BODY_TOO_LARGE, "The request body is larger than the limit of {limit} bytes."),
    415: (GENERAL_UNSUPPORTED_MEDIA_TYPE, "Send the body as application/json."),
}
_API_PREFIX = re.compile(r"^/api/([^/]+)(?:/|$)")


def from_http_exception(exc: HTTPException) -> ApiError:
    """Translate werkzeug's 404/405/413/... into our envelope's error."""
    code = exc.code or 500
    error_id, template = _HTTP_ERROR_IDS.get(code, (http_fallback(code), exc.description))
    message = template.format(
        method=request.method, limit=current_app.config.get("MAX_CONTENT_LENGTH")
    )
    err = ApiError(message, error_id=error_id)
    err.status_code = code
    if code == 405 and getattr(exc, "valid_methods", None):
        err.data = {"allowed": sorted(exc.valid_methods)}
    return err


#: what a customer's hypervisor error keeps of ``data`` (the node, its URI and libvirt's
#: text stay in the server's log and in admins' answers)
CUSTOMER_HYPERVISOR_DATA = ("step", "index", "request_id", "deleted_storage", "storage")


def for_the_caller(exc: ApiError) -> ApiError:
    """``exc`` as the caller may see it. A hypervisor's failure or silence (502, 504)
    tells an admin the node, its URI and libvirt's text; anyone else gets the error id, a
    generic message and the request id to quote, and the server's log keeps the rest.
    Any other error keeps its ``data.node_detail`` for admins only."""
    if _is_admin():
        return exc
    if exc.status_code not in (502, 504):
        return _without_node_detail(exc)
    request_id = getattr(g, "request_id", "-")
    log.warning("hypervisor error answered to a customer, request_id=%s: %s %s data=%s",
                request_id, exc.error_id, exc.message, exc.data)  # fmt: skip
    data = exc.data if isinstance(exc.data, dict) else {}
    kept = {k: data[k] for k in CUSTOMER_HYPERVISOR_DATA if k in data}
    what = "did not answer in time" if exc.status_code == 504 else "failed"
    step = f" while {data['step']}" if isinstance(data.get("step"), str) else ""
    shown = ApiError(
        f"The hypervisor {what}{step}. Retry later, or quote request "
        f"id {request_id} to the operator.",
        error_id=exc.error_id,
        data={**kept, "request_id": request_id},
    )
    shown.status_code = exc.status_code
    return shown


def _is_admin() -> bool:
    who = g.get("principal")
    return who is not None and who.is_admin


def _without_node_detail(exc: ApiError) -> ApiError:
    """``exc`` without ``data.node_detail`` (the node's name, paths, libvirt's text),
    which goes to the server's log."""
    if not isinstance(exc.data, dict) or NODE_DETAIL not in exc.data:
        return exc
    log.warning("node detail kept from a customer, request_id=%s: %s %s",
                getattr(g, "request_id", "-"), exc.error_id, exc.data[NODE_DETAIL])  # fmt: skip
    shown = ApiError(exc.message, error_id=exc.error_id,
                     data={k: v for k, v in exc.data.items() if k != NODE_DETAIL})  # fmt: skip
    shown.status_code, shown.retry_after = exc.status_code, exc.retry_after
    return shown


def messages_for_the_caller(messages: list[str]) -> list[str]:
    """The notes of a successful answer as the caller may read them: admins read each
    :class:`~vmapi.node_detail.NodeNote`'s detail too; for anyone else it goes to the
    server's log."""
    if _is_admin():
        return [for_admins(message) for message in messages]
    for message in messages:
        if isinstance(message, NodeNote):
            log.warning("node detail kept from a customer, request_id=%s: %s",
                        getattr(g, "request_id", "-"), message.detail)  # fmt: skip
    return [str(message) for message in messages]


def register_error_handlers(app: Flask) -> None:
    """Route every failure into :func:`vmapi.representations.error_response`."""

    @app.errorhandler(ApiError)
    def handle_api_error(exc: ApiError) -> Response:
        return error_response(for_the_caller(exc))

    @app.errorhandler(HTTPException)
    def handle_http_exception(exc: HTTPException) -> Response:
        if exc.code == 404:
            # An unknown route under a bad version says so, rather than a bare 404.
            match = _API_PREFIX.match(request.path)
            if match:
                try:
                    check_version(match.group(1))
                except ApiError as err:
                    return error_response(err)
        response = error_response(from_http_exception(exc))
        if exc.code == 405 and getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        return response

    @app.errorhandler(SQLAlchemyOperationalError)
    def handle_database_down(exc: DBAPIError) -> Response:
        # The database went away (restart, failover, network): retryable, not a bug.
        request_id = getattr(g, "request_id", "-")
        log.error("database error, request_id=%s: %s", request_id, str(exc).splitlines()[0])
        _rollback_quietly()
        unavailable = ServiceUnavailable(
            f"The database did not answer; retry. Request id {request_id}.",
            data={"request_id": request_id},
        )
        unavailable.retry_after = RETRY_AFTER_DATABASE
        return error_response(unavailable)

    @app.errorhandler(Exception)
    def handle_unexpected(exc: Exception) -> Response:
        # HTTPException has its own handler above, but Flask hands it here when that
        # handler is missing for a subclass; never turn a 404 into a 500.
        if isinstance(exc, HTTPException):
            return handle_http_exception(exc)
        # A disconnect psycopg2 reports otherwise (InterfaceError "connection already
        # closed"): SQLAlchemy has invalidated the connection; the database is gone.
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return handle_database_down(exc)
        request_id = getattr(g, "request_id", "-")
        log.exception("unhandled error, request_id=%s", request_id)
        err = ApiError(
            f"An internal error occurred; quote request id {request_id} to the operator.",
            data={"request_id": request_id},
        )
        return error_response(err)


def _rollback_quietly() -> None:
    try:
        db.session.rollback()
    except Exception:  # the connection may be gone for good; the pool replaces it
        log.debug("rollback after a database error failed", exc_info=True)
