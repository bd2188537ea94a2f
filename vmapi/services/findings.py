"""What ``flask vmapi reconcile`` reports (services/reconcile.py): one finding per domain,
VM or volume, and whether ``--fix`` repaired it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Finding:
    kind: str
    node: str
    domain: str  # the domain, or pool/volume
    detail: str
    fixed: bool = False

    def line(self) -> str:
        status = "fixed" if self.fixed else "found"
        return f"{status:5}  {self.kind:15} {self.domain:12} on {self.node}: {self.detail}"
