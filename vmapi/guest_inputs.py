"""Plain rules about what a guest is told (API.md "Guest configuration"): its host name,
its owner's SSH public keys and its user data, plus the SSH key fingerprints that answers
and the audit trail show instead of the keys.

Like ``vmapi/addressing.py`` this module has no Flask, no models and no session, so request
schemas and services share it. The ``validate_*`` functions are marshmallow validators
(callables raising ``marshmallow.ValidationError``), for example::

    hostname = Str(validate=validate_guest_hostname)
    ssh_keys = fields.List(Str())
    user_data = Str(validate=validate_user_data)

    @validates("ssh_keys")
    def _ssh_keys(self, value, **kwargs):
        validate_ssh_keys(value)  # errors keyed by the bad key's index

Decisions:
- A host name is one RFC 1123 label (1-63 letters, digits and hyphens, not starting or
  ending with a hyphen) or several joined by dots, 253 characters at most. Dotted names
  are allowed because cloud-init reads a dotted ``local-hostname`` as the guest's FQDN and
  sets its short name from the first label. No trailing dot, and a dotted name's last
  label is not all digits (``10.0.0.1`` is an address, not a name).
- An SSH key is one OpenSSH public key line, ``TYPE BASE64 [COMMENT]``, of a type in
  ``SSH_KEY_TYPES`` (no ``ssh-dss``, no certificates, no ``authorized_keys`` options). The
  base64 is decoded, the type named inside it must equal the outer one, and the key
  material is read field by field: nothing may be missing or left over, Ed25519 keys
  hold 32 bytes, ECDSA points are uncompressed and of their curve's size, RSA moduli
  have 2048 to 16384 bits. Whether an ECDSA point lies on its curve is left to sshd.
- User data is UTF-8 text of at most 64 KiB (encoded), without NUL or other control
  characters but tab, newline and carriage return: a cloud-config or a script.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from marshmallow import ValidationError

MAX_HOSTNAME_LENGTH = 253
MAX_USER_DATA_BYTES = 64 * 1024
MAX_SSH_KEYS = 32
#: One key line: a 16384-bit RSA key with a long comment still fits.
MAX_SSH_KEY_LENGTH = 8192
RSA_MIN_BITS = 2048
RSA_MAX_BITS = 16384
_ECDSA_POINT_BYTES = {"nistp256": 65, "nistp384": 97, "nistp521": 133}
_SK_ECDSA = "sk-ecdsa-sha2-nistp256@openssh.com"
_SK_ED25519 = "sk-ssh-ed25519@openssh.com"
SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    _SK_ECDSA,
    _SK_ED25519,
)
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_BAD_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class SshKeyError(ValueError):
    """A string that is not an acceptable OpenSSH public key; the message says why."""


@dataclass(frozen=True)
class SshPublicKey:
    """A parsed OpenSSH public key: its type, its decoded blob and its comment."""

    key_type: str
    blob: bytes
    comment: str

    @property
    def fingerprint(self) -> str:
        """As ``ssh-keygen -lf`` prints it: ``SHA256:`` and unpadded base64 of the blob's hash."""
        digest = hashlib.sha256(self.blob).digest()
        return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


