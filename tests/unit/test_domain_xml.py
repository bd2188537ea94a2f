"""Domain XML objects and designer: compared structurally (C14N), never as strings."""

import xml.etree.ElementTree as ET

import pytest

from vmapi.hypervisor import DiskSpec, DomainSpec
from vmapi.hypervisor.libvirt.config import (
    GUEST_AGENT_PORT,
    METADATA_NS,
    BackingStore,
    CpuTune,
    Memory,
    Metadata,
    Serial,
    Vcpu,
    Volume,
)
from vmapi.hypervisor.libvirt.designer import design

GIB = 1024**3


def same_xml(a: str, b: str) -> bool:
    return ET.canonicalize(a, strip_text=True) == ET.canonicalize(b, strip_text=True)


def spec(**overrides):
    values = dict(name="vm-5", uuid="4d7c3c2e-6a3b-4b8f-9f0e-1d2c3b4a5968", domain_type="kvm",
                  vcpus=2, max_vcpus=8, memory=GIB, max_memory=2 * GIB, vm_id=5,
                  installation="fra1", cpu_period=100000, cpu_quota=50000)  # fmt: skip
    values.update(overrides)
    return DomainSpec(**values)


def test_kvm_domain():
    expected = f"""
    <domain type="kvm">
      <name>vm-5</name>
      <uuid>4d7c3c2e-6a3b-4b8f-9f0e-1d2c3b4a5968</uuid>
      <metadata>
        <vmapi:instance xmlns:vmapi="{METADATA_NS}">
          <vmapi:id>5</vmapi:id><vmapi:installation>fra1</vmapi:installation>
        </vmapi:instance>
      </metadata>
      <memory unit="KiB">2097152</memory>
      <currentMemory unit="KiB">1048576</currentMemory>
      <vcpu placement="static" current="2">8</vcpu>
      <cputune><period>100000</period><quota>50000</quota></cputune>
      <os><type arch="x86_64">hvm</type><boot dev="hd"/><boot dev="network"/></os>
      <features><acpi/><apic/></features>
      <clock offset="utc"/>
      <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
      <devices>
        <serial type="pty"/><console type="pty"/>
        <channel type="unix"><target type="virtio" name="org.qemu.guest_agent.0"/></channel>
        <memballoon model="virtio"/>
      </devices>
    </domain>"""
    assert same_xml(design(spec()).to_xml(), expected)


def test_a_pc_domain_has_the_guest_agent_port_and_the_test_driver_none():
    (channel,) = ET.fromstring(design(spec()).to_xml()).findall("devices/channel")
    assert same_xml(
        ET.tostring(channel, encoding="unicode"),
        '<channel type="unix"><target type="virtio" name="org.qemu.guest_agent.0"/></channel>',
    )
    for domain_type in ("kvm", "qemu"):
        root = ET.fromstring(design(spec(domain_type=domain_type)).to_xml())
        assert root.find("devices/channel/target").get("name") == GUEST_AGENT_PORT
    assert ET.fromstring(design(spec(domain_type="test")).to_xml()).find("devices/channel") is None


def test_no_cputune_without_limit_and_no_current_when_equal():
    xml = design(spec(cpu_quota=None, cpu_period=None, vcpus=8)).to_xml()
    root = ET.fromstring(xml)
    assert root.find("cputune") is None
    assert root.find("vcpu").attrib == {"placement": "static"}
    assert root.find("vcpu").text == "8"


def test_test_driver_domain_is_minimal():
    root = ET.fromstring(design(spec(domain_type="test")).to_xml())
    assert root.get("type") == "test"
    assert root.find("features") is None
    assert list(root.find("devices")) == []


def test_values_are_escaped():
    xml = design(spec(installation='a<b>&"c')).to_xml()
    assert (
        Metadata.parse(
            ET.tostring(ET.fromstring(xml).find("metadata")[0], encoding="unicode")
        ).installation
        == 'a<b>&"c'
    )


@pytest.mark.parametrize(
    "xml",
    [
        # as libvirt's metadata() answers: no prefix, the namespace was the question
        "<instance><id>7</id><installation>x</installation><extra>1</extra></instance>",
        f'<vmapi:instance xmlns:vmapi="{METADATA_NS}"><vmapi:id>7</vmapi:id>'
        "<vmapi:installation>x</vmapi:installation><vmapi:extra>1</vmapi:extra></vmapi:instance>",
    ],
)
def test_metadata_parse(xml):
    meta = Metadata.parse(xml)
    assert (meta.vm_id, meta.installation, meta.values) == (7, "x", {"extra": "1"})


