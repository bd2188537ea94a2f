"""The guest's cloud-init NoCloud seed, made from the inventory and kept in step with it.

A VM booted from an image gets a seed (API.md "Guest configuration"; not when its domains
run no guest that reads disks: :data:`NO_GUEST_DISKS`): the three NoCloud
files of :mod:`vmapi.nocloud` (its host name, SSH keys and user data; each interface by
MAC with its addresses, gateways and the configured DNS servers) in an ISO 9660 volume
labelled ``cidata``. The volume is uploaded through libvirt into the node's pool of the
seeded ``local-qcow2`` storage type, recorded on the VM's row (``seed_pool``,
``seed_volume``, ``seed_path``; never a /storage object) and attached read-only as the
virtio disk ``vdz`` (:data:`vmapi.services.vms.specs.SEED_TARGET`, which /storage never
hands out), after the other disks.

Kept in step, never changed in place: whenever what the seed carries changes, a new
volume is uploaded under a name of its own (the VM's domain name and the digest the
instance-id carries, so an unchanged seed is not made again), the row records it and the
caller redefines the domain to use it; the old volume is deleted only once the whole
request has succeeded (:func:`delete_retired`), since until then an undo may need it.
A running domain keeps the volume it started with open (its file is unlinked, not
truncated) and reads the new seed at its next start; the new instance-id then makes
cloud-init apply the network and keys again. Every step pushes its inverse on the
request's undo stack.

The instance-id's base is the VM's domain name; once the VM was rebuilt from an image
(POST /vm/<id>/rebuild gives its root disk a new volume name, ``...-r<6 hex digits>``,
:func:`vmapi.services.names.rebuilt_volume_name`) that suffix is part of it, so every
rebuild gives the guest a new instance-id whatever the seed carries, and VMs never
rebuilt keep the id (and the seed volume) they have (:func:`instance_base`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flask import current_app
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError, NameTaken, VolumeNotFound
from vmapi.models import Interface, Storage, StorageType, VirtMethod, Vm
from vmapi.models.leftover import VOLUME
from vmapi.nocloud import AddressSeed, NicSeed, SeedFiles, SeedSpec, build_seed, seed_iso
from vmapi.node_detail import NodeNote
from vmapi.services.images.copies import pool_directory
from vmapi.services.leftovers import Left
from vmapi.services.names import rebuild_suffix
from vmapi.services.nodes.domains import hypervisor_failure, name_taken
from vmapi.services.nodes.hosts import Host, hypervisor
from vmapi.services.undo import Undo

log = logging.getLogger(__name__)

#: The storage type whose pool holds seeds (and root disks) on every node.
SEED_STORAGE_TYPE = "local-qcow2"
#: Domain types whose domains run no guest that reads a disk: libvirt's test driver
#: (nothing runs) and containers (no disks). Their VMs get no seed, image or not.
NO_GUEST_DISKS = frozenset({"test", "lxc", "openvz"})
#: VM fields the seed carries (besides the interfaces' addresses).
GUEST_FIELDS = ("hostname", "ssh_keys", "user_data")


@dataclass(frozen=True)
class SeedVolume:
    """A seed volume on a node, by where it is."""

    node_id: int
    pool: str
    name: str


def wanted(vm: Vm) -> bool:
    """Whether the VM has a seed: one booted from an image (or that has one already),
    unless its domains run no guest that reads disks (:data:`NO_GUEST_DISKS`)."""
    if vm.seed_volume is not None:
        return True
    if vm.image_id is None:
        return False
    return db.session.get(VirtMethod, vm.virt_method_id).domain_type not in NO_GUEST_DISKS


def instance_base(vm: Vm, root_volume: str | None = None) -> str:
    """The instance-id's base: the domain's name, and the rebuild suffix of the root
    disk's volume name (``root_volume``, else as its row says) when it has one."""
    domain = vm.domain_name or f"vm-{vm.id}"
    if root_volume is None:
        stmt = select(Storage.volume_name).where(Storage.vm_id == vm.id, Storage.boot.is_(True))
        root_volume = db.session.scalars(stmt).first()
    suffix = rebuild_suffix(root_volume or "")
    return f"{domain}-{suffix}" if suffix else domain


def seed_spec(vm: Vm, root_volume: str | None = None) -> SeedSpec:
    """What the guest is told, from the database: NICs ``eth0``, ``eth1``... in interface
    order, each address in id order, so an unchanged inventory gives the same seed.
    ``root_volume``: the root disk's volume name, when it is not yet the row's (a
    rebuild)."""
    stmt = (
        select(Interface)
        .where(Interface.vm_id == vm.id)
        .order_by(Interface.id)
        .options(selectinload(Interface.ipv4), selectinload(Interface.ipv6))
        # an address change (or its undo) in this request may have moved rows the
        # session had loaded
        .execution_options(populate_existing=True)
    )
    nics = tuple(
        NicSeed(
            name=f"eth{index}",
            mac=iface.mac,
            ipv4=tuple(AddressSeed(a.address, a.prefix, a.gateway) for a in iface.ipv4),
            ipv6=tuple(AddressSeed(a.address, a.prefix, a.gateway) for a in iface.ipv6),
        )
        for index, iface in enumerate(db.session.scalars(stmt))
    )
    return SeedSpec(
        base_instance_id=instance_base(vm, root_volume),
        hostname=vm.hostname or vm.name,
        ssh_keys=tuple(vm.ssh_keys or ()),
        user_data=vm.user_data,
        nics=nics,
        dns_servers=tuple(current_app.config["DNS_SERVERS"]),
    )


