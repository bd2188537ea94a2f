"""What a VM's domain needs, from the database's point of view (a ``DomainSpec``).

The persistent definition on the host is always rewritten from this, so the database
stays the truth: a resize changes the row, then redefines the domain from it.
"""

from __future__ import annotations

import secrets
import string
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import joinedload

from vmapi.bridges import bridge_name
from vmapi.extensions import db
from vmapi.hypervisor import CephSource, DiskSpec, DisplaySpec, DomainSpec, NicSpec
from vmapi.models import CacheOption, Interface, Node, Storage, StorageType, VirtMethod, Vm
from vmapi.models.catalog import RBD
from vmapi.services.names import installation_id
from vmapi.services.network.allocation import NewInterface
from vmapi.services.network.filters import guarded_mode, nic_filter

MIB = 1024 * 1024
#: A display password's expiry long past: libvirt has QEMU expire it at once.
SEALED = datetime(2000, 1, 1, tzinfo=UTC)
#: VNC authentication uses at most 8 characters of a password.
DISPLAY_PASSWORD_LENGTH = 8
DISPLAY_PASSWORD_ALPHABET = string.ascii_letters + string.digits
#: The guest's cloud-init seed is attached as this disk, which /storage never hands out.
SEED_TARGET = "vdz"


def device_name(mode: str, suffix: str, bridge: str, vlan: int | None = None) -> str | None:
    """The host device of a NIC: the bridge the node's template names (made by the host's
    configuration), or the tap (``suffix`` is the interface's, :mod:`vmapi.services.names`;
    ``bridge`` the template, :mod:`vmapi.bridges`)."""
    if mode == "bridge":
        return bridge_name(bridge, suffix, vlan)
    if mode == "ethernet":
        return f"vm{suffix}"
    return None


def bridge_template(node: Node, config: dict[str, Any]) -> str:
    return node.bridge or config["BRIDGE_TEMPLATE"]


def nic_spec(mac: str, suffix: str, mode: str, bridge: str, v4: Any, v6: Any,
             vlan: int | None, guard: dict[str, Any] | None = None) -> NicSpec:  # fmt: skip
    """One NIC; ``v4``/``v6``: an address row or a :class:`~vmapi.services.network.allocation.Held`
    (``address``, ``prefix``, ``gateway``), or None; ``guard``: its network filter
    (:func:`vmapi.services.network.protection.nic_filter`) in a guarded mode."""
    return NicSpec(
        **(guard or {}),
        mac=mac,
        mode=mode,
        device=device_name(mode, suffix, bridge, vlan),
        ipv4=f"{v4.address}/{v4.prefix}" if v4 else None,
        ipv4_gateway=v4.gateway if v4 else None,
        ipv6=f"{v6.address}/{v6.prefix}" if v6 else None,
        ipv6_gateway=v6.gateway if v6 else None,
        vlan=vlan,
    )


def nic_specs(vm_id: int, mode: str, bridge: str) -> tuple[NicSpec, ...]:
    stmt = (
        select(Interface)
        .where(Interface.vm_id == vm_id)
        .order_by(Interface.id)
        .options(joinedload(Interface.ipv4), joinedload(Interface.ipv6), joinedload(Interface.vlan))
        # The definition is written from the database: refresh what the session holds
        # (an undo may have changed rows whose relationships it had loaded before).
        .execution_options(populate_existing=True)
    )
    return tuple(
        nic_spec(
            iface.mac,
            iface.device_suffix,
            mode,
            bridge,
            iface.ipv4[0] if iface.ipv4 else None,
            iface.ipv6[0] if iface.ipv6 else None,
            iface.vlan.tag if iface.vlan else None,
            nic_filter(
                iface.id,
                iface.mac,
                [a.address for a in iface.ipv4],
                [a.address for a in iface.ipv6],
            )
            if guarded_mode(mode)
            else None,
        )
        for iface in db.session.scalars(stmt).unique()
    )


def new_nic_specs(
    made: list[NewInterface], node: Node, config: dict[str, Any]
) -> tuple[NicSpec, ...]:
    """The NICs of a VM being created, from what creating them returned (no VLAN yet):
    the same definition :func:`nic_specs` reads back, without the read."""
    mode, bridge = interface_mode(node, config), bridge_template(node, config)
    return tuple(
        nic_spec(
            new.row.mac,
            new.row.device_suffix,
            mode,
            bridge,
            new.ipv4,
            new.ipv6,
            None,
            nic_filter(
                new.row.id,
                new.row.mac,
                [new.ipv4.address] if new.ipv4 else [],
                [new.ipv6.address] if new.ipv6 else [],
            )
            if guarded_mode(mode)
            else None,
        )
        for new in made
    )


