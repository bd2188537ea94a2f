"""How services reach a node's hypervisor: its URI, the driver, and reading its capacity."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from flask import current_app

from vmapi.error_ids import NODE_UNREACHABLE
from vmapi.errors import Conflict, ValidationError
from vmapi.hypervisor import HostInfo, HypervisorDriver, HypervisorError, HypervisorTimeout
from vmapi.hypervisor.uri import validate_libvirt_uri

DRIVER_KEY = "vmapi.hypervisor"
K = TypeVar("K")
A = TypeVar("A")
T = TypeVar("T")


def hypervisor() -> HypervisorDriver:
    """The app's hypervisor driver (tests may wrap it to inject faults)."""
    return current_app.extensions[DRIVER_KEY]


def node_uri(fqdn: str, libvirt_uri: str | None) -> str:
    """The URI of a node: its own, or the configured template filled with its fqdn."""
    if libvirt_uri:
        return libvirt_uri
    uri = current_app.config["LIBVIRT_URI_TEMPLATE"].format(fqdn=fqdn)
    try:
        validate_libvirt_uri(uri)
    except ValueError as exc:
        raise ValidationError(
            data={"libvirt_uri": [f"The URI {uri!r} built from LIBVIRT_URI_TEMPLATE {exc}."]}
        ) from exc
    return uri


def read_capacity(fqdn: str, uri: str) -> HostInfo:
    """Ask the host's libvirt for its CPUs and memory; 409 ``node/unreachable`` if it can't."""
    try:
        return hypervisor().host_info(uri)
    except HypervisorError as exc:
        if isinstance(exc, HypervisorTimeout):
            what = f"did not answer at {uri} within {exc.timeout:g} s"
        else:
            what = f"cannot be reached at {uri} ({exc.reason})"
        raise Conflict(
            f"Node {fqdn} {what}; give cores and ram explicitly or fix the connection.",
            error_id=NODE_UNREACHABLE,
            data={"uri": uri, "reason": exc.reason},
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
