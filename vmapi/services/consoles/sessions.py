"""Interactive consoles: a fresh display password and a short-lived token per request.

``POST /vm/<id>/console`` (API.md "Interactive console") sets a new random password on
the running domain's VNC display, valid until the token expires, and keeps the token's
SHA-256 with the VM and the expiry. The console proxy (:mod:`vmapi.console_proxy`, run by
websockify) resolves a token to the display when a browser connects; the browser's VNC
client then logs in with the password. Neither secret is stored in the clear, logged or
written to the audit trail: the answer is the only place they appear.

A display has one password at a time, so a new console for a VM ends the older tokens
of that VM (their password no longer opens it; sessions already open stay open).
Expired tokens are deleted whenever a console is opened, when the proxy meets one, and
by ``flask vmapi console purge`` (run by the shipped purge timer).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from flask import current_app
from sqlalchemy import delete

from vmapi.auth import Principal
from vmapi.displays import display_problem
from vmapi.error_ids import VM_NO_CONSOLE, VM_STATE_CONFLICT
from vmapi.errors import Conflict
from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError, NoDisplay, NotSupported, OperationInvalid
from vmapi.models import ConsoleToken
from vmapi.node_detail import NODE_DETAIL
from vmapi.services import audit
from vmapi.services.consoles.tokens import invalidate_console_tokens
from vmapi.services.locks import vm_locks
from vmapi.services.nodes.domains import hypervisor_failure, node_detail
from vmapi.services.nodes.hosts import Host, hypervisor
from vmapi.services.vms.rows import VmRows
from vmapi.services.vms.specs import console_address, display_password


@dataclass(frozen=True)
class Console:
    """What the caller is told, once: where to go, the token and the display password."""

    url: str
    token: str
    password: str
    expires_at: datetime


def open_console(ident: int, principal: Principal, base_url: str) -> Console:
    """A console for VM ``ident``; ``base_url`` is the API's own URL as the caller sees it
    (the shipped nginx site serves the console pages beside the API)."""
    config = current_app.config
    with vm_locks([ident]):
        vm = VmRows().get(ident, principal)  # a customer's own VMs only (else 404)
        host = Host.of(vm.node_id)
        problem = display_problem(host.uri, console_address(host.node, config))
        if problem:  # a URL that cannot work is no console (and no libvirt call is made)
            raise Conflict(
                f"vm-{vm.id} has no console the proxy can reach: the node's console_address "
                "is not reachable by the proxy.",
                error_id=VM_NO_CONSOLE,
                data={
                    "reason": "the node's console_address is not reachable by the proxy",
                    NODE_DETAIL: problem,
                },
            )
        # passwdValidTo has whole seconds: the token expires at the same second.
        now = datetime.now(UTC).replace(microsecond=0)
        expires_at = now + timedelta(seconds=int(config["CONSOLE_TTL"]))
        password = display_password()
        try:
            hypervisor().set_display_password(host.uri, vm.domain_name, password, expires_at)
        except (NoDisplay, NotSupported) as exc:
            reason = (
                "the domain has no display"
                if isinstance(exc, NoDisplay)
                else "display passwords are not supported by the node's hypervisor"
            )
            raise Conflict(
                f"vm-{vm.id} has no console display: {reason}. Domains defined before "
                "vmapi gave every VM one get it when they are next defined and started.",
                error_id=VM_NO_CONSOLE,
                data={"reason": reason, **node_detail(exc, host)},
            ) from exc
        except OperationInvalid as exc:
            raise Conflict(
                f"vm-{vm.id} is not running; start it to open its console.",
                error_id=VM_STATE_CONFLICT,
            ) from exc
        except HypervisorError as exc:
            raise hypervisor_failure(exc, "setting the display password", host) from exc
        # The password is set: if this commit fails, it opens nothing (nobody has it) and
        # expires on its own.
        token = secrets.token_urlsafe(32)
        purge_expired(now)
        invalidate_console_tokens(vm.id)
        row = ConsoleToken(
            vm_id=vm.id,
            token_hash=ConsoleToken.digest(token),
            created_at=now,
            expires_at=expires_at,
        )
        db.session.add(row)
        db.session.flush()
        audit.record(db.session, "vm", vm.id, "console", None,
                     {"console_token": row.id, "expires_at": expires_at.isoformat()},
                     customer_id=vm.customer_id)  # fmt: skip
        db.session.commit()
    url = config["CONSOLE_URL"].format(base=base_url, token=token, password=password)
    return Console(url=url, token=token, password=password, expires_at=expires_at)


def purge_expired(now: datetime | None = None) -> int:
    """Delete the expired tokens of every VM, in the caller's transaction."""
    moment = now or datetime.now(UTC)
    stmt = delete(ConsoleToken).where(ConsoleToken.expires_at <= moment)
    return db.session.execute(stmt.execution_options(synchronize_session=False)).rowcount


def purge_console_tokens() -> int:
    """``flask vmapi console purge``: delete the expired tokens; how many went."""
    deleted = purge_expired()
    db.session.commit()
    return deleted
