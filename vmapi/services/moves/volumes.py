"""What a moving VM needs on its target before its domain moves, each with its inverse.

- every volume (:func:`prepare_volumes`): one of a shared pool is found at its path
  there; the others are made there, listed as leftovers first (committed), so a process
  that dies mid-move leaves a list rather than a mystery: a live move makes them empty
  for libvirt to copy into, a cold one copies the bytes through the volume streams, an
  evacuation makes them anew. A root disk (booted from an image) is an overlay on the
  target's own copy of the image, copied there first when missing (bounded by
  IMAGE_COPY_TIMEOUT, like a create's; the move's time starts again after it).
- the console log (:func:`prepare_console_log`): the target's log pool, and the file the
  domain logs to there;
- the cloud-init seed (:func:`prepare_seed`): made there from the database.

:func:`prepare_target` does all three, in that order, for a migration and an evacuation.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from flask import current_app
from sqlalchemy import select

from vmapi.error_ids import VM_HYPERVISOR_ERROR, VM_STATE_CONFLICT
from vmapi.errors import Conflict, HypervisorFailure
from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError, HypervisorTimeout, NameTaken
from vmapi.hypervisor.rbd import RbdError
from vmapi.models import Image, Storage, StorageType
from vmapi.models.catalog import RBD
from vmapi.models.leftover import LOG, VOLUME
from vmapi.services.images.copies import (
    Source,
    find_copy,
    held_copy,
    pool_directory,
    remove_if_unused,
)
from vmapi.services.leftovers import (
    Left,
    delete_listed_log,
    delete_listed_volume,
    drop_leftover,
    find_leftover,
    note_leftover,
)
from vmapi.services.moves.move import COLD, Move, MovedVolume
from vmapi.services.names import console_log_name
from vmapi.services.network.protection import ensure_for_vm, prune
from vmapi.services.nodes.domains import hypervisor_failure
from vmapi.services.nodes.hosts import Host, hypervisor
from vmapi.services.storage.ceph import (
    KeyUnreadable,
    Steps,
    ensure_rbd_pool,
    key_unreadable,
    rbd_client,
)
from vmapi.services.undo import Undo
from vmapi.services.vms.cloud_init import (
    SEED_STORAGE_TYPE,
    seed_files,
    seed_iso,
    seed_pool,
    volume_name,
)


def prepare_target(move: Move, undo: Undo) -> None:
    """Everything the VM needs on the target before its domain moves there: its volumes,
    its console log, its seed; each step's inverse on ``undo``."""
    ensure_for_vm(move.target, move.vm.id, undo)  # a domain refers to them: first
    prepare_volumes(move, undo)
    prepare_console_log(move, undo)
    prepare_seed(move, undo)


def prepare_volumes(move: Move, undo: Undo) -> None:
    """Every volume of the VM on the target, before the domain moves."""
    driver = hypervisor()
    target = move.target
    for volume in move.volumes:
        storage = volume.storage
        step = f"preparing storage {storage.id} on the target"
        try:
            if volume.shared:
                _find_shared(
                    move, volume, undo, db.session.get(StorageType, storage.storage_type_id)
                )
                continue
            directory = pool_directory(target.node.id, storage.pool, move.vm.virt_method_id)
            if driver.ensure_pool(target.uri, storage.pool, directory):
                move.messages.append(
                    f"Storage pool {storage.pool} was created at {directory} on {target.node.fqdn}."
                )
            if find_leftover(target.node.id, VOLUME, storage.volume_name, storage.pool):
                # ours, left there by an earlier move: out of the new one's way
                delete_listed_volume(target, storage.pool, storage.volume_name)
            if storage.boot:
                step = f"copying the image of storage {storage.id} to the target"
                _make_root(move, volume, directory, undo)
            else:
                verb = "copying" if move.kind == COLD else "making"
                step = f"{verb} storage {storage.id} on the target"
                volume.target_path = _make(move, volume, undo, _new_volume(move, volume))
        except HypervisorError as exc:
            raise hypervisor_failure(exc, step, target) from exc


