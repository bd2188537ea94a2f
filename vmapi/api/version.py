"""API versions in URLs: ``vX``, ``vX.Y`` or ``vX.Y.Z``; a missing part is 0."""

from __future__ import annotations

import re

from vmapi.error_ids import GENERAL_VERSION_MALFORMED, GENERAL_VERSION_UNSUPPORTED
from vmapi.errors import ApiError

SUPPORTED = {(1, 0, 0)}
_VERSION = re.compile(r"^v(\d{1,9})(?:\.(\d{1,9}))?(?:\.(\d{1,9}))?$")


class VersionMalformed(ApiError):
    status_code = 400
    error_id = GENERAL_VERSION_MALFORMED
    template = "{version!r} is not a version; use vX, vX.Y or vX.Y.Z, e.g. v1."


class VersionUnsupported(ApiError):
    status_code = 404
    error_id = GENERAL_VERSION_UNSUPPORTED
    template = "API version {version} is not served here; this server speaks v1.0.0."


def parse_version(text: str) -> tuple[int, int, int]:
    """``"v1.2"`` -> ``(1, 2, 0)``; 400 if malformed."""
    match = _VERSION.match(text)
    if not match:
        raise VersionMalformed(version=text)
    major, minor, patch = (int(part) if part else 0 for part in match.groups())
    return major, minor, patch


def check_version(text: str) -> tuple[int, int, int]:
    """Parse and require a supported version (404 otherwise)."""
    version = parse_version(text)
    if version not in SUPPORTED:
        raise VersionUnsupported(version=".".join(map(str, version)))
    return version
