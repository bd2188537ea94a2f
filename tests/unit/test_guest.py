"""The test guest's pieces that need no build: its cache key, its /init, its console."""

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import unavailable
from tests.guest import build, console
from tests.unit.test_nocloud import KEY_A, KEY_B, sample_spec
from vmapi.nocloud import AddressSeed, NicSeed, build_seed

SOURCE = Path(build.__file__).parent
VERSIONS = {"busybox-static": "1:1.35.0-4", "linux-image-6.1.0-57-cloud-amd64": "6.1.192-3"}


def copy_source(tmp_path: Path) -> Path:
    dest = tmp_path / "guest"
    shutil.copytree(SOURCE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_the_key_changes_with_every_input_and_only_then(tmp_path):
    source = copy_source(tmp_path)
    key = build.inputs_digest(source, VERSIONS)
    assert build.inputs_digest(source, dict(VERSIONS)) == key
    assert build.inputs_digest(SOURCE, VERSIONS) == key  # where the files are does not count

    part = source / "init" / "20-root.sh"
    original = part.read_text()
    part.write_text(original + "echo changed\n")
    assert build.inputs_digest(source, VERSIONS) != key
    part.write_text(original)
    assert build.inputs_digest(source, VERSIONS) == key

    (source / "init" / "47-extra.sh").write_text("echo more\n")  # a new part
    assert build.inputs_digest(source, VERSIONS) != key
    (source / "init" / "47-extra.sh").unlink()
    assert build.inputs_digest(source, VERSIONS) == key

    handler = source / "rootfs" / "etc" / "acpi" / "PWRF" / "00000080"
    handler.chmod(0o644)  # not executable: acpid could not run it
    assert build.inputs_digest(source, VERSIONS) != key
    handler.chmod(0o755)

    helper = source / "src" / "vmapi-sendframe.c"  # compiled into the image
    helper.write_text(helper.read_text() + "/* changed */\n")
    assert build.inputs_digest(source, VERSIONS) != key
    helper.write_text((SOURCE / "src" / "vmapi-sendframe.c").read_text())
    assert build.inputs_digest(source, VERSIONS) == key
    newer_gcc = {**VERSIONS, "gcc": "4:12.2.0-4"}  # (the compiler's version is an input)
    assert build.inputs_digest(source, newer_gcc) != build.inputs_digest(
        source, {**VERSIONS, "gcc": "4:12.2.0-3"}
    )
    assert {"gcc", "libc6-dev"} <= set(build.BUILD_PACKAGES)

    newer_kernel = {**VERSIONS, "linux-image-6.1.0-57-cloud-amd64": "6.1.192-4"}
    assert build.inputs_digest(source, newer_kernel) != key
    (source / "build.py").write_text((source / "build.py").read_text() + "\n")
    assert build.inputs_digest(source, VERSIONS) != key


def test_init_is_its_parts_in_name_order(tmp_path):
    source = copy_source(tmp_path)
    (source / "init" / "47-extra.sh").write_text("echo VMAPI-EXTRA up\n")
    script = build.init_script(source)
    assert script.startswith("#!/bin/busybox sh\n")
    order = ["mount -t devtmpfs", "insmod", "VMAPI-GUEST", "VMAPI-MARKER", "findfs LABEL=cidata",
             "nics.awk", "httpd -p 80", "VMAPI-EXTRA up", "acpid", "VMAPI-TICK"]  # fmt: skip
    positions = [script.index(text) for text in order]
    assert positions == sorted(positions)


# What a console log looks like: firmware and kernel lines, \r\n line ends, a reboot.
LOG = (
    "SeaBIOS (version 1.16.2-debian-1.16.2-1)\r\n"
    "[    1.234] virtio_blk virtio1: [vda] 2097152 512-byte logical blocks\r\n"
    "VMAPI-GUEST root=vda sectors=2097152 boot_id=6f1c2d3e-0000-4000-8000-00000000000a\r\n"
    "VMAPI-MARKER sector=131072 wrote=vmapi-marker-aa previous=none\r\n"
    "VMAPI-CIDATA device=/dev/vdb\r\n"
    "VMAPI-CIDATA file=meta-data bytes=23\r\n"
    "VMAPI-CIDATA file=user-data bytes=14\r\n"
    "VMAPI-NET name=eth0 dev=eth0 mac=52:54:00:0a:0b:0c addresses=198.51.100.2/24,"
    "2001:db8:100::2/64 gateway4=198.51.100.1 gateway6=2001:db8:100::1 dns=-\r\n"
    "VMAPI-TOLD hostname=web1 keys=2 instance=vmapi-x-vm-1-r0a1b2c-0123456789abcdef\r\n"
    "VMAPI-HTTPD started\r\n"
    "VMAPI-ACPID started\r\n"
    "VMAPI-TICK 1\r\nVMAPI-TICK 2\r\n"
    "acpid: PWRF/00000080\r\nVMAPI-POWEROFF\r\n"
    "SeaBIOS (version 1.16.2-debian-1.16.2-1)\r\n"
    "VMAPI-GUEST root=vda sectors=2097152 boot_id=6f1c2d3e-0000-4000-8000-00000000000b\r\n"
    "VMAPI-MARKER sector=131072 wrote=vmapi-marker-bb previous=vmapi-marker-aa\r\n"
    "VMAPI-ERROR insmod evdev failed\r\n"
    "VMAPI-TICK 1\r\nVMAPI-TI"  # a line still being written
)


def test_console_log_splits_into_boots():
    first, second = console.boots(LOG)
    assert (first.root, first.sectors, first.marker, first.previous_marker) == (
        "vda", 2097152, "vmapi-marker-aa", None)  # fmt: skip
    assert first.cidata == {"meta-data": 23, "user-data": 14}
    assert first.ticks == [1, 2] and first.acpid and first.powered_off and first.errors == []
    assert first.nics == [{"name": "eth0", "dev": "eth0", "mac": "52:54:00:0a:0b:0c",
                           "addresses": "198.51.100.2/24,2001:db8:100::2/64",
                           "gateway4": "198.51.100.1", "gateway6": "2001:db8:100::1",
                           "dns": "-"}]  # fmt: skip
    assert (first.hostname, first.keys, first.httpd) == ("web1", 2, True)
    assert first.instance_id == "vmapi-x-vm-1-r0a1b2c-0123456789abcdef"
    assert second.nics == [] and second.hostname is None and not second.httpd
    assert second.previous_marker == "vmapi-marker-aa" and second.ticks == [1]
    assert second.errors == ["VMAPI-ERROR insmod evdev failed"]
    assert not second.acpid and not second.powered_off and second.cidata == {}
    assert console.boots("SeaBIOS\r\n") == []
    # each boot's own boot id; an older guest's line without one still starts a boot
    assert (first.boot_id, second.boot_id) == ("6f1c2d3e-0000-4000-8000-00000000000a",
                                               "6f1c2d3e-0000-4000-8000-00000000000b")  # fmt: skip
    [old] = console.boots("VMAPI-GUEST root=vda sectors=8\r\n")
    assert (old.sectors, old.boot_id) == (8, None)


def test_a_net_line_still_being_written_is_not_read_yet():
    head = "VMAPI-GUEST root=vda sectors=8\r\nVMAPI-NET name=eth0 dev=eth0 gateway4=198.51.100.1"
    [boot] = console.boots(head + " gateway")  # (cut mid-word by the console's read)
    assert boot.nics == []
    [boot] = console.boots(head + "\r\n")
    assert boot.nics == [{"name": "eth0", "dev": "eth0", "gateway4": "198.51.100.1"}]


def test_wait_for_gives_up_with_the_console_tail():
    texts = iter(["", "VMAPI-GUEST root=vda sectors=8\r\n"])
    text = console.wait_for(lambda: next(texts), lambda t: bool(console.boots(t)), "a boot")
    assert console.boots(text)[0].sectors == 8
    with pytest.raises(AssertionError, match=r"a boot: not seen(.|\n)*kernel panic"):
        console.wait_for(lambda: "kernel panic\r\n", lambda t: False, "a boot", timeout=0.0)


# The guest's parsers of the seed (tests/guest/rootfs/etc/vmapi-guest/*.awk), run with the
# busybox awk the guest has, on files vmapi writes: only awk runs here, on files.
GUEST_ETC = SOURCE / "rootfs" / "etc" / "vmapi-guest"


def guest_awk(program: str, data: bytes, tmp_path: Path) -> list[list[str]]:
    busybox = shutil.which("busybox")
    if busybox is None:
        unavailable("busybox (Debian package busybox-static) is not installed")
    source = tmp_path / program.replace(".awk", ".yaml")
    source.write_bytes(data)
    out = subprocess.run([busybox, "awk", "-f", str(GUEST_ETC / program), str(source)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return [line.split(" ", 1) if program == "told.awk" else line.split()
            for line in out.splitlines()]  # fmt: skip


def test_the_guest_reads_the_nics_of_vmapis_network_config(tmp_path):
    spec = dataclasses.replace(
        sample_spec(dns_servers=("192.0.2.53", "2001:db8::53")),
        nics=(
            NicSeed("eth0", "52:54:00:12:34:56",  # digits only: PyYAML quotes it
                    (AddressSeed("198.51.100.5", 24, "198.51.100.1"),),
                    (AddressSeed("2001:db8:100::5", 64, "2001:db8:100::1"),
                     AddressSeed("2001:db8:100::6", 64, "2001:db8:100::1"))),
            NicSeed("eth1", "52:54:00:aa:bb:cc", (AddressSeed("203.0.113.9", 25, "203.0.113.1"),)),
            NicSeed("eth2", "52:54:00:aa:bb:cd"),
        ),
    )  # fmt: skip
    files = build_seed(spec)
    assert b"'52:54:00:12:34:56'" in files.network_config
    assert guest_awk("nics.awk", files.network_config, tmp_path) == [
        ["eth0", "52:54:00:12:34:56", "198.51.100.5/24,2001:db8:100::5/64,2001:db8:100::6/64",
         "198.51.100.1", "2001:db8:100::1", "192.0.2.53,2001:db8::53"],
        # one default route per family: the first NIC's
        ["eth1", "52:54:00:aa:bb:cc", "203.0.113.9/25", "-", "-", "192.0.2.53,2001:db8::53"],
        ["eth2", "52:54:00:aa:bb:cd", "-", "-", "-", "192.0.2.53,2001:db8::53"],
    ]  # fmt: skip
    without_dns = build_seed(dataclasses.replace(spec, dns_servers=()))
    assert [row[5] for row in guest_awk("nics.awk", without_dns.network_config, tmp_path)] == [
        "-", "-", "-"]  # fmt: skip


def test_the_guest_reads_its_name_and_keys_from_vmapis_meta_data(tmp_path):
    quoted = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDk it's: me #1"  # PyYAML quotes this one
    spec = sample_spec(hostname="web1.example.com", ssh_keys=(KEY_A, quoted, KEY_B))
    files = build_seed(spec)
    assert b"'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDk it''s: me #1'" in files.meta_data
    assert guest_awk("told.awk", files.meta_data, tmp_path) == [
        ["instance-id", files.instance_id],
        ["hostname", "web1.example.com"],
        ["ssh-key", KEY_A],
        ["ssh-key", quoted],
        ["ssh-key", KEY_B],
    ]
    none = build_seed(sample_spec(ssh_keys=()))
    assert [row[0] for row in guest_awk("told.awk", none.meta_data, tmp_path)] == [
        "instance-id", "hostname"]  # fmt: skip
