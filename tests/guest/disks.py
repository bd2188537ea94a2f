"""Disk files around the test guest: overlays, a NoCloud seed, reading a sector back.

Made with the same tools the recipe names (``qemu-img`` of qemu-utils, ``xorriso``,
already needed by grub-mkrescue), never with a loop device or a mount.
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from pathlib import Path

SECTOR_BYTES = 512


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def make_overlay(base: Path, overlay: Path, size: str) -> Path:
    """A qcow2 overlay of ``size`` (qemu-img's notation, e.g. ``1G``) on a raw base."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(overlay), size], check=True, capture_output=True)  # fmt: skip
    return overlay


def write_seed_iso(dest: Path, files: dict[str, bytes]) -> Path:
    """An ISO 9660 volume labelled ``cidata`` holding ``files`` (Rock Ridge and Joliet
    names, so the lower-case NoCloud names survive)."""
    with tempfile.TemporaryDirectory() as folder:
        for name, data in files.items():
            Path(folder, name).write_bytes(data)
        subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", "cidata", "-J", "-r",
                        "-o", str(dest), folder], check=True, capture_output=True)  # fmt: skip
    return dest


def read_sector(image: Path, sector: int, fmt: str = "qcow2") -> bytes:
    """One sector of a disk image as a guest sees it (through the overlay's chain): a raw
    window on the image, copied out by ``qemu-img convert`` (``qemu-img dd`` counts the
    skipped blocks in ``count`` on QEMU 7.2, and may not on others)."""
    filename = str(image).replace(",", ",,")  # the option syntax's escape
    options = (f"driver=raw,offset={sector * SECTOR_BYTES},size={SECTOR_BYTES},"
               f"file.driver={fmt},file.file.driver=file,file.file.filename={filename}")  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder, "sector")
        subprocess.run(["qemu-img", "convert", "-O", "raw", "--image-opts", options, str(out)],
                       check=True, capture_output=True)  # fmt: skip
        return out.read_bytes()
