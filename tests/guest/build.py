"""Builds vmapi's test guest: a small bootable disk image, made at test time.

The image follows ../shared/recipes/test-guest.md: Debian's cloud kernel, a
busybox-static initramfs whose ``/init`` is assembled from ``init/*.sh`` (plus the files
under ``rootfs/`` and the static helpers compiled from ``src/*.c``), and GRUB made into a hybrid image by ``grub-mkrescue``, which SeaBIOS
boots as a virtio disk with the console on the first serial port. Only package tools are
used: no loop device, no mount.

Built images are cached outside the repository (``VMAPI_TEST_GUEST_CACHE``, default
``/var/cache/vmapi-test-guest``) under a key made of the kernel's release and a hash of
everything that goes into the image, so a test session builds at most once and later
sessions reuse it. A build runs in a temporary folder inside the cache, under a lock
file (a second process waits instead of building twice), and is published by renaming
the finished folder into place: a reader never sees half an image, and a build killed
half-way leaves nothing that is ever used.

``python -m tests.guest.build [--cache-dir DIR]`` builds (or finds) it and prints JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE_ENV = "VMAPI_TEST_GUEST_CACHE"
DEFAULT_CACHE = Path("/var/cache/vmapi-test-guest")
IMAGE = "guest.img"
INFO = "info.json"
META_PACKAGE = "linux-image-cloud-amd64"
# Debian packages the build runs or copies from; their versions are part of the key.
# gcc and libc6-dev: the guest's static helpers (src/*.c, see compile_helpers).
BUILD_PACKAGES = ("busybox-static", "cpio", "grub-pc-bin", "grub-common", "xorriso", "mtools",
                  "gcc", "libc6-dev")  # fmt: skip
#: the guest's own programs: src/NAME.c becomes /bin/NAME (static, so no libc in the guest)
HELPERS = ("vmapi-sendframe",)
# The recipe's order (each after what it needs), then the ACPI button and the event
# device that busybox acpid reads the power button from.
MODULES = (
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "failover", "net_failover", "virtio_net", "virtio_blk", "cdrom", "isofs", "button", "evdev",
)  # fmt: skip
# The guest writes its marker 64 MiB into the root disk: past the image's end (checked
# below), so only a root disk larger than the image (an overlay) receives it.
MARKER_SECTOR = 131072
SECTOR_BYTES = 512
#: On the guest's kernel command line: the kernel hands it to /init as a variable, and
#: /init and the helpers under rootfs/ refuse to run without it (never on a host).
GUEST_MARKER = "vmapi_test_guest=1"
GRUB_CFG = """\
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
menuentry "vmapi test guest" {
    linux /boot/vmlinuz console=ttyS0 vmapi_test_guest=1
    initrd /boot/initrd.gz
}
"""
assert GUEST_MARKER in GRUB_CFG


class GuestUnavailable(Exception):
    """What the build needs is not on this machine (a skip locally, a failure in CI)."""


class GuestBuildError(RuntimeError):
    """A build step failed."""


@dataclass(frozen=True)
class GuestImage:
    """A built test guest: a raw hybrid disk image in the cache."""

    path: Path
    key: str
    kernel_package: str
    kernel_version: str
    kernel_release: str
    sha256: str
    size: int
    build_seconds: float
    built: bool  # built by this call (False: found in the cache)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def run(cmd: list[str | Path], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run([str(c) for c in cmd], capture_output=True, env=env, **kw)
    if result.returncode != 0:
        stderr = result.stderr if isinstance(result.stderr, str) else result.stderr.decode()
        raise GuestBuildError(f"{' '.join(map(str, cmd))} failed: {stderr.strip()[-2000:]}")
    return result


def package_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of ``packages``; GuestUnavailable names any that are missing."""
    versions = {}
    for package in packages:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Status}|${Version}", package],
                                capture_output=True, text=True)  # fmt: skip
        status, _, version = result.stdout.partition("|")
        if result.returncode == 0 and status == "install ok installed":
            versions[package] = version
    missing = [p for p in packages if p not in versions]
    if missing:
        raise GuestUnavailable(f"the test guest needs Debian packages {', '.join(missing)}")
    return versions


