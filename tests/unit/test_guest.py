"""The test guest's pieces that need no build: its cache key, its /init, its console."""

import shutil
from pathlib import Path

import pytest

from tests.guest import build, console

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

    (source / "init" / "45-network.sh").write_text("echo more\n")  # a new part
    assert build.inputs_digest(source, VERSIONS) != key
    (source / "init" / "45-network.sh").unlink()

    handler = source / "rootfs" / "etc" / "acpi" / "PWRF" / "00000080"
    handler.chmod(0o644)  # not executable: acpid could not run it
    assert build.inputs_digest(source, VERSIONS) != key
    handler.chmod(0o755)

    newer_kernel = {**VERSIONS, "linux-image-6.1.0-57-cloud-amd64": "6.1.192-4"}
    assert build.inputs_digest(source, newer_kernel) != key
    (source / "build.py").write_text((source / "build.py").read_text() + "\n")
    assert build.inputs_digest(source, VERSIONS) != key


def test_init_is_its_parts_in_name_order(tmp_path):
    source = copy_source(tmp_path)
    (source / "init" / "45-network.sh").write_text("echo VMAPI-NET up\n")
    script = build.init_script(source)
    assert script.startswith("#!/bin/busybox sh\n")
    order = ["mount -t devtmpfs", "insmod", "VMAPI-GUEST", "VMAPI-MARKER", "findfs LABEL=cidata",
             "VMAPI-NET up", "acpid", "VMAPI-TICK"]  # fmt: skip
    positions = [script.index(text) for text in order]
    assert positions == sorted(positions)


# What a console log looks like: firmware and kernel lines, \r\n line ends, a reboot.
LOG = (
    "SeaBIOS (version 1.16.2-debian-1.16.2-1)\r\n"
    "[    1.234] virtio_blk virtio1: [vda] 2097152 512-byte logical blocks\r\n"
    "VMAPI-GUEST root=vda sectors=2097152\r\n"
    "VMAPI-MARKER sector=131072 wrote=vmapi-marker-aa previous=none\r\n"
    "VMAPI-CIDATA device=/dev/vdb\r\n"
    "VMAPI-CIDATA file=meta-data bytes=23\r\n"
    "VMAPI-CIDATA file=user-data bytes=14\r\n"
    "VMAPI-ACPID started\r\n"
    "VMAPI-TICK 1\r\nVMAPI-TICK 2\r\n"
    "acpid: PWRF/00000080\r\nVMAPI-POWEROFF\r\n"
    "SeaBIOS (version 1.16.2-debian-1.16.2-1)\r\n"
    "VMAPI-GUEST root=vda sectors=2097152\r\n"
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
    assert second.previous_marker == "vmapi-marker-aa" and second.ticks == [1]
    assert second.errors == ["VMAPI-ERROR insmod evdev failed"]
    assert not second.acpid and not second.powered_off and second.cidata == {}
    assert console.boots("SeaBIOS\r\n") == []


def test_wait_for_gives_up_with_the_console_tail():
    texts = iter(["", "VMAPI-GUEST root=vda sectors=8\r\n"])
    text = console.wait_for(lambda: next(texts), lambda t: bool(console.boots(t)), "a boot")
    assert console.boots(text)[0].sectors == 8
    with pytest.raises(AssertionError, match=r"a boot: not seen(.|\n)*kernel panic"):
        console.wait_for(lambda: "kernel panic\r\n", lambda t: False, "a boot", timeout=0.0)
