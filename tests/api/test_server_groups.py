"""/server_group and POST /vm server_group: who owns what, the checks, and each policy
placing VMs (creates, arrays, named nodes, migrations, evacuations) through the
scheduler's filters and weigher. The race between concurrent creates is
tests/concurrency/test_server_groups.py's."""

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from tests.api.test_migrate import Spy
from tests.conftest import GIB, vm_body
from tests.errors import assert_error
from vmapi.extensions import db
from vmapi.services.nodes.hosts import DRIVER_KEY
from vmapi.services.vms import create as create_module

pytestmark = pytest.mark.embedded


def group(client, policy="anti-affinity", **fields):
    response = client.post("server_group", json={"name": "web", "policy": policy, **fields})
    assert response.status_code == 201, response.json
    return response.json["data"]


def member(api, method, grp, **fields):
    body = vm_body(method, cores=1, server_group={"id": grp["id"]}, **fields)
    response = api.post("vm", json=body)
    assert response.status_code == 201, response.json
    return response.json["data"]


def node_of(vm):
    return vm["node"]["id"]


def sql(app, statement, **params):
    with app.app_context():
        db.session.execute(sa.text(statement), params)
        db.session.commit()
        db.session.remove()


# ---------------------------------------------------------------------- the resource
def test_admins_and_customers_make_and_see_groups(api, customer_api):
    seven, eight = customer_api(7), customer_api(8)
    admins = group(api)
    assert admins == {"id": admins["id"], "name": "web", "policy": "anti-affinity",
                      "customer_id": None}  # fmt: skip
    for_eight = group(api, "affinity", customer_id=8)
    own = group(seven, "soft-anti-affinity")
    assert own["customer_id"] == 7  # from the token
    assert group(seven, customer_id=7)["customer_id"] == 7
    assert_error(seven.post("server_group", json={"name": "x", "policy": "affinity",
                                                  "customer_id": 8}), 403,
                 "general/authorization/forbidden")  # fmt: skip
    listed = seven.get("server_group").json["data"]
    assert sorted(int(i) for i in listed) == sorted([own["id"], own["id"] + 1])
    for other in (admins, for_eight):  # neither another's nor the admin groups
        assert_error(seven.get(f"server_group/{other['id']}"), 404, "server_group/not_found")
        assert_error(seven.delete(f"server_group/{other['id']}"), 404, "server_group/not_found")
    assert eight.get(f"server_group/{for_eight['id']}").json["data"] == for_eight
    assert len(api.get("server_group").json["data"]) == 4
    assert list(api.get("server_group?customer_id=8").json["data"]) == [str(for_eight["id"])]
    renamed = seven.patch(f"server_group/{own['id']}", json={"name": "db"}).json["data"]
    assert renamed["name"] == "db"
    error = assert_error(seven.patch(f"server_group/{own['id']}", json={"customer_id": 8}), 403,
                         "general/authorization/forbidden")  # fmt: skip
    assert "another customer" in error["message"]
    events = seven.get("event?resource=server_group").json["data"].values()
    assert {(e["action"], e["object_id"]) for e in events} >= {("create", own["id"]),
                                                                ("update", own["id"])}  # fmt: skip


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x"}, "policy"),
        ({"name": "x", "policy": "spread"}, "policy"),
        ({"policy": "affinity"}, "name"),
        ({"name": "", "policy": "affinity"}, "name"),
        ({"name": "x", "policy": "affinity", "customer_id": -1}, "customer_id"),
    ],
)
def test_bad_groups_are_refused(api, body, field):
    error = assert_error(api.post("server_group", json=body), 400, "general/validation")
    assert field in error["data"]