def _find_shared(
    move: Move, volume: MovedVolume, undo: Undo, storage_type: StorageType | None = None
) -> None:
    """A shared pool's volume must be at the same path on the target: a file of a
    directory every node mounts (the target's pool, listed, shows it), or (an rbd type)
    the one RBD image, looked at by the API host's Ceph client (``rbd info``: the
    target's rbd pool is never listed, which would open every image of the Ceph pool);
    the target is given the Ceph user's secret and its rbd pool first (QEMU there needs
    the secret)."""
    storage, driver = volume.storage, hypervisor()
    if storage_type is not None and storage_type.backend == RBD:
        try:
            ensure_rbd_pool(storage_type, move.target, undo, move.messages, Steps())
            path = _rbd_path(storage, storage_type, move.target)
        except KeyUnreadable as exc:
            raise key_unreadable(exc, storage_type) from exc
    else:
        driver.ensure_pool(move.target.uri, storage.pool, os.path.dirname(storage.path or "/"))
        path = None
        # (listing refreshes the pool: it learns of files another node made in it)
        if storage.volume_name in driver.volumes(move.target.uri, storage.pool):
            path, _size = driver.volume(move.target.uri, storage.pool, storage.volume_name)
    if path != storage.path:
        raise HypervisorFailure(
            f"Storage {storage.id} is in a pool declared shared, but node {move.target.node.fqdn} "
            f"does not see {storage.path} in its pool {storage.pool} ({path or 'no such volume'}); "
            "nothing moved.",
            error_id=VM_HYPERVISOR_ERROR,
            data={"step": f"finding storage {storage.id} on the target",
                  "node": {"id": move.target.node.id}},
        )  # fmt: skip
    volume.target_path = path


def _rbd_path(storage: Storage, storage_type: StorageType, target: Host) -> str | None:
    """``<ceph pool>/<image>`` when the row's image is in the type's Ceph pool (one
    ``rbd info`` by the API host), None when it is not. A cluster the API host cannot
    reach is no fault of the target's (it is not marked down)."""
    pool = storage_type.ceph_pool or ""
    try:
        found = rbd_client(storage_type).info(pool, storage.volume_name or "")
    except RbdError as exc:
        raise HypervisorFailure(
            f"The API host could not look for storage {storage.id} in Ceph pool {pool} "
            f"({exc}); nothing moved.",
            error_id=VM_HYPERVISOR_ERROR,
            data={"step": f"finding storage {storage.id} in Ceph",
                  "node": {"id": target.node.id}},
        ) from exc  # fmt: skip
    return f"{pool}/{storage.volume_name}" if found is not None else None


def _new_volume(move: Move, volume: MovedVolume) -> Callable[[], str]:
    """How to make the volume on the target: empty, of the same size and format (libvirt
    copies into it, or it is made anew), or a copy of the source's bytes (a cold move)."""
    storage, target = volume.storage, move.target

    def make() -> str:
        if move.kind != COLD:
            return hypervisor().create_volume(target.uri, storage.pool, storage.volume_name,
                                              storage.size, volume.fmt)  # fmt: skip
        return copy_volume(move.source, target, storage.pool, storage.volume_name,
                           move.remaining())  # fmt: skip

    return make


def _make_root(move: Move, volume: MovedVolume, directory: str, undo: Undo) -> None:
    """A root disk: an overlay on the target's copy of the image (made there first when
    missing, and removed again by the undo if nobody else uses it)."""
    storage, target = volume.storage, move.target
    image = db.session.get(Image, storage.image_id)
    source = Source.of(image)
    db.session.commit()  # (only read) nothing stays open across the copy
    with held_copy(source, target, storage.pool, directory) as held:
        if held.made:
            copy_id = held.copy.id
            undo.push(f"removing the copy of image {image.id} from node {target.node.fqdn} "
                      "unless used", lambda: remove_if_unused(copy_id))  # fmt: skip
            move.deadline += held.seconds  # the copy has its own bound
        base = held.copy
        if move.kind == COLD:
            # The overlay's bytes name their base by its path on the source.
            there = find_copy(image.id, move.source.node.id)
            if there is None or there.path != base.path:
                raise Conflict(
                    f"vm-{move.vm.id}'s root disk (storage {storage.id}) is an overlay on the "
                    f"copy of image {image.id} at {there.path if there else '?'}; on "
                    f"{target.node.fqdn} that copy is at {base.path}, so a cold move cannot "
                    "carry it. Start the VM and move it live (libvirt copies its disks then).",
                    error_id=VM_STATE_CONFLICT,
                    data={"storage": {"id": storage.id}},
                )

        def make() -> str:
            if move.kind == COLD:
                return copy_volume(move.source, target, storage.pool, storage.volume_name,
                                   move.remaining())  # fmt: skip
            return hypervisor().create_overlay(
                target.uri, storage.pool, storage.volume_name, storage.size, base.volume_name,
                image.format,
            )  # fmt: skip

        step = f"making storage {storage.id} on the target"
        try:
            volume.target_path = _make(move, volume, undo, make)
        except HypervisorError as exc:
            raise hypervisor_failure(exc, step, target) from exc


