"""Registering hosts (``node``) and their hypervisor roles (``virt_node``)."""

from __future__ import annotations

from typing import Any

from flask import current_app
from sqlalchemy import select

from vmapi.auth import Principal
from vmapi.displays import display_problem
from vmapi.errors import ValidationError
from vmapi.extensions import db
from vmapi.models import Node, VirtMethod, VirtNode
from vmapi.models.catalog import DOMAIN_TYPES
from vmapi.scheduler import CapacityDefaults, set_free
from vmapi.services.crud import CrudService
from vmapi.services.ha.agents import agent_dirs, agent_problem
from vmapi.services.nodes.hosts import node_uri, read_capacity


class NodeService(CrudService[Node]):
    """Nodes: capacity comes from the host's libvirt when the admin does not give it.

    On UPDATE, ``cores: null`` or ``ram: null`` asks the host again (after a hardware
    change); a changed ``fqdn`` or ``libvirt_uri`` is re-validated. A ``fence_agent``
    given must be installed on this API host (in HA_FENCE_AGENT_DIRS).
    """

    def __init__(self) -> None:
        super().__init__(Node, "node")

    def complete(self, obj: Node, data: dict[str, Any], principal: Principal) -> None:
        if data.get("fence_agent") is not None:
            dirs = agent_dirs(current_app.config["HA_FENCE_AGENT_DIRS"])
            problem = agent_problem(data["fence_agent"], dirs)
            if problem:
                raise ValidationError(data={"fence_agent": [problem]})
        # the URI is checked when it is set or built anew, or used; an update of other
        # fields of a node whose stored URI no longer passes still works (to fix it)
        display = obj.id is None or {"fqdn", "libvirt_uri", "console_address"} & data.keys()
        if obj.cores is None or obj.ram is None or display:
            uri = node_uri(obj.fqdn, obj.libvirt_uri)
        if display:
            address = obj.console_address or current_app.config["CONSOLE_ADDRESS"]
            problem = display_problem(uri, address)
            if problem:
                default = "" if obj.console_address else " (CONSOLE_ADDRESS, as it is null)"
                raise ValidationError(data={"console_address": [
                    f"{address}{default}: {problem}."]})  # fmt: skip
        if obj.cores is None or obj.ram is None:
            info = read_capacity(obj.fqdn, uri)
            if obj.cores is None:
                obj.cores = info.cores
            if obj.ram is None:
                obj.ram = info.ram
        set_free(obj, capacity_defaults())


def capacity_defaults() -> CapacityDefaults:
    config = current_app.config
    return CapacityDefaults(
        config["CPU_ALLOCATION_RATIO"], config["RAM_ALLOCATION_RATIO"], config["RESERVED_RAM"]
    )


class VirtNodeService(CrudService[VirtNode]):
    """A node's ability to host one virtualization method; may create the node or method."""

    def __init__(self, nodes: NodeService) -> None:
        super().__init__(VirtNode, "virt_node")
        self.nodes = nodes

    def create(self, data: dict[str, Any], principal: Principal) -> VirtNode:
        data = dict(data)
        if isinstance(data.get("node_id"), dict):
            data["node_id"] = self.nodes.create(data["node_id"], principal).id
        if isinstance(data.get("virt_method_id"), str):
            data["virt_method_id"] = self._method_by_name(data["virt_method_id"]).id
        return super().create(data, principal)

    def update(self, obj: VirtNode, data: dict[str, Any], principal: Principal) -> VirtNode:
        data = dict(data)
        if isinstance(data.get("node_id"), dict):
            raise ValidationError(data={"node": ['Use {"id": N} to move a virt_node.']})
        if isinstance(data.get("virt_method_id"), str):
            data["virt_method_id"] = self._method_by_name(data["virt_method_id"]).id
        return super().update(obj, data, principal)

    @staticmethod
    def _method_by_name(name: str) -> VirtMethod:
        method = db.session.scalars(select(VirtMethod).where(VirtMethod.name == name)).first()
        if method is not None:
            return method
        domain_type = name.lower()
        if domain_type not in DOMAIN_TYPES:
            raise ValidationError(
                data={
                    "virt_method": [
                        f"No virt_method named {name!r}, and it is not a libvirt domain type "
                        f"({', '.join(DOMAIN_TYPES)}) to create one from."
                    ]
                }
            )
        method = VirtMethod(name=name, domain_type=domain_type)
        db.session.add(method)
        db.session.flush()
        return method
