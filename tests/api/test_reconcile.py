"""flask vmapi reconcile: drift between libvirt and the database is found, and fixed safely;
saves that died part-way are cleaned up, those in flight left alone."""

import re
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from tests.conftest import GIB, MIB, vm_body
from vmapi.extensions import db
from vmapi.hypervisor import DomainNotFound, DomainSpec, VolumeNotFound
from vmapi.models import Image, Leftover, Node, Vm
from vmapi.models.image import SAVING
from vmapi.models.leftover import VOLUME
from vmapi.services.leftovers import note_leftover, remove_leftover
from vmapi.services.names import save_volume_name
from vmapi.services.nodes.hosts import Host

pytestmark = pytest.mark.embedded


def reconcile(runner, fix=False):
    result = runner.invoke(args=["vmapi", "reconcile", *(["--fix"] if fix else [])])
    return result.exit_code, result.output


def spec(name, vm_id, installation, uuid="4d7c3c2e-6a3b-4b8f-9f0e-1d2c3b4a5968"):
    return DomainSpec(name=name, uuid=uuid, domain_type="test", vcpus=1, max_vcpus=1,
                      memory=GIB, max_memory=GIB, vm_id=vm_id, installation=installation)  # fmt: skip


def test_clean_fleet(api, runner, vm_host, test_method):
    vm_host()
    api.post("vm", json=vm_body(test_method))
    code, output = reconcile(runner)
    assert code == 0, output
    assert "0 finding(s)" in output


def test_missing_domain(api, runner, vm_host, test_method, driver):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    driver.destroy(node["libvirt_uri"], vm["domain_name"])
    driver.undefine(node["libvirt_uri"], vm["domain_name"])
    code, output = reconcile(runner)
    assert code == 1
    assert "missing_domain" in output and vm["domain_name"] in output
    code, output = reconcile(runner, fix=True)
    assert code == 0 and "fixed" in output
    assert api.get(f"vm/{vm['id']}").json["data"]["vm_state"] == {"id": 6}  # error
    assert reconcile(runner)[0] == 1  # still reported (nothing to run), but no longer fixable


def test_state_drift(api, runner, vm_host, test_method, driver):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    driver.suspend(node["libvirt_uri"], vm["domain_name"])
    code, output = reconcile(runner)
    assert code == 1 and "state_drift" in output and "stored running, libvirt paused" in output
    assert reconcile(runner, fix=True)[0] == 0
    assert api.get(f"vm/{vm['id']}").json["data"]["vm_state"] == {"id": 3}
    assert reconcile(runner) == (0, "0 finding(s), 0 fixed, 0 left\n")


def test_orphan_domain_with_our_metadata_is_removed(api, runner, vm_host, driver, installation):
    node = vm_host()
    name = f"{installation}-vm-999"
    driver.define(node["libvirt_uri"], spec(name, 999, installation))
    driver.start(node["libvirt_uri"], name)
    code, output = reconcile(runner)
    assert code == 1 and "orphan_domain" in output and name in output
    code, output = reconcile(runner, fix=True)
    assert code == 0
    with pytest.raises(DomainNotFound):
        driver.domain(node["libvirt_uri"], name)


def test_foreign_domains_are_never_touched(api, runner, vm_host, driver, installation):
    node = vm_host()
    # named like ours (today's names, and those before names carried the installation)
    # but not carrying our metadata: reported, never touched
    ours = [f"{installation}-vm-77", "vm-78"]
    for vm_id, name in zip((77, 78), ours, strict=True):
        driver.define(node["libvirt_uri"], spec(name, vm_id, "other-install",
                                                uuid=f"4d7c3c2e-6a3b-4b8f-9f0e-1d2c3b4a59{vm_id}"))  # fmt: skip
    # another installation's domain, named its own way, is none of our business
    driver.define(node["libvirt_uri"], spec("other-install-vm-79", 79, "other-install",
                                            uuid="4d7c3c2e-6a3b-4b8f-9f0e-1d2c3b4a5979"))  # fmt: skip
    code, output = reconcile(runner, fix=True)
    assert code == 1 and output.count("foreign_domain") == 2, output
    assert all(name in output for name in ours) and "other-install-vm-79" not in output
    assert "installation other-install metadata" in output
    for name in [*ours, "other-install-vm-79"]:
        assert driver.domain(node["libvirt_uri"], name).name == name


