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
from vmapi.services.nodes.domains import end_cooloff
from vmapi.services.nodes.hosts import hypervisor, node_uri, on_hosts

ERROR_LENGTH = 1000


@dataclass
class Probe:
    fqdn: str
    ok: bool
    detail: str
    down_since: datetime | None


def check_nodes(workers: int, fqdns: tuple[str, ...] = ()) -> list[Probe]:
    stmt = select(Node).order_by(Node.id)
    if fqdns:
        stmt = stmt.where(Node.fqdn.in_(fqdns))
    nodes = db.session.scalars(stmt).all()
    driver = hypervisor()

    def probe(uri: str) -> tuple[HostInfo, float]:
        started = time.monotonic()
        return driver.host_info(uri), time.monotonic() - started

    uris, refused = {}, {}
    for n in nodes:
        try:
            uris[n.id] = node_uri(n.fqdn, n.libvirt_uri)
        except ApiError as exc:  # a URI stored before the rules: never connected to
            refused[n.id] = f"{exc.error_id}: {exc.message}"
    results = on_hosts(uris, probe, workers)
    now = datetime.now(UTC)
    probes = []
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
            info, seconds = result
            node.last_seen_at = now
            node.last_error = None
            node.unreachable_since = None
            end_cooloff(node)  # the row was read before the probe: only older failures
            detail = f"{info.cores} CPUs, {info.ram // 1024**2} MiB, {seconds * 1000:.0f} ms"
            probes.append(Probe(node.fqdn, True, detail, None))
    db.session.commit()
    return probes
