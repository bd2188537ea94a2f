"""The test guest (tests/guest/) really boots on this machine's libvirtd, under TCG.

Domains here are libvirt's own (not vmapi's), transient, named ``vmapi-guesttest-*``;
leftovers of an interrupted run are destroyed first, and each test destroys its own.
The guest is a ``type='qemu'`` domain: this machine's KVM cannot run an ordinary guest
kernel (../shared/recipes/test-guest.md).
"""

import shutil
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from tests.conftest import GIB, unavailable
from tests.guest import console
from tests.guest.disks import make_overlay, read_sector, sha256, write_seed_iso

pytestmark = [pytest.mark.hypervisor]
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, not printed

URI = "qemu:///system"
PREFIX = "vmapi-guesttest-"


def destroy_leftovers(conn: libvirt.virConnect) -> None:
    for dom in conn.listAllDomains():
        if dom.name().startswith(PREFIX):
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefine()


@pytest.fixture(scope="module")
def conn():
    try:
        connection = libvirt.open(URI)
    except libvirt.libvirtError as exc:
        unavailable(f"libvirtd does not answer on {URI}: {exc}")
    destroy_leftovers(connection)
    yield connection
    destroy_leftovers(connection)
    connection.close()


@pytest.fixture
def workdir():
    """A folder QEMU's user can reach (pytest's own tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def disk(source: Path, fmt: str, target: str, readonly: bool = False) -> ET.Element:
    element = ET.Element("disk", type="file", device="disk")
    ET.SubElement(element, "driver", name="qemu", type=fmt)
    ET.SubElement(element, "source", file=str(source))
    ET.SubElement(element, "target", dev=target, bus="virtio")
    if readonly:
        ET.SubElement(element, "readonly")
    return element


def domain_xml(name: str, root: Path, log: Path, seed: Path | None = None) -> str:
    """256 MiB, 1 vCPU, TCG; boots the root disk; the serial console goes to ``log``."""
    domain = ET.Element("domain", type="qemu")
    ET.SubElement(domain, "name").text = name
    ET.SubElement(domain, "memory", unit="MiB").text = "256"
    ET.SubElement(domain, "vcpu").text = "1"
    os_element = ET.SubElement(domain, "os")
    ET.SubElement(os_element, "type", arch="x86_64").text = "hvm"
    ET.SubElement(os_element, "boot", dev="hd")
    ET.SubElement(ET.SubElement(domain, "features"), "acpi")  # the power button
    ET.SubElement(domain, "on_poweroff").text = "destroy"
    ET.SubElement(domain, "on_reboot").text = "restart"
    devices = ET.SubElement(domain, "devices")
    devices.append(disk(root, "qcow2", "vda"))
    if seed is not None:
        devices.append(disk(seed, "raw", "vdb", readonly=True))
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(log))
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(domain, encoding="unicode")


def reader(log: Path):
    return lambda: log.read_text(errors="replace") if log.exists() else ""


def boot(conn, guest_image, workdir, seed=None):
    """Start a guest on a 1 GiB overlay of the image; (domain, overlay, console reader)."""
    overlay = make_overlay(guest_image.path, workdir / "root.qcow2", "1G")
    log = workdir / "console.log"
    xml = domain_xml(f"{PREFIX}{uuid.uuid4().hex[:8]}", overlay, log, seed)
    return conn.createXML(xml, 0), overlay, reader(log)


def test_guest_boots_on_an_overlay_and_leaves_the_base_unchanged(conn, guest_image, workdir):
    print(f"\nguest image {guest_image.key}: built={guest_image.built}, "
          f"build took {guest_image.build_seconds} s, {guest_image.size} bytes")  # fmt: skip
    base_sha = sha256(guest_image.path)
    assert base_sha == guest_image.sha256  # the cache holds what was built
    seed_files = {"meta-data": b"instance-id: guesttest\n", "user-data": b"#cloud-config\n"}
    seed = write_seed_iso(workdir / "seed.iso", seed_files)
    started = time.monotonic()
    dom, overlay, read = boot(conn, guest_image, workdir, seed)
    try:
        console.wait_for(read, lambda t: bool(console.boots(t)), "the guest's first line")
        booted = time.monotonic() - started
        text = console.wait_for(read, lambda t: len(console.boots(t)[0].ticks) >= 2, "two ticks")
    finally:
        dom.destroy()
    print(f"start to VMAPI-GUEST under TCG: {booted:.1f} s")
    [guest] = console.boots(text)
    assert (guest.root, guest.sectors) == ("vda", GIB // 512)  # the overlay's size
    assert guest.errors == []
    assert guest.cidata == {name: len(data) for name, data in seed_files.items()}
    assert guest.acpid
    assert guest.ticks[1] > guest.ticks[0]
    # The guest's write is in the overlay, past the base image's end; the base is as built.
    assert guest.marker and guest.previous_marker is None
    assert guest.marker_sector * 512 >= guest_image.size
    assert read_sector(overlay, guest.marker_sector).startswith(guest.marker.encode() + b"\n")
    assert sha256(guest_image.path) == base_sha


def test_guest_obeys_the_acpi_reboot_and_power_button(conn, guest_image, workdir):
    dom, _overlay, read = boot(conn, guest_image, workdir)
    try:
        console.wait_for(
            read, lambda t: any(b.acpid and b.ticks for b in console.boots(t)), "acpid started"
        )
        # libvirt's ACPI reboot presses the power button and starts the guest again
        dom.reboot(libvirt.VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)
        text = console.wait_for(
            read,
            lambda t: len(console.boots(t)) == 2 and bool(console.boots(t)[1].ticks),
            "a reboot",
        )
        assert dom.isActive()
        first, second = console.boots(text)
        assert first.powered_off and first.cidata == {}  # no seed attached, none read
        assert second.previous_marker == first.marker  # the disk kept the first boot's write
        assert second.ticks[0] == 1  # a new boot counts from the start
        assert second.acpid  # started before the first tick

        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        text = console.wait_for(
            read, lambda t: not domain_exists(conn, dom.name()), "power-off after the button"
        )
        assert console.boots(text)[1].powered_off
    finally:
        if domain_exists(conn, dom.name()):
            dom.destroy()


def domain_exists(conn, name: str) -> bool:
    try:
        return conn.lookupByName(name).isActive()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise
