"""/storage_type: the catalog's generic rules, and a pool and format fixed while in use.

A volume's pool is recorded on its storage row when it is made, but the type still says
what its volumes are: changing ``pool``, ``format``, ``backend`` or where its Ceph pool
is while volumes of the type exist would make it lie about them (and a new volume of
the type would land elsewhere than its siblings). So that is refused, naming the
storage that uses it.

An ``rbd`` type (services/storage/ceph.py) names its Ceph monitors, pool and user, is
raw and shared, and its user's key must be readable in VMAPI_CEPH_KEY_DIR when the type
is made or changed; vmapi gives it the UUID of the libvirt secret that holds that key on
the nodes (one per Ceph user: types of the same user share it). A ``dir`` type has none
of these.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import inspect, select

from vmapi import error_ids
from vmapi.auth import Principal
from vmapi.errors import Conflict, ValidationError
from vmapi.extensions import db
from vmapi.hypervisor import CephSource
from vmapi.models import Storage, StorageType
from vmapi.models.catalog import CEPH_FIELDS, DIR
from vmapi.services.crud import IN_USE_SAMPLE, CrudService, Outcome
from vmapi.services.storage.ceph import KeyUnreadable, ceph_key, forget_rbd_pools
from vmapi.services.vms.specs import ceph_source

FIXED_WHILE_USED = ("pool", "format", "backend", "ceph_monitors", "ceph_pool", "ceph_user")
#: what an rbd type must name (the secret's UUID is vmapi's)
CEPH_GIVEN = CEPH_FIELDS[:3]


class StorageTypeService(CrudService[StorageType]):
    def __init__(self) -> None:
        super().__init__(StorageType, "storage_type")

    def update(self, obj: StorageType, data: dict[str, Any], principal: Principal) -> StorageType:
        changing = [
            key for key in FIXED_WHILE_USED if key in data and data[key] != getattr(obj, key)
        ]
        if changing:
            # The row lock orders this against a volume being made of the type (it reads
            # the type under a share lock and commits its row before making the volume).
            db.session.scalars(
                select(StorageType.id).where(StorageType.id == obj.id).with_for_update()
            ).one()
            stmt = (
                select(Storage.id)
                .where(Storage.storage_type_id == obj.id)
                .order_by(Storage.id)
                .limit(IN_USE_SAMPLE)
            )
            used = list(db.session.scalars(stmt))
            if used:
                raise Conflict(
                    f"storage_type {obj.id} cannot change its {' and '.join(changing)} while "
                    f"storage {', '.join(map(str, used))} uses it; make a new storage type "
                    "instead.",
                    error_id=error_ids.in_use("storage_type"),
                    data={"storage": used, "fields": changing},
                )
        return super().update(obj, data, principal)

    def complete(self, obj: StorageType, data: dict[str, Any], principal: Principal) -> None:
        check_backend(obj, data)

    def delete_all(
        self, ids: list[int], principal: Principal, options: dict[str, Any], indexed: bool
    ) -> Outcome[StorageType]:
        """Delete the types (none in use); then the rbd pools of the rbd ones off every
        node, with their Ceph users' secrets when no type names those any more."""
        leaving: list[tuple[str, CephSource]] = []

        def one(ident: int) -> StorageType:
            obj = self.get(ident, principal)
            source = ceph_source(obj)
            self.delete(obj, principal, options)
            if source is not None:
                leaving.append((obj.pool, source))
            return obj

        outcome = Outcome(self.in_transaction(ids, indexed, one))
        if leaving:
            outcome.messages += forget_rbd_pools(leaving)
        return outcome


def check_backend(obj: StorageType, data: dict[str, Any]) -> None:
    """The type's fields fit its backend (400 with the fields at fault otherwise); an rbd
    type is shared unless the body says otherwise (which is refused) and has the UUID of
    its user's secret; a type made a dir type forgets its Ceph fields."""
    errors: dict[str, list[str]] = {}
    backend = obj.backend or DIR
    if backend == DIR:
        for name in CEPH_GIVEN:
            if data.get(name) is not None:
                errors[name] = ["Only an rbd storage type (backend rbd) has it."]
        for name in CEPH_FIELDS:
            setattr(obj, name, None)
    else:
        for name in CEPH_GIVEN:
            if getattr(obj, name) is None:
                errors[name] = ["Required for an rbd storage type."]
        if obj.format != "raw":
            errors["format"] = ["An rbd storage type is raw (libvirt makes raw RBD images)."]
        if "shared" not in data:
            obj.shared = True
        elif not obj.shared:
            errors["shared"] = ["An rbd storage type is shared: every node reaches its images."]
        if obj.ceph_user is not None and {"backend", "ceph_user"} & data.keys():
            try:
                ceph_key(obj.ceph_user)
            except KeyUnreadable as exc:
                errors["ceph_user"] = [f"No key for client.{obj.ceph_user}: {exc}."]
        if obj.ceph_secret_uuid is None or inspect(obj).attrs.ceph_user.history.has_changes():
            obj.ceph_secret_uuid = secret_uuid(obj)
    if errors:
        raise ValidationError(data=errors)


def secret_uuid(obj: StorageType) -> str:
    """The UUID of the libvirt secret of the type's user: that of another type of the same
    user when there is one (a node's libvirt holds one secret per Ceph user, and the key
    is the user's), else a new one. Kept from then on; a change of the user (only while
    no volume uses the type) takes the new user's."""
    stmt = (
        select(StorageType.ceph_secret_uuid)
        .where(StorageType.ceph_user == obj.ceph_user, StorageType.ceph_secret_uuid.is_not(None))
        .order_by(StorageType.id)
        .limit(1)
    )
    if obj.id is not None:
        stmt = stmt.where(StorageType.id != obj.id)
    with db.session.no_autoflush:
        found = db.session.scalars(stmt).first()
    return found if found is not None else str(uuid.uuid4())