def make_stale(app, vm_id):
    """What a worker killed between "claim + commit" and the answer leaves: ``building``."""
    with app.app_context():
        db.session.execute(
            sa.update(Vm)
            .where(Vm.id == vm_id)
            .values(vm_state_id=1, created_at=datetime.now(UTC) - timedelta(hours=1))
        )
        db.session.commit()


def test_stale_building_row_is_cleaned(
    app, api, runner, vm_host, test_method, driver, installation
):
    node = vm_host()
    # what a worker killed between "claim + commit" and "define + start" leaves behind
    with app.app_context():
        db.session.execute(
            sa.update(Node)
            .where(Node.id == node["id"])
            .values(
                allocated_cores=2,
                allocated_ram=GIB,
                free_cores=Node.free_cores - 2,
                free_ram=Node.free_ram - GIB,
            )
        )
        vm = Vm(cores=2, ram=GIB, uuid="4d7c3c2e-6a3b-4b8f-9f0e-1d2c3b4a5968", node_id=node["id"],
                virt_method_id=test_method, vm_state_id=1, created_at=datetime.now(UTC) - timedelta(hours=1))  # fmt: skip
        db.session.add(vm)
        db.session.flush()
        vm.domain_name = f"{installation}-vm-{vm.id}"
        db.session.commit()
        vm_id = vm.id
    driver.define(node["libvirt_uri"], spec(f"{installation}-vm-{vm_id}", vm_id, installation))
    code, output = reconcile(runner)
    assert code == 1 and "stale_building" in output
    assert reconcile(runner, fix=True)[0] == 0
    assert api.get(f"vm/{vm_id}").status_code == 404
    data = api.get(f"node/{node['id']}").json["data"]
    assert (data["allocated_cores"], data["allocated_ram"]) == (0, 0)
    assert driver.domains(node["libvirt_uri"]) == []


def test_stale_building_vm_goes_with_its_volumes(app, api, runner, vm_host, test_method, driver):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    storage = [
        api.post("storage", json={"size": GIB, "vm": {"id": vm["id"]}, "storage_type": {"id": 1}})
        for _ in range(2)
    ]
    assert [s.status_code for s in storage] == [201, 201]
    names = sorted(driver.volumes(node["libvirt_uri"], "vmapi"))
    assert len(names) == 2
    make_stale(app, vm["id"])
    code, output = reconcile(runner, fix=True)
    assert code == 0, output
    assert "stale_building" in output and "volumes, domain, claim and addresses removed" in output
    assert driver.volumes(node["libvirt_uri"], "vmapi") == []  # not leaked
    assert api.get("storage").json["data"] == {} and api.get("vm").json["data"] == {}
    assert driver.domains(node["libvirt_uri"]) == []
    assert api.get(f"node/{node['id']}").json["data"]["allocated_cores"] == 0


def test_unowned_volumes_in_our_pools_are_reported(
    api, runner, vm_host, test_method, driver, installation
):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    body = {"size": GIB, "vm": {"id": vm["id"]}, "storage_type": {"id": 1}}
    assert api.post("storage", json=body).status_code == 201  # makes the pool vmapi
    uri = node["libvirt_uri"]
    # a leak under our own name, and something of someone else's
    driver.create_volume(uri, "vmapi", f"{installation}-storage-99", GIB, "qcow2")
    driver.create_volume(uri, "vmapi", "someone-elses.img", GIB, "raw")
    code, output = reconcile(runner, fix=True)
    assert code == 1
    assert output.count("unowned_volume") == 2, output
    assert f"vmapi/{installation}-storage-99" in output and "vmapi/someone-elses.img" in output
    # reported, never deleted; the volume a row owns is no finding
    assert sorted(driver.volumes(uri, "vmapi")) == sorted(
        [f"{installation}-storage-1", f"{installation}-storage-99", "someone-elses.img"]
    )
    driver.delete_volume(uri, "vmapi", f"{installation}-storage-99")
    driver.delete_volume(uri, "vmapi", "someone-elses.img")
    assert reconcile(runner)[0] == 0
    with pytest.raises(VolumeNotFound):
        driver.volume(uri, "vmapi", "someone-elses.img")


