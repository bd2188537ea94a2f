"""Schemas of /interface, /ipv4, /ipv6, /ipv6_pool and /vlan."""

from __future__ import annotations

import ipaddress
from typing import Any

from marshmallow import ValidationError, validate, validates_schema

from vmapi.addressing import MIN_RANGE_PREFIX, network_problems
from vmapi.schemas.base import (
    IPV4_PATTERN,
    IPV6_PATTERN,
    BaseSchema,
    Bool,
    Int,
    Ref,
    RefList,
    Str,
    address_validator,
    json_schema,
    prefix_pattern,
)


def _network(version: int, shortest: int = 0, longest: int | None = None):
    """A network of one IP family with its prefix and no host bits set, its prefix from
    ``shortest`` to ``longest``."""
    longest = (32 if version == 4 else 128) if longest is None else longest
    address = IPV4_PATTERN if version == 4 else IPV6_PATTERN
    example = "198.51.100.0/24" if version == 4 else "2001:db8:1::/64"

    @json_schema(
        pattern=f"^{address}/{prefix_pattern(shortest, longest)}$",
        description=f"A network with no host bits set, e.g. {example}.",
    )
    def check(value: str) -> None:
        _address, slash, prefix = value.rpartition("/")
        try:
            if not (slash and prefix.isascii() and prefix.isdigit()):
                raise ValueError(value)
            loose = ipaddress.ip_network(value, strict=False)
        except ValueError:
            loose = None
        if loose is None or loose.version != version:
            raise ValidationError(
                f"Not a valid IPv{version} network with its prefix, e.g. {example}."
            )
        if loose.network_address != ipaddress.ip_interface(value).ip:
            raise ValidationError(f"Has host bits set: the network is {loose}.")
        if not shortest <= loose.prefixlen <= longest:
            raise ValidationError(f"Use a prefix from /{shortest} to /{longest}.")

    return check


#: what the OpenAPI document says of a gateway (no JSON Schema can)
GATEWAY = (
    "Inside the address's network (or the POSTed network), and not the address itself; an "
    "IPv4 address is not its network's network or broadcast address."
)


class VlanSchema(BaseSchema):
    id = Int(dump_only=True)
    tag = Int(required=True, validate=validate.Range(min=1, max=4094))


class InterfaceSchema(BaseSchema):
    id = Int(dump_only=True)
    vm = Ref("vm", attribute="vm_id", dump_only=True)
    mac = Str(dump_only=True)
    #: admins move an interface to other free addresses (UPDATE); the old are released
    ipv4 = RefList("ipv4", writable=True)
    ipv6 = RefList("ipv6", writable=True)
    vlan = Ref("vlan", attribute="vlan_id", allow_none=True)
    #: the groups whose rules filter its traffic (API.md "Network protection"): the VM
    #: owner's groups, or admin groups; none: ingress unfiltered
    security_groups = RefList(
        "security_group",
        writable=True,
        metadata={"description": "Security groups of the VM's customer, or admin groups "
                  "(customer_id null); the list replaces the interface's groups."},
    )  # fmt: skip
    spoof_guard = Bool(
        metadata={"description": "The guest may send only from this interface's MAC and "
                  "addresses (default true); admins may turn it off for an appliance that "
                  "routes others' traffic."},
    )  # fmt: skip


class _AddressSchema(BaseSchema):
    """An address (with prefix and gateway), or on POST a whole ``network``."""

    #: the fields a POST body holds: one of these sets, all of it (for the OpenAPI document)
    SHAPES = (("address", "prefix", "gateway"), ("network", "gateway"))

    @validates_schema
    def check_shape(self, data: dict[str, Any], partial: Any = None, **kwargs: Any) -> None:
        if "network" in data:
            extra = [k for k in ("address", "prefix") if k in data]
            if extra or "gateway" not in data:
                raise ValidationError(
                    "Send either {address, prefix, gateway} or {network, gateway}.",
                    field_name="network",
                )
            net = ipaddress.ip_network(data["network"])
            if ipaddress.ip_address(data["gateway"]) not in net:
                raise ValidationError({"gateway": [f"Must be inside {net}."]})
            return
        if partial:
            return
        missing = [k for k in ("address", "prefix", "gateway") if k not in data]
        if missing:
            raise ValidationError({k: ["Missing data for required field."] for k in missing})
        problems = network_problems(data["address"], data["prefix"], data["gateway"])
        if problems:
            raise ValidationError(problems)


class Ipv4Schema(_AddressSchema):
    id = Int(dump_only=True)
    address = Str(validate=address_validator(4, canonical=True))
    prefix = Int(validate=validate.Range(min=0, max=32))
    gateway = Str(validate=address_validator(4, canonical=True), metadata={"description": GATEWAY})
    #: POST only: every host address of the network at once
    network = Str(load_only=True, validate=_network(4, shortest=MIN_RANGE_PREFIX),
                  metadata={"on_update": False})  # fmt: skip
    interface = Ref("interface", attribute="interface_id", dump_only=True, allow_none=True)


class Ipv6Schema(_AddressSchema):
    id = Int(dump_only=True)
    address = Str(validate=address_validator(6, canonical=True))
    prefix = Int(validate=validate.Range(min=0, max=128))
    gateway = Str(validate=address_validator(6, canonical=True), metadata={"description": GATEWAY})
    interface = Ref("interface", attribute="interface_id", dump_only=True, allow_none=True)
    pool = Ref("ipv6_pool", attribute="pool_id", dump_only=True, allow_none=True)


class Ipv6PoolSchema(BaseSchema):
    id = Int(dump_only=True)
    network = Str(required=True, validate=_network(6, longest=126))
    gateway = Str(
        required=True,
        validate=address_validator(6, canonical=True),
        metadata={"description": "Inside the network."},
    )
    prefix = Int(dump_only=True)
    next_host = Int(dump_only=True)
    size = Int(dump_only=True)

    @validates_schema
    def check_gateway(self, data: dict[str, Any], **kwargs: Any) -> None:
        if "network" in data and "gateway" in data:
            net = ipaddress.ip_network(data["network"])
            if ipaddress.ip_address(data["gateway"]) not in net:
                raise ValidationError({"gateway": [f"Must be inside {net}."]})
