"""Fuzzing the contract the way an outsider does: schemathesis over HTTP, every check.

A real gunicorn (the concurrency tier's helper) serves its own PostgreSQL database with a
fleet in it, so that generated ids meet real rows: a node on libvirt's test driver,
address pools and a VM. ``schemathesis run`` reads /api/v1/openapi.json from it and sends
every phase's requests (examples, coverage, fuzzing, stateful) with a fixed seed and a
bounded number of examples per operation. Every answer must be what the document
promises: a documented status, a body of the documented schema, never a 5xx, schema-valid
requests accepted and schema-invalid ones refused. fuzz_hooks.py keeps generated nodes on
this machine and names the 400s for rules that only the document's words can state.
Coverage is a condition too: every operation of the document must have had at least one
2xx answer (fuzz_hooks.py writes down each answer's operation and status), but for the
few listed in NO_SUCCESS with the reason they cannot have one in this set-up; an
operation that only ever got 4xx (schemathesis's "missing test data" warning) fails.
About two and a half minutes on two cores, most of it the coverage phase.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.fuzz_hooks import ANSWERS_ENV
from tests.concurrency.conftest import ROOT, Server, gunicorn
from tests.conftest import GIB, create_database, drop_database, migrate

SEED = 20240601
MAX_EXAMPLES = 10
#: Checks that cannot hold for this contract by design.
EXCLUDED_CHECKS = [
    # Allow headers rightly list UPDATE, which OpenAPI 3.0 cannot name (the document marks
    # it with x-method-aliases on every PATCH; test_openapi.py checks that).
    "allow_header_conformance",
    # The stateful phase infers links from answers: an array POST answers objects keyed by
    # id ({"7": {...}}), and the ids it then follows are not the ones made.
    "ensure_resource_availability",
]
#: Operations that get no 2xx answer in this set-up, each with the reason (seen in the
#: answers; the run is seeded, so the same every time). Any other operation without one
#: fails the test, and so does one listed here that got one (the list cannot go stale).
#: Most want test data the generator can reach: ids are drawn at random, and the stateful
#: phase cannot follow an array POST's answer (objects keyed by id) to the rows it made.
_SEEDED = ("the only rows a drawn id finds are the seeded ones, protected (409 "
           "{}/protected); others are not found (404)")  # fmt: skip
_NO_ROW = "the fleet has no {} row, and drawn ids name none the run made: not found (404)"
_DRAWN = "drawn ids never name the fleet's row: 404 not_found, else the body is refused (400)"
#: array DELETEs whose 2xx depends on the generated stream alone (a drawn body names a row
#: the run made by luck; every new field of any schema changes the stream): whether they
#: answered 2xx is not held against either list
BY_LUCK = {
    *(
        f"DELETE /api/v1/{name}"
        for name in (
            "cache_option",
            "node_state",
            "storage_type",
            "virt_method",
            "vm_state",
            "node",
        )
    ),
}
NO_SUCCESS: dict[str, str] = {
    "GET /api/v1/openapi.json": "the document's own URL: schemathesis leaves the operation "
    "that served it out (test_openapi.py reads it)",
    **{
        f"DELETE /api/v1/{name}{item}": _SEEDED.format(name)
        for name in ("cache_option", "node_state", "storage_type", "virt_method", "vm_state")
        # (an array DELETE's drawn body named a row the run made only by luck of the
        # generated stream, which every new field of a schema changes)
        for item in ("", "/{ident}")
    },
    "DELETE /api/v1/node/{ident}": "the fleet's one node holds its VM (409 node/in_use)",
    "DELETE /api/v1/node": "an array DELETE of nodes: its drawn body names a node the run "
    "made without VMs only by luck of the generated stream (see BY_LUCK)",
    "DELETE /api/v1/image/{ident}": _NO_ROW.format("image"),
    "PATCH /api/v1/image/{ident}": _NO_ROW.format("image"),
    "GET /api/v1/image/{ident}/file": _NO_ROW.format("image"),
    "DELETE /api/v1/quota/{ident}": _NO_ROW.format("quota"),
    "DELETE /api/v1/vlan/{ident}": _NO_ROW.format("vlan"),
    "PATCH /api/v1/vlan/{ident}": _NO_ROW.format("vlan"),
    "DELETE /api/v1/storage": _NO_ROW.format("storage"),
    "DELETE /api/v1/storage/{ident}": _NO_ROW.format("storage"),
    "PATCH /api/v1/storage": _NO_ROW.format("storage"),
    "PATCH /api/v1/storage/{ident}": _NO_ROW.format("storage"),
    "DELETE /api/v1/vm": _DRAWN,
    "PATCH /api/v1/vm": _DRAWN,
    "PATCH /api/v1/vm/{ident}": _DRAWN,
    "PATCH /api/v1/interface": _DRAWN,
    "PATCH /api/v1/ipv4": _DRAWN,
    "PATCH /api/v1/ipv6": _DRAWN,
    **{
        f"{verb} /api/v1/security_group_rule": "drawn ids name the fleet's rules 1 and 2, "
        "which DELETE /security_group_rule/{ident} deleted before; the run's own have others"
        for verb in ("PATCH", "DELETE")
    },
    "PATCH /api/v1/virt_node": _DRAWN + "; or the pair exists already (409 virt_node/duplicate)",
    "PATCH /api/v1/virt_node/{ident}": _DRAWN + "; or the pair exists (409 virt_node/duplicate)",
}
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _admin_token(db_url: str) -> str:
    from vmapi.app import create_app
    from vmapi.extensions import db
    from vmapi.services.catalog_defaults import seed_defaults
    from vmapi.services.tokens import create_token

    app = create_app({"DATABASE_URL": db_url})
    with app.app_context():
        seed_defaults()
        _token, plain = create_token("admin", None)
        db.session.remove()
        db.engine.dispose()
    return plain


def _fleet(server: Server) -> None:
    """A node with room, the TEST method on it, address pools, one VM, security groups
    1 (with rules 1 to 3, used by the VM's interface) and 2 (ids that drawn ids name), and
    server groups 1 (the VM's: drawn ids find it after DELETE /server_group/{ident} has
    run) and 2."""
    method = server.call("POST", "virt_method", {"name": "TEST", "domain_type": "test"})
    assert method[0] == 201, method
    node = server.call("POST", "node", {
        "fqdn": "fuzz.example.com", "ipv4_addr_ext": "192.0.2.10/24",
        "ipv6_addr_ext": "2001:db8::10/64", "ipv4_gw_ext": "192.0.2.1",
        "ipv6_gw_ext": "2001:db8::1", "node_state": {"id": 1},
        "libvirt_uri": "test:///default", "cores": 64, "ram": 256 * GIB,
    })  # fmt: skip
    assert node[0] == 201, node
    method_id, node_id = method[1]["data"]["id"], node[1]["data"]["id"]
    pairs = [
        ("virt_node", {"node": {"id": node_id}, "virt_method": {"id": method_id}}),
        ("ipv4", {"network": "198.51.100.0/24", "gateway": "198.51.100.1"}),
        ("ipv6", {"network": "2001:db8:100::/64", "gateway": "2001:db8:100::1"}),
        ("server_group", {"name": "fuzz", "policy": "anti-affinity"}),
        ("server_group", {"name": "spare", "policy": "soft-anti-affinity"}),
        ("vm", {"cores": 1, "ram": GIB, "virt_method": {"id": method_id},
                "server_group": {"id": 1}}),
        ("security_group", {"name": "fuzz"}),
        ("security_group", {"name": "spare"}),
        ("security_group_rule", [
            {"security_group": {"id": 1}, "direction": "ingress", "ethertype": "ipv4",
             "protocol": "tcp", "port_min": port} for port in (22, 80, 443)
        ]),
    ]  # fmt: skip
    for path, body in pairs:
        answer = server.call("POST", path, body)
        assert answer[0] == 201, (path, answer)
    # Group 1 is used by the VM's interface until the VM goes, so that drawn ids find it
    # after DELETE /security_group/{ident} has run.
    answer = server.call("PATCH", "interface/1", {"security_groups": [{"id": 1}]})
    assert answer[0] == 200, answer


@pytest.fixture
def served(pg_server: str) -> Iterator[Server]:
    db_url = create_database(pg_server)
    try:
        migrate(db_url)
        token = _admin_token(db_url)
        # One worker: libvirt's test:///default keeps its domains per process. The URI
        # template keeps generated nodes on it: a fuzzer must never reach another host.
        env = {"VMAPI_DATABASE_URL": db_url, "VMAPI_LIBVIRT_URI_TEMPLATE": "test:///default",
               "VMAPI_LOG_REQUESTS": "false", "VMAPI_LIBVIRT_TIMEOUT": "5"}  # fmt: skip
        with gunicorn("wsgi:app", env, workers=1) as (url, pid):
            server = Server(url, db_url, token, "vmapi", pid, env)
            _fleet(server)
            yield server
    finally:
        drop_database(pg_server, db_url)


def test_contract(served: Server, tmp_path: Path) -> None:
    # No cache: schemathesis would replay an earlier run's requests (it keeps them in
    # ./.schemathesis), and a run must depend on its seed alone.
    config = tmp_path / "schemathesis.toml"
    config.write_text("[cache]\nenabled = false\n")
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
        f"{served.url}/api/v1/openapi.json",
        "--checks", "all", "--exclude-checks", ",".join(EXCLUDED_CHECKS),
        "--seed", str(SEED), "--max-examples", str(MAX_EXAMPLES), "--workers", "1",
        "--generation-database", "none", "--no-color",
        "--header", f"Authorization: Bearer {served.token}",
    ]  # fmt: skip
    answers = tmp_path / "answers.txt"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.api.fuzz_hooks", "PYTHONPATH": str(ROOT),
           ANSWERS_ENV: str(answers)}  # fmt: skip
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                         env=env)  # fmt: skip
    assert run.returncode == 0, _failures(run.stdout) + run.stderr[-3000:]
    # coverage: each operation of the document had a 2xx answer (or is listed, with why)
    statuses = defaultdict(set)
    for line in answers.read_text().splitlines():
        method, path, status, _error_id = line.split(" ")
        statuses[f"{method} {path}"].add(int(status))
    with urllib.request.urlopen(f"{served.url}/api/v1/openapi.json", timeout=30) as answer:
        document = json.load(answer)
    operations = [f"{method.upper()} {path}" for path, item in document["paths"].items()
                  for method in item if method in METHODS]  # fmt: skip
    assert operations and set(statuses) <= set(operations), set(statuses) - set(operations)
    without = {op: sorted(statuses[op]) for op in operations
               if not any(200 <= s < 300 for s in statuses[op])}  # fmt: skip
    seen, listed = set(without) - BY_LUCK, set(NO_SUCCESS) - BY_LUCK
    assert seen == listed, {
        "no 2xx answer (status codes seen)": {
            k: v for k, v in without.items() if k not in NO_SUCCESS and k not in BY_LUCK
        },
        "listed in NO_SUCCESS, yet answered 2xx": sorted(listed - seen),
    }


def _failures(report: str) -> str:
    """The failures section of schemathesis's report (its warnings run long)."""
    start = report.find("= FAILURES =")
    end = report.find("= WARNINGS =", start)
    return report[max(start, 0) : end if end > 0 else None][-25000:] + report[-1500:]
