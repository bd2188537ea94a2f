"""/image: the catalog (the generic views), and ``/image/<id>/file``, the bytes both
ways (:func:`download_image_file`, :func:`upload_image_file`).

The file route is the contract's one exception to the JSON body limit: its body is
``application/octet-stream`` of up to ``VMAPI_IMAGE_MAX_SIZE`` bytes, read here in
small chunks and handed to the service as it arrives (never whole in memory). Each
chunk moved, up or down, beats the worker's heartbeat (:mod:`vmapi.heartbeat`), so a
transfer outlives gunicorn's worker timeout as long as bytes flow -- and averages at
least ``VMAPI_TRANSFER_MIN_RATE`` once past its grace period, or it is cut (a client
that crawls must not keep a worker).

Behind the shipped nginx site, an upload reaches the worker only once nginx holds all
of it, and a download is authorised here and sent by nginx from the image store: with
``VMAPI_ACCEL_REDIRECT`` set the answer is an ``X-Accel-Redirect`` to that internal
location with the headers a streamed download has, and no body.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, current_app, g, request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from vmapi import heartbeat
from vmapi.api.resource import ALL_ROLES, ResourceApi, principal
from vmapi.auth import require_role
from vmapi.error_ids import READ, UPDATE
from vmapi.errors import BodyTooLarge, UnsupportedMediaType
from vmapi.schemas.image import ImageSchema
from vmapi.services.images.catalog import ImageFile, ImageService
from vmapi.services.images.store import Pace, TransferTooSlow, UploadTruncated, read_chunks

log = logging.getLogger(__name__)

OCTET_STREAM = "application/octet-stream"
#: bytes read from the client at a time: from MIN_READ (small enough that even a slow
#: client, 1 KiB/s, completes a read, and so beats the heartbeat, well within the
#: worker timeout) doubling up to MAX_READ while reads return quickly (fewer, larger
#: copies: a fast upload runs at about twice the speed)
MIN_READ, MAX_READ = 64 * 1024, 1024 * 1024
QUICK_READ = 0.25  # seconds
#: nginx asks with a PUT carrying this header (and no body) whether the caller may upload
#: to the image now, before it spools a byte (deploy/nginx/vmapi-site.conf): 204 yes, or
#: the refusal the upload would get, its envelope also in UPLOAD_REFUSAL
UPLOAD_CHECK, UPLOAD_LENGTH = "X-Vmapi-Upload-Check", "X-Vmapi-Upload-Length"
UPLOAD_REFUSAL = "X-Vmapi-Refusal"


def download_image_file(ident: int) -> Response:
    """``GET /image/<id>/file`` (and HEAD): the file of an active image, streamed by this
    worker or, with ACCEL_REDIRECT, sent by nginx."""
    g.resource_name = image.name
    who = principal()
    image.parse_options(request.args, None)
    require_role(who, image.read_roles, f"read {image.name}")
    accel = current_app.config["ACCEL_REDIRECT"]
    found = image.service.open_file(ident, who, streamed=not accel)
    return accel_response(found, accel) if accel else file_response(found)


def upload_image_file(ident: int) -> Response:
    """``PUT /image/<id>/file``: the file of a queued image, streamed in and inspected
    before it is kept; or, asked by nginx with UPLOAD_CHECK, whether it may be sent."""
    g.resource_name = image.name
    who = principal()
    image.parse_options(request.args, None)
    require_role(who, image.write_roles, f"change {image.name}")
    if request.mimetype != OCTET_STREAM:
        raise UnsupportedMediaType(
            f"Send the image file as {OCTET_STREAM}, not "
            f"{request.mimetype or 'a body without Content-Type'}."
        )
    if request.headers.get(UPLOAD_CHECK):
        image.service.check_upload(ident, who, announced_length())
        g.resource_name = None  # nothing changed: not counted as a change
        return Response(status=204)
    limit = int(current_app.config["IMAGE_MAX_SIZE"])
    outcome = image.service.upload(ident, who, body_chunks(limit), request.content_length)
    return image.answer(outcome, indexed=False)


class ImageApi(ResourceApi):
    """The catalog, plus the OpenAPI entry of the file."""

    def extra_paths(self, success: Callable, errors: Callable) -> dict[str, dict[str, Any]]:
        binary = {"type": "string", "format": "binary"}
        ident = {"name": "ident", "in": "path", "required": True,
                 "schema": {"type": "integer", "minimum": 1, "format": "int64"}}  # fmt: skip
        ref = {"$ref": "#/components/schemas/Image"}
        return {
            f"/api/v1/{self.name}/{{ident}}/file": {
                "get": {
                    "tags": [self.name],
                    "summary": "The image's file, streamed (active images only).",
                    "parameters": [ident],
                    "responses": {
                        "200": {
                            "description": "The file; ETag is its sha256.",
                            "content": {OCTET_STREAM: {"schema": binary}},
                        },
                        **errors(self.name, READ),
                    },
                },
                "put": {
                    "tags": [self.name],
                    "summary": "Send the file of a queued image (streamed, at most "
                    "VMAPI_IMAGE_MAX_SIZE bytes); it is inspected before it is kept.",
                    "parameters": [ident],
                    "requestBody": {
                        "required": True,
                        "content": {OCTET_STREAM: {"schema": binary}},
                    },
                    "responses": {
                        "200": success(ref, "The image, now active."),
                        **errors(self.name, UPDATE),
                    },
                },
            }
        }


def announced_length() -> int | None:
    """The length nginx was told for the upload it asks about (none: chunked)."""
    value = request.headers.get(UPLOAD_LENGTH, "")
    return int(value) if value.isascii() and value.isdigit() else None


def refusal_header(response: Response) -> Response:
    """(After every /image request.) An upload check's refusal, also as a header: nginx
    answers the client with it (nginx sees only the headers of the answer to its
    ``auth_request``)."""
    if request.headers.get(UPLOAD_CHECK) and response.status_code >= 400 and response.is_json:
        envelope = response.get_json(silent=True)
        if isinstance(envelope, dict):
            response.headers[UPLOAD_REFUSAL] = json.dumps(envelope, separators=(",", ":"))
    return response


def pace() -> Pace:
    """The minimum rate of a transfer starting now (configuration)."""
    config = current_app.config
    return Pace(int(config["TRANSFER_MIN_RATE"]), float(config["TRANSFER_MIN_RATE_GRACE"]))


def too_slow(exc: TransferTooSlow, what: str, request_id: str) -> None:
    log.warning("image %s cut, request_id=%s: %s", what, request_id, exc)


def body_chunks(limit: int) -> Iterator[bytes]:
    """The request body in chunks as they arrive; a body that breaks off raises
    :class:`UploadTruncated` (one shorter than its Content-Length just ends: the service
    compares the count). The service counts the bytes against the limit."""
    environ = request.environ
    if environ.get("wsgi.input_terminated"):
        # The server ends the body itself (gunicorn: at Content-Length, or after the last
        # chunk), so it is read directly, sparing werkzeug's wrapper two copies of every
        # byte.
        stream = environ["wsgi.input"]
    else:
        # werkzeug's cap for JSON bodies becomes the image limit for this request only
        # (plus one byte: werkzeug refuses a read *at* its cap; exactly the limit is fine).
        request.max_content_length = limit + 1
        stream = request.stream
    size, received = MIN_READ, 0
    rate = pace()
    try:
        while True:
            began = time.monotonic()
            chunk = stream.read(size)
            if not chunk:
                return
            heartbeat.beat()
            quick = time.monotonic() - began < QUICK_READ
            size = min(size * 2, MAX_READ) if quick else MIN_READ
            received += len(chunk)
            try:
                rate.moved_bytes(len(chunk))
            except TransferTooSlow as exc:
                too_slow(exc, "upload", getattr(g, "request_id", "-"))
                raise
            yield chunk
    except RequestEntityTooLarge:
        raise BodyTooLarge(limit=limit) from None
    except (ClientDisconnected, OSError) as exc:  # gunicorn's NoMoreData is an OSError
        raise UploadTruncated(received, request.content_length) from exc


def file_response(found: ImageFile) -> Response:
    """The file streamed by this worker, at the minimum rate or cut."""
    response = Response(Outgoing(found), mimetype=OCTET_STREAM, direct_passthrough=True)
    response.headers["Content-Length"] = str(found.size)
    response.headers["ETag"] = f'"{found.checksum}"'
    # werkzeug closes the response itself only when it wraps the body (HEAD); a body
    # passed through is closed by the server (Outgoing.close)
    response.call_on_close(found.close)
    return response


class Outgoing:
    """The body of a download: the file in chunks, each beating the heartbeat and counted
    against the minimum rate once the client took it. The server closes it however the
    download ends (sent, cut, failed, the client gone, even before the first chunk),
    which closes the file and frees the transfer's slot."""

    def __init__(self, found: ImageFile) -> None:
        self.found = found
        self.chunks = read_chunks(found.handle)
        self.rate = pace()
        self.last = 0
        self.request_id = getattr(g, "request_id", "-")  # the body outlives the request context

    def __iter__(self) -> Outgoing:
        return self

    def __next__(self) -> bytes:
        if self.last:
            try:
                self.rate.moved_bytes(self.last)
            except TransferTooSlow as exc:
                too_slow(exc, "download", self.request_id)
                raise
        chunk = next(self.chunks)
        heartbeat.beat()
        self.last = len(chunk)
        return chunk

    def close(self) -> None:
        self.chunks.close()
        self.found.close()


def accel_response(found: ImageFile, location: str) -> Response:
    """No body: nginx sends the file from ``location`` (its internal alias of the image
    store) with this Content-Type and ETag (and the file's own length)."""
    found.close()
    response = Response(b"", mimetype=OCTET_STREAM)
    response.headers["ETag"] = f'"{found.checksum}"'
    response.headers["X-Accel-Redirect"] = f"{location}{found.name}"
    return response


image = ImageApi(
    "image",
    ImageSchema,
    ImageService(),
    read_roles=ALL_ROLES,
    write_roles=ALL_ROLES,
    summary="Images VMs boot from: the catalog here, the bytes at /image/<id>/file. "
    "Customers see public images and their own.",
)
