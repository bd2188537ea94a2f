"""Schemas of /vm and its query options."""

from __future__ import annotations

import uuid

from marshmallow import ValidationError, fields, validate, validates

from vmapi.guest_inputs import (
    MAX_HOSTNAME_LENGTH,
    MAX_SSH_KEYS,
    MAX_USER_DATA_BYTES,
    validate_guest_hostname,
    validate_ssh_keys,
    validate_user_data,
)
from vmapi.schemas.base import (
    INT32_MAX,
    BaseSchema,
    Bool,
    Int,
    Ref,
    RefList,
    Str,
    json_schema,
    non_negative,
    positive,
)

MIB = 1024 * 1024
#: what a restart does with a root disk on the fenced node's local storage
HA_LOCAL_DISKS = ("leave", "rebuild")
MIN_RAM = 64 * MIB


@json_schema(minimum=MIN_RAM, multipleOf=MIB)
def validate_ram(value: int) -> None:
    if value < MIN_RAM:
        raise ValidationError(f"Must be at least 64 MiB ({MIN_RAM} bytes).")
    if value % MIB:
        raise ValidationError(
            "Must be a whole number of MiB (a multiple of 1048576 bytes): libvirt accounts "
            "memory in KiB and vmapi sizes VMs in MiB."
        )


def validate_uuid(value: str) -> None:
    try:
        uuid.UUID(value)
    except ValueError as exc:
        raise ValidationError(
            "Not a valid UUID, e.g. 4d7c3c2e-6a3b-4b8f-9f0e-1d2c3b4a5968."
        ) from exc


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"


@json_schema(pattern=rf"^{_LABEL}(?:\.{_LABEL})*$", maxLength=MAX_HOSTNAME_LENGTH)
def guest_hostname(value: str) -> None:
    validate_guest_hostname(value)


