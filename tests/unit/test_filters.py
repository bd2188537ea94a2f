"""Each scheduler filter is a named SQL condition over indexed node columns (no database)."""

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from vmapi.models import Node
from vmapi.scheduler import FILTERS, Defaults, PlacementRequest
from vmapi.scheduler.filters import WEIGHERS, walks_index, weigh

REQUEST = PlacementRequest(
    cores=2, ram=1024, virt_method_id=7, uuid="4d7c3c2e-6a3b-4b8f-9f0e-1d2c3b4a5968"
)
DEFAULTS = Defaults(down_since=datetime(2026, 1, 1, tzinfo=UTC))


POSTGRES = postgresql.dialect()


def sql(condition, dialect=POSTGRES) -> str:
    stmt = select(Node.id).where(condition)
    return str(stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def test_filter_names_and_order_are_the_contract():
    # vm/no_valid_host reports removals under these names, in this order
    assert [name for name, _f in FILTERS] == [
        "state_schedulable", "has_virt_method", "libvirt_reachable", "can_guard",
        "reaches_ceph", "enough_cores", "enough_ram", "uuid_free", "anti-affinity", "affinity",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "fragments"),
    [
        (
            "state_schedulable",
            [
                "EXISTS",
                "node_state.id = node.node_state_id",
                "node_state.schedulable IS true",
                "OFFSET",
            ],
        ),
        (
            "has_virt_method",
            ["EXISTS", "virt_node.node_id = node.id", "virt_node.virt_method_id = 7"],
        ),
        (
            "libvirt_reachable",
            [
                "node.unreachable_since IS NULL",
                "node.libvirt_failed_at IS NULL",
                "node.libvirt_failed_at <",
            ],
        ),
        ("can_guard", ["node.network_filters IS NOT false", "coalesce(node.interface_mode"]),
        ("reaches_ceph", ["true"]),  # a VM without rbd volumes: every node
        ("enough_cores", ["node.free_cores >= 2"]),
        ("enough_ram", ["node.free_ram >= 1024"]),
        (
            "uuid_free",
            [
                "NOT (EXISTS",
                "vm.node_id = node.id",
                "vm.uuid = '4d7c3c2e-6a3b-4b8f-9f0e-1d2c3b4a5968'",
            ],
        ),
    ],
)
def test_each_filter_is_sql(name, fragments):
    condition = dict(FILTERS)[name](REQUEST, DEFAULTS)
    text = sql(condition)
    for fragment in fragments:
        assert fragment in text, text
    sql(condition, sqlite.dialect())  # the embedded default compiles it too


def test_ceph_filter_keeps_off_only_nodes_recorded_unable():
    request = replace(REQUEST, rbd_type_ids=(3, 5))
    text = sql(dict(FILTERS)["reaches_ceph"](request, DEFAULTS))
    for fragment in ("NOT (EXISTS", "node_storage_access.node_id = node.id",
                     "node_storage_access.storage_type_id IN (3, 5)",
                     "node_storage_access.reachable IS false", "OFFSET"):  # fmt: skip
        assert fragment in text, text


def test_uuid_filter_passes_everything_without_a_uuid():
    condition = dict(FILTERS)["uuid_free"](PlacementRequest(1, 1, 1, None), DEFAULTS)
    assert "vm" not in sql(condition).split("WHERE", 1)[1]


@pytest.mark.parametrize("policy", [None, "affinity", "soft-anti-affinity"])
def test_anti_affinity_passes_every_node_but_for_its_own_policy(policy):
    request = replace(REQUEST, server_group_id=4, policy=policy)
    assert sql(dict(FILTERS)["anti-affinity"](request, DEFAULTS)).endswith("WHERE true")


def test_anti_affinity_keeps_off_nodes_holding_or_receiving_another_member():
    request = replace(REQUEST, server_group_id=4, policy="anti-affinity", vm_id=9)
    text = sql(dict(FILTERS)["anti-affinity"](request, DEFAULTS))
    for fragment in ("NOT (EXISTS", "vm.server_group_id = 4", "vm.node_id = node.id",
                     "vm.migration_node_id = node.id", "vm.id != 9", "OFFSET"):  # fmt: skip
        assert fragment in text, text
    new = replace(request, vm_id=None)  # a VM being made: every member counts
    assert "vm.id !=" not in sql(dict(FILTERS)["anti-affinity"](new, DEFAULTS))


def test_affinity_wants_a_node_with_a_member_unless_there_is_none():
    request = replace(REQUEST, server_group_id=4, policy="affinity", vm_id=9)
    text = sql(dict(FILTERS)["affinity"](request, DEFAULTS))
    alone, here = text.split("WHERE", 1)[1].split(")) OR (", 1)
    assert "NOT (EXISTS" in alone and "vm.server_group_id = 4" in alone and "vm.id != 9" in alone
    assert "node" not in alone  # the group's emptiness: one check per query
    for fragment in ("EXISTS", "vm.node_id = node.id", "vm.migration_node_id = node.id"):
        assert fragment in here, here
    other = replace(request, policy="anti-affinity")
    assert sql(dict(FILTERS)["affinity"](other, DEFAULTS)).endswith("WHERE true")


def test_soft_anti_affinity_weighs_by_member_count_first():
    def order(request):
        stmt = select(Node.id).order_by(*weigh(request, "spread"))
        return str(stmt.compile(dialect=POSTGRES)).split("ORDER BY ")[1]

    soft = replace(REQUEST, server_group_id=4, policy="soft-anti-affinity")
    assert order(soft).startswith("(SELECT count(*) AS count_1 \nFROM vm")
    assert order(soft).endswith(") ASC, node.free_ram DESC, node.id")
    assert not walks_index(soft)
    hard = replace(soft, policy="anti-affinity")
    assert order(hard) == "node.free_ram DESC, node.id" and walks_index(hard)


def test_weighers_order_by_indexed_columns():
    def order(weigher):
        return str(select(Node.id).order_by(*WEIGHERS[weigher]()).compile()).split("ORDER BY ")[1]

    assert order("spread") == "node.free_ram DESC, node.id"
    assert order("pack") == "node.free_ram ASC, node.id"
    indexes = {i.name: [str(e) for e in i.expressions] for i in Node.__table__.indexes}
    assert indexes["ix_node_spread"] == ["node.free_ram DESC", "node.id"]
    assert indexes["ix_node_pack"] == ["node.free_ram", "node.id"]
