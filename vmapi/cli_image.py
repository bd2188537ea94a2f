"""``flask vmapi image``: images ahead of their first VM (on the nodes, or in Ceph)."""

from __future__ import annotations

import sys
from typing import Any

import click
from flask.cli import AppGroup

from vmapi.extensions import db
from vmapi.hypervisor import HypervisorError
from vmapi.models import Image
from vmapi.models.image import ACTIVE
from vmapi.services.images.copies import CopyGone, push, push_nodes
from vmapi.services.images.rbd_copies import push_to_ceph
from vmapi.services.storage.ceph import KeyUnreadable

image_cli = AppGroup("image", help="Images on the nodes.")


class ProgressBars:
    """One progress bar per node, opened at its first chunk (a node that has the image
    already shows none) and closed when the next one opens."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.current: tuple[int, Any] | None = None

    def for_node(self, node: Any) -> Any:
        def update(sent: int) -> None:
            if self.current is None or self.current[0] != node.id:
                self.close()
                bar = click.progressbar(length=self.size, label=node.fqdn, show_eta=True)
                self.current = (node.id, bar.__enter__())
            self.current[1].update(sent)

        return update

    def close(self) -> None:
        if self.current is not None:
            self.current[1].__exit__(None, None, None)
            self.current = None


@image_cli.command("push")
@click.argument("image", type=click.IntRange(min=1))
@click.option("--node", "fqdn", help="Only this node (default: every node taking new VMs).")
@click.option(
    "--storage-type",
    "type_name",
    help="Write it into this rbd storage type's Ceph pool instead of the nodes.",
)
def image_push(image: int, fqdn: str | None, type_name: str | None) -> None:
    """Copy IMAGE (an id) to the nodes ahead of time, so the first VM of it there does
    not wait for the copy. Nodes that have it already are skipped. Exits 1 when a node
    could not take it. With --storage-type, write it once into that rbd type's Ceph
    pool (where every root disk of it is a clone), skipped when it is there."""
    row = db.session.get(Image, image)
    if row is None or row.state != ACTIVE:
        raise click.ClickException(f"image {image} does not exist or has no accepted file")
    if type_name is not None:
        try:
            done = push_to_ceph(row, type_name)
        except (ValueError, HypervisorError, KeyUnreadable, CopyGone) as exc:
            click.echo(f"FAILED {type_name}: {exc}")
            sys.exit(1)
        click.echo(done)
        return
    if row.file is None:
        raise click.ClickException(f"image {image} lives in Ceph only: it is not copied to nodes")
    nodes = push_nodes(fqdn)
    if not nodes:
        raise click.ClickException(f"no node {fqdn}" if fqdn else "no node takes new VMs")
    bars = ProgressBars(row.size)
    try:
        results = push(row, nodes, bars.for_node)
    finally:
        bars.close()
    for result in results:
        if result.error:
            click.echo(f"FAILED {result.fqdn}: {result.error}")
        elif result.made:
            click.echo(f"copied {result.fqdn} in {result.seconds:.1f} s (checksum verified)")
        else:
            click.echo(f"ok     {result.fqdn}: it has the image already")
    if any(result.error for result in results):
        sys.exit(1)
