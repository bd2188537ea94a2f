"""The hot reads of /vm without the ORM: ``GET /vm/<id>`` and a page of ``GET /vm``.

Each is one SQLAlchemy Core SELECT of the VM columns an answer shows, with its
interfaces' ids aggregated per VM, whose rows are written straight into the answer's
shape (the same dicts ``VmSchema`` dumps from a loaded ``Vm``: keys, order and types).
No ``Vm`` object is built, no identity map filled, no schema walked: under gunicorn that
was most of a read's time (docs/benchmarks-history.md, issue 17).

Scope (a customer sees only its own VMs), filters and keyset paging are the generic
service's (:mod:`vmapi.services.crud`), applied to these statements. A page without
filters is planned with sorting off (:func:`page_statement`), so that PostgreSQL walks
the primary key (or, for a customer, ``ix_vm_customer_page``) even on tables it has no
statistics for. Reads with ``nest=`` keep the ORM path. ``tests/api/test_vm_reads.py``
compares every answer here with the schema's dump of the same rows, so a field added to
``VmSchema`` and not here fails it.
"""

from __future__ import annotations

from functools import cache
from operator import itemgetter
from typing import Any

from sqlalchemy import (
    ARRAY,
    Integer,
    Select,
    String,
    and_,
    any_,
    bindparam,
    cast,
    func,
    literal_column,
    select,
    text,
)

from vmapi.auth import Principal
from vmapi.extensions import db
from vmapi.guest_inputs import ssh_key_fingerprints
from vmapi.models import Interface, Vm
from vmapi.models.vm import vm_name
from vmapi.services.crud import CrudService, ListParams

VM = Vm.__table__
INTERFACE = Interface.__table__

#: interface ids as text ("3,7"), sorted when written (SQLite has no arrays)
IDS_TEXT = func.aggregate_strings(cast(INTERFACE.c.id, String), literal_column("','"))

#: what an answer shows of a VM, in the answer's order, around its interface ids; the
#: write-only values are never read (user_data as a flag only, ssh_keys for fingerprints)
HEAD = (
    VM.c.id,
    VM.c.cores,
    VM.c.ram,
    VM.c.customer_id,
    VM.c.cputime_limit,
    VM.c.backup_keep,
    VM.c.ha,
    VM.c.ha_priority,
    VM.c.ha_local_disks,
    VM.c.uuid,
    VM.c.node_id,
    VM.c.virt_method_id,
    VM.c.vm_state_id,
    VM.c.image_id,
    VM.c.server_group_id,
    VM.c.domain_name,
)
TAIL = (
    VM.c.hostname,
    VM.c.ssh_keys,
    and_(VM.c.user_data.is_not(None), VM.c.user_data != "").label("user_data_set"),
)
#: one VM's interface ids, looked up by the index on interface.vm_id for each VM row
INTERFACE_IDS = select(IDS_TEXT).where(INTERFACE.c.vm_id == VM.c.id).scalar_subquery()
COLUMNS = (*HEAD, INTERFACE_IDS.label("interface_ids"), *TAIL)


def join_interfaces(page: Select) -> Select:
    """``page`` (a select of HEAD and TAIL) with its VMs' interface ids, for PostgreSQL:
    the interfaces of all the page's VMs are read in one index scan (``vm_id = ANY`` of
    the page's ids). With a subquery per VM, as COLUMNS has, the planner scanned a small
    interface table once per VM (2 ms for 100 VMs of 200); a plain join let it hash a
    large one whole. The rows come in no particular order (the caller sorts the page's
    few): an ORDER BY here would be a Sort, which a page planned with sorting off
    (:data:`SORTING_OFF`) would price at PostgreSQL's "disabled" cost, and that cost alone
    sets off JIT compilation (0.6 s)."""
    vms = page.cte("page")
    page_ids = select(func.array_agg(vms.c.id)).scalar_subquery()  # an array, not a set
    ids = (
        select(INTERFACE.c.vm_id, IDS_TEXT.label("ids"))
        .where(INTERFACE.c.vm_id == any_(cast(page_ids, ARRAY(Integer))))
        .group_by(INTERFACE.c.vm_id)
        .subquery("ids")
    )
    columns = [vms.c[c.name] for c in HEAD] + [ids.c.ids] + [vms.c[c.name] for c in TAIL]
    return select(*columns).select_from(vms.outerjoin(ids, ids.c.vm_id == vms.c.id))


def _ref(ident: int | None) -> dict[str, int] | None:
    return None if ident is None else {"id": ident}


def _answer(row: Any) -> dict[str, Any]:
    """One VM as ``VmSchema`` dumps it (the order of keys is the schema's)."""
    (ident, cores, ram, customer_id, cputime_limit, backup_keep, ha, ha_priority,
     ha_local_disks, uuid, node_id, virt_method_id, vm_state_id, image_id, server_group_id,
     domain_name, interface_ids, hostname, ssh_keys, user_data_set) = row  # fmt: skip
    if interface_ids:  # ordered by id, as the relationship is
        interfaces = [{"id": i} for i in sorted(map(int, interface_ids.split(",")))]
    else:
        interfaces = []
    return {
        "id": ident,
        "cores": cores,
        "ram": ram,
        "customer_id": customer_id,
        "cputime_limit": cputime_limit,
        "backup_keep": backup_keep,
        "ha": ha,
        "ha_priority": ha_priority,
        "ha_local_disks": ha_local_disks,
        "uuid": uuid,
        "node": _ref(node_id),
        "virt_method": _ref(virt_method_id),
        "vm_state": _ref(vm_state_id),
        "image": _ref(image_id),
        "server_group": _ref(server_group_id),
        "name": vm_name(ident),
        "domain_name": domain_name,
        "interfaces": interfaces,
        "hostname": hostname,
        "ssh_key_fingerprints": ssh_key_fingerprints(ssh_keys) if ssh_keys else [],
        "user_data_set": bool(user_data_set),
    }


