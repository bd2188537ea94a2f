"""What a node's Puppet run needs to build the host side of what the API decided.

:func:`node_classification` is the answer of a Puppet External Node Classifier for one
node: the class ``vmapi::hypervisor`` with, as its parameters, the node's VMs, the
device each NIC is wired to (in bridge mode the bridge the node's template names, by
default ``br-<suffix>``; taps ``vm<suffix>`` in ethernet mode; the interface's suffix,
:mod:`vmapi.services.names`), the VLANs those devices join, and the addresses routed to
the VMs. A bridge of one NIC maps to that NIC; a bridge that NICs share (a template
without ``{suffix}``, e.g. ``br0``) is listed once, ``shared: true``, with every NIC on
it. Puppet applies it; vmapi never configures a host itself. The names are those the
domains are defined with.
"""

from __future__ import annotations

from typing import Any

from flask import current_app
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from vmapi import error_ids
from vmapi.bridges import shared
from vmapi.errors import NotFound
from vmapi.extensions import db
from vmapi.models import Interface, Node, NodeState, Vm, VmState
from vmapi.services.vms.specs import bridge_template, device_name, interface_mode

CLASS = "vmapi::hypervisor"


def node_classification(fqdn: str) -> dict[str, Any]:
    node = db.session.scalars(select(Node).where(Node.fqdn == fqdn)).first()
    if node is None:
        raise NotFound(f"No node with fqdn {fqdn!r}.", error_id=error_ids.not_found("node"),
                       data={"fqdn": fqdn})  # fmt: skip
    mode = interface_mode(node, current_app.config)
    template = bridge_template(node, current_app.config)
    states = {row.id: row.name for row in db.session.scalars(select(VmState))}
    node_state = db.session.get(NodeState, node.node_state_id)
    vms_stmt = (
        select(Vm)
        .where(Vm.node_id == node.id)
        .order_by(Vm.id)
        .options(
            selectinload(Vm.interfaces).options(
                selectinload(Interface.ipv4), selectinload(Interface.ipv6),
                selectinload(Interface.vlan),
            )
        )
    )  # fmt: skip
    vms: dict[str, Any] = {}
    devices: dict[str, Any] = {}
    vlans: set[int] = set()
    ipv4: list[str] = []
    ipv6: list[str] = []
    for vm in db.session.scalars(vms_stmt):
        nics = []
        for iface in vm.interfaces:
            vlan = iface.vlan.tag if iface.vlan else None
            device = device_name(mode, iface.device_suffix, template, vlan)
            v4 = [f"{a.address}/{a.prefix}" for a in iface.ipv4]
            v6 = [f"{a.address}/{a.prefix}" for a in iface.ipv6]
            nic = {
                "interface_id": iface.id,
                "mac": iface.mac,
                "device": device,
                "vlan": vlan,
                "ipv4": v4,
                "ipv4_gateway": iface.ipv4[0].gateway if iface.ipv4 else None,
                "ipv6": v6,
                "ipv6_gateway": iface.ipv6[0].gateway if iface.ipv6 else None,
            }
            nics.append(nic)
            if device is not None and mode == "bridge" and shared(template):
                entry = devices.setdefault(device, {"shared": True, "interfaces": []})
                entry["interfaces"].append({"vm": vm.domain_name, **nic})
            elif device is not None:
                devices[device] = {"vm": vm.domain_name, **nic}
            if vlan is not None:
                vlans.add(vlan)
            ipv4 += v4
            ipv6 += v6
        vms[vm.domain_name] = {
            "id": vm.id,
            "name": vm.name,
            "uuid": vm.uuid,
            "cores": vm.cores,
            "ram": vm.ram,
            "state": states.get(vm.vm_state_id),
            "customer_id": vm.customer_id,
            "interfaces": nics,
        }
    return {
        "classes": {
            CLASS: {
                "interface_mode": mode,
                "vms": vms,
                "bridges": devices if mode == "bridge" else {},
                "taps": devices if mode == "ethernet" else {},
                "vlans": sorted(vlans),
                "addresses": {"ipv4": ipv4, "ipv6": ipv6},
            }
        },
        "parameters": {
            "vmapi_node_id": node.id,
            "vmapi_node_state": node_state.name if node_state else None,
            "vmapi_ipv4_addr_ext": node.ipv4_addr_ext,
            "vmapi_ipv6_addr_ext": node.ipv6_addr_ext,
            "vmapi_ipv4_gw_ext": node.ipv4_gw_ext,
            "vmapi_ipv6_gw_ext": node.ipv6_gw_ext,
            "vmapi_bond_interfaces": node.bond_interfaces,
        },
    }
