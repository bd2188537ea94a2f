"""Typed SQLAlchemy 2 models, one module per area; importing this registers them all."""

from vmapi.models.catalog import CacheOption, NodeState, StorageType, VirtMethod, VmState
from vmapi.models.console import ConsoleToken
from vmapi.models.event import Event
from vmapi.models.idempotency import IdempotencyKey
from vmapi.models.image import Image, ImageCopy, ImageRbd
from vmapi.models.installation import Installation
from vmapi.models.leftover import Leftover
from vmapi.models.network import Interface, Ipv4Address, Ipv6Address, Ipv6Pool, Vlan
from vmapi.models.node import Node, NodeStorageAccess, VirtNode
from vmapi.models.quota import Quota
from vmapi.models.security import InterfaceSecurityGroup, SecurityGroup, SecurityGroupRule
from vmapi.models.server_group import ServerGroup
from vmapi.models.storage import Storage
from vmapi.models.token import ApiToken
from vmapi.models.vm import Vm

__all__ = [
    "ApiToken",
    "CacheOption",
    "ConsoleToken",
    "Event",
    "IdempotencyKey",
    "Image",
    "ImageCopy",
    "ImageRbd",
    "Installation",
    "Interface",
    "InterfaceSecurityGroup",
    "Ipv4Address",
    "Ipv6Address",
    "Ipv6Pool",
    "Leftover",
    "Node",
    "NodeState",
    "NodeStorageAccess",
    "Quota",
    "SecurityGroup",
    "SecurityGroupRule",
    "ServerGroup",
    "Storage",
    "StorageType",
    "VirtMethod",
    "VirtNode",
    "Vlan",
    "Vm",
    "VmState",
]
