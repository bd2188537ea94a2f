"""POST /vm/<id>/rebuild on libvirt's test driver: a new root disk from an image, the rest
of the VM kept; the checks, sizes, quota and roles; every step's failure undone; the
ledger and reconcile for a rebuild that failed to clean up or whose worker died.

A node "holds" an image as in tests/api/test_boot.py (the test driver cannot copy one).
The test driver's domains read no disks, so its VMs have no cloud-init seed: the seed
and a guest that boots again are tests/hypervisor/test_rebuild.py's.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
import sqlalchemy as sa

from tests.api.test_boot import POOL, boot_body, hold, make_image, volumes
from tests.conftest import MIB, vm_body
from tests.errors import assert_error
from tests.faults import FaultyDriver
from tests.image_files import ImageFiles
from vmapi.auth import Principal
from vmapi.extensions import db
from vmapi.models import Leftover, Vm
from vmapi.services.locks import vm_locks
from vmapi.services.nodes.hosts import DRIVER_KEY
from vmapi.services.undo import Undo
from vmapi.services.vms import rebuild as rebuilding
from vmapi.services.vms.cloud_init import instance_base
from vmapi.services.vms.rows import VmRows

pytestmark = pytest.mark.embedded

INACTIVE = 2  # VIR_DOMAIN_XML_INACTIVE: the persistent definition


@pytest.fixture
def files(tmp_path):
    return ImageFiles(tmp_path / "files")


@pytest.fixture
def image(api, files):
    """An active raw image of 2 MiB."""
    return make_image(api, files)


@pytest.fixture
def faults(app):
    real = app.extensions[DRIVER_KEY]
    app.extensions[DRIVER_KEY] = FaultyDriver(real)
    return app.extensions[DRIVER_KEY]


@pytest.fixture
def booted(app, api, vm_host, test_method, image):
    """A running VM of ``image`` (root disk 4 MiB) with a data volume; its node."""
    node = vm_host()
    hold(app, node, image)
    vm = api.post("vm", json=boot_body(test_method, image, root_size=4 * MIB)).json["data"]
    data = api.post("storage", json={"size": MIB, "vm": {"id": vm["id"]},
                                     "storage_type": {"id": 1}})  # fmt: skip
    assert data.status_code == 201, data.json
    return {"vm": vm, "node": node, "data": data.json["data"]}


def root_of(api, vm):
    return next(s for s in api.get(f"storage?vm.id={vm['id']}").json["data"].values() if s["boot"])


def row(app, model, ident, *columns):
    with app.app_context():
        found = db.session.get(model, ident)
        values = tuple(getattr(found, column) for column in columns)
        db.session.remove()
    return values


def disks(driver, node, vm, flags=INACTIVE):
    """Target -> source file of the domain's disks."""
    real = getattr(driver, "real", driver)
    dom = real.connections.get(node["libvirt_uri"], 5).lookupByName(vm["domain_name"])
    xml = ET.fromstring(dom.XMLDesc(flags))
    return {d.find("target").get("dev"): d.find("source").get("file")
            for d in xml.findall("devices/disk")}  # fmt: skip


def state(driver, node, vm):
    real = getattr(driver, "real", driver)
    return real.domain(node["libvirt_uri"], vm["domain_name"]).state


def ledger(app):
    with app.app_context():
        found = sorted((left.name, left.reason) for left in db.session.query(Leftover))
        db.session.remove()
    return found


def rebuild(api, vm, image, **body):
    return api.post(f"vm/{vm['id']}/rebuild", json={"image": {"id": image["id"]}, **body})


