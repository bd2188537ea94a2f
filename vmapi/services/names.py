"""Names on the hypervisor: this installation's id and the names it gives what it makes.

Two installations may share hosts (staging next to production, a database restored
from a backup), so every name vmapi makes on a host carries the installation's id:

- a domain is ``<installation>-vm-<vm id>`` and a volume ``<installation>-storage-<id>``;
  both are stored on their row when it is made, and used from then on (rows made
  before names carried the id keep ``vm-<id>`` and ``vmapi-storage-<id>``); an image's
  base copy on a node is ``<installation>-image-<image id>``, a console log
  ``<domain name>.log``;
- host devices must fit Linux's 15 characters, so an interface's devices are named
  from a 4-character tag of the installation's id and the last 3 octets of its MAC
  (unique per database): ``<tag>-<6 hex digits>``, the tap ``vm<that>`` (13
  characters) and the bridge ``br-<that>`` (14), whatever the ids.

The id is ``VMAPI_INSTALLATION_ID`` when configured, else the one kept in the database
(made once by ``flask vmapi seed``; the migration that brought it in keeps ``vmapi``,
the old default, for a database that already runs VMs).
"""

from __future__ import annotations

import hashlib
import secrets

from flask import current_app
from sqlalchemy import select

from vmapi.extensions import db
from vmapi.models import Installation

CACHE_KEY = "vmapi.installation_id"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TAG_ALPHABET = "0123456789" + LETTERS
TAG_LENGTH = 4


class NotSeeded(RuntimeError):
    """The database has no installation id and none is configured."""


def installation_id() -> str:
    """The id in force: the configured one, else the database's (read once per app)."""
    configured = current_app.config["INSTALLATION_ID"]
    if configured:
        return configured
    cached = current_app.extensions.get(CACHE_KEY)
    if cached is None:
        cached = stored_installation_id()
        if cached is None:
            raise NotSeeded(
                "This database has no installation id and VMAPI_INSTALLATION_ID is not set; "
                "run `flask vmapi seed`."
            )
        current_app.extensions[CACHE_KEY] = cached
    return cached


def new_installation_id() -> str:
    """A fresh id: ``vmapi-`` and 8 random hex digits (14 characters)."""
    return f"vmapi-{secrets.token_hex(4)}"


def stored_installation_id() -> str | None:
    return db.session.scalars(select(Installation.installation_id)).first()


def ensure_installation_id() -> tuple[str, bool]:
    """Keep an installation id in the database (the configured one, else a new one) if it
    has none; (the stored id, whether it was made now). The caller commits."""
    stored = stored_installation_id()
    if stored is not None:
        return stored, False
    made = current_app.config["INSTALLATION_ID"] or new_installation_id()
    db.session.add(Installation(id=1, installation_id=made))
    current_app.extensions.pop(CACHE_KEY, None)
    return made, True


def domain_name(vm_id: int) -> str:
    return f"{installation_id()}-vm-{vm_id}"


def volume_name(storage_id: int) -> str:
    return f"{installation_id()}-storage-{storage_id}"


def image_volume_name(image_id: int) -> str:
    return f"{installation_id()}-image-{image_id}"


def save_volume_name(image_id: int) -> str:
    """The temporary copy of a disk being saved as image ``image_id``, on the disk's node
    (:mod:`vmapi.services.images.saving`)."""
    return f"{installation_id()}-save-{image_id}"


def saved_image_id(volume: str) -> int | None:
    """The image whose save a volume named so is the temporary copy of (None: not one)."""
    prefix = f"{installation_id()}-save-"
    rest = volume[len(prefix) :] if volume.startswith(prefix) else ""
    return int(rest) if rest.isdigit() else None


def console_log_name(domain: str) -> str:
    return f"{domain}.log"


def device_tag(installation: str) -> str:
    """4 characters standing for the installation (from its SHA-256): a letter, so the
    suffix never looks like an old ``<vm id>-<interface id>`` one, then 3 of [0-9a-z]."""
    number = int.from_bytes(hashlib.sha256(installation.encode()).digest()[:8], "big")
    number, first = divmod(number, len(LETTERS))
    tag = LETTERS[first]
    for _ in range(TAG_LENGTH - 1):
        number, digit = divmod(number, len(TAG_ALPHABET))
        tag += TAG_ALPHABET[digit]
    return tag


def device_suffix(installation: str, mac: str) -> str:
    """The part of an interface's host device names that identifies it (11 characters)."""
    return f"{device_tag(installation)}-{mac.replace(':', '')[6:]}"


def interface_device_suffix(mac: str) -> str:
    return device_suffix(installation_id(), mac)
