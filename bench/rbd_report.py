"""The ``rbd`` benchmark's tables (bench/rbd.py measures)."""

from __future__ import annotations

from typing import Any

from bench.common import GIB, MIB, median, p95
from bench.placement import verdict

#: what the first RBD VM of an image does beside the clone
WRITE = "the write (sha256, import, compare, snapshot)"
TARGET = 1.1  # POST /vm with an RBD root disk against the local overlay (issue 25)


def _med(rows: list[dict], key: str) -> float:
    return median([row.get(key, 0.0) for row in rows])


def report(out: dict[str, Any]) -> list[str]:
    return [*creates(out), *firsts(out), *moves(out)]


def creates(out: dict[str, Any]) -> list[str]:
    c = out["creates"]
    local, rbd = c["local"], c["rbd"]
    lcalls, rcalls = c["local_calls"], c["rbd_calls"]

    def calls(rows: list[dict]) -> float:
        return median([sum(row.values()) for row in rows])

    def access(rows: list[dict]) -> float:
        return median([row.get("ensure_ceph_secret", 0.0) + row.get("ensure_rbd_pool", 0.0)
                       for row in rows])  # fmt: skip

    grown = ""
    if c["size"] > c["parent"]:
        grown = (f", grown from the image's {c['parent'] / MIB:.2f} MiB to the root disk's "
                 f"default size, {c['size'] / MIB:.0f} MiB, before the domain starts")  # fmt: skip
    hand = c["clone"]
    ratio = median(rbd) / median(local)
    extra = median(rbd) - median(local)
    return [
        f"1. POST /vm of the test guest's image ({out['guest_size'] / MIB:.0f} MiB, raw) on "
        f"node a, {len(local)} alternating rounds after one warm-up of each; vmapi "
        "in-process; each VM deleted after it is timed (not timed). Local: the root disk "
        "a qcow2 overlay on the image's copy on the node. RBD: the image already in Ceph, "
        "the root disk an RBD clone of its snapshot made by the API host in-process (Ceph's "
        f"Python bindings on the process's connection to the cluster{grown}), started "
        "before the create's claim and going on beside it, the seed and the domain's "
        "definition; a network disk of the domain.",
        "",
        "| POST /vm | median ms | p95 ms | libvirt calls ms | of which `start` ms |",
        "|---|---:|---:|---:|---:|",
        f"| local overlay | {median(local):.1f} | {p95(local):.1f} | {calls(lcalls):.1f} |"
        f" {_med(lcalls, 'start'):.1f} |",
        f"| RBD clone | {median(rbd):.1f} | {p95(rbd):.1f} | {calls(rcalls):.1f} |"
        f" {_med(rcalls, 'start'):.1f} |",
        "",
        f"The local overlay call: {_med(lcalls, 'create_overlay'):.1f} ms. The RBD path's own "
        f"parts: the node's Ceph secret and rbd pool checked (libvirt) "
        f"{access(rcalls):.1f} ms; vmapi's in-process clone and growth as the create "
        f"makes them, by hand, outside a request, {len(hand['warm'])} times on a kept "
        f"connection: median {median(hand['warm']):.1f} ms (max {max(hand['warm']):.1f}); "
        f"the first on a new connection (a worker's first create) {hand['first']:.1f} ms; "
        f"QEMU's start on the RBD disk "
        f"{_med(rcalls, 'start') - _med(lcalls, 'start'):+.1f} ms against the file; "
        f"outside libvirt's calls the RBD create took "
        f"{(median(rbd) - calls(rcalls)) - (median(local) - calls(lcalls)):+.1f} ms "
        "more than the local one (medians); of which its wait for the clone before the "
        f"start (begun before the create's claim) {median(c['waits']):.1f} ms (max "
        f"{max(c['waits']):.1f}).",
        "",
        f"Target RBD ≤ {TARGET} x local, the clone included: {ratio:.2f} x "
        f"({extra:+.1f} ms; {TARGET} x allows {(TARGET - 1) * median(local):+.1f} ms) — "
        f"{verdict(ratio <= TARGET)}.",
        "",
    ]


