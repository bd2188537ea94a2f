"""Host health: probe every node's libvirt at once and record what was found.

``flask vmapi node check`` (safe to run from cron or a systemd timer, and concurrently)
asks each node for its capacity (``virNodeGetInfo``: one connection and one call, each
bounded by LIBVIRT_TIMEOUT), all nodes in parallel. A node that answers gets
``last_seen_at`` and its error cleared; one that does not gets ``last_error`` and
``unreachable_since`` (kept from the first failure), and the scheduler skips it until a
check sees it again. ``GET /node`` shows all three. A check that reaches a node also
ends the cool-off a failed request put it in (``libvirt_failed_at``): it answers again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select

from vmapi.errors import ApiError
from vmapi.extensions import db
from vmapi.hypervisor import HostInfo, HypervisorError, HypervisorUnavailable
from vmapi.models import Node
from vmapi.services.network.filters import filters_here, guarded_mode, node_mode
from vmapi.services.network.protection import differences, sync_node
from vmapi.services.nodes.domains import end_cooloff
from vmapi.services.nodes.hosts import Host, hypervisor, node_uri, on_hosts

ERROR_LENGTH = 1000


@dataclass
class Probe:
    fqdn: str
    ok: bool
    detail: str
    down_since: datetime | None
    #: the node's network filters (nodes that guard NICs): what was found or done, and
    #: whether that is a problem (no filter driver, filters that differ)
    filters: str | None = None
    filters_ok: bool = True


def check_nodes(workers: int, fqdns: tuple[str, ...] = ()) -> list[Probe]:
    stmt = select(Node).order_by(Node.id)
    if fqdns:
        stmt = stmt.where(Node.fqdn.in_(fqdns))
    nodes = db.session.scalars(stmt).all()
    driver = hypervisor()

    def probe(target: tuple[str, bool]) -> tuple[HostInfo, float, bool | None]:
        uri, guards = target
        started = time.monotonic()
        info = driver.host_info(uri)
        seconds = time.monotonic() - started
        return info, seconds, driver.network_filters(uri) if guards else None

    uris, refused = {}, {}
    for n in nodes:
        try:
            uri = node_uri(n.fqdn, n.libvirt_uri)
            uris[n.id] = (uri, guarded_mode(node_mode(n)) and filters_here(uri))
        except ApiError as exc:  # a URI stored before the rules: never connected to
            refused[n.id] = f"{exc.error_id}: {exc.message}"
    results = on_hosts(uris, probe, workers)
    now = datetime.now(UTC)
    probes = []
    wanted: list[tuple[Probe, Node, str]] = []
    for node in nodes:
        result = results.get(node.id)
        if node.id in refused or isinstance(result, HypervisorError):
            # what admins read: the reason class of a failed connection, never libvirt's
            # text (it can quote a file libvirt read)
            if node.id in refused:
                reason = refused[node.id]
            elif isinstance(result, HypervisorUnavailable):
                reason = result.reason_class or "unreachable"
            else:
                reason = result.reason
            node.last_error = reason[:ERROR_LENGTH]
            node.unreachable_since = node.unreachable_since or now
            probes.append(Probe(node.fqdn, False, reason, node.unreachable_since))
        else:
            info, seconds, filters = result
            node.last_seen_at = now
            node.last_error = None
            node.unreachable_since = None
            end_cooloff(node)  # the row was read before the probe: only older failures
            detail = f"{info.cores} CPUs, {info.ram // 1024**2} MiB, {seconds * 1000:.0f} ms"
            probes.append(Probe(node.fqdn, True, detail, None))
            if filters is not None:
                node.network_filters = filters
                wanted.append((probes[-1], node, uris[node.id][0]))
    db.session.commit()
    for probe_, node, uri in wanted:  # the filters, in this thread (they read the rows)
        probe_.filters, probe_.filters_ok = check_filters(Host(node, uri))
    return probes


def check_filters(host: Host) -> tuple[str, bool]:
    """The node's network filters against the database: brought in line when a change
    could not reach it (``filters_pending``), otherwise compared; what was found, and
    whether all is well."""
    node = host.node
    if not node.network_filters:
        return ("its libvirt has no network filter driver (nwfilter): it takes no new VMs "
                "in bridge or ethernet mode", False)  # fmt: skip
    try:
        if node.filters_pending:
            defined, removed = sync_node(host)
            node.filters_pending = False
            db.session.commit()
            return (f"network filters brought in line ({len(defined)} defined, "
                    f"{len(removed)} removed)", True)  # fmt: skip
        stale, extra = differences(host)
    except HypervisorError as exc:
        db.session.rollback()
        return f"network filters could not be checked: {exc.reason}", False
    if stale or extra:
        return (f"network filters differ from the database: missing or different {stale}, "
                f"unused {extra}; `flask vmapi reconcile --fix` repairs them", False)  # fmt: skip
    return "network filters as the database has them", True
