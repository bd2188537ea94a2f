"""Saving a VM's disks as images on a real libvirtd (issue 24): the proof on a booted guest.

The test guest (tests/guest/) writes a marker past the image's end on its root disk at
every boot and prints the marker the previous boot left, then ticks once a second on its
serial console. One guest of the module is saved while it runs: its ticks keep coming
(the console log file is watched while the request runs), its disk chain is exactly as
before, the image downloads as a standalone qcow2 that ``qemu-img compare`` finds equal
to the disk, and a new VM booted from it reads the marker. A shut-off save, a refused
quiesce and a volume's save follow. Every test leaves no temporary copy, block job or
ledger entry behind.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
import sqlalchemy as sa

from tests.conftest import MIB
from tests.errors import assert_error
from tests.faults import FaultyDriver
from tests.guest import console
from tests.hypervisor.boot_env import IMAGE_POOL, LOG_DIR, BootEnv, wait_for_guest
from tests.hypervisor.qemu_host import INSTALLATION
from vmapi.extensions import db
from vmapi.services.nodes.hosts import DRIVER_KEY

pytestmark = [pytest.mark.hypervisor]

ROOT_SIZE = 128 * MIB  # past the marker's sector (64 MiB in)


@pytest.fixture(scope="module")
def image(env, guest_image) -> dict:
    return env.upload(guest_image.path)


@pytest.fixture(scope="module")
def guest(env, image) -> dict:
    """A running VM of the test guest, booted once; its root disk and its first boot."""
    vm = env.create(image["id"], root_size=ROOT_SIZE)
    [root] = env.api.get(f"storage?vm.id={vm['id']}").json["data"].values()
    boot = wait_for_guest(env.console(vm["id"]), ticks=2)
    assert boot.marker and boot.errors == [], boot
    return {"vm": vm, "root": root, "boot": boot}


def domain(env: BootEnv, vm: dict) -> libvirt.virDomain:
    return env.conn.lookupByName(vm["domain_name"])


def disks(env: BootEnv, vm: dict) -> list[str]:
    """The live definition's disks, whole (sources, backing chains, formats)."""
    xml = ET.fromstring(domain(env, vm).XMLDesc(0))
    return [ET.tostring(disk, encoding="unicode") for disk in xml.findall("devices/disk")]


def nothing_left(env: BootEnv, vm: dict) -> None:
    """No temporary copy in the pool, no block job on the VM's disks, no ledger entry."""
    assert [v for v in env.pool_volumes() if f"{INSTALLATION}-save-" in v] == []
    dom = domain(env, vm)
    if dom.isActive():
        assert dom.blockJobInfo("vda", 0) == {}
    with env.app.app_context():
        assert db.session.scalars(sa.text("SELECT name FROM leftover")).all() == []
        db.session.remove()


def volume_path(env: BootEnv, name: str) -> str:
    pool = env.conn.storagePoolLookupByName(IMAGE_POOL)
    pool.refresh(0)
    return pool.storageVolLookupByName(name).path()


