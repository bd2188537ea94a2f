"""Saving a VM's root disk or a volume as an image, on libvirt's test driver: the checks
made before anything is copied, and the undo of every step the test driver can run.

The test driver copies volumes (``clone_volume``) but cannot download one, so a save
there fails at its read back: a real failure, after a real copy, whose undo these tests
check. A save that completes, and a live one, are proven on a real libvirtd
(tests/hypervisor/test_save_image.py).
"""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa

from tests.api.test_boot import POOL, boot_body, files, hold, make_image, volumes  # noqa: F401
from tests.conftest import GIB, MIB, vm_body
from tests.errors import assert_error
from tests.faults import FaultyDriver
from vmapi.extensions import db
from vmapi.models import Image, Leftover
from vmapi.models.image import SAVING
from vmapi.services.locks import LOCK_SPACE
from vmapi.services.names import save_volume_name
from vmapi.services.nodes.hosts import DRIVER_KEY


@pytest.fixture
def faults(app):
    real = app.extensions[DRIVER_KEY]
    app.extensions[DRIVER_KEY] = FaultyDriver(real)
    return app.extensions[DRIVER_KEY]


@pytest.fixture
def booted(app, api, vm_host, test_method, files):  # noqa: F811
    """``booted(customer_id=None, running=True)``: a VM made from a 2 MiB image on a node
    that holds the image, with its node and image."""

    def make(customer_id=None, running=True):
        image = make_image(api, files)
        node = vm_host()
        hold(app, node, image)
        body = boot_body(test_method, image, customer_id=customer_id)
        vm = api.post("vm", json=body)
        assert vm.status_code == 201, vm.json
        vm = vm.json["data"]
        if not running:
            stopped = api.update(f"vm/{vm['id']}", json={"vm_state": {"id": shutoff_id(api)}})
            assert stopped.status_code == 200, stopped.json
        return vm, node, image

    return make


def shutoff_id(api):
    states = api.get("vm_state").json["data"].values()
    return next(s["id"] for s in states if s["name"] == "shutoff")


def left(app, api, driver, node):
    """Everything a failed save could leave: image rows, volumes on the node, ledger
    entries, files in the store."""
    with app.app_context():
        ledger = sorted(db.session.scalars(sa.select(Leftover.name)))
        db.session.remove()
    store = app.config["IMAGE_DIR"]
    return {
        "images": sorted(api.get("image").json["data"]),
        "volumes": volumes(driver, node),
        "ledger": ledger,
        "store": sorted(os.listdir(store)) if os.path.isdir(store) else [],
    }


def test_refusals_before_anything_is_copied(app, api, customer_api, booted, vm_host, test_method,
                                            driver):  # fmt: skip
    vm, node, _image = booted(customer_id=8)
    before = left(app, api, driver, node)
    # another customer's VM and volume do not exist for it
    assert_error(customer_api(9).post(f"vm/{vm['id']}/image", json={"name": "x"}), 404,
                 "vm/not_found")  # fmt: skip
    [root] = api.get(f"storage?vm.id={vm['id']}").json["data"].values()
    assert_error(customer_api(9).post(f"storage/{root['id']}/image", json={"name": "x"}), 404,
                 "storage/not_found")  # fmt: skip
    assert_error(api.post("vm/999999/image", json={"name": "x"}), 404, "vm/not_found")
    # a name is required; unknown fields are refused
    error = assert_error(api.post(f"vm/{vm['id']}/image", json={}), 400, "general/validation")
    assert "name" in error["data"]
    assert_error(api.post(f"vm/{vm['id']}/image", json={"name": "x", "kind": "backup"}), 400,
                 "general/validation")  # fmt: skip
    # a VM made without an image has no root disk
    bare = api.post("vm", json=vm_body(test_method)).json["data"]
    assert_error(api.post(f"vm/{bare['id']}/image", json={"name": "x"}), 409, "vm/no_root_disk")
    # the owner's storage quota: the disk's estimate (its file and its image's) must fit
    assert api.post("quota", json={"customer_id": 8, "max_storage": 2 * MIB}).status_code == 201
    error = assert_error(customer_api(8).post(f"vm/{vm['id']}/image", json={"name": "x"}), 403,
                         "image/quota_exceeded")  # fmt: skip
    assert error["data"]["quota"] == "max_storage"
    assert left(app, api, driver, node) == before


@pytest.mark.parametrize("app_config", [{"VM_LOCK_TIMEOUT": 0.3}])
def test_one_operation_at_a_time(app, api, booted, backend, app_config):
    if backend != "postgresql":
        pytest.skip("advisory locks are PostgreSQL's (SQLite serves one process)")
    vm, _, _ = booted()
    [root] = api.get(f"storage?vm.id={vm['id']}").json["data"].values()
    with app.app_context():
        holder = db.engine.connect()  # a move (or another save) of the VM in flight
        holder.execute(sa.select(sa.func.pg_advisory_lock(LOCK_SPACE, vm["id"])))
        try:
            assert_error(api.post(f"vm/{vm['id']}/image", json={"name": "x"}), 409, "vm/busy")
            assert_error(api.post(f"storage/{root['id']}/image", json={"name": "x"}), 409,
                         "vm/busy")  # fmt: skip
        finally:
            holder.execute(sa.select(sa.func.pg_advisory_unlock_all()))
            holder.close()
    assert api.get("image").json["data"].keys() == {"1"}  # the VM's own image only


