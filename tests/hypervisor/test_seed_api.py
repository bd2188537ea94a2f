"""The cloud-init seed of a VM booted from an image, on a real libvirtd (issue 14): made with
the VM, rebuilt on each kind of change (host name, keys, user data, addresses) under a
new volume and a new instance-id, kept as it is when nothing it carries changed, undone
with the request that failed, removed with the VM.

The image is a small blank disk (the guest itself is tests/hypervisor/test_guest_network.py):
what is checked is the seed volume in the node's pool, read back as an ISO 9660 volume,
and the domain's definition, both through libvirt. The module's tests share the session's
vmapi (``env``, tests/hypervisor/boot_env.py) and the module's image; each test makes its
own VMs (nothing boots: a VM costs a second) and removes them, so they pass in any order.
"""

from __future__ import annotations

import base64
import io
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pycdlib
import pytest
import yaml

from tests.conftest import MIB
from tests.faults import FaultyDriver
from tests.hypervisor.boot_env import IMAGE_POOL, BootEnv
from tests.hypervisor.qemu_host import INSTALLATION
from vmapi.extensions import db
from vmapi.models import Vm
from vmapi.services.nodes.hosts import DRIVER_KEY
from vmapi.services.vms import cloud_init as seeds

pytestmark = [pytest.mark.hypervisor]

INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE


def _wire(*fields: bytes) -> bytes:
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def ed25519(seed: int, comment: str) -> str:
    blob = _wire(b"ssh-ed25519", bytes((seed + i) % 256 for i in range(32)))
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


KEY_A, KEY_B = ed25519(1, "alice@example"), ed25519(2, "bob@example")


USER_DATA = "#cloud-config\nruncmd: [true]\n"


@pytest.fixture(scope="module")
def image(env, tmp_path_factory) -> dict:
    """A small blank disk image (it goes with the module: ``env``)."""
    return blank_image(env, tmp_path_factory.mktemp("blank"))


@pytest.fixture
def vms(env, image):
    """``vms(**fields)``: a VM of the image (128 MiB); deleted after the test."""
    made = []

    def make(**fields) -> dict:
        made.append(env.create(image["id"], ram=128 * MIB, **fields))
        return made[-1]

    yield make
    for vm in made:
        gone = env.api.delete(f"vm/{vm['id']}")
        assert gone.status_code in (200, 404), gone.json


@pytest.fixture
def vm(vms) -> dict:
    """A VM with a host name, a key and user data: a seed to rebuild."""
    return vms(hostname="web1.example.com", ssh_keys=[KEY_A], user_data=USER_DATA)


def blank_image(env: BootEnv, folder: Path) -> dict:
    path = folder / "blank.img"
    path.write_bytes(bytes(MIB))  # nothing boots from it: the firmware waits, idle
    return env.upload(path, name="blank")


def row_of(env: BootEnv, vm_id: int) -> Vm:
    with env.app.app_context():
        found = db.session.get(Vm, vm_id)
        db.session.expunge_all()
        db.session.remove()
    return found


def iso_files(path: str) -> dict[str, bytes]:
    """The files of the ISO 9660 volume at ``path``, by their Rock Ridge names, and its
    label (``_label``)."""
    with open(path, "rb") as handle:
        data = handle.read()
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    try:
        files = {"_label": iso.pvd.volume_identifier.rstrip(b" ")}
        for name in ("meta-data", "network-config", "user-data"):
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            files[name] = out.getvalue()
    finally:
        iso.close()
    return files


def seed_disk(env: BootEnv, vm: dict, flags: int = INACTIVE) -> ET.Element:
    xml = ET.fromstring(env.conn.lookupByName(vm["domain_name"]).XMLDesc(flags))
    [disk] = [d for d in xml.findall("devices/disk") if d.find("target").get("dev") == "vdz"]
    return disk


def told(env: BootEnv, vm: dict) -> dict:
    """What the VM's seed says now, as found on the node."""
    current = row_of(env, vm["id"])
    disk = seed_disk(env, vm)
    assert disk.find("source").get("file") == current.seed_path
    files = iso_files(current.seed_path)
    return {
        "volume": current.seed_volume,
        "path": current.seed_path,
        "label": files["_label"],
        "meta": yaml.safe_load(files["meta-data"]),
        "network": yaml.safe_load(files["network-config"]),
        "user_data": files["user-data"].decode(),
    }


