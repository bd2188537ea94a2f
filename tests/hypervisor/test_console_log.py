"""The serial console log read back through libvirt: tail across virtlogd's rotated files,
a domain's firmware and a guest's output, deletion (fixtures: tests/hypervisor/conftest.py).
"""

import os
import struct
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import MIB
from tests.hypervisor.streamtest import POOL_ROOT, URI, pool_volumes
from vmapi.hypervisor import DiskSpec, DomainSpec, LogTail, VolumeNotFound

pytestmark = [pytest.mark.hypervisor]


def test_tail_reads_the_end_and_reaches_into_rotated_files(hv, pool):
    folder = POOL_ROOT / pool
    # as virtlogd leaves them: the newest file, then .0, .1 (written behind libvirt's back)
    (folder / "app.log.1").write_bytes(b"oldest-")
    (folder / "app.log.0").write_bytes(b"older-")
    (folder / "app.log").write_bytes(b"newest")
    everything = b"oldest-older-newest"

    assert hv.tail(URI, pool, "app.log", 3) == LogTail(b"est", truncated=True)
    assert hv.tail(URI, pool, "app.log", 6) == LogTail(b"newest", truncated=True)
    assert hv.tail(URI, pool, "app.log", 9) == LogTail(b"er-newest", truncated=True)
    assert hv.tail(URI, pool, "app.log", len(everything)) == LogTail(everything, truncated=False)
    assert hv.tail(URI, pool, "app.log", 10**6) == LogTail(everything, truncated=False)

    # virtlogd rotates again: libvirt's volumes are paths, so nothing it knew goes stale
    (folder / "app.log.1").rename(folder / "app.log.2")
    (folder / "app.log.0").rename(folder / "app.log.1")
    (folder / "app.log").rename(folder / "app.log.0")
    (folder / "app.log").write_bytes(b"")
    assert hv.tail(URI, pool, "app.log", 12) == LogTail(b"older-newest", truncated=True)
    assert hv.tail(URI, pool, "app.log", 100) == LogTail(everything, truncated=False)


def test_tail_uses_the_file_length_whatever_the_content_claims(hv, pool, tmp_path):
    # A guest writes the start of its log: it may look like a qcow2 header claiming 1 GiB.
    image = tmp_path / "claims.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(image), "1G"], check=True,
                   capture_output=True)  # fmt: skip
    (POOL_ROOT / pool / "guest.log").write_bytes(image.read_bytes() + b"login:")
    assert hv.tail(URI, pool, "guest.log", 6) == LogTail(b"login:", truncated=True)


def test_tail_of_a_log_not_written_yet(hv, pool):
    with pytest.raises(VolumeNotFound):
        hv.tail(URI, pool, "console.log", 100)


def test_delete_log_removes_its_rotated_files(libvirtd, hv, pool):
    for name in ("vm.log", "vm.log.0", "vm.log.1", "other.log"):
        (POOL_ROOT / pool / name).write_bytes(b"x")
    hv.delete_log(URI, pool, "vm.log")
    assert pool_volumes(libvirtd, pool) == ["other.log"]
    hv.delete_log(URI, pool, "vm.log")  # nothing left to delete: no error
    assert sorted(os.listdir(POOL_ROOT / pool)) == ["other.log"]


def domain_spec(name, console_log, disks=()):
    return DomainSpec(name=name, uuid=str(uuid.uuid4()), domain_type="qemu", vcpus=1,
                      max_vcpus=1, memory=64 * MIB, max_memory=64 * MIB, vm_id=0,
                      installation="vmapi-streamtest", disks=tuple(disks),
                      console_log=console_log)  # fmt: skip


