"""Blueprints of /node and /virt_node (admin-only)."""

from vmapi.api.resource import ADMIN_ONLY, ResourceApi
from vmapi.schemas.node import NodeSchema, VirtNodeSchema
from vmapi.services.nodes.registry import NodeService, VirtNodeService

_nodes = NodeService()

node = ResourceApi(
    "node",
    NodeSchema,
    _nodes,
    read_roles=ADMIN_ONLY,
    summary="Physical hosts; capacity is read from the host's libvirt when omitted.",
)
virt_node = ResourceApi(
    "virt_node",
    VirtNodeSchema,
    VirtNodeService(_nodes),
    read_roles=ADMIN_ONLY,
    summary="The hypervisor role of a node: which virt_method it can host.",
)
