"""A VM booted from an image uploaded through the API, on a real libvirtd (issue 13).

The test guest (tests/guest/) is uploaded through the API; a VM is made from it with a
1 GiB root disk (larger than the image), boots under TCG (``type='qemu'``), and says on
its serial console, read back through ``GET /vm/<id>/console_log``, that it saw its root
disk at that size. The node's copy of the image is checked with libvirt: one base
volume shared by every VM of the image there, its checksum the image's whatever the
guests write. Deleting the VMs and the image leaves nothing of this installation on the
node. The module's tests share one vmapi and its guests (tests/hypervisor/boot_env.py)
and run in order.
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

from tests.conftest import GIB, unavailable
from tests.guest import console
from tests.guest.disks import read_sector
from tests.hypervisor.boot_env import (
    GIB_SECTORS,
    IMAGE_POOL,
    LOG_POOL,
    BootEnv,
    boot_env,
    wait_for_guest,
)
from tests.hypervisor.qemu_host import INSTALLATION, URI
from vmapi.extensions import db

pytestmark = [pytest.mark.hypervisor]


@pytest.fixture(scope="module")
def env(pg_server, guest_image, tmp_path_factory):
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


def test_the_guest_image_is_uploaded_through_the_api(env, guest_image, shared):
    image = env.upload(guest_image.path)
    assert image["state"] == "active"
    assert image["checksum"] == guest_image.sha256
    assert image["virtual_size"] == guest_image.size < GIB
    shared["image"] = image


def test_a_vm_from_the_image_boots_from_a_larger_root_disk(env, shared):
    image = shared["image"]
    started = time.monotonic()
    vm = env.create(image["id"], root_size=GIB)
    print(f"\nPOST /vm with the first copy of the image: {time.monotonic() - started:.2f} s")
    shared["vm"] = vm
    assert vm["image"] == {"id": image["id"]}
    [root] = env.api.get(f"storage?vm.id={vm['id']}").json["data"].values()
    assert (root["boot"], root["image"], root["size"]) == (True, {"id": image["id"]}, GIB)
    shared["root"] = root

    base_name = f"{INSTALLATION}-image-{image['id']}"
    overlay_name = f"{INSTALLATION}-storage-{root['id']}"
    # beside them, the VM's cloud-init seed (tests/hypervisor/test_seed_api.py)
    seed = f"{vm['domain_name']}-seed-"
    assert [v for v in env.pool_volumes() if not v.startswith(seed)] == sorted(
        [base_name, overlay_name]
    )
    assert copies(env) == [(image["id"], env.node["id"], base_name)]
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
    first = xml.find("devices/disk")
    assert first.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert first.find("source").get("file") == volume(env, overlay_name).path()
    assert xml.find("os/boot").get("dev") == "hd"
    log = xml.find("devices/serial/log").get("file")
    assert log.endswith(f"/{vm['domain_name']}.log") and f"/{LOG_POOL}" in log

    guest = wait_for_guest(env.console(vm["id"]))
    assert (guest.root, guest.sectors) == ("vda", GIB_SECTORS), guest
    assert guest.errors == []
    answer = env.api.get(f"vm/{vm['id']}/console_log")
    assert f"VMAPI-GUEST root=vda sectors={GIB_SECTORS}" in answer.json["data"]["text"]


def test_the_console_log_through_the_api(env, shared):
    vm = shared["vm"]
    read = env.console(vm["id"])
    wait_for_guest(read, ticks=2)
    plain = env.api.get(f"vm/{vm['id']}/console_log", headers={"Accept": "text/plain"})
    assert plain.mimetype == "text/plain"
    assert "VMAPI-TICK" in plain.get_data(as_text=True)
    assert plain.headers["X-Console-Log-Truncated"] == "false"  # all of it fits
    tail = env.api.get(f"vm/{vm['id']}/console_log?bytes=64").json["data"]
    assert tail["truncated"] is True
    assert 0 < len(tail["text"].encode()) <= 64 + 2  # (a cut character becomes U+FFFD)
    assert read().endswith(tail["text"][-20:])  # the end of the same log


def test_a_reboot_through_the_api_boots_the_guest_anew(env, shared):
    """POST /vm/<id>/reboot is seen from inside: the guest boots again (a new VMAPI-GUEST
    line with a boot id it never had), not only a 200 and 'running', which it was before."""
    vm = shared["vm"]
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


def test_a_second_vm_of_the_image_shares_the_copy(env, shared):
    image = shared["image"]
    started = time.monotonic()
    second = env.create(image["id"])  # root_size: the image's virtual size
    print(f"\nPOST /vm with the copy on the node: {time.monotonic() - started:.2f} s")
    shared["second"] = second
    [root] = env.api.get(f"storage?vm.id={second['id']}").json["data"].values()
    base_name = f"{INSTALLATION}-image-{image['id']}"
    assert copies(env) == [(image["id"], env.node["id"], base_name)]  # one copy
    volumes = env.pool_volumes()
    assert [v for v in volumes if "-image-" in v] == [base_name]  # one base volume
    overlay = ET.fromstring(volume(env, f"{INSTALLATION}-storage-{root['id']}").XMLDesc(0))
    assert overlay.findtext("backingStore/path") == volume(env, base_name).path()


def test_the_root_disk_grows(env, shared):
    second, image = shared["second"], shared["image"]
    [root] = env.api.get(f"storage?vm.id={second['id']}").json["data"].values()
    grown = env.api.update(f"storage/{root['id']}", json={"size": 2 * GIB})
    assert grown.status_code == 200, grown.json
    assert int(ET.fromstring(volume(env, f"{INSTALLATION}-storage-{root['id']}")
                             .XMLDesc(0)).findtext("capacity")) == 2 * GIB  # fmt: skip
    moved = env.api.update(f"storage/{root['id']}", json={"vm": {"id": shared["vm"]["id"]}})
    assert moved.status_code == 409 and moved.json["error_id"] == "storage/root_disk"
    assert env.api.delete(f"storage/{root['id']}").json["error_id"] == "storage/root_disk"
    del image


def test_the_overlay_holds_the_guest_s_writes_and_the_copy_is_unchanged(env, shared):
    vm, image = shared["vm"], shared["image"]
    guest = wait_for_guest(env.console(vm["id"]))
    off = env.api.update(f"vm/{vm['id']}?force=true", json={"vm_state": {"id": 4}})
    assert off.status_code == 200, off.json  # shut off: its disk may be read now
    overlay = volume(env, f"{INSTALLATION}-storage-{shared['root']['id']}").path()
    assert guest.marker and guest.marker_sector * 512 >= image["size"]  # past the image
    assert read_sector(Path(overlay), guest.marker_sector).startswith(guest.marker.encode())
    base = volume(env, f"{INSTALLATION}-image-{image['id']}").path()
    assert file_sha256(base) == image["checksum"]


def test_the_image_goes_only_after_its_vms_and_leaves_nothing(env, shared):
    image, first, second = shared["image"], shared["vm"], shared["second"]
    refused = env.api.delete(f"image/{image['id']}")
    assert refused.status_code == 409, refused.json
    assert refused.json["error_id"] == "image/in_use"
    assert refused.json["data"] == {"vm": sorted([first["id"], second["id"]])}
    for vm in (first, second):
        gone = env.api.delete(f"vm/{vm['id']}")  # the root disk goes without ?cascade
        assert gone.status_code == 200, gone.json
    assert [v for v in env.pool_volumes() if "-storage-" in v] == []
    assert env.pool_volumes(LOG_POOL) == []  # the logs went with their VMs
    deleted = env.api.delete(f"image/{image['id']}")
    assert deleted.status_code == 200, deleted.json
    assert "message" not in deleted.json
    assert copies(env) == []
    assert env.ours() == []  # no volume (nor domain) of this installation on the node
