"""Interfaces and address allocation for VMs.

Every allocation is one statement that takes the lowest free row and marks it held:

    UPDATE ipv4_address SET interface_id = :iface
    WHERE id = (SELECT id FROM ipv4_address WHERE interface_id IS NULL
                ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
      AND interface_id IS NULL
    RETURNING id

``SKIP LOCKED`` lets concurrent creates take different rows instead of queueing on one
(PostgreSQL); SQLite serializes writers and ignores the clause. It runs in the same
transaction as the capacity claim, so running out of addresses undoes the claim too.
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from vmapi.error_ids import (
    INTERFACE_ADDRESS_TAKEN,
    VM_NO_FREE_IPV4,
    VM_NO_FREE_IPV6,
    VM_NO_FREE_MAC,
)
from vmapi.errors import Conflict
from vmapi.extensions import db
from vmapi.models import (
    Interface,
    InterfaceSecurityGroup,
    Ipv4Address,
    Ipv6Address,
    Ipv6Pool,
    Vm,
)
from vmapi.services import audit
from vmapi.services.names import interface_device_suffix

#: INSERT ... ON CONFLICT DO NOTHING, by dialect (both support it; core insert does not)
INSERT_OR_SKIP = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}

MAC_PREFIX = "52:54:00"
MAC_ATTEMPTS = 8


def random_mac() -> str:
    return MAC_PREFIX + "".join(f":{b:02x}" for b in secrets.token_bytes(3))


def insert_interface(vm: Vm) -> Interface:
    """The VM's new interface, with a MAC in the locally administered 52:54:00 range
    that no interface has: one INSERT that skips a MAC already taken (unique index),
    tried again with another (was a SELECT for the MAC, then the INSERT)."""
    insert = INSERT_OR_SKIP[db.engine.dialect.name]
    for _ in range(MAC_ATTEMPTS):
        mac = random_mac()
        stmt = (
            insert(Interface)
            .values(vm_id=vm.id, mac=mac, device_suffix=interface_device_suffix(mac))
            .on_conflict_do_nothing(index_elements=["mac"])
            .returning(Interface)
        )
        interface = db.session.scalars(stmt).first()
        if interface is not None:
            audit.created(db.session, interface)
            return interface
    raise Conflict("No free MAC address was found; retry the request.", error_id=VM_NO_FREE_MAC)


@dataclass(frozen=True)
class Held:
    """An address just handed to an interface, as the domain's definition needs it."""

    address: str
    prefix: int
    gateway: str | None


@dataclass(frozen=True)
class NewInterface:
    """An interface made for a new VM with the addresses it holds: the domain is defined
    from these, without reading them back."""

    row: Interface
    ipv4: Held
    ipv6: Held


def _hand_out(model: type, which: Any, interface_id: int) -> Held | None:
    """Give the free address ``which`` (an id, or a subquery picking one) to the interface;
    the address, or None when it was not free any more."""
    stmt = (
        update(model)
        .where(model.id == which, model.interface_id.is_(None))
        .values(interface_id=interface_id)
        .returning(model.id, model.address, model.prefix, model.gateway)
        .execution_options(synchronize_session=False)
    )
    taken = db.session.execute(stmt).first()
    if taken is None:
        return None
    audit.record(db.session, audit.resource_of(model.__tablename__), taken.id, "update",
                 {"interface_id": None}, {"interface_id": interface_id})  # fmt: skip
    return Held(taken.address, taken.prefix, taken.gateway)


