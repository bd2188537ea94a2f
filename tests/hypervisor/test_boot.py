"""A VM booted from an image uploaded through the API, on a real libvirtd (issue 13).

The test guest (tests/guest/) is uploaded through the API; a VM is made from it with a
1 GiB root disk (larger than the image), boots under TCG (``type='qemu'``), and says on
its serial console, read back through ``GET /vm/<id>/console_log``, that it saw its root
disk at that size. The node's copy of the image is checked with libvirt: one base
volume shared by every VM of the image there, its checksum the image's whatever the
guests write. Deleting the VMs and the image leaves nothing of this installation on the
node. The module's tests share the session's vmapi (``env``, tests/hypervisor/boot_env.py)
and the module's image and guests; each test leaves them as it found them, so they pass
in any order and alone.
"""

from __future__ import annotations

import hashlib
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
import sqlalchemy as sa

from tests.conftest import GIB
from tests.guest import console
from tests.guest.disks import read_sector
from tests.hypervisor.boot_env import (
    GIB_SECTORS,
    IMAGE_POOL,
    LOG_POOL,
    BootEnv,
    wait_for_guest,
)
from tests.hypervisor.qemu_host import INSTALLATION
from vmapi.extensions import db

pytestmark = [pytest.mark.hypervisor]


@pytest.fixture(scope="module")
def image(env, guest_image) -> dict:
    """The test guest, uploaded through the API (it goes with the module: ``env``)."""
    return env.upload(guest_image.path)


def made(env: BootEnv, image: dict, **fields) -> dict:
    """A VM of the image; its root disk, and the pool and the image's copies as they were
    right after the POST."""
    started = time.monotonic()
    vm = env.create(image["id"], **fields)
    seconds = time.monotonic() - started
    [root] = env.api.get(f"storage?vm.id={vm['id']}").json["data"].values()
    return {"vm": vm, "root": root, "seconds": seconds, "volumes": env.pool_volumes(),
            "copies": copies(env)}  # fmt: skip


@pytest.fixture(scope="module")
def first(env, image) -> dict:
    """The image's first VM on the node, with a 1 GiB root disk (larger than the image);
    running."""
    return made(env, image, root_size=GIB)


@pytest.fixture(scope="module")
def second(env, image, first) -> dict:
    """A second VM of the image (after ``first``: the copy is on the node), its root disk
    at the image's size."""
    return made(env, image)


def file_sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def volume(env: BootEnv, name: str) -> libvirt.virStorageVol:
    pool = env.conn.storagePoolLookupByName(IMAGE_POOL)
    pool.refresh(0)
    return pool.storageVolLookupByName(name)


def copies(env: BootEnv) -> list[tuple]:
    with env.app.app_context():
        rows = db.session.execute(sa.text("SELECT image_id, node_id, volume_name FROM image_copy"))
        found = [tuple(row) for row in rows]
        db.session.remove()
    return found


def test_the_guest_image_is_uploaded_through_the_api(image, guest_image):
    assert image["state"] == "active"
    assert image["checksum"] == guest_image.sha256
    assert image["virtual_size"] == guest_image.size < GIB


