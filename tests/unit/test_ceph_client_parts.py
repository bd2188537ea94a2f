"""Parts of the API host's Ceph clients that need no cluster: scripts/link-ceph-bindings.sh
(Ceph's Python bindings linked into a virtualenv of the test's own), a tool killed at its
bound saying the bound (vmapi/hypervisor/rbd.py), and the in-process client's errors
mapped to the tool client's classes (vmapi/hypervisor/librbd.py)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmapi.hypervisor.librbd import _failure
from vmapi.hypervisor.rbd import CephAccess, RbdBusy, RbdClient, RbdError, RbdNotFound, RbdTimeout

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "link-ceph-bindings.sh"
DEBIAN = Path("/usr/lib/python3/dist-packages")


def venv(tmp_path: Path) -> tuple[Path, str, Path]:
    """A bare virtualenv of this Python: its folder, its modules' suffix, its site-packages."""
    made = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(made)], check=True)
    python = made / "bin" / "python"
    said = subprocess.run([str(python), "-c", "import sysconfig as s; print(s.get_config_var("
                           "'EXT_SUFFIX'), s.get_paths()['platlib'])"], check=True,
                          capture_output=True, text=True).stdout.split()  # fmt: skip
    return made, said[0], Path(said[1])


def link(made: Path, dist: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VMAPI_CEPH_BINDINGS_DIR": str(dist)}
    return subprocess.run([str(SCRIPT), str(made)], env=env, capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip


def test_the_script_links_exactly_the_two_modules_once(tmp_path):
    made, suffix, site = venv(tmp_path)
    if not (DEBIAN / f"rados{suffix}").exists():
        pytest.skip("Debian's python3-rados and python3-rbd are not installed (make test does)")
    first = link(made, DEBIAN)
    assert "linked Ceph's Python bindings (rados rbd)" in first.stderr
    linked = sorted(p.name for p in site.iterdir() if p.is_symlink())
    assert linked == [f"rados{suffix}", f"rbd{suffix}"]
    assert (site / f"rbd{suffix}").resolve() == (DEBIAN / f"rbd{suffix}").resolve()
    imported = subprocess.run([str(made / "bin" / "python"), "-c", "import rados, rbd"],
                              capture_output=True, text=True)  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    again = link(made, DEBIAN)  # nothing to do: quiet
    assert again.stderr == "" and again.stdout == ""


def test_modules_for_another_python_are_not_linked(tmp_path):
    made, _suffix, site = venv(tmp_path)
    dist = tmp_path / "dist"
    dist.mkdir()
    for module in ("rados", "rbd"):
        (dist / f"{module}.cpython-39-x86_64-linux-gnu.so").write_bytes(b"")
    said = link(made, dist)
    assert "for another Python" in said.stderr
    assert [p for p in site.iterdir() if p.is_symlink()] == []
    nothing = link(made, tmp_path / "none")  # not installed at all: nothing, quietly
    assert nothing.stderr == ""


def test_a_tool_killed_at_its_bound_says_the_bound():
    client = RbdClient(CephAccess(monitors=(("127.0.0.1", 1),), user="u", keyfile="/nonexistent",
                                  timeout=0.2))  # fmt: skip
    with pytest.raises(RbdTimeout) as killed:
        client._run(["sleep", "5"], 0.2, "sleep 5")
    # (what the services' 504 reads: "did not answer within 0.2 s")
    assert killed.value.timeout == 0.2 and f"{killed.value.timeout:g}" == "0.2"
    assert "no answer within 0.2 s (killed)" in str(killed.value)


@pytest.mark.parametrize(
    ("code", "kind", "lost"),
    [(errno.EEXIST, RbdBusy, False), (errno.ENOENT, RbdNotFound, False),
     (errno.EBUSY, RbdBusy, False), (errno.ETIMEDOUT, RbdTimeout, True),
     (errno.ESHUTDOWN, RbdError, True), (errno.EIO, RbdError, False)],
)  # fmt: skip
def test_the_bindings_errors_are_the_tool_clients_classes(code, kind, lost):
    rbd = pytest.importorskip("rbd", reason="Ceph's Python bindings are not linked (make test)")
    failure = _failure("cloning a to b", rbd.OSError("said", errno=code), 3.0)
    assert type(failure) is kind and failure.lost is lost
    assert str(failure).startswith("cloning a to b")
    if kind is RbdTimeout:
        assert failure.timeout == 3.0