def test_a_vm_joins_a_group_of_its_customer(api, customer_api, vm_host, test_method):
    vm_host()
    seven = customer_api(7)
    admins, sevens, eights = group(api), group(seven), group(api, customer_id=8)
    plain = api.post("vm", json=vm_body(test_method)).json["data"]
    assert plain["server_group"] is None
    mine = member(seven, test_method, sevens)
    assert mine["server_group"] == {"id": sevens["id"]} and mine["customer_id"] == 7
    assert member(api, test_method, admins)["server_group"] == {"id": admins["id"]}
    assert member(api, test_method, eights, customer_id=8)["customer_id"] == 8
    cases = [  # (who, the VM's customer, group): the message
        (seven, None, eights, f"No server_group with id {eights['id']}."),  # not seen
        (seven, None, admins, f"No server_group with id {admins['id']}."),
        (seven, None, {"id": 999}, "No server_group with id 999."),
        (api, 7, eights, "Is customer 8's group: a VM joins a group of its own customer "
                         "(a VM without a customer, an admin group)."),
        (api, None, sevens, "Is customer 7's group: a VM joins a group of its own customer "
                            "(a VM without a customer, an admin group)."),
        (api, 7, admins, "Is an admin group: a VM joins a group of its own customer "
                         "(a VM without a customer, an admin group)."),
    ]  # fmt: skip
    for who, customer, grp, message in cases:
        body = vm_body(test_method, cores=1, server_group={"id": grp["id"]})
        if customer is not None:
            body["customer_id"] = customer
        error = assert_error(who.post("vm", json=body), 400, "general/validation")
        assert error["data"] == {"server_group": [message]}
    # the answers of every read show it, and it filters and nests
    assert api.get(f"vm/{mine['id']}").json["data"]["server_group"] == {"id": sevens["id"]}
    page = api.get(f"vm?server_group.id={sevens['id']}").json["data"]
    assert list(page) == [str(mine["id"])]
    nested = seven.get(f"vm/{mine['id']}?nest=server_group").json["data"]["server_group"]
    assert nested == seven.get(f"server_group/{sevens['id']}").json["data"]
    assert api.get("vm").json["data"][str(plain["id"])]["server_group"] is None


def test_a_vm_stays_in_its_group(api, vm_host, test_method):
    vm_host()
    grp, other = group(api, customer_id=7), group(api, customer_id=7)
    vm = member(api, test_method, grp, customer_id=7)
    for value in ({"id": other["id"]}, None):
        error = assert_error(api.update(f"vm/{vm['id']}", json={"server_group": value}), 400,
                             "vm/immutable_field")  # fmt: skip
        assert error["data"] == {"server_group": ["Cannot be changed."]}
    error = assert_error(api.update(f"vm/{vm['id']}", json={"customer_id": 8}), 400,
                         "general/validation")  # fmt: skip
    assert "cannot change customer while in a group" in error["data"]["customer_id"][0]
    assert api.get(f"vm/{vm['id']}").json["data"]["customer_id"] == 7
    plain = api.post("vm", json=vm_body(test_method, cores=1, customer_id=7)).json["data"]
    assert api.update(f"vm/{plain['id']}", json={"customer_id": 8}).status_code == 200


def test_a_group_with_vms_keeps_its_policy_and_owner_and_is_not_deleted(api, vm_host, test_method):
    vm_host()
    grp = group(api, "soft-anti-affinity", customer_id=7)
    vms = [member(api, test_method, grp, customer_id=7)["id"] for _ in range(2)]
    for change in ({"policy": "affinity"}, {"customer_id": 8},
                   {"policy": "affinity", "customer_id": 8}):  # fmt: skip
        error = assert_error(api.patch(f"server_group/{grp['id']}", json=change), 409,
                             "server_group/in_use")  # fmt: skip
        assert error["data"] == {"vm": vms}
    # the same values, and the name, change freely
    same = {"policy": "soft-anti-affinity", "customer_id": 7, "name": "renamed"}
    assert api.patch(f"server_group/{grp['id']}", json=same).json["data"]["name"] == "renamed"
    error = assert_error(api.delete(f"server_group/{grp['id']}"), 409, "server_group/in_use")
    assert error["data"] == {"vm": vms} and "still referenced by vm" in error["message"]
    for ident in vms:
        assert api.delete(f"vm/{ident}").status_code == 200
    changed = api.patch(f"server_group/{grp['id']}", json={"policy": "affinity", "customer_id": 8})
    assert changed.json["data"]["policy"] == "affinity"
    assert api.delete(f"server_group/{grp['id']}").status_code == 200
    assert_error(api.get(f"server_group/{grp['id']}"), 404, "server_group/not_found")


def test_a_group_deleted_after_the_checks_is_a_bad_reference(
    api, app, vm_host, test_method, monkeypatch
):
    """The group goes between the create's checks and its claim (a concurrent delete,
    made here by wrapping the checks): the claim finds no group to lock."""
    vm_host()
    grp = group(api)
    real = create_module.prepare_create

    def checked_then_deleted(data, principal):
        new = real(data, principal)
        db.session.execute(sa.text("DELETE FROM server_group WHERE id = :id"), {"id": grp["id"]})
        db.session.commit()
        return new

    monkeypatch.setattr(create_module, "prepare_create", checked_then_deleted)
    error = assert_error(api.post("vm", json=vm_body(test_method, server_group={"id": grp["id"]})),
                         400, "general/validation")  # fmt: skip
    assert error["data"] == {"server_group": [f"No server_group with id {grp['id']}."]}
    assert api.get("vm").json["data"] == {}
    assert api.get("node").json["data"].popitem()[1]["allocated_cores"] == 0


