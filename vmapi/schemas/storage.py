"""Schema of /storage."""

from __future__ import annotations

from marshmallow import ValidationError

from vmapi.schemas.base import BaseSchema, Bool, Int, Ref, json_schema, non_negative

MIB = 1024 * 1024


@json_schema(minimum=MIB, multipleOf=MIB)
def validate_size(value: int) -> None:
    if value <= 0 or value % MIB:
        raise ValidationError("Must be a positive whole number of MiB (a multiple of 1048576).")


class StorageSchema(BaseSchema):
    id = Int(dump_only=True)
    # at most STORAGE_MAX_SIZE (checked by the service, documented from the app's config);
    # required unless image is given (checked by the service)
    size = Int(
        validate=validate_size,
        metadata={
            "maximum_from": "STORAGE_MAX_SIZE",
            "description": "Bytes, a whole number of MiB. Required unless image is given; "
            "with image at least the image's virtual_size (the default, rounded up to a "
            "whole MiB).",
        },
    )
    vm = Ref("vm", attribute="vm_id", required=True)
    storage_type = Ref(
        "storage_type", attribute="storage_type_id", required=True, metadata={"on_update": False}
    )
    cache_option = Ref("cache_option", attribute="cache_option_id", allow_none=True)
    write_iops_limit = Int(allow_none=True, validate=non_negative())
    read_iops_limit = Int(allow_none=True, validate=non_negative())
    write_bps_limit = Int(allow_none=True, validate=non_negative())
    read_bps_limit = Int(allow_none=True, validate=non_negative())
    # POST: the content of a new data volume (a copy: the row keeps no image); answers:
    # the image a root disk was made from (it depends on the image's copy on its node)
    image = Ref(
        "image",
        attribute="image_id",
        allow_none=True,
        metadata={
            "on_update": False,
            "description": "POST: an image whose content the new volume holds, a standalone "
            "qcow2 copy (a qcow2 storage type; the image must be public or the VM's owner's, "
            "and active); it keeps no tie to the image, whose id is not recorded. Answers: "
            "the image a root disk was made from (null for every other volume).",
        },
    )
    boot = Bool(
        dump_only=True,
        metadata={
            "description": "The VM's root disk (vda, from its image): it grows, but "
            "never moves or goes without its VM."
        },
    )
