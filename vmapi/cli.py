"""``flask vmapi ...`` admin commands and the ``flask shell`` context; thin wrappers."""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Callable
from typing import Any

import click
from flask import Flask
from flask.cli import AppGroup
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, OperationalError

from vmapi import models
from vmapi.api.network import ipv4, ipv6_pool
from vmapi.api.node import node, virt_node
from vmapi.auth import ADMIN, CLI_PRINCIPAL, CUSTOMER
from vmapi.cli_backup import backup_cli
from vmapi.cli_ha import ha_cli
from vmapi.cli_image import image_cli
from vmapi.errors import ApiError
from vmapi.extensions import db
from vmapi.models import Node, NodeState
from vmapi.scheduler import refresh_all
from vmapi.services.catalog_defaults import seed_defaults
from vmapi.services.consoles.sessions import purge_console_tokens
from vmapi.services.events import purge_events
from vmapi.services.ha.fencing import FenceRefused, confirm_fenced
from vmapi.services.moves.evacuation import EvacuationRefused, evacuate_one, start_evacuation
from vmapi.services.moves.migrate import drain_one, start_drain
from vmapi.services.names import installation_id, stored_installation_id
from vmapi.services.nodes.health import check_nodes
from vmapi.services.nodes.registry import capacity_defaults
from vmapi.services.reconcile import reconcile
from vmapi.services.storage.access import check_rbd_access
from vmapi.services.tokens import TokenError, create_token, list_tokens, revoke_token

#: the exit status of a command the database went away under (rerun it)
DATABASE_GONE = 3


class DatabaseGone(click.ClickException):
    exit_code = DATABASE_GONE


class VmapiGroup(AppGroup):
    """``flask vmapi``: a command that loses its database (a failover, a restart) stops
    with one clear line and exit status 3, not a traceback. Every command commits each
    of its steps on its own (a move's marker, a node's check, a reconcile fix), so what
    it did is kept and what it did not is left for the next run: run it again once the
    database answers. (``ha watch`` does not stop: it waits for the database.)"""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DBAPIError as exc:
            if not isinstance(exc, OperationalError) and not exc.connection_invalidated:
                raise
            first = str(exc.orig or exc).strip().splitlines()[0]
            raise DatabaseGone(
                f"the database did not answer ({first}); what the command finished is "
                "kept: run it again once the database answers"
            ) from exc


vmapi_cli = VmapiGroup("vmapi", help="vmapi administration.")
token_cli = AppGroup("token", help="API tokens.")
node_cli = AppGroup("node", help="Hypervisor hosts.")
event_cli = AppGroup("event", help="The audit trail.")
network_cli = AppGroup("network", help="Address ranges new VMs take their addresses from.")
console_cli = AppGroup("console", help="VM console tokens.")
vmapi_cli.add_command(token_cli)
vmapi_cli.add_command(node_cli)
vmapi_cli.add_command(event_cli)
vmapi_cli.add_command(network_cli)
vmapi_cli.add_command(console_cli)
vmapi_cli.add_command(image_cli)
vmapi_cli.add_command(backup_cli)
vmapi_cli.add_command(ha_cli)


@vmapi_cli.command("seed")
def seed_command() -> None:
    """Insert the default catalog rows that are missing (idempotent)."""
    added = seed_defaults()
    click.echo("seeded: " + (", ".join(added) if added else "nothing was missing"))
    used, stored = installation_id(), stored_installation_id()
    if used != stored:
        click.echo(
            f"installation id: {used} (VMAPI_INSTALLATION_ID); the database keeps {stored}, "
            "used when the setting is removed",
            err=True,
        )


@token_cli.command("create")
@click.option("--admin", "is_admin", is_flag=True, help="An admin token (may do everything).")
@click.option("--customer", "customer_id", type=click.IntRange(min=0), help="Customer id.")
@click.option("--name", help="A name to recognise the token by (unique).")
@click.option("--expires", "expires_days", type=click.IntRange(min=1), help="Days until expiry.")
def token_create(
    is_admin: bool, customer_id: int | None, name: str | None, expires_days: int | None
) -> None:
    """Create a token; the plain token is printed once, alone on the last line."""
    if is_admin == (customer_id is not None):
        raise click.UsageError("give exactly one of --admin or --customer ID")
    try:
        token, plain = create_token(
            ADMIN if is_admin else CUSTOMER, customer_id, name, expires_days
        )
    except TokenError as exc:
        raise click.ClickException(str(exc)) from exc
    expiry = token.expires_at.isoformat() if token.expires_at else "never"
    click.echo(f"created token {token.id} {token.name!r} role={token.role} expires={expiry}")
    click.echo("store it now; it cannot be shown again:", err=True)
    click.echo(plain)


