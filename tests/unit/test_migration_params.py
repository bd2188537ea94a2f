"""What the libvirt driver hands to virDomainMigrateToURI3: flags, parameters, the
target's XML, and the statistics read back (no libvirtd needed; the real moves are in
tests/hypervisor/test_migration.py)."""

import xml.etree.ElementTree as ET
from datetime import UTC, datetime

import pytest

from vmapi.hypervisor import DisplaySpec, MigrationStats
from vmapi.hypervisor.libvirt.config import METADATA_NS, Metadata
from vmapi.hypervisor.libvirt.migration import (
    copied_targets,
    flags,
    listen_address,
    params,
    retarget,
    stats,
    stream_uri,
)

# libvirt's stable ABI values (libvirt-domain.h), written out: tests/unit imports no libvirt.
LIVE, PEER2PEER, PERSIST_DEST, UNDEFINE_SOURCE = 1, 2, 8, 16
NON_SHARED_DISK, NON_SHARED_INC, UNSAFE, OFFLINE = 64, 128, 512, 1024
MIGRATION_IN, MIGRATION_OUT, SAVE = 4, 5, 2  # virDomainJobOperation


def test_live_flags_move_and_persist_the_domain_and_undefine_the_source():
    base = LIVE | PEER2PEER | PERSIST_DEST | UNDEFINE_SOURCE
    assert flags(live=True, copy_storage=False, unchecked_storage=False) == base
    assert flags(True, True, False) == base | NON_SHARED_DISK
    assert flags(True, False, True) == base | UNSAFE
    # overlays made on the target's own copy of their base: only the top layers travel
    assert flags(True, True, False, incremental=True) == base | NON_SHARED_INC
    assert flags(True, False, False, incremental=True) == base


def test_cold_flags_move_only_the_definition():
    found = flags(live=False, copy_storage=False, unchecked_storage=True)
    assert found == OFFLINE | PEER2PEER | PERSIST_DEST | UNDEFINE_SOURCE


@pytest.mark.parametrize(
    ("address", "uri", "listen"),
    [
        ("127.0.0.1", "tcp://127.0.0.1", "127.0.0.1"),
        ("2001:db8::5", "tcp://[2001:db8::5]", "2001:db8::5"),
        ("node2.example.com", "tcp://node2.example.com", "node2.example.com"),
        ("tcp://192.0.2.7:49200", "tcp://192.0.2.7:49200", "192.0.2.7"),
        ("tcp://[2001:db8::7]:49200", "tcp://[2001:db8::7]:49200", "2001:db8::7"),
    ],
)
def test_the_stream_goes_to_the_migration_address_and_listens_only_there(address, uri, listen):
    assert stream_uri(address) == uri
    assert listen_address(address) == listen


def test_params_of_a_live_and_of_a_cold_move():
    live = params(True, "127.0.0.1", 8, "<domain/>", "<domain/>")
    assert live == {
        "migrate_uri": "tcp://127.0.0.1",
        "listen_address": "127.0.0.1",
        "bandwidth": 8,
        "destination_xml": "<domain/>",
        "persistent_xml": "<domain/>",
    }
    # no stream, no bandwidth offline; without an address libvirt picks the target's name
    assert params(False, "127.0.0.1", 8, None, None) == {}
    assert params(True, None, None, None, None) == {}


def test_only_the_disks_named_are_copied():
    assert params(True, None, None, None, None, ["vda", "vdc"]) == {"migrate_disks": ["vda", "vdc"]}
    assert params(True, None, None, None, None, []) == {}
    assert params(False, None, None, None, None, ["vda"]) == {}  # nothing is copied offline
    assert copied_targets(DOMAIN, {"/a/pool/vm-7-root.qcow2": "/b/pool/root"}) == ["vda"]
    assert copied_targets(DOMAIN, {}) == []
    # a read-only disk (the seed) is pointed at the target's file, never copied
    both = {"/a/pool/vm-7-root.qcow2": "/b/pool/root", "/a/pool/vm-7-seed.iso": "/b/seed"}
    assert copied_targets(DOMAIN, both) == ["vda"]
    out = ET.fromstring(retarget(DOMAIN, both))
    assert [d.find("source").get("file") for d in out.findall("devices/disk")[:2]] == [
        "/b/pool/root",
        "/b/seed",
    ]