# The statements are built once, with bound parameters: building one per request and
# working out its cache key cost more than PostgreSQL took to answer it.
ONE = select(*COLUMNS).where(VM.c.id == bindparam("ident"))


def _pages(*columns: Any) -> dict[bool, Select]:
    """A page of VMs in id order, without and with a keyset position (by ``after``)."""
    page = select(*columns).order_by(VM.c.id).limit(bindparam("limit"))
    return {False: page, True: page.where(VM.c.id > bindparam("after"))}


#: by whether the interfaces are joined afterwards (PostgreSQL) or looked up per VM
PAGES = {True: _pages(*HEAD, *TAIL), False: _pages(*COLUMNS)}


@cache
def _for_customers(service: CrudService, stmt: Select) -> Select:
    """``stmt`` (one of the statements above) in the service's customer scope, the
    customer a bound parameter."""
    return service.customer_scope(stmt, bindparam("customer_id"))


@cache
def _joined(stmt: Select) -> Select:
    """:func:`join_interfaces` of one of the statements above, built once."""
    return join_interfaces(stmt)


def _scoped(
    service: CrudService, stmt: Select, principal: Principal, params: dict[str, Any]
) -> tuple[Select, bool]:
    """``service.scope(stmt, principal)``, from the statements built once when it can,
    and whether it was."""
    if principal.is_admin:
        return stmt, True
    if principal.customer_id is None:  # "IS NULL", which a bound value cannot say
        return service.scope(stmt, principal), False
    params["customer_id"] = principal.customer_id
    return _for_customers(service, stmt), True


#: planner setting for a page's read, for its transaction only (the connection is rolled
#: back when returned to the pool); the scheduler sets the same (vmapi/scheduler/select.py)
SORTING_OFF = text("SET LOCAL enable_sort = off")


def _read(stmt: Select, params: dict[str, Any], sorting: bool = True) -> list[Any]:
    """The rows of one read, on a pooled connection of its own (returned, rolled back, at
    once): the ORM session's set-up and tear-down cost about as much as the statement.
    ``sorting=False``: planned with sorting off (:data:`SORTING_OFF` first)."""
    with db.engine.connect() as connection:
        if not sorting:
            connection.execute(SORTING_OFF)
        return connection.execute(stmt, params).all()


def get_vm_answer(service: CrudService, ident: int, principal: Principal) -> dict[str, Any]:
    """``GET /vm/<id>``'s data: one statement; 404 for a VM ``principal`` may not see."""
    params: dict[str, Any] = {"ident": ident}
    stmt, _built = _scoped(service, ONE, principal, params)
    rows = _read(stmt, params)
    if not rows:
        raise service.not_found(ident)
    return _answer(rows[0])


def page_statement(
    service: CrudService, principal: Principal, params: ListParams, joined: bool
) -> tuple[Select, dict[str, Any]]:
    """The page's VMs, ``limit + 1`` of them (to tell whether more follow), with the same
    filters, keyset and scope as the generic list (CrudService.list_page), and the
    statement's parameters. ``joined``: their interfaces by :func:`join_interfaces`, the
    rows then in no particular order.

    A page without filters is read with sorting off (:func:`sorting_off`): on a VM table
    PostgreSQL has no statistics for (never analyzed: 4,000 rows taken for 132) it read
    the whole table and sorted it, for the first page and for every ``after=`` page,
    instead of walking the primary key (``ix_vm_customer_page`` in a customer's scope)
    and stopping at ``limit + 1``. tests/api/test_list_plans.py EXPLAINs it."""
    values: dict[str, Any] = {"limit": params.limit + 1}
    if params.after is not None:
        values["after"] = params.after
    stmt, built = _scoped(service, PAGES[joined][params.after is not None], principal, values)
    for column, value in params.filters:  # filtered pages are built per request
        stmt = stmt.where(VM.c[column] == value)
        built = False
    if joined:
        stmt = _joined(stmt) if built else join_interfaces(stmt)
    return stmt, values


def sorting_off(params: ListParams) -> bool:
    """Whether a page is planned with sorting off: when it has no filters. A filter on
    an indexed column (``node.id``, ``vm_state.id``, ...) is served best by its index and
    a sort of the few rows it selects; with sorting off PostgreSQL would walk the whole
    primary key instead, filtering. The keyset condition and a customer's scope are
    served by the primary key and ``ix_vm_customer_page`` in id order, without a sort."""
    return not params.filters


def list_vm_answers(
    service: CrudService, principal: Principal, params: ListParams
) -> tuple[dict[str, dict[str, Any]], bool]:
    """A page of ``GET /vm`` (without ``nest``) keyed by id as the answer is, and whether
    more follow: one statement (on PostgreSQL, after :data:`SORTING_OFF` for a page
    without filters)."""
    joined = db.engine.dialect.name == "postgresql"
    stmt, values = page_statement(service, principal, params, joined)
    rows = _read(stmt, values, sorting=not (joined and sorting_off(params)))
    if joined:
        rows.sort(key=itemgetter(0))
    page = {str(row[0]): _answer(row) for row in rows[: params.limit]}
    return page, len(rows) > params.limit