def test_a_vm_from_the_image_boots_from_a_larger_root_disk(env, image, first):
    vm, root = first["vm"], first["root"]
    print(f"\nPOST /vm with the first copy of the image: {first['seconds']:.2f} s")
    assert vm["image"] == {"id": image["id"]}
    assert (root["boot"], root["image"], root["size"]) == (True, {"id": image["id"]}, GIB)

    base_name = f"{INSTALLATION}-image-{image['id']}"
    overlay_name = f"{INSTALLATION}-storage-{root['id']}"
    # beside them, the VM's cloud-init seed (tests/hypervisor/test_seed_api.py)
    seed = f"{vm['domain_name']}-seed-"
    assert [v for v in first["volumes"] if not v.startswith(seed)] == sorted(
        [base_name, overlay_name]
    )
    assert first["copies"] == [(image["id"], env.node["id"], base_name)]
    # the overlay: qcow2 of root_size, backed by the node's copy (raw, as the image)
    overlay = ET.fromstring(volume(env, overlay_name).XMLDesc(0))
    assert overlay.find("target/format").get("type") == "qcow2"
    assert int(overlay.findtext("capacity")) == GIB
    assert overlay.findtext("backingStore/path") == volume(env, base_name).path()
    assert overlay.find("backingStore/format").get("type") == "raw"
    # the domain boots from it (first virtio disk), and logs its console into the log pool
    dom = env.conn.lookupByName(vm["domain_name"])
    xml = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert xml.get("type") == "qemu"
    disk = xml.find("devices/disk")
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert disk.find("source").get("file") == volume(env, overlay_name).path()
    assert xml.find("os/boot").get("dev") == "hd"
    log = xml.find("devices/serial/log").get("file")
    assert log.endswith(f"/{vm['domain_name']}.log") and f"/{LOG_POOL}" in log

    guest = wait_for_guest(env.console(vm["id"]))
    assert (guest.root, guest.sectors) == ("vda", GIB_SECTORS), guest
    assert guest.errors == []
    answer = env.api.get(f"vm/{vm['id']}/console_log")
    assert f"VMAPI-GUEST root=vda sectors={GIB_SECTORS}" in answer.json["data"]["text"]


def test_the_console_log_through_the_api(env, first):
    vm = first["vm"]
    read = env.console(vm["id"])
    wait_for_guest(read, ticks=2)
    # room for every boot so far (the module's reboot test may have run first: two boots
    # of kernel and init output can pass the default 64 KiB)
    plain = env.api.get(f"vm/{vm['id']}/console_log?bytes=1048576",
                        headers={"Accept": "text/plain"})  # fmt: skip
    assert plain.mimetype == "text/plain"
    assert "VMAPI-TICK" in plain.get_data(as_text=True)
    assert plain.headers["X-Console-Log-Truncated"] == "false"  # all of it fits
    tail = env.api.get(f"vm/{vm['id']}/console_log?bytes=64").json["data"]
    assert tail["truncated"] is True
    assert 0 < len(tail["text"].encode()) <= 64 + 2  # (a cut character becomes U+FFFD)
    # the end of the same log, as it was then (the guest keeps writing: a later read has
    # more after it)
    assert tail["text"][-20:] in read()


def test_a_reboot_through_the_api_boots_the_guest_anew(env, first):
    """POST /vm/<id>/reboot is seen from inside: the guest boots again (a new VMAPI-GUEST
    line with a boot id it never had), not only a 200 and 'running', which it was before."""
    vm = first["vm"]
    read = env.console(vm["id"])
    booted = wait_for_guest(read)  # up, ticking: every boot so far is on the console
    assert booted.boot_id and booted.errors == [], booted
    before = console.boots(read())
    answer = env.api.post(f"vm/{vm['id']}/reboot")
    assert answer.status_code == 200, answer.json
    assert answer.json["data"]["vm_state"] == {"id": 2}
    text = console.wait_for(
        read, lambda t: len(console.boots(t)) > len(before) and console.boots(t)[-1].ticks,
        "a new boot after POST /reboot", timeout=120,
    )  # fmt: skip
    after = console.boots(text)
    assert len(after) == len(before) + 1, [b.boot_id for b in after]
    new = after[-1]
    assert new.boot_id and new.boot_id not in {b.boot_id for b in before}
    assert uuid.UUID(new.boot_id) != uuid.UUID(booted.boot_id)
    # the same disk: the new boot read back the marker the first one wrote
    assert new.previous_marker == booted.marker and new.marker != booted.marker
    assert new.errors == []