def test_metadata_parse_rejects_other_elements():
    with pytest.raises(ValueError):
        Metadata.parse("<other><id>1</id></other>")


def test_small_objects():
    assert same_xml(Memory("memory", 1024).to_xml(), '<memory unit="KiB">1024</memory>')
    assert same_xml(Vcpu(4, 4).to_xml(), '<vcpu placement="static">4</vcpu>')
    assert same_xml(
        CpuTune(100000, -1).to_xml(), "<cputune><period>100000</period><quota>-1</quota></cputune>"
    )


def test_console_log_on_the_serial_port_and_firmware_messages_there_too():
    root = ET.fromstring(design(spec(console_log="/srv/vmapi/console/vm-5.log")).to_xml())
    assert same_xml(
        ET.tostring(root.find("devices/serial"), encoding="unicode"),
        '<serial type="pty"><log file="/srv/vmapi/console/vm-5.log" append="on"/></serial>',
    )
    assert same_xml(
        ET.tostring(root.find("os"), encoding="unicode"),
        '<os><type arch="x86_64">hvm</type><boot dev="hd"/><boot dev="network"/>'
        '<bios useserial="yes"/></os>',
    )
    # the serial port stays the guest's console
    assert [el.tag for el in root.find("devices")] == ["serial", "console", "channel",
                                                      "memballoon"]  # fmt: skip


def test_no_console_log_no_log_element_and_no_serial_firmware():
    root = ET.fromstring(design(spec()).to_xml())
    assert root.find("devices/serial/log") is None
    assert root.find("os/bios") is None


def test_serial_log_without_append():
    assert same_xml(
        Serial("/l", append=False).to_xml(),
        '<serial type="pty"><log file="/l" append="off"/></serial>',
    )
    assert same_xml(Serial().to_xml(), '<serial type="pty"/>')


def test_overlay_volume():
    volume = Volume("vm-5-root", 20 * GIB, "qcow2", compat="1.1",
                    backing=BackingStore("/pool/image-3", "raw"))  # fmt: skip
    expected = f"""
    <volume>
      <name>vm-5-root</name>
      <capacity unit="bytes">{20 * GIB}</capacity>
      <target><format type="qcow2"/><compat>1.1</compat></target>
      <backingStore><path>/pool/image-3</path><format type="raw"/></backingStore>
    </volume>"""
    assert same_xml(volume.to_xml(), expected)


def test_sparse_volume_and_escaped_names():
    expected = """
    <volume>
      <name>a&lt;b&amp;c</name>
      <capacity unit="bytes">1048577</capacity>
      <allocation unit="bytes">0</allocation>
      <target><format type="raw"/></target>
    </volume>"""
    assert same_xml(Volume("a<b&c", 1048577, "raw", allocation=0).to_xml(), expected)
    assert same_xml(
        Volume("v", 1, "qcow2").to_xml(),
        '<volume><name>v</name><capacity unit="bytes">1</capacity>'
        '<target><format type="qcow2"/></target></volume>',
    )


def test_the_seed_is_a_read_only_raw_disk_after_the_others():
    root = DiskSpec(path="/pool/root.qcow2", format="qcow2", target="vda", cache="none")
    seed = DiskSpec(path="/pool/vm-5-seed-ab.iso", format="raw", target="vdz", readonly=True)
    devices = ET.fromstring(design(spec(disks=(root,), seed=seed)).to_xml()).find("devices")
    disks = devices.findall("disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdz"]  # vda boots
    expected = """
    <disk type="file" device="disk">
      <driver name="qemu" type="raw"/>
      <source file="/pool/vm-5-seed-ab.iso"/>
      <target dev="vdz" bus="virtio"/>
      <readonly/>
    </disk>"""
    assert same_xml(ET.tostring(disks[1], encoding="unicode"), expected)
    assert disks[0].find("readonly") is None
    # no seed: no disk for it
    assert (
        ET.fromstring(design(spec(disks=(root,))).to_xml())
        .find("devices")
        .findall("disk")[-1]
        .find("target")
        .get("dev")
        == "vda"
    )
