"""Security groups and their rules (API.md "Network protection"): the resources, who owns
what, the rules' checks, quotas, deleting a group in use, the audit trail, and the
interface's and POST /vm's new fields."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from tests.conftest import vm_body
from tests.errors import assert_error
from vmapi.errors import NotFound
from vmapi.extensions import db
from vmapi.models import InterfaceSecurityGroup
from vmapi.schemas.vm import VmSchema
from vmapi.services.network.security_groups import usable_groups

SSH = {"direction": "ingress", "ethertype": "ipv4", "protocol": "tcp", "port_min": 22}


def made(response) -> dict:
    assert response.status_code == 201, response.json
    return response.json["data"]


def group(api, name="web", **fields) -> dict:
    return made(api.post("security_group", json={"name": name, **fields}))


def rule(api, group_id: int, **fields) -> dict:
    body = {**SSH, "security_group": {"id": group_id}, **fields}
    return made(api.post("security_group_rule", json=body))


def events(api, **filters) -> list[dict]:
    query = "&".join(f"{k}={v}" for k, v in filters.items())
    response = api.get(f"event?limit=1000&{query}")
    assert response.status_code == 200, response.json
    return list(response.json["data"].values())


# ---------------------------------------------------------------------- the resources


@pytest.mark.embedded
def test_a_customer_makes_changes_and_deletes_its_group_and_rules(customer_api):
    seven = customer_api(7)
    web = group(seven, description="web servers")
    assert web == {"id": web["id"], "name": "web", "description": "web servers",
                   "customer_id": 7}  # fmt: skip
    ssh = rule(seven, web["id"])
    assert ssh == {"id": ssh["id"], "security_group": {"id": web["id"]}, "direction": "ingress",
                   "ethertype": "ipv4", "protocol": "tcp", "port_min": 22, "port_max": 22,
                   "remote_cidr": None}  # fmt: skip
    assert seven.get(f"security_group/{web['id']}").json["data"] == web
    assert seven.get(f"security_group_rule/{ssh['id']}").json["data"] == ssh
    assert list(seven.get("security_group").json["data"]) == [str(web["id"])]
    assert list(seven.get(f"security_group_rule?security_group.id={web['id']}").json["data"]) == [
        str(ssh["id"])
    ]
    nested = seven.get(f"security_group_rule/{ssh['id']}?nest=security_group").json["data"]
    assert nested["security_group"] == web

    changed = seven.update(f"security_group/{web['id']}", json={"name": "www", "description": None})
    assert changed.status_code == 200, changed.json
    assert changed.json["data"] == {**web, "name": "www", "description": None}
    wider = seven.patch(f"security_group_rule/{ssh['id']}", json={"port_max": 23})
    assert wider.status_code == 200, wider.json
    assert (wider.json["data"]["port_min"], wider.json["data"]["port_max"]) == (22, 23)

    deleted = seven.delete(f"security_group_rule/{ssh['id']}")
    assert deleted.status_code == 200 and deleted.json["data"]["port_max"] == 23
    assert_error(
        seven.get(f"security_group_rule/{ssh['id']}"), 404, "security_group_rule/not_found"
    )
    assert seven.delete(f"security_group/{web['id']}").json["data"]["name"] == "www"
    assert_error(seven.get(f"security_group/{web['id']}"), 404, "security_group/not_found")


@pytest.mark.embedded
def test_deleting_a_group_deletes_its_rules(api, customer_api):
    seven = customer_api(7)
    web = group(seven)
    rules = [rule(seven, web["id"]), rule(seven, web["id"], port_min=80)]
    other = rule(seven, group(seven, "db")["id"])
    assert seven.delete("security_group", json=[{"id": web["id"]}]).status_code == 200
    for gone in rules:
        assert_error(
            api.get(f"security_group_rule/{gone['id']}"), 404, "security_group_rule/not_found"
        )
    assert list(api.get("security_group_rule").json["data"]) == [str(other["id"])]


@pytest.mark.embedded
def test_a_customer_may_not_make_groups_for_another(api, customer_api):
    seven = customer_api(7)
    assert_error(
        seven.post("security_group", json={"name": "x", "customer_id": 8}),
        403,
        "general/authorization/forbidden",
    )
    assert group(seven, "x", customer_id=None)["customer_id"] == 7
    assert group(seven, "y", customer_id=7)["customer_id"] == 7
    assert group(api, "theirs", customer_id=8)["customer_id"] == 8  # admins: anyone's


@pytest.mark.embedded
def test_another_customer_s_groups_and_rules_are_absent(customer_api):
    seven, eight = customer_api(7), customer_api(8)
    web = group(seven)
    ssh = rule(seven, web["id"])
    mine = group(eight)
    for resource, ident in (("security_group", web["id"]), ("security_group_rule", ssh["id"])):
        for path in (f"{resource}/{ident}", f"{resource}/999999"):  # alike: as if absent
            assert_error(eight.get(path), 404, f"{resource}/not_found")
            assert_error(eight.patch(path, json={}), 404, f"{resource}/not_found")
            assert_error(eight.delete(path), 404, f"{resource}/not_found")
        assert eight.get(f"{resource}?id={ident}").json["data"] == {}
    assert list(eight.get("security_group").json["data"]) == [str(mine["id"])]
    assert eight.get("security_group_rule").json["data"] == {}
    # a rule in another's group: the group is as absent as one that does not exist
    body = {**SSH, "security_group": {"id": web["id"]}}
    error = assert_error(eight.post("security_group_rule", json=body), 400, "general/validation")
    assert error["data"] == {"security_group": [f"No security_group with id {web['id']}."]}
    assert seven.get(f"security_group_rule/{ssh['id']}").json["data"] == ssh  # untouched


@pytest.mark.embedded
def test_admin_groups_are_read_and_used_by_every_customer_changed_by_admins(api, customer_api):
    shared = group(api, "base")
    assert shared["customer_id"] is None
    icmp = rule(api, shared["id"], protocol="icmp", port_min=None)
    seven = customer_api(7)
    assert seven.get(f"security_group/{shared['id']}").json["data"] == shared
    assert seven.get(f"security_group_rule/{icmp['id']}").json["data"] == icmp
    assert str(shared["id"]) in seven.get("security_group").json["data"]
    forbidden = "general/authorization/forbidden"
    assert_error(seven.patch(f"security_group/{shared['id']}", json={"name": "x"}), 403, forbidden)
    assert_error(seven.delete(f"security_group/{shared['id']}"), 403, forbidden)
    body = {**SSH, "security_group": {"id": shared["id"]}}
    assert_error(seven.post("security_group_rule", json=body), 403, forbidden)
    assert_error(seven.patch(f"security_group_rule/{icmp['id']}", json={"ethertype": "ipv4"}),
                 403, forbidden)  # fmt: skip
    assert_error(seven.delete(f"security_group_rule/{icmp['id']}"), 403, forbidden)
    assert api.get(f"security_group/{shared['id']}").json["data"] == shared
    assert api.get(f"security_group_rule/{icmp['id']}").json["data"] == icmp
    # an admin changes them, and a customer's groups too
    theirs = group(seven, "own")
    assert api.patch(f"security_group/{theirs['id']}", json={"name": "own2"}).status_code == 200
    assert rule(api, theirs["id"])["security_group"] == {"id": theirs["id"]}


@pytest.mark.embedded
def test_names_are_unique_per_owner(api, customer_api):
    seven, eight = customer_api(7), customer_api(8)
    web = group(seven)
    error = assert_error(seven.post("security_group", json={"name": "web"}), 409,
                         "security_group/duplicate")  # fmt: skip
    assert error["data"] == {"id": web["id"], "fields": ["customer_id", "name"]}
    assert group(eight)["name"] == "web"  # another owner's name
    shared = group(api)  # and the admins'
    error = assert_error(api.post("security_group", json={"name": "web"}), 409,
                         "security_group/duplicate")  # fmt: skip
    assert error["data"] == {"id": shared["id"], "fields": ["customer_id", "name"]}
    db_group = group(seven, "db")
    assert_error(seven.patch(f"security_group/{db_group['id']}", json={"name": "web"}), 409,
                 "security_group/duplicate")  # fmt: skip
    other_admin = group(api, "other")
    assert_error(api.patch(f"security_group/{other_admin['id']}", json={"name": "web"}), 409,
                 "security_group/duplicate")  # fmt: skip
    for bad in ("", None, "x" * 256):
        assert_error(seven.post("security_group", json={"name": bad}), 400, "general/validation")
    assert_error(seven.post("security_group", json={}), 400, "general/validation")


@pytest.mark.embedded
def test_owners_and_groups_of_rules_do_not_change(api, customer_api):
    web = group(api, "web", customer_id=7)
    error = assert_error(api.patch(f"security_group/{web['id']}", json={"customer_id": 8}), 400,
                         "general/validation")  # fmt: skip
    assert list(error["data"]) == ["customer_id"]
    ssh = rule(api, web["id"])
    other = group(api, "db", customer_id=7)
    error = assert_error(
        api.patch(f"security_group_rule/{ssh['id']}", json={"security_group": {"id": other["id"]}}),
        400,
        "general/validation",
    )
    assert list(error["data"]) == ["security_group"]
    assert api.get(f"security_group_rule/{ssh['id']}").json["data"] == ssh


# ---------------------------------------------------------------------- a rule's checks


@pytest.mark.embedded
@pytest.mark.parametrize(
    ("fields", "stored"),
    [
        ({}, {"port_min": 22, "port_max": 22}),  # one port: port_max is port_min
        ({"port_min": 1000, "port_max": 2000}, {"port_min": 1000, "port_max": 2000}),
        ({"port_min": None}, {"port_min": None, "port_max": None}),  # every port
        ({"protocol": "udp", "port_min": 53, "port_max": 53}, {"protocol": "udp"}),
        ({"protocol": "icmp", "port_min": None}, {"protocol": "icmp", "port_max": None}),
        ({"protocol": "icmpv6", "ethertype": "ipv6", "port_min": None}, {"protocol": "icmpv6"}),
        ({"protocol": "any", "ethertype": "ipv6", "port_min": None}, {"protocol": "any"}),
        ({"direction": "egress", "remote_cidr": "10.0.0.0/8"}, {"remote_cidr": "10.0.0.0/8"}),
        ({"remote_cidr": "0.0.0.0/0"}, {"remote_cidr": "0.0.0.0/0"}),
        ({"ethertype": "ipv6", "remote_cidr": "2001:DB8:0::/32"},  # written canonically
         {"remote_cidr": "2001:db8::/32"}),
        ({"remote_cidr": "192.0.2.7/32"}, {"remote_cidr": "192.0.2.7/32"}),
    ],
)  # fmt: skip
def test_rules_that_are_stored(api, fields, stored):
    web = group(api)
    made_rule = rule(api, web["id"], **fields)
    assert {k: made_rule[k] for k in stored} == stored
    assert api.get(f"security_group_rule/{made_rule['id']}").json["data"] == made_rule


@pytest.mark.embedded
@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"port_min": 80, "port_max": 79}, {"port_max"}),
        ({"port_min": None, "port_max": 80}, {"port_min"}),
        ({"port_min": 0}, {"port_min"}),
        ({"port_min": 1, "port_max": 65536}, {"port_max"}),
        ({"protocol": "icmp"}, {"port_min", "port_max"}),  # ports: tcp and udp only
        ({"protocol": "any", "port_min": 1, "port_max": 2}, {"port_min", "port_max"}),
        ({"protocol": "icmp", "ethertype": "ipv6", "port_min": None}, {"protocol"}),
        ({"protocol": "icmpv6", "port_min": None}, {"protocol"}),
        ({"remote_cidr": "192.0.2.7/24"}, {"remote_cidr"}),  # host bits set: strict
        ({"remote_cidr": "2001:db8::/32"}, {"remote_cidr"}),  # not the rule's ethertype
        ({"ethertype": "ipv6", "remote_cidr": "10.0.0.0/8"}, {"remote_cidr"}),
        ({"remote_cidr": "192.0.2.7"}, {"remote_cidr"}),
        ({"remote_cidr": "10.0.0.0/33"}, {"remote_cidr"}),
        ({"direction": "in"}, {"direction"}),
        ({"ethertype": "IPv4"}, {"ethertype"}),
        ({"protocol": "sctp"}, {"protocol"}),
    ],
)
def test_rules_that_are_refused(api, fields, bad):
    web = group(api)
    body = {**SSH, "security_group": {"id": web["id"]}, **fields}
    error = assert_error(api.post("security_group_rule", json=body), 400, "general/validation")
    assert set(error["data"]) == bad
    assert api.get("security_group_rule").json["data"] == {}


@pytest.mark.embedded
def test_a_change_is_checked_with_the_rule_s_other_fields(api):
    ssh = rule(api, group(api)["id"], remote_cidr="192.0.2.0/24")
    path = f"security_group_rule/{ssh['id']}"
    error = assert_error(api.patch(path, json={"protocol": "icmp"}), 400, "general/validation")
    assert set(error["data"]) == {"port_min", "port_max"}
    error = assert_error(api.patch(path, json={"port_min": 23}), 400, "general/validation")
    assert set(error["data"]) == {"port_max"}  # 23..22
    error = assert_error(api.patch(path, json={"ethertype": "ipv6"}), 400, "general/validation")
    assert set(error["data"]) == {"remote_cidr"}
    assert api.get(path).json["data"] == ssh  # nothing changed
    icmp = api.patch(path, json={"protocol": "icmp", "port_min": None, "port_max": None})
    assert icmp.status_code == 200, icmp.json
    assert (icmp.json["data"]["port_min"], icmp.json["data"]["port_max"]) == (None, None)
    v6 = api.patch(path, json={"ethertype": "ipv6", "protocol": "icmpv6", "remote_cidr": None})
    assert v6.status_code == 200, v6.json
    one = api.patch(path, json={"protocol": "tcp", "port_min": 443})  # one port again
    assert (one.json["data"]["port_min"], one.json["data"]["port_max"]) == (443, 443)


# ---------------------------------------------------------------------- quotas


@pytest.mark.embedded
def test_group_and_rule_quotas(api, customer_api):
    quota = api.post("quota", json={"customer_id": 7, "max_security_groups": 2,
                                    "max_security_rules": 3})  # fmt: skip
    assert quota.status_code == 201
    assert (
        quota.json["data"]["max_security_groups"],
        quota.json["data"]["max_security_rules"],
    ) == (
        2,
        3,
    )
    seven = customer_api(7)
    web, db_group = group(seven, "web"), group(seven, "db")
    error = assert_error(seven.post("security_group", json={"name": "x"}), 403,
                         "security_group/quota_exceeded")  # fmt: skip
    assert error["data"] == {"quota": "max_security_groups", "limit": 2, "usage": 2,
                             "requested": 1}  # fmt: skip
    # the quota is the customer's, whoever makes its groups; admin groups count for nobody
    assert_error(api.post("security_group", json={"name": "x", "customer_id": 7}), 403,
                 "security_group/quota_exceeded")  # fmt: skip
    shared = group(api, "shared")
    rule(api, shared["id"])
    assert group(customer_api(8), "web")["customer_id"] == 8  # others are not limited by it

    # rules count over all the customer's groups; an array is all or nothing
    rule(seven, web["id"])
    error = assert_error(
        seven.post("security_group_rule", json=[
            {**SSH, "security_group": {"id": web["id"]}, "port_min": 80},
            {**SSH, "security_group": {"id": db_group["id"]}, "port_min": 5432},
            {**SSH, "security_group": {"id": db_group["id"]}, "port_min": 5433},
        ]),
        403,
        "security_group/quota_exceeded",
    )  # fmt: skip
    assert error["data"] == {"quota": "max_security_rules", "limit": 3, "usage": 3,
                             "requested": 1, "index": 2}  # fmt: skip
    assert len(seven.get(f"security_group_rule?security_group.id={web['id']}").json["data"]) == 1
    assert seven.get(f"security_group_rule?security_group.id={db_group['id']}").json["data"] == {}
    second, third = rule(seven, web["id"], port_min=80), rule(seven, db_group["id"], port_min=5432)
    assert_error(seven.post("security_group_rule", json={**SSH, "security_group": {"id": web["id"]}}),
                 403, "security_group/quota_exceeded")  # fmt: skip
    # room again once a rule goes
    assert seven.delete(f"security_group_rule/{third['id']}").status_code == 200
    assert rule(seven, web["id"], port_min=443)["port_min"] == 443
    assert second["port_min"] == 80


def _wait_for_lock(app, customer_id: int, insert, request) -> None:
    """Hold the customer's quota row locked in a transaction of our own, start ``request``
    in a thread, check that it waits for the lock, then ``insert`` (in our transaction) and
    commit: the request must count what we committed."""
    with app.app_context():
        engine = db.engine  # a connection of the app's pool, outside any request
    with engine.connect() as conn:
        conn.execute(
            sa.text("SELECT id FROM quota WHERE customer_id = :c FOR UPDATE"), {"c": customer_id}
        )
        worker = threading.Thread(target=request)
        worker.start()
        worker.join(1.0)
        waited = worker.is_alive()
        insert(conn)
        conn.commit()
    worker.join(30)
    assert waited, "the check did not wait for the quota row's lock"


def test_a_quota_is_checked_under_the_quota_row_s_lock(app, api, customer_api):
    """A create waits for the lock of its customer's quota row and then counts what the
    holder committed: two creates can never pass a limit together."""
    api.post("quota", json={"customer_id": 7, "max_security_groups": 1, "max_security_rules": 1})
    seven = customer_api(7)
    answers = []
    _wait_for_lock(
        app,
        7,
        lambda conn: conn.execute(
            sa.text("INSERT INTO security_group (name, customer_id) VALUES ('raced', 7)")
        ),
        lambda: answers.append(seven.post("security_group", json={"name": "late"})),
    )
    error = assert_error(answers[0], 403, "security_group/quota_exceeded")
    assert error["data"]["usage"] == 1
    raced = next(iter(seven.get("security_group").json["data"].values()))
    assert raced["name"] == "raced"
    _wait_for_lock(
        app,
        7,
        lambda conn: conn.execute(
            sa.text(
                "INSERT INTO security_group_rule (security_group_id, direction, ethertype, "
                "protocol) VALUES (:g, 'ingress', 'ipv4', 'any')"
            ),
            {"g": raced["id"]},
        ),
        lambda: answers.append(seven.post("security_group_rule", json={
            **SSH, "security_group": {"id": raced["id"]}})),
    )  # fmt: skip
    error = assert_error(answers[1], 403, "security_group/quota_exceeded")
    assert (error["data"]["quota"], error["data"]["usage"]) == ("max_security_rules", 1)


# ---------------------------------------------------------------------- interfaces


@pytest.fixture
def interface(app, customer_api, vm_host, test_method):
    """Customer 7's VM's interface, and ``use(group_id)`` giving it a group (the rows the
    interface update will write; that update is the filter work's)."""
    vm_host()
    vm = made(customer_api(7).post("vm", json=vm_body(test_method)))
    iface_id = vm["interfaces"][0]["id"]

    def use(group_id: int) -> None:
        # a Core insert: the ORM's would be recorded by the audit trail, which records a
        # row by its id (this table has none; how the interface update records it is that
        # update's to say)
        with app.app_context():
            row = {"interface_id": iface_id, "security_group_id": group_id}
            db.session.execute(sa.insert(InterfaceSecurityGroup), [row])
            db.session.commit()

    return iface_id, use


@pytest.mark.embedded
def test_a_group_an_interface_uses_cannot_be_deleted(api, customer_api, interface):
    iface_id, use = interface
    seven = customer_api(7)
    web = group(seven)
    ssh = rule(seven, web["id"])
    use(web["id"])
    error = assert_error(seven.delete(f"security_group/{web['id']}"), 409, "security_group/in_use")
    assert error["data"] == {"interface": [iface_id]}
    assert_error(api.delete("security_group", json={"id": web["id"]}), 409, "security_group/in_use")
    assert seven.get(f"security_group_rule/{ssh['id']}").json["data"] == ssh  # kept, all of it


@pytest.mark.embedded
def test_a_deleted_vm_s_interface_leaves_its_groups(api, customer_api, interface):
    iface_id, use = interface
    seven = customer_api(7)
    web = group(seven)
    ssh = rule(seven, web["id"])
    use(web["id"])
    vm_id = seven.get(f"interface/{iface_id}").json["data"]["vm"]["id"]
    deleted = seven.delete(f"vm/{vm_id}")
    assert deleted.status_code == 200, deleted.json
    assert seven.get(f"security_group/{web['id']}").json["data"] == web
    assert seven.get(f"security_group_rule/{ssh['id']}").json["data"] == ssh
    assert seven.delete(f"security_group/{web['id']}").status_code == 200  # no longer used


@pytest.mark.embedded
def test_an_interface_shows_its_groups_and_guard(api, customer_api, interface):
    iface_id, use = interface
    seven = customer_api(7)
    web, shared = group(seven), group(api, "base")
    answer = seven.get(f"interface/{iface_id}").json["data"]
    assert answer["security_groups"] == [] and answer["spoof_guard"] is True
    use(shared["id"])
    use(web["id"])
    answer = seven.get(f"interface/{iface_id}").json["data"]
    assert answer["security_groups"] == sorted([{"id": web["id"]}, {"id": shared["id"]}],
                                               key=lambda ref: ref["id"])  # fmt: skip
    listed = seven.get("interface").json["data"][str(iface_id)]
    assert listed == answer
    nested = seven.get(f"interface/{iface_id}?nest=security_groups").json["data"]
    assert sorted(g["name"] for g in nested["security_groups"]) == ["base", "web"]
    assert str(iface_id) in api.get("interface?spoof_guard=true").json["data"]
    assert api.get("interface?spoof_guard=false").json["data"] == {}


def test_usable_groups_are_the_customer_s_and_the_admins(app, api, customer_api):
    mine, shared = group(customer_api(7)), group(api, "base")
    theirs = group(customer_api(8))
    with app.app_context():
        assert usable_groups([shared["id"], mine["id"]], 7) == [shared["id"], mine["id"]]
        assert usable_groups([], 7) == []
        assert usable_groups([shared["id"]], None) == [shared["id"]]
        for ids, customer in (
            ([mine["id"], theirs["id"]], 7),
            ([999_999], 7),
            ([mine["id"]], None),
        ):
            with pytest.raises(NotFound) as refused:
                usable_groups(ids, customer)
            assert refused.value.error_id == "security_group/not_found"
            assert refused.value.data == {"security_group": {"id": ids[-1]}}


# ---------------------------------------------------------------------- POST /vm


def test_post_vm_takes_the_first_interface_s_groups_as_ids():
    body = {"cores": 1, "ram": 2**30, "virt_method": {"id": 1}}
    loaded = VmSchema().load({**body, "security_groups": [{"id": 3}, {"id": 5}]})
    assert loaded["security_groups"] == [3, 5]
    assert "security_groups" not in VmSchema().load(body)


@pytest.mark.embedded
def test_a_vm_s_groups_are_not_changed_through_the_vm(api, customer_api, vm_host, test_method):
    vm_host()
    seven = customer_api(7)
    vm = made(seven.post("vm", json=vm_body(test_method)))
    web = group(seven)
    error = assert_error(
        seven.patch(f"vm/{vm['id']}", json={"security_groups": [{"id": web["id"]}]}),
        400,
        "vm/immutable_field",
    )
    assert list(error["data"]) == ["security_groups"]
    assert "security_groups" not in seven.get(f"vm/{vm['id']}").json["data"]  # write-only
    assert_error(seven.get(f"vm/{vm['id']}?nest=security_groups"), 400, "general/validation")


# ---------------------------------------------------------------------- the audit trail


@pytest.mark.embedded
def test_changes_are_audited_for_the_group_s_customer(api, customer_api):
    seven, eight = customer_api(7), customer_api(8)
    web = group(api, "web", customer_id=7)  # made by an admin: still customer 7's
    ssh = rule(seven, web["id"])
    assert seven.patch(f"security_group_rule/{ssh['id']}", json={"port_max": 23}).status_code == 200
    assert seven.delete(f"security_group/{web['id']}").status_code == 200  # with its rule
    seen = [(e["resource"], e["object_id"], e["action"]) for e in events(seven)]
    assert seen == [
        ("security_group", web["id"], "create"),
        ("security_group_rule", ssh["id"], "create"),
        ("security_group_rule", ssh["id"], "update"),
        ("security_group_rule", ssh["id"], "delete"),
        ("security_group", web["id"], "delete"),
    ]
    update = events(seven, resource="security_group_rule", action="update")[0]
    assert (update["before"], update["after"]) == ({"port_max": 22}, {"port_max": 23})
    assert all(e["customer_id"] == 7 for e in events(api, resource="security_group_rule"))
    assert events(eight) == []
    # a refusal is recorded too, for the customer who was refused
    shared = group(api, "base")
    assert_error(eight.delete(f"security_group/{shared['id']}"), 403,
                 "general/authorization/forbidden")  # fmt: skip
    refused = events(eight)
    assert [(e["resource"], e["action"], e["outcome"]) for e in refused] == [
        ("security_group", "delete", "general/authorization/forbidden")
    ]
