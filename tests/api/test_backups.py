"""Backups on libvirt's test driver: ``backup_keep`` on /vm (admins only, undone with its
update, audited) and ``flask vmapi backup run``: which VMs it takes, a VM that has the
day's backup skipped, rotation (never an image a VM boots from), one VM's failure
reported while the run goes on, the exit status, and a rerun after a crash.

The test driver cannot download a volume, so no save completes here: a save fails at
its copy or its download, which is a real failure to report. Backups a finished earlier
run would have left are made as rows with a file in the store, as that run would have
made them. Saves that complete, and the rotation of real ones, are tested on a real
libvirtd (tests/hypervisor/test_backups.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from datetime import UTC, date, datetime, timedelta

import pytest
import sqlalchemy as sa

from tests.api.test_boot import hold, make_image
from tests.conftest import MIB, vm_body
from tests.errors import assert_error
from tests.image_files import ImageFiles
from vmapi.auth import CLI_PRINCIPAL
from vmapi.extensions import db
from vmapi.models import Image, Leftover, Vm
from vmapi.models.image import ACTIVE, BACKUP, SAVING, UPLOAD
from vmapi.models.leftover import VOLUME
from vmapi.services.images.backups import Chosen, Run, back_up, backup_name
from vmapi.services.leftovers import note_leftover
from vmapi.services.locks import LOCK_SPACE
from vmapi.services.names import save_volume_name

POOL = "vmapi"  # the seeded local-qcow2 type's
DAY = date(2026, 3, 14)  # the day the runs here are for (--date)
LINE = re.compile(r"^(saved|skipped|FAILED)\s+vm-(\d+): ", re.MULTILINE)


@pytest.fixture
def files(tmp_path):
    return ImageFiles(tmp_path / "files")


def run(runner, *args: str, day: date = DAY):
    """``flask vmapi backup run ARGS --date DAY``: (exit code, output, {vm id: status})."""
    result = runner.invoke(args=["vmapi", "backup", "run", *args, "--date", f"{day}"])
    statuses = {int(vm): status for status, vm in LINE.findall(result.output)}
    return result.exit_code, result.output, statuses


def backup(app, vm_id: int, day: date, *, state: str = ACTIVE, storage_id: int | None = None,
           customer_id: int | None = None, kind: str = BACKUP) -> dict:  # fmt: skip
    """An image as a backup run of ``day`` left it (made at noon UTC that day): active
    with its file in the store (a ``saving`` one without), named by its VM and day."""
    data = os.urandom(4096)
    with app.app_context():
        image = Image(name=backup_name(vm_id, day), format="qcow2", state=state, kind=kind,
                      customer_id=customer_id, source_vm_id=vm_id, source_storage_id=storage_id,
                      created_at=datetime(day.year, day.month, day.day, 12, tzinfo=UTC))  # fmt: skip
        path = None
        if state == ACTIVE:
            os.makedirs(app.config["IMAGE_DIR"], exist_ok=True)
            image.file = f"image-backup-{uuid.uuid4().hex}"
            path = os.path.join(app.config["IMAGE_DIR"], image.file)
            with open(path, "wb") as out:
                out.write(data)
            image.size, image.virtual_size = len(data), MIB
            image.checksum = hashlib.sha256(data).hexdigest()
        db.session.add(image)
        db.session.commit()
        made = {"id": image.id, "name": image.name, "path": path}
        db.session.remove()
    return made


def images(app) -> dict[int, tuple[str, str]]:
    """Every image row: id -> (name, state)."""
    with app.app_context():
        found = {i.id: (i.name, i.state) for i in db.session.scalars(sa.select(Image))}
        db.session.remove()
    return found


def days_before(count: int) -> date:
    return DAY - timedelta(days=count)


# ---------------------------------------------------------------------- backup_keep on /vm
def test_admins_set_backup_keep_and_answers_show_it(api, customer_api, vm_host, test_method):
    vm_host()
    made = api.post("vm", json=vm_body(test_method, backup_keep=3, customer_id=7))
    assert made.status_code == 201, made.json
    vm = made.json["data"]
    assert vm["backup_keep"] == 3
    assert api.get(f"vm/{vm['id']}").json["data"]["backup_keep"] == 3
    assert api.get("vm").json["data"][str(vm["id"])]["backup_keep"] == 3
    assert api.get(f"vm/{vm['id']}?nest=node").json["data"]["backup_keep"] == 3
    assert api.patch(f"vm/{vm['id']}", json={"backup_keep": 5}).json["data"]["backup_keep"] == 5
    cleared = api.patch(f"vm/{vm['id']}", json={"backup_keep": None}).json["data"]
    assert cleared["backup_keep"] is None
    plain = api.post("vm", json=vm_body(test_method)).json["data"]
    assert plain["backup_keep"] is None
    for bad in (0, -1, 2**31, "two"):
        assert_error(api.patch(f"vm/{vm['id']}", json={"backup_keep": bad}), 400,
                     "general/validation")  # fmt: skip
    # the customer sees it on its VM, and may not set it
    seven = customer_api(7)
    api.patch(f"vm/{vm['id']}", json={"backup_keep": 2})
    assert seven.get(f"vm/{vm['id']}").json["data"]["backup_keep"] == 2
    assert_error(seven.patch(f"vm/{vm['id']}", json={"backup_keep": 9}), 403,
                 "general/authorization/forbidden")  # fmt: skip
    assert_error(seven.patch(f"vm/{vm['id']}", json={"backup_keep": None}), 403,
                 "general/authorization/forbidden")  # fmt: skip
    assert seven.patch(f"vm/{vm['id']}", json={"backup_keep": 2, "cores": 1}).status_code == 200
    assert_error(seven.post("vm", json=vm_body(test_method, backup_keep=1)), 403,
                 "general/authorization/forbidden")  # fmt: skip
    assert seven.post("vm", json=vm_body(test_method, backup_keep=None)).status_code == 201
    # recorded in the audit trail, before and after
    events = api.get(f"event?resource=vm&object_id={vm['id']}&action=update").json["data"]
    changes = [(e["before"]["backup_keep"], e["after"]["backup_keep"]) for e in events.values()
               if "backup_keep" in (e["after"] or {})]  # fmt: skip
    assert changes == [(3, 5), (5, None), (None, 2)]


def test_an_update_undone_puts_backup_keep_back(api, vm_host, test_method):
    vm_host(cores=6)
    a, b = api.post("vm", json=[vm_body(test_method, backup_keep=1),
                                vm_body(test_method)]).json["data"].values()  # fmt: skip
    body = [{"id": a["id"], "backup_keep": 7}, {"id": b["id"], "cores": 5}]  # b does not fit
    error = assert_error(api.update("vm", json=body), 409, "vm/node_unsuitable")
    assert error["data"]["index"] == 1
    assert api.get(f"vm/{a['id']}").json["data"]["backup_keep"] == 1


# ---------------------------------------------------------------------- which VMs
def test_a_run_takes_the_vms_asked_for(app, api, runner, vm_host, test_method):
    vm_host(cores=16)
    ids = [api.post("vm", json=vm_body(test_method, **fields)).json["data"]["id"]
           for fields in ({"backup_keep": 2, "customer_id": 7}, {"customer_id": 7},
                          {"backup_keep": 1, "customer_id": 8},
                          {"backup_keep": 3})]  # fmt: skip
    a, b, c, d = ids
    for vm_id in ids:  # each has the day's backup: skipped, nothing saved
        backup(app, vm_id, DAY)
    code, output, done = run(runner, "--all")
    assert code == 0, output
    assert list(done.items()) == [(a, "skipped"), (c, "skipped"), (d, "skipped")]  # id order
    assert "3 VM(s), 0 saved, 3 skipped, 0 failed" in output
    assert run(runner, "--customer", "7")[2] == {a: "skipped"}
    assert run(runner, "--customer", "9")[2] == {}
    assert run(runner, "--vm", str(c))[2] == {c: "skipped"}
    # a VM without backup_keep only with --keep
    code, output, done = run(runner, "--vm", str(b))
    assert code != 0 and f"vm-{b} has no backup_keep; give --keep N" in output and done == {}
    assert run(runner, "--vm", str(b), "--keep", "1")[2] == {b: "skipped"}
    code, output, _ = run(runner, "--vm", "999")
    assert code != 0 and "vm-999 does not exist" in output
    for wrong in ([], ["--all", "--vm", str(a)], ["--customer", "7", "--all"],
                  ["--all", "--keep", "0"]):  # fmt: skip
        assert runner.invoke(args=["vmapi", "backup", "run", *wrong]).exit_code == 2
    assert len(images(app)) == 4  # nothing made, nothing deleted


# ---------------------------------------------------------------------- rotation
def test_rotation_keeps_the_newest(app, api, runner, vm_host, test_method):
    vm_host()
    vm = api.post("vm", json=vm_body(test_method, backup_keep=2, customer_id=7)).json["data"]
    other = api.post("vm", json=vm_body(test_method)).json["data"]
    old = [backup(app, vm["id"], days_before(n), customer_id=7) for n in (4, 3, 2, 1)]
    today = backup(app, vm["id"], DAY, customer_id=7)
    # not this VM's root disk backups: another VM's, one of a data volume, a snapshot,
    # an upload that happens to carry its id
    others = [backup(app, other["id"], days_before(9)),
              backup(app, vm["id"], days_before(8), storage_id=41),
              backup(app, vm["id"], days_before(7), kind="snapshot"),
              backup(app, vm["id"], days_before(6), kind=UPLOAD)]  # fmt: skip
    code, output, done = run(runner, "--all")
    assert code == 0, output
    assert done == {vm["id"]: "skipped"}
    line = next(li for li in output.splitlines() if li.startswith("skipped"))
    assert f"it has this day's backup already (image {today['id']} {today['name']})" in line
    gone = [old[0]["id"], old[1]["id"], old[2]["id"]]
    assert f"deleted old backups image {gone[0]}, image {gone[1]}, image {gone[2]}" in line
    assert "3 old backup(s) deleted" in output
    left = images(app)
    assert sorted(left) == sorted([old[3]["id"], today["id"]] + [o["id"] for o in others])
    listed = api.get("image?kind=backup&customer_id=7").json["data"]
    assert sorted(map(int, listed)) == sorted([old[3]["id"], today["id"]])
    for image in old[:3]:
        assert api.get(f"image/{image['id']}").status_code == 404
        assert not os.path.exists(image["path"])
    assert os.path.exists(old[3]["path"]) and os.path.exists(today["path"])
    # again: nothing to do; a smaller --keep deletes more
    assert run(runner, "--all")[0] == 0 and len(images(app)) == len(left)
    code, output, _ = run(runner, "--vm", str(vm["id"]), "--keep", "1")
    assert code == 0 and f"deleted old backup image {old[3]['id']}" in output
    assert not os.path.exists(old[3]["path"])
    assert sorted(images(app)) == sorted([today["id"]] + [o["id"] for o in others])
    # audited as image deletions
    events = api.get("event?limit=1000&resource=image&action=delete").json["data"].values()
    assert sorted(e["object_id"] for e in events) == sorted([*gone, old[3]["id"]])


def test_rotation_never_deletes_an_image_a_vm_boots_from(app, api, runner, vm_host, test_method):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method, backup_keep=1)).json["data"]
    booted, older = backup(app, vm["id"], days_before(2)), backup(app, vm["id"], days_before(3))
    today = backup(app, vm["id"], DAY)
    hold(app, node, {"id": booted["id"], "virtual_size": MIB})
    restored = api.post("vm", json=vm_body(test_method, image={"id": booted["id"]}))
    assert restored.status_code == 201, restored.json
    code, output, done = run(runner, "--all")
    assert code == 0, output
    assert done == {vm["id"]: "skipped"}
    restored_id = restored.json["data"]["id"]
    assert f"kept image {booted['id']}: vm-{restored_id} boot(s) from it" in output
    assert f"deleted old backup image {older['id']}" in output
    assert "1 old backup(s) deleted, 1 kept in use" in output
    assert sorted(images(app)) == sorted([booted["id"], today["id"]])
    assert os.path.exists(booted["path"])


# ---------------------------------------------------------------------- failures
@pytest.mark.parametrize("app_config", [{"VM_LOCK_TIMEOUT": 0.2}])
def test_one_vms_failure_is_reported_and_the_run_goes_on(
    app, api, runner, vm_host, test_method, files, driver
):
    node = vm_host(cores=16)
    image = make_image(api, files)
    hold(app, node, image)
    busy, bare, fine, copied = (
        api.post("vm", json=vm_body(test_method, backup_keep=1, **fields)).json["data"]["id"]
        for fields in ({}, {}, {}, {"image": {"id": image["id"]}})
    )
    api.patch(f"vm/{copied}?force=true", json={"vm_state": {"id": 4}})  # shut off
    old = {vm_id: backup(app, vm_id, days_before(1)) for vm_id in (busy, bare, copied)}
    backup(app, fine, DAY)
    before = images(app)
    with app.app_context():
        pool = driver.volumes(node["libvirt_uri"], POOL)
        holder = db.engine.connect()  # another operation on vm `busy` holds its lock
        holder.execute(sa.select(sa.func.pg_advisory_lock(LOCK_SPACE, busy)))
    try:
        code, output, done = run(runner, "--all")
    finally:
        holder.execute(sa.select(sa.func.pg_advisory_unlock_all()))
        holder.close()
    assert code == 1, output
    assert done == {busy: "FAILED", bare: "FAILED", fine: "skipped", copied: "FAILED"}
    lines = {int(vm): line for vm, line in re.findall(r"^\S+\s+vm-(\d+): (.*)$", output, re.M)}
    assert lines[busy].startswith("vm/busy: Another operation on vm-")
    assert lines[bare].startswith(f"vm/no_root_disk: vm-{bare} was made without an image")
    # (the test driver's clone runs on a connection of its own, which has no such pool:
    # the save fails at its copy, after its row and ledger entry were made)
    assert lines[copied].startswith("vm/hypervisor_error: ") and "copying the disk" in lines[copied]
    assert "its backups were left as they are" in lines[copied]
    assert "4 VM(s), 0 saved, 1 skipped, 3 failed" in output
    # the failed saves left nothing: no row, no copy on the node, no ledger entry; and
    # the failed VMs' older backups were not rotated away
    assert images(app) == before
    assert all(os.path.exists(b["path"]) for b in old.values())
    assert driver.volumes(node["libvirt_uri"], POOL) == pool
    with app.app_context():
        assert db.session.scalars(sa.select(Leftover)).all() == []
        db.session.remove()


def test_a_rerun_after_a_crash_cleans_up_and_saves_again(
    app, api, runner, vm_host, test_method, driver, installation
):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method, backup_keep=1)).json["data"]
    uri = node["libvirt_uri"]
    # the run of DAY crashed while saving the VM, long enough ago: its saving row, the
    # ledger entry of its copy and the copy on the node are left
    dead = backup(app, vm["id"], DAY, state=SAVING)
    with app.app_context():
        copy = save_volume_name(dead["id"])
    driver.ensure_pool(uri, POOL, f"/{POOL}")
    driver.create_volume(uri, POOL, copy, MIB, "qcow2")
    with app.app_context():
        db.session.execute(sa.update(Image).where(Image.id == dead["id"])
                           .values(created_at=datetime.now(UTC) - timedelta(hours=3)))  # fmt: skip
        note_leftover(node["id"], VOLUME, copy, "the temporary copy saving image", vm["id"],
                      POOL)  # fmt: skip
        db.session.commit()
        db.session.remove()
    code, output, done = run(runner, "--all")
    assert f"image {dead['id']}: a save that died part-way" in output
    assert f"{POOL}/{copy} on node {node['fqdn']}: volume deleted" in output
    assert copy not in driver.volumes(uri, POOL)
    # the dead save does not count as the day's backup: the VM is saved again (which
    # fails here: the VM has no root disk)
    assert done == {vm["id"]: "FAILED"} and code == 1 and "vm/no_root_disk" in output
    assert images(app) == {}
    with app.app_context():
        assert db.session.scalars(sa.select(Leftover)).all() == []
        db.session.remove()


def test_a_save_in_flight_is_left_alone(app, api, runner, vm_host, test_method, driver):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method, backup_keep=1)).json["data"]
    older = backup(app, vm["id"], days_before(1))
    flying = backup(app, vm["id"], DAY, state=SAVING)  # made now by another run
    with app.app_context():
        copy = save_volume_name(flying["id"])
    driver.ensure_pool(node["libvirt_uri"], POOL, f"/{POOL}")
    driver.create_volume(node["libvirt_uri"], POOL, copy, MIB, "qcow2")
    with app.app_context():
        db.session.execute(sa.update(Image).where(Image.id == flying["id"])
                           .values(created_at=datetime.now(UTC)))  # fmt: skip
        note_leftover(node["id"], VOLUME, copy, "the temporary copy", vm["id"], POOL)
        db.session.commit()
        db.session.remove()
    code, output, done = run(runner, "--all")
    assert code == 0 and done == {vm["id"]: "skipped"}, output
    assert f"image {flying['id']} {flying['name']} is being saved by another run" in output
    assert sorted(images(app)) == sorted([older["id"], flying["id"]])  # no rotation yet
    assert copy in driver.volumes(node["libvirt_uri"], POOL)
    with app.app_context():
        assert [left.name for left in db.session.scalars(sa.select(Leftover))] == [copy]
        db.session.remove()


def test_a_vm_deleted_during_the_run_is_skipped(app, api, vm_host, test_method):
    vm_host()
    vm = api.post("vm", json=vm_body(test_method, backup_keep=1)).json["data"]
    assert api.delete(f"vm/{vm['id']}").status_code == 200
    with app.app_context():
        result = back_up(Run(DAY, [], []), Chosen(vm["id"], 1), CLI_PRINCIPAL)
        assert not result.failed and result.line() == (
            f"skipped vm-{vm['id']}: nothing saved: deleted since the run began"
        )
        assert db.session.get(Vm, vm["id"]) is None


def test_a_customer_at_its_quota_gets_no_backup_and_keeps_its_own(
    app, api, runner, vm_host, test_method, files
):
    """A backup counts against its owner's max_storage: a customer at its limit gets no new
    one (403 before anything is copied), and keeps the ones it has."""
    node = vm_host()
    image = make_image(api, files)
    hold(app, node, image)
    vm = api.post("vm", json=vm_body(test_method, image={"id": image["id"]}, customer_id=7,
                                     backup_keep=1)).json["data"]  # fmt: skip
    older = backup(app, vm["id"], days_before(1), customer_id=7)
    # exactly what it uses: its root disk's 2 MiB and the older backup's 4 KiB
    quota = api.post("quota", json={"customer_id": 7, "max_storage": 2 * MIB + 4096})
    assert quota.status_code == 201, quota.json
    code, output, done = run(runner, "--all")
    assert code == 1 and done == {vm["id"]: "FAILED"}, output
    assert f"FAILED  vm-{vm['id']}: image/quota_exceeded: " in output
    assert sorted(images(app)) == sorted([image["id"], older["id"]])
    assert os.path.exists(older["path"])
