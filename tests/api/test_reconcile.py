"""flask vmapi reconcile: drift between libvirt and the database is found, and fixed safely."""

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from tests.conftest import GIB, vm_body
from vmapi.extensions import db
from vmapi.hypervisor import DomainNotFound, DomainSpec
from vmapi.models import Node, Vm

pytestmark = pytest.mark.embedded


def reconcile(runner, fix=False):
    result = runner.invoke(args=["vmapi", "reconcile", *(["--fix"] if fix else [])])
    return result.exit_code, result.output


def spec(name, vm_id, installation="vmapi", uuid="4d7c3c2e-6a3b-4b8f-9f0e-1d2c3b4a5968"):
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
    driver.destroy(node["libvirt_uri"], vm["name"])
    driver.undefine(node["libvirt_uri"], vm["name"])
    code, output = reconcile(runner)
    assert code == 1
    assert "missing_domain" in output and vm["name"] in output
    code, output = reconcile(runner, fix=True)
    assert code == 0 and "fixed" in output
    assert api.get(f"vm/{vm['id']}").json["data"]["vm_state"] == {"id": 6}  # error
    assert reconcile(runner)[0] == 1  # still reported (nothing to run), but no longer fixable


def test_state_drift(api, runner, vm_host, test_method, driver):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    driver.suspend(node["libvirt_uri"], vm["name"])
    code, output = reconcile(runner)
    assert code == 1 and "state_drift" in output and "stored running, libvirt paused" in output
    assert reconcile(runner, fix=True)[0] == 0
    assert api.get(f"vm/{vm['id']}").json["data"]["vm_state"] == {"id": 3}
    assert reconcile(runner) == (0, "0 finding(s), 0 fixed, 0 left\n")


def test_orphan_domain_with_our_metadata_is_removed(api, runner, vm_host, test_method, driver):
    node = vm_host()
    driver.define(node["libvirt_uri"], spec("vm-999", 999))
    driver.start(node["libvirt_uri"], "vm-999")
    code, output = reconcile(runner)
    assert code == 1 and "orphan_domain" in output and "vm-999" in output
    code, output = reconcile(runner, fix=True)
    assert code == 0
    with pytest.raises(DomainNotFound):
        driver.domain(node["libvirt_uri"], "vm-999")


def test_foreign_domains_are_never_touched(api, runner, vm_host, driver):
    node = vm_host()
    driver.define(node["libvirt_uri"], spec("vm-77", 77, installation="other-installation"))
    code, output = reconcile(runner, fix=True)
    assert code == 1 and "foreign_domain" in output and "vm-77" in output
    assert driver.domain(node["libvirt_uri"], "vm-77").name == "vm-77"


def test_stale_building_row_is_cleaned(app, api, runner, vm_host, test_method, driver):
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
        db.session.commit()
        vm_id = vm.id
    driver.define(node["libvirt_uri"], spec(f"vm-{vm_id}", vm_id))
    code, output = reconcile(runner)
    assert code == 1 and "stale_building" in output
    assert reconcile(runner, fix=True)[0] == 0
    assert api.get(f"vm/{vm_id}").status_code == 404
    data = api.get(f"node/{node['id']}").json["data"]
    assert (data["allocated_cores"], data["allocated_ram"]) == (0, 0)
    assert driver.domains(node["libvirt_uri"]) == []


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
