"""Blueprints of /interface, /ipv4, /ipv6, /ipv6_pool and /vlan.

Customers read the interfaces and addresses of their own VMs; everything else here is
for admins. ``POST /ipv6`` with a ``network`` registers a pool (API.md): it is handed to
/ipv6_pool and answers the pool.
"""

from __future__ import annotations

from flask import Response, g

from vmapi.api.resource import ADMIN_ONLY, ALL_ROLES, ResourceApi
from vmapi.auth import Principal, require_role
from vmapi.errors import ValidationError
from vmapi.models import Vlan
from vmapi.representations import parse_body
from vmapi.schemas.network import (
    InterfaceSchema,
    Ipv4Schema,
    Ipv6PoolSchema,
    Ipv6Schema,
    VlanSchema,
)
from vmapi.services.crud import CrudService
from vmapi.services.network.interfaces import InterfaceService
from vmapi.services.network.pools import Ipv4Service, Ipv6PoolService, Ipv6Service

interface = ResourceApi(
    "interface",
    InterfaceSchema,
    InterfaceService(),
    read_roles=ALL_ROLES,
    # customers set their own interfaces' security groups; the rest is for admins
    # (services/network/interfaces.py answers 403 for the other fields)
    write_roles=ALL_ROLES,
    summary="VM network interfaces (one is made with each VM): their security groups; "
    "admins set the VLAN, the addresses and the spoof guard.",
    collection_methods=["GET", "UPDATE", "PATCH"],
    item_methods=["GET", "UPDATE", "PATCH"],
)
ipv4 = ResourceApi(
    "ipv4",
    Ipv4Schema,
    Ipv4Service(),
    read_roles=ALL_ROLES,
    summary="IPv4 addresses; POST {network, gateway} adds every host address at once.",
)
ipv6_pool = ResourceApi(
    "ipv6_pool",
    Ipv6PoolSchema,
    Ipv6PoolService(),
    read_roles=ADMIN_ONLY,
    summary="IPv6 networks that hand out addresses on demand (also POST /ipv6 {network}).",
)


class Ipv6Api(ResourceApi):
    """/ipv6, where a POST of ``{network, gateway}`` registers an /ipv6_pool."""

    #: POST also takes that resource's objects (for the OpenAPI document)
    creates_also = "ipv6_pool"

    def create(self, who: Principal) -> Response:
        body = parse_body()
        items = body if isinstance(body, list) else [body]
        networks = [isinstance(i, dict) and "network" in i for i in items]
        if any(networks):
            if not all(networks):
                raise ValidationError("Send either addresses or networks in one request.")
            g.resource_name = ipv6_pool.name
            require_role(who, ipv6_pool.write_roles, "change ipv6_pool")
            return ipv6_pool.create(who)
        return super().create(who)


ipv6 = Ipv6Api(
    "ipv6",
    Ipv6Schema,
    Ipv6Service(),
    read_roles=ALL_ROLES,
    summary="IPv6 addresses: added one by one, or handed out from /ipv6_pool networks.",
)
vlan = ResourceApi(
    "vlan",
    VlanSchema,
    CrudService(Vlan, "vlan"),
    read_roles=ADMIN_ONLY,
    summary="VLANs (tag 1..4094) that interfaces can be put on.",
)
