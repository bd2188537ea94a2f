"""The frame libvirt's network filters leave in the kernel's ruleset, and taking it away.

libvirt writes a filtered guest's rules with ebtables-nft and iptables-nft into three
nftables tables, ``bridge nat``, ``ip filter`` and ``ip6 filter``, and removes them with
the guest. What it leaves once its last filtered guest is gone is a frame that does
nothing (../shared/recipes/network-filters.md, pitfalls): empty base chains with policy
accept, its empty ``libvirt-in``, ``libvirt-out``, ``libvirt-in-post`` and
``libvirt-host-in`` chains, and the base chains' jumps to them.

``remove_frames(before)`` deletes the tables that did not exist at ``before`` (what
``tables()`` answered when the session began) and now hold that frame and nothing else,
each right after reading it (one ``nft`` process reads, the next deletes: libvirt sets up
a guest's rules with dozens of ebtables and iptables processes, so a table it has begun
to use no longer reads as a bare frame, and it cannot finish a guest in between).
A table that existed before, or holds anything more (a rule of a running guest, a chain
or set of another program), is never touched. ``nft`` runs with ``prefix`` before it
(``ip netns exec NS``: the same work on a namespace's own ruleset, as the tests do).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterable, Sequence

#: the tables libvirt's filters write into, as (family, name)
TABLES = (("bridge", "nat"), ("ip", "filter"), ("ip6", "filter"))
#: the chains libvirt makes in ``ip filter``/``ip6 filter`` for all its guests at once
FRAME_CHAINS = frozenset({"libvirt-in", "libvirt-out", "libvirt-in-post", "libvirt-host-in"})

Table = tuple[str, str]


def nft(*args: str, prefix: Sequence[str] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, "nft", *args], capture_output=True, text=True, check=True,
                          timeout=30)  # fmt: skip


def available() -> bool:
    return shutil.which("nft") is not None


def tables(prefix: Sequence[str] = ()) -> set[Table]:
    """Every table of the ruleset, as (family, name)."""
    listed = nft("list", "tables", prefix=prefix).stdout.split("\n")
    return {(words[1], words[2]) for words in (line.split() for line in listed)
            if len(words) == 3 and words[0] == "table"}  # fmt: skip


def only_the_frame(items: Iterable[dict]) -> bool:
    """Whether a table's listing (``nft -j list table``'s items) holds the frame and
    nothing else: base chains with policy accept whose rules only jump (counted) to
    libvirt's frame chains, and those chains empty."""
    for item in items:
        [(kind, body)] = item.items()
        if kind in ("metainfo", "table"):
            continue
        if kind == "chain":
            if "hook" in body:
                if body.get("policy") != "accept":
                    return False
            elif body["name"] not in FRAME_CHAINS:
                return False
        elif kind == "rule":
            if body["chain"] in FRAME_CHAINS:
                return False  # a guest's rules hang there
            verdicts = [e for e in body["expr"] if "counter" not in e]
            if len(verdicts) != 1 or verdicts[0].get("jump", {}).get("target") not in FRAME_CHAINS:
                return False
        else:
            return False  # a set, a map, an object: not libvirt's
    return True


def listing(table: Table, prefix: Sequence[str] = ()) -> list[dict]:
    return json.loads(nft("-j", "list", "table", *table, prefix=prefix).stdout)["nftables"]


def remove_frames(before: set[Table], prefix: Sequence[str] = ()) -> list[Table]:
    """Delete libvirt's tables made since ``before`` that hold only its empty frame now,
    each right after reading it; the ones deleted."""
    now = tables(prefix)
    removed = []
    for table in TABLES:
        if table not in before and table in now and only_the_frame(listing(table, prefix)):
            nft("delete", "table", *table, prefix=prefix)
            removed.append(table)
    return removed