def firsts(out: dict[str, Any]) -> list[str]:
    f, later = out["firsts"], out["creates"]
    rows = f["fresh"]
    # a later VM of an image (its copy or RBD image there): part 1's medians
    after = {"local": median(later["local"]) / 1000, "rbd": median(later["rbd"]) / 1000}

    def col(kind: str, i: int) -> list[float]:
        return [row[kind][i] for row in rows]

    def line(name: str, kind: str, part: str) -> str:
        first, over = median(col(kind, 0)), median(col(kind, 0)) - after[kind.split("_")[0]]
        return (f"| {name} | {first:.2f} | {max(col(kind, 0)):.2f} | {over:+.2f} |"
                f" {part}: {median(col(kind, 1)):.2f} |")  # fmt: skip

    (nl, nl_copy), (nr, nr_access) = f["node_local"], f["node_rbd"]
    local = (median(col("local_a", 0)) + median(col("local_b", 0))) / 2
    streams = "libvirt's upload and read-back streams"
    return [
        f"2. The first VM of an image on a node: {len(rows)} new images of "
        f"{out['fresh_size'] // MIB} MiB (the test guest's image, then random bytes), "
        "uploaded through the API; for each, in this order: local on a (a full copy to a), "
        "RBD on a (the first ever: the API host writes the image into Ceph, checks it and "
        "snapshots it), RBD on b (a new node for the image: a clone only), local on b "
        "(another full copy). Each VM deleted after it is timed. 'Over a later VM': the "
        "median less part 1's median of the same kind (the image's copy, or its RBD image, "
        "there already). A local copy is the upload through libvirt's stream, then the "
        "copy read back through a stream and hashed (sha256) by vmapi.",
        "",
        "| first VM of the image | median s | max s | over a later VM s | of which (median s) |",
        "|---|---:|---:|---:|---|",
        line("local on a (copy to the node)", "local_a", streams),
        line("local on b (copy to the node)", "local_b", streams),
        line("RBD on a, the first ever (written into Ceph)", "rbd_a", WRITE),
        line("RBD on b, a second node (clone only)", "rbd_b", "a write"),
        "",
        f"A new node on RBD: {median(col('rbd_b', 0)):.2f} s against "
        f"{local:.2f} s local (the copy to that node): "
        f"{median(col('rbd_b', 0)) / local:.2f} x. The first VM ever on node b, of the "
        f"test image: local {nl:.2f} s (of which libvirt's streams {nl_copy:.2f} s), RBD "
        f"{nr:.2f} s (of which giving the node the Ceph secret and rbd pool {nr_access:.2f} s).",
        "",
    ]


def moves(out: dict[str, Any]) -> list[str]:
    m = out["moves"]
    cold, warm, rbd = m["cold"], m["warm"], m["rbd"]

    def row(name: str, rows: list[dict]) -> str:
        return (f"| {name} | {_med(rows, 'seconds'):.2f} | {max(r['seconds'] for r in rows):.2f} |"
                f" {_med(rows, 'copy'):.2f} | {_med(rows, 'migrate'):.2f} |"
                f" {_med(rows, 'downtime') * 1000:.0f} |")  # fmt: skip

    r = _med(rbd, "seconds")
    (local_s, local_copy), (rbd_s, rbd_write) = m["setup_local"], m["setup_rbd"]
    return [
        f"3. Live moves of two running test guests (TCG, 256 MiB) made from one raw image of "
        f"{out['disk'] // GIB} GiB of data (the guest's image, then random bytes), "
        f"each with a {out['disk'] // GIB} GiB root disk: one local (a qcow2 "
        "overlay on the node's copy of the image; each node its own pool folder), one on "
        f"RBD (a clone in Ceph). {len(cold)} rounds after one warm-up, each: the local "
        "guest a→b to a node without the image's copy (dropped there by vmapi's own "
        "removal of an unused copy: the move copies the image's 1 GiB there, then libvirt "
        "the overlay), the RBD guest a→b, the local guest b→a (a kept its copy: only the "
        "overlay), the RBD guest b→a. Both guests tick on after the last move (never "
        "restarted).",
        "",
        "| POST /vm/<id>/migrate | median s | max s | libvirt's volume streams s |"
        " libvirt migrate s | downtime ms |",
        "|---|---:|---:|---:|---:|---:|",
        row("local, the target without the image (1 GiB copied)", cold),
        row("local, the target with its copy (overlay only)", warm),
        row("RBD clone (nothing copied)", rbd),
        "",
        f"RBD against local: {r / _med(cold, 'seconds'):.2f} x the move that copies the disk, "
        f"{r / _med(warm, 'seconds'):.2f} x the one that copies only the overlay. The copy "
        f"of the image to the target costs the cold move "
        f"{_med(cold, 'seconds') - _med(warm, 'seconds'):.2f} s over a warm one: libvirt's "
        f"upload and read-back streams {_med(cold, 'copy'):.2f} s, libvirt's migrate "
        f"{_med(cold, 'migrate') - _med(warm, 'migrate'):+.2f} s, the rest vmapi's work "
        "between the calls (the sha256 of the read-back, the rows). Making the two guests: "
        f"local {local_s:.1f} s (libvirt's streams of the image's copy to a: "
        f"{local_copy:.1f} s), RBD {rbd_s:.1f} s (the image written into Ceph: "
        f"{rbd_write:.1f} s).",
        "",
    ]