class TickWatch:
    """Watches the console log file while a request runs: when each new tick arrived."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.arrivals: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        seen = 0
        while not self.stop.is_set():
            text = Path(self.path).read_text(errors="replace")
            ticks = [int(n) for n in console.TICK.findall(text)]
            if ticks and ticks[-1] != seen:
                seen = ticks[-1]
                self.arrivals.append((time.monotonic(), seen))
            time.sleep(0.05)

    def __enter__(self) -> TickWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def longest_gap(self) -> float:
        times = [t for t, _ in self.arrivals]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def live_save(env, guest) -> dict:
    """The guest saved while it runs, its console watched before, during and after."""
    vm = guest["vm"]
    before = disks(env, vm)
    with TickWatch(f"{LOG_DIR}/{vm['domain_name']}.log") as watch:
        time.sleep(2.5)  # ticks before the request
        started = time.monotonic()
        made = env.api.post(f"vm/{vm['id']}/image", json={"name": "before-upgrade"})
        seconds = time.monotonic() - started
        time.sleep(2.5)  # and after it
    assert made.status_code == 201, made.json
    print(f"\nPOST /vm/<id>/image of a running VM: {seconds:.2f} s; ticks seen "
          f"{len(watch.arrivals)}, longest gap between ticks {watch.longest_gap():.2f} s")  # fmt: skip
    return {"answer": made.json, "image": made.json["data"], "watch": watch,
            "before": before, "after": disks(env, vm)}  # fmt: skip


def test_a_running_vm_is_saved_without_a_pause(env, guest, live_save):
    vm, image, watch = guest["vm"], live_save["image"], live_save["watch"]
    assert (image["state"], image["kind"], image["format"]) == ("active", "snapshot", "qcow2")
    assert image["source"] == {"vm": {"id": vm["id"]}}
    assert image["customer_id"] == vm["customer_id"]
    assert "crash-consistent" in live_save["answer"]["message"]
    # the guest kept ticking (once a second; a paused guest would leave a gap), and it
    # never restarted: the same boot, the same domain
    ticks = [n for _, n in watch.arrivals]
    assert len(ticks) >= 5 and ticks == sorted(set(ticks))
    assert watch.longest_gap() < 2.0, watch.arrivals
    assert len(console.boots(env.console(vm["id"])())) == 1
    assert domain(env, vm).isActive()
    assert live_save["after"] == live_save["before"]  # the disk chain exactly as it was
    nothing_left(env, vm)


def test_the_saved_image_downloads_as_the_disk_was(env, guest, live_save, tmp_path):
    image = live_save["image"]
    got = env.api.get(f"image/{image['id']}/file")
    assert got.status_code == 200
    path = tmp_path / "saved.qcow2"
    path.write_bytes(got.data)
    assert hashlib.sha256(got.data).hexdigest() == image["checksum"]
    info = json.loads(qemu_img("info", "--output=json", "-f", "qcow2", str(path)).stdout)
    assert info["virtual-size"] == ROOT_SIZE == image["virtual_size"]
    assert "backing-filename" not in info  # it stands alone
    # the guest wrote nothing since its boot: its disk now is the disk as it was saved
    overlay = volume_path(env, f"{INSTALLATION}-storage-{guest['root']['id']}")
    compared = qemu_img("compare", "-U", "-f", "qcow2", "-F", "qcow2", str(path), overlay)
    assert compared.returncode == 0, compared.stdout + compared.stderr


def test_a_vm_booted_from_the_saved_image_reads_the_marker(env, guest, live_save):
    image = live_save["image"]
    clone = env.create(image["id"])
    boot = wait_for_guest(env.console(clone["id"]))
    assert boot.previous_marker == guest["boot"].marker, boot
    gone = env.api.delete(f"vm/{clone['id']}")
    assert gone.status_code == 200, gone.json


def test_quiesce_without_a_guest_agent_is_refused(env, guest):
    vm = guest["vm"]
    before = (env.api.get("image").json["data"].keys(), disks(env, vm))
    refused = env.api.post(f"vm/{vm['id']}/image", json={"name": "q", "quiesce": True})
    assert_error(refused, 409, "vm/no_guest_agent")
    assert (env.api.get("image").json["data"].keys(), disks(env, vm)) == before
    nothing_left(env, vm)


def test_a_volume_and_a_shut_off_vm_are_saved(env, image, tmp_path):
    vm = env.create(image["id"], root_size=ROOT_SIZE)  # (not the module's guest: it stops)
    [root] = env.api.get(f"storage?vm.id={vm['id']}").json["data"].values()
    made = env.api.post("storage", json={"vm": {"id": vm["id"]}, "size": 8 * MIB,
                                         "storage_type": {"id": 1}})  # fmt: skip
    assert made.status_code == 201, made.json
    volume = made.json["data"]
    # a live save of the attached volume, then the VM shut off and its root disk saved
    live = env.api.post(f"storage/{volume['id']}/image", json={"name": "data"})
    assert live.status_code == 201, live.json
    assert live.json["data"]["source"] == {"storage": {"id": volume["id"]}}
    off = {"vm_state": {"id": state_id(env, "shutoff")}}
    stopped = env.api.update(f"vm/{vm['id']}?force=true", json=off)
    assert stopped.status_code == 200, stopped.json
    offline = env.api.post(f"vm/{vm['id']}/image", json={"name": "off", "quiesce": True})
    assert offline.status_code == 201, offline.json
    assert "the VM was shut off" in offline.json["message"]
    got = env.api.get(f"image/{offline.json['data']['id']}/file")
    path = tmp_path / "off.qcow2"
    path.write_bytes(got.data)
    overlay = volume_path(env, f"{INSTALLATION}-storage-{root['id']}")
    compared = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(path), overlay)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    nothing_left(env, vm)

    # the data volume, shut off: written, saved, changed, then restored into a new volume
    # that holds what was saved
    data = volume_path(env, f"{INSTALLATION}-storage-{volume['id']}")
    saved_bytes = write_volume(data, tmp_path / "a.raw", b"saved")
    kept = env.api.post(f"storage/{volume['id']}/image", json={"name": "data, shut off"})
    assert kept.status_code == 201, kept.json
    write_volume(data, tmp_path / "b.raw", b"changed")
    restored = env.api.post("storage", json={"vm": {"id": vm["id"]}, "storage_type": {"id": 1},
                                             "image": {"id": kept.json["data"]["id"]}})  # fmt: skip
    assert restored.status_code == 201, restored.json
    new = volume_path(env, f"{INSTALLATION}-storage-{restored.json['data']['id']}")
    assert raw_sha256(new, tmp_path / "new.raw") == hashlib.sha256(saved_bytes).hexdigest()
    assert raw_sha256(data, tmp_path / "now.raw") != hashlib.sha256(saved_bytes).hexdigest()
    gone = env.api.delete(f"vm/{vm['id']}?cascade=storage")
    assert gone.status_code == 200, gone.json


def write_volume(volume: str, scratch: Path, word: bytes) -> bytes:
    """Fill a shut-off VM's qcow2 volume with a known raw content (``word`` repeated, then
    random bytes) through qemu-img; the content."""
    size = 8 * MIB
    content = (word * (MIB // len(word) + 1))[:MIB] + os.urandom(size - MIB)
    scratch.write_bytes(content)
    done = qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", str(scratch), volume)
    assert done.returncode == 0, done.stderr
    return content


def raw_sha256(volume: str, scratch: Path) -> str:
    """sha256 of a qcow2 volume's content, read by qemu-img as raw."""
    done = qemu_img("convert", "-U", "-f", "qcow2", "-O", "raw", volume, str(scratch))
    assert done.returncode == 0, done.stderr
    return hashlib.sha256(scratch.read_bytes()).hexdigest()


