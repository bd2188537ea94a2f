"""How services reach a node's hypervisor: its URI, the driver, a node as a :class:`Host`
(its row and URI), and reading its capacity."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from flask import current_app

from vmapi.config import uri_template_problem
from vmapi.error_ids import NODE_UNREACHABLE, NODE_UNSAFE_URI
from vmapi.errors import Conflict
from vmapi.extensions import db
from vmapi.hypervisor import HostInfo, HypervisorDriver, HypervisorError, HypervisorTimeout
from vmapi.hypervisor.uri import UriPolicy, validate_libvirt_uri
from vmapi.models import Node
from vmapi.node_detail import NODE_DETAIL

DRIVER_KEY = "vmapi.hypervisor"
POLICY_KEY = "vmapi.hypervisor.uri_policy"
K = TypeVar("K")
A = TypeVar("A")
T = TypeVar("T")


def hypervisor() -> HypervisorDriver:
    """The app's hypervisor driver (tests may wrap it to inject faults)."""
    return current_app.extensions[DRIVER_KEY]


def uri_policy() -> UriPolicy:
    """Which libvirt URIs the app may open (built from the configuration at start)."""
    return current_app.extensions[POLICY_KEY]


def checked_uri(fqdn: str, uri: str, field: str = "libvirt_uri") -> str:
    """``uri``, a node's stored ``field``, if it may be opened; else 409
    ``node/unsafe_uri`` (a row stored before the rules): nothing is connected."""
    try:
        validate_libvirt_uri(uri, uri_policy())
    except ValueError as exc:
        raise Conflict(
            f"Node {fqdn}'s {field} is not a libvirt URI vmapi may open: {exc}. Nothing was "
            "connected; update the node's URI.",
            error_id=NODE_UNSAFE_URI,
            data={field: [f"Not an acceptable libvirt URI: {exc}."]},
        ) from None
    return uri


def node_uri(fqdn: str, libvirt_uri: str | None) -> str:
    """The URI of a node: its own, or the configured template filled with its fqdn;
    either checked against the URI policy before anything connects to it."""
    if libvirt_uri:
        return checked_uri(fqdn, libvirt_uri)
    template = current_app.config["LIBVIRT_URI_TEMPLATE"]
    problem = uri_template_problem(template, uri_policy(), fqdn)
    if problem:  # (checked at start with a sample fqdn; this node's fqdn may still fail)
        raise Conflict(
            "The node's libvirt URI, built from LIBVIRT_URI_TEMPLATE, is not one vmapi may "
            "open; nothing was connected. Fix the template or set the node's libvirt_uri.",
            error_id=NODE_UNSAFE_URI,
            data={NODE_DETAIL: f"node {fqdn}: LIBVIRT_URI_TEMPLATE {template!r}: {problem}"},
        )
    return template.format(fqdn=fqdn)


@dataclass
class Host:
    """A VM's node and how to reach it."""

    node: Node
    uri: str

    @classmethod
    def of(cls, node_id: int) -> Host:
        node = db.session.get(Node, node_id)
        return cls(node, node_uri(node.fqdn, node.libvirt_uri))


def read_capacity(fqdn: str, uri: str) -> HostInfo:
    """Ask the host's libvirt for its CPUs and memory; 409 ``node/unreachable`` if it can't."""
    try:
        return hypervisor().host_info(uri)
    except HypervisorError as exc:
        # a failed connection answers its reason class, never libvirt's text (which may
        # quote a file it read); other errors of the call are the host's own answer
        reason = exc.reason_class or exc.reason
        if isinstance(exc, HypervisorTimeout):
            what = f"did not answer at {uri} within {exc.timeout:g} s"
        else:
            what = f"cannot be reached at {uri} ({reason})"
        raise Conflict(
            f"Node {fqdn} {what}; give cores and ram explicitly or fix the connection.",
            error_id=NODE_UNREACHABLE,
            data={"uri": uri, "reason": reason},
        ) from exc


def on_hosts(
    uris: dict[K, A], call: Callable[[A], T], workers: int
) -> dict[K, T | HypervisorError]:
    """``call(uri)`` for every host at once (``uris``' values may be any argument), in up
    to ``workers`` threads; each result, or the hypervisor error it raised. Every libvirt
    call is bounded by LIBVIRT_TIMEOUT, so a hung host costs its own thread that long and
    delays no other host."""
    if not uris:
        return {}

    def guarded(uri: A) -> T | HypervisorError:
        try:
            return call(uri)
        except HypervisorError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(uris)))) as pool:
        futures = {key: pool.submit(guarded, uri) for key, uri in uris.items()}
        return {key: future.result() for key, future in futures.items()}