def _make(move: Move, volume: MovedVolume, undo: Undo, make: Callable[[], str]) -> str:
    """``make()`` the volume on the target, listed as a leftover first (committed); the
    undo deletes it and strikes it off. A volume of that name already there is not ours:
    never touched, never listed."""
    storage, target = volume.storage, move.target
    note_leftover(target.node.id, VOLUME, storage.volume_name,
                  f"made for the move of vm-{move.vm.id}", move.vm.id, storage.pool)  # fmt: skip
    db.session.commit()

    def remove() -> None:
        delete_listed_volume(target, storage.pool, storage.volume_name)

    what = f"deleting volume {storage.pool}/{storage.volume_name} made on node {target.node.fqdn}"
    left = Left(target.node.id, VOLUME, storage.volume_name, move.vm.id, storage.pool)

    try:
        made = make()
    except NameTaken as exc:
        db.session.rollback()
        drop_leftover(target.node.id, VOLUME, storage.volume_name, storage.pool)
        db.session.commit()
        raise HypervisorFailure(
            f"Node {target.node.fqdn} already has a volume {storage.pool}/{storage.volume_name} "
            f"that this database does not own there ({exc.reason}); nothing moved. Run `flask "
            "vmapi reconcile` to see what is in the way (a pool every node sees must be "
            "declared shared: storage_type.shared).",
            error_id=VM_HYPERVISOR_ERROR,
            data={"step": f"making storage {storage.id} on the target",
                  "node": {"id": target.node.id}},
        ) from exc  # fmt: skip
    except BaseException:
        undo.push(what, remove, left)  # it may exist (a timeout after libvirt made it)
        raise
    undo.push(what, remove, left)
    return made


def copy_volume(source: Host, target: Host, pool: str, name: str, timeout: float) -> str:
    """The source's volume, byte for byte, as a new volume of the target (through the
    API host, each side on a connection of its own); its path there."""
    driver = hypervisor()
    if timeout <= 0:
        raise HypervisorTimeout(target.uri, 0)
    length = driver.volume_length(source.uri, pool, name)
    chunks = driver.download_volume(source.uri, pool, name, timeout)
    try:
        return driver.upload_volume(target.uri, pool, name, length, chunks, timeout)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def prepare_console_log(move: Move, undo: Undo) -> None:
    """The target's log pool and the file the domain is to log its console to there
    (listed as a leftover until the move is recorded: a live move's QEMU starts it)."""
    vm, target = move.vm, move.target
    if vm.console_log_pool is None:
        return  # defined before vmapi logged consoles: it keeps having none
    config = current_app.config
    try:
        directory = hypervisor().pool_dir(target.uri, vm.console_log_pool,
                                          config["CONSOLE_LOG_DIR"])  # fmt: skip
    except HypervisorError as exc:
        raise hypervisor_failure(exc, "preparing the console log on the target", target) from exc
    name = console_log_name(vm.domain_name)
    move.console_log = f"{directory.rstrip('/')}/{name}"
    note_leftover(target.node.id, LOG, name, f"made for the move of vm-{vm.id}", vm.id,
                  vm.console_log_pool)  # fmt: skip
    db.session.commit()
    pool = vm.console_log_pool
    undo.push(f"deleting the console log {pool}/{name} made on node {target.node.fqdn}",
              lambda: delete_listed_log(target, pool, name),
              Left(target.node.id, LOG, name, vm.id, pool))  # fmt: skip


