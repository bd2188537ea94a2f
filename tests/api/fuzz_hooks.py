"""schemathesis hooks for test_fuzz.py (loaded through ``SCHEMATHESIS_HOOKS``).

A generated node may name any acceptable libvirt URI, remote hosts included, and vmapi
would connect to it. The fuzzer must never reach outside this machine, nor touch the
real libvirtd: every URI the server would accept is replaced, just before the request
is sent, by the in-process test driver's. A URI the server refuses is left as it is, so
refusals are still tested.

Schema-valid requests refused for a rule no JSON Schema can state are not counted against
the document (``filter_failure``); every other failure is.
"""

from __future__ import annotations

import os
import re
from typing import Any

import schemathesis
from schemathesis.openapi.checks import RejectedPositiveData

from vmapi.hypervisor.uri import matches_grammar

LOCAL = "test:///default"


def _confine(value: Any) -> Any:
    if isinstance(value, list):
        return [_confine(item) for item in value]
    if not isinstance(value, dict):
        return value
    confined = {key: _confine(item) for key, item in value.items()}
    uri = confined.get("libvirt_uri")
    if isinstance(uri, str) and uri != LOCAL:
        # the grammar alone (whatever the server's directories): a URI of it is never
        # opened, a URI outside it is left for the server to refuse
        if not matches_grammar(uri):
            return confined
        confined["libvirt_uri"] = LOCAL
    return confined


#: the fleet's security group that its VM's interface uses (test_fuzz.py::_fleet)
FLEET_GROUP = {"id": 1}


def _keep_fleet_group(body: Any) -> Any:
    """An interface's new groups keep the fleet's group: drawn ids must keep finding it in
    use (409 security_group/in_use), its rules there, whatever an interface update drew."""
    if isinstance(body, list):
        return [_keep_fleet_group(item) for item in body]
    if isinstance(body, dict) and isinstance(body.get("security_groups"), list):
        groups = body["security_groups"]
        if FLEET_GROUP not in groups:
            body = {**body, "security_groups": [*groups, FLEET_GROUP]}
    return body


@schemathesis.hook
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    case.body = _confine(case.body)
    if "/interface" in case.path:
        case.body = _keep_fleet_group(case.body)


#: where each answer's operation, status and error id are written, one ``METHOD PATH
#: STATUS ERROR_ID`` line per call (test_fuzz.py reads them: every operation must have had
#: a 2xx answer)
ANSWERS_ENV = "VMAPI_FUZZ_ANSWERS"


@schemathesis.hook
def after_call(ctx: Any, case: Any, response: Any) -> None:
    path = os.environ.get(ANSWERS_ENV)
    if not path:
        return
    try:
        error_id = response.json().get("error_id") or "-"
    except Exception:  # not a JSON object (a document, a file)
        error_id = "-"
    with open(path, "a") as out:
        out.write(f"{case.operation.label} {response.status_code} {error_id}\n")


#: 400s for rules a JSON Schema cannot state, which the document says in words: a
#: reference must name a row that exists (which ids exist is not the document's to say),
#: a gateway lies inside its network and is not the address itself, a network has no host
#: bits set. A schema-valid request refused for one of these alone is no lie of the document.
UNSTATABLE = [
    re.compile(p)
    for p in (
        r"No [a-z0-9_]+ with id \d+\.",
        r"No such vm_state\.",
        r"Must be inside \S+\.",
        r"Must not be the address itself\.",
        r"Is the network or broadcast address of \S+\.",
        r"Has host bits set: the network is \S+\.",
        # a node's migration address: the pattern admits the characters of a host, an
        # address and a port; the grammar beyond (a valid IPv6 literal, a port of
        # 1..65535 and only after tcp://, a valid host name) is said in words
        r"Not a migration address: .+\.",
        # a libvirt URI's files: the test driver's under TEST_DRIVER_DIR, credentials under
        # LIBVIRT_CREDENTIAL_DIRS (configuration the document says in words)
        r"Not an acceptable libvirt URI: .*(?:TEST_DRIVER_DIR|LIBVIRT_CREDENTIAL_DIRS).*\.",
        # POST /vm: root_size is given only with image (OpenAPI 3.0 cannot say so)
        r"Give it with image: a root disk is made from an image\.",
        # POST /vm: a root disk's storage type is local-qcow2 or an rbd one (which rows
        # those are is stored; the document says so in words)
        r"A root disk is made in local-qcow2 or in an rbd storage type; \S+ is neither\.",
        # what a guest is told: an SSH key is decoded and checked, user data counted in
        # UTF-8 bytes, a dotted host name's last label is not a number
        r"Key \d+(: .+| is the same key as key \d+\.)",
        r"At most \d+ bytes as UTF-8, not \d+\.",
        r"The last label must not be all digits\.",
        # a node's bridge template: its only placeholders, and the device names Linux allows
        r"The only placeholders are \{suffix\} and \{vlan\}\.",
        r"Names a bridge of up to \d+ characters .*",
        r"A bridge name is letters, digits, .*",
        # a security group rule's fields together (OpenAPI 3.0 has no if/then, and an
        # UPDATE is checked with the rule's stored fields): ports for tcp and udp only, in
        # order; icmp with ipv4, icmpv6 with ipv6; a remote network of the ethertype
        r"Only tcp and udp rules have ports, not [a-z0-9]+; send null\.",
        r"Give port_min with port_max: the range is port_min to port_max\.",
        r"Must not be below port_min \(\d+\)\.",
        r"icmp(?:v6)? goes with ethertype ipv[46]; use icmp(?:v6)? for ipv[46]\.",
        r"Must be an IPv[46] network: the rule's ethertype is ipv[46]\.",
        # a storage type's fields together (backend rbd: the Ceph fields, raw, shared; dir:
        # none of them) and the user's key on the API host (configuration)
        r"Only an rbd storage type \(backend rbd\) has it\.",
        r"Required for an rbd storage type\.",
        r"An rbd storage type is (?:raw|shared).*\.",
        r"No key for client\.\S+: .*\.",
        # a VM's server group is its customer's (an admin group for a VM without one), and
        # a VM in a group keeps its customer (what is stored, said in words)
        r"Is (?:an admin group|customer \d+'s group): a VM joins a group of its own .*\.",
        r"vm-\d+ is in server_group \d+, of its customer: it cannot change customer .*\.",
        # a node's fence agent must be installed on the API host (configuration: which
        # agents, in VMAPI_HA_FENCE_AGENT_DIRS; the document says so in words)
        r"No fence agent fence_\w+ in \S*(?:;|, and none is installed there).*\.",
    )
]
#: 400s that depend on what is stored: the seeded vm_state rows that cannot be set, and a
#: size below the volume's current one.
STATE_DEPENDENT = {"vm/state_not_settable", "storage/shrink_forbidden"}


def _messages(data: Any) -> list[Any]:
    if isinstance(data, dict):
        return [m for key, value in data.items() if key != "index" for m in _messages(value)]
    if isinstance(data, list):
        return [m for value in data for m in _messages(value)]
    return [data]


@schemathesis.hook
def filter_failure(ctx: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure but a schema-valid request refused only for those rules."""
    if not isinstance(failure, RejectedPositiveData) or response.status_code != 400:
        return True
    body = response.json()
    if body.get("error_id") in STATE_DEPENDENT:
        return False
    messages = _messages(body.get("data"))
    unstatable = all(
        isinstance(m, str) and any(p.fullmatch(m) for p in UNSTATABLE) for m in messages
    )
    return not (messages and unstatable)