def seed_files(vm: Vm, root_volume: str | None = None) -> SeedFiles:
    return build_seed(seed_spec(vm, root_volume))


def volume_name(vm: Vm, files: SeedFiles) -> str:
    """``<instance-id base>-seed-<the instance-id's digest>`` (the base is the domain's
    name unless the VM was rebuilt): one name per content."""
    base, digest = files.instance_id.rsplit("-", 1)
    return f"{base}-seed-{digest}"


def seed_pool() -> str:
    return db.session.scalars(
        select(StorageType.pool).where(StorageType.name == SEED_STORAGE_TYPE)
    ).one()


def new_seed(vm: Vm) -> SeedFiles | None:
    """The seed the database describes for the VM, when it is not the one recorded."""
    files = seed_files(vm)
    return None if volume_name(vm, files) == vm.seed_volume else files


def refresh_seed(vm: Vm, host: Host, undo: Undo, retired: list[SeedVolume] | None = None) -> bool:
    """Make the VM's seed what the database says (:func:`upload_seed`); False when the
    recorded seed is that one already."""
    files = new_seed(vm)
    if files is None:
        return False
    upload_seed(vm, host, files, undo, retired)
    return True


def place_seed(vm: Vm, host: Host, files: SeedFiles, undo: Undo) -> tuple[SeedVolume, str]:
    """Upload ``files`` as the VM's seed volume on ``host`` (the VM's node, or the node it
    moves to) without recording it; the volume and its path. Its undo deletes it."""
    name = volume_name(vm, files)
    driver = hypervisor()
    pool = seed_pool()
    step = "preparing the storage pool for the cloud-init seed"
    try:
        driver.ensure_pool(host.uri, pool, pool_directory(host.node.id, pool, vm.virt_method_id))
        step = "uploading the cloud-init seed"
        data = seed_iso(files)
        timeout = float(current_app.config["LIBVIRT_TIMEOUT"])
        path = driver.upload_volume(host.uri, pool, name, len(data), [data], timeout)
    except NameTaken as exc:
        raise name_taken(
            exc, f"{pool}/{name}", host, "a volume", done="nothing was changed"
        ) from exc
    except HypervisorError as exc:
        raise hypervisor_failure(exc, step, host) from exc
    made = SeedVolume(host.node.id, pool, name)
    undo.push(f"deleting cloud-init seed {pool}/{name} on node {host.node.fqdn}",
              lambda: delete_seed_volume(made, host),
              Left(host.node.id, VOLUME, name, vm.id, pool))  # fmt: skip
    return made, path


def upload_seed(
    vm: Vm, host: Host, files: SeedFiles, undo: Undo, retired: list[SeedVolume] | None = None
) -> None:
    """Upload the seed under its own name and record it on the row (the domain is
    redefined by the caller). The seed it replaces is added to ``retired``, for
    :func:`delete_retired` once the request has succeeded."""
    made, path = place_seed(vm, host, files, undo)
    before = (vm.seed_pool, vm.seed_volume, vm.seed_path)
    vm.seed_pool, vm.seed_volume, vm.seed_path = made.pool, made.name, path
    db.session.commit()

    def restore() -> None:
        row = db.session.get(Vm, vm.id)
        if row is not None:  # (a VM being created is forgotten after this)
            row.seed_pool, row.seed_volume, row.seed_path = before
            db.session.commit()

    undo.push(f"restoring the seed recorded for vm-{vm.id}", restore)
    if before[1] is not None and retired is not None:
        old = SeedVolume(vm.node_id, before[0], before[1])
        retired.append(old)
        undo.push(f"keeping seed {old.pool}/{old.name}", lambda: retired.remove(old))


def delete_seed_volume(seed: SeedVolume, host: Host | None = None) -> bool:
    """Delete a seed volume; False when it was gone already."""
    host = host or Host.of(seed.node_id)
    try:
        hypervisor().delete_volume(host.uri, seed.pool, seed.name)
    except VolumeNotFound:
        return False
    return True


def delete_seed(vm: Vm, host: Host) -> None:
    """Delete the VM's seed volume once its domain is gone (the row goes next: the caller
    forgets the VM). A failure is the request's (502/504); one that was gone is no error,
    so a retried delete finishes."""
    if vm.seed_volume is None:
        return
    try:
        delete_seed_volume(SeedVolume(vm.node_id, vm.seed_pool, vm.seed_volume), host)
    except HypervisorError as exc:
        raise hypervisor_failure(exc, "deleting the cloud-init seed", host) from exc


def delete_retired(retired: list[SeedVolume]) -> list[str]:
    """Delete the seeds a successful request replaced; notes for the answer about any
    that could not go (reconcile reports them as volumes nobody owns)."""
    notes = []
    for seed in retired:
        host = Host.of(seed.node_id)
        try:
            delete_seed_volume(seed, host)
        except HypervisorError as exc:
            log.warning("could not delete the replaced seed %s/%s: %s", seed.pool, seed.name, exc)
            notes.append(
                NodeNote(
                    "A replaced cloud-init seed could not be deleted on the node; "
                    "`flask vmapi reconcile` reports it.",
                    f"{seed.pool}/{seed.name} on {host.node.fqdn}: {exc.reason}",
                )
            )
    retired.clear()
    return notes


def rebuilt_message(vm: Vm, running: bool) -> str:
    """What an answer says when the seed was rebuilt."""
    when = (
        "when it is next started (it runs with the previous seed until it is powered off: "
        "a reboot inside the guest keeps it)"
        if running
        else "when it is next started"
    )
    return f"The cloud-init seed of vm-{vm.id} was rebuilt; the guest reads it {when}."
