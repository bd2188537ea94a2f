"""The seed as cloud-init itself reads it: Debian's ``cloud-init`` package (22.4, in the
system Python, not the virtualenv) runs tests/unit/cloudinit_probe.py in a subprocess.

- blkid finds the ISO by its label the way NoCloud looks for it; genisoimage's isoinfo
  extracts the files into a seed folder, which NoCloud's reader reads back;
- the network-config parses into the MAC matches, addresses, gateways and DNS servers
  given, and cloud-init's networkd renderer writes default routes through the gateways;
- successive boots (cloud-init's Init, its cache and its per-instance runner) show that a
  changed seed makes a new instance, so the network and the keys are applied again,
  while an unchanged seed does not; and that a changed seed under the old instance-id
  would be ignored, which is why the instance-id carries a digest.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import unavailable
from tests.unit.test_nocloud import KEY_A, KEY_B, sample_spec, with_nic
from vmapi.nocloud import AddressSeed, SeedFiles, build_seed, seed_iso

SYSTEM_PYTHON = "/usr/bin/python3"
PROBE = Path(__file__).with_name("cloudinit_probe.py")


@pytest.fixture(scope="module")
def cloudinit() -> None:
    found = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import cloudinit.sources.DataSourceNoCloud"],
        capture_output=True,
        check=False,
    )
    if found.returncode != 0:
        unavailable("cloud-init is not installed for the system Python (Debian package cloud-init)")


def probe(*args: str) -> dict[str, Any]:
    result = subprocess.run(
        [SYSTEM_PYTHON, str(PROBE), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def seed_folder(files: SeedFiles, folder: Path) -> str:
    folder.mkdir(parents=True)
    for name, data in files.by_name().items():
        (folder / name).write_bytes(data)
    return str(folder)


def test_nocloud_finds_the_iso_by_its_label_and_reads_its_files(cloudinit, tmp_path):
    isoinfo = shutil.which("isoinfo")
    if isoinfo is None:
        unavailable("isoinfo (Debian package genisoimage) is not installed")
    files = build_seed(sample_spec())
    iso = tmp_path / "seed.iso"
    iso.write_bytes(seed_iso(files))

    found = probe("find", str(iso))
    # NoCloud keeps the devices that are ISO 9660 (or vfat) and carry the label.
    assert found["TYPE=iso9660"] == [str(iso)]
    assert str(iso) in found["LABEL=cidata"] + found["LABEL=CIDATA"]

    folder = tmp_path / "extracted"
    folder.mkdir()
    for name in files.by_name():
        (folder / name).write_bytes(
            subprocess.run(
                [isoinfo, "-R", "-x", f"/{name}", "-i", str(iso)], check=True, capture_output=True
            ).stdout
        )
    read = probe("read", str(folder))
    assert read["found"] is True
    assert read["instance_id"] == files.instance_id


def test_nocloud_reads_meta_data_and_user_data(cloudinit, tmp_path):
    files = build_seed(sample_spec())
    read = probe("read", seed_folder(files, tmp_path / "seed"))
    assert read["found"] is True
    assert read["instance_id"] == files.instance_id
    assert read["fqdn"] == "web1.example.com"
    assert read["hostname"] == "web1"  # cloud-init's short name from the FQDN
    assert read["public_keys"] == [KEY_A, KEY_B]
    assert read["userdata_raw"] == "#cloud-config\npackages: [nginx]\n"
    assert read["userdata_parts"] == [
        {"content_type": "text/cloud-config", "payload": "#cloud-config\npackages: [nginx]\n"}
    ]


@pytest.mark.parametrize(
    ("user_data", "content_type"),
    [(None, "text/cloud-config"), ("#!/bin/sh\necho 'héllo'\n", "text/x-shellscript")],
    ids=["none", "script"],
)
def test_nocloud_reads_user_data_as_what_it_is(cloudinit, tmp_path, user_data, content_type):
    files = build_seed(sample_spec(user_data=user_data))
    read = probe("read", seed_folder(files, tmp_path / "seed"))
    assert read["userdata_raw"] == files.user_data.decode("utf-8")
    assert [part["content_type"] for part in read["userdata_parts"]] == [content_type]


def test_single_label_hostname_and_yaml_lookalikes(cloudinit, tmp_path):
    spec = with_nic(sample_spec(hostname="yes", ssh_keys=()), 0, mac="12:34:56:12:34:56")
    read = probe("read", seed_folder(build_seed(spec), tmp_path / "seed"))
    assert read["hostname"] == "yes"
    assert read["public_keys"] == []
    assert read["network"]["interfaces"][0]["mac_address"] == "12:34:56:12:34:56"


def test_network_config_parses_into_what_was_given(cloudinit, tmp_path):
    read = probe("read", seed_folder(build_seed(sample_spec()), tmp_path / "seed"))
    network = read["network"]
    interfaces = {iface["name"]: iface for iface in network["interfaces"]}
    assert set(interfaces) == {"eth0", "eth1"}
    assert interfaces["eth0"]["mac_address"] == "52:54:00:12:34:56"
    assert interfaces["eth1"]["mac_address"] == "52:54:00:ab:cd:ef"
    static = {
        name: [(s["type"], s["address"], s["prefix"], s["gateway"]) for s in iface["subnets"]]
        for name, iface in interfaces.items()
    }
    assert static == {
        "eth0": [
            ("static", "198.51.100.10", 24, "198.51.100.1"),
            ("static", "2001:db8:100::10", 64, "2001:db8:100::1"),
        ],
        "eth1": [("static", "203.0.113.20", 28, None)],
    }
    assert all(not s["routes"] for i in interfaces.values() for s in i["subnets"])
    for iface in interfaces.values():
        assert iface["dns_nameservers"] == ["192.0.2.53", "2001:db8::53"]
    # cloud-init 22.4 gathers each interface's servers into a global list, repeats and all.
    assert set(network["dns_nameservers"]) == {"192.0.2.53", "2001:db8::53"}


def networkd_sections(text: str) -> list[tuple[str, list[str]]]:
    """A systemd .network file as (section, lines) in order (sections may repeat)."""
    sections: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("["):
            sections.append((line.strip("[]"), []))
        elif line.strip() and not line.startswith("#"):
            sections[-1][1].append(line)
    return sections


def test_cloud_init_renders_default_routes_through_the_gateways(cloudinit, tmp_path):
    read = probe("read", seed_folder(build_seed(sample_spec()), tmp_path / "seed"))
    rendered = read["network"]["networkd"]
    eth0 = networkd_sections(rendered["10-cloud-init-eth0.network"])
    eth1 = networkd_sections(rendered["10-cloud-init-eth1.network"])
    assert ("Match", ["MACAddress=52:54:00:12:34:56", "Name=eth0"]) in eth0
    assert ("Address", ["Address=198.51.100.10/24"]) in eth0
    assert ("Address", ["Address=2001:db8:100::10/64"]) in eth0
    # A route with a gateway and no destination is systemd-networkd's default route.
    assert [lines for name, lines in eth0 if name == "Route"] == [
        ["Gateway=198.51.100.1"],
        ["Gateway=2001:db8:100::1"],
    ]
    assert ("Network", ["DHCP=no", "DNS=192.0.2.53 2001:db8::53"]) in eth0
    assert ("Match", ["MACAddress=52:54:00:ab:cd:ef", "Name=eth1"]) in eth1
    assert ("Address", ["Address=203.0.113.20/28"]) in eth1
    assert not [lines for name, lines in eth1 if name == "Route"]


# -- the re-apply mechanism, decided by cloud-init's own code --------------------------


def moved(spec=None):
    """The sample guest after an admin moved eth0 to other addresses and a key changed."""
    spec = spec or sample_spec()
    spec = with_nic(
        spec,
        0,
        ipv4=(AddressSeed("198.51.100.20", 24, "198.51.100.1"),),
        ipv6=(AddressSeed("2001:db8:100::20", 64, "2001:db8:100::1"),),
    )
    return dataclasses.replace(spec, ssh_keys=(KEY_B,))


def test_a_changed_seed_is_applied_at_the_next_boot_and_an_unchanged_one_is_not(
    cloudinit, tmp_path
):
    first = build_seed(sample_spec())
    second = build_seed(moved())
    seeds = [
        seed_folder(first, tmp_path / "first"),
        seed_folder(build_seed(sample_spec()), tmp_path / "first-rebuilt"),
        seed_folder(second, tmp_path / "second"),
        seed_folder(build_seed(moved()), tmp_path / "second-rebuilt"),
    ]
    report = probe("boots", str(tmp_path / "guest"), *seeds)
    assert report["ssh_frequency"] == "once-per-instance"  # keys come with a new instance only
    boots = report["boots"]
    assert [b["instance_id"] for b in boots] == [first.instance_id] * 2 + [second.instance_id] * 2
    assert [b["new_instance"] for b in boots] == [True, False, True, False]
    assert [b["ssh_module_ran"] for b in boots] == [True, False, True, False]
    assert [b["network_applied"] for b in boots] == [
        [["198.51.100.10", "2001:db8:100::10", "203.0.113.20"]],
        [],
        [["198.51.100.20", "2001:db8:100::20", "203.0.113.20"]],
        [],
    ]
    assert boots[2]["public_keys"] == [KEY_B]
    # No boot event is enabled: the new instance alone brings the changes.
    assert not any(b["network_on_boot_event"] for b in boots)


def test_a_changed_seed_under_the_old_instance_id_would_be_ignored(cloudinit, tmp_path):
    """Why the id must change: cloud-init keeps what it cached for the instance."""
    first = build_seed(sample_spec())
    second = build_seed(moved())
    meta = yaml.safe_load(second.meta_data)
    meta["instance-id"] = first.instance_id
    stale = dataclasses.replace(second, meta_data=yaml.safe_dump(meta).encode())
    report = probe(
        "boots",
        str(tmp_path / "guest"),
        seed_folder(first, tmp_path / "first"),
        seed_folder(stale, tmp_path / "stale"),
    )
    boot = report["boots"][1]
    assert boot["new_instance"] is False
    assert boot["network_applied"] == []
    assert boot["ssh_module_ran"] is False
    assert boot["public_keys"] == [KEY_A, KEY_B]  # the old keys, from cloud-init's cache
