"""The console proxy's token plugin: websockify asks it where a console token leads.

websockify runs as its own service (deploy/systemd/vmapi-console-proxy.service) with
``--token-plugin vmapi.console_proxy.ConsoleTokens``. When a browser opens the websocket
``/console/websockify?token=...`` (nginx hands it on), :meth:`ConsoleTokens.lookup`
finds the token's hash in the database, refuses unknown and expired tokens (deleting an
expired one), and asks the libvirt of the VM's node where the domain's VNC display
listens *now*: an auto port changes whenever a domain starts or moves, so a stored port
could lead to another VM's display. The browser's VNC client then still has to log in
with the display password of the same console request.

It reads the database through vmapi's models and its configuration (the ``VMAPI_*``
environment and ``instance/vmapi.cfg``) and talks to libvirt through vmapi's driver;
nothing else of the app is loaded. websockify runs each connection in a process of its
own, so nothing here is shared between connections: one database connection and one
libvirt connection per lookup.

websockify logs request paths (``?token=...``) and the token of a failed lookup; a
filter on its log handlers blanks every token before a line is written.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from datetime import UTC, datetime
from typing import Any

from flask import Config, Flask
from sqlalchemy import create_engine, delete, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool
from websockify.token_plugins import BasePlugin

from vmapi.config import load_config
from vmapi.displays import display_problem
from vmapi.hypervisor import HypervisorError
from vmapi.hypervisor.libvirt import LibvirtDriver
from vmapi.hypervisor.uri import UriPolicy, validate_libvirt_uri
from vmapi.models import ConsoleToken, Node, Vm

log = logging.getLogger("vmapi.console_proxy")

#: What a console token can look like (secrets.token_urlsafe(32) gives 43 characters).
TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
#: Tokens in websockify's own log lines: ``...?token=X`` and ``Token 'X' not found``.
TOKEN_IN_LOG = re.compile(r"(token=|Token ')[^&'\s]*", re.IGNORECASE)


class RedactTokens(logging.Filter):
    """Blanks console tokens in a log record (the message is formatted here, once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = TOKEN_IN_LOG.sub(r"\1<redacted>", text)
        if clean != text:
            record.msg, record.args = clean, None
        return True


def redact_tokens_in_logs() -> None:
    """Put the filter on every handler websockify set up (they all hang on the root)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactTokens) for f in handler.filters):
            handler.addFilter(RedactTokens())


def load_settings() -> Config:
    """vmapi's configuration, read as the API reads it. The Flask object only holds it
    (its instance folder is the API's): no blueprint, extension or database is set up."""
    holder = Flask("vmapi", instance_relative_config=True)
    load_config(holder)
    return holder.config


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class ConsoleTokens(BasePlugin):
    """websockify's token plugin: ``lookup(token)`` -> ``(host, port)`` or None."""

    def __init__(self, src: str | None = None, settings: dict[str, Any] | None = None) -> None:
        super().__init__(src)
        self.settings = settings if settings is not None else load_settings()
        # NullPool: websockify forks a process per connection; no connection may be
        # inherited across a fork, and each process makes one lookup.
        self.engine = create_engine(self.settings["DATABASE_URL"], poolclass=NullPool)
        self.policy = UriPolicy.from_config(self.settings)
        self.driver = LibvirtDriver(
            timeout=self.settings["LIBVIRT_TIMEOUT"],
            keepalive_interval=self.settings["LIBVIRT_KEEPALIVE_INTERVAL"],
            keepalive_count=self.settings["LIBVIRT_KEEPALIVE_COUNT"],
            policy=self.policy,
        )
        redact_tokens_in_logs()

    def lookup(self, token: str) -> tuple[str, int] | None:
        try:
            return self.resolve(token)
        except Exception:  # a refusal, never a half-open proxy; the reason is logged
            log.exception("console token lookup failed")
            return None

    def resolve(self, token: str) -> tuple[str, int] | None:
        if not isinstance(token, str) or not TOKEN.match(token):
            log.warning("refused a malformed console token")
            return None
        digest = ConsoleToken.digest(token)
        with Session(self.engine) as session:
            found = session.execute(
                select(ConsoleToken, Vm, Node)
                .join(Vm, Vm.id == ConsoleToken.vm_id)
                .join(Node, Node.id == Vm.node_id)
                .where(ConsoleToken.token_hash == digest)
            ).first()
            if found is None or not hmac.compare_digest(found[0].token_hash, digest):
                log.warning("refused an unknown console token")
                return None
            row, vm, node = found
            if _utc(row.expires_at) <= datetime.now(UTC):
                session.execute(delete(ConsoleToken).where(ConsoleToken.id == row.id))
                session.commit()
                log.warning("refused an expired console token of %s", vm.name)
                return None
            uri, name = self.node_uri(node), vm.domain_name
            fallback = node.console_address or self.settings["CONSOLE_ADDRESS"]
        problem = display_problem(uri, fallback)
        if problem:  # a remote node's "this host" would lead to the proxy's own host
            log.warning("refused the console of %s on %s: %s", name, node.fqdn, problem)
            return None
        try:
            display = self.driver.display(uri, name)
        except HypervisorError as exc:
            log.warning("no display for the console of %s on %s: %s", name, node.fqdn, exc.reason)
            return None
        host = display.listen if _concrete(display.listen) else fallback
        problem = display_problem(uri, host)
        if problem:
            log.warning("refused the console of %s on %s: %s", name, node.fqdn, problem)
            return None
        log.info("console of %s: display at %s port %s on %s", name, host, display.port, node.fqdn)
        return host, display.port

    def node_uri(self, node: Node) -> str:
        """As the API reaches the node: its own URI or the configured template."""
        uri = node.libvirt_uri or self.settings["LIBVIRT_URI_TEMPLATE"].format(fqdn=node.fqdn)
        validate_libvirt_uri(uri, self.policy)  # a row stored before the rules: refused
        return uri


def _concrete(listen: str | None) -> bool:
    """An address to connect to (not a wildcard such as 0.0.0.0)."""
    try:
        return listen is not None and not ipaddress.ip_address(listen).is_unspecified
    except ValueError:
        return False
