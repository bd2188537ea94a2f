"""One JSON line per request on the ``vmapi.request`` logger (never a token or a body)."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

from flask import Flask, Response, g, request

log = logging.getLogger("vmapi.request")


def register_request_log(app: Flask) -> None:
    @app.after_request
    def log_request(response: Response) -> Response:
        if not app.config["LOG_REQUESTS"]:
            return response
        principal = g.get("principal")
        started = g.get("started")
        line = {
            "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": g.get("request_id", "-"),
            "token": principal.name if principal is not None else None,
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2) if started else None,
        }
        log.info(json.dumps(line, separators=(",", ":")))
        return response
