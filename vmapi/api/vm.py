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
    error_ids={
        400: ["vm/immutable_field", "vm/state_not_settable"],
        403: ["vm/quota_exceeded"],
        404: ["vm/node_not_found"],
        409: [
            "vm/no_valid_host",
            "vm/node_unsuitable",
            "vm/uuid_conflict",
            "vm/state_conflict",
            "vm/no_free_ipv4",
            "vm/no_free_ipv6",
            "vm/has_storage",
            "vm/name_taken",
        ],
        502: ["vm/hypervisor_error"],
        504: ["vm/hypervisor_timeout"],
    },
)

RESOURCES = [vm]