def wait_for_log(hv, pool, volume, n, done, wait=120.0):
    """The log's tail once ``done(tail)`` holds (a generous bound: TCG on a busy machine)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            found = hv.tail(URI, pool, volume, n)
        except VolumeNotFound:
            found = None
        if (found is not None and done(found.data)) or time.monotonic() > deadline:
            return found
        time.sleep(0.25)


def test_a_domain_logs_its_serial_console(libvirtd, hv, pool, domains):
    name = f"{pool}-firmware"
    domains.append(name)
    hv.define(URI, domain_spec(name, str(POOL_ROOT / pool / "console.log")))
    serial = ET.fromstring(libvirtd.lookupByName(name).XMLDesc(0)).find("devices/serial")
    assert serial.get("type") == "pty"
    assert serial.find("log").attrib == {"file": str(POOL_ROOT / pool / "console.log"),
                                         "append": "on"}  # fmt: skip
    with pytest.raises(VolumeNotFound):  # defined, never started: no log yet
        hv.tail(URI, pool, "console.log", 100)
    hv.start(URI, name)
    # SeaBIOS, told to use the serial port, says what it boots from (nothing: disk-less)
    found = wait_for_log(hv, pool, "console.log", 4096, lambda d: b"No bootable device" in d)
    assert found is not None and b"SeaBIOS" in found.data and b"No bootable device" in found.data
    assert found.truncated is False


# A boot sector that prints LINE (outer x inner) times on the first serial port, then END,
# and halts. Interrupts stay off throughout: SeaBIOS's serial console flushes its own screen
# ("Booting from Hard Disk..." and a late ".") from the timer interrupt, and on a loaded machine
# that flush lands in the middle of the guest's lines. GNU as (.code16), linked at 0x7c00:
#     cli; xor ax,ax; mov ss,ax; mov sp,0x7c00; mov ds,ax; nop
#     mov bx,OUTER                     ; offset 0x0c
#   outer: mov cx,INNER                ; offset 0x0f
#   again: mov si,LINE; call puts; loop again; dec bx; jnz outer
#     mov si,END; call puts
#   halt: cli; hlt; jmp halt
#   puts: lodsb; or al,al; jz 1f; mov ah,al; mov dx,0x3fd
#     2: in al,dx; test al,0x20; jz 2b  ; until the UART takes a byte
#     mov al,ah; mov dx,0x3f8; out dx,al; jmp puts
#     1: ret
BOOT_CODE = bytes.fromhex(
    "fa31c08ed0bc007c8ed890bb0100b93412be3e7ce80f00e2f84b75f2be567ce80400faf4ebfcac08c074"
    "1288c4bafd03eca82074fb88e0baf803eeebe9c3"
)
LINE = b"vmapi-streamtest line\r\n"  # at 0x3e
END = b"vmapi-streamtest end\r\n"  # at 0x56


def boot_image(outer, inner):
    """A 1 MiB raw disk whose boot sector prints ``outer * inner`` lines, then END."""
    code = bytearray(BOOT_CODE + LINE + b"\0" + END + b"\0")
    struct.pack_into("<H", code, 0x0C, outer)
    struct.pack_into("<H", code, 0x0F, inner)
    image = bytearray(MIB)
    image[: len(code)] = code
    image[510:512] = b"\x55\xaa"
    return bytes(image)


def boot_guest(hv, pool, domains, outer, inner):
    """Upload the printing boot sector as a base, boot a domain from an overlay on it."""
    image = boot_image(outer, inner)
    hv.upload_volume(URI, pool, "printer.img", len(image), [image], timeout=60)
    root = hv.create_overlay(URI, pool, "root.qcow2", 16 * MIB, "printer.img", "raw")
    name = f"{pool}-printer"
    domains.append(name)
    disk = DiskSpec(path=root, format="qcow2", target="vda")
    hv.define(URI, domain_spec(name, str(POOL_ROOT / pool / "console.log"), [disk]))
    hv.start(URI, name)
    return name


def log_files(pool, volume):
    """The log's bytes as they are on this node's disk, rotated files first."""
    folder = POOL_ROOT / pool
    rotated = sorted(folder.glob(f"{volume}.*"), key=lambda p: int(p.suffix[1:]), reverse=True)
    return b"".join(path.read_bytes() for path in [*rotated, folder / volume])


def test_guest_output_read_back_through_libvirt(hv, pool, domains):
    boot_guest(hv, pool, domains, outer=1, inner=1000)
    found = wait_for_log(hv, pool, "console.log", 64 * 1024, lambda d: d.endswith(END))
    assert found is not None and found.data.endswith(LINE * 100 + END), found
    assert found == LogTail(log_files(pool, "console.log"), truncated=False)
    assert hv.tail(URI, pool, "console.log", len(LINE) + len(END)) == LogTail(LINE + END, True)


def virtlogd_max_size():
    """virtlogd's rotation size on this node (its config file, else the default 2 MiB)."""
    config = Path("/etc/libvirt/virtlogd.conf")
    if config.exists():
        for line in config.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "max_size":
                return int(value.strip())
    return 2 * MIB


def test_virtlogd_rotation_is_read_across(hv, pool, domains):
    """More output than virtlogd keeps in one file: the tail joins the files seamlessly."""
    outer, inner = 22, 4660  # 102520 lines, 2.36 MB
    boot_guest(hv, pool, domains, outer, inner)
    printed = len(LINE) * outer * inner + len(END)
    found = wait_for_log(hv, pool, "console.log", printed + MIB, lambda d: d.endswith(END), 300)
    assert found is not None and found.data.endswith(LINE * 1000 + END)
    on_disk = log_files(pool, "console.log")
    assert found == LogTail(on_disk, truncated=False)  # nothing lost or doubled at the seam
    current = (POOL_ROOT / pool / "console.log").stat().st_size
    if printed > virtlogd_max_size():
        assert (POOL_ROOT / pool / "console.log.0").exists()
        assert current < printed
    for n in (current - 1, current + 1, current + 12345):
        assert hv.tail(URI, pool, "console.log", n) == LogTail(on_disk[-n:], truncated=True)
