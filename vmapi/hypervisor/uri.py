"""Validation of libvirt connection URIs given by admins.

libvirt can be told by a URI to run a local program (the ``ext`` transport, the
``command=`` and ``netcat=`` parameters, an ssh "host" that starts with ``-``). An admin
typo or a stolen admin token must never execute anything on the API host, so only the
transports a real deployment uses are accepted, with a short list of harmless parameters.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import parse_qsl, urlsplit

#: Hypervisor drivers vmapi can manage.
DRIVERS = frozenset({"qemu", "test", "lxc", "xen", "libxl", "ch", "bhyve", "vz"})
#: Transports: '' is the plain local connection.
TRANSPORTS = frozenset({"", "ssh", "tls", "tcp", "unix", "libssh", "libssh2"})
#: Query parameters that only tune the connection (see libvirt's remote URI docs).
SAFE_PARAMS = frozenset(
    {
        "name", "socket", "keyfile", "no_verify", "no_tty", "pkipath", "known_hosts",
        "known_hosts_verify", "sshauth", "mode", "proxy", "tls_priority",
    }
)  # fmt: skip
_LABEL_RE = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_USER_RE = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}"
_PATH_RE = r"/[A-Za-z0-9_./-]*"
_LABEL = re.compile(rf"^{_LABEL_RE}$")
_USER = re.compile(rf"^{_USER_RE}$")
_PATH = re.compile(rf"^{_PATH_RE}$")


def _uri_pattern() -> str:
    """A regular expression for URIs :func:`validate_libvirt_uri` accepts (for the OpenAPI
    document): local ones, ``test://host``, and remote ones that name their transport; hosts
    of up to five labels, only the harmless parameters."""
    drivers = "|".join(sorted(DRIVERS))
    transports = "|".join(sorted(TRANSPORTS - {""}, key=lambda t: -len(t)))
    port = (
        r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]"
        r"|6553[0-5])"
    )
    label = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,40}[A-Za-z0-9])?"  # five stay within 253
    host = rf"(?:{_USER_RE}@)?{label}(?:\.{label}){{0,4}}(?::{port})?"
    param = rf"(?:{'|'.join(sorted(SAFE_PARAMS))})=[A-Za-z0-9_./-]*"
    return (
        rf"^(?:(?:{drivers})(?:\+(?:{transports}))?://|test://{host}|"
        rf"(?:{drivers})\+(?:{transports})://{host})(?:{_PATH_RE})?(?:\?{param}(?:&{param})*)?$"
    )


URI_PATTERN = _uri_pattern()


def _valid_host(host: str) -> bool:
    """A DNS name or an IP address; never something ssh could read as an option."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    return len(host) <= 253 and all(_LABEL.match(label) for label in labels)


def validate_libvirt_uri(uri: str) -> None:
    """Raise ``ValueError`` with a reason a person can act on if ``uri`` is not acceptable."""
    if not uri or len(uri) > 1024:
        raise ValueError("must be a libvirt URI of at most 1024 characters")
    if any(ord(c) < 33 or ord(c) == 127 for c in uri):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is not a valid URI ({exc})") from exc
    driver, _, transport = parts.scheme.partition("+")
    if driver not in DRIVERS:
        raise ValueError(
            f"driver {driver!r} is not supported; use one of {', '.join(sorted(DRIVERS))}"
        )
    if transport not in TRANSPORTS:
        raise ValueError(
            f"transport {transport!r} is not allowed; use ssh, tls, tcp, unix or a local URI"
        )
    if parts.fragment:
        raise ValueError("must not have a #fragment")
    host = parts.hostname or ""
    if host and not _valid_host(host):
        raise ValueError(f"host {host!r} is not a valid host name or address")
    if parts.username is not None and not _USER.match(parts.username):
        raise ValueError(f"user name {parts.username!r} is not allowed")
    if parts.password is not None:
        raise ValueError("must not carry a password; use keys or certificates")
    if port is not None and not 0 < port < 65536:
        raise ValueError("port must be between 1 and 65535")
    if transport == "" and host and driver != "test":
        # A host without a transport means TLS in libvirt; say it explicitly.
        raise ValueError("name the transport for a remote host, e.g. qemu+ssh://host/system")
    if parts.path and not _PATH.match(parts.path):
        raise ValueError(f"path {parts.path!r} is not allowed")
    for key, _value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in SAFE_PARAMS:
            raise ValueError(
                f"parameter {key!r} is not allowed (parameters that run programs, such as "
                "command and netcat, are refused)"
            )


#: A migration stream's address (QEMU's migration URI): a host, or ``tcp://`` a host and
#: an optional port (an IPv6 address in brackets).
MIGRATION_ADDRESS_PATTERN = (
    r"^(?:tcp://)?(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]|[0-9A-Fa-f:.]{2,45})"
    r"(?::[0-9]{1,5})?$"
)


def validate_migration_address(address: str) -> None:
    """Raise ``ValueError`` unless ``address`` is where a QEMU migration stream can go:
    an IP address or host name, or ``tcp://`` one with an optional port."""
    if not address or len(address) > 255:
        raise ValueError("must be an address of at most 255 characters")
    rest = address.removeprefix("tcp://")
    if "://" in rest:
        raise ValueError("only tcp:// migration URIs are accepted")
    host, port = rest, None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail:
            if not tail.startswith(":"):
                raise ValueError("an IPv6 address in brackets may only be followed by :port")
            port = tail[1:]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    elif rest.count(":") > 1:
        try:
            ipaddress.ip_address(rest)
        except ValueError:
            raise ValueError(f"{rest!r} is not a valid IPv6 address") from None
        if address.startswith("tcp://"):
            raise ValueError("write an IPv6 address in a tcp:// URI in brackets")
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError("port must be between 1 and 65535")
    if port is not None and not address.startswith("tcp://"):
        raise ValueError("give a port only in a tcp:// URI (tcp://host:port)")
    if ":" not in host and not _valid_host(host):
        raise ValueError(f"{host!r} is not a valid host name or address")
