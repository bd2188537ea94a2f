"""The audit trail, written in the same transaction as the change it records.

Every ORM insert, update and delete of an audited model is collected after each flush
(with the fields' values before and after, from the session's own attribute history)
and written as :class:`~vmapi.models.Event` rows just before the transaction commits,
so a change and its record are committed together or not at all. Changes made with a
bulk SQL statement (an address handed to an interface) are recorded by the code that
makes them, with :func:`record`. Bookkeeping that is not a change anyone asked for —
a node's allocated and free capacity, idempotency keys, the events themselves — is not
recorded. Secrets (a token's hash) never are; a guest's SSH keys and user data are
recorded as what answers show of them (:data:`REDACTED`: fingerprints, a flag).

A request that fails leaves no change (its transaction is rolled back) and gets one
event of its own, written after the rollback, with the error id as the outcome
(:func:`record_failure`).
"""

from __future__ import annotations

import getpass
import logging
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from flask import g, has_request_context
from flask_sqlalchemy.session import Session
from sqlalchemy import event, insert, inspect, select

from vmapi.extensions import db
from vmapi.guest_inputs import ssh_key_fingerprints
from vmapi.models import (
    ConsoleToken,
    Event,
    IdempotencyKey,
    Image,
    Leftover,
    NodeStorageAccess,
    SecurityGroup,
    SecurityGroupRule,
    ServerGroup,
    Vm,
)

log = logging.getLogger(__name__)

PENDING = "vmapi.audit.pending"
#: Models whose rows are not changes anyone asked for (a console request is recorded as
#: the VM's ``console`` action by vmapi.services.consoles.sessions, without the token's hash; a
#: leftover is the bookkeeping of a move, recorded as the VM's ``migrate`` or
#: ``evacuate``; whether a node reaches a Ceph cluster is what node check observed).
NOT_AUDITED = (Event, IdempotencyKey, ConsoleToken, Leftover, NodeStorageAccess)
#: Columns never written to the trail, by model; and bookkeeping columns of a node
#: that every claim changes (the claim itself is recorded as the VM's create or resize).
SECRET = {"api_token": {"token_hash"}, "console_token": {"token_hash"}}
BOOKKEEPING = {
    "node": {
        "allocated_cores",
        "allocated_ram",
        "free_cores",
        "free_ram",
        # the HA watcher's count of misses and its clock (ha_state is recorded)
        "ha_misses",
        "ha_since",
    },
    # where the node keeps a VM's console log: recorded when its domain is defined
    "vm": {"console_log_pool", "console_log_path"},
}
#: Write-only columns, by model: recorded under another name as what answers show of them.
REDACTED: dict[str, dict[str, tuple[str, Callable[[Any], Any]]]] = {
    "vm": {
        "ssh_keys": ("ssh_key_fingerprints", lambda keys: ssh_key_fingerprints(keys or [])),
        "user_data": ("user_data_set", bool),
    }
}
#: URL names of resources whose table is named otherwise.
RESOURCE_NAMES = {"ipv4_address": "ipv4", "ipv6_address": "ipv6", "api_token": "token"}


def resource_of(table: str) -> str:
    return RESOURCE_NAMES.get(table, table)


def plain(value: Any) -> Any:
    """A column value as JSON can hold it."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


def _hidden(table: str) -> set[str]:
    return SECRET.get(table, set()) | BOOKKEEPING.get(table, set())


def _recorded(table: str, key: str, value: Any) -> tuple[str, Any]:
    """A column's name and value as the trail records them."""
    redacted = REDACTED.get(table, {}).get(key)
    if redacted is not None:
        name, shown = redacted
        return name, shown(value)
    return key, plain(value)


def _values(obj: Any) -> dict[str, Any]:
    """The loaded column values (never a lazy load inside a flush)."""
    state = inspect(obj)
    table = obj.__table__.name
    hidden = _hidden(table)
    return dict(
        _recorded(table, attr.key, state.dict[attr.key])
        for attr in state.mapper.column_attrs
        if attr.key in state.dict and attr.key not in hidden
    )


