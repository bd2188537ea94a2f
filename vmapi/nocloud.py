"""A guest's cloud-init NoCloud seed: three small files and the ISO 9660 volume holding them.

Pure: plain dataclasses in, bytes out; no Flask, no models, no libvirt. It sits beside
``vmapi/addressing.py`` rather than in ``services/`` because it decides nothing about
state: the use case (``services/vms/cloud_init.py``) reads the inventory, builds a ``SeedSpec``,
calls ``seed_iso`` and uploads the bytes through the hypervisor driver; tests call it too.

The files (API.md "Guest configuration (cloud-init NoCloud)"), all written by PyYAML:
- ``meta-data``: ``instance-id``, ``local-hostname``, ``public-keys``;
- ``network-config``, version 2: one ``ethernets`` entry per NIC, matched by its MAC and
  renamed with ``set-name``, its addresses with their prefixes, the default routes and
  the DNS servers;
- ``user-data``: as given, or an empty ``#cloud-config`` when there is none.

**How a changed seed reaches the guest: the instance-id carries a digest of the seed.**
cloud-init applies network configuration on a new instance only (its default update
event, ``BOOT_NEW_INSTANCE``) and installs SSH keys from ``cc_ssh``, a once-per-instance
module; a guest whose seed changed under the same instance-id keeps its old addresses
and keys (the complaint about Proxmox's drive). So the instance-id is
``<base_instance_id>-<16 hex digits of SHA-256 over the other files>``: any change to
what the seed carries yields a new id, and the guest reapplies everything at its next
boot, while an unchanged seed keeps its id (rebuilding it is harmless). cloud-init's
``updates: {network: {when: [boot]}}`` was not chosen: it must live in user data, which
vmapi passes through untouched (it may be a script); it takes effect only from the boot
after cloud-init has read it; and it refreshes the network only, never the keys. The
price of a new instance: cloud-init also reruns its other per-instance modules, so the
guest regenerates its SSH host keys (unless its user data says ``ssh_deletekeys:
false``) and per-instance user scripts run again.

**Default routes as ``gateway4``/``gateway6``, not ``routes: [{to: ::/0}]``.** cloud-init
before 23.1 (Debian 12 ships 22.4) turns a v2 route to ``::/0`` into one to ``::/64``
(canonical/cloud-init PR 1973), so the IPv6 default route would be lost; the gateway
keys give a default route with every cloud-init renderer, and netplan still accepts them.
One default route per family: the gateway of the first address of that family on the
first NIC that has one. A second default route on another NIC would make ifupdown fail
(``File exists``) and leave netplan or networkd to pick one; the other NICs' subnets are on-link.

**The ISO: pycdlib** (pure Python, pinned) writes it in memory, with Rock Ridge and
Joliet names so ``meta-data`` keeps its lower-case name, and labels it ``cidata``. No
subprocess, no temporary files and no system package on the API hosts, unlike
``genisoimage`` (cdrkit, unmaintained since 2010). A seed is a few KiB of files in an
ISO of about 70 KiB, so bytes in memory are fine.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

import pycdlib
import yaml

VOLUME_LABEL = "cidata"
EMPTY_USER_DATA = b"#cloud-config\n"
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
#: Linux interface names: at most 15 bytes, no slash, colon or white space.
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_INSTANCE_BASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
#: (ISO 9660 level-1 name, Rock Ridge / Joliet name): the long names are what Linux sees.
_ISO_NAMES = {
    "meta-data": "/META_DAT.;1",
    "network-config": "/NETWORK_.;1",
    "user-data": "/USER_DAT.;1",
}


@dataclass(frozen=True)
class AddressSeed:
    """One address of a NIC, its prefix length and the gateway of its subnet."""

    address: str
    prefix: int
    gateway: str


@dataclass(frozen=True)
class NicSeed:
    """One NIC as the guest sees it: ``name`` is what cloud-init renames it to."""

    name: str
    mac: str
    ipv4: tuple[AddressSeed, ...] = ()
    ipv6: tuple[AddressSeed, ...] = ()


@dataclass(frozen=True)
class SeedSpec:
    """What one guest is told. ``base_instance_id`` is stable per VM and installation;
    the meta-data's instance-id is it plus a digest of the rest. Order matters (NICs,
    keys): give them in a stable order so that an unchanged inventory keeps its id."""

    base_instance_id: str
    hostname: str
    ssh_keys: tuple[str, ...] = ()
    user_data: str | None = None
    nics: tuple[NicSeed, ...] = ()
    dns_servers: tuple[str, ...] = ()


@dataclass(frozen=True)
class SeedFiles:
    """The three files of a seed and the instance-id written in its meta-data."""

    instance_id: str
    meta_data: bytes
    network_config: bytes
    user_data: bytes

    def by_name(self) -> dict[str, bytes]:
        return {
            "meta-data": self.meta_data,
            "network-config": self.network_config,
            "user-data": self.user_data,
        }


def _interface(text: str, prefix: int, version: int, what: str) -> str:
    try:
        iface = ipaddress.ip_interface(f"{text}/{prefix}")
    except ValueError as exc:
        raise ValueError(f"{what}: {text}/{prefix} is not an address with a prefix") from exc
    if iface.version != version:
        raise ValueError(f"{what}: {text} is not an IPv{version} address")
    return str(iface)


def _address(text: str, version: int | None, what: str) -> str:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError as exc:
        raise ValueError(f"{what}: {text!r} is not an IP address") from exc
    if version is not None and addr.version != version:
        raise ValueError(f"{what}: {text} is not an IPv{version} address")
    return str(addr)


def _ethernet(nic: NicSeed, gateways: dict[int, str | None]) -> dict[str, Any]:
    """One v2 ``ethernets`` entry; takes the default gateway of a family still unset."""
    mac = nic.mac.lower()
    if not _MAC.fullmatch(mac):
        raise ValueError(f"NIC {nic.name!r}: {nic.mac!r} is not a MAC address")
    if not _IFNAME.fullmatch(nic.name) or nic.name in (".", ".."):
        raise ValueError(f"{nic.name!r} is not a Linux interface name")
    entry: dict[str, Any] = {"match": {"macaddress": mac}, "set-name": nic.name}
    addresses: list[str] = []
    own_gateways: dict[str, str] = {}
    what = f"NIC {nic.name!r}"
    for version, seeds in ((4, nic.ipv4), (6, nic.ipv6)):
        for seed in seeds:
            addresses.append(_interface(seed.address, seed.prefix, version, what))
            gateway = _address(seed.gateway, version, what)
            if gateways[version] is None:
                gateways[version] = own_gateways[f"gateway{version}"] = gateway
    if addresses:
        entry["addresses"] = addresses
    entry.update(own_gateways)
    return entry


def network_config(spec: SeedSpec) -> dict[str, Any]:
    """The network-config (version 2) of a seed, as a plain structure."""
    gateways: dict[int, str | None] = {4: None, 6: None}
    ethernets: dict[str, Any] = {}
    macs: set[str] = set()
    dns = [_address(server, None, "DNS server") for server in spec.dns_servers]
    for nic in spec.nics:
        if nic.name in ethernets or nic.mac.lower() in macs:
            raise ValueError(f"NIC {nic.name!r} ({nic.mac}): the name or MAC is taken twice")
        macs.add(nic.mac.lower())
        ethernets[nic.name] = _ethernet(nic, gateways)
        if dns:
            # A copy per NIC: one shared list would be written as a YAML alias.
            ethernets[nic.name]["nameservers"] = {"addresses": list(dns)}
    return {"version": 2, "ethernets": ethernets}


def _dump(data: dict[str, Any]) -> bytes:
    # A wide line keeps every SSH key on one line (simple readers, e.g. a busybox init,
    # can grep the file); PyYAML quotes whatever YAML would read back as another type.
    text = yaml.safe_dump(
        data, sort_keys=False, default_flow_style=False, allow_unicode=True, width=1 << 20
    )
    return text.encode("utf-8")


def build_seed(spec: SeedSpec) -> SeedFiles:
    """The three files of a seed; raise ``ValueError`` on data no guest could use."""
    if not _INSTANCE_BASE.fullmatch(spec.base_instance_id):
        raise ValueError(f"{spec.base_instance_id!r} is not a usable instance-id base")
    carried = {
        "local-hostname": spec.hostname,
        "public-keys": [key.strip() for key in spec.ssh_keys],
    }
    network = _dump(network_config(spec))
    user = spec.user_data.encode("utf-8") if spec.user_data else EMPTY_USER_DATA
    digest = hashlib.sha256()
    for part in (_dump(carried), network, user):
        # Length-prefixed, so that bytes moving from one file to the next change the digest.
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    instance_id = f"{spec.base_instance_id}-{digest.hexdigest()[:16]}"
    meta = _dump({"instance-id": instance_id, **carried})
    return SeedFiles(instance_id, meta, network, user)


def seed_iso(files: SeedFiles) -> bytes:
    """An ISO 9660 volume labelled ``cidata`` holding the seed's files."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident=VOLUME_LABEL, joliet=3, rock_ridge="1.09")
    try:
        for name, data in files.by_name().items():
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                _ISO_NAMES[name],
                rr_name=name,
                joliet_path=f"/{name}",
            )
        out = io.BytesIO()
        iso.write_fp(out)
    finally:
        iso.close()
    return out.getvalue()
