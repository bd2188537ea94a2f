"""The image catalog (``/image``) and the upload and download of image files.

Customers see public images (``customer_id`` null, made by admins) and their own; they
make images for themselves only, and may change or delete only their own (a public one
answers 403: they can see it, so a 404 would lie).

An upload (``PUT /image/<id>/file``) is checked before anything is written (the image
is queued, the announced length within the size limit and the owner's storage quota),
then streamed to a temporary file of the store with no database transaction open, then
checked (sha256 against a given checksum, :func:`~vmapi.services.images.inspection.inspect`),
and only then, under the image row's lock, renamed into place and recorded ``active``
with the quota checked again. Any failure removes the file and leaves the image
``queued``, so the client can send the file again; the refusal is in the audit trail.
A transfer holds a slot (:mod:`vmapi.services.images.transfers`) while it runs: one upload per
image, a cap per customer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO

from flask import current_app
from sqlalchemy import Select, or_, select

from vmapi import error_ids
from vmapi.auth import Principal
from vmapi.error_ids import (
    IMAGE_BUSY,
    IMAGE_IMMUTABLE,
    IMAGE_IMMUTABLE_FIELD,
    IMAGE_INVALID,
    IMAGE_NOT_ACTIVE,
    IMAGE_QUOTA_EXCEEDED,
)
from vmapi.errors import BodyTooLarge, Conflict, Forbidden, ValidationError
from vmapi.extensions import db
from vmapi.models import Image, Vm
from vmapi.models.image import ACTIVE, QUEUED, SAVING
from vmapi.services.crud import IN_USE_SAMPLE, CrudService, Outcome
from vmapi.services.images import copies, rbd_copies, store, transfers
from vmapi.services.images.inspection import ImageRefused, inspect
from vmapi.services.quotas import check_storage_quota, storage_quota_exceeded, storage_room

UPDATABLE = {"name", "description", "min_ram"}
QUOTA_ERROR = IMAGE_QUOTA_EXCEEDED


def invalid(reason: str) -> ValidationError:
    """400 ``image/invalid``: the file is not kept; ``reason`` says why."""
    return ValidationError(f"The file was refused: {reason}.", error_id=IMAGE_INVALID)


@dataclass(frozen=True)
class ImageFile:
    """An active image's file, open for reading, and the download's transfer slot."""

    handle: BinaryIO
    size: int
    checksum: str
    name: str  # in the store
    slot: transfers.Slot | None = None

    def close(self) -> None:
        """Close the file and free the slot (again: nothing)."""
        self.handle.close()
        if self.slot is not None:
            self.slot.release()


def image_dir() -> str:
    return os.path.abspath(current_app.config["IMAGE_DIR"])


class ImageService(CrudService[Image]):
    """The catalog, plus the file of each image."""

    def __init__(self) -> None:
        super().__init__(Image, "image")

    def customer_scope(self, stmt: Select, customer_id: int | None) -> Select:
        return stmt.where(or_(Image.customer_id.is_(None), Image.customer_id == customer_id))

    def check_may_change(self, image: Image, principal: Principal) -> None:
        """Customers change their own images only (others' are not even visible)."""
        if not principal.is_admin and image.customer_id != principal.customer_id:
            raise Forbidden(
                f"Image {image.id} is public; only admins change public images.",
                data={"image": {"id": image.id}},
            )

    # ------------------------------------------------------------------ the catalog
    def create(self, data: dict[str, Any], principal: Principal) -> Image:
        data = dict(data)
        if not principal.is_admin:
            if data.get("customer_id") not in (None, principal.customer_id):
                raise Forbidden("A customer token may make images only for its own customer id.")
            data["customer_id"] = principal.customer_id
        data.setdefault("format", "qcow2")
        data["state"] = QUEUED
        return super().create(data, principal)

    def update(self, obj: Image, data: dict[str, Any], principal: Principal) -> Image:
        self.check_may_change(obj, principal)
        fixed = sorted(set(data) - UPDATABLE)
        if fixed:
            raise ValidationError(
                f"Only {', '.join(sorted(UPDATABLE))} of an image can change; make a new "
                "image for another file, format or owner.",
                error_id=IMAGE_IMMUTABLE_FIELD,
                data={key: ["Cannot be changed."] for key in fixed},
            )
        return super().update(obj, data, principal)

    def delete_all(
        self, ids: list[int], principal: Principal, options: dict[str, Any], indexed: bool
    ) -> Outcome[Image]:
        """Delete images no VM boots from, then their files and every node's copy."""
        orphaned: list[int] = []
        in_ceph: list[int] = []

        def one(ident: int) -> Image:
            image = self.get(ident, principal)
            self.check_may_change(image, principal)
            # Locked: a VM being created from the image holds it shared until its row
            # (which references the image) is committed, so one of the two waits.
            locked = select(Image).where(Image.id == ident).with_for_update()
            db.session.scalars(locked).one()
            self.check_unused(image)
            orphaned.extend(copies.forget_image(image.id))
            in_ceph.extend(rbd_copies.forget_image(image.id))
            db.session.delete(image)
            db.session.flush()
            return image

        images = self.in_transaction(ids, indexed, one)
        # The rows are gone (committed); now the files and the copies. A file that cannot
        # be removed is logged and left: no row points at it any more. A node that cannot
        # be reached keeps its copy (said in the answer; reconcile removes it later).
        for image in images:
            if image.file is not None:
                store.remove(os.path.join(image_dir(), image.file))
        messages = copies.remove_orphans(orphaned) if orphaned else []
        messages += rbd_copies.remove_orphans(in_ceph) if in_ceph else []
        return Outcome(images, messages)

    def check_unused(self, image: Image) -> None:
        """409 ``image/in_use`` while VMs boot from it (their ids in ``data``)."""
        stmt = select(Vm.id).where(Vm.image_id == image.id).order_by(Vm.id).limit(IN_USE_SAMPLE)
        booting = list(db.session.scalars(stmt))
        if booting:
            raise Conflict(
                f"Image {image.id} is in use: VMs {', '.join(map(str, booting))} boot from it; "
                "delete them first.",
                error_id=error_ids.in_use("image"),
                data={"vm": booting},
            )

    # ------------------------------------------------------------------ the file
    def upload(
        self, ident: int, principal: Principal, chunks: Iterable[bytes], length: int | None
    ) -> Outcome[Image]:
        """Receive, check and keep the file of a queued image (see the module's text)."""
        image, limit, room = self.check_upload(ident, principal, length)
        owner, declared, given = image.customer_id, image.format, image.checksum
        # One upload of an image at a time, within the customer's transfers in flight.
        with transfers.take(principal, ident, upload=True):
            # No transaction (nor pooled connection) stays open while the bytes arrive.
            db.session.rollback()
            directory = image_dir()
            store.sweep_stale(directory)
            cap = limit if room is None else min(limit, room)
            try:
                received = store.receive(chunks, directory, ident, cap, length)
            except store.UploadTooLarge:
                if room is not None and room < limit:
                    raise storage_quota_exceeded(owner, cap + 1, QUOTA_ERROR) from None
                raise BodyTooLarge(limit=limit) from None
            except store.UploadTruncated as exc:
                raise invalid(str(exc)) from exc
            try:
                if given is not None and received.sha256 != given:
                    raise invalid(
                        f"its sha256 is {received.sha256}, not the checksum {given} given when "
                        "the image was made"
                    )
                try:
                    maximum = int(current_app.config["IMAGE_MAX_VIRTUAL_SIZE"])
                    found = inspect(received.path, declared, maximum)
                except ImageRefused as exc:
                    raise invalid(str(exc)) from exc
                return Outcome([self.activate(ident, principal, received, found.virtual_size)])
            finally:
                store.remove(received.path)  # gone already when it was published

    def check_upload(
        self, ident: int, principal: Principal, length: int | None
    ) -> tuple[Image, int, int | None]:
        """What an upload checks before it reads a byte: the image is one the principal
        may change (404 when not visible, 403 when public), still queued (409
        ``image/immutable``), the announced length within the size limit (413) and the
        owner's storage quota. The image, the size limit and the owner's room (None: no
        quota). nginx asks this before it spools an upload (``X-Vmapi-Upload-Check``)."""
        image = self.get(ident, principal)
        self.check_may_change(image, principal)
        if image.state == ACTIVE:
            raise self.immutable(ident)
        if image.state == SAVING:
            raise self.being_saved(ident)
        limit = int(current_app.config["IMAGE_MAX_SIZE"])
        if length is not None and length > limit:
            raise BodyTooLarge(limit=limit)
        room = storage_room(image.customer_id)
        if room is not None and length is not None and length > room:
            raise storage_quota_exceeded(image.customer_id, length, QUOTA_ERROR)
        return image, limit, room

    def activate(
        self, ident: int, principal: Principal, received: store.Received, virtual_size: int
    ) -> Image:
        """Record a checked upload, under the row's lock: still queued, still within the
        quota; the file is renamed into place before the commit and removed again if
        the commit fails."""
        published: list[str] = []

        def one(_: None) -> Image:
            stmt = select(Image).where(Image.id == ident).with_for_update()
            image = db.session.scalars(self.scope(stmt, principal)).first()
            if image is None:
                raise self.not_found(ident)  # deleted while the file was arriving
            if image.state == ACTIVE:
                raise self.immutable(ident)  # another upload was accepted first
            if image.state == SAVING:
                raise self.being_saved(ident)
            check_storage_quota(image.customer_id, received.size, QUOTA_ERROR)
            published.append(store.publish(received, image_dir(), ident))
            image.file = published[0]
            image.state = ACTIVE
            image.size = received.size
            image.virtual_size = virtual_size
            image.checksum = received.sha256
            db.session.flush()
            return image

        try:
            (image,) = self.in_transaction([None], False, one)
        except BaseException:
            for name in published:
                store.remove(os.path.join(image_dir(), name))
            raise
        return image

    def open_file(self, ident: int, principal: Principal, streamed: bool = True) -> ImageFile:
        """The file of an active image the principal can see, open for streaming back;
        ``streamed`` (by this process): holding a transfer slot until it is released."""
        image = self.get(ident, principal)
        if image.state == ACTIVE and image.file is None:
            raise rbd_copies.in_ceph_only(image)
        if image.state != ACTIVE or image.file is None:
            raise Conflict(
                f"Image {ident} is {image.state}; it has no file yet.",
                error_id=IMAGE_NOT_ACTIVE,
                data={"state": image.state},
            )
        name, checksum = image.file, image.checksum or ""
        slot = transfers.take(principal, ident, upload=False) if streamed else None
        try:
            handle = open(os.path.join(image_dir(), name), "rb")  # noqa: SIM115 - streamed
        except BaseException:
            if slot is not None:
                slot.release()
            raise
        found = ImageFile(handle, os.fstat(handle.fileno()).st_size, checksum, name, slot)
        db.session.rollback()  # nothing stays open while the file goes out
        return found

    @staticmethod
    def being_saved(ident: int) -> Conflict:
        return Conflict(
            f"Image {ident} is being saved from a disk; its file comes from there, not from "
            "an upload.",
            error_id=IMAGE_BUSY,
        )

    @staticmethod
    def immutable(ident: int) -> Conflict:
        return Conflict(
            f"Image {ident} already has its file; an image's file never changes. Make a new "
            "image for another file.",
            error_id=IMAGE_IMMUTABLE,
        )