def test_young_building_rows_are_left_alone(app, api, runner, vm_host, test_method):
    node = vm_host()
    with app.app_context():
        db.session.add(Vm(cores=1, ram=GIB, uuid="4d7c3c2e-6a3b-4b8f-9f0e-1d2c3b4a5968", node_id=node["id"],
                          virt_method_id=test_method, vm_state_id=1, created_at=datetime.now(UTC)))  # fmt: skip
        db.session.commit()
    assert reconcile(runner, fix=True) == (0, "0 finding(s), 0 fixed, 0 left\n")


def test_unreachable_node_is_reported(app, api, runner, make_node):
    make_node(libvirt_uri="qemu+tcp://127.0.0.1:1/system", cores=1, ram=GIB)
    code, output = reconcile(runner, fix=True)
    assert code == 1 and "unreachable" in output


def saving(app, driver, node, vm_id, age):
    """A save of vm ``vm_id`` started ``age`` ago: its ``saving`` image row, the ledger
    entry of its temporary copy and the copy itself on the node (a real volume). Its
    image id and the copy's name."""
    uri = node["libvirt_uri"]
    with app.app_context():
        image = Image(name="saved", format="qcow2", state=SAVING, kind="snapshot", size=MIB,
                      source_vm_id=vm_id, created_at=datetime.now(UTC) - age)  # fmt: skip
        db.session.add(image)
        db.session.flush()
        copy = save_volume_name(image.id)
        note_leftover(node["id"], VOLUME, copy, f"the temporary copy saving image {image.id}",
                      vm_id, "vmapi")  # fmt: skip
        db.session.commit()
        ident = image.id
        db.session.remove()
    driver.ensure_pool(uri, "vmapi", "/vmapi")
    driver.create_volume(uri, "vmapi", copy, MIB, "qcow2")
    return ident, copy


def ledger(app):
    with app.app_context():
        found = [
            (left.kind, left.pool, left.name) for left in db.session.scalars(sa.select(Leftover))
        ]
        images = [(i.id, i.state) for i in db.session.scalars(sa.select(Image))]
        db.session.remove()
    return found, images


def test_a_dead_save_is_cleaned_up(app, api, runner, vm_host, test_method, driver):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    image, copy = saving(app, driver, node, vm["id"], timedelta(hours=3))
    code, output = reconcile(runner)
    assert code == 1
    assert re.search(rf"found  stale_save +image {image} +on {node['fqdn']}: saving since ", output)
    assert f"leftover        vmapi/{copy}" in output
    assert ledger(app) == ([("volume", "vmapi", copy)], [(image, SAVING)])
    code, output = reconcile(runner, fix=True)
    assert code == 0, output
    assert f"image {image}: a save that died part-way" in output
    assert re.search(rf"fixed  leftover +vmapi/{copy} .*; volume deleted", output)
    assert copy not in driver.volumes(node["libvirt_uri"], "vmapi")
    assert ledger(app) == ([], [])
    assert reconcile(runner) == (0, "0 finding(s), 0 fixed, 0 left\n")


def test_a_save_in_flight_keeps_its_copy(app, api, runner, vm_host, test_method, driver):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    image, copy = saving(app, driver, node, vm["id"], timedelta(seconds=5))
    # neither reported nor touched: the save may still be making it
    assert reconcile(runner) == (0, "0 finding(s), 0 fixed, 0 left\n")
    assert reconcile(runner, fix=True) == (0, "0 finding(s), 0 fixed, 0 left\n")
    assert copy in driver.volumes(node["libvirt_uri"], "vmapi")
    assert ledger(app) == ([("volume", "vmapi", copy)], [(image, SAVING)])
    # nor by the ledger's own removal (a reconcile that read the ledger as the save began)
    with app.app_context():
        [left] = db.session.scalars(sa.select(Leftover)).all()
        done = remove_leftover(left, Host.of(node["id"]))
        assert done.endswith("a save still in flight; kept, and still listed")
        db.session.remove()
    assert copy in driver.volumes(node["libvirt_uri"], "vmapi")
    assert ledger(app) == ([("volume", "vmapi", copy)], [(image, SAVING)])
    # still listed, so once the save is past its time its copy goes with it
    with app.app_context():
        db.session.execute(
            sa.update(Image).values(created_at=datetime.now(UTC) - timedelta(hours=3))
        )
        db.session.commit()
        db.session.remove()
    assert reconcile(runner, fix=True)[0] == 0
    assert copy not in driver.volumes(node["libvirt_uri"], "vmapi")
    assert ledger(app) == ([], [])
