"""Image files made at test time with the real qemu-img, and the helpers to send them."""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

from tests.conftest import unavailable

OCTET = {"Content-Type": "application/octet-stream"}
MIB = 1024**2


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ImageFiles:
    """``files.qcow2("16M")``, ``files.qcow2("1M", "-b", "/etc/shadow", "-F", "raw")``,
    ``files.raw(2 * MIB)``: the bytes of a new image file."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("qemu-img") is None:
            unavailable("qemu-img (Debian: qemu-utils) is not installed")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, suffix: str) -> Path:
        return self.directory / f"{uuid.uuid4().hex}.{suffix}"

    def create(self, fmt: str, size: str, *options: str) -> bytes:
        path = self.path(fmt)
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *options, str(path), size],
                       check=True, capture_output=True)  # fmt: skip
        return path.read_bytes()

    def qcow2(self, size: str = "16M", *options: str) -> bytes:
        return self.create("qcow2", size, *options)

    def raw(self, size: int) -> bytes:
        # not all zeros, so that a byte lost or moved shows in the checksum
        block = bytes(range(256)) * 4096
        return (block * (size // len(block) + 1))[:size]

    def with_data_file(self) -> bytes:
        """A qcow2 whose clusters live in another file (``-o data_file=``)."""
        data = self.path("data")
        return self.qcow2("1M", "-o", f"data_file={data}")

    def encrypted(self) -> bytes:
        """A qcow2 whose header says AES encryption (crypt_method 1), made by editing a
        plain one's header: qemu-img's own LUKS encryption needs a working key derivation
        benchmark, which not every machine has."""
        header = bytearray(self.qcow2("1M"))
        struct.pack_into(">I", header, 32, 1)
        return bytes(header)