@token_cli.command("list")
def token_list() -> None:
    """List tokens (never their values)."""
    click.echo(f"{'id':>5}  {'name':32} {'role':8} {'customer':>8}  {'expires':25} revoked")
    for t in list_tokens():
        customer = "-" if t.customer_id is None else str(t.customer_id)
        expires = t.expires_at.isoformat() if t.expires_at else "never"
        revoked = t.revoked_at.isoformat() if t.revoked_at else "no"
        click.echo(f"{t.id:>5}  {t.name:32} {t.role:8} {customer:>8}  {expires:25} {revoked}")


@token_cli.command("revoke")
@click.argument("token")
def token_revoke(token: str) -> None:
    """Revoke a token by id or name."""
    try:
        row = revoke_token(token)
    except TokenError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"revoked token {row.id} {row.name!r}")


@node_cli.command("add")
@click.option("--fqdn", required=True)
@click.option("--ipv4-addr-ext", required=True, help="e.g. 192.0.2.10/24")
@click.option("--ipv6-addr-ext", required=True, help="e.g. 2001:db8::10/64")
@click.option("--ipv4-gw-ext", required=True)
@click.option("--ipv6-gw-ext", required=True)
@click.option("--libvirt-uri", help="Default: LIBVIRT_URI_TEMPLATE with the fqdn.")
@click.option("--state", "state_name", default="running", show_default=True)
@click.option("--virt-method", "methods", multiple=True, help="Name, e.g. KVM (repeatable).")
@click.option("--location")
@click.option("--cores", type=int, help="Default: asked from the host's libvirt.")
@click.option("--ram", type=int, help="Bytes. Default: asked from the host's libvirt.")
@click.option("--interface-mode", type=click.Choice(["bridge", "ethernet", "user"]))
def node_add(state_name: str, methods: tuple[str, ...], **fields: Any) -> None:
    """Register a node (capacity read from its libvirt) and its virt methods."""

    state = db.session.scalars(select(NodeState).where(NodeState.name == state_name)).first()
    if state is None:
        raise click.ClickException(f"no node_state named {state_name!r}")
    body = {k: v for k, v in fields.items() if v is not None}
    body["node_state"] = {"id": state.id}
    try:
        data = node.load(body)
        (new,) = node.service.create_many([data], CLI_PRINCIPAL, indexed=False).objects
        for name in methods:
            vn = virt_node.load({"node": {"id": new.id}, "virt_method": {"name": name}})
            virt_node.service.create_many([vn], CLI_PRINCIPAL, indexed=False)
    except ApiError as exc:
        detail = f" {exc.data}" if exc.data else ""
        raise click.ClickException(f"{exc.error_id}: {exc.message}{detail}") from exc
    click.echo(
        f"added node {new.id} {new.fqdn}: {new.cores} cores, {new.ram} bytes RAM"
        + (f", virt methods {', '.join(methods)}" if methods else "")
    )


@node_cli.command("list")
@click.option("--quiet", is_flag=True, help="Only the fqdns.")
def node_list(quiet: bool) -> None:
    """List nodes with their capacity and allocation."""

    for n in db.session.scalars(select(Node).order_by(Node.id)):
        if quiet:
            click.echo(n.fqdn)
        else:
            click.echo(
                f"{n.id:>5}  {n.fqdn:40} cores {n.allocated_cores}/{n.cores}  "
                f"ram {n.allocated_ram}/{n.ram}  {n.libvirt_uri or '(template)'}"
            )


@node_cli.command("refresh-capacity")
def node_refresh_capacity() -> None:
    """Recompute every node's free capacity (run after changing the default ratios)."""
    click.echo(f"refreshed {refresh_all(capacity_defaults())} node(s)")


