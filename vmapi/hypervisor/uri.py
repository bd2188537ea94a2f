"""Validation of libvirt connection URIs given by admins: one grammar, said once.

An admin token is not a key to the hosts. libvirt can be told by a URI to run a program
(the ``ext`` transport, ``command=``, ``netcat=``), to paste a value into the shell
command it runs on the far side of ssh (``socket=``: libvirt decodes %-escapes and quotes
nothing), to have the remote libvirtd open another URI (``name=``), or to read a file and
answer its first line in an error (the ``test`` driver). So every part of a URI, every
parameter *value* included, is matched against an allow-list:

- ``driver[+transport]://[user@]host[:port]/system[?params]`` for the remote transports
  ssh, libssh, libssh2, tls and tcp; ``driver[+unix]:///system`` or ``/session`` locally;
  the ``test`` driver only locally, as ``test:///default`` or a node XML file under the
  configured ``TEST_DRIVER_DIR``;
- the parameters each transport takes (libvirt's "Extra parameters", uri.html), each with
  the grammar of its value; no ``%``-escapes, quotes, ``;``, ``$``, backticks or spaces
  anywhere; ``name``, ``command``, ``netcat`` and ``tls_priority`` refused;
- ``keyfile``, ``known_hosts`` and ``pkipath`` only under ``LIBVIRT_CREDENTIAL_DIRS``.

:data:`URI_PATTERN` (the OpenAPI document's pattern) is built from the same tables as
:func:`validate_libvirt_uri`, which accepts exactly the strings the pattern matches and
whose directories the :class:`UriPolicy` allows (tests/unit/test_uri_property.py).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: Hypervisor drivers vmapi can manage.
DRIVERS = ("bhyve", "ch", "libxl", "lxc", "qemu", "test", "vz", "xen")
#: Transports of a local connection ('' is the plain one) and of a remote one.
LOCAL_TRANSPORTS = ("", "unix")
REMOTE_TRANSPORTS = ("libssh2", "libssh", "ssh", "tls", "tcp")
TRANSPORTS = LOCAL_TRANSPORTS + REMOTE_TRANSPORTS
_SSH = frozenset({"ssh", "libssh", "libssh2"})
_LIBSSH = frozenset({"libssh", "libssh2"})
_SOCKET = frozenset({"", "unix"}) | _SSH

#: A path segment: letters, digits, ``_ . -``, never ``.`` or ``..`` (nor all dots).
_SEGMENT = r"\.{0,2}[A-Za-z0-9_-][A-Za-z0-9_.-]*"
#: An absolute path of such segments.
ABS_PATH = rf"(?:/{_SEGMENT})+"
_PATH_WORDS = "an absolute path of letters, digits, _ . - and / without . or .. segments"
_USER = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}"
#: Host names of up to six labels of up to 41 characters: within DNS's 253 in all.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,39}[A-Za-z0-9])?"
_HOSTNAME = rf"{_LABEL}(?:\.{_LABEL}){{0,5}}"
_H16 = "[0-9A-Fa-f]{1,4}"
_IPV6 = "|".join(
    (
        rf"(?:{_H16}:){{7}}{_H16}",
        rf"(?:{_H16}:){{1,7}}:",
        *(rf"(?:{_H16}:){{1,{7 - n}}}(?::{_H16}){{1,{n}}}" for n in range(1, 7)),
        rf":(?:(?::{_H16}){{1,7}}|:)",
    )
)
_PORT = (
    r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]"
    r"|6553[0-5])"
)
_AUTHORITY = rf"(?:{_USER}@)?(?:{_HOSTNAME}|\[(?:{_IPV6})\])(?::{_PORT})?"


@dataclass(frozen=True)
class Param:
    """A parameter libvirt's remote driver takes: its value's grammar, in words too,
    the transports it applies to, and whether it names a file on the API host that must
    lie under LIBVIRT_CREDENTIAL_DIRS."""

    grammar: str
    words: str
    transports: frozenset[str]
    credential: bool = False


PARAMS: dict[str, Param] = {
    "socket": Param(ABS_PATH, _PATH_WORDS, _SOCKET),
    "mode": Param("auto|legacy|direct", "auto, legacy or direct", _SOCKET),
    "proxy": Param("auto|netcat|native", "auto, netcat or native", _SSH),
    "keyfile": Param(ABS_PATH, _PATH_WORDS, _SSH, credential=True),
    "known_hosts": Param(ABS_PATH, _PATH_WORDS, _LIBSSH, credential=True),
    "known_hosts_verify": Param("normal|auto|ignore", "normal, auto or ignore", _LIBSSH),
    "sshauth": Param(
        "(?:agent|privkey|password|keyboard-interactive)"
        "(?:,(?:agent|privkey|password|keyboard-interactive))*",
        "a comma-separated list of agent, privkey, password and keyboard-interactive",
        _LIBSSH,
    ),
    "no_verify": Param("[01]", "0 or 1", _SSH | {"tls"}),
    "no_tty": Param("[01]", "0 or 1", _SSH),
    "pkipath": Param(ABS_PATH, _PATH_WORDS, frozenset({"tls"}), credential=True),
}
#: Parameters libvirt knows that are refused, and why.
REFUSED = {
    "name": "it makes the remote libvirtd open a URI of its choosing",
    "command": "it runs a program",
    "netcat": "it runs a program",
    "tls_priority": "set tls_priority in libvirt.conf on the API host instead",
}


def _query(transport: str) -> str:
    names = sorted(n for n, p in PARAMS.items() if transport in p.transports)
    if not names:
        return ""
    one = "(?:" + "|".join(f"{n}=(?:{PARAMS[n].grammar})" for n in names) + ")"
    return rf"(?:\?{one}(?:&{one})*)?"


def _uri_body() -> str:
    """The grammar as one regular expression (without anchors)."""
    others = "|".join(d for d in DRIVERS if d != "test")
    local = _query("")  # the same parameters as +unix
    alternatives = [
        rf"(?:{others})(?:\+unix)?:///(?:system|session){local}",
        rf"test(?:\+unix)?://{ABS_PATH}{local}",
    ]
    groups: dict[str, list[str]] = {}
    for transport in REMOTE_TRANSPORTS:
        groups.setdefault(_query(transport), []).append(transport)
    for query, transports in groups.items():
        alternatives.append(
            rf"(?:{others})\+(?:{'|'.join(transports)})://{_AUTHORITY}/system{query}"
        )
    return "(?:" + "|".join(alternatives) + ")"


_BODY = _uri_body()
_GRAMMAR = re.compile(_BODY)
#: The OpenAPI document's pattern for a libvirt URI: the grammar above (directories are
#: said in words).
URI_PATTERN = f"^{_BODY}$"
MAX_LENGTH = 1024

#: Where key files, known_hosts files and TLS certificate folders may be, by default.
DEFAULT_CREDENTIAL_DIRS = ("/etc/vmapi/ssh", "/etc/pki/vmapi", "/etc/pki/libvirt")


@dataclass(frozen=True)
class UriPolicy:
    """The configuration-dependent half of the rules: where the test driver's node files
    and the credential files a URI names may be."""

    test_driver_dir: str | None = None
    credential_dirs: tuple[str, ...] = DEFAULT_CREDENTIAL_DIRS

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UriPolicy:
        test_dir = config.get("TEST_DRIVER_DIR") or None
        dirs = config.get("LIBVIRT_CREDENTIAL_DIRS", DEFAULT_CREDENTIAL_DIRS)
        return cls(str(test_dir) if test_dir else None, tuple(str(d) for d in dirs))


def matches_grammar(uri: str) -> bool:
    """Whether ``uri`` matches :data:`URI_PATTERN` (whatever the directories)."""
    return isinstance(uri, str) and len(uri) <= MAX_LENGTH and bool(_GRAMMAR.fullmatch(uri))


def _under(path: str, dirs: Iterable[str]) -> bool:
    real = os.path.realpath(path)
    for folder in dirs:
        base = os.path.realpath(folder)
        if real == base or real.startswith(base.rstrip("/") + "/"):
            return True
    return False


def validate_libvirt_uri(uri: str, policy: UriPolicy) -> None:
    """Raise ``ValueError`` naming the part of ``uri`` that is not acceptable."""
    if not isinstance(uri, str) or not uri or len(uri) > MAX_LENGTH:
        raise ValueError(f"must be a libvirt URI of at most {MAX_LENGTH} characters")
    _explain(uri)
    if not _GRAMMAR.fullmatch(uri):  # what _explain lets through is refused here all the same
        raise ValueError("does not follow the grammar of libvirt URIs vmapi accepts")
    scheme, _, rest = uri.partition("://")
    path, _, query = ("/" + rest.partition("/")[2]).partition("?")
    test_file = scheme.partition("+")[0] == "test" and path != "/default"
    if test_file and not (policy.test_driver_dir and _under(path, [policy.test_driver_dir])):
        raise ValueError(
            f"path {path!r}: the test driver opens test:///default, or node files under "
            f"TEST_DRIVER_DIR ({policy.test_driver_dir or 'not set'})"
        )
    for key, _, value in (item.partition("=") for item in query.split("&") if query):
        if PARAMS[key].credential and not _under(value, policy.credential_dirs):
            raise ValueError(
                f"parameter {key!r} must name a file under LIBVIRT_CREDENTIAL_DIRS "
                f"({', '.join(policy.credential_dirs) or 'none'})"
            )


def _explain(uri: str) -> None:
    """Raise ``ValueError`` naming the first part of ``uri`` outside the grammar."""
    if any(ord(c) < 33 or ord(c) == 127 for c in uri):
        raise ValueError("must not contain spaces or control characters")
    if "#" in uri:
        raise ValueError("must not have a #fragment")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise ValueError("must be driver[+transport]://[host]/path")
    driver, _, transport = scheme.partition("+")
    if driver not in DRIVERS:
        raise ValueError(f"driver {driver!r} is not supported; use one of {', '.join(DRIVERS)}")
    if transport not in TRANSPORTS:
        raise ValueError(
            f"transport {transport!r} is not allowed; use ssh, libssh, libssh2, tls, tcp, "
            "unix or a local URI"
        )
    authority, slash, tail = rest.partition("/")
    path, _, query = (slash + tail).partition("?")
    if transport in LOCAL_TRANSPORTS:
        if authority and driver != "test":
            # A host without a transport means TLS in libvirt; say it explicitly.
            raise ValueError("name the transport for a remote host, e.g. qemu+ssh://host/system")
        if authority:
            raise ValueError("the test driver is local only: test:///default")
    else:
        if driver == "test":
            raise ValueError("the test driver is local only: test:///default")
        _explain_authority(authority)
    if driver == "test":
        if not re.fullmatch(ABS_PATH, path):
            raise ValueError(f"path {path!r} must be /default or {_PATH_WORDS}")
    elif path not in (("/system", "/session") if transport in LOCAL_TRANSPORTS else ("/system",)):
        where = "/system or /session" if transport in LOCAL_TRANSPORTS else "/system"
        raise ValueError(f"path {path!r} is not allowed; use {where}")
    if "?" in uri and not query:
        raise ValueError("must not end in an empty query")
    for item in query.split("&") if query else ():
        key, _, value = item.partition("=")
        if key in REFUSED:
            raise ValueError(f"parameter {key!r} is refused: {REFUSED[key]}")
        if key not in PARAMS:
            raise ValueError(f"parameter {key!r} is not allowed")
        param = PARAMS[key]
        if transport not in param.transports:
            raise ValueError(
                f"parameter {key!r} does not apply to the {transport or 'local'} transport"
            )
        if not re.fullmatch(param.grammar, value):
            raise ValueError(
                f"parameter {key!r} must be {param.words} (no %-escapes), not {value!r}"
            )


def _explain_authority(authority: str) -> None:
    user, at, hostport = authority.rpartition("@")
    if at and ":" in user:
        raise ValueError("must not carry a password; use keys or certificates")
    if at and not re.fullmatch(_USER, user):
        raise ValueError(f"user name {user!r} is not allowed")
    if hostport.startswith("["):
        host, _, port = hostport[1:].partition("]")
        if port and not port.startswith(":"):
            raise ValueError("an IPv6 address in brackets may only be followed by :port")
        port = port[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"host [{host}] is not an IPv6 address") from None
    else:
        host, _, port = hostport.partition(":")
        if not host:
            raise ValueError("a remote transport needs a host")
        if not re.fullmatch(_HOSTNAME, host):
            raise ValueError(
                f"host {host!r} is not a host name (up to six labels of letters, digits and "
                "'-', up to 41 characters each) or an IPv4 address"
            )
    if port and not re.fullmatch(_PORT, port):
        raise ValueError("port must be between 1 and 65535")


#: A migration stream's address (QEMU's migration URI): a host, or ``tcp://`` a host and
#: an optional port (an IPv6 address in brackets).
MIGRATION_ADDRESS_PATTERN = (
    r"^(?:tcp://)?(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]|[0-9A-Fa-f:.]{2,45})"
    r"(?::[0-9]{1,5})?$"
)


def _valid_host(host: str) -> bool:
    """A DNS name or an IP address; never something ssh could read as an option."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    label = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    return len(host) <= 253 and all(re.fullmatch(label, part) for part in labels)


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