def test_a_shut_off_vm_is_copied_as_a_volume_and_a_failure_undoes_it(app, api, booted, faults,
                                                                     installation):  # fmt: skip
    vm, node, _image = booted(running=False)
    before = left(app, api, faults, node)
    error = assert_error(api.post(f"vm/{vm['id']}/image", json={"name": "before-upgrade"}),
                         502, "vm/hypervisor_error")  # fmt: skip
    # the driver clones on a connection of its own: on the test driver that is a new,
    # empty host, where the pool is not (a real failure of the copy's step)
    assert error["data"]["step"] == "copying the disk"
    copy = save_volume_name_in(app, 2)
    [(args)] = [args for name, args in faults.called if name == "clone_volume"]
    assert args[:4] == (POOL, copy, POOL, f"{installation}-storage-1")
    assert "copy_disk_live" not in faults.calls
    assert left(app, api, faults, node) == before


def test_a_running_vm_is_copied_live(app, api, booted, faults):
    vm, node, _ = booted()
    before = left(app, api, faults, node)
    faults.fail("copy_disk_live")  # (the test driver has no block copy either way)
    error = assert_error(api.post(f"vm/{vm['id']}/image", json={"name": "x"}), 502,
                         "vm/hypervisor_error")  # fmt: skip
    assert error["data"]["step"] == "copying the disk live"
    assert "clone_volume" not in faults.calls
    assert left(app, api, faults, node) == before


def test_a_saving_image_takes_no_upload(app, api, booted, test_method):
    vm, _, _ = booted()
    with app.app_context():
        row = Image(name="x", format="qcow2", state=SAVING, kind="snapshot",
                    source_vm_id=vm["id"], size=MIB)  # fmt: skip
        db.session.add(row)
        db.session.commit()
        ident = row.id
        db.session.remove()
    sent = api.call("PUT", f"image/{ident}/file", data=b"x" * 512,
                    headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    assert_error(sent, 409, "image/busy")
    answer = api.get(f"image/{ident}").json["data"]
    assert (answer["state"], answer["kind"], answer["source"]) == (
        "saving",
        "snapshot",
        {"vm": {"id": vm["id"]}},
    )
    assert_error(api.post("vm", json=boot_body(test_method, {"id": ident})), 409,
                 "image/not_active")  # fmt: skip


def test_a_save_in_flight_counts_against_the_quota(app, api, customer_api, booted):
    vm, _, _image = booted(customer_id=8)
    assert api.post("quota", json={"customer_id": 8, "max_storage": 8 * GIB}).status_code == 201
    with app.app_context():  # another save of this customer, holding its estimate
        db.session.add(Image(name="x", format="qcow2", state=SAVING, kind="snapshot",
                             source_vm_id=vm["id"], customer_id=8, size=8 * GIB - MIB))  # fmt: skip
        db.session.commit()
        db.session.remove()
    assert_error(customer_api(8).post(f"vm/{vm['id']}/image", json={"name": "y"}), 403,
                 "image/quota_exceeded")  # fmt: skip


def save_volume_name_in(app, image_id):
    with app.app_context():
        return save_volume_name(image_id)


@pytest.mark.parametrize(
    ("method", "kind", "status", "error_id", "step"),
    [
        ("domain", "error", 502, "vm/hypervisor_error", "reading the domain's state"),
        ("domain", "unavailable", 502, "vm/hypervisor_error", "reading the domain's state"),
        ("copy_disk_live", "timeout", 504, "vm/hypervisor_timeout", "copying the disk live"),
        ("copy_disk_live", "unavailable", 502, "vm/hypervisor_error", "copying the disk live"),
    ],
)
def test_each_step_failing_leaves_nothing(app, api, booted, faults, method, kind, status,
                                          error_id, step):  # fmt: skip
    """The hypervisor failing, timing out or going away at a step: its error, its step,
    and nothing left (no image, no copy, no ledger entry, no file)."""
    vm, node, _ = booted()
    before = left(app, api, faults, node)
    faults.fail(method, kind)
    error = assert_error(api.post(f"vm/{vm['id']}/image", json={"name": "x"}), status, error_id)
    assert error["data"]["step"] == step
    assert left(app, api, faults, node) == before
    # the VM is as it was: the next save gets as far as the test driver lets it
    again = api.post(f"vm/{vm['id']}/image", json={"name": "x"})
    assert again.json["data"]["step"] == "copying the disk live", again.json
