"""What a domain needs (policy), turned into the XML objects of :mod:`.config`.

Kept apart from the XML objects as Nova keeps ``designer.py`` apart from ``config.py``:
this module decides, ``config`` only writes.
"""

from __future__ import annotations

from vmapi.hypervisor.libvirt.config import (
    CpuTune,
    Device,
    Disk,
    Domain,
    Graphics,
    GuestAgentChannel,
    Memory,
    Metadata,
    NetworkSource,
    Nic,
    Os,
    Serial,
    Vcpu,
)
from vmapi.hypervisor.libvirt.nwfilter import filter_params
from vmapi.hypervisor.specs import DiskSpec, DomainSpec, NicSpec

#: Domain types that emulate a PC with firmware (ACPI power button, clock, balloon).
PC_TYPES = frozenset({"kvm", "qemu"})


def design(spec: DomainSpec) -> Domain:
    """The domain XML objects for ``spec``."""
    cputune = None
    if spec.cpu_quota is not None and spec.cpu_period is not None:
        cputune = CpuTune(period=spec.cpu_period, quota=spec.cpu_quota)
    domain = Domain(
        type=spec.domain_type,
        name=spec.name,
        uuid=spec.uuid,
        metadata=Metadata(
            spec.vm_id,
            spec.installation,
            dict(spec.metadata),
            [_nic_metadata(nic) for nic in spec.nics],
        ),
        memory=Memory("memory", spec.max_memory // 1024),
        current_memory=Memory("currentMemory", spec.memory // 1024),
        vcpu=Vcpu(current=spec.vcpus, maximum=spec.max_vcpus),
        os=Os(),
        cputune=cputune,
        # libvirt cannot put a VLAN tag on bridge (without Open vSwitch), ethernet or user
        # interfaces: the tag travels in the metadata for the host's configuration.
        nics=[nic_xml(nic) for nic in spec.nics],
        # The seed after the other disks: SeaBIOS boots the first one (vda).
        disks=[disk_xml(disk) for disk in (*spec.disks, *filter(None, [spec.seed]))],
    )
    if spec.display is not None:
        display = spec.display
        domain.graphics = Graphics(display.listen, display.password, display.password_valid_to)
    if spec.domain_type in PC_TYPES:
        domain.features = ("acpi", "apic")
        domain.clock_offset = "utc"
        domain.lifecycle = {"on_poweroff": "destroy", "on_reboot": "restart", "on_crash": "destroy"}
        domain.devices = [
            # Logged through virtlogd (bounded by its rotation) and still a live pty for an
            # interactive serial console; the log keeps earlier runs, so the output of a
            # crash survives the next start.
            Serial(log=spec.console_log, append=True),
            Device("console", {"type": "pty"}),
            # the guest agent's port, for a guest that runs qemu-ga (a quiesced copy)
            GuestAgentChannel(),
            Device("memballoon", {"model": "virtio"}),
        ]
        # The firmware's messages (boot device, "No bootable device") belong in the log too.
        domain.os.serial_firmware = spec.console_log is not None
    return domain


def nic_xml(nic: NicSpec) -> Nic:
    return Nic(
        mode=nic.mode,
        mac=nic.mac,
        device=nic.device,
        filter=nic.filter,
        filter_params=filter_params(nic) if nic.filter else [],
    )


def _nic_metadata(nic: NicSpec) -> dict[str, str]:
    values = {
        "mac": nic.mac,
        "mode": nic.mode,
        "device": nic.device or "",
        "ipv4": nic.ipv4 or "",
        "ipv4_gateway": nic.ipv4_gateway or "",
        "ipv6": nic.ipv6 or "",
        "ipv6_gateway": nic.ipv6_gateway or "",
        "vlan": str(nic.vlan) if nic.vlan is not None else "",
    }
    return {key: value for key, value in values.items() if value}


def disk_xml(disk: DiskSpec) -> Disk:
    network = None
    if disk.rbd is not None:
        # QEMU's librbd reaches the image itself: no file, no pool of the node involved
        # (libvirt 9.0 refuses a ``type='volume'`` disk on an rbd pool)
        network = NetworkSource(protocol="rbd", name=f"{disk.rbd.pool}/{disk.path}",
                                hosts=tuple(disk.rbd.monitors), username=disk.rbd.user,
                                secret_uuid=disk.rbd.secret_uuid)  # fmt: skip
    return Disk(disk.path, disk.format, disk.target, disk.cache, dict(disk.iotune), disk.readonly,
                network)  # fmt: skip
