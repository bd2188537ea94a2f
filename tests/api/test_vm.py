"""/vm on libvirt's test driver: every verb, error id and role rule of API.md's /vm."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from tests.conftest import GIB, MIB, vm_body
from tests.errors import assert_error
from vmapi.extensions import db
from vmapi.hypervisor import DomainNotFound
from vmapi.models import Node

pytestmark = pytest.mark.embedded


def mark_failed(app, node, when):
    with app.app_context():
        db.session.execute(
            sa.update(Node).where(Node.id == node["id"]).values(libvirt_failed_at=when)
        )
        db.session.commit()


def allocation(api, node):
    data = api.get(f"node/{node['id']}").json["data"]
    return data["allocated_cores"], data["allocated_ram"]


def domain(driver, node, vm):
    return driver.domain(node["libvirt_uri"], vm["domain_name"])


# ---------------------------------------------------------------------- create


def test_seed_example_creates_a_running_vm(api, vm_host, test_method, driver, installation):
    node = vm_host()
    response = api.post("vm", json=vm_body(test_method))
    assert response.status_code == 201, response.json
    vm = response.json["data"]
    assert vm["name"] == f"vm-{vm['id']}"
    assert vm["domain_name"] == f"{installation}-vm-{vm['id']}"
    assert vm["node"] == {"id": node["id"]}
    assert vm["vm_state"] == {"id": 2}  # running
    assert uuid.UUID(vm["uuid"]).version == 4
    info = domain(driver, node, vm)
    assert (info.state, info.vcpus, info.memory, info.uuid) == ("running", 2, GIB, vm["uuid"])
    assert (info.name, info.vm_id, info.installation) == (vm["domain_name"], vm["id"], installation)
    assert allocation(api, node) == (2, GIB)


def test_given_uuid_is_kept_canonical(api, vm_host, test_method):
    vm_host()
    given = "4D7C3C2E-6A3B-4B8F-9F0E-1D2C3B4A5968"
    vm = api.post("vm", json=vm_body(test_method, uuid=given)).json["data"]
    assert vm["uuid"] == given.lower()


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("ram", 32 * MIB, "64 MiB"),
        ("ram", GIB + 512, "KiB"),
        ("ram", True, "integer"),
        ("cores", 0, None),
        ("cores", 1.0, "integer"),
        ("cputime_limit", 999, "1000"),
        ("cputime_limit", 1000001, None),
        ("uuid", "not-a-uuid", "UUID"),
        ("customer_id", -1, None),
        ("virt_method", 2, "reference"),
        ("vm_state", {"id": 2}, "UPDATE"),
    ],
)
def test_create_validation(api, vm_host, test_method, field, value, words):
    vm_host()
    error = assert_error(
        api.post("vm", json=vm_body(test_method, **{field: value})), 400, "general/validation"
    )
    assert field in error["data"]
    if words:
        assert words in str(error["data"][field])
    assert api.get("vm").json["data"] == {}


def test_unknown_virt_method(api, vm_host):
    vm_host()
    error = assert_error(api.post("vm", json=vm_body(99)), 400, "general/validation")
    assert "virt_method" in error["data"]


def test_named_node_must_exist(api, vm_host, test_method):
    vm_host()
    error = assert_error(
        api.post("vm", json=vm_body(test_method, node={"id": 99})), 404, "vm/node_not_found"
    )
    assert error["data"] == {"node": {"id": 99}}


def test_named_node_is_used(api, vm_host, test_method):
    vm_host(ram=32 * GIB)
    small = vm_host(ram=4 * GIB)
    vm = api.post("vm", json=vm_body(test_method, node={"id": small["id"]})).json["data"]
    assert vm["node"] == {"id": small["id"]}


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ({"node_state": {"id": 2}}, "state_schedulable"),  # maintenance
        ({"cores": 1}, "enough_cores"),
        ({"ram": GIB // 2}, "enough_ram"),
    ],
)
def test_named_node_unsuitable(api, vm_host, test_method, setup, reason):
    setup = dict(setup)  # shared by both backends' runs
    kwargs = {"cores": setup.pop("cores", 8), "ram": setup.pop("ram", 16 * GIB)}
    node = vm_host(**kwargs, **setup)
    error = assert_error(
        api.post("vm", json=vm_body(test_method, node={"id": node["id"]})),
        409,
        "vm/node_unsuitable",
    )
    assert reason in error["data"]["reasons"]
    assert allocation(api, node) == (0, 0)


def test_named_node_without_the_method(api, make_node, test_method):
    node = make_node(libvirt_uri="test:///default")
    error = assert_error(
        api.post("vm", json=vm_body(test_method, node={"id": node["id"]})),
        409,
        "vm/node_unsuitable",
    )
    assert error["data"]["reasons"] == ["has_virt_method"]


def test_uuid_conflict_on_named_node_and_scheduler_avoids_it(api, vm_host, test_method):
    a = vm_host(ram=32 * GIB)
    b = vm_host(ram=8 * GIB)
    same = str(uuid.uuid4())
    first = api.post("vm", json=vm_body(test_method, uuid=same)).json["data"]
    assert first["node"] == {"id": a["id"]}  # spread: most free RAM
    error = assert_error(
        api.post("vm", json=vm_body(test_method, uuid=same, node={"id": a["id"]})),
        409,
        "vm/uuid_conflict",
    )
    assert error["data"]["uuid"] == same
    second = api.post("vm", json=vm_body(test_method, uuid=same)).json["data"]
    assert second["node"] == {"id": b["id"]}  # a still has more room, but holds the UUID


def test_no_valid_host_counts_each_filter(app, api, vm_host, make_node, test_method):
    vm_host(node_state={"id": 2})  # maintenance
    make_node()  # no TEST method
    vm_host(cores=1)  # too few cores
    vm_host(ram=GIB // 2)  # too little RAM
    down = vm_host()
    mark_failed(app, down, datetime.now(UTC))
    error = assert_error(api.post("vm", json=vm_body(test_method)), 409, "vm/no_valid_host")
    assert error["data"]["nodes"] == 5
    assert error["data"]["removed_by_filter"] == {
        "state_schedulable": 1, "has_virt_method": 1, "libvirt_reachable": 1, "can_guard": 0,
        "reaches_ceph": 0, "enough_cores": 1, "enough_ram": 1, "uuid_free": 0,
        "anti-affinity": 0, "affinity": 0,
    }  # fmt: skip
    assert error["data"]["request"] == {"cores": 2, "ram": GIB, "virt_method": {"id": test_method}}


def test_cooloff_expires(app, api, vm_host, test_method):
    node = vm_host()
    mark_failed(app, node, datetime.now(UTC) - timedelta(seconds=61))  # cool-off is 60 s
    assert api.post("vm", json=vm_body(test_method)).status_code == 201


def test_spread_weigher(api, vm_host, test_method):
    small = vm_host(ram=4 * GIB)
    big = vm_host(ram=8 * GIB)
    body = vm_body(test_method, cores=1)
    placed = [api.post("vm", json=body).json["data"]["node"]["id"] for _ in range(6)]
    # most free RAM first: big until both have 4 GiB free, then the tie goes to the lower id
    assert placed == [big["id"]] * 4 + [small["id"], big["id"]]


@pytest.mark.parametrize("app_config", [{"SCHEDULER_WEIGHER": "pack"}])
def test_pack_weigher(api, vm_host, test_method, app_config):
    vm_host(ram=8 * GIB)
    small = vm_host(ram=GIB)
    placed = [
        api.post("vm", json=vm_body(test_method)).json["data"]["node"]["id"] for _ in range(2)
    ]
    assert placed[0] == small["id"]  # least free RAM that fits
    assert placed[1] == small["id"] - 1  # small is full now


def test_ties_go_to_lowest_id(api, vm_host, test_method):
    first = vm_host()
    vm_host()
    assert api.post("vm", json=vm_body(test_method)).json["data"]["node"] == {"id": first["id"]}


def test_allocation_ratios_and_reservation_from_config(api, host_uri, test_method, address_pools):
    # node fields null: CPU ratio 4.0, RAM ratio 1.0, 1 GiB reserved (the defaults)
    from tests.conftest import node_body

    node = api.post("node", json=node_body(libvirt_uri=host_uri(cores=1, ram=3 * GIB))).json["data"]
    api.post("virt_node", json={"node": {"id": node["id"]}, "virt_method": {"id": test_method}})
    ok = [api.post("vm", json=vm_body(test_method, cores=1, ram=GIB)).status_code for _ in range(3)]
    assert ok == [201, 201, 409]  # 2 GiB schedulable, 4 vCPUs
    assert allocation(api, node) == (2, 2 * GIB)


def test_array_create_is_all_or_nothing(api, vm_host, test_method, driver):
    node = vm_host(cores=4)
    body = [vm_body(test_method), vm_body(test_method), vm_body(test_method)]
    error = assert_error(api.post("vm", json=body), 409, "vm/no_valid_host")
    assert error["data"]["index"] == 2
    assert api.get("vm").json["data"] == {}
    assert allocation(api, node) == (0, 0)
    assert [d.name for d in driver.domains(node["libvirt_uri"])] == []


def test_array_create_answers_keyed(api, vm_host, test_method):
    vm_host()
    response = api.post("vm", json=[vm_body(test_method), vm_body(test_method, cores=1)])
    assert response.status_code == 201
    assert [v["cores"] for v in response.json["data"].values()] == [2, 1]


def test_array_validation_before_anything_is_made(api, vm_host, test_method, driver):
    node = vm_host()
    error = assert_error(
        api.post("vm", json=[vm_body(test_method), vm_body(test_method, ram=1)]),
        400,
        "general/validation",
    )
    assert error["data"]["index"] == 1
    assert driver.domains(node["libvirt_uri"]) == []


# ---------------------------------------------------------------------- read


def test_list_filter_nest(api, vm_host, test_method):
    node = vm_host()
    a = api.post("vm", json=vm_body(test_method, customer_id=7)).json["data"]
    api.post("vm", json=vm_body(test_method, customer_id=8))
    assert list(api.get("vm?customer_id=7").json["data"]) == [str(a["id"])]
    assert len(api.get(f"vm?node.id={node['id']}").json["data"]) == 2
    assert api.get(f"vm?uuid={a['uuid']}").json["data"].keys() == {str(a["id"])}
    nested = api.get(f"vm/{a['id']}?nest=node,virt_method,vm_state").json["data"]
    assert nested["node"]["fqdn"] == node["fqdn"]
    assert nested["virt_method"]["domain_type"] == "test"
    assert nested["vm_state"]["name"] == "running"


# ---------------------------------------------------------------------- update


def test_resize_claims_the_delta_and_changes_the_domain(api, vm_host, test_method, driver):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    response = api.update(f"vm/{vm['id']}", json={"cores": 4, "ram": 2 * GIB})
    assert response.status_code == 200, response.json
    assert (response.json["data"]["cores"], response.json["data"]["ram"]) == (4, 2 * GIB)
    assert allocation(api, node) == (4, 2 * GIB)
    info = domain(driver, node, vm)
    assert info.vcpus == 4  # live: within the defined maximum of 8
    # more memory than the running domain's maximum waits for the next start
    assert "ram" in response.json["message"] and "next start" in response.json["message"]
    shrink = api.patch(f"vm/{vm['id']}", json={"cores": 1, "ram": 512 * MIB})
    assert shrink.status_code == 200
    assert allocation(api, node) == (1, 512 * MIB)
    info = domain(driver, node, vm)
    assert (info.vcpus, info.memory) == (1, 512 * MIB)


def test_resize_beyond_the_node_changes_nothing(api, vm_host, test_method, driver):
    node = vm_host(cores=4)
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    error = assert_error(api.update(f"vm/{vm['id']}", json={"cores": 5}), 409, "vm/node_unsuitable")
    assert error["data"]["reasons"] == ["enough_cores"]
    assert api.get(f"vm/{vm['id']}").json["data"]["cores"] == 2
    assert allocation(api, node) == (2, GIB)
    assert domain(driver, node, vm).vcpus == 2


def test_cputime_limit_is_persistent_and_said_when_not_live(api, vm_host, test_method, driver):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method, cputime_limit=50000)).json["data"]
    response = api.update(f"vm/{vm['id']}", json={"cputime_limit": 20000})
    assert response.json["data"]["cputime_limit"] == 20000
    assert (
        "cputime_limit" in response.json["message"]
    )  # the test driver has no CPU bandwidth control
    conn = driver.connections.get(node["libvirt_uri"], 5)
    inactive = 2  # VIR_DOMAIN_XML_INACTIVE: the persistent definition
    xml = conn.lookupByName(vm["domain_name"]).XMLDesc(inactive)
    assert "<quota>20000</quota>" in xml and "<period>100000</period>" in xml
    api.update(f"vm/{vm['id']}", json={"cputime_limit": None})
    assert "<cputune>" not in conn.lookupByName(vm["domain_name"]).XMLDesc(inactive)


@pytest.mark.parametrize("app_config", [{"SHUTDOWN_TIMEOUT": 2.0}])
def test_state_transitions(api, vm_host, test_method, driver, app_config):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    steps = [
        (3, "paused"),
        (3, "paused"),
        (2, "running"),
        (4, "shutoff"),
        (4, "shutoff"),
        (2, "running"),
    ]
    for state_id, expected in steps:
        response = api.update(f"vm/{vm['id']}", json={"vm_state": {"id": state_id}})
        assert response.status_code == 200, response.json
        assert response.json["data"]["vm_state"] == {"id": state_id}
        assert domain(driver, node, vm).state == expected
    forced = api.update(f"vm/{vm['id']}?force=true", json={"vm_state": {"id": 4}})
    assert forced.json["data"]["vm_state"] == {"id": 4}
    assert domain(driver, node, vm).state == "shutoff"


def test_pausing_a_shut_off_vm_conflicts(api, vm_host, test_method):
    vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    api.update(f"vm/{vm['id']}?force=true", json={"vm_state": {"id": 4}})
    assert_error(
        api.update(f"vm/{vm['id']}", json={"vm_state": {"id": 3}}), 409, "vm/state_conflict"
    )


@pytest.mark.parametrize("state_id", [1, 5, 6])  # building, crashed, error
def test_states_that_cannot_be_set(api, vm_host, test_method, state_id):
    vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    error = assert_error(
        api.update(f"vm/{vm['id']}", json={"vm_state": {"id": state_id}}),
        400,
        "vm/state_not_settable",
    )
    assert error["data"]["vm_state"]["id"] == state_id


def test_label_states_cannot_be_set(api, vm_host, test_method):
    vm_host()
    label = api.post("vm_state", json={"name": "migrating"}).json["data"]
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    assert_error(
        api.update(f"vm/{vm['id']}", json={"vm_state": {"id": label["id"]}}),
        400,
        "vm/state_not_settable",
    )
    assert_error(
        api.update(f"vm/{vm['id']}", json={"vm_state": {"id": 99}}), 400, "general/validation"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("uuid", "0b0e6a52-1c9e-4c8e-9a51-6a3f0d1c2b7e"),
        ("node", {"id": 1}),
        ("virt_method", {"id": 1}),
    ],
)
def test_immutable_fields(api, vm_host, test_method, field, value):
    vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    error = assert_error(
        api.update(f"vm/{vm['id']}", json={field: value}), 400, "vm/immutable_field"
    )
    assert field in error["data"]


def test_force_option_is_validated(api, vm_host, test_method):
    vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    assert_error(api.update(f"vm/{vm['id']}?force=yes", json={}), 400, "general/validation")
    assert_error(api.update(f"vm/{vm['id']}?colour=red", json={}), 400, "general/validation")
    assert_error(api.delete(f"vm/{vm['id']}?force=true"), 400, "general/validation")


def test_array_update_is_all_or_nothing(api, vm_host, test_method, driver):
    node = vm_host(cores=6)
    a, b = api.post("vm", json=[vm_body(test_method), vm_body(test_method)]).json["data"].values()
    error = assert_error(
        api.update("vm", json=[{"id": a["id"], "cores": 3}, {"id": b["id"], "cores": 5}]),
        409,
        "vm/node_unsuitable",
    )
    assert error["data"]["index"] == 1
    assert api.get(f"vm/{a['id']}").json["data"]["cores"] == 2
    assert allocation(api, node) == (4, 2 * GIB)
    assert domain(driver, node, a).vcpus == 2


def test_reboot(api, vm_host, test_method):
    vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    response = api.post(f"vm/{vm['id']}/reboot")
    assert response.status_code == 200
    assert response.json["data"]["vm_state"] == {"id": 2}
    api.update(f"vm/{vm['id']}?force=true", json={"vm_state": {"id": 4}})
    assert_error(api.post(f"vm/{vm['id']}/reboot"), 409, "vm/state_conflict")
    assert_error(api.post("vm/999/reboot"), 404, "vm/not_found")
    assert_error(api.post(f"vm/{vm['id']}/reboot", json={"x": 1}), 400, "general/validation")


# ---------------------------------------------------------------------- delete


def test_delete_removes_domain_and_claim(api, vm_host, test_method, driver):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    response = api.delete(f"vm/{vm['id']}")
    assert response.status_code == 200
    assert response.json["data"]["vm_state"] == {"id": 2}  # as it was
    assert allocation(api, node) == (0, 0)
    with pytest.raises(DomainNotFound):
        domain(driver, node, vm)
    assert_error(api.get(f"vm/{vm['id']}"), 404, "vm/not_found")


def test_delete_when_domain_is_already_gone(api, vm_host, test_method, driver):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    driver.destroy(node["libvirt_uri"], vm["domain_name"])
    driver.undefine(node["libvirt_uri"], vm["domain_name"])
    response = api.delete(f"vm/{vm['id']}")
    assert response.status_code == 200
    assert "no domain" in response.json["message"]
    assert allocation(api, node) == (0, 0)


def test_delete_on_unreachable_host_keeps_everything(app, api, vm_host, test_method):
    node = vm_host()
    vm = api.post("vm", json=vm_body(test_method)).json["data"]
    with app.app_context():
        db.session.execute(
            sa.text("UPDATE node SET libvirt_uri = 'qemu+tcp://127.0.0.1:1/system' WHERE id = :id"),
            {"id": node["id"]},
        )
        db.session.commit()
    error = assert_error(api.delete(f"vm/{vm['id']}"), 502, "vm/hypervisor_error")
    assert error["data"]["step"].startswith("checking")
    assert api.get(f"vm/{vm['id']}").status_code == 200
    assert allocation(api, node) == (2, GIB)


def test_delete_array(api, vm_host, test_method, driver):
    node = vm_host()
    a, b = api.post("vm", json=[vm_body(test_method), vm_body(test_method)]).json["data"].values()
    assert_error(api.delete("vm", json=[{"id": a["id"]}, {"id": 999}]), 404, "vm/not_found")
    assert len(driver.domains(node["libvirt_uri"])) == 2  # nothing deleted
    response = api.delete("vm", json=[{"id": a["id"]}, {"id": b["id"]}])
    assert set(response.json["data"]) == {str(a["id"]), str(b["id"])}
    assert driver.domains(node["libvirt_uri"]) == []


# ---------------------------------------------------------------------- customers


def test_customers_see_and_change_only_their_own(api, customer_api, vm_host, test_method):
    vm_host()
    seven, eight = customer_api(7), customer_api(8)
    mine = seven.post("vm", json=vm_body(test_method))
    assert mine.status_code == 201
    mine = mine.json["data"]
    assert mine["customer_id"] == 7  # forced
    theirs = eight.post("vm", json=vm_body(test_method, customer_id=8)).json["data"]
    assert list(seven.get("vm").json["data"]) == [str(mine["id"])]
    assert_error(seven.get(f"vm/{theirs['id']}"), 404, "vm/not_found")
    assert_error(seven.update(f"vm/{theirs['id']}", json={"cores": 1}), 404, "vm/not_found")
    assert_error(seven.delete(f"vm/{theirs['id']}"), 404, "vm/not_found")
    assert_error(seven.post(f"vm/{theirs['id']}/reboot"), 404, "vm/not_found")
    assert seven.get("vm?customer_id=8").json["data"] == {}
    assert seven.update(f"vm/{mine['id']}", json={"cores": 1}).status_code == 200
    assert api.get(f"vm/{theirs['id']}").json["data"]["cores"] == 2


def test_customer_field_rules(api, customer_api, vm_host, test_method):
    node = vm_host()
    seven = customer_api(7)
    assert_error(
        seven.post("vm", json=vm_body(test_method, customer_id=8)),
        403,
        "general/authorization/forbidden",
    )
    assert_error(
        seven.post("vm", json=vm_body(test_method, node={"id": node["id"]})),
        403,
        "general/authorization/forbidden",
    )
    vm = seven.post("vm", json=vm_body(test_method, customer_id=7, node=None)).json["data"]
    assert_error(
        seven.update(f"vm/{vm['id']}", json={"customer_id": 8}),
        403,
        "general/authorization/forbidden",
    )
    assert seven.update(f"vm/{vm['id']}", json={"customer_id": 7}).status_code == 200
    assert_error(seven.get(f"vm/{vm['id']}?nest=node"), 403, "general/authorization/forbidden")
    assert seven.get(f"vm/{vm['id']}?nest=virt_method,vm_state").status_code == 200
    assert api.update(f"vm/{vm['id']}", json={"customer_id": 9}).json["data"]["customer_id"] == 9
    assert_error(seven.get(f"vm/{vm['id']}"), 404, "vm/not_found")
    assert api.get("vm").json["data"].keys() == {str(vm["id"])}


def test_refresh_capacity_after_changing_defaults(
    app, api, runner, host_uri, test_method, address_pools
):
    from tests.conftest import node_body

    node = api.post(
        "node", json=node_body(libvirt_uri=host_uri(cores=1, ram=4 * GIB), reserved_ram=0)
    ).json["data"]
    api.post("virt_node", json={"node": {"id": node["id"]}, "virt_method": {"id": test_method}})
    api.post("vm", json=vm_body(test_method, cores=1, ram=GIB))
    app.config["CPU_ALLOCATION_RATIO"] = 1.0  # was 4.0 when the node was written
    assert api.post("vm", json=vm_body(test_method, cores=1, ram=GIB)).status_code == 201
    app.config["CPU_ALLOCATION_RATIO"] = 1.0
    result = runner.invoke(args=["vmapi", "node", "refresh-capacity"])
    assert result.exit_code == 0 and "refreshed 1 node" in result.output
    assert_error(
        api.post("vm", json=vm_body(test_method, cores=1, ram=GIB)), 409, "vm/no_valid_host"
    )
    app.config["CPU_ALLOCATION_RATIO"] = 8.0
    runner.invoke(args=["vmapi", "node", "refresh-capacity"])
    assert api.post("vm", json=vm_body(test_method, cores=1, ram=GIB)).status_code == 201


def test_nest_list_references(api, customer_api, vm_host, test_method):
    """API.md (Lists): list-valued references nest too, in lists and single GETs."""
    vm_host()
    a = api.post("vm", json=vm_body(test_method, customer_id=7)).json["data"]
    api.post("vm", json=vm_body(test_method, customer_id=8))
    iface_id = a["interfaces"][0]["id"]
    iface = api.get(f"interface/{iface_id}").json["data"]
    one = api.get(f"vm/{a['id']}?nest=interfaces,node").json["data"]
    assert one["interfaces"] == [iface]
    listed = api.get("vm?nest=interfaces").json["data"]
    assert listed[str(a["id"])]["interfaces"] == [iface]
    assert all(len(vm["interfaces"]) == 1 for vm in listed.values())
    nested = api.get(f"interface/{iface_id}?nest=ipv4,ipv6").json["data"]
    assert [x["id"] for x in nested["ipv4"]] == [x["id"] for x in iface["ipv4"]]
    assert (
        nested["ipv4"][0]["address"]
        == api.get(f"ipv4/{iface['ipv4'][0]['id']}").json["data"]["address"]
    )
    assert nested["ipv6"][0]["interface"] == {"id": iface_id}
    page = api.get("interface?nest=ipv6,vm").json["data"]
    assert page[str(iface_id)]["ipv6"] == nested["ipv6"]
    # a customer nests the interfaces of its own VMs, and sees no one else's
    seven = customer_api(7).get("vm?nest=interfaces").json["data"]
    assert list(seven) == [str(a["id"])] and seven[str(a["id"])]["interfaces"] == [iface]
