"""The cloud-init seed of a VM booted from an image, on a real libvirtd (issue 14): made with
the VM, rebuilt on each kind of change (host name, keys, user data, addresses) under a
new volume and a new instance-id, kept as it is when nothing it carries changed, undone
with the request that failed, removed with the VM.

The image is a small blank disk (the guest itself is tests/hypervisor/test_guest_network.py):
what is checked is the seed volume in the node's pool, read back as an ISO 9660 volume,
and the domain's definition, both through libvirt. The module's tests share one vmapi
(tests/hypervisor/boot_env.py) and run in order.
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

from tests.conftest import MIB, unavailable
from tests.faults import FaultyDriver
from tests.hypervisor.boot_env import IMAGE_POOL, BootEnv, boot_env
from tests.hypervisor.qemu_host import INSTALLATION, URI
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


@pytest.fixture(scope="module")
def env(pg_server, tmp_path_factory):
    try:
        libvirt.open(URI).close()
    except libvirt.libvirtError as exc:
        unavailable(f"libvirtd does not answer on {URI}: {exc}")
    with boot_env(pg_server, tmp_path_factory.mktemp("images")) as made:
        yield made


@pytest.fixture(scope="module")
def shared() -> dict:
    """What one test hands the next (the module's tests run in order)."""
    return {}


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


def test_a_vm_from_an_image_gets_its_seed(env, shared, tmp_path_factory):
    image = blank_image(env, tmp_path_factory.mktemp("blank"))
    shared["image"] = image
    vm = env.create(image["id"], ram=128 * MIB, hostname="web1.example.com",
                    ssh_keys=[KEY_A], user_data="#cloud-config\nruncmd: [true]\n")  # fmt: skip
    shared["vm"] = vm
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
    assert seed["user_data"] == "#cloud-config\nruncmd: [true]\n"
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
    shared["seed"] = seed


def rebuilt(env, shared, change_path, body):
    """Send a change; the seed it made (new volume, new instance-id, the old one gone)."""
    vm, before = shared["vm"], shared["seed"]
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
    assert live == shared["started_with"]
    shared["seed"] = after
    return after


def test_each_kind_of_change_rebuilds_the_seed(env, shared):
    vm = shared["vm"]
    shared["started_with"] = shared["seed"]["path"]
    after = rebuilt(env, shared, f"vm/{vm['id']}", {"hostname": "web2"})
    assert after["meta"]["local-hostname"] == "web2"
    after = rebuilt(env, shared, f"vm/{vm['id']}", {"ssh_keys": [KEY_B, KEY_A]})
    assert after["meta"]["public-keys"] == [KEY_B, KEY_A]
    after = rebuilt(env, shared, f"vm/{vm['id']}", {"user_data": "#!/bin/sh\necho hi\n"})
    assert after["user_data"] == "#!/bin/sh\necho hi\n"
    after = rebuilt(env, shared, f"vm/{vm['id']}", {"user_data": None})
    assert after["user_data"] == "#cloud-config\n"  # none: an empty cloud-config

    # addresses: another free IPv4 and a released IPv6 of the pool
    other = env.create(shared["image"]["id"], ram=128 * MIB)  # takes the pool's next IPv6
    spare6 = env.api.get(f"interface/{other['interfaces'][0]['id']}").json["data"]["ipv6"][0]
    assert env.api.delete(f"vm/{other['id']}").status_code == 200  # ... and releases it
    iface = env.api.get(f"interface/{vm['interfaces'][0]['id']}").json["data"]
    free4 = next(a for a in env.api.get("ipv4?limit=1000").json["data"].values()
                 if a["interface"] is None and a["id"] > iface["ipv4"][0]["id"])  # fmt: skip
    after = rebuilt(env, shared, f"interface/{iface['id']}",
                    {"ipv4": [{"id": free4["id"]}], "ipv6": [spare6]})  # fmt: skip
    v6 = env.api.get(f"ipv6/{spare6['id']}").json["data"]
    assert after["network"]["ethernets"]["eth0"]["addresses"] == [
        f"{free4['address']}/{free4['prefix']}", f"{v6['address']}/{v6['prefix']}"]  # fmt: skip
    for family, old in (("ipv4", iface["ipv4"][0]), ("ipv6", iface["ipv6"][0])):
        assert env.api.get(f"{family}/{old['id']}").json["data"]["interface"] is None


def test_a_change_the_seed_does_not_carry_keeps_it(env, shared):
    vm, seed = shared["vm"], shared["seed"]
    answer = env.api.update(f"vm/{vm['id']}", json={"ram": 192 * MIB, "hostname": "web2"})
    assert answer.status_code == 200, answer.json
    assert "cloud-init seed" not in (answer.json.get("message") or "")
    assert told(env, vm)["volume"] == seed["volume"]


def test_a_failed_change_keeps_the_old_seed_and_leaves_no_new_one(env, shared):
    vm, seed = shared["vm"], shared["seed"]
    real = env.app.extensions[DRIVER_KEY]
    faults = FaultyDriver(real)
    env.app.extensions[DRIVER_KEY] = faults
    try:
        faults.fail("define")  # after the new seed's upload
        answer = env.api.update(f"vm/{vm['id']}", json={"hostname": "web3"})
        assert answer.status_code == 502, answer.json
        assert "upload_volume" in faults.calls  # the new seed had been made
        # an array: the first VM's change done (its new seed made), the second fails
        second = env.create(shared["image"]["id"], ram=128 * MIB)
        shared["second"] = second
        second_seed = told(env, second)["volume"]
        faults.fail("upload_volume", skip=1)
        body = [{"id": vm["id"], "hostname": "web4"}, {"id": second["id"], "hostname": "x"}]
        answer = env.api.update("vm", json=body)
        assert answer.status_code == 502 and answer.json["data"]["index"] == 1, answer.json
    finally:
        env.app.extensions[DRIVER_KEY] = real
    assert row_of(env, vm["id"]).hostname == "web2"
    assert told(env, vm)["volume"] == seed["volume"]  # the domain points at it, it exists
    assert told(env, second)["volume"] == second_seed
    assert sorted(seeds_in_pool(env)) == sorted([seed["volume"], second_seed])  # none leaked


def test_a_seed_name_taken_by_a_volume_not_ours_changes_nothing(env, shared):
    vm, seed = shared["vm"], shared["seed"]
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
        assert row_of(env, vm["id"]).hostname == "web2"
        assert told(env, vm)["volume"] == seed["volume"]
        assert made.info()[1] == 1024  # left as it was
    finally:
        made.delete(0)


def test_deleting_the_vms_removes_their_seeds(env, shared):
    for vm in (shared["vm"], shared["second"]):
        assert env.api.delete(f"vm/{vm['id']}").status_code == 200
    assert seeds_in_pool(env) == []
    assert env.api.delete(f"image/{shared['image']['id']}").status_code == 200
    assert env.ours() == []  # nothing of this installation is left on the node
    assert INSTALLATION in shared["seed"]["volume"]
