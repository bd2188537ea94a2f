"""Blueprint of /storage (admins, and customers for their own VMs)."""

from vmapi.api.resource import ALL_ROLES, ResourceApi
from vmapi.schemas.storage import StorageSchema
from vmapi.services.storage import StorageService

storage = ResourceApi(
    "storage",
    StorageSchema,
    StorageService(),
    read_roles=ALL_ROLES,
    write_roles=ALL_ROLES,
    idempotent=True,
    summary="Block storage: volumes on the VM's node, attached as virtio disks.",
    error_ids={
        400: ["storage/shrink_forbidden"],
        403: ["storage/quota_exceeded"],
        409: [
            "storage/node_mismatch",
            "storage/no_free_target",
            "storage/detach_failed",
            "storage/name_taken",
        ],
        502: ["vm/hypervisor_error"],
        504: ["vm/hypervisor_timeout"],
    },
)

RESOURCES = [storage]
