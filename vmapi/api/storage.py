"""Blueprint of /storage (admins, and customers for their own VMs)."""

from flask import Response

from vmapi.api.actions import Action
from vmapi.api.resource import ALL_ROLES, ResourceApi
from vmapi.schemas.image import ImageSchema, SaveImageSchema
from vmapi.schemas.storage import StorageSchema
from vmapi.services.images import saving
from vmapi.services.storage.service import StorageService

#: POST /storage/<id>/image: an image of the volume as it is now
SAVE = Action(
    saving.save_storage,
    ImageSchema,
    status=201,
    summary="Save one volume as a new image (kind snapshot, owned by its vm's customer): "
    "flattened, standalone; a volume of a running vm is copied live without pausing it.",
    body=SaveImageSchema,
)

storage = ResourceApi(
    "storage",
    StorageSchema,
    StorageService(),
    read_roles=ALL_ROLES,
    write_roles=ALL_ROLES,
    idempotent=True,
    summary="Block storage: volumes on the VM's node, attached as virtio disks.",
    actions={"image": SAVE},
)


def save_storage_image(ident: int) -> Response:
    """``POST /storage/<id>/image``: the volume saved as an image (:data:`SAVE`)."""
    return storage.run_action("image", ident)
