"""The address pools admins fill: /ipv4 (addresses or whole networks), /ipv6, /ipv6_pool.

Customers read only the addresses of their own VMs' interfaces. An address that an
interface holds cannot be deleted or renumbered (409 ``<resource>/in_use``).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from sqlalchemy import insert, select

from vmapi import error_ids
from vmapi.addressing import MAX_RANGE, network_problems
from vmapi.auth import Principal
from vmapi.error_ids import IPV4_OVERLAP, IPV6_OVERLAP, IPV6_POOL_OVERLAP
from vmapi.errors import Conflict, ValidationError, at_index
from vmapi.extensions import db
from vmapi.models import Ipv4Address, Ipv6Address, Ipv6Pool
from vmapi.services.crud import CrudService, Outcome
from vmapi.services.ownership import own_interfaces

POOL_SIZE_CAP = 2**62  # host numbers a pool may hand out (keeps next_host in a bigint)
CHUNK = 1000


class AddressService(CrudService):
    """Single addresses; held ones are protected."""

    def customer_scope(self, stmt, customer_id: int | None):
        return stmt.where(self.model.interface_id.in_(own_interfaces(customer_id)))

    def update(self, obj, data: dict[str, Any], principal: Principal):
        if "network" in data:
            raise ValidationError(data={"network": ["Only POST takes a network."]})
        if obj.interface_id is not None and "address" in data and data["address"] != obj.address:
            raise self.held(obj)
        merged = {k: data.get(k, getattr(obj, k)) for k in ("address", "prefix", "gateway")}
        problems = network_problems(**merged)
        if problems:
            raise ValidationError(data=problems)
        return super().update(obj, data, principal)

    def delete(self, obj, principal: Principal, options: dict[str, Any]) -> None:
        if obj.interface_id is not None:
            raise self.held(obj)
        super().delete(obj, principal, options)

    def held(self, obj) -> Conflict:
        return Conflict(
            f"{obj.address} is held by interface {obj.interface_id}; delete its VM first.",
            error_id=error_ids.in_use(self.resource),
            data={"interface": [obj.interface_id]},
        )

    def existing(self, addresses: list[str]) -> list[str]:
        found = []
        for start in range(0, len(addresses), CHUNK):
            chunk = addresses[start : start + CHUNK]
            stmt = select(self.model.address).where(self.model.address.in_(chunk))
            found += list(db.session.scalars(stmt))
        return sorted(found, key=ipaddress.ip_address)


class Ipv4Service(AddressService):
    def __init__(self) -> None:
        super().__init__(Ipv4Address, "ipv4")

    def create_all(
        self, items: list[dict[str, Any]], principal: Principal, indexed: bool
    ) -> Outcome:
        if not any("network" in item for item in items):
            return super().create_all(items, principal, indexed)
        ids: list[int] = []
        try:
            for index, item in enumerate(items):
                with at_index(index if indexed else None):
                    ids += (
                        self.add_network(item)
                        if "network" in item
                        else [self.create(item, principal).id]
                    )
            db.session.commit()
        except BaseException:
            db.session.rollback()
            raise
        objs = list(db.session.scalars(select(Ipv4Address).where(Ipv4Address.id.in_(ids))))
        return Outcome(sorted(objs, key=lambda o: o.id), keyed=True)

    def registered(self, item: dict[str, Any]) -> bool:
        """Whether ``add_network(item)`` has been done already: every host address of the
        network but the gateway is in the table (``flask vmapi network add --if-missing``)."""
        net = ipaddress.IPv4Network(item["network"])
        hosts = [str(h) for h in net.hosts() if str(h) != item["gateway"]]
        return len(self.existing(hosts)) == len(hosts)

    def add_network(self, item: dict[str, Any]) -> list[int]:
        """Every host address of the network except the gateway."""
        net = ipaddress.IPv4Network(item["network"])
        hosts = [str(h) for h in net.hosts() if str(h) != item["gateway"]]
        if len(hosts) > MAX_RANGE:
            raise ValidationError(
                data={"network": [f"Adds {len(hosts)} addresses; at most {MAX_RANGE} at once."]}
            )
        clash = self.existing(hosts)
        if clash:
            raise Conflict(
                f"{net} overlaps {len(clash)} address(es) already in the pool, e.g. {clash[0]}.",
                error_id=IPV4_OVERLAP,
                data={"addresses": clash[:20], "count": len(clash)},
            )
        rows = [{"address": h, "prefix": net.prefixlen, "gateway": item["gateway"]} for h in hosts]
        if not rows:
            return []
        return list(db.session.scalars(insert(Ipv4Address).returning(Ipv4Address.id), rows))


class Ipv6Service(AddressService):
    def __init__(self) -> None:
        super().__init__(Ipv6Address, "ipv6")

    def create(self, data: dict[str, Any], principal: Principal):
        if "network" in data:  # the API layer sends networks to /ipv6_pool
            raise ValidationError(data={"network": ["Register networks with /ipv6_pool."]})
        inside = pool_containing(ipaddress.IPv6Address(data["address"]))
        if inside is not None:
            raise Conflict(
                f"{data['address']} lies in pool {inside.network}, which hands it out itself.",
                error_id=IPV6_OVERLAP,
                data={"ipv6_pool": {"id": inside.id}},
            )
        return super().create(data, principal)


def pool_containing(address: ipaddress.IPv6Address) -> Ipv6Pool | None:
    for pool in db.session.scalars(select(Ipv6Pool)):
        if address in ipaddress.IPv6Network(pool.network):
            return pool
    return None


class Ipv6PoolService(CrudService):
    """IPv6 networks that hand out addresses on demand (a /64 is never enumerated)."""

    def __init__(self) -> None:
        super().__init__(Ipv6Pool, "ipv6_pool")

    def create(self, data: dict[str, Any], principal: Principal) -> Ipv6Pool:
        net = ipaddress.IPv6Network(data["network"])
        for pool in db.session.scalars(select(Ipv6Pool)):
            if net.overlaps(ipaddress.IPv6Network(pool.network)):
                raise Conflict(
                    f"{net} overlaps pool {pool.network}.",
                    error_id=IPV6_POOL_OVERLAP,
                    data={"ipv6_pool": {"id": pool.id}},
                )
        manual = select(Ipv6Address.address).where(Ipv6Address.pool_id.is_(None))
        inside = [a for a in db.session.scalars(manual) if ipaddress.IPv6Address(a) in net]
        if inside:
            raise Conflict(
                f"{net} contains addresses added one by one, e.g. {inside[0]}.",
                error_id=IPV6_POOL_OVERLAP,
                data={"addresses": inside[:20]},
            )
        size = min(net.num_addresses, POOL_SIZE_CAP)
        data = {**data, "network": str(net), "prefix": net.prefixlen, "size": size, "next_host": 1}
        return super().create(data, principal)

    def registered(self, item: dict[str, Any]) -> bool:
        """Whether a pool of exactly this network exists (``network add --if-missing``)."""
        net = str(ipaddress.IPv6Network(item["network"]))
        return db.session.scalar(select(Ipv6Pool.id).where(Ipv6Pool.network == net)) is not None

    def delete(self, obj: Ipv6Pool, principal: Principal, options: dict[str, Any]) -> None:
        held = db.session.scalars(
            select(Ipv6Address.id)
            .where(Ipv6Address.pool_id == obj.id, Ipv6Address.interface_id.is_not(None))
            .limit(100)
        ).all()
        if held:
            raise Conflict(
                f"Pool {obj.network} has addresses held by interfaces.",
                error_id=error_ids.in_use(self.resource),
                data={"ipv6": list(held)},
            )
        for row in db.session.scalars(select(Ipv6Address).where(Ipv6Address.pool_id == obj.id)):
            db.session.delete(row)
        db.session.flush()
        super().delete(obj, principal, options)
