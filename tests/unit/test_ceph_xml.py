"""Ceph RBD as libvirt XML: a disk on an RBD image (a network disk), the secret holding
the cephx key and the rbd storage pool; and what migration reads back from a domain with
such a disk (it is shared: never copied). Compared structurally (C14N). The same objects
on a real libvirtd and cluster: tests/hypervisor/test_ceph_driver.py."""

import xml.etree.ElementTree as ET

import pytest

from tests.unit.test_domain_xml import same_xml, spec
from vmapi.hypervisor import CephSource, DiskSpec
from vmapi.hypervisor.libvirt.ceph import (
    RBD_NS,
    description,
    key_bytes,
    pool_source,
    rbd_pool_xml,
    secret_xml,
    wanted_source,
)
from vmapi.hypervisor.libvirt.copies import chain
from vmapi.hypervisor.libvirt.designer import design, disk_xml
from vmapi.hypervisor.libvirt.migration import copied_targets, retarget

SECRET = "5b8f2c1e-3a4d-4e6f-9a0b-1c2d3e4f5a6b"
SOURCE = CephSource(monitors=(("192.0.2.11", 6789), ("192.0.2.12", 6790)), pool="vms",
                    user="vmapi", secret_uuid=SECRET)  # fmt: skip
#: a cephx key as `ceph auth get-key` prints it (base64)
KEY = "AQBDLxRpAAAAABAA5tE7d3Ez0l7u0m4tVwzX7w=="


def test_a_disk_on_an_rbd_image_is_a_network_disk_with_the_secret():
    disk = DiskSpec(path="vm-5-root", format="raw", target="vda", cache="writeback",
                    iotune={"read_iops_sec": 500}, rbd=SOURCE)  # fmt: skip
    expected = f"""
    <disk type="network" device="disk">
      <driver name="qemu" type="raw" cache="writeback"/>
      <source protocol="rbd" name="vms/vm-5-root">
        <host name="192.0.2.11" port="6789"/>
        <host name="192.0.2.12" port="6790"/>
      </source>
      <auth username="vmapi"><secret type="ceph" uuid="{SECRET}"/></auth>
      <target dev="vda" bus="virtio"/>
      <iotune><read_iops_sec>500</read_iops_sec></iotune>
    </disk>"""
    assert same_xml(disk_xml(disk).to_xml(), expected)


def test_a_domain_mixes_rbd_and_file_disks():
    root = DiskSpec(path="vm-5-root", format="raw", target="vda", rbd=SOURCE)
    data = DiskSpec(path="/pool/vm-5-data.qcow2", format="qcow2", target="vdb")
    seed = DiskSpec(path="vm-5-seed", format="raw", target="vdz", readonly=True, rbd=SOURCE)
    devices = ET.fromstring(design(spec(disks=(root, data), seed=seed)).to_xml()).find("devices")
    disks = devices.findall("disk")
    assert [(d.get("type"), d.find("target").get("dev")) for d in disks] == [
        ("network", "vda"), ("file", "vdb"), ("network", "vdz")]  # fmt: skip
    assert disks[1].find("source").attrib == {"file": "/pool/vm-5-data.qcow2"}
    assert disks[1].find("auth") is None
    assert disks[2].find("readonly") is not None
    assert disks[2].find("source").get("name") == "vms/vm-5-seed"


def test_the_secret_holds_the_key_digest_never_the_key():
    expected = f"""
    <secret ephemeral="no" private="yes">
      <uuid>{SECRET}</uuid>
      <description>{description(KEY)}</description>
      <usage type="ceph"><name>client.vmapi</name></usage>
    </secret>"""
    assert same_xml(secret_xml(SOURCE, KEY), expected)
    assert KEY not in secret_xml(SOURCE, KEY)
    assert ET.fromstring(secret_xml(SOURCE, None)).find("description") is None
    assert description(KEY) != description("AQBDLxRpAAAAABAA5tE7d3Ez0l7u0m4tVwzX7A==")
    assert description(KEY + "\n") == description(KEY)  # as a key file holds it