def test_a_rebuild_gives_the_vm_a_new_root_disk_and_keeps_the_rest(
    app, api, booted, image, driver, installation
):
    vm, node, data = booted["vm"], booted["node"], booted["data"]
    root = root_of(api, vm)
    first = f"{installation}-storage-{root['id']}"
    assert row(app, Vm, vm["id"], "image_id") == (image["id"],)
    before = disks(driver, node, vm)
    answer = rebuild(api, vm, image)
    assert answer.status_code == 200, answer.json
    after = answer.json["data"]
    for key in ("id", "uuid", "domain_name", "interfaces", "node", "image", "hostname"):
        assert after[key] == vm[key]
    assert after["vm_state"] == {"id": 2}  # running
    assert f"vm-{vm['id']} was rebuilt from image {image['id']}" in answer.json["message"]
    # the same root disk object, on a new volume of its own; the data volume kept
    assert root_of(api, vm) == root
    [name] = [v for v in volumes(driver, node) if v.startswith(f"{first}-r")]
    assert len(name) == len(first) + 8  # -r and 6 hex digits
    assert volumes(driver, node) == sorted(
        [f"{installation}-image-{image['id']}", name, f"{installation}-storage-{data['id']}"]
    )
    now = disks(driver, node, vm)
    assert now["vda"].endswith(f"/{name}") and now["vda"] != before["vda"]
    assert now["vdb"] == before["vdb"]  # the data volume
    assert disks(driver, node, vm, flags=0) == now  # it runs on them
    assert state(driver, node, vm) == "running"
    assert ledger(app) == []  # nothing left listed
    # once more: a newer name, the first one's base
    assert rebuild(api, vm, image).status_code == 200
    [again] = [v for v in volumes(driver, node) if v.startswith(f"{first}-r")]
    assert again != name and len(again) == len(name)
    event = api.get("event?resource=vm&action=rebuild").json["data"]
    [first_event, _] = event.values()
    assert first_event["object_id"] == vm["id"] and first_event["outcome"] == "ok"
    assert first_event["before"] == {"image_id": image["id"],
                                     "storage": {"id": root["id"], "size": 4 * MIB}}  # fmt: skip
    assert first_event["after"]["image_id"] == image["id"]


def test_the_seed_s_instance_id_base_follows_the_root_disk(app, api, booted, image):
    vm = booted["vm"]
    bases = []
    for _ in range(3):
        with app.app_context():
            bases.append(instance_base(db.session.get(Vm, vm["id"])))
            db.session.remove()
        assert rebuild(api, vm, image).status_code == 200
    never, *rebuilt = bases
    assert never == vm["domain_name"]  # never rebuilt: the id it always had
    suffix = root_volume(app, vm).rsplit("-", 1)[1]
    assert rebuilt[0] != rebuilt[1] and all(b.startswith(f"{never}-r") for b in rebuilt)
    with app.app_context():
        assert instance_base(db.session.get(Vm, vm["id"])) == f"{never}-{suffix}"
        db.session.remove()


def test_a_rebuild_to_another_image_moves_the_vm_to_it(app, api, booted, image, files, driver,
                                                       installation):  # fmt: skip
    vm, node = booted["vm"], booted["node"]
    other = make_image(api, files, size=3 * MIB)
    hold(app, node, other)
    answer = rebuild(api, vm, other)
    assert answer.status_code == 200, answer.json
    assert answer.json["data"]["image"] == {"id": other["id"]}
    root = root_of(api, vm)
    assert root["image"] == {"id": other["id"]} and root["size"] == 4 * MIB
    # the first image's copy served nobody any more: it went
    found = volumes(driver, node)
    assert f"{installation}-image-{image['id']}" not in found
    assert f"{installation}-image-{other['id']}" in found
    assert api.delete(f"image/{image['id']}").status_code == 200
    assert_error(api.delete(f"image/{other['id']}"), 409, "image/in_use")


def test_sizes(api, booted, image):
    vm = booted["vm"]
    # default: the present size (4 MiB) when it is larger than the image's (2 MiB)
    assert rebuild(api, vm, image).status_code == 200
    assert root_of(api, vm)["size"] == 4 * MIB
    # given: rounded up to a whole MiB; it may be smaller than before
    assert rebuild(api, vm, image, root_size=3 * MIB - 1).status_code == 200
    assert root_of(api, vm)["size"] == 3 * MIB
    assert rebuild(api, vm, image, root_size=6 * MIB).status_code == 200
    assert root_of(api, vm)["size"] == 6 * MIB
    small = assert_error(rebuild(api, vm, image, root_size=MIB), 400, "general/validation")
    assert set(small["data"]) == {"root_size"}
    big = assert_error(rebuild(api, vm, image, root_size=2**50), 400, "general/validation")
    assert set(big["data"]) == {"root_size"}
    assert root_of(api, vm)["size"] == 6 * MIB


def test_bad_requests_change_nothing(app, api, customer_api, files, vm_host, test_method, booted,
                                     image, driver):  # fmt: skip
    vm, node = booted["vm"], booted["node"]
    before = (volumes(driver, node), disks(driver, node, vm), root_of(api, vm))
    missing = assert_error(rebuild(api, vm, {"id": 999999}), 404, "vm/image_not_found")
    assert missing["data"] == {"image": {"id": 999999}}
    foreign = make_image(customer_api(8), files)
    assert_error(rebuild(api, vm, foreign), 404, "vm/image_not_found")  # not the owner's
    queued = api.post("image", json={"name": "empty"}).json["data"]
    assert assert_error(rebuild(api, vm, queued), 409, "image/not_active")["data"]["state"] == (
        "queued"
    )
    body = assert_error(api.post(f"vm/{vm['id']}/rebuild", json={}), 400, "general/validation")
    assert set(body["data"]) == {"image"}
    assert_error(api.post(f"vm/{vm['id']}/rebuild"), 400, "general/validation")
    bare = api.post("vm", json=vm_body(test_method)).json["data"]
    error = assert_error(rebuild(api, bare, image), 409, "vm/no_root_disk")
    assert error["data"] == {"vm": {"id": bare["id"]}}
    assert_error(rebuild(api, {"id": 999999}, image), 404, "vm/not_found")
    assert (volumes(driver, node), disks(driver, node, vm), root_of(api, vm)) == before
    refused = api.get("event?resource=vm&action=rebuild").json["data"].values()
    assert {e["outcome"] for e in refused} == {"vm/image_not_found", "image/not_active",
                                                "general/validation", "vm/no_root_disk",
                                                "vm/not_found"}  # fmt: skip