def prepare_seed(move: Move, undo: Undo) -> None:
    """The VM's cloud-init seed on the target, made from the database as every seed is
    (the same content gives the same name and bytes), listed as a leftover until the move
    is recorded. Only pointed at, never copied: the domain's seed disk is read-only."""
    vm, target = move.vm, move.target
    if vm.seed_volume is None:
        return  # a VM without an image has no seed
    if seed_pool_shared():
        # every node sees it where it is: nothing to make (a shared volume is checked)
        seed = Seed(vm.id, vm.seed_pool, vm.seed_volume, path=vm.seed_path)
        _find_shared(move, MovedVolume(seed, "raw", shared=True), undo)
        return
    files = seed_files(vm)
    pool, name, data = seed_pool(), volume_name(vm, files), seed_iso(files)
    step = "making the cloud-init seed on the target"
    try:
        directory = pool_directory(target.node.id, pool, vm.virt_method_id)
        hypervisor().ensure_pool(target.uri, pool, directory)
        if find_leftover(target.node.id, VOLUME, name, pool):
            delete_listed_volume(target, pool, name)  # an earlier move's
        timeout = float(current_app.config["LIBVIRT_TIMEOUT"])

        def upload() -> str:
            return hypervisor().upload_volume(target.uri, pool, name, len(data), [data], timeout)

        seed = MovedVolume(Seed(vm.id, pool, name), "raw", shared=False)
        move.seed_path = _make(move, seed, undo, upload)
        move.seed_volume = (pool, name)
    except HypervisorError as exc:
        raise hypervisor_failure(exc, step, target) from exc


@dataclass(frozen=True)
class Seed:
    """A seed volume in the shape a storage row is read in here."""

    vm_id: int
    pool: str
    volume_name: str
    id: str = "seed"
    path: str | None = None


def seed_pool_shared() -> bool:
    """Whether seeds are in a pool every node sees (their storage type is shared)."""
    stmt = select(StorageType.shared).where(StorageType.name == SEED_STORAGE_TYPE)
    return bool(db.session.scalars(stmt).one())


def remove_source_leftovers(move: Move) -> list[str]:
    """Delete what the domain left on the source (listed as leftovers by the record):
    its volumes and its console log. Anything that cannot go stays listed for reconcile;
    a note says so."""
    notes = []
    source = move.source
    for volume in move.copied:
        storage = volume.storage
        try:
            delete_listed_volume(source, storage.pool, storage.volume_name)
        except HypervisorError as exc:
            db.session.rollback()
            notes.append(f"The old volume of storage {storage.id} on {source.node.fqdn} could "
                         f"not be deleted ({exc.reason}); `flask vmapi reconcile --fix` removes "
                         "it.")  # fmt: skip
    if move.seed_volume is not None and move.old_seed is not None:
        pool, name = move.old_seed
        try:
            delete_listed_volume(source, pool, name)
        except HypervisorError as exc:
            db.session.rollback()
            notes.append(f"The old cloud-init seed on {source.node.fqdn} could not be deleted "
                         f"({exc.reason}); `flask vmapi reconcile --fix` removes it.")  # fmt: skip
    if move.console_log is not None and move.vm.console_log_pool is not None:
        try:
            delete_listed_log(source, move.vm.console_log_pool,
                              console_log_name(move.vm.domain_name))  # fmt: skip
        except HypervisorError as exc:
            db.session.rollback()
            notes.append(f"The old console log on {source.node.fqdn} could not be deleted "
                         f"({exc.reason}); `flask vmapi reconcile --fix` removes it.")  # fmt: skip
    try:  # the filters of the VM's NICs, and its groups' where no other VM there uses them
        prune(source)
    except HypervisorError as exc:
        db.session.rollback()
        notes.append(f"The network filters vm-{move.vm.id} left on {source.node.fqdn} could "
                     f"not be removed ({exc.reason}); `flask vmapi reconcile --fix` removes "
                     "them.")  # fmt: skip
    return notes
