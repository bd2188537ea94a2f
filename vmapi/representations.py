"""Wire formats: JSON, MessagePack and HTML out; JSON and MessagePack in.

The envelope is built once here: :func:`success_response` and :func:`error_response`.
"""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
from flask import Response, current_app, g, has_request_context, render_template, request

from vmapi.errors import ApiError, BodyTooLarge, MalformedBody, UnsupportedMediaType

JSON = "application/json"
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")
HTML = "text/html"
_OFFERED = [JSON, *MSGPACK_TYPES, HTML]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object that names a key twice is ambiguous; refuse it rather than pick one."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice in one object")
        result[key] = value
    return result


def parse_body() -> Any:
    """Decode the request body by its Content-Type; ``None`` when there is no body."""
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit=limit)
    raw = request.get_data(cache=True)  # werkzeug enforces the limit on chunked bodies too
    if not raw:
        return None
    mimetype = request.mimetype
    if mimetype == JSON or mimetype.endswith("+json"):
        try:
            text = raw.decode("utf-8")
            return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
        except UnicodeDecodeError as exc:
            raise MalformedBody(kind="JSON", reason="the body is not valid UTF-8") from exc
        except RecursionError as exc:
            raise MalformedBody(kind="JSON", reason="it is nested too deeply") from exc
        except ValueError as exc:
            raise MalformedBody(kind="JSON", reason=str(exc)) from exc
    if mimetype in MSGPACK_TYPES:
        try:
            value = msgpack.unpackb(raw, raw=False, strict_map_key=True, timestamp=0)
        except Exception as exc:  # msgpack raises several unrelated types
            raise MalformedBody(kind="MessagePack", reason=str(exc) or type(exc).__name__) from exc
        _reject_non_json(value)
        return value
    raise UnsupportedMediaType(content_type=mimetype or "a body without Content-Type")


def _reject_non_json(value: Any, depth: int = 0) -> None:
    """MessagePack can carry bytes, NaN and non-string keys; JSON cannot. Keep one data model."""
    if depth > 64:
        raise MalformedBody(kind="MessagePack", reason="nesting deeper than 64 levels")
    if isinstance(value, bytes):
        raise MalformedBody(kind="MessagePack", reason="binary values are not accepted")
    if isinstance(value, float) and not math.isfinite(value):
        raise MalformedBody(kind="MessagePack", reason="NaN and infinities are not numbers")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise MalformedBody(kind="MessagePack", reason="map keys must be strings")
            _reject_non_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _reject_non_json(item, depth + 1)


def negotiated_type() -> str:
    """The response type the client asked for; JSON unless it prefers another we offer."""
    if not request.accept_mimetypes:
        return JSON
    best = request.accept_mimetypes.best_match(_OFFERED, default=JSON)
    return best or JSON


def _render(envelope: dict[str, Any], status: int, headers: dict[str, str] | None) -> Response:
    kind = negotiated_type()
    if kind in MSGPACK_TYPES:
        body = msgpack.packb(envelope, use_bin_type=True)
        response = Response(body, status=status, mimetype=kind)
    elif kind == HTML:
        html = render_template(
            "envelope.html",
            envelope=envelope,
            resource=getattr(g, "resource_name", None),
            api_root=getattr(g, "api_root", "/api/v1"),
            next_link=(headers or {}).get("Link"),
        )
        response = Response(html, status=status, mimetype=HTML)
    else:
        body = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)
        response = Response(body, status=status, mimetype=JSON)
    response.headers["Vary"] = "Accept"
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def success_response(
    data: Any,
    status: int = 200,
    headers: dict[str, str] | None = None,
    messages: list[str] | None = None,
) -> Response:
    """``{"status": "success", "data": data}`` in the negotiated format.

    ``messages`` (what a person should know, e.g. what takes effect only at the next
    start) become ``"message"``, one sentence after another.
    """
    envelope: dict[str, Any] = {"status": "success", "data": data}
    if messages:
        envelope["message"] = " ".join(messages)
    return _render(envelope, status, headers)


def error_response(exc: ApiError) -> Response:
    """The error envelope for ``exc`` in the negotiated format."""
    if has_request_context():
        g.error_id = exc.error_id  # for the request log and the audit trail
    envelope: dict[str, Any] = {
        "status": "error",
        "status_code": exc.status_code,
        "error_id": exc.error_id,
        "message": exc.message,
    }
    if exc.data is not None:
        envelope["data"] = exc.data
    response = _render(envelope, exc.status_code, None)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response