def state_id(env: BootEnv, name: str) -> int:
    states = env.api.get("vm_state").json["data"].values()
    return next(s["id"] for s in states if s["name"] == name)


def test_a_failed_read_back_is_undone_and_what_stays_is_listed(env, guest):
    """The live copy is made, its read back fails and so does the undo's deletion of the
    copy: the VM runs on its chain as before, no image is left, and the copy is listed in
    the ledger until reconcile --fix removes it."""
    vm = guest["vm"]
    before = (env.api.get("image").json["data"].keys(), disks(env, vm))
    real = env.app.extensions[DRIVER_KEY]
    faults = env.app.extensions[DRIVER_KEY] = FaultyDriver(real)
    try:
        faults.fail("download_volume")
        faults.fail("delete_volume")
        failed = env.api.post(f"vm/{vm['id']}/image", json={"name": "x"})
    finally:
        env.app.extensions[DRIVER_KEY] = real
    error = assert_error(failed, 502, "vm/hypervisor_error")
    assert error["data"]["step"] == "reading the copy back"
    assert "copy_disk_live" in faults.calls
    assert (env.api.get("image").json["data"].keys(), disks(env, vm)) == before
    assert domain(env, vm).blockJobInfo("vda", 0) == {}
    [copy] = [v for v in env.pool_volumes() if f"{INSTALLATION}-save-" in v]
    with env.app.app_context():
        rows = db.session.execute(sa.text("SELECT name, reason FROM leftover")).all()
        db.session.remove()
    assert [name for name, _ in rows] == [copy]
    assert rows[0][1].startswith("undo step failed: deleting the temporary copy")
    fixed = env.app.test_cli_runner().invoke(args=["vmapi", "reconcile", "--fix"])
    assert "volume deleted" in fixed.output, fixed.output
    nothing_left(env, vm)
