"""Strict field types: JSON's loose numbers never reach the database."""

import pytest
from marshmallow import ValidationError

from vmapi.schemas.base import Bool, Float, Int, Ref
from vmapi.schemas.catalog import NodeStateSchema
from vmapi.schemas.node import NodeSchema


@pytest.mark.parametrize(
    "value", [True, False, 1.0, 1.5, "1", None, [1], {"a": 1}, 2**63, -(2**63) - 1]
)
def test_int_rejects_non_integers_and_overflow(value):
    with pytest.raises(ValidationError):
        Int(required=True).deserialize(value)


def test_int_accepts_64_bit_edges():
    assert Int().deserialize(2**63 - 1) == 2**63 - 1
    assert Int().deserialize(-(2**63)) == -(2**63)


@pytest.mark.parametrize("value", [1, 0, "true", "yes", None])
def test_bool_only_true_false(value):
    with pytest.raises(ValidationError):
        Bool(required=True).deserialize(value)


@pytest.mark.parametrize("value", [True, "1.5", float("nan"), float("inf")])
def test_float_rejects(value):
    with pytest.raises(ValidationError):
        Float(required=True).deserialize(value)


@pytest.mark.parametrize(
    "value", [1, "1", {"id": "1"}, {"id": True}, {"id": 0}, {"id": 1, "x": 2}, {}, {"id": 2**63}]
)
def test_ref_shape(value):
    with pytest.raises(ValidationError):
        Ref("node").deserialize(value)


def test_ref_loads_id_and_dumps_object():
    assert Ref("node").deserialize({"id": 7}) == 7
    assert Ref("node")._serialize(7, None, None) == {"id": 7}


def test_unknown_fields_are_named():
    with pytest.raises(ValidationError) as info:
        NodeStateSchema().load({"name": "x", "colour": "red"})
    assert info.value.messages == {"colour": ["Unknown field."]}


def test_read_only_field_is_refused_on_input():
    body = {"fqdn": "a.example.com", "ipv4_addr_ext": "192.0.2.1/24",
            "ipv6_addr_ext": "2001:db8::1/64", "ipv4_gw_ext": "192.0.2.254",
            "ipv6_gw_ext": "2001:db8::ff", "node_state": {"id": 1}, "allocated_cores": 3}  # fmt: skip
    with pytest.raises(ValidationError) as info:
        NodeSchema().load(body)
    assert "allocated_cores" in info.value.messages


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ipv4_addr_ext", "192.0.2.1"),  # no prefix
        ("ipv4_addr_ext", "2001:db8::1/64"),  # wrong family
        ("ipv6_addr_ext", "192.0.2.1/24"),
        ("ipv4_gw_ext", "2001:db8::1"),
        ("ipv6_gw_ext", "not-an-address"),
        ("fqdn", "localhost"),  # not fully qualified
        ("fqdn", "-bad.example.com"),
        ("libvirt_uri", "qemu+ext:///system?command=/bin/sh"),
        ("interface_mode", "macvtap"),
        ("cores", 0),
        ("cpu_allocation_ratio", 0),
    ],
)
def test_node_field_validation(field, value):
    body = {"fqdn": "a.example.com", "ipv4_addr_ext": "192.0.2.1/24",
            "ipv6_addr_ext": "2001:db8::1/64", "ipv4_gw_ext": "192.0.2.254",
            "ipv6_gw_ext": "2001:db8::ff", "node_state": {"id": 1}}  # fmt: skip
    body[field] = value
    with pytest.raises(ValidationError) as info:
        NodeSchema().load(body)
    assert field in info.value.messages
