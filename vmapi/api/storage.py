"""Blueprint of /storage (admins, and customers for their own VMs)."""

from vmapi.api.resource import ALL_ROLES, ResourceApi
from vmapi.schemas.storage import StorageSchema
from vmapi.services.storage.service import StorageService

storage = ResourceApi(
    "storage",
    StorageSchema,
    StorageService(),
    read_roles=ALL_ROLES,
    write_roles=ALL_ROLES,
    idempotent=True,
    summary="Block storage: volumes on the VM's node, attached as virtio disks.",
)