@node_cli.command("check")
@click.option("--fqdn", "fqdns", multiple=True, help="Only this node (repeatable).")
@click.option("--workers", default=32, show_default=True, help="Nodes probed at once.")
def node_check(fqdns: tuple[str, ...], workers: int) -> None:
    """Probe every node's libvirt in parallel and record the result on the node.

    A node that does not answer is marked unreachable (the scheduler skips it) until a
    check reaches it again. A node that guards NICs (bridge or ethernet mode) has its
    network filters checked: whether its libvirt has the filter driver, filters a change
    could not bring it are defined now, others compared with the database. Safe for cron
    or a systemd timer. Each node with a virt_node that answered is then checked against
    every rbd storage type: the key and the rbd pool made sure of, the pool refreshed
    from the cluster; whether it reached the cluster is recorded (the scheduler keeps VMs
    with volumes of the type off a node that did not). Exits 1 when a node is
    unreachable, its filters are not right or it cannot reach a Ceph cluster.
    """
    probes = check_nodes(workers, fqdns)
    accesses = check_rbd_access(workers, fqdns)
    for probe in probes:
        if probe.ok:
            click.echo(f"ok    {probe.fqdn}: {probe.detail}")
        else:
            since = f"{probe.down_since:%Y-%m-%d %H:%M:%S}" if probe.down_since else "?"
            click.echo(f"DOWN  {probe.fqdn} (since {since} UTC): {probe.detail}")
        if probe.filters is not None:
            click.echo(f"{'      ' if probe.filters_ok else 'FILTER'}{probe.fqdn}: {probe.filters}")
    for access in accesses:
        mark = "ceph  " if access.ok else "CEPH  "
        click.echo(f"{mark}{access.fqdn}: storage type {access.storage_type}: {access.detail}")
    down = [p for p in probes if not p.ok]
    unguarded = [p for p in probes if not p.filters_ok]
    cut_off = {a.fqdn for a in accesses if not a.ok}
    problems = f", {len(unguarded)} with network filter problems" if unguarded else ""
    if cut_off:
        problems += f", {len(cut_off)} not reaching a Ceph cluster"
    click.echo(f"{len(probes)} node(s), {len(down)} unreachable{problems}")
    if down or unguarded or cut_off:
        sys.exit(1)


@node_cli.command("drain")
@click.argument("fqdn")
@click.option("--timeout", type=click.FloatRange(min=1),
              help="Seconds each move may take (default: VMAPI_MIGRATION_TIMEOUT; the CLI "
              "is not bound by gunicorn's).")  # fmt: skip
def node_drain(fqdn: str, timeout: float | None) -> None:
    """Empty a node: it goes to maintenance (takes no new VMs), then each of its VMs moves
    to the node the scheduler picks, live if it runs. Prints what moved and what did not;
    exits 1 if anything stayed. Safe to run again after an interruption."""
    try:
        node, vm_ids = start_drain(fqdn)
    except ApiError as exc:
        raise click.ClickException(exc.message) from exc
    results = each_vm(
        f"draining {fqdn}", vm_ids, lambda vm_id: drain_one(vm_id, node.id, CLI_PRINCIPAL, timeout)
    )
    report(results, [r.moved for r in results], "moved")


@node_cli.command("evacuate")
@click.argument("fqdn")
@click.option("--accept-data-loss", is_flag=True,
              help="Also rebuild VMs with data volumes on the node, with empty ones.")  # fmt: skip
def node_evacuate(fqdn: str, accept_data_loss: bool) -> None:
    """Bring back elsewhere the VMs of a node that is down (flask vmapi node check found
    it unreachable; power it off or fence it first): it goes offline, and each VM is made
    anew on the node the scheduler picks, with its MACs, addresses and seed. VMs with
    data volumes on it are refused unless --accept-data-loss. When the node answers
    again, flask vmapi reconcile --fix removes what it still has. Exits 1 if a VM was
    not rebuilt."""
    try:
        node, vm_ids = start_evacuation(fqdn)
    except EvacuationRefused as exc:
        raise click.ClickException(str(exc)) from exc
    results = each_vm(
        f"evacuating {fqdn}", vm_ids, lambda vm_id: evacuate_one(vm_id, node.id, accept_data_loss)
    )
    report(results, [r.rebuilt for r in results], "rebuilt")