IOTUNE = {
    "read_iops_limit": "read_iops_sec",
    "write_iops_limit": "write_iops_sec",
    "read_bps_limit": "read_bytes_sec",
    "write_bps_limit": "write_bytes_sec",
}


def ceph_source(storage_type: StorageType) -> CephSource | None:
    """The type's Ceph pool as the driver takes it; None for a type that is not rbd."""
    if storage_type.backend != RBD:
        return None
    monitors = []
    for monitor in storage_type.ceph_monitors or ():
        host, _, port = monitor.rpartition(":")
        monitors.append((host.removeprefix("[").removesuffix("]"), int(port)))
    return CephSource(
        monitors=tuple(monitors),
        pool=storage_type.ceph_pool or "",
        user=storage_type.ceph_user or "",
        secret_uuid=storage_type.ceph_secret_uuid or "",
    )


def disk_spec(storage: Storage, storage_type: StorageType, cache: str | None) -> DiskSpec:
    """The row as a disk: a file at its path, or (an rbd type) its RBD image by name,
    which QEMU reaches through the type's Ceph monitors with the node's secret."""
    iotune = {key: getattr(storage, limit) for limit, key in IOTUNE.items()}
    rbd = ceph_source(storage_type)
    return DiskSpec(
        path=(storage.volume_name or "") if rbd else (storage.path or ""),
        format=storage_type.format,
        target=storage.target,
        cache=cache,
        iotune={key: value for key, value in iotune.items() if value},
        rbd=rbd,
    )


def disk_specs(vm_id: int, exclude: int | None = None) -> tuple[DiskSpec, ...]:
    """The VM's volumes that exist (``path`` set), in target order."""
    stmt = (
        select(Storage, StorageType, CacheOption.name)
        .join(StorageType, StorageType.id == Storage.storage_type_id)
        .outerjoin(CacheOption, CacheOption.id == Storage.cache_option_id)
        .where(Storage.vm_id == vm_id, Storage.path.is_not(None))
        .order_by(Storage.target)
        .execution_options(populate_existing=True)
    )
    return tuple(
        disk_spec(storage, storage_type, cache)
        for storage, storage_type, cache in db.session.execute(stmt)
        if storage.id != exclude
    )


def seed_disk(vm: Vm) -> DiskSpec | None:
    """The VM's cloud-init seed where its row says it is (services/vms/cloud_init.py), read-only."""
    if vm.seed_path is None:
        return None
    return DiskSpec(path=vm.seed_path, format="raw", target=SEED_TARGET, readonly=True)


def interface_mode(node: Node, config: dict[str, Any]) -> str:
    return node.interface_mode or config["INTERFACE_MODE"]


def display_password() -> str:
    """8 random letters and digits (about 47 bits: VNC allows no more)."""
    return "".join(
        secrets.choice(DISPLAY_PASSWORD_ALPHABET) for _ in range(DISPLAY_PASSWORD_LENGTH)
    )


def console_address(node: Node, config: dict[str, Any]) -> str:
    return node.console_address or config["CONSOLE_ADDRESS"]


def sealed_display(node: Node, config: dict[str, Any]) -> DisplaySpec:
    """A VNC display nobody can log in to: a random password nobody is told, expired
    before the domain starts. ``POST /vm/<id>/console`` sets a fresh one live."""
    return DisplaySpec(
        listen=console_address(node, config),
        password=display_password(),
        password_valid_to=SEALED,
    )


def domain_spec(
    vm: Vm,
    method: VirtMethod,
    node: Node,
    config: dict[str, Any],
    without_disk: int | None = None,
    disks: bool = True,
    nics: tuple[NicSpec, ...] | None = None,
) -> DomainSpec:
    """The whole domain from the database; ``without_disk`` leaves one storage out,
    ``disks=False`` all of them (a VM being created has none); ``nics``: the NICs when
    the caller has them (:func:`new_nic_specs`), else read."""
    max_vcpus = max(vm.cores, int(config["VM_MAX_VCPUS"]))
    max_memory = max(vm.ram, int(vm.ram * float(config["VM_MAX_RAM_FACTOR"])) // MIB * MIB)
    quota = vm.cputime_limit
    return DomainSpec(
        name=vm.domain_name,
        uuid=vm.uuid,
        domain_type=method.domain_type,
        vcpus=vm.cores,
        max_vcpus=max_vcpus,
        memory=vm.ram,
        max_memory=max_memory,
        vm_id=vm.id,
        installation=installation_id(),
        cpu_period=config["CPU_PERIOD"] if quota is not None else None,
        cpu_quota=quota,
        nics=nics
        if nics is not None
        else nic_specs(vm.id, interface_mode(node, config), bridge_template(node, config)),
        disks=disk_specs(vm.id, exclude=without_disk) if disks else (),
        display=sealed_display(node, config),
        seed=seed_disk(vm),
        console_log=vm.console_log_path,
    )
