"""Item 3, overhead over the floor: throughput from 16 wrk threads against vmapi and
against the floor app (bench/floor.py) under the same gunicorn, same workers, same
database and the same libvirt driver (libvirtd's test driver), in the same run.
Targets: POST /vm ≥ 50% of the floor's creates/s; GET /vm/<id> ≥ 60% of its reads/s;
GET /vm?limit=100 (a page of 100 VMs) ≥ 40% of the floor's pages/s.

Each pair is measured in alternating rounds (floor, vmapi, floor, vmapi) so that noise
from this shared machine falls on both; the figure is the mean of the rounds.
"""

from __future__ import annotations

import json

from bench.common import (
    SHARED_URI,
    lua_request,
    recommended_workers,
    served_fleet,
    wrk,
)
from bench.placement import verdict
from tests.concurrency.conftest import gunicorn

SECONDS = 8
ROUNDS = 2
THREADS = 16


def run() -> list[str]:
    workers = recommended_workers()
    with served_fleet() as (fleet, env, token):
        node = 1  # populate() numbers nodes from 1
        floor_env = {"FLOOR_DATABASE_URL": fleet.url, "FLOOR_LIBVIRT_URI": SHARED_URI,
                     "FLOOR_NODE_ID": str(node), "FLOOR_VIRT_METHOD_ID": str(fleet.method),
                     "FLOOR_VM_STATE_ID": str(fleet.running)}  # fmt: skip
        body = json.dumps({"cores": 1, "ram": 256 * 1024**2, "virt_method": {"id": fleet.method}})
        read_id = fleet.vm_ids[len(fleet.vm_ids) // 2]
        cases = {
            "POST /vm": (
                ("/vm", lua_request("POST", None, body)),
                ("/api/v1/vm", lua_request("POST", token, body)),
                0.5,
            ),
            "GET /vm/<id>": (
                (f"/vm/{read_id}", lua_request("GET", None)),
                (f"/api/v1/vm/{read_id}", lua_request("GET", token)),
                0.6,
            ),
            "GET /vm?limit=100": (
                ("/vm?limit=100", lua_request("GET", None)),
                ("/api/v1/vm?limit=100", lua_request("GET", token)),
                0.4,
            ),
        }
        rates: dict[str, dict[str, list[float]]] = {}
        with (
            gunicorn("bench.floor:app", floor_env, workers) as (floor_url, _),
            gunicorn("wsgi:app", env, workers) as (vmapi_url, _),
        ):
            for label, (floor, vmapi, _target) in cases.items():
                for _ in range(ROUNDS):
                    for side, base, (path, lua) in (("floor", floor_url, floor),
                                                   ("vmapi", vmapi_url, vmapi)):  # fmt: skip
                        result = wrk(base + path, SECONDS, threads=THREADS, lua=lua)
                        if result["non_2xx"] or result["socket_errors"]:
                            raise RuntimeError(f"{side} {label}: {result}")
                        rates.setdefault(label, {}).setdefault(side, []).append(result["rps"])
    lines = [
        "#### 3. Overhead over the floor (gunicorn, wrk, libvirtd test driver)",
        "",
        f"gunicorn sync workers: {workers} (2 x CPUs + 1) for both apps; wrk {THREADS} threads,"
        f" {THREADS} connections, {ROUNDS} alternating rounds of {SECONDS} s each.",
        "",
        "| request | floor req/s | vmapi req/s | vmapi / floor | target |",
        "|---|---:|---:|---:|---|",
    ]
    for label, (_f, _v, target) in cases.items():
        floor_rps = sum(rates[label]["floor"]) / ROUNDS
        vmapi_rps = sum(rates[label]["vmapi"]) / ROUNDS
        share = vmapi_rps / floor_rps
        lines.append(f"| {label} | {floor_rps:.0f} | {vmapi_rps:.0f} | {share:.0%} |"
                     f" ≥ {target:.0%}: {verdict(share >= target)} |")  # fmt: skip
    return [*lines, ""]