def seeds_in_pool(env: BootEnv) -> list[str]:
    return [v for v in env.pool_volumes(IMAGE_POOL) if "-seed-" in v]


def test_a_vm_from_an_image_gets_its_seed(env, vm):
    assert vm["hostname"] == "web1.example.com"
    seed = told(env, vm)
    assert seed["label"] == b"cidata"
    assert seed["volume"].startswith(f"{vm['domain_name']}-seed-")
    assert seeds_in_pool(env) == [seed["volume"]]
    # read-only, raw, a virtio disk on the reserved target, after the root disk
    disk = seed_disk(env, vm)
    assert disk.find("readonly") is not None and disk.find("driver").get("type") == "raw"
    assert disk.find("target").attrib == {"dev": "vdz", "bus": "virtio"}
    xml = ET.fromstring(env.conn.lookupByName(vm["domain_name"]).XMLDesc(INACTIVE))
    assert [d.find("target").get("dev") for d in xml.findall("devices/disk")] == ["vda", "vdz"]
    # what it says is what the database holds
    meta = seed["meta"]
    assert meta["local-hostname"] == "web1.example.com" and meta["public-keys"] == [KEY_A]
    assert meta["instance-id"] == seed["volume"].replace("-seed-", "-")  # base + digest
    assert meta["instance-id"].startswith(vm["domain_name"])
    assert seed["user_data"] == USER_DATA
    iface = env.api.get(f"interface/{vm['interfaces'][0]['id']}").json["data"]
    v4 = env.api.get(f"ipv4/{iface['ipv4'][0]['id']}").json["data"]
    v6 = env.api.get(f"ipv6/{iface['ipv6'][0]['id']}").json["data"]
    assert seed["network"] == {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": iface["mac"]},
                "set-name": "eth0",
                "addresses": [f"{v4['address']}/{v4['prefix']}", f"{v6['address']}/{v6['prefix']}"],
                "gateway4": v4["gateway"],
                "gateway6": v6["gateway"],
            }
        },
    }


def rebuilt(env, vm, before, started_with, change_path, body):
    """Send a change to ``vm`` whose seed is ``before``; the seed it made (new volume, new
    instance-id, the old one gone)."""
    answer = env.api.update(change_path, json=body)
    assert answer.status_code == 200, answer.json
    assert "cloud-init seed of vm-" in answer.json["message"]
    assert "powered off" in answer.json["message"]  # it runs: the old seed until then
    after = told(env, vm)
    assert after["volume"] != before["volume"]
    assert after["meta"]["instance-id"] != before["meta"]["instance-id"]
    assert seeds_in_pool(env) == [after["volume"]]  # the replaced one was deleted
    # the running domain keeps the seed it started with until its next start
    live = seed_disk(env, vm, flags=0).find("source").get("file")
    assert live == started_with
    return after


def test_each_kind_of_change_rebuilds_the_seed(env, vm, vms):
    seed = told(env, vm)
    started_with = seed["path"]

    def change(path, body):
        return rebuilt(env, vm, seed, started_with, path, body)

    seed = change(f"vm/{vm['id']}", {"hostname": "web2"})
    assert seed["meta"]["local-hostname"] == "web2"
    seed = change(f"vm/{vm['id']}", {"ssh_keys": [KEY_B, KEY_A]})
    assert seed["meta"]["public-keys"] == [KEY_B, KEY_A]
    seed = change(f"vm/{vm['id']}", {"user_data": "#!/bin/sh\necho hi\n"})
    assert seed["user_data"] == "#!/bin/sh\necho hi\n"
    seed = change(f"vm/{vm['id']}", {"user_data": None})
    assert seed["user_data"] == "#cloud-config\n"  # none: an empty cloud-config

    # addresses: another free IPv4 and a released IPv6 of the pool
    other = vms()  # takes the pool's next IPv6
    spare6 = env.api.get(f"interface/{other['interfaces'][0]['id']}").json["data"]["ipv6"][0]
    assert env.api.delete(f"vm/{other['id']}").status_code == 200  # ... and releases it
    iface = env.api.get(f"interface/{vm['interfaces'][0]['id']}").json["data"]
    free4 = next(a for a in env.api.get("ipv4?limit=1000").json["data"].values()
                 if a["interface"] is None and a["id"] > iface["ipv4"][0]["id"])  # fmt: skip
    after = change(f"interface/{iface['id']}", {"ipv4": [{"id": free4["id"]}], "ipv6": [spare6]})
    v6 = env.api.get(f"ipv6/{spare6['id']}").json["data"]
    assert after["network"]["ethernets"]["eth0"]["addresses"] == [
        f"{free4['address']}/{free4['prefix']}", f"{v6['address']}/{v6['prefix']}"]  # fmt: skip
    for family, old in (("ipv4", iface["ipv4"][0]), ("ipv6", iface["ipv6"][0])):
        assert env.api.get(f"{family}/{old['id']}").json["data"]["interface"] is None