DOMAIN = f"""
<domain type="qemu">
  <name>vm-7</name>
  <metadata><vmapi:instance xmlns:vmapi="{METADATA_NS}"><vmapi:id>7</vmapi:id>
    <vmapi:installation>fra1</vmapi:installation></vmapi:instance></metadata>
  <devices>
    <disk type="file" device="disk">
      <source file="/a/pool/vm-7-root.qcow2"/>
      <backingStore type="file"><format type="raw"/><source file="/a/pool/base.img"/>
      </backingStore>
      <target dev="vda" bus="virtio"/>
    </disk>
    <disk type="file" device="disk">
      <source file="/a/pool/vm-7-seed.iso"/><target dev="vdb" bus="virtio"/><readonly/>
    </disk>
    <disk type="file" device="cdrom"><target dev="hdc" bus="ide"/></disk>
    <graphics type="vnc" port="5901" autoport="yes" listen="192.0.2.10" passwd="handed-out"
              passwdValidTo="2031-01-01T00:00:00"><listen type="address" address="192.0.2.10"/>
    </graphics>
    <serial type="pty"><log file="/a/logs/vm-7.log" append="on"/><target port="0"/></serial>
    <console type="pty"><log file="/a/logs/vm-7.log" append="on"/><target type="serial"/>
    </console>
  </devices>
</domain>
"""


def test_retargeted_disks_name_the_targets_files_and_nothing_else_changes():
    out = ET.fromstring(retarget(DOMAIN, {"/a/pool/vm-7-root.qcow2": "/b/pool/root"}))
    disks = out.findall("devices/disk")
    assert disks[0].find("source").get("file") == "/b/pool/root"
    assert disks[0].find("backingStore") is None  # the target reads its own chain
    assert disks[1].find("source").get("file") == "/a/pool/vm-7-seed.iso"  # not named
    assert disks[2].find("source") is None
    # vmapi's metadata survives, in its namespace (reconcile reads it on the target)
    instance = out.find(f"metadata/{{{METADATA_NS}}}instance")
    assert Metadata.parse(ET.tostring(instance, encoding="unicode")).vm_id == 7
    assert out.find("devices/graphics").get("listen") == "192.0.2.10"  # no display given


def test_the_target_gets_its_own_display_address_and_a_sealed_password():
    sealed = DisplaySpec("198.51.100.20", "n3wpassw", datetime(2000, 1, 1, tzinfo=UTC))
    out = ET.fromstring(retarget(DOMAIN, {}, sealed))
    [graphics] = out.findall("devices/graphics")
    assert graphics.attrib == {"type": "vnc", "autoport": "yes", "listen": "198.51.100.20",
                               "passwd": "n3wpassw", "passwdValidTo": "2000-01-01T00:00:00"}  # fmt: skip
    assert [el.attrib for el in graphics] == [{"type": "address", "address": "198.51.100.20"}]
    # where it was among the devices; the disks are untouched
    assert [el.tag for el in out.find("devices")][-3:] == ["graphics", "serial", "console"]
    assert out.find("devices/disk/source").get("file") == "/a/pool/vm-7-root.qcow2"


def test_statistics_of_a_finished_incoming_migration():
    raw = {
        "operation": MIGRATION_IN,
        "time_elapsed": 1250,
        "downtime": 13,
        "memory_processed": 105 * 2**20,
        "memory_iteration": 3,
        "type": 3,  # VIR_DOMAIN_JOB_COMPLETED
    }
    assert stats(raw) == MigrationStats(incoming=True, seconds=1.25, downtime=0.013,
                                        memory_bytes=105 * 2**20, memory_iterations=3)  # fmt: skip
    no_downtime = {"operation": MIGRATION_OUT}
    assert stats(no_downtime) == MigrationStats(incoming=False, seconds=0.0, downtime=None)


def test_no_statistics_when_the_last_job_was_no_migration():
    assert stats({"type": 0}) is None  # VIR_DOMAIN_JOB_NONE
    assert stats({"operation": SAVE}) is None


def test_the_console_is_logged_to_the_targets_file():
    out = ET.fromstring(retarget(DOMAIN, {}, console_log="/b/logs/vm-7.log"))
    logs = [*out.iterfind("devices/serial/log"), *out.iterfind("devices/console/log")]
    assert [el.attrib for el in logs] == [{"file": "/b/logs/vm-7.log", "append": "on"}] * 2
    kept = ET.fromstring(retarget(DOMAIN, {}))
    assert kept.find("devices/serial/log").get("file") == "/a/logs/vm-7.log"