# ---------------------------------------------------------------------- policies
def test_anti_affinity_puts_each_member_on_its_own_node(api, app, vm_host, test_method):
    nodes = [vm_host(cores=4) for _ in range(3)]
    grp = group(api)
    vms = [member(api, test_method, grp) for _ in range(3)]
    assert sorted(node_of(vm) for vm in vms) == sorted(n["id"] for n in nodes)
    error = assert_error(api.post("vm", json=vm_body(test_method, cores=1,
                                                     server_group={"id": grp["id"]})),
                         409, "vm/no_valid_host")  # fmt: skip
    removed = error["data"]["removed_by_filter"]
    assert removed["anti-affinity"] == 3 and removed["affinity"] == 0
    assert sum(removed.values()) == error["data"]["nodes"] == 3
    assert error["data"]["request"]["server_group"] == {"id": grp["id"],
                                                        "policy": "anti-affinity"}  # fmt: skip
    # a named node that holds a member: the policy is the reason
    body = vm_body(
        test_method, cores=1, server_group={"id": grp["id"]}, node={"id": node_of(vms[0])}
    )
    error = assert_error(api.post("vm", json=body), 409, "vm/node_unsuitable")
    assert error["data"]["reasons"] == ["anti-affinity"] and "anti-affinity" in error["message"]
    # another group, and no group, are placed as ever
    assert node_of(member(api, test_method, group(api))) in {n["id"] for n in nodes}
    assert api.post("vm", json=vm_body(test_method, cores=1)).status_code == 201
    # a member being moved to a node counts there (its marker)
    free = vm_host(cores=4)
    sql(app, "UPDATE vm SET migration_node_id = :n WHERE id = :v", n=free["id"],
        v=vms[0]["id"])  # fmt: skip
    assert_error(api.post("vm", json=vm_body(test_method, cores=1,
                                             server_group={"id": grp["id"]})),
                 409, "vm/no_valid_host")  # fmt: skip


def test_affinity_puts_every_member_with_the_first(api, vm_host, test_method):
    big, small = vm_host(cores=3, ram=32 * GIB), vm_host(cores=8, ram=8 * GIB)
    grp = group(api, "affinity")
    first = member(api, test_method, grp, node={"id": small["id"]})  # any node for the first
    others = [member(api, test_method, grp) for _ in range(7)]  # spread would pick big
    assert {node_of(vm) for vm in others} == {small["id"]} == {node_of(first)}
    error = assert_error(api.post("vm", json=vm_body(test_method, cores=1,
                                                     server_group={"id": grp["id"]})),
                         409, "vm/no_valid_host")  # fmt: skip
    removed = error["data"]["removed_by_filter"]
    assert (removed["enough_cores"], removed["affinity"]) == (1, 1)  # small full, big empty
    body = vm_body(test_method, cores=1, server_group={"id": grp["id"]}, node={"id": big["id"]})
    error = assert_error(api.post("vm", json=body), 409, "vm/node_unsuitable")
    assert error["data"]["reasons"] == ["affinity"]
    # an empty group's first VM goes where the weigher says
    assert node_of(member(api, test_method, group(api, "affinity"))) == big["id"]


def test_soft_anti_affinity_prefers_nodes_with_fewer_members(api, vm_host, test_method):
    big, small = vm_host(ram=64 * GIB), vm_host(ram=8 * GIB)  # spread prefers big
    grp = group(api, "soft-anti-affinity")
    placed = [node_of(member(api, test_method, grp)) for _ in range(4)]
    assert placed == [big["id"], small["id"], big["id"], small["id"]]
    # never a refusal: with one node of room left, members share it
    api.update(f"node/{small['id']}", json={"node_state": {"id": 2}})
    assert node_of(member(api, test_method, grp)) == big["id"]
    # without the group, spread alone
    assert node_of(api.post("vm", json=vm_body(test_method, cores=1)).json["data"]) == big["id"]