def test_customers_rebuild_their_own_vms(app, api, customer_api, files, vm_host, test_method,
                                         image, driver):  # fmt: skip
    node = vm_host()
    hold(app, node, image)
    customer = customer_api(7)
    own = make_image(customer, files)
    hold(app, node, own)
    vm = customer.post("vm", json=boot_body(test_method, image)).json["data"]
    answer = rebuild(customer, vm, own)
    assert answer.status_code == 200, answer.json
    assert answer.json["data"]["image"] == {"id": own["id"]}
    assert_error(rebuild(customer_api(8), vm, image), 404, "vm/not_found")
    # its own image, not another customer's (also for an admin acting on its VM)
    other = make_image(customer_api(8), files)
    assert_error(rebuild(customer, vm, other), 404, "vm/image_not_found")
    assert_error(rebuild(api, vm, other), 404, "vm/image_not_found")


def test_a_shut_off_vm_ends_running(api, booted, image, driver):
    vm, node = booted["vm"], booted["node"]
    assert api.update(f"vm/{vm['id']}", json={"vm_state": {"id": 4}}).status_code == 200
    assert state(driver, node, vm) == "shutoff"
    answer = rebuild(api, vm, image)
    assert answer.status_code == 200, answer.json
    assert answer.json["data"]["vm_state"] == {"id": 2}
    assert state(driver, node, vm) == "running"


def test_a_larger_disk_counts_against_the_quota(app, api, customer_api, vm_host, test_method,
                                                image, driver):  # fmt: skip
    node = vm_host()
    hold(app, node, image)
    assert api.post("quota", json={"customer_id": 7, "max_storage": 5 * MIB}).status_code == 201
    customer = customer_api(7)
    vm = customer.post("vm", json=boot_body(test_method, image, root_size=3 * MIB)).json["data"]
    before = (volumes(driver, node), root_of(api, vm))
    error = assert_error(rebuild(customer, vm, image, root_size=6 * MIB), 403, "vm/quota_exceeded")
    assert error["data"] == {"quota": "max_storage", "limit": 5 * MIB, "usage": 3 * MIB,
                             "requested": 3 * MIB}  # fmt: skip
    assert (volumes(driver, node), root_of(api, vm)) == before
    assert rebuild(customer, vm, image, root_size=5 * MIB).status_code == 200  # 2 MiB more fit


#: (method, calls of it let through, the step named, the VM running before)
STEPS = [
    *[(method, 0, step, running) for running in (True, False) for method, step in (
        ("create_overlay", "creating the root disk"),
        ("destroy", "stopping the domain"),
        ("define", "defining the domain"),
        ("start", "starting the domain"),
    )],
    ("shutdown", 0, "stopping the domain", True),
    # the state is read before anything, and once by the shutdown's wait (the test
    # driver is off at once); a shut-off domain is not waited for
    ("domain", 2, "reading the domain's state", True),
    ("domain", 1, "reading the domain's state", False),
]  # fmt: skip


@pytest.mark.parametrize(("method", "skip", "step", "running"), STEPS)
def test_each_step_s_failure_leaves_the_vm_as_it_was(app, api, booted, image, faults, method,
                                                     skip, step, running):  # fmt: skip
    vm, node = booted["vm"], booted["node"]
    if not running:
        assert api.update(f"vm/{vm['id']}", json={"vm_state": {"id": 4}}).status_code == 200
    before = {
        "volumes": volumes(faults, node),
        "disks": disks(faults, node, vm),
        "root": root_of(api, vm),
        "vm": row(app, Vm, vm["id"], "image_id", "seed_volume"),
    }
    faults.fail(method, skip=skip)
    error = assert_error(rebuild(api, vm, image, root_size=8 * MIB), 502, "vm/hypervisor_error")
    assert error["data"]["step"] == step
    assert {
        "volumes": volumes(faults, node),
        "disks": disks(faults, node, vm),
        "root": root_of(api, vm),
        "vm": row(app, Vm, vm["id"], "image_id", "seed_volume"),
    } == before
    assert state(faults, node, vm) == ("running" if running else "shutoff")
    assert ledger(app) == []
    answer = api.get(f"vm/{vm['id']}").json["data"]
    assert answer["image"] == {"id": image["id"]}


