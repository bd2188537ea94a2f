"""POST /vm/<id>/rebuild and POST /storage with an image, on a real libvirtd (issue 24).

The test guest (tests/guest/) boots from an image with a 1 GiB root disk and a data
volume. At every boot it writes a marker past the image's end on its root disk and prints
the previous boot's marker, and prints the instance-id of the seed it read: after a
rebuild it boots again with no previous marker (a new disk), the same MAC and addresses,
a new instance-id, its data volume still attached; a rebuild whose start fails boots
again on the disk it had (the previous marker is there). A data volume made from an
image holds the image's content, read back through libvirt, and keeps it when the image
goes.

One guest serves the module (a boot costs about 10 s under TCG); each test waits for it
to run and compares with its last boot, so the tests pass in any order and alone.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
import sqlalchemy as sa

from tests.conftest import GIB, MIB
from tests.faults import FaultyDriver
from tests.guest import console
from tests.hypervisor.boot_env import GIB_SECTORS, IMAGE_POOL, BootEnv, wait_for_guest
from tests.hypervisor.qemu_host import INSTALLATION, URI
from tests.hypervisor.test_seed_api import iso_files
from vmapi.extensions import db
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = [pytest.mark.hypervisor]

INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE


@pytest.fixture(scope="module")
def image(env, guest_image) -> dict:
    """The test guest, uploaded through the API (it goes with the module: ``env``)."""
    return env.upload(guest_image.path)


@pytest.fixture(scope="module")
def booted(env, image) -> dict:
    """The module's guest: 1 GiB root disk, a data volume attached, running."""
    vm = env.create(image["id"], root_size=GIB, hostname="rebuilt")
    data = env.api.post("storage", json={"size": MIB, "vm": {"id": vm["id"]},
                                         "storage_type": {"id": 1}})  # fmt: skip
    assert data.status_code == 201, data.json
    wait_for_guest(env.console(vm["id"]))
    return {"vm": vm, "data": data.json["data"]}


@pytest.fixture
def faults(env):
    real = env.app.extensions[DRIVER_KEY]
    wrapped = env.app.extensions[DRIVER_KEY] = FaultyDriver(real)
    yield wrapped
    env.app.extensions[DRIVER_KEY] = real


def rows(env: BootEnv, vm_id: int) -> dict:
    """Where the VM's root disk and seed are, as its rows say."""
    with env.app.app_context():
        root = db.session.execute(sa.text(
            "SELECT id, volume_name, path, size, image_id FROM storage WHERE vm_id = :vm AND boot"
        ), {"vm": vm_id}).one()  # fmt: skip
        seed = db.session.execute(sa.text(
            "SELECT seed_volume, seed_path, image_id FROM vm WHERE id = :vm"), {"vm": vm_id}
        ).one()  # fmt: skip
        left = db.session.scalar(sa.text("SELECT count(*) FROM leftover"))
        db.session.remove()
    return {"root": tuple(root), "seed": tuple(seed), "leftovers": left}


def disks(env: BootEnv, vm: dict, flags: int = INACTIVE) -> dict[str, str]:
    xml = ET.fromstring(env.conn.lookupByName(vm["domain_name"]).XMLDesc(flags))
    return {d.find("target").get("dev"): d.find("source").get("file")
            for d in xml.findall("devices/disk")}  # fmt: skip


def macs(env: BootEnv, vm: dict) -> list[str]:
    xml = ET.fromstring(env.conn.lookupByName(vm["domain_name"]).XMLDesc(INACTIVE))
    return [i.find("mac").get("address") for i in xml.findall("devices/interface")]


def next_boot(read, before: list[console.Boot], what: str) -> console.Boot:
    """The guest's next boot after ``before``, once it ticks."""
    text = console.wait_for(
        read, lambda t: len(console.boots(t)) > len(before) and console.boots(t)[-1].ticks,
        what, timeout=180,
    )  # fmt: skip
    return console.boots(text)[-1]