def test_an_array_keeps_the_policy_among_its_own_elements(api, vm_host, test_method):
    nodes = [vm_host() for _ in range(3)]
    grp = group(api)
    body = [vm_body(test_method, cores=1, server_group={"id": grp["id"]}) for _ in range(3)]
    made = api.post("vm", json=body)
    assert made.status_code == 201, made.json
    assert sorted(node_of(vm) for vm in made.json["data"].values()) == sorted(
        n["id"] for n in nodes
    )
    again = group(api)
    body = [vm_body(test_method, cores=1, server_group={"id": again["id"]}) for _ in range(4)]
    error = assert_error(api.post("vm", json=body), 409, "vm/no_valid_host")
    assert error["data"]["index"] == 3 and error["data"]["removed_by_filter"]["anti-affinity"] == 3
    assert api.get(f"vm?server_group.id={again['id']}").json["data"] == {}  # all or nothing


# ---------------------------------------------------------------------- moves
@pytest.fixture
def spread_group(api, vm_host, test_method):
    """Nodes a, b, c; anti-affinity members on a and b."""
    a, b, c = vm_host(), vm_host(), vm_host()
    grp = group(api)
    on_a = member(api, test_method, grp, node={"id": a["id"]})
    on_b = member(api, test_method, grp, node={"id": b["id"]})
    return {"a": a, "b": b, "c": c, "group": grp, "on_a": on_a, "on_b": on_b}


def test_a_migration_goes_where_the_policy_allows(api, app, spread_group):
    a, b, c, on_a = (spread_group[k] for k in ("a", "b", "c", "on_a"))
    spy = app.extensions[DRIVER_KEY] = Spy(app.extensions[DRIVER_KEY])
    assert api.post(f"vm/{on_a['id']}/migrate").status_code == 502  # the test driver
    [(_uri, _name, dest, _asked)] = spy.asked  # c: b holds a member, a is its own
    assert dest == c["libvirt_uri"]
    error = assert_error(api.post(f"vm/{on_a['id']}/migrate", json={"node": {"id": b["id"]}}),
                         409, "vm/node_unsuitable")  # fmt: skip
    assert error["data"]["reasons"] == ["anti-affinity"]
    api.update(f"node/{c['id']}", json={"node_state": {"id": 2}})
    error = assert_error(api.post(f"vm/{on_a['id']}/migrate"), 409, "vm/no_valid_host")
    removed = error["data"]["removed_by_filter"]
    assert (removed["state_schedulable"], removed["uuid_free"], removed["anti-affinity"]) == (
        1,
        1,
        1,
    )
    assert api.get(f"vm/{on_a['id']}").json["data"]["node"] == {"id": a["id"]}


def test_a_moving_vm_is_not_counted_among_its_group(api, app, vm_host, test_method):
    a, b = vm_host(), vm_host()
    alone = member(api, test_method, group(api, "affinity"), node={"id": a["id"]})
    spy = app.extensions[DRIVER_KEY] = Spy(app.extensions[DRIVER_KEY])
    assert api.post(f"vm/{alone['id']}/migrate").status_code == 502  # the test driver
    assert [dest for _u, _n, dest, _a in spy.asked] == [b["libvirt_uri"]]
    grp = group(api, "affinity")  # two members on a: neither may leave it
    pair = [member(api, test_method, grp, node={"id": a["id"]}) for _ in range(2)]
    error = assert_error(api.post(f"vm/{pair[0]['id']}/migrate"), 409, "vm/no_valid_host")
    assert error["data"]["removed_by_filter"]["affinity"] == 1  # b; a is its own (uuid_free)


def test_an_evacuation_keeps_the_policy(api, app, runner, spread_group):
    a, b, c = spread_group["a"], spread_group["b"], spread_group["c"]
    on_a = spread_group["on_a"]
    api.update(f"node/{c['id']}", json={"node_state": {"id": 2}})  # only b is left: a member
    sql(app, "UPDATE node SET unreachable_since = :at WHERE id = :id", at=datetime.now(UTC),
        id=a["id"])  # fmt: skip
    result = runner.invoke(args=["vmapi", "node", "evacuate", a["fqdn"]])
    assert result.exit_code == 1, result.output
    assert f"NOT rebuilt  vm-{on_a['id']}: vm/no_valid_host" in result.output
    api.update(f"node/{c['id']}", json={"node_state": {"id": 1}})
    result = runner.invoke(args=["vmapi", "node", "evacuate", a["fqdn"]])
    assert result.exit_code == 0, result.output
    assert f"rebuilt      vm-{on_a['id']}: on {c['fqdn']}" in result.output
    assert api.get(f"vm/{on_a['id']}").json["data"]["node"] == {"id": c["id"]}
    assert api.get(f"node/{b['id']}").json["data"]["allocated_cores"] == 1  # its own only