def test_the_secret_value_is_the_decoded_key_and_a_bad_key_is_not_quoted():
    assert len(key_bytes(KEY)) == 28  # a header (type, time, length) and 16 random bytes
    bad = "AQBDLxRpAAAAABAA5tE7d3Ez0l7u0m4tVwzX7w=!"
    with pytest.raises(ValueError, match="not base64") as caught:
        key_bytes(bad)
    assert bad not in str(caught.value)


def test_the_rbd_pool_names_monitors_user_secret_and_reports_real_allocations():
    expected = f"""
    <pool xmlns:rbd="{RBD_NS}" type="rbd">
      <name>ceph-vms</name>
      <source>
        <name>vms</name>
        <host name="192.0.2.11" port="6789"/>
        <host name="192.0.2.12" port="6790"/>
        <auth type="ceph" username="vmapi"><secret uuid="{SECRET}"/></auth>
      </source>
      <refresh><volume allocation="default"/></refresh>
      <rbd:config_opts><rbd:option name="client_mount_timeout" value="5"/></rbd:config_opts>
    </pool>"""
    assert same_xml(rbd_pool_xml("ceph-vms", SOURCE), expected)


def test_an_existing_pool_is_compared_by_its_source():
    # as libvirt answers it: its own order, a uuid, capacities
    answered = f"""
    <pool type="rbd"><name>ceph-vms</name><uuid>dc2c0b50-9980-4df5-ab77-0fefb9b0d4d4</uuid>
      <capacity unit="bytes">0</capacity>
      <source><host name="192.0.2.11" port="6789"/><host name="192.0.2.12" port="6790"/>
        <name>vms</name>
        <auth type="ceph" username="vmapi"><secret uuid="{SECRET}"/></auth></source>
    </pool>"""
    assert pool_source(answered) == wanted_source(SOURCE)
    assert pool_source(rbd_pool_xml("ceph-vms", SOURCE)) == wanted_source(SOURCE)
    for other in (
        CephSource(((("192.0.2.11", 6789),)), "vms", "vmapi", SECRET),
        CephSource(SOURCE.monitors, "images", "vmapi", SECRET),
        CephSource(SOURCE.monitors, "vms", "admin", SECRET),
    ):
        assert pool_source(rbd_pool_xml("ceph-vms", other)) != wanted_source(SOURCE)
    assert pool_source("<pool type='dir'><name>ceph-vms</name><target><path>/x</path>"
                       "</target></pool>") != wanted_source(SOURCE)  # fmt: skip


# A running domain with an RBD root disk and a local data disk, as libvirt reports it.
LIVE = f"""
<domain type="qemu"><name>vm-5</name><devices>
  <disk type="network" device="disk">
    <driver name="qemu" type="raw" cache="writeback"/>
    <auth username="vmapi"><secret type="ceph" uuid="{SECRET}"/></auth>
    <source protocol="rbd" name="vms/vm-5-root" index="2">
      <host name="192.0.2.11" port="6789"/>
    </source>
    <target dev="vda" bus="virtio"/>
  </disk>
  <disk type="file" device="disk">
    <driver name="qemu" type="qcow2"/>
    <source file="/pool/vm-5-data.qcow2" index="1"/>
    <target dev="vdb" bus="virtio"/>
  </disk>
</devices></domain>"""


def test_a_migration_never_copies_an_rbd_disk():
    assert copied_targets(LIVE, None) == ["vdb"]  # nothing named: every local disk
    assert copied_targets(LIVE, {"/pool/vm-5-data.qcow2": "/b/data"}) == ["vdb"]
    assert copied_targets(LIVE, {}) == []
    # retargeting leaves the network disk as it is
    out = ET.fromstring(retarget(LIVE, {"/pool/vm-5-data.qcow2": "/b/data"}))
    disks = out.findall("devices/disk")
    assert disks[0].find("source").attrib == {"protocol": "rbd", "name": "vms/vm-5-root",
                                              "index": "2"}  # fmt: skip
    assert disks[1].find("source").get("file") == "/b/data"


def test_the_chain_of_an_rbd_disk_is_its_image():
    disks = ET.fromstring(LIVE).findall("devices/disk")
    assert chain(disks[0]) == (("vms/vm-5-root", "raw"),)
    assert chain(disks[1]) == (("/pool/vm-5-data.qcow2", "qcow2"),)