@json_schema(pattern=r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$", maxLength=MAX_USER_DATA_BYTES)
def user_data(value: str) -> None:
    validate_user_data(value)


class UuidStr(Str):
    """A UUID, stored in its canonical lowercase form."""

    json_schema = {"format": "uuid"}

    def _deserialize(self, value, attr, data, **kwargs) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        validate_uuid(text)
        return str(uuid.UUID(text))


class VmSchema(BaseSchema):
    id = Int(dump_only=True)
    cores = Int(required=True, validate=positive(1024))
    ram = Int(required=True, validate=validate_ram)
    customer_id = Int(allow_none=True, validate=non_negative())
    cputime_limit = Int(
        allow_none=True,
        validate=validate.Range(
            min=1000, max=1000000, error="Must be between 1000 and 1000000 µs per period."
        ),
    )
    backup_keep = Int(
        allow_none=True,
        validate=positive(INT32_MAX),
        metadata={
            "description": "How many of its backups flask vmapi backup run keeps (the newest; "
            "older ones are deleted). null: the VM is not backed up. Admins only.",
        },
    )
    # High availability (README "High availability"), admins only like backup_keep
    ha = Bool(
        allow_none=True,
        metadata={"description": "Whether the VM is made anew on another node when its "
                  "node is fenced; null: VMAPI_HA_DEFAULT decides. Admins only."},
    )  # fmt: skip
    ha_priority = Int(
        validate=validate.Range(min=-1000, max=1000),
        metadata={"description": "Restarts go highest first (default 0). Admins only."},
    )
    ha_local_disks = Str(
        validate=validate.OneOf(HA_LOCAL_DISKS),
        metadata={"description": "A root disk on the fenced node's local storage: leave (the "
                  "default: the VM stays down, and is reported) or rebuild (from its image, "
                  "what the guest wrote lost). Admins only."},
    )  # fmt: skip
    # on_update / on_create False: refused there (vm/immutable_field; a new VM is started)
    uuid = UuidStr(allow_none=True, metadata={"on_update": False})
    node = Ref("node", attribute="node_id", allow_none=True, metadata={"on_update": False})
    virt_method = Ref(
        "virt_method", attribute="virt_method_id", required=True, metadata={"on_update": False}
    )
    vm_state = Ref("vm_state", attribute="vm_state_id", metadata={"on_create": False})
    #: what the VM boots from: its root disk is a copy-on-write overlay of this image
    image = Ref(
        "image",
        attribute="image_id",
        allow_none=True,
        metadata={"on_update": False, "description": "The image the VM boots from (null: none)."},
    )
    server_group = Ref(
        "server_group",
        attribute="server_group_id",
        allow_none=True,
        metadata={
            "on_update": False,  # vm/immutable_field
            "description": "The server group the VM joins (null: none): its policy places the "
            "VM, and moves it later. One of the VM's customer's groups (a VM without a "
            "customer: an admin group).",
        },
    )
    root_size = Int(
        load_only=True,
        allow_none=True,
        validate=positive(),
        metadata={
            "on_update": False,
            # at most STORAGE_MAX_SIZE (checked by the service, documented from the config)
            "maximum_from": "STORAGE_MAX_SIZE",
            "description": "Bytes of the root disk made from image, given only with image "
            "(rounded up to a whole MiB; default and minimum: the image's virtual_size). "
            "Grow it later through /storage.",
        },
    )
    root_storage_type = Ref(
        "storage_type",
        attribute="root_storage_type_id",
        load_only=True,
        allow_none=True,
        metadata={
            "on_update": False,
            "description": "The storage type of the root disk made from image, given only "
            "with image: the seeded local-qcow2 (the default: a qcow2 overlay on the node's "
            "copy of the image) or an rbd type (an RBD clone of the image, written once "
            "into its Ceph pool).",
        },
    )
    name = Str(dump_only=True)
    #: the name libvirt knows the domain by (with the installation's id), stored when
    #: the VM is made
    domain_name = Str(dump_only=True)
    interfaces = RefList("interface")
    #: POST only: the security groups of the VM's first interface (later: UPDATE
    #: /interface); arrives in the service's data as ``security_groups``, a list of ids
    security_groups = RefList(
        "security_group",
        writable=True,
        load_only=True,
        metadata={
            "on_update": False,  # vm/immutable_field
            "description": "The security groups of the VM's interface: the customer's, or "
            "admin groups (customer_id null). Change them later with UPDATE /interface.",
        },
    )
    # What the guest is told through its cloud-init seed (API.md "Guest configuration").
    # ssh_keys and user_data are write-only: answers show fingerprints and a flag.
    hostname = Str(
        validate=guest_hostname,
        metadata={"description": "RFC 1123 labels, dotted allowed (the last one not all "
                  "digits); default: the VM's name."},
    )  # fmt: skip
    ssh_keys = fields.List(
        Str(metadata={"description": "One OpenSSH public key line: TYPE BASE64 [COMMENT]."}),
        load_only=True,
        validate=validate.Length(max=MAX_SSH_KEYS),
    )
    user_data = Str(
        load_only=True,
        allow_none=True,
        validate=user_data,
        metadata={"description": f"cloud-config or a script, at most {MAX_USER_DATA_BYTES} "
                  "bytes of UTF-8; null: none."},
    )  # fmt: skip
    ssh_key_fingerprints = fields.List(Str(), dump_only=True)
    user_data_set = Bool(dump_only=True)

    @validates("ssh_keys")
    def _ssh_keys(self, value: list[str], **kwargs) -> None:
        validate_ssh_keys(value)  # errors keyed by the bad key's index


class VmUpdateOptions(BaseSchema):
    """``?force=true``: power off at once (destroy) instead of an ACPI shutdown."""

    force = Bool()

    def load(self, data, **kwargs):  # query strings carry text, not JSON booleans
        values = dict(data)
        if "force" in values:
            raw = values["force"]
            if raw not in ("true", "false"):
                raise ValidationError({"force": ["Use true or false."]})
            values["force"] = raw == "true"
        return super().load(values, **kwargs)


class VmDeleteOptions(BaseSchema):
    """``?cascade=storage``: delete the VM's volumes too (otherwise 409 vm/has_storage)."""

    cascade = Str(validate=validate.OneOf(["storage"]))


class MigrateSchema(BaseSchema):
    """The body of ``POST /vm/<id>/migrate`` (none at all: the defaults)."""

    node = Ref(
        "node",
        allow_none=True,
        load_default=None,
        metadata={"description": "Where to; null: the node the scheduler picks."},
    )
    live = Bool(
        load_default=True,
        metadata={"description": "false: a shut-off move only (a running VM: 409)."},
    )


class RebuildSchema(BaseSchema):
    """The body of ``POST /vm/<id>/rebuild``."""

    image = Ref(
        "image",
        required=True,
        metadata={"description": "The image of the new root disk: public or the VM's owner's "
                  "own, and active."},
    )  # fmt: skip
    root_size = Int(
        allow_none=True,
        load_default=None,
        validate=positive(),
        metadata={
            "maximum_from": "STORAGE_MAX_SIZE",
            "description": "Bytes of the new root disk (rounded up to a whole MiB; at least "
            "the image's virtual_size). Default: the present root disk's size or the "
            "image's virtual_size, the larger.",
        },
    )