def _take_free(model: type, interface_id: int) -> Held | None:
    free = (
        select(model.id)
        .where(model.interface_id.is_(None))
        .order_by(model.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return _hand_out(model, free, interface_id)


def allocate_ipv4(interface_id: int) -> Held:
    """Hold the lowest free IPv4 address for the interface; 409 when there is none."""
    taken = _take_free(Ipv4Address, interface_id)
    if taken is None:
        raise Conflict(
            "No free IPv4 address is left; add addresses with POST /api/v1/ipv4.",
            error_id=VM_NO_FREE_IPV4,
        )
    return taken


def allocate_ipv6(interface_id: int) -> Held:
    """Hold a free IPv6 address (a released one first), else the next one of a pool.

    A pool is one counter row that every create needs. On PostgreSQL the next address is
    made in a transaction of its own (count up, insert the address free, commit: the
    pool's row is locked for that moment only, not for the rest of the create), then
    handed out in the create's transaction like any free address. Should the create
    fail, the address stays free for the next one: nothing leaks. SQLite has one writer
    at a time, so there it is all one transaction.
    """
    while True:
        taken = _take_free(Ipv6Address, interface_id)
        if taken is not None:
            return taken
        dialect = db.engine.dialect.name
        if dialect == "postgresql":
            with db.engine.begin() as conn:
                made = _next_pool_address(conn, dialect)
        else:
            made = _next_pool_address(db.session, dialect)
        taken = _hand_out(Ipv6Address, made, interface_id)
        if taken is not None:
            return taken
        # a concurrent create took the new address as a free one first: take another


def make_free_ipv6(count: int) -> None:
    """Make sure ``count`` free IPv6 addresses exist, counting the pools up once for all
    of them (PostgreSQL, a transaction of its own, like :func:`allocate_ipv6`'s): an
    array's VMs then take them as they take released addresses, instead of counting a
    pool up in a transaction per VM. Only a shortcut: what it cannot make (pools run
    out) each VM's :func:`allocate_ipv6` still tries, and refuses at that element; what
    the array does not use stays free for the next create."""
    if count < 2 or db.engine.dialect.name != "postgresql":
        return
    with db.engine.begin() as conn:
        free = select(Ipv6Address.id).where(Ipv6Address.interface_id.is_(None)).limit(count)
        have = conn.execute(select(func.count()).select_from(free.subquery())).scalar_one()
        wanted = count - have
        while wanted > 0:
            pool = conn.execute(
                select(Ipv6Pool)
                .where(Ipv6Pool.next_host < Ipv6Pool.size)
                .order_by(Ipv6Pool.id)
                .limit(1)
                .with_for_update()
            ).first()
            if pool is None:
                return
            first, end = pool.next_host, min(pool.next_host + wanted, pool.size)
            conn.execute(update(Ipv6Pool).where(Ipv6Pool.id == pool.id).values(next_host=end))
            network = ipaddress.IPv6Network(pool.network)
            rows = [
                {"address": address, "prefix": network.prefixlen, "gateway": pool.gateway,
                 "interface_id": None, "pool_id": pool.id}
                for host in range(first, end)
                if (address := str(network.network_address + host)) != pool.gateway
            ]  # fmt: skip
            if rows:
                made = conn.execute(
                    INSERT_OR_SKIP["postgresql"](Ipv6Address)
                    .values(rows)
                    .on_conflict_do_nothing(index_elements=["address"])
                    .returning(Ipv6Address.id)
                ).all()
                wanted -= len(made)


def _next_pool_address(conn: Any, dialect: str) -> int:
    """Count a pool up and insert its next address, free; the new row's id."""
    while True:
        # No SKIP LOCKED here: a pool is one counter row, and skipping it while another
        # create holds it would wrongly find no pool. PostgreSQL re-checks next_host < size
        # on the row it waited for.
        pick = (
            select(Ipv6Pool.id)
            .where(Ipv6Pool.next_host < Ipv6Pool.size)
            .order_by(Ipv6Pool.id)
            .limit(1)
            .with_for_update()
            .scalar_subquery()
        )
        row = conn.execute(
            update(Ipv6Pool)
            .where(Ipv6Pool.id == pick, Ipv6Pool.next_host < Ipv6Pool.size)
            .values(next_host=Ipv6Pool.next_host + 1)
            .returning(Ipv6Pool.id, Ipv6Pool.network, Ipv6Pool.gateway, Ipv6Pool.next_host)
            .execution_options(synchronize_session=False)
        ).first()
        if row is None:
            raise Conflict(
                "No free IPv6 address is left; add a pool with POST /api/v1/ipv6.",
                error_id=VM_NO_FREE_IPV6,
            )
        network = ipaddress.IPv6Network(row.network)
        address = str(network.network_address + (row.next_host - 1))
        if address == row.gateway:
            continue
        insert = INSERT_OR_SKIP[dialect]
        made = conn.execute(
            insert(Ipv6Address)
            .values(address=address, prefix=network.prefixlen, gateway=row.gateway,
                    interface_id=None, pool_id=row.id)
            .on_conflict_do_nothing(index_elements=["address"])
            .returning(Ipv6Address.id)
        ).scalar()  # fmt: skip
        if made is not None:
            return made
        # an address an admin added by hand: count on


def add_interface(vm: Vm) -> NewInterface:
    """One NIC with a new MAC, one free IPv4 and one free IPv6 address (in the caller's
    transaction: a 409 for want of addresses rolls everything back)."""
    interface = insert_interface(vm)
    return NewInterface(interface, allocate_ipv4(interface.id), allocate_ipv6(interface.id))


def release_interfaces(vm_id: int) -> None:
    """Free the VM's addresses, take its interfaces out of their security groups (the
    groups stay) and delete the interfaces (once its domain is gone)."""
    ids = select(Interface.id).where(Interface.vm_id == vm_id).scalar_subquery()
    for model in (Ipv4Address, Ipv6Address):
        held = db.session.execute(
            select(model.id, model.interface_id).where(model.interface_id.in_(ids))
        ).all()
        if not held:
            continue
        db.session.execute(
            update(model)
            .where(model.id.in_([address_id for address_id, _ in held]))
            .values(interface_id=None)
            .execution_options(synchronize_session=False)
        )
        for address_id, interface_id in held:
            audit.record(db.session, audit.resource_of(model.__tablename__), address_id, "update",
                         {"interface_id": interface_id}, {"interface_id": None})  # fmt: skip
    db.session.execute(
        delete(InterfaceSecurityGroup)
        .where(InterfaceSecurityGroup.interface_id.in_(ids))
        .execution_options(synchronize_session=False)
    )
    db.session.execute(
        delete(Interface)
        .where(Interface.vm_id == vm_id)
        .execution_options(synchronize_session=False)
    )


#: The address models by the /interface field that lists them.
FAMILIES = {"ipv4": Ipv4Address, "ipv6": Ipv6Address}


def held_addresses(interface_id: int) -> dict[str, list[int]]:
    """The ids of the addresses the interface holds, by family, in id order."""
    return {
        family: list(db.session.scalars(
            select(model.id).where(model.interface_id == interface_id).order_by(model.id)
        ))
        for family, model in FAMILIES.items()
    }  # fmt: skip


def move_addresses(interface_id: int, wanted: dict[str, list[int]]) -> dict[str, list[int]]:
    """Give the interface exactly the ``wanted`` addresses of each family named (free
    ones, or its own), releasing the others it holds, in the caller's transaction; the
    ids it held before, by family. 409 ``interface/address_taken`` naming the addresses
    another interface holds (each is taken with the same conditional statement as an
    allocation, so two requests never get one address)."""
    before = held_addresses(interface_id)
    taken: dict[str, list[dict[str, int]]] = {}
    for family, ids in wanted.items():
        model = FAMILIES[family]
        gone = [ident for ident in before[family] if ident not in ids]
        if gone:
            db.session.execute(
                update(model)
                .where(model.id.in_(gone), model.interface_id == interface_id)
                .values(interface_id=None)
                .execution_options(synchronize_session=False)
            )
            for address_id in gone:
                audit.record(db.session, family, address_id, "update",
                             {"interface_id": interface_id}, {"interface_id": None})  # fmt: skip
        for ident in ids:
            if ident not in before[family] and _hand_out(model, ident, interface_id) is None:
                taken.setdefault(family, []).append({"id": ident})
    if taken:
        raise Conflict(
            "These addresses are held by another interface: "
            + "; ".join(f"{family} {[ref['id'] for ref in refs]}" for family, refs in taken.items())
            + ". Give free ones.",
            error_id=INTERFACE_ADDRESS_TAKEN,
            data=taken,
        )
    return {family: before[family] for family in wanted}
