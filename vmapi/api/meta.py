"""Handlers about the API itself: /health, /metrics, the OpenAPI document, the index
(routed in vmapi/api/routes.py)."""

from __future__ import annotations

import ipaddress

from flask import Response, current_app, g, jsonify, request
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from vmapi.api.openapi import document_for
from vmapi.api.resource import ADMIN_ONLY, RESOURCES, principal
from vmapi.auth import require_role
from vmapi.errors import ServiceUnavailable
from vmapi.extensions import db
from vmapi.representations import success_response
from vmapi.telemetry import scrape


def health() -> Response:
    """200 when the database answers, 503 otherwise. No authentication."""
    try:
        db.session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        db.session.rollback()
        raise ServiceUnavailable(reason="the database does not answer") from exc
    return success_response({"database": "ok"})


def metrics() -> Response:
    """Prometheus metrics of every worker: for the admin token, or without a token from
    an address in METRICS_ALLOW (as gunicorn sees the peer)."""
    if not from_allowed_network(request.remote_addr, current_app.config["METRICS_ALLOW"]):
        require_role(principal(), ADMIN_ONLY, "read metrics")

    return scrape()


def from_allowed_network(address: str | None, networks: list[str]) -> bool:
    if not address or not networks:
        return False
    try:
        peer = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(peer in ipaddress.ip_network(net, strict=False) for net in networks)


def openapi() -> Response:
    """The OpenAPI 3 document of the whole API. No authentication."""
    return jsonify(document_for(current_app))


def index() -> Response:
    """The resources this server offers (a starting point for browsing)."""
    principal()
    g.resource_name = None
    return success_response(
        {name: {"href": f"/api/v1/{name}", "summary": r.summary} for name, r in RESOURCES.items()}
    )