def test_a_change_the_seed_does_not_carry_keeps_it(env, vm):
    seed = told(env, vm)
    answer = env.api.update(f"vm/{vm['id']}", json={"ram": 192 * MIB, "hostname": vm["hostname"]})
    assert answer.status_code == 200, answer.json
    assert "cloud-init seed" not in (answer.json.get("message") or "")
    assert told(env, vm)["volume"] == seed["volume"]


def test_a_failed_change_keeps_the_old_seed_and_leaves_no_new_one(env, vm, vms):
    seed = told(env, vm)
    real = env.app.extensions[DRIVER_KEY]
    faults = FaultyDriver(real)
    env.app.extensions[DRIVER_KEY] = faults
    try:
        faults.fail("define")  # after the new seed's upload
        answer = env.api.update(f"vm/{vm['id']}", json={"hostname": "web3"})
        assert answer.status_code == 502, answer.json
        assert "upload_volume" in faults.calls  # the new seed had been made
        # an array: the first VM's change done (its new seed made), the second fails
        second = vms()
        second_seed = told(env, second)["volume"]
        faults.fail("upload_volume", skip=1)
        body = [{"id": vm["id"], "hostname": "web4"}, {"id": second["id"], "hostname": "x"}]
        answer = env.api.update("vm", json=body)
        assert answer.status_code == 502 and answer.json["data"]["index"] == 1, answer.json
    finally:
        env.app.extensions[DRIVER_KEY] = real
    assert row_of(env, vm["id"]).hostname == vm["hostname"]
    assert told(env, vm)["volume"] == seed["volume"]  # the domain points at it, it exists
    assert told(env, second)["volume"] == second_seed
    assert sorted(seeds_in_pool(env)) == sorted([seed["volume"], second_seed])  # none leaked


def test_a_seed_name_taken_by_a_volume_not_ours_changes_nothing(env, vm):
    seed = told(env, vm)
    with env.app.app_context():  # the name the seed would get with this host name
        row = db.session.get(Vm, vm["id"])
        row.hostname = "taken"
        name = seeds.volume_name(row, seeds.seed_files(row))
        db.session.rollback()
    pool = env.conn.storagePoolLookupByName(IMAGE_POOL)
    volume = ET.Element("volume")
    ET.SubElement(volume, "name").text = name
    ET.SubElement(volume, "capacity").text = "1024"
    ET.SubElement(ET.SubElement(volume, "target"), "format", type="raw")
    made = pool.createXML(ET.tostring(volume, encoding="unicode"), 0)
    try:
        answer = env.api.update(f"vm/{vm['id']}", json={"hostname": "taken"})
        assert answer.status_code == 409 and answer.json["error_id"] == "vm/name_taken", answer.json
        assert answer.json["data"]["name"] == f"{IMAGE_POOL}/{name}"
        assert row_of(env, vm["id"]).hostname == vm["hostname"]
        assert told(env, vm)["volume"] == seed["volume"]
        assert made.info()[1] == 1024  # left as it was
    finally:
        made.delete(0)


def test_deleting_the_vms_removes_their_seeds(env, tmp_path):
    """An image and VMs of its own: whatever else the module keeps on the node stays."""
    found = env.ours()
    image = blank_image(env, tmp_path)
    made = [env.create(image["id"], ram=128 * MIB, hostname=f"web{n}") for n in (1, 2)]
    seeds = [told(env, vm)["volume"] for vm in made]
    assert all(INSTALLATION in seed for seed in seeds)
    assert set(seeds) <= set(seeds_in_pool(env))
    for vm in made:
        assert env.api.delete(f"vm/{vm['id']}").status_code == 200
    assert set(seeds) & set(seeds_in_pool(env)) == set()
    assert env.api.delete(f"image/{image['id']}").status_code == 200
    assert sorted(set(env.ours()) - set(found)) == []  # nothing of these is left on the node