class _WireReader:
    """Reads the SSH wire format (RFC 4251 §5): uint32-length-prefixed strings."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    def string(self, what: str) -> bytes:
        end = self._offset + 4
        if end > len(self._data):
            raise SshKeyError(f"The key data ends before its {what}.")
        length = int.from_bytes(self._data[self._offset : end], "big")
        if end + length > len(self._data):
            raise SshKeyError(f"The key data ends inside its {what}.")
        self._offset = end + length
        return self._data[end : end + length]

    def mpint(self, what: str) -> int:
        raw = self.string(what)
        if not raw or raw[0] & 0x80 or (raw[0] == 0 and len(raw) > 1 and not raw[1] & 0x80):
            raise SshKeyError(f"The key's {what} is not a positive integer in canonical form.")
        return int.from_bytes(raw, "big")

    def end(self) -> None:
        if self._offset != len(self._data):
            raise SshKeyError("The key data has bytes left over after the key.")


def _check_material(key_type: str, reader: _WireReader) -> None:
    """Read the fields that follow the type string; raise if any is missing or malformed."""
    if key_type in ("ssh-ed25519", _SK_ED25519):
        if len(reader.string("public key")) != 32:
            raise SshKeyError("An Ed25519 public key holds exactly 32 bytes.")
    elif key_type == "ssh-rsa":
        exponent = reader.mpint("public exponent")
        bits = reader.mpint("modulus").bit_length()
        if exponent < 3 or exponent % 2 == 0:
            raise SshKeyError("The RSA public exponent must be odd and at least 3.")
        if not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
            raise SshKeyError(
                f"RSA keys must have {RSA_MIN_BITS} to {RSA_MAX_BITS} bits, not {bits}."
            )
    else:  # the ECDSA types, FIDO or not
        curve = key_type.removesuffix("@openssh.com").rsplit("-", 1)[1]
        if reader.string("curve name") != curve.encode():
            raise SshKeyError(f"The curve named inside the key is not {curve}.")
        point = reader.string("public point")
        if len(point) != _ECDSA_POINT_BYTES[curve] or point[0] != 4:
            raise SshKeyError(f"The public point is not an uncompressed {curve} point.")
    if key_type.startswith("sk-") and not reader.string("application"):
        raise SshKeyError("A security-key public key names its application.")
    reader.end()


def parse_ssh_key(text: str) -> SshPublicKey:
    """Parse one OpenSSH public key line; raise ``SshKeyError`` saying what is wrong."""
    if not isinstance(text, str):
        raise SshKeyError("Must be a string.")
    if len(text) > MAX_SSH_KEY_LENGTH:
        raise SshKeyError(f"Longer than {MAX_SSH_KEY_LENGTH} characters.")
    if "\n" in text.strip() or "\r" in text.strip():
        raise SshKeyError("Holds more than one line: give one key per list entry.")
    if _BAD_TEXT.search(text):
        raise SshKeyError("Holds control characters.")
    parts = text.split(maxsplit=2)
    if len(parts) < 2:
        raise SshKeyError("Not an OpenSSH public key: expected 'TYPE BASE64 [COMMENT]'.")
    key_type, encoded = parts[0], parts[1]
    if key_type not in SSH_KEY_TYPES:
        raise SshKeyError(
            f"Unknown key type {key_type[:40]!r}; use one of {', '.join(SSH_KEY_TYPES)}."
        )
    try:
        blob = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SshKeyError("The key data is not valid base64.") from exc
    reader = _WireReader(blob)
    inner = reader.string("type name")
    if inner != key_type.encode():
        raise SshKeyError(
            f"The key data says {inner.decode('ascii', 'replace')[:40]!r}, not {key_type!r}."
        )
    _check_material(key_type, reader)
    return SshPublicKey(key_type, blob, parts[2].strip() if len(parts) > 2 else "")


def ssh_key_fingerprint(text: str) -> str:
    """The SHA256 fingerprint of one public key line (which must be valid)."""
    return parse_ssh_key(text).fingerprint


def ssh_key_fingerprints(keys: list[str]) -> list[str]:
    """The fingerprints of valid keys, in their order (what answers show for ``ssh_keys``)."""
    return [ssh_key_fingerprint(key) for key in keys]


def validate_guest_hostname(value: Any) -> None:
    """A guest's host name: RFC 1123 labels, dotted FQDNs allowed (see the module)."""
    if not isinstance(value, str):
        raise ValidationError("Must be a string.")
    if not 1 <= len(value) <= MAX_HOSTNAME_LENGTH:
        raise ValidationError(f"Must have 1 to {MAX_HOSTNAME_LENGTH} characters.")
    labels = value.split(".")
    if "" in labels:
        raise ValidationError("Must not start or end with a dot or hold two dots in a row.")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise ValidationError(
                f"Label {label[:70]!r} must have 1 to 63 letters, digits or hyphens, "
                "and not start or end with a hyphen."
            )
    if len(labels) > 1 and labels[-1].isdigit():
        raise ValidationError("The last label must not be all digits.")


def validate_ssh_key(value: Any) -> None:
    """One OpenSSH public key (for a validator on each element of a list field)."""
    try:
        parse_ssh_key(value)
    except SshKeyError as exc:
        raise ValidationError(str(exc)) from exc


def validate_ssh_keys(value: Any) -> None:
    """A list of OpenSSH public keys, each checked; errors are keyed by the bad key's
    index (``{"ssh_keys": {"2": [...]}}`` in the envelope). The same key twice is refused."""
    if not isinstance(value, list):
        raise ValidationError("Must be a list of OpenSSH public keys.")
    if len(value) > MAX_SSH_KEYS:
        raise ValidationError(f"At most {MAX_SSH_KEYS} keys.")
    errors: dict[int, list[str]] = {}
    seen: dict[bytes, int] = {}
    for index, text in enumerate(value):
        try:
            blob = parse_ssh_key(text).blob
        except SshKeyError as exc:
            errors[index] = [f"Key {index}: {exc}"]
            continue
        if blob in seen:
            errors[index] = [f"Key {index} is the same key as key {seen[blob]}."]
        seen.setdefault(blob, index)
    if errors:
        raise ValidationError(errors)


def validate_user_data(value: Any) -> None:
    """User data: UTF-8 text of at most 64 KiB once encoded."""
    if not isinstance(value, str):
        raise ValidationError("Must be a string.")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValidationError("Must be valid Unicode text (no lone surrogates).") from exc
    if size > MAX_USER_DATA_BYTES:
        raise ValidationError(f"At most {MAX_USER_DATA_BYTES} bytes as UTF-8, not {size}.")
    if _BAD_TEXT.search(value):
        raise ValidationError("Must be text: no NUL or control characters but tab and newlines.")
