"""Placement: pick a node for a VM in SQL and claim its capacity atomically.

``select_and_claim`` runs one query that filters and weighs every node, then claims
vCPUs and RAM on the best candidate with a conditional ``UPDATE``; losing a race to a
concurrent request just moves on to the next candidate.
"""

from vmapi.scheduler.capacity import CapacityDefaults, refresh_all, set_free
from vmapi.scheduler.claims import NoSuchGroup, claim, lock_group, release
from vmapi.scheduler.filters import FILTERS, Defaults, PlacementRequest
from vmapi.scheduler.select import NoValidHost, explain, select_and_claim, unsuitable_reasons

__all__ = [
    "FILTERS",
    "CapacityDefaults",
    "Defaults",
    "NoSuchGroup",
    "NoValidHost",
    "PlacementRequest",
    "claim",
    "explain",
    "lock_group",
    "refresh_all",
    "release",
    "select_and_claim",
    "set_free",
    "unsuitable_reasons",
]
