"""Rebuilding a VM from an image: ``POST /vm/<id>/rebuild`` (API.md "Rebuild").

The VM keeps its row, id, UUID, domain, interfaces and addresses, data volumes and what
its guest is told; it gets a new root disk from an image (its own saved image, or any
image it may boot) and a new cloud-init seed with a new instance-id
(:func:`vmapi.services.vms.cloud_init.instance_base`). All or nothing, under the VM's
lock, every step with its named inverse:

1. checks, nothing written: the VM has a root disk and a domain on a node that answers,
   the image is one the VM's owner may boot (as for POST /vm), the size;
2. the VM's row names the new image and, when the disk grows, its root disk's row the
   new size (checked against the owner's ``max_storage`` under the quota row's lock),
   committed: from here on the image cannot be deleted and the quota counts the size;
3. with the image's copy on the node held (made first when missing): the new overlay
   and the new seed, under names of their own, each listed in the leftover ledger
   before it exists (:mod:`.rebuild_ledger`);
4. the network filters the NICs reference; the domain stopped (the ACPI button, up to
   SHUTDOWN_TIMEOUT, then destroyed), defined with the new root disk and seed, started;
5. one commit records it: the root disk's row (volume, path, image, size), the seed,
   the state, the audit event ``rebuild``; the new volumes leave the ledger, the old
   ones enter it;
6. the old root disk and seed are deleted, and the old image's copy on the node when no
   root disk uses it any more; what cannot go stays listed for reconcile, and the
   answer says so.

A failure before 5 plays the stack backwards (the domain defined with its old disks and
started again if it ran, the new volumes deleted, the rows restored) and the answer
names the step. A rebuilt VM always ends running.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from flask import current_app
from sqlalchemy import select, update

from vmapi.auth import Principal
from vmapi.error_ids import VM_NO_ROOT_DISK, VM_QUOTA_EXCEEDED, VM_STATE_CONFLICT
from vmapi.errors import Conflict
from vmapi.extensions import db
from vmapi.hypervisor import (
    PAUSED,
    RUNNING,
    SHUTOFF,
    DiskSpec,
    DomainInfo,
    DomainNotFound,
    DomainSpec,
    HypervisorError,
    NameTaken,
)
from vmapi.hypervisor.rbd import RbdBusy
from vmapi.models import Image, Storage, StorageType, VirtMethod, Vm
from vmapi.models.image import ACTIVE
from vmapi.node_detail import NodeNote
from vmapi.services import audit
from vmapi.services.crud import Outcome
from vmapi.services.images.copies import (
    CopyGone,
    Held,
    Source,
    find_copy,
    held_copy,
    pool_directory,
    remove_if_unused,
    root_type,
)
from vmapi.services.images.rbd_copies import (
    held_rbd_image,
    in_ceph_only,
    rbd_homes,
    remove_rbd_if_unused,
)
from vmapi.services.leftovers import delete_listed_volume
from vmapi.services.locks import vm_locks
from vmapi.services.names import rebuilt_volume_name
from vmapi.services.network.protection import ensure_for_vm
from vmapi.services.nodes.domains import (
    BUILDING,
    hypervisor_failure,
    name_taken,
    node_detail,
    record_state,
    state_id,
)
from vmapi.services.nodes.hosts import Host, hypervisor
from vmapi.services.quotas import check_storage_quota
from vmapi.services.storage.ceph import KeyUnreadable, librbd_client
from vmapi.services.undo import Undo, run_undo
from vmapi.services.vms.boot import (
    ROOT_TARGET,
    bootable_image,
    disk_size,
    image_not_found,
    not_active,
)
from vmapi.services.vms.changes import wait_for
from vmapi.services.vms.cloud_init import place_seed, seed_files, seed_pool, wanted
from vmapi.services.vms.cloud_init import volume_name as seed_volume_name
from vmapi.services.vms.rebuild_ledger import Listed, defining, recorded
from vmapi.services.vms.rows import VmRows
from vmapi.services.vms.specs import SEED_TARGET, domain_spec

READING = "reading the domain's state"


@dataclass
class Rebuild:
    """A checked rebuild: the VM and its node, what it gets, what it had, and how far
    it got (``step``, named in a failure's answer)."""

    vm: Vm
    host: Host
    source: Source  # the image, as read when checked
    size: int
    state: str  # the domain's, before
    root_id: int
    pool: str  # the root disk's (and its base copy's)
    old_volume: str
    old_size: int
    old_image_id: int  # the root disk's
    vm_image_id: int | None  # the VM row's
    old_seed: tuple[str | None, str | None]  # pool, volume
    new_volume: str = ""
    new_path: str = ""
    #: the root disk's rbd type (its new disk an RBD clone of the image); None: local
    rbd_type_id: int | None = None
    new_seed: tuple[str, str, str] | None = None  # pool, volume, path
    step: str = READING
    listed: list[Listed] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


def rebuild_vm(ident: int, principal: Principal, image: int,
               root_size: int | None = None) -> Outcome[Vm]:  # fmt: skip
    """Give VM ``ident`` a new root disk from image ``image`` (``root_size`` bytes, see
    :func:`vmapi.services.vms.boot.disk_size`; default: its present size or the image's,
    the larger) and a new seed; the VM as it runs now."""
    with vm_locks([ident]):
        vm = VmRows().get(ident, principal)
        plan = plan_rebuild(vm, image, root_size)
        undo = Undo()
        try:
            reserve(plan, undo)
            replace_disks(plan, undo)
        except HypervisorError as exc:
            error = hypervisor_failure(exc, plan.step, plan.host)
            run_undo(undo)
            raise error from exc
        except CopyGone as exc:  # (the VM's row holds the image: only if that changes)
            run_undo(undo)
            raise image_not_found(plan.source.id) from exc
        except BaseException:
            run_undo(undo)
            raise
        messages = [*plan.messages, *retire(plan), rebuilt(plan)]
        return Outcome(VmRows().loaded([vm]), messages)


def plan_rebuild(vm: Vm, image_id: int, root_size: int | None) -> Rebuild:
    """Step 1: the checks (nothing is written)."""
    if vm.vm_state_id == state_id(BUILDING):
        raise Conflict(f"vm-{vm.id} is still being built; rebuild it once it is made.",
                       error_id=VM_STATE_CONFLICT)  # fmt: skip
    if vm.migration_node_id is not None:
        raise Conflict(
            f"The last move of vm-{vm.id} did not finish; a new migrate (or `flask vmapi "
            "reconcile --fix`) settles it first.",
            error_id=VM_STATE_CONFLICT,
        )
    root = db.session.scalars(
        select(Storage).where(Storage.vm_id == vm.id, Storage.boot.is_(True))
    ).first()
    if root is None or root.volume_name is None or root.path is None:
        raise Conflict(
            f"vm-{vm.id} was made without an image: it has no root disk to rebuild.",
            error_id=VM_NO_ROOT_DISK,
            data={"vm": {"id": vm.id}},
        )
    image = bootable_image(image_id, vm.customer_id)
    size = disk_size(image, root_size, vm.ram, default=root.size)
    host = Host.of(vm.node_id)  # (a URI that may not be opened: 409, nothing touched)
    try:
        state = hypervisor().domain(host.uri, vm.domain_name).state
    except DomainNotFound as exc:
        raise Conflict(
            f"vm-{vm.id} has no domain on its node; `flask vmapi reconcile` reports it.",
            error_id=VM_STATE_CONFLICT,
            data=node_detail(exc, host),
        ) from exc
    except HypervisorError as exc:
        raise hypervisor_failure(exc, READING, host) from exc
    rbd = None if root.storage_type_id == root_type().id else root.storage_type_id
    if rbd is None and image.file is None:
        raise in_ceph_only(image)
    if rbd is not None and image.file is None and rbd not in rbd_homes(image.id):
        raise in_ceph_only(image)
    return Rebuild(vm, host, Source.of(image), size, state, root.id, root.pool,
                   root.volume_name, root.size, root.image_id, vm.image_id,
                   (vm.seed_pool, vm.seed_volume), rbd_type_id=rbd)  # fmt: skip


def reserve(plan: Rebuild, undo: Undo) -> None:
    """Step 2: the VM's row names the new image (held under a share lock until then:
    a delete waits, then sees it in use), the root disk's row a larger size (counted
    against the owner's quota), committed."""
    vm = plan.vm
    grows = plan.size - plan.old_size
    try:
        stmt = select(Image).where(Image.id == plan.source.id).with_for_update(read=True)
        image = db.session.scalars(stmt).first()
        if image is None:
            raise image_not_found(plan.source.id)
        if image.state != ACTIVE:
            raise not_active(image)
        if grows > 0:
            check_storage_quota(vm.customer_id, grows, VM_QUOTA_EXCEEDED)
        _set_rows(plan, plan.source.id, max(plan.size, plan.old_size))
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise

    def restore() -> None:
        _set_rows(plan, plan.vm_image_id, plan.old_size)
        db.session.commit()

    undo.push(f"restoring the image and root disk size recorded for vm-{vm.id}", restore)


def _set_rows(plan: Rebuild, image_id: int | None, size: int) -> None:
    # (Core statements: the audit trail records the rebuild once, when it is done)
    db.session.execute(update(Vm).where(Vm.id == plan.vm.id).values(image_id=image_id)
                       .execution_options(synchronize_session=False))  # fmt: skip
    db.session.execute(update(Storage).where(Storage.id == plan.root_id).values(size=size)
                       .execution_options(synchronize_session=False))  # fmt: skip


def replace_disks(plan: Rebuild, undo: Undo) -> None:
    """Steps 3 to 5, with the image's copy on the node (or its RBD image) held until the
    rows use it."""
    if plan.rbd_type_id is not None:
        replace_rbd_disks(plan, undo)
        return
    plan.step = "copying the image to the node"
    directory = pool_directory(plan.host.node.id, plan.pool, plan.vm.virt_method_id)
    db.session.commit()  # (only read) nothing stays open across the copy
    with held_copy(plan.source, plan.host, plan.pool, directory) as held:
        if held.made:
            copy_id = held.copy.id
            undo.push(f"removing the copy of image {plan.source.id} from node "
                      f"{plan.host.node.fqdn} unless used",
                      lambda: remove_if_unused(copy_id))  # fmt: skip
        make_volumes(plan, held, undo)
        info = swap_domain(plan, undo)
        record(plan, info)
        undo.steps.clear()  # recorded: nothing of it is undone from here on


def replace_rbd_disks(plan: Rebuild, undo: Undo) -> None:
    """Steps 3 to 5 for a root disk in an rbd type: the image's RBD image (written into
    the type's Ceph pool when missing) held until the rows use the new clone."""
    storage_type = db.session.get(StorageType, plan.rbd_type_id)
    db.session.commit()  # (only read) nothing stays open across the cluster's answers
    plan.step = "writing the image into Ceph"
    with held_rbd_image(plan.source, storage_type) as held:
        if held.made:
            row_id = held.row.id
            undo.push(f"removing image {plan.source.id} from Ceph pool "
                      f"{storage_type.ceph_pool} unless used",
                      lambda: remove_rbd_if_unused(row_id))  # fmt: skip

        def clone(name: str) -> str:
            try:
                client = librbd_client(storage_type)
            except KeyUnreadable as exc:
                raise HypervisorError("rbd:", str(exc)) from exc
            # in process, as POST /vm's clone: no process to start, no new connection to
            # the cluster for each of the clone and its growth
            client.clone(held.row.ceph_pool, held.row.rbd_name, held.row.snapshot, name,
                         plan.size)  # fmt: skip
            return f"{held.row.ceph_pool}/{name}"

        make_volumes(plan, None, undo, clone)
        info = swap_domain(plan, undo)
        record(plan, info)
        undo.steps.clear()


def make_volumes(
    plan: Rebuild, held: Held | None, undo: Undo, clone: Callable[[str], str] | None = None
) -> None:
    """Step 3: the new root disk (an overlay on the copy, or ``clone``'s RBD clone) and
    the new seed."""
    vm, host = plan.vm, plan.host
    plan.step = "creating the root disk"
    plan.new_volume = rebuilt_volume_name(plan.old_volume)
    root = Listed(host, vm.id, plan.pool, plan.new_volume, "root disk", undo)
    plan.listed.append(root)
    try:
        if clone is not None:
            plan.new_path = clone(plan.new_volume)
        else:
            assert held is not None
            plan.new_path = hypervisor().create_overlay(host.uri, plan.pool, plan.new_volume,
                                                        plan.size, held.copy.volume_name,
                                                        plan.source.format)  # fmt: skip
    except (NameTaken, RbdBusy) as exc:
        raise name_taken(exc, f"{plan.pool}/{plan.new_volume}", host, "a volume",
                         done="nothing was changed") from exc  # fmt: skip
    root.made = True
    if not wanted(vm):
        return
    files = seed_files(vm, root_volume=plan.new_volume)  # (a new instance-id)
    seed = Listed(host, vm.id, seed_pool(), seed_volume_name(vm, files), "cloud-init seed",
                  undo)  # fmt: skip
    plan.listed.append(seed)
    made, path = place_seed(vm, host, files, Undo())  # (its inverse is the listing's)
    seed.made = True
    plan.new_seed = (made.pool, made.name, path)


def rebuilt_spec(spec: DomainSpec, plan: Rebuild) -> DomainSpec:
    """The domain as it is, with the new root disk and seed."""
    # (a network disk is named by its RBD image, a file disk by its path)
    path = plan.new_volume if plan.rbd_type_id is not None else plan.new_path
    disks = tuple(replace(disk, path=path) if disk.target == ROOT_TARGET else disk
                  for disk in spec.disks)  # fmt: skip
    if plan.new_seed is None:
        return replace(spec, disks=disks)
    seed = DiskSpec(path=plan.new_seed[2], format="raw", target=SEED_TARGET, readonly=True)
    return replace(spec, disks=disks, seed=seed)


def swap_domain(plan: Rebuild, undo: Undo) -> DomainInfo:
    """Step 4: stop the domain, define it with the new disks, start it; its state."""
    vm, host = plan.vm, plan.host
    driver = hypervisor()
    uri, name = host.uri, vm.domain_name
    method = db.session.get(VirtMethod, vm.virt_method_id)
    old_spec = domain_spec(vm, method, host.node, current_app.config)  # the rows: as it is
    new_spec = rebuilt_spec(old_spec, plan)
    ensure_for_vm(host, vm.id)  # (they are there already: a node that lost them gets them)
    plan.step = "stopping the domain"
    stop(plan, undo)
    plan.step = "defining the domain"
    defining(plan.listed)
    driver.define(uri, new_spec)
    undo.push(f"redefining {name} with its old root disk and seed",
              lambda: driver.define(uri, old_spec))  # fmt: skip
    plan.step = "starting the domain"
    driver.start(uri, name)
    undo.push(f"powering {name} off", lambda: driver.destroy(uri, name))
    plan.step = READING
    return driver.domain(uri, name)


def stop(plan: Rebuild, undo: Undo) -> None:
    """Power the domain off: a running (or paused) guest is asked first, with the ACPI
    button, and has SHUTDOWN_TIMEOUT seconds (its data volumes stay with it)."""
    driver = hypervisor()
    uri, name = plan.host.uri, plan.vm.domain_name
    if plan.state in (RUNNING, PAUSED):

        def start_again() -> None:
            if driver.domain(uri, name).state not in (RUNNING, PAUSED):
                driver.start(uri, name)

        undo.push(f"starting {name} again", start_again)
        if plan.state == PAUSED:
            driver.resume(uri, name)  # a paused guest cannot see the ACPI button
        driver.shutdown(uri, name)
        if not wait_for(plan.host, name, SHUTOFF):
            plan.messages.append(
                f"vm-{plan.vm.id} had not shut down after "
                f"{current_app.config['SHUTDOWN_TIMEOUT']:g} s; it was powered off."
            )
    driver.destroy(uri, name)  # (one that is off already stays as it is)


def record(plan: Rebuild, info: DomainInfo) -> None:
    """Step 5: the rebuild recorded in one commit."""
    vm, host = plan.vm, plan.host
    replaced = [(plan.pool, plan.old_volume)]
    if plan.new_seed is not None and plan.old_seed[1] is not None:
        replaced.append((plan.old_seed[0], plan.old_seed[1]))
    recorded(plan.listed, replaced, host, vm.id)
    db.session.execute(
        update(Storage).where(Storage.id == plan.root_id)
        .values(volume_name=plan.new_volume, path=plan.new_path, image_id=plan.source.id,
                size=plan.size)
        .execution_options(synchronize_session=False)
    )  # fmt: skip
    if plan.new_seed is not None:
        pool, volume, path = plan.new_seed
        db.session.execute(
            update(Vm).where(Vm.id == vm.id)
            .values(seed_pool=pool, seed_volume=volume, seed_path=path)
            .execution_options(synchronize_session=False)
        )  # fmt: skip
    before = {"image_id": plan.vm_image_id, "storage": {"id": plan.root_id, "size": plan.old_size}}
    after = {"image_id": plan.source.id, "storage": {"id": plan.root_id, "size": plan.size},
             "seed_rebuilt": plan.new_seed is not None}  # fmt: skip
    audit.record(db.session, "vm", vm.id, "rebuild", before, after, customer_id=vm.customer_id)
    record_state(vm, info)  # commits


def retire(plan: Rebuild) -> list[str]:
    """Step 6: the old root disk and seed deleted, and the old image's copy when no root
    disk on the node uses it; a note for each that could not go."""
    host, notes = plan.host, []
    replaced = [(plan.pool, plan.old_volume, "root disk")]
    if plan.new_seed is not None and plan.old_seed[1] is not None:
        replaced.append((plan.old_seed[0], plan.old_seed[1], "cloud-init seed"))
    for pool, name, what in replaced:
        try:
            delete_listed_volume(host, pool, name)
        except HypervisorError as exc:
            db.session.rollback()
            notes.append(NodeNote(
                f"The replaced {what} of vm-{plan.vm.id} could not be deleted on its node; "
                "`flask vmapi reconcile --fix` removes it.",
                f"{pool}/{name} on {host.node.fqdn}: {exc.reason}",
            ))  # fmt: skip
    same = plan.old_image_id == plan.source.id
    copy = None if same else find_copy(plan.old_image_id, host.node.id)
    if copy is not None:
        try:
            remove_if_unused(copy.id)
        except HypervisorError as exc:
            db.session.rollback()
            notes.append(NodeNote(
                f"The node keeps its copy of image {plan.old_image_id}, which no root disk "
                "there uses now; it goes with the image.",
                f"{copy.pool}/{copy.volume_name} on {host.node.fqdn}: {exc.reason}",
            ))  # fmt: skip
    return notes


def rebuilt(plan: Rebuild) -> str:
    """What the answer says of a rebuild done."""
    seed = " and a new cloud-init seed (a new instance-id)" if plan.new_seed else ""
    return (f"vm-{plan.vm.id} was rebuilt from image {plan.source.id}: a new root disk of "
            f"{plan.size} bytes{seed}; it runs.")  # fmt: skip
