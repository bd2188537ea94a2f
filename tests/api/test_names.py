"""Names on the hypervisor (issue 12): they carry the installation's id, are stored on
their rows when made, and a name taken by something this database does not own is 409."""

import pytest
import sqlalchemy as sa

from tests.conftest import GIB, vm_body
from tests.errors import assert_error
from vmapi.app import create_app
from vmapi.extensions import db
from vmapi.hypervisor import DomainNotFound, DomainSpec, VolumeNotFound
from vmapi.models import Installation, Storage, Vm
from vmapi.services.names import installation_id

pytestmark = pytest.mark.embedded

FOREIGN_UUID = "0a1b2c3d-0000-4000-8000-000000000001"


def foreign_domain(name):
    """A domain of someone else's (another installation), with a name we are about to use."""
    return DomainSpec(name=name, uuid=FOREIGN_UUID, domain_type="test", vcpus=1, max_vcpus=1,
                      memory=GIB, max_memory=GIB, vm_id=1, installation="someone-else")  # fmt: skip


def test_domain_name_carries_the_installation_and_is_read_only(api, vm_host, test_method):
    vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    assert vm["name"] == f"vm-{vm['id']}"
    assert vm["domain_name"].endswith(f"-vm-{vm['id']}") and vm["domain_name"] != vm["name"]
    error = assert_error(
        api.post("vm", json=vm_body(test_method, domain_name="mine")), 400, "general/validation"
    )
    assert error["data"] == {"domain_name": ["Unknown field."]}
    assert_error(api.update(f"vm/{vm['id']}", json={"domain_name": "x"}), 400,
                 "general/validation")  # fmt: skip
    assert api.get(f"vm?domain_name={vm['domain_name']}").json["data"].keys() == {str(vm["id"])}


def test_stored_names_are_used_whatever_the_installation_is_now(
    app, db_url, api, vm_host, test_method, driver
):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    storage = api.post("storage", json={"size": GIB, "vm": {"id": vm["id"]},
                                        "storage_type": {"id": 1}}).json["data"]  # fmt: skip
    with app.app_context():
        volume = db.session.get(Storage, storage["id"]).volume_name
    # the same database served under another configured id (the setting changed): what
    # exists keeps its names and is still found; what is new gets the new id
    other = create_app({"DATABASE_URL": db_url, "TESTING": True, "INSTALLATION_ID": "renamed"})
    other.extensions.update({k: v for k, v in app.extensions.items() if k.startswith("vmapi.hyp")})
    client = other.test_client()
    headers = api.headers()
    answer = client.open(f"/api/v1/vm/{vm['id']}", method="UPDATE", headers=headers,
                         json={"cores": 3})  # fmt: skip
    assert answer.status_code == 200, answer.json
    assert driver.domain(node["libvirt_uri"], vm["domain_name"]).vcpus == 3
    newer = client.post("/api/v1/vm", headers=headers, json=vm_body(test_method)).json["data"]
    assert newer["domain_name"] == f"renamed-vm-{newer['id']}"
    assert driver.domain(node["libvirt_uri"], newer["domain_name"]).installation == "renamed"
    gone = client.delete(f"/api/v1/vm/{vm['id']}?cascade=storage", headers=headers)
    assert gone.status_code == 200, gone.json
    with pytest.raises(VolumeNotFound):
        driver.volume(node["libvirt_uri"], "vmapi", volume)
    with pytest.raises(DomainNotFound):
        driver.domain(node["libvirt_uri"], vm["domain_name"])
    with other.app_context():
        db.session.remove()
        db.engine.dispose()


def test_a_domain_name_taken_on_the_host_is_409(
    app, api, vm_host, test_method, driver, installation
):
    node = vm_host()
    with app.app_context():  # the id the next VM gets
        next_id = (db.session.scalar(sa.select(sa.func.max(Vm.id))) or 0) + 1
    name = f"{installation}-vm-{next_id}"
    driver.define(node["libvirt_uri"], foreign_domain(name))
    error = assert_error(api.post("vm", json=vm_body(test_method)), 409, "vm/name_taken")
    assert name in error["message"] and "flask vmapi reconcile" in error["message"]
    detail = error["data"].pop("node_detail")  # an admin's answer: the node and libvirt's text
    assert detail.startswith(f"node {node['fqdn']}: ") and FOREIGN_UUID in detail
    assert error["data"] == {"name": name, "node": {"id": node["id"]}}
    # nothing of ours is left, and the foreign domain is untouched
    assert api.get("vm").json["data"] == {}
    assert api.get(f"node/{node['id']}").json["data"]["allocated_cores"] == 0
    assert driver.domain(node["libvirt_uri"], name).uuid == FOREIGN_UUID


def test_a_volume_name_taken_in_the_pool_is_409(
    app, api, vm_host, test_method, driver, installation
):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    body = {"size": GIB, "vm": {"id": vm["id"]}, "storage_type": {"id": 1}}
    first = api.post("storage", json=body).json["data"]  # makes the pool
    taken = f"{installation}-storage-{first['id'] + 1}"
    driver.create_volume(node["libvirt_uri"], "vmapi", taken, 2 * GIB, "raw")
    error = assert_error(api.post("storage", json=body), 409, "storage/name_taken")
    assert f"vmapi/{taken}" in error["message"] and "flask vmapi reconcile" in error["message"]
    assert list(api.get("storage").json["data"]) == [str(first["id"])]
    assert driver.volume(node["libvirt_uri"], "vmapi", taken)[1] == 2 * GIB  # not ours: kept


def test_seed_makes_the_installation_id_once(app, runner):
    with app.app_context():
        db.session.execute(sa.delete(Installation))
        db.session.commit()
        app.extensions.pop("vmapi.installation_id", None)
        with pytest.raises(RuntimeError, match="flask vmapi seed"):
            installation_id()
        db.session.rollback()
    result = runner.invoke(args=["vmapi", "seed"])
    assert result.exit_code == 0 and "installation id vmapi-" in result.output, result.output
    with app.app_context():
        made = installation_id()
        assert len(made) == 14 and made.startswith("vmapi-")
    again = runner.invoke(args=["vmapi", "seed"])
    assert "nothing was missing" in again.output
    with app.app_context():
        assert db.session.scalars(sa.select(Installation.installation_id)).all() == [made]


@pytest.mark.parametrize("app_config", [{"INSTALLATION_ID": "prod-a"}])
def test_a_configured_id_wins_and_is_kept_by_the_seed(app, runner, app_config):
    with app.app_context():
        stored = db.session.scalars(sa.select(Installation.installation_id)).first()
        assert installation_id() == "prod-a"
        db.session.execute(sa.delete(Installation))
        db.session.commit()
    result = runner.invoke(args=["vmapi", "seed"])
    assert "installation id prod-a" in result.output
    with app.app_context():
        assert db.session.scalars(sa.select(Installation.installation_id)).all() == ["prod-a"]
        db.session.execute(sa.update(Installation).values(installation_id=stored))
        db.session.commit()
    result = runner.invoke(args=["vmapi", "seed"])
    assert f"the database keeps {stored}" in result.output  # told, not changed