def _apt(cmd: list[str], **kw) -> str:
    """An apt query or download; once more after ``apt-get update`` when it fails (stale
    or missing package lists)."""
    try:
        return run(cmd, text=True, **kw).stdout
    except GuestBuildError:
        if os.geteuid() != 0:
            raise
    run(["apt-get", "update", "-qq"], text=True)
    return run(cmd, text=True, **kw).stdout


def resolve_kernel() -> tuple[str, str, str]:
    """The kernel package the cloud meta-package depends on: (package, version, release)."""
    depends = _apt(["apt-cache", "depends", META_PACKAGE])
    found = re.search(r"Depends: (linux-image-(\S+-cloud-amd64))\s", depends)
    if not found:
        raise GuestBuildError(f"{META_PACKAGE} names no cloud kernel:\n{depends}")
    package, release = found.groups()
    show = _apt(["apt-cache", "show", "--no-all-versions", package])
    version = re.search(r"^Version: (\S+)$", show, re.MULTILINE)
    if not version:
        raise GuestBuildError(f"no version of {package} in:\n{show}")
    return package, version.group(1), release


def inputs_digest(source: Path, versions: dict[str, str]) -> str:
    """A hash of what goes into the image: this builder, the init parts, the files under
    rootfs/ (names, modes and contents), the helpers' sources under src/ and the versions
    of the packages used (the compiler and the C library among them)."""
    digest = hashlib.sha256()
    paths = [source / "build.py", *sorted((source / "init").rglob("*")),
             *sorted((source / "rootfs").rglob("*")), *sorted((source / "src").rglob("*"))]  # fmt: skip
    for path in paths:
        if path.is_file():
            mode = path.stat().st_mode & 0o111
            digest.update(f"{path.relative_to(source)}\0{mode:o}\0".encode())
            digest.update(path.read_bytes())
    digest.update(json.dumps(versions, sort_keys=True).encode())
    return digest.hexdigest()


def init_script(source: Path) -> str:
    """``/init``: the parts under init/ in name order."""
    return "\n".join(part.read_text() for part in sorted((source / "init").glob("*.sh")))


def _module_file(modules: Path, name: str) -> Path | None:
    """The module's file; None when it is built into the kernel."""
    found = sorted(modules.joinpath("kernel").rglob(f"{name}.ko*"))
    if found:
        return found[0]
    builtin = modules / "modules.builtin"
    if builtin.exists() and any(
        Path(line).name == f"{name}.ko" for line in builtin.read_text().split()
    ):
        return None
    raise GuestBuildError(f"kernel module {name} not found under {modules}")


def compile_helpers(source: Path, bin_dir: Path) -> None:
    """src/NAME.c into ``bin_dir``/NAME: static (the guest has no C library), small,
    stripped, and refused on any warning."""
    for name in HELPERS:
        run(["gcc", "-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror",
             "-o", bin_dir / name, source / "src" / f"{name}.c"])  # fmt: skip
        (bin_dir / name).chmod(0o755)


def initramfs_tree(tree: Path, modules: Path, source: Path) -> None:
    """The initramfs's files: busybox, the helpers, /init, the modules, the guest's
    settings."""
    shutil.copytree(source / "rootfs", tree, dirs_exist_ok=True)
    (tree / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy(Path("/bin/busybox"), tree / "bin" / "busybox")
    compile_helpers(source, tree / "bin")
    (tree / "init").write_text(init_script(source))
    (tree / "init").chmod(0o755)
    settings = tree / "etc" / "vmapi-guest"
    settings.mkdir(parents=True, exist_ok=True)
    kept = []
    (tree / "lib" / "modules").mkdir(parents=True)
    for name in MODULES:
        found = _module_file(modules, name)
        if found is None:
            continue
        data = found.read_bytes()
        if found.name.endswith(".ko.xz"):  # later Debian kernels compress their modules
            data = lzma.decompress(data)
        elif not found.name.endswith(".ko"):
            raise GuestBuildError(f"cannot unpack module {found.name}")
        (tree / "lib" / "modules" / f"{name}.ko").write_bytes(data)
        kept.append(name)
    (settings / "modules").write_text("".join(f"{name}\n" for name in kept))
    (settings / "env").write_text(f"MARKER_SECTOR={MARKER_SECTOR}\n")


def write_initrd(tree: Path, dest: Path) -> None:
    """``find . | cpio -o -H newc | gzip``, with files owned by root."""
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    listing = "".join(f"{name}\n" for name in names).encode()
    archive = run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=tree, input=listing)
    with gzip.GzipFile(dest, "wb", mtime=0) as out:
        out.write(archive.stdout)


