"""The application factory: configuration, extensions, blueprints, errors, CLI."""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from typing import Any

from flask import Flask, Response, g, request
from flask.sessions import SessionInterface
from sqlalchemy import event
from sqlalchemy.engine import Engine

from vmapi import models  # noqa: F401 - registers every model with the metadata
from vmapi.api import register_api
from vmapi.api.errors import register_error_handlers
from vmapi.cli import register_cli
from vmapi.config import load_config
from vmapi.database import ping_idle_connections
from vmapi.extensions import db, migrate
from vmapi.hypervisor.libvirt import LibvirtDriver
from vmapi.hypervisor.observed import ObservedDriver
from vmapi.hypervisor.uri import UriPolicy
from vmapi.requestlog import register_request_log
from vmapi.services.nodes.hosts import DRIVER_KEY, POLICY_KEY
from vmapi.telemetry import (
    count_connections,
    hypervisor_action,
    register_request_metrics,
)

__all__ = ["create_app"]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class NoCookieSessions(SessionInterface):
    """vmapi authenticates every request by its bearer token and keeps no cookie session:
    Flask would otherwise build a signing serializer and look for a session cookie on
    every request (a tenth of a read's Python time). ``flask.session`` is then Flask's
    null session: empty, and refusing writes loudly."""

    def open_session(self, app: Flask, request: Any) -> Any:
        return self.make_null_session(app)

    def save_session(self, app: Flask, session: Any, response: Response) -> None:
        return None


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """The application factory: configuration, extensions, blueprints, errors, CLI."""
    # named for the package, as before the factory had a module of its own: the logger,
    # the instance folder and the templates are found from the package's name
    app = Flask("vmapi", instance_relative_config=True)
    app.session_interface = NoCookieSessions()
    load_config(app, config)
    logging.basicConfig(level=app.config["LOG_LEVEL"])

    db.init_app(app)
    with app.app_context():
        ping_idle_connections(db.engine, app.config["DB_PING_AFTER"])
        count_connections(db.engine)
    migrate.init_app(app, db, directory=_migrations_dir())
    # Which libvirt URIs may be opened at all: the schema, the services and the
    # connection cache below them all ask this one policy (vmapi.hypervisor.uri).
    app.extensions[POLICY_KEY] = policy = UriPolicy.from_config(app.config)
    driver = LibvirtDriver(
        timeout=app.config["LIBVIRT_TIMEOUT"],
        keepalive_interval=app.config["LIBVIRT_KEEPALIVE_INTERVAL"],
        keepalive_count=app.config["LIBVIRT_KEEPALIVE_COUNT"],
        policy=policy,
    )
    app.extensions[DRIVER_KEY] = ObservedDriver(driver, hypervisor_action)

    @app.before_request
    def begin_request() -> None:
        """The request's id and start time, for the request log and the metrics."""
        g.started = time.perf_counter()
        given = request.headers.get("X-Request-Id", "")
        g.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex

    @app.after_request
    def echo_request_id(response: Response) -> Response:
        response.headers["X-Request-Id"] = g.get("request_id", "-")
        return response

    register_request_log(app)
    register_request_metrics(app)
    register_error_handlers(app)
    register_api(app)
    register_cli(app)
    return app


def _migrations_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "migrations")


@event.listens_for(Engine, "connect")
def _sqlite_foreign_keys(dbapi_connection: Any, connection_record: Any) -> None:
    """SQLite ignores foreign keys unless asked, per connection."""
    if type(dbapi_connection).__module__ == "sqlite3":
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()