def _changes(obj: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    state = inspect(obj)
    table = obj.__table__.name
    hidden = _hidden(table)
    before, after = {}, {}
    for attr in state.mapper.column_attrs:
        if attr.key in hidden:
            continue
        history = state.attrs[attr.key].history
        if not history.has_changes():
            continue
        old = history.deleted[0] if history.deleted else None
        new = history.added[0] if history.added else None
        if old != new:  # (compared before redaction: new user data is a change too)
            name, shown_old = _recorded(table, attr.key, old)
            before[name], after[name] = shown_old, _recorded(table, attr.key, new)[1]
    return before, after


def _owner(obj: Any) -> tuple[int | None, int | None, int | None]:
    """(customer id, VM id whose customer owns it, security group id whose customer owns
    it) as far as the object itself says."""
    if isinstance(obj, Vm | Image | SecurityGroup | ServerGroup):
        return obj.__dict__.get("customer_id"), None, None
    if isinstance(obj, SecurityGroupRule):
        return None, None, obj.__dict__.get("security_group_id")
    return None, obj.__dict__.get("vm_id") if hasattr(type(obj), "vm_id") else None, None


def record(
    session: Any,
    resource: str,
    object_id: int | None,
    action: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    *,
    vm_id: int | None = None,
    customer_id: int | None = None,
    security_group_id: int | None = None,
    outcome: str = "ok",
) -> None:
    """Queue an event for the current transaction (for changes made in bulk SQL, and what
    happened to a node outside any request: its fencing). Its customer: ``customer_id``,
    else the customer of ``vm_id`` or of ``security_group_id``; ``outcome``: ``ok``, or
    what went wrong."""
    session.info.setdefault(PENDING, []).append(
        {
            "resource": resource,
            "object_id": object_id,
            "action": action,
            "before": before,
            "after": after,
            "customer_id": customer_id,
            "vm_id": vm_id,
            "security_group_id": security_group_id,
            "outcome": outcome,
        }
    )


def created(session: Any, obj: Any) -> None:
    """Queue the create event of a row inserted by a Core statement that returned it (the
    flush that records ORM inserts never saw it), with the values a flush would record."""
    _queue(session, obj, "create", None, _values(obj))


def _queue(session: Any, obj: Any, action: str, before: Any, after: Any) -> None:
    customer, vm, group = _owner(obj)
    record(session, resource_of(obj.__table__.name), obj.id, action, before, after,
           vm_id=vm, customer_id=customer, security_group_id=group)  # fmt: skip


@event.listens_for(Session, "after_flush")
def _collect(session: Any, flush_context: Any) -> None:
    """What this flush wrote; the session still shows it as new, dirty and deleted, with
    the attributes' history."""
    for obj in session.new:
        if not isinstance(obj, NOT_AUDITED):
            _queue(session, obj, "create", None, _values(obj))
    for obj in session.dirty:
        if not isinstance(obj, NOT_AUDITED) and session.is_modified(obj):
            before, after = _changes(obj)
            if not (before or after):
                continue
            made = _created_here(session, obj)
            if made is not None:  # made in this transaction: one create, with final values
                made["after"].update(after)
            else:
                _queue(session, obj, "update", before, after)
    for obj in session.deleted:
        if not isinstance(obj, NOT_AUDITED):
            _queue(session, obj, "delete", _values(obj), None)


def _created_here(session: Any, obj: Any) -> dict[str, Any] | None:
    """The pending create event of ``obj`` if this transaction made it (e.g. a VM whose
    domain name is written once its id is known), so nobody sees a half-made row's event."""
    resource = resource_of(obj.__table__.name)
    for item in session.info.get(PENDING, ()):
        if (
            item["action"] == "create"
            and item["resource"] == resource
            and item["object_id"] == obj.id
        ):
            return item
    return None


@event.listens_for(Session, "before_commit")
def _write(session: Any) -> None:
    if session.info.get(PENDING) is None and not (session.new or session.dirty or session.deleted):
        return
    session.flush()  # so what commit would flush is collected too
    pending = session.info.pop(PENDING, None)
    if not pending:
        return
    actor, token_id, request_id = who()
    now = datetime.now(UTC)
    owners = _owners(session, pending, "vm", Vm)
    group_owners = _owners(session, pending, "security_group", SecurityGroup)
    rows = []
    for item in pending:
        customer = item["customer_id"]
        if customer is None and item["vm_id"] is not None:
            customer = owners.get(item["vm_id"])
        if customer is None and item["security_group_id"] is not None:
            customer = group_owners.get(item["security_group_id"])
        rows.append(
            {
                "at": now,
                "request_id": request_id,
                "actor": actor,
                "token_id": token_id,
                "customer_id": customer,
                "resource": item["resource"],
                "object_id": item["object_id"],
                "action": item["action"],
                "before": item["before"],
                "after": item["after"],
                "outcome": item["outcome"],
            }
        )
    # one multi-row INSERT in this transaction (no ORM objects: cheaper, and no flush
    # of its own to collect)
    session.execute(insert(Event), rows)


@event.listens_for(Session, "after_rollback")
def _forget(session: Any) -> None:
    session.info.pop(PENDING, None)


def _owners(
    session: Any, pending: list[dict[str, Any]], resource: str, model: Any
) -> dict[int, int | None]:
    """Customer of each VM (or security group) the events mention by ``<resource>_id``:
    from the database, or from the object's own delete event when it went in the same
    transaction (a group deleted with its rules)."""
    owners: dict[int, int | None] = {}
    for item in pending:
        if item["resource"] == resource and item["object_id"] is not None:
            values = item["after"] or item["before"] or {}
            if "customer_id" in values:
                owners[item["object_id"]] = values["customer_id"]
    key = f"{resource}_id"
    wanted = {i[key] for i in pending if i[key] is not None} - set(owners)
    if wanted:
        with session.no_autoflush:
            rows = session.execute(select(model.id, model.customer_id).where(model.id.in_(wanted)))
            owners.update(dict(rows.all()))
    return owners


def who() -> tuple[str, int | None, str | None]:
    """(actor, token id, request id): the request's token, or the CLI's user."""
    if has_request_context():
        principal = g.get("principal")
        if principal is not None:
            return principal.name, principal.token_id, g.get("request_id")
        return "anonymous", None, g.get("request_id")
    try:
        user = getpass.getuser()
    except Exception:  # no name for this uid (a container)
        user = "unknown"
    return f"cli:{user}", None, None


def record_failure(
    resource: str, object_id: int | None, action: str, error_id: str, status: int
) -> None:
    """One event for a refused or failed change, in a transaction of its own (the change
    itself was rolled back). Never fails the answer: a database that cannot take the
    event is logged."""
    actor, token_id, request_id = who()
    try:
        db.session.rollback()
        db.session.add(
            Event(
                at=datetime.now(UTC),
                request_id=request_id,
                actor=actor,
                token_id=token_id,
                customer_id=_customer_of(resource, object_id),
                resource=resource,
                object_id=object_id,
                action=action,
                outcome=error_id,
                status=status,
            )
        )
        db.session.commit()
    except Exception:
        db.session.rollback()
        log.exception("could not record a failed %s of %s %s", action, resource, object_id)


def _customer_of(resource: str, object_id: int | None) -> int | None:
    """The owner of a failed change's target, so its customer sees the refusal too."""
    if has_request_context():
        principal = g.get("principal")
        if principal is not None and not principal.is_admin:
            return principal.customer_id
    if resource == "vm" and object_id is not None:
        return db.session.scalar(select(Vm.customer_id).where(Vm.id == object_id))
    if resource == "image" and object_id is not None:
        return db.session.scalar(select(Image.customer_id).where(Image.id == object_id))
    if resource == "security_group" and object_id is not None:
        return db.session.scalar(
            select(SecurityGroup.customer_id).where(SecurityGroup.id == object_id)
        )
    if resource == "server_group" and object_id is not None:
        return db.session.scalar(select(ServerGroup.customer_id).where(ServerGroup.id == object_id))
    if resource == "security_group_rule" and object_id is not None:
        return db.session.scalar(
            select(SecurityGroup.customer_id)
            .join(SecurityGroupRule, SecurityGroupRule.security_group_id == SecurityGroup.id)
            .where(SecurityGroupRule.id == object_id)
        )
    return None