def test_an_undo_that_fails_leaves_a_listed_leftover_reconcile_removes(app, api, runner, booted,
                                                                        image, faults):  # fmt: skip
    vm, node = booted["vm"], booted["node"]
    before = volumes(faults, node)
    faults.fail("start")
    faults.fail("delete_volume")  # the undo's deletion of the new root disk
    assert_error(rebuild(api, vm, image), 502, "vm/hypervisor_error")
    [(name, reason)] = ledger(app)
    assert name.startswith(f"{root_volume(app, vm)}-r")
    assert reason.startswith("undo step failed: deleting the new root disk")
    assert name in volumes(faults, node)
    assert disks(faults, node, vm)["vda"].endswith(f"/{root_volume(app, vm)}")  # the old one
    result = runner.invoke(args=["vmapi", "reconcile", "--fix"])
    assert "leftover" in result.output and "volume deleted" in result.output, result.output
    assert volumes(faults, node) == before and ledger(app) == []


def test_the_old_disk_that_cannot_go_is_listed_and_named(app, api, runner, booted, image, faults):
    vm, node = booted["vm"], booted["node"]
    old = root_volume(app, vm)
    faults.fail("delete_volume")  # the old root disk, after the rebuild was recorded
    answer = rebuild(api, vm, image)
    assert answer.status_code == 200, answer.json
    assert "replaced root disk" in answer.json["message"]
    assert ledger(app) == [(old, f"replaced by the rebuild of vm-{vm['id']}")]
    assert old in volumes(faults, node)
    result = runner.invoke(args=["vmapi", "reconcile", "--fix"])
    assert "volume deleted" in result.output, result.output
    assert old not in volumes(faults, node) and ledger(app) == []


def root_volume(app, vm):
    with app.app_context():
        found = db.session.scalar(
            sa.text("SELECT volume_name FROM storage WHERE vm_id = :vm AND boot"), {"vm": vm["id"]}
        )
        db.session.remove()
    return found


def interrupt(app, vm_id, image_id, size):
    """What a worker that dies after starting the domain on its new disks leaves: every
    step of the rebuild but the record (the real steps, their undo dropped)."""
    with app.app_context():
        vm = VmRows().get(vm_id, Principal(0, "test", "admin"))
        plan = rebuilding.plan_rebuild(vm, image_id, size)
        dropped = Undo()
        rebuilding.reserve(plan, dropped)
        with rebuilding.held_copy(plan.source, plan.host, plan.pool, "/" + POOL) as held:
            rebuilding.make_volumes(plan, held, dropped)
            rebuilding.swap_domain(plan, dropped)
        new = plan.new_volume
        db.session.remove()
    return new


def test_reconcile_undoes_an_interrupted_rebuild(app, api, runner, booted, image, driver, backend):
    vm, node = booted["vm"], booted["node"]
    old = root_volume(app, vm)
    before = {"volumes": volumes(driver, node), "root": root_of(api, vm)}
    new = interrupt(app, vm["id"], image["id"], 8 * MIB)
    assert disks(driver, node, vm, flags=0)["vda"].endswith(f"/{new}")  # it runs on it
    assert root_of(api, vm)["size"] == 8 * MIB  # counted before it was made
    if backend == "postgresql":  # a rebuild still running (it holds the lock) is no finding
        with app.app_context(), vm_locks([vm["id"]]):
            result = runner.invoke(args=["vmapi", "reconcile", "--fix"])
            db.session.remove()
        assert "interrupted_rebuild" not in result.output, result.output
    result = runner.invoke(args=["vmapi", "reconcile"])
    assert "interrupted_rebuild" in result.output and new in result.output, result.output
    assert "unowned_volume" not in result.output
    result = runner.invoke(args=["vmapi", "reconcile", "--fix"])
    assert "restarted on its old root disk" in result.output, result.output
    assert volumes(driver, node) == before["volumes"] and ledger(app) == []
    assert disks(driver, node, vm)["vda"].endswith(f"/{old}")
    assert disks(driver, node, vm, flags=0)["vda"].endswith(f"/{old}")
    assert state(driver, node, vm) == "running"
    assert root_of(api, vm) == before["root"]
    assert runner.invoke(args=["vmapi", "reconcile"]).output.startswith("0 finding(s)")