def test_a_second_vm_of_the_image_shares_the_copy(env, image, second):
    root = second["root"]  # root_size: the image's virtual size
    print(f"\nPOST /vm with the copy on the node: {second['seconds']:.2f} s")
    base_name = f"{INSTALLATION}-image-{image['id']}"
    assert second["copies"] == [(image["id"], env.node["id"], base_name)]  # one copy
    volumes = second["volumes"]
    assert [v for v in volumes if "-image-" in v] == [base_name]  # one base volume
    overlay = ET.fromstring(volume(env, f"{INSTALLATION}-storage-{root['id']}").XMLDesc(0))
    assert overlay.findtext("backingStore/path") == volume(env, base_name).path()


def test_the_root_disk_grows(env, first, second):
    [root] = env.api.get(f"storage?vm.id={second['vm']['id']}").json["data"].values()
    size = env.api.get(f"storage/{root['id']}").json["data"]["size"]  # grown before, maybe
    grown = env.api.update(f"storage/{root['id']}", json={"size": size + GIB})
    assert grown.status_code == 200, grown.json
    assert int(ET.fromstring(volume(env, f"{INSTALLATION}-storage-{root['id']}")
                             .XMLDesc(0)).findtext("capacity")) == size + GIB  # fmt: skip
    moved = env.api.update(f"storage/{root['id']}", json={"vm": {"id": first["vm"]["id"]}})
    assert moved.status_code == 409 and moved.json["error_id"] == "storage/root_disk"
    assert env.api.delete(f"storage/{root['id']}").json["error_id"] == "storage/root_disk"


def test_the_overlay_holds_the_guest_s_writes_and_the_copy_is_unchanged(env, image, first):
    vm = first["vm"]
    guest = wait_for_guest(env.console(vm["id"]))
    off = env.api.update(f"vm/{vm['id']}?force=true", json={"vm_state": {"id": 4}})
    assert off.status_code == 200, off.json  # shut off: its disk may be read now
    overlay = volume(env, f"{INSTALLATION}-storage-{first['root']['id']}").path()
    assert guest.marker and guest.marker_sector * 512 >= image["size"]  # past the image
    assert read_sector(Path(overlay), guest.marker_sector).startswith(guest.marker.encode())
    base = volume(env, f"{INSTALLATION}-image-{image['id']}").path()
    assert file_sha256(base) == image["checksum"]
    on = env.api.update(f"vm/{vm['id']}", json={"vm_state": {"id": 2}})
    assert on.status_code == 200, on.json  # running again, as the other tests find it


def test_the_image_goes_only_after_its_vms_and_leaves_nothing(env, guest_image):
    """An image and two VMs of its own: whatever else the module keeps on the node stays."""
    found = env.ours()
    image = env.upload(guest_image.path)
    first, second = env.create(image["id"]), env.create(image["id"])
    refused = env.api.delete(f"image/{image['id']}")
    assert refused.status_code == 409, refused.json
    assert refused.json["error_id"] == "image/in_use"
    assert refused.json["data"] == {"vm": sorted([first["id"], second["id"]])}
    names = [vm["domain_name"] for vm in (first, second)]
    storage = {f"{INSTALLATION}-storage-{s}" for vm in (first, second)
               for s in env.api.get(f"storage?vm.id={vm['id']}").json["data"]}  # fmt: skip
    for vm in (first, second):
        gone = env.api.delete(f"vm/{vm['id']}")  # the root disk goes without ?cascade
        assert gone.status_code == 200, gone.json
    assert storage and not storage & set(env.pool_volumes())  # their root disks went
    logs = [v for v in env.pool_volumes(LOG_POOL) if any(n in v for n in names)]
    assert logs == []  # the logs went with their VMs
    deleted = env.api.delete(f"image/{image['id']}")
    assert deleted.status_code == 200, deleted.json
    assert "message" not in deleted.json
    assert [c for c in copies(env) if c[0] == image["id"]] == []
    assert sorted(set(env.ours()) - set(found)) == []  # no volume nor domain of these
