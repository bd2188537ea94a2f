"""Blueprints of the catalog resources: one ResourceApi (and blueprint) per resource."""

from vmapi.api.resource import ADMIN_ONLY, ALL_ROLES, ResourceApi
from vmapi.models import CacheOption, NodeState, VirtMethod, VmState
from vmapi.schemas.catalog import (
    CacheOptionSchema,
    NodeStateSchema,
    StorageTypeSchema,
    VirtMethodSchema,
    VmStateSchema,
)
from vmapi.services.crud import CrudService
from vmapi.services.storage.types import StorageTypeService

node_state = ResourceApi(
    "node_state",
    NodeStateSchema,
    CrudService(NodeState, "node_state"),
    read_roles=ADMIN_ONLY,
    summary="States a node can be in; only schedulable states receive new VMs.",
)
vm_state = ResourceApi(
    "vm_state",
    VmStateSchema,
    CrudService(VmState, "vm_state"),
    read_roles=ALL_ROLES,
    summary="States a VM can be in; the seeded ones drive the hypervisor.",
)
virt_method = ResourceApi(
    "virt_method",
    VirtMethodSchema,
    CrudService(VirtMethod, "virt_method"),
    read_roles=ALL_ROLES,
    summary="Hypervisor technologies and the libvirt domain type each uses.",
)
storage_type = ResourceApi(
    "storage_type",
    StorageTypeSchema,
    StorageTypeService(),
    read_roles=ALL_ROLES,
    summary="Kinds of block storage: the libvirt pool and volume format.",
)
cache_option = ResourceApi(
    "cache_option",
    CacheOptionSchema,
    CrudService(CacheOption, "cache_option"),
    read_roles=ALL_ROLES,
    summary="libvirt disk cache modes.",
)