def test_a_rebuild_boots_the_guest_on_a_new_disk_and_keeps_the_vm(env, image, booted):
    vm, data = booted["vm"], booted["data"]
    read = env.console(vm["id"])
    last = wait_for_guest(read)
    assert last.marker and last.instance_id, last
    before, boots = rows(env, vm["id"]), console.boots(read())
    uuid = env.conn.lookupByName(vm["domain_name"]).UUIDString()
    mac, attached = macs(env, vm), disks(env, vm)
    answer = env.api.post(f"vm/{vm['id']}/rebuild", json={"image": {"id": image["id"]}})
    assert answer.status_code == 200, answer.json
    assert answer.json["data"]["vm_state"] == {"id": 2}
    assert "a new cloud-init seed (a new instance-id)" in answer.json["message"]
    new = next_boot(read, boots, "the guest's boot after the rebuild")
    # a new disk: the marker of the boot before is not on it; the same size (default)
    assert new.previous_marker is None and new.marker, new
    assert new.sectors == GIB_SECTORS and new.errors == []
    # the same VM: UUID, MAC, addresses; a new instance-id, from the new seed
    assert env.conn.lookupByName(vm["domain_name"]).UUIDString() == uuid
    assert macs(env, vm) == mac
    assert new.nics == last.nics and new.nics and new.hostname == "rebuilt"
    assert new.instance_id != last.instance_id
    assert new.instance_id.startswith(f"{vm['domain_name']}-r")
    after = rows(env, vm["id"])
    meta = iso_files(after["seed"][1])["meta-data"].decode()
    assert f"instance-id: {new.instance_id}" in meta
    # the root disk object kept, on a new volume; the old volumes gone; data kept
    assert after["root"][0] == before["root"][0] and after["root"][1] != before["root"][1]
    assert after["root"][3] == GIB and after["leftovers"] == 0
    now = disks(env, vm)
    assert now["vda"] == after["root"][2] and now["vdz"] == after["seed"][1]
    assert {k: v for k, v in now.items() if k not in ("vda", "vdz")} == {
        k: v for k, v in attached.items() if k not in ("vda", "vdz")}  # fmt: skip
    assert now["vdb"].endswith(f"/{INSTALLATION}-storage-{data['id']}")
    assert disks(env, vm, flags=0) == now  # it runs on them
    pool = env.pool_volumes()
    assert after["root"][1] in pool and after["seed"][0] in pool
    assert before["root"][1] not in pool and before["seed"][0] not in pool


def test_a_rebuild_whose_start_fails_boots_the_old_disk_again(env, image, booted, faults):
    vm = booted["vm"]
    read = env.console(vm["id"])
    last = wait_for_guest(read)
    before, boots, volumes = rows(env, vm["id"]), console.boots(read()), env.pool_volumes()
    attached = disks(env, vm)
    faults.fail("start")  # the domain, defined with the new disk and seed
    answer = env.api.post(f"vm/{vm['id']}/rebuild", json={"image": {"id": image["id"]}})
    assert answer.status_code == 502, answer.json
    assert answer.json["data"]["step"] == "starting the domain"
    assert "create_overlay" in faults.calls and "define" in faults.calls
    again = next_boot(read, boots, "the guest's boot on its old disk after the failed rebuild")
    assert again.previous_marker == last.marker  # the disk it had
    assert again.instance_id == last.instance_id and again.nics == last.nics
    assert rows(env, vm["id"]) == before
    assert disks(env, vm) == attached == disks(env, vm, flags=0)
    assert env.pool_volumes() == volumes  # no new root disk nor seed


def test_a_failed_rebuild_removes_the_copy_it_made(env, booted, faults, tmp_path):
    vm = booted["vm"]
    read = env.console(vm["id"])
    wait_for_guest(read)
    boots = console.boots(read())
    path = tmp_path / "other.raw"
    path.write_bytes(os.urandom(4 * MIB))
    other = env.upload(path, name="other")
    before, volumes = rows(env, vm["id"]), env.pool_volumes()
    faults.fail("create_overlay")  # after the copy of the other image was made
    answer = env.api.post(f"vm/{vm['id']}/rebuild", json={"image": {"id": other["id"]}})
    assert answer.status_code == 502, answer.json
    assert answer.json["data"]["step"] == "creating the root disk"
    assert "upload_volume" in faults.calls  # the copy had been made
    assert env.pool_volumes() == volumes  # and it went again
    assert f"{INSTALLATION}-image-{other['id']}" not in env.pool_volumes()
    assert rows(env, vm["id"]) == before
    assert len(console.boots(read())) == len(boots)  # the guest was not touched
    assert env.api.delete(f"image/{other['id']}").status_code == 200  # nothing uses it


