"""Blueprint of /vm (admins and customers; customers see only their own VMs)."""

from vmapi.api.resource import ALL_ROLES, ResourceApi
from vmapi.schemas.vm import VmDeleteOptions, VmSchema, VmUpdateOptions
from vmapi.services.vms import VmService

vm = ResourceApi(
    "vm",
    VmSchema,
    VmService(),
    read_roles=ALL_ROLES,
    write_roles=ALL_ROLES,
    summary="Virtual machines, created and changed on their node through libvirt.",
    update_options=VmUpdateOptions,
    delete_options=VmDeleteOptions,
    actions={"reboot": "reboot"},
    idempotent=True,
)

RESOURCES = [vm]
