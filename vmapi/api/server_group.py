"""Blueprint of /server_group (admins, and customers for their own groups)."""

from vmapi.api.resource import ALL_ROLES, ResourceApi
from vmapi.schemas.server_group import ServerGroupSchema
from vmapi.services.vms.groups import ServerGroupService

server_group = ResourceApi(
    "server_group",
    ServerGroupSchema,
    ServerGroupService(),
    read_roles=ALL_ROLES,
    write_roles=ALL_ROLES,
    summary="Server groups: VMs the scheduler places by one policy (anti-affinity, "
    "affinity, soft-anti-affinity), exact under concurrent creates and kept by moves; a "
    "VM joins one when it is made (POST /vm server_group).",
)