def raw_sha256(env: BootEnv, name: str, tmp_path: Path, length: int) -> tuple[str, int, bool]:
    """A volume's content as a guest sees it: downloaded through libvirt, made raw by
    qemu-img; (sha256 of its first ``length`` bytes, its size, all zero past them)."""
    driver = env.app.extensions[DRIVER_KEY]
    downloaded, raw = tmp_path / f"{name}.qcow2", tmp_path / f"{name}.raw"
    with open(downloaded, "wb") as out:
        for chunk in driver.download_volume(URI, IMAGE_POOL, name, 300):
            out.write(chunk)
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(downloaded), str(raw)],
                   check=True, capture_output=True)  # fmt: skip
    digest, zeros, left = hashlib.sha256(), True, length
    with open(raw, "rb") as handle:
        while chunk := handle.read(4 * MIB):
            digest.update(chunk[:left])
            zeros = zeros and not chunk[left:].strip(b"\0")
            left = max(0, left - len(chunk))
    return digest.hexdigest(), raw.stat().st_size, zeros


def test_a_volume_made_from_the_image_holds_its_content(env, image, booted, tmp_path):
    vm = booted["vm"]
    virtual = image["virtual_size"]
    whole = -(-virtual // MIB) * MIB
    for size in (None, whole + 64 * MIB):  # the default (the image's size), and larger
        body = {"vm": {"id": vm["id"]}, "storage_type": {"id": 1}, "image": {"id": image["id"]},
                **({"size": size} if size else {})}  # fmt: skip
        made = env.api.post("storage", json=body)
        assert made.status_code == 201, made.json
        storage = made.json["data"]
        assert storage["size"] == (size or whole) and storage["image"] is None
        name = f"{INSTALLATION}-storage-{storage['id']}"
        volume = env.conn.storagePoolLookupByName(IMAGE_POOL).storageVolLookupByName(name)
        xml = ET.fromstring(volume.XMLDesc(0))
        assert xml.find("target/format").get("type") == "qcow2"
        assert xml.find("backingStore") is None  # it stands alone
        assert int(xml.findtext("capacity")) == storage["size"]
        checksum, length, zeros = raw_sha256(env, name, tmp_path, virtual)
        assert (checksum, length, zeros) == (image["checksum"], storage["size"], True)
        assert volume.path() in disks(env, vm).values()  # attached to the running VM


@pytest.mark.parametrize(
    ("method", "extra", "step"),
    [("resize_volume", 64 * MIB, "growing the volume"), ("define", 0, "attaching the disk")],
)
def test_a_volume_from_the_image_that_fails_leaves_nothing(env, image, booted, faults, method,
                                                           extra, step):  # fmt: skip
    vm = booted["vm"]
    whole = -(-image["virtual_size"] // MIB) * MIB
    volumes, storage = env.pool_volumes(), env.api.get("storage").json["data"]
    attached = disks(env, vm)
    faults.fail(method)
    body = {"vm": {"id": vm["id"]}, "storage_type": {"id": 1}, "image": {"id": image["id"]},
            "size": whole + extra}  # fmt: skip
    answer = env.api.post("storage", json=body)
    assert answer.status_code == 502, answer.json
    assert answer.json["data"]["step"] == step
    assert "clone_volume" in faults.calls
    assert env.pool_volumes() == volumes and env.api.get("storage").json["data"] == storage
    assert disks(env, vm) == attached


def test_a_volume_made_from_an_image_stands_alone(env, booted, tmp_path):
    """Made from an image of its own (4 MiB of random bytes, a copy made on the node for
    it): the image is deleted, the volume stays with the same content."""
    vm = booted["vm"]
    path = tmp_path / "data.raw"
    path.write_bytes(os.urandom(4 * MIB))
    image = env.upload(path, name="data")
    made = env.api.post("storage", json={"vm": {"id": vm["id"]}, "storage_type": {"id": 1},
                                         "image": {"id": image["id"]}})  # fmt: skip
    assert made.status_code == 201, made.json
    storage = made.json["data"]
    assert (storage["size"], storage["image"]) == (4 * MIB, None)
    assert f"holds the content of image {image['id']}" in made.json["message"]
    name = f"{INSTALLATION}-storage-{storage['id']}"
    assert raw_sha256(env, name, tmp_path, 4 * MIB) == (image["checksum"], 4 * MIB, True)
    gone = env.api.delete(f"image/{image['id']}")  # no VM boots from it: it goes
    assert gone.status_code == 200, gone.json
    assert f"{INSTALLATION}-image-{image['id']}" not in env.pool_volumes()  # its copy too
    assert env.api.get(f"storage/{storage['id']}").json["data"]["size"] == 4 * MIB
    assert raw_sha256(env, name, tmp_path, 4 * MIB) == (image["checksum"], 4 * MIB, True)
