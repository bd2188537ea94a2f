"""The NoCloud seed's files and ISO (vmapi/nocloud.py), read back by PyYAML and by
genisoimage's isoinfo. tests/unit/test_nocloud_cloudinit.py has cloud-init read them."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import unavailable
from vmapi.nocloud import (
    AddressSeed,
    NicSeed,
    SeedFiles,
    SeedSpec,
    build_seed,
    seed_iso,
)

KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGtleS1hLWtleS1hLWtleS1hLWtleS1hLWtleS1h alice@example"
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGtleS1iLWtleS1iLWtleS1iLWtleS1iLWtleS1i"


def sample_spec(**changes) -> SeedSpec:
    """A guest with two NICs: the first with IPv4 and IPv6, the second IPv4 only."""
    spec = SeedSpec(
        base_instance_id="vmapi-test-7",
        hostname="web1.example.com",
        ssh_keys=(KEY_A, KEY_B),
        user_data="#cloud-config\npackages: [nginx]\n",
        nics=(
            NicSeed(
                name="eth0",
                mac="52:54:00:12:34:56",
                ipv4=(AddressSeed("198.51.100.10", 24, "198.51.100.1"),),
                ipv6=(AddressSeed("2001:db8:100::10", 64, "2001:db8:100::1"),),
            ),
            NicSeed(
                name="eth1",
                mac="52:54:00:AB:CD:EF",
                ipv4=(AddressSeed("203.0.113.20", 28, "203.0.113.17"),),
            ),
        ),
        dns_servers=("192.0.2.53", "2001:db8::53"),
    )
    return dataclasses.replace(spec, **changes)


def with_nic(spec: SeedSpec, index: int, **changes) -> SeedSpec:
    nics = list(spec.nics)
    nics[index] = dataclasses.replace(nics[index], **changes)
    return dataclasses.replace(spec, nics=tuple(nics))


def test_meta_data():
    files = build_seed(sample_spec())
    assert yaml.safe_load(files.meta_data) == {
        "instance-id": files.instance_id,
        "local-hostname": "web1.example.com",
        "public-keys": [KEY_A, KEY_B],
    }
    assert re.fullmatch(r"vmapi-test-7-[0-9a-f]{16}", files.instance_id)


def test_network_config_v2():
    config = yaml.safe_load(build_seed(sample_spec()).network_config)
    dns = {"addresses": ["192.0.2.53", "2001:db8::53"]}
    assert config == {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": "52:54:00:12:34:56"},
                "set-name": "eth0",
                "addresses": ["198.51.100.10/24", "2001:db8:100::10/64"],
                "gateway4": "198.51.100.1",
                "gateway6": "2001:db8:100::1",
                "nameservers": dns,
            },
            # One default route per family: eth1's IPv4 gateway is not a second one.
            "eth1": {
                "match": {"macaddress": "52:54:00:ab:cd:ef"},
                "set-name": "eth1",
                "addresses": ["203.0.113.20/28"],
                "nameservers": dns,
            },
        },
    }


def test_default_route_of_a_family_goes_to_the_first_nic_that_has_it():
    spec = with_nic(sample_spec(), 0, ipv4=())
    ethernets = yaml.safe_load(build_seed(spec).network_config)["ethernets"]
    assert ethernets["eth0"]["gateway6"] == "2001:db8:100::1"
    assert "gateway4" not in ethernets["eth0"]
    assert ethernets["eth1"]["gateway4"] == "203.0.113.17"


def test_no_dns_servers_no_nameservers_and_no_nic_no_ethernets():
    config = yaml.safe_load(build_seed(sample_spec(dns_servers=())).network_config)
    assert all("nameservers" not in entry for entry in config["ethernets"].values())
    assert yaml.safe_load(build_seed(sample_spec(nics=())).network_config) == {
        "version": 2,
        "ethernets": {},
    }


@pytest.mark.parametrize("user_data", [None, ""])
def test_no_user_data_is_an_empty_cloud_config(user_data):
    assert build_seed(sample_spec(user_data=user_data)).user_data == b"#cloud-config\n"


def test_user_data_is_passed_as_given():
    script = "#!/bin/sh\r\necho 'héllo wörld' > /etc/motd\n"
    assert build_seed(sample_spec(user_data=script)).user_data == script.encode("utf-8")


@pytest.mark.parametrize("hostname", ["yes", "123", "0x1f", "null", "1e3"])
def test_values_yaml_would_retype_stay_strings(hostname):
    # MACs look like sexagesimal numbers to YAML 1.1; PyYAML quotes them, and these names.
    spec = with_nic(sample_spec(hostname=hostname), 0, mac="12:34:56:12:34:56")
    files = build_seed(spec)
    assert yaml.safe_load(files.meta_data)["local-hostname"] == hostname
    eth0 = yaml.safe_load(files.network_config)["ethernets"]["eth0"]
    assert eth0["match"]["macaddress"] == "12:34:56:12:34:56"


def test_each_key_is_one_line_of_meta_data():
    long_key = "ssh-rsa " + "A" * 2000 + " a very long comment that goes on and on"
    meta = build_seed(sample_spec(ssh_keys=(long_key,))).meta_data.decode()
    assert f"- {long_key}\n" in meta


def test_an_unchanged_seed_keeps_its_files_and_id():
    assert build_seed(sample_spec()) == build_seed(sample_spec())


CHANGES = {
    "hostname": lambda s: dataclasses.replace(s, hostname="web2.example.com"),
    "a key added": lambda s: dataclasses.replace(s, ssh_keys=(*s.ssh_keys, KEY_A + "2")),
    "keys reordered": lambda s: dataclasses.replace(s, ssh_keys=s.ssh_keys[::-1]),
    "user data": lambda s: dataclasses.replace(s, user_data="#cloud-config\n"),
    "user data removed": lambda s: dataclasses.replace(s, user_data=None),
    "dns": lambda s: dataclasses.replace(s, dns_servers=("192.0.2.54",)),
    "ipv4 address": lambda s: with_nic(
        s, 0, ipv4=(AddressSeed("198.51.100.11", 24, "198.51.100.1"),)
    ),
    "ipv4 prefix": lambda s: with_nic(
        s, 0, ipv4=(AddressSeed("198.51.100.10", 25, "198.51.100.1"),)
    ),
    "ipv4 gateway": lambda s: with_nic(
        s, 0, ipv4=(AddressSeed("198.51.100.10", 24, "198.51.100.2"),)
    ),
    "ipv6 address": lambda s: with_nic(
        s, 0, ipv6=(AddressSeed("2001:db8:100::11", 64, "2001:db8:100::1"),)
    ),
    "mac": lambda s: with_nic(s, 1, mac="52:54:00:ab:cd:ee"),
    "nic name": lambda s: with_nic(s, 1, name="eth7"),
    "nic removed": lambda s: dataclasses.replace(s, nics=s.nics[:1]),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_any_change_to_what_the_seed_carries_gives_a_new_instance_id(change):
    before = build_seed(sample_spec())
    after = build_seed(change(sample_spec()))
    assert after.instance_id != before.instance_id
    assert after.instance_id.startswith("vmapi-test-7-")


def test_base_instance_id_is_the_prefix():
    files = build_seed(sample_spec(base_instance_id="other-9"))
    assert files.instance_id.startswith("other-9-")
    assert files.instance_id.split("-")[-1] == build_seed(sample_spec()).instance_id.split("-")[-1]


BAD = {
    "mac": lambda s: with_nic(s, 0, mac="52:54:00:12:34"),
    "duplicate mac": lambda s: with_nic(s, 1, mac="52:54:00:12:34:56"),
    "duplicate mac in other case": lambda s: with_nic(s, 1, mac="52:54:00:12:34:56".upper()),
    "duplicate name": lambda s: with_nic(s, 1, name="eth0"),
    "interface name too long": lambda s: with_nic(s, 0, name="a" * 16),
    "interface name with slash": lambda s: with_nic(s, 0, name="eth/0"),
    "ipv6 as ipv4": lambda s: with_nic(s, 0, ipv4=(AddressSeed("2001:db8::5", 64, "2001:db8::1"),)),
    "ipv4 gateway of ipv6": lambda s: with_nic(
        s, 0, ipv4=(AddressSeed("198.51.100.10", 24, "2001:db8::1"),)
    ),
    "prefix out of range": lambda s: with_nic(
        s, 0, ipv4=(AddressSeed("198.51.100.10", 33, "198.51.100.1"),)
    ),
    "dns server": lambda s: dataclasses.replace(s, dns_servers=("dns.example.com",)),
    "base instance id": lambda s: dataclasses.replace(s, base_instance_id="a b"),
}


@pytest.mark.parametrize("breakage", BAD.values(), ids=BAD.keys())
def test_data_no_guest_could_use_is_refused(breakage):
    with pytest.raises(ValueError):
        build_seed(breakage(sample_spec()))


# -- the ISO, read by another tool than the one that wrote it ----------------------------


@pytest.fixture(scope="module")
def isoinfo() -> str:
    path = shutil.which("isoinfo")
    if path is None:
        unavailable("isoinfo (Debian package genisoimage) is not installed")
    return path


def write_iso(files: SeedFiles, folder: Path) -> Path:
    path = folder / "seed.iso"
    path.write_bytes(seed_iso(files))
    return path


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def test_iso_is_labelled_cidata(isoinfo, tmp_path):
    iso = write_iso(build_seed(sample_spec()), tmp_path)
    assert "Volume id: cidata\n" in run(isoinfo, "-d", "-i", str(iso))
    assert iso.stat().st_size < 1024 * 1024


@pytest.mark.parametrize("names", ["-R", "-J"], ids=["rock-ridge", "joliet"])
def test_iso_holds_the_three_files_under_their_names(isoinfo, tmp_path, names):
    files = build_seed(sample_spec(user_data="#!/bin/sh\necho é\n"))
    iso = write_iso(files, tmp_path)
    listing = run(isoinfo, names, "-f", "-i", str(iso)).split()
    assert sorted(listing) == ["/meta-data", "/network-config", "/user-data"]
    for name, data in files.by_name().items():
        extracted = subprocess.run(
            [isoinfo, names, "-x", f"/{name}", "-i", str(iso)], check=True, capture_output=True
        ).stdout
        assert extracted == data, name
