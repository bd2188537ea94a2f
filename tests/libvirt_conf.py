"""libvirt's configuration files as the shipped ones are written (deploy/libvirt/): whole
comment lines and ``key = value`` lines whose values are numbers, double-quoted strings
or lists of them (JSON's syntax covers libvirt's for those)."""

from __future__ import annotations

import json
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "libvirt"


def read_conf(path: Path) -> dict[str, object]:
    settings: dict[str, object] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}:{number}: not a setting: {line!r}")
        settings[key.strip()] = json.loads(value)
    return settings


def shipped(name: str) -> dict[str, object]:
    """The settings of ``deploy/libvirt/<name>``."""
    return read_conf(DEPLOY / name)