@node_cli.command("fenced")
@click.argument("fqdn")
def node_fenced(fqdn: str) -> None:
    """Confirm that a node ha watch lost (suspect, fencing, fence_failed: its fence agent
    failed, or it has none) is powered off: you did it by hand. It becomes fenced, and its
    HA VMs may be restarted elsewhere. Exits 1 for a node that is not lost."""
    try:
        before = confirm_fenced(fqdn)
    except FenceRefused as exc:
        raise click.ClickException(str(exc)) from exc
    if before == "fenced":
        click.echo(f"{fqdn} is already fenced; nothing changed")
    else:
        click.echo(f"{fqdn} is fenced (it was {before}): its HA VMs may be restarted elsewhere")


def each_vm(label: str, vm_ids: list[int], one: Callable[[int], Any]) -> list[Any]:
    """``one(vm_id)`` for each VM in turn under a progress bar naming the VM, then its
    result's line; the results in order (drain and evacuate)."""
    results: list[Any] = []
    shown: dict[int, str] = {}
    with click.progressbar(vm_ids, label=f"{label} ({len(vm_ids)} VMs)",
                           item_show_func=lambda i: shown.get(i)) as bar:  # fmt: skip
        for vm_id in bar:
            shown[vm_id] = f"vm-{vm_id}"
            results.append(one(vm_id))
            shown[vm_id] = results[-1].line()
    return results


def report(results: list[Any], done: list[bool], verb: str) -> None:
    """Each result's line and the count; exit status 1 if any VM was not ``verb``."""
    for result in results:
        click.echo(result.line())
    left = done.count(False)
    click.echo(f"{len(results) - left} {verb}, {left} not {verb}")
    if left:
        sys.exit(1)


@network_cli.command("add")
@click.argument("network")
@click.option("--gateway", required=True, help="The network's gateway, inside it.")
@click.option("--if-missing", is_flag=True,
              help="Succeed without a change when exactly this network is registered.")  # fmt: skip
def network_add(network: str, gateway: str, if_missing: bool) -> None:
    """Register NETWORK for new VMs: an IPv4 network adds every host address but the
    gateway (POST /ipv4), an IPv6 network becomes a pool (POST /ipv6_pool)."""

    try:
        version = ipaddress.ip_network(network, strict=False).version
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NETWORK") from exc
    resource = ipv4 if version == 4 else ipv6_pool
    try:
        data = resource.load({"network": network, "gateway": gateway})
        if if_missing and resource.service.registered(data):
            click.echo(f"{data['network']} is registered already; nothing to do")
            return
        made = resource.service.create_many([data], CLI_PRINCIPAL, indexed=False).objects
    except ApiError as exc:
        detail = f" {exc.data}" if exc.data else ""
        raise click.ClickException(f"{exc.error_id}: {exc.message}{detail}") from exc
    what = f"{len(made)} IPv4 addresses" if version == 4 else "an IPv6 pool"
    click.echo(f"added {data['network']} (gateway {gateway}): {what}")


@event_cli.command("purge")
@click.option("--older-than", "days", type=click.IntRange(min=1), required=True,
              help="Delete events older than this many days.")  # fmt: skip
def event_purge(days: int) -> None:
    """Apply the audit trail's retention (the shipped timer keeps 400 days)."""
    click.echo(f"deleted {purge_events(days)} event(s) older than {days} day(s)")


@console_cli.command("purge")
def console_purge() -> None:
    """Delete expired console tokens (they open nothing; the shipped timer runs this)."""
    click.echo(f"deleted {purge_console_tokens()} expired console token(s)")


@vmapi_cli.command("reconcile")
@click.option("--fix", is_flag=True, help="Repair what can be repaired safely.")
def reconcile_command(fix: bool) -> None:
    """Compare every node's libvirt domains with the database.

    Exits 1 when something was found and not fixed (or a node did not answer).
    """
    findings = reconcile(fix)
    for finding in findings:
        click.echo(finding.line())
    open_findings = [f for f in findings if not f.fixed]
    click.echo(
        f"{len(findings)} finding(s), {len(findings) - len(open_findings)} fixed, "
        f"{len(open_findings)} left"
    )
    if open_findings:
        sys.exit(1)


def register_cli(app: Flask) -> None:
    app.cli.add_command(vmapi_cli)

    @app.shell_context_processor
    def shell_context() -> dict[str, Any]:
        context: dict[str, Any] = {"db": db, "session": db.session, "app": app}
        context.update({name: getattr(models, name) for name in models.__all__})
        return context
