"""Changes to a running domain, in its live configuration only (the caller redefines
the persistent one): CPUs, memory, CPU bandwidth, the VNC display, and its disks."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from datetime import datetime

import libvirt

from vmapi.hypervisor.errors import NoDisplay, NotSupported, OperationInvalid
from vmapi.hypervisor.libvirt.calls import LibvirtCalls
from vmapi.hypervisor.libvirt.config import password_valid_to
from vmapi.hypervisor.libvirt.designer import disk_xml
from vmapi.hypervisor.specs import DiskSpec, DisplayInfo

IOTUNE_KEYS = ("read_iops_sec", "write_iops_sec", "read_bytes_sec", "write_bytes_sec")


def _live_targets(dom: libvirt.virDomain) -> set[str]:
    """Device names of the disks the running domain has now."""
    root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 - from libvirt, not from a guest
    return {t.get("dev") for t in root.findall("devices/disk/target")}


def _live_vnc(uri: str, dom: libvirt.virDomain) -> ET.Element:
    """The running domain's ``<graphics type='vnc'>`` (without its password)."""
    if not dom.isActive():
        raise OperationInvalid(uri, f"{dom.name()} is not running")
    root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 - from libvirt, not from a guest
    graphics = root.find("devices/graphics[@type='vnc']")
    if graphics is None:
        raise NoDisplay(uri, f"{dom.name()} has no VNC display")
    return graphics


def _require_live_disk(uri: str, dom: libvirt.virDomain, target: str) -> None:
    if target not in _live_targets(dom):
        raise NotSupported(uri, f"the running domain does not have {target} yet")


class LiveCalls(LibvirtCalls):
    """What changes on a running domain without a restart."""

    # ------------------------------------------------------------------ size
    def set_vcpus_live(self, uri: str, name: str, vcpus: int) -> None:
        self._on_domain(
            uri, name, lambda dom: dom.setVcpusFlags(vcpus, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        )

    def set_memory_live(self, uri: str, name: str, memory: int) -> None:
        self._on_domain(
            uri,
            name,
            lambda dom: dom.setMemoryFlags(memory // 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE),
        )

    def set_cputune_live(self, uri: str, name: str, period: int, quota: int) -> None:
        def tune(dom: libvirt.virDomain) -> None:
            # Ask first: drivers without CPU bandwidth control (the test driver) answer
            # an unspecific "invalid argument" to the change itself.
            if "vcpu_quota" not in dom.schedulerParameters():
                raise NotSupported(uri, "this hypervisor cannot change CPU bandwidth live")
            params = {"vcpu_period": period, "vcpu_quota": quota}
            dom.setSchedulerParametersFlags(params, libvirt.VIR_DOMAIN_AFFECT_LIVE)

        self._on_domain(uri, name, tune)

    # ------------------------------------------------------------------ display
    def set_display_password(self, uri: str, name: str, password: str, valid_to: datetime) -> None:
        def change(dom: libvirt.virDomain) -> None:
            # The live element as libvirt wrote it: libvirt refuses an update that would
            # change the display's listen address or port, so only the password differs.
            graphics = _live_vnc(uri, dom)
            graphics.set("passwd", password)
            graphics.set("passwdValidTo", password_valid_to(valid_to))
            xml = ET.tostring(graphics, encoding="unicode")
            dom.updateDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)

        self._on_domain(uri, name, change)

    def display(self, uri: str, name: str) -> DisplayInfo:
        def look(dom: libvirt.virDomain) -> DisplayInfo:
            graphics = _live_vnc(uri, dom)
            port = int(graphics.get("port") or -1)
            if port <= 0:
                raise NoDisplay(uri, f"the display of {name} has no port")
            listen = graphics.find("listen[@address]")
            address = listen.get("address") if listen is not None else graphics.get("listen")
            return DisplayInfo(listen=address, port=port)

        return self._on_domain(uri, name, look)

    # ------------------------------------------------------------------ disks
    def attach_disk_live(self, uri: str, name: str, disk: DiskSpec) -> None:
        xml = disk_xml(disk).to_xml()
        self._on_domain(
            uri, name, lambda dom: dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        )

    def detach_disk_live(self, uri: str, name: str, disk: DiskSpec, wait: float) -> bool:
        # A live detach is a request to the guest (PCI hot-unplug); QEMU drops the device
        # only when the guest lets go, so look until it is gone or the wait is over.
        xml = disk_xml(disk).to_xml()
        self._on_domain(
            uri, name, lambda dom: dom.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        )
        deadline = time.monotonic() + wait
        while True:
            if disk.target not in self._on_domain(uri, name, _live_targets):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.25)

    def set_iotune_live(self, uri: str, name: str, target: str, iotune: dict[str, int]) -> None:
        params = {key: iotune.get(key, 0) for key in IOTUNE_KEYS}  # 0 lifts a limit

        def tune(dom: libvirt.virDomain) -> None:
            _require_live_disk(uri, dom, target)
            dom.setBlockIoTune(target, params, libvirt.VIR_DOMAIN_AFFECT_LIVE)

        self._on_domain(uri, name, tune)

    def resize_disk_live(self, uri: str, name: str, target: str, size: int) -> None:
        def resize(dom: libvirt.virDomain) -> None:
            _require_live_disk(uri, dom, target)
            dom.blockResize(target, size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)

        self._on_domain(uri, name, resize)