def build_into(work: Path, package: str, release: str) -> Path:
    """Build the image under ``work``; returns the folder holding it."""
    debs = work / "deb"
    debs.mkdir()
    debs.chmod(0o755)  # apt's download sandbox user must reach it
    _apt(["apt-get", "download", "-qq", package], cwd=debs)
    deb = next(debs.glob("*.deb"))
    kernel = work / "kernel"
    run(["dpkg-deb", "-x", deb, kernel])
    modules = next(
        p for p in (kernel / "lib/modules" / release, kernel / "usr/lib/modules" / release)
        if p.is_dir()
    )  # fmt: skip
    iso = work / "iso"
    (iso / "boot" / "grub").mkdir(parents=True)
    shutil.copy(kernel / "boot" / f"vmlinuz-{release}", iso / "boot" / "vmlinuz")
    initramfs_tree(work / "initramfs", modules, HERE)
    write_initrd(work / "initramfs", iso / "boot" / "initrd.gz")
    (iso / "boot" / "grub" / "grub.cfg").write_text(GRUB_CFG)
    out = work / "image"
    out.mkdir()
    run(["grub-mkrescue", "-o", out / IMAGE, iso])
    size = (out / IMAGE).stat().st_size
    if size > MARKER_SECTOR * SECTOR_BYTES:
        raise GuestBuildError(f"the image ({size} bytes) reaches the marker's sector")
    return out


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load(entry: Path, built: bool) -> GuestImage:
    info = json.loads((entry / INFO).read_text())
    return GuestImage(path=entry / IMAGE, built=built, **info)


def ensure_guest_image(cache: Path | None = None) -> GuestImage:
    """The test guest for the current kernel and builder: from the cache, or built now."""
    cache = Path(cache) if cache else cache_dir()
    versions = package_versions(BUILD_PACKAGES)
    package, version, release = resolve_kernel()
    key = f"{release}-{inputs_digest(HERE, {**versions, package: version})[:16]}"
    entry = cache / key
    if (entry / INFO).exists():
        return _load(entry, built=False)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        cache.chmod(0o755)  # QEMU's user reads the image through it
    except PermissionError as exc:
        raise GuestUnavailable(f"cannot write the guest cache {cache} (set {CACHE_ENV})") from exc
    with _locked(cache / ".lock"):
        if (entry / INFO).exists():  # built by the process we waited for
            return _load(entry, built=False)
        # Holding the lock, no one else is building: these are left by killed builds.
        for stale in cache.glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            started = time.monotonic()
            out = build_into(work, package, release)
            image = out / IMAGE
            with open(image, "rb") as f:
                sha256 = hashlib.file_digest(f, "sha256").hexdigest()
            info = {"key": key, "kernel_package": package, "kernel_version": version,
                    "kernel_release": release, "sha256": sha256, "size": image.stat().st_size,
                    "build_seconds": round(time.monotonic() - started, 1)}  # fmt: skip
            (out / INFO).write_text(json.dumps(info, indent=2) + "\n")
            image.chmod(0o644)
            out.chmod(0o755)
            os.rename(out, entry)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return _load(entry, built=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, help=f"default ${CACHE_ENV} or {DEFAULT_CACHE}")
    args = parser.parse_args(argv)
    try:
        image = ensure_guest_image(args.cache_dir)
    except GuestUnavailable as exc:
        print(exc, file=sys.stderr)
        return 2
    print(json.dumps({**asdict(image), "path": str(image.path)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
