"""libvirt domain XML as small objects (how it is written), after Nova's ``config.py``.

Each object knows its element; ``Domain.to_xml()`` serializes the tree with
ElementTree, so values are always escaped and no XML is ever built from strings.
What goes into the objects is decided in :mod:`vmapi.hypervisor.libvirt.designer`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime

#: Namespace of the <metadata> element vmapi stamps on every domain it makes.
METADATA_NS = "urn:vmapi:domain:1"
METADATA_PREFIX = "vmapi"


def _q(tag: str) -> str:
    # Written as a prefixed name with the xmlns declaration on our own element: libvirt
    # keeps <metadata> children only with the namespace declared on them, and
    # ElementTree's namespace support would hoist the declaration to <domain>.
    return f"{METADATA_PREFIX}:{tag}"


def _local(tag: str) -> str:
    return tag.split("}", 1)[-1].split(":", 1)[-1]


class XmlObject:
    """Something that becomes one XML element."""

    def element(self) -> ET.Element:
        raise NotImplementedError

    def to_xml(self) -> str:
        return ET.tostring(self.element(), encoding="unicode")


@dataclass
class Metadata(XmlObject):
    """``<metadata><vmapi:instance>``: the VM id and installation, plus extra values."""

    vm_id: int
    installation: str
    values: dict[str, str] = field(default_factory=dict)
    #: per NIC: mac, ipv4, ipv4_gateway, ipv6, ipv6_gateway, vlan (what provisioning reads)
    interfaces: list[dict[str, str]] = field(default_factory=list)

    def instance(self) -> ET.Element:
        root = ET.Element(_q("instance"), {f"xmlns:{METADATA_PREFIX}": METADATA_NS})
        ET.SubElement(root, _q("id")).text = str(self.vm_id)
        ET.SubElement(root, _q("installation")).text = self.installation
        for key, value in sorted(self.values.items()):
            ET.SubElement(root, _q(key)).text = value
        for nic in self.interfaces:
            ET.SubElement(root, _q("interface"), {k: v for k, v in nic.items() if v})
        return root

    def element(self) -> ET.Element:
        meta = ET.Element("metadata")
        meta.append(self.instance())
        return meta

    @classmethod
    def parse(cls, xml: str) -> Metadata:
        """Read ``<vmapi:instance>`` (as libvirt's ``metadata()`` returns it)."""
        # From the host's libvirt, not from guests; expat refuses entity expansion bombs.
        root = ET.fromstring(xml)  # noqa: S314
        # libvirt's metadata() answers the element without its prefix: the namespace
        # was the question. A full document names it.
        if root.tag not in ("instance", f"{{{METADATA_NS}}}instance"):
            raise ValueError(f"not a vmapi instance element: {root.tag}")
        values, interfaces = {}, []
        for child in root:
            if _local(child.tag) == "interface":
                interfaces.append(dict(child.attrib))
            else:
                values[_local(child.tag)] = child.text or ""
        vm_id = int(values.pop("id"))
        installation = values.pop("installation")
        return cls(vm_id, installation, values, interfaces)


@dataclass
class Memory(XmlObject):
    tag: str  # "memory" (the maximum) or "currentMemory"
    kib: int

    def element(self) -> ET.Element:
        el = ET.Element(self.tag, unit="KiB")
        el.text = str(self.kib)
        return el


@dataclass
class Vcpu(XmlObject):
    current: int
    maximum: int

    def element(self) -> ET.Element:
        el = ET.Element("vcpu", placement="static")
        if self.current != self.maximum:
            el.set("current", str(self.current))
        el.text = str(self.maximum)
        return el


@dataclass
class CpuTune(XmlObject):
    """``<cputune>``: the cgroups cpu controller's bandwidth per vCPU."""

    period: int
    quota: int

    def element(self) -> ET.Element:
        el = ET.Element("cputune")
        ET.SubElement(el, "period").text = str(self.period)
        ET.SubElement(el, "quota").text = str(self.quota)
        return el


@dataclass
class Os(XmlObject):
    arch: str = "x86_64"
    boot: tuple[str, ...] = ("hd", "network")
    #: the firmware's own messages on the serial port too (``<bios useserial>``)
    serial_firmware: bool = False

    def element(self) -> ET.Element:
        el = ET.Element("os")
        ET.SubElement(el, "type", arch=self.arch).text = "hvm"
        for dev in self.boot:
            ET.SubElement(el, "boot", dev=dev)
        if self.serial_firmware:
            ET.SubElement(el, "bios", useserial="yes")
        return el


@dataclass
class Device(XmlObject):
    """A device given as tag and attributes, with optional child devices (consoles, balloon)."""

    tag: str
    attrs: dict[str, str] = field(default_factory=dict)
    children: list[Device] = field(default_factory=list)

    def element(self) -> ET.Element:
        el = ET.Element(self.tag, self.attrs)
        for child in self.children:
            el.append(child.element())
        return el


@dataclass
class Serial(XmlObject):
    """``<serial type='pty'>``, its output also logged to ``log`` by the node's log daemon
    (virtlogd, which rotates the file); ``append`` keeps earlier runs' output."""

    log: str | None = None
    append: bool = True

    def element(self) -> ET.Element:
        el = ET.Element("serial", type="pty")
        if self.log:
            ET.SubElement(el, "log", file=self.log, append="on" if self.append else "off")
        return el


#: The virtio-serial port QEMU's guest agent (qemu-ga) opens inside the guest.
GUEST_AGENT_PORT = "org.qemu.guest_agent.0"


@dataclass
class GuestAgentChannel(XmlObject):
    """``<channel type='unix'>`` to the guest agent's virtio port: libvirt makes the
    socket on the host (in its own state directory, left out of a migration's XML) and
    talks through it to qemu-ga when the guest runs one (to freeze its file systems for
    a copy of a disk). A guest without an agent never opens the port: nothing answers."""

    def element(self) -> ET.Element:
        el = ET.Element("channel", type="unix")
        ET.SubElement(el, "target", type="virtio", name=GUEST_AGENT_PORT)
        return el


def filterref(name: str, params: list[tuple[str, str]]) -> ET.Element:
    """``<filterref>`` to a network filter, its variables as repeated ``<parameter>``s."""
    el = ET.Element("filterref", filter=name)
    for key, value in params:
        ET.SubElement(el, "parameter", name=key, value=value)
    return el


@dataclass
class Nic(XmlObject):
    """``<interface>``: a virtio NIC on a bridge, a tap device, or QEMU's user network,
    guarded by a network filter when ``filter`` names one."""

    mode: str
    mac: str
    device: str | None = None
    model: str = "virtio"
    filter: str | None = None
    filter_params: list[tuple[str, str]] = field(default_factory=list)

    def element(self) -> ET.Element:
        el = ET.Element("interface", type=self.mode)
        ET.SubElement(el, "mac", address=self.mac)
        if self.mode == "bridge":
            ET.SubElement(el, "source", bridge=self.device or "")
        elif self.mode == "ethernet" and self.device:
            ET.SubElement(el, "target", dev=self.device)
        ET.SubElement(el, "model", type=self.model)
        if self.filter:
            el.append(filterref(self.filter, self.filter_params))
        return el


@dataclass
class NetworkSource:
    """Where a network disk is: an RBD image (``protocol`` rbd, ``name`` <ceph pool>/<image>)
    behind the monitors ``hosts``, reached as ``username`` with the key in the libvirt
    secret ``secret_uuid``."""

    protocol: str
    name: str
    hosts: tuple[tuple[str, int], ...]
    username: str
    secret_uuid: str


@dataclass
class Disk(XmlObject):
    """``<disk type='file'>``: a volume as a virtio disk with cache mode and ``<iotune>``,
    or ``<readonly/>`` for the guest; ``<disk type='network'>`` when it has a ``network``
    source (``path`` is then unused)."""

    path: str
    format: str
    target: str
    cache: str | None = None
    iotune: dict[str, int] = field(default_factory=dict)
    readonly: bool = False
    network: NetworkSource | None = None

    def element(self) -> ET.Element:
        net = self.network
        el = ET.Element("disk", type="file" if net is None else "network", device="disk")
        driver = {"name": "qemu", "type": self.format}
        if self.cache:
            driver["cache"] = self.cache
        ET.SubElement(el, "driver", driver)
        if net is None:
            ET.SubElement(el, "source", file=self.path)
        else:
            source = ET.SubElement(el, "source", protocol=net.protocol, name=net.name)
            for host, port in net.hosts:
                ET.SubElement(source, "host", name=host, port=str(port))
            auth = ET.SubElement(el, "auth", username=net.username)
            ET.SubElement(auth, "secret", type="ceph", uuid=net.secret_uuid)
        ET.SubElement(el, "target", dev=self.target, bus="virtio")
        if self.readonly:
            ET.SubElement(el, "readonly")
        if self.iotune:
            iotune = ET.SubElement(el, "iotune")
            for key in sorted(self.iotune):
                ET.SubElement(iotune, key).text = str(self.iotune[key])
        return el


#: How libvirt writes a display password's expiry (always UTC).
VALID_TO_FORMAT = "%Y-%m-%dT%H:%M:%S"


@dataclass
class Graphics(XmlObject):
    """``<graphics type='vnc'>`` on a port the hypervisor picks (``autoport``), listening
    on one address, with a password and the time it stops being accepted."""

    listen: str
    password: str
    password_valid_to: datetime | None = None

    def element(self) -> ET.Element:
        attrs = {"type": "vnc", "autoport": "yes", "listen": self.listen, "passwd": self.password}
        if self.password_valid_to is not None:
            attrs["passwdValidTo"] = password_valid_to(self.password_valid_to)
        el = ET.Element("graphics", attrs)
        ET.SubElement(el, "listen", type="address", address=self.listen)
        return el


def password_valid_to(moment: datetime) -> str:
    """``passwdValidTo``: UTC, to the second."""
    return moment.astimezone(UTC).strftime(VALID_TO_FORMAT)


@dataclass
class StoragePool(XmlObject):
    """A ``dir`` storage pool."""

    name: str
    path: str

    def element(self) -> ET.Element:
        el = ET.Element("pool", type="dir")
        ET.SubElement(el, "name").text = self.name
        target = ET.SubElement(el, "target")
        ET.SubElement(target, "path").text = self.path
        return el


@dataclass
class BackingStore(XmlObject):
    """``<backingStore>`` of a volume: the file its copy-on-write layer reads through to."""

    path: str
    format: str

    def element(self) -> ET.Element:
        el = ET.Element("backingStore")
        ET.SubElement(el, "path").text = self.path
        ET.SubElement(el, "format", type=self.format)
        return el


@dataclass
class Volume(XmlObject):
    name: str
    capacity: int  # bytes
    format: str
    allocation: int | None = None  # bytes allocated up front; None: libvirt's default
    backing: BackingStore | None = None
    compat: str | None = None  # qcow2 version: "1.1" (v3: zero clusters, lazy refcounts)

    def element(self) -> ET.Element:
        el = ET.Element("volume")
        ET.SubElement(el, "name").text = self.name
        ET.SubElement(el, "capacity", unit="bytes").text = str(self.capacity)
        if self.allocation is not None:
            ET.SubElement(el, "allocation", unit="bytes").text = str(self.allocation)
        target = ET.SubElement(el, "target")
        ET.SubElement(target, "format", type=self.format)
        if self.compat is not None:
            ET.SubElement(target, "compat").text = self.compat
        if self.backing is not None:
            el.append(self.backing.element())
        return el


@dataclass
class Domain(XmlObject):
    type: str
    name: str
    uuid: str
    metadata: Metadata
    memory: Memory
    current_memory: Memory
    vcpu: Vcpu
    os: Os
    cputune: CpuTune | None = None
    features: tuple[str, ...] = ()
    clock_offset: str | None = None
    lifecycle: dict[str, str] = field(default_factory=dict)
    devices: list[XmlObject] = field(default_factory=list)
    nics: list[Nic] = field(default_factory=list)
    disks: list[Disk] = field(default_factory=list)
    graphics: Graphics | None = None

    def element(self) -> ET.Element:
        root = ET.Element("domain", type=self.type)
        ET.SubElement(root, "name").text = self.name
        ET.SubElement(root, "uuid").text = self.uuid
        root.append(self.metadata.element())
        root.append(self.memory.element())
        root.append(self.current_memory.element())
        root.append(self.vcpu.element())
        if self.cputune is not None:
            root.append(self.cputune.element())
        root.append(self.os.element())
        if self.features:
            features = ET.SubElement(root, "features")
            for name in self.features:
                ET.SubElement(features, name)
        if self.clock_offset:
            ET.SubElement(root, "clock", offset=self.clock_offset)
        for event in ("on_poweroff", "on_reboot", "on_crash"):
            if event in self.lifecycle:
                ET.SubElement(root, event).text = self.lifecycle[event]
        devices = ET.SubElement(root, "devices")
        for disk in self.disks:
            devices.append(disk.element())
        for nic in self.nics:
            devices.append(nic.element())
        for device in self.devices:
            devices.append(device.element())
        if self.graphics is not None:
            devices.append(self.graphics.element())
        return root
