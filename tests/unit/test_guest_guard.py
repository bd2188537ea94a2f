"""The test guest's /init and helpers refuse to run anywhere but inside the test guest.

Run on a host by mistake, the guest's scripts would rename it, rewrite its
/etc/resolv.conf, open a listener, write into its first disk and power it off. Each one
starts with a guard: only PID 1 of the guest's initramfs, whose kernel command line
carries ``vmapi_test_guest=1`` (tests/guest/build.py), goes on.

The scripts are never run on this machine itself, not even guarded: every run is inside
``guest_sandbox.sh``, as the user nobody in namespaces of its own (user, mount, UTS,
network, PID), its root moved (pivot_root) into a tmpfs with copies of the guest's files
and the host's root detached, so that even a script without its guard can change nothing
but the sandbox. Guard-less copies are run
there too, to show what the guard prevents: without it the test would fail.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import unavailable
from tests.guest.build import GRUB_CFG, GUEST_MARKER, init_script

HERE = Path(__file__).resolve().parent
GUEST = HERE.parent / "guest"
SANDBOX = HERE / "guest_sandbox.sh"
REFUSED = "vmapi test guest: refused"
NOBODY = "65534"
POWER_BUTTON = "etc/acpi/PWRF/00000080"


def guard_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if REFUSED in line]


def first_command(text: str) -> str:
    """The first line a shell runs: not blank, not a comment (nor the #! line)."""
    return next((line for line in text.splitlines() if line.strip()
                 and not line.lstrip().startswith("#")), "")  # fmt: skip


def without_guard(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if REFUSED not in line)


def init_parts() -> list[Path]:
    return sorted((GUEST / "init").glob("*.sh"))


def rootfs_programs() -> list[Path]:
    """The files under rootfs/ that run: executables (the awk files are data for awk)."""
    return sorted(p for p in (GUEST / "rootfs").rglob("*") if p.is_file() and os.access(p, os.X_OK))


@pytest.fixture(scope="module")
def sandbox_ready() -> None:
    for tool in ("setpriv", "unshare", "pivot_root", "base64"):
        if shutil.which(tool) is None:
            unavailable(f"the guest-script sandbox needs {tool}")
    if not Path("/bin/busybox").exists():
        unavailable("the guest-script sandbox needs /bin/busybox (busybox-static)")
    if os.geteuid() != 0:
        unavailable("the guest-script sandbox drops to the user nobody, which needs root")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A folder the user nobody can read (pytest's own tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="vmapi-guest-sandbox-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def in_sandbox(work: Path, script: str, target: str, mode: str, marker: bool,
               wait_for: str = "") -> dict[str, str]:  # fmt: skip
    """Run ``script`` as ``target`` in the sandbox; what it reports, by name."""
    (work / "subject").write_text(script)
    (work / "target").write_text(target)
    shutil.copytree(GUEST / "rootfs", work / "rootfs", dirs_exist_ok=True)
    for writable in ("root", "io"):  # a mount point, and where the outputs go
        (work / writable).mkdir(exist_ok=True)
        (work / writable).chmod(0o777)
    for path in work.rglob("*"):
        path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
    command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
               "--inh-caps=-all", "--bounding-set=-all",
               "unshare", "--user", "--map-root-user", "--mount", "--uts", "--net", "--pid",
               "--ipc", "--fork", "--kill-child",
               "sh", str(SANDBOX), str(work), mode, "yes" if marker else "no", wait_for]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd="/")
    if result.returncode == 99 or "rc=" not in result.stdout:
        if "unshare" in result.stderr and "Operation not permitted" in result.stderr:
            unavailable(f"no user namespaces here: {result.stderr.strip()}")
        pytest.fail(f"the sandbox did not run: {result.stdout}\n{result.stderr}")
    found = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    for key in ("stderr", "console", "before_resolv", "after_resolv", "during_resolv"):
        if key in found:
            found[key] = base64.b64decode(found[key]).decode(errors="replace")
    return found


def assert_unchanged(report: dict[str, str]) -> None:
    for what in ("hostname", "resolv", "listeners", "mounts", "files"):
        assert report[f"after_{what}"] == report[f"before_{what}"], (what, report)
    assert report["before_hostname"] == "sandbox-host"
    assert report["before_listeners"] == "0"
    assert report["console"] == ""


def assert_refused(report: dict[str, str]) -> None:
    assert report["rc"] == "64", report
    assert REFUSED in report["stderr"], report
    assert_unchanged(report)


def test_every_script_that_runs_in_the_guest_has_the_guard_first():
    parts = init_parts()
    assert parts and all(len(guard_lines(p.read_text())) == 1 for p in parts), parts
    assert rootfs_programs() == [GUEST / "rootfs" / POWER_BUTTON]
    assert all(len(guard_lines(p.read_text())) == 1 for p in rootfs_programs())
    # the guard is the first thing each one runs: nothing comes before it
    for script in [*parts, *rootfs_programs()]:
        assert REFUSED in first_command(script.read_text()), script
    assert REFUSED in first_command(init_script(GUEST))
    assert REFUSED not in first_command(f"#!/bin/sh\n# a note\n\nhostname x\n{REFUSED}\n")
    for awk in (GUEST / "rootfs").rglob("*.awk"):  # they only print what they parse
        text = awk.read_text()
        assert not re.search(r'system\(|getline|\|\s*"|>>?\s*"', text), awk
    # the guest's kernel is booted with the marker the guard looks for
    assert f"console=ttyS0 {GUEST_MARKER}\n" in GRUB_CFG
    assert GUEST_MARKER == "vmapi_test_guest=1"


@pytest.mark.parametrize(
    ("mode", "marker"),
    [("child", False), ("child", True), ("pid1", False)],
    ids=["run-by-hand", "not-pid-1", "no-kernel-marker"],
)
def test_init_refuses_outside_the_guest(sandbox_ready, workdir, mode, marker):
    report = in_sandbox(workdir, init_script(GUEST), "/init", mode, marker)
    assert_refused(report)


@pytest.mark.parametrize("part", [p.name for p in init_parts()])
def test_each_init_part_refuses_when_run_alone(sandbox_ready, workdir, part):
    script = (GUEST / "init" / part).read_text()
    if not script.startswith("#!"):
        script = "#!/bin/busybox sh\n" + script
    assert_refused(in_sandbox(workdir, script, f"/{part}", "child", False))


def test_power_button_helper_refuses_outside_the_guest(sandbox_ready, workdir):
    script = (GUEST / "rootfs" / POWER_BUTTON).read_text()
    assert_refused(in_sandbox(workdir, script, f"/{POWER_BUTTON}", "pid1", False))


def test_without_the_guard_the_scripts_would_change_the_sandbox(sandbox_ready, workdir):
    """What the guard prevents, shown on guard-less copies, in the sandbox only."""
    script = without_guard(init_script(GUEST))
    assert not guard_lines(script)
    report = in_sandbox(workdir, script, "/init", "child", False, wait_for="VMAPI-HTTPD")
    assert "VMAPI-HTTPD started" in report["console"], report
    assert report["during_hostname"] == "the-guest-was-here"  # the host would be renamed
    assert report["during_resolv"] == ""  # its resolv.conf rewritten
    assert int(report["during_listeners"]) >= 1  # a web server on port 80
    assert report["during_files"] != report["before_files"]

    power = without_guard((GUEST / "rootfs" / POWER_BUTTON).read_text())
    report = in_sandbox(workdir, power, f"/{POWER_BUTTON}", "pid1", False)
    assert report["console"] == "VMAPI-POWEROFF\n", report  # and then powered it off


def test_the_guard_lets_the_guest_run(sandbox_ready, workdir):
    """PID 1 on a tmpfs root with the kernel's marker: the sandbox looks like the guest,
    and the guarded /init goes on (the hypervisor tier boots the real one)."""
    report = in_sandbox(workdir, init_script(GUEST), "/init", "pid1", True, wait_for="VMAPI-HTTPD")
    assert "VMAPI-HTTPD started" in report["console"], report
    assert report["during_hostname"] == "the-guest-was-here"


def test_the_sandbox_holds_nothing_of_the_host(sandbox_ready, workdir):
    """Its root is a tmpfs, the host's root detached (pivot_root, then umount -l), not
    just out of sight: a chroot would leave it in reach (PID 1's root, /proc/1/root, and
    a chroot of its own, which root of the user namespace may make, lead back to it)."""
    probe = (
        "#!/bin/busybox sh\n"
        f"for path in /usr/sbin /proc/1/root/usr /proc/1/cwd/usr /.old-root {workdir}; do\n"
        '  [ -e "$path" ] && echo "host: $path"\n'
        "done\n"
        "echo mounts=$(wc -l </proc/self/mountinfo)\n"
        "echo probed\n"
    )
    report = in_sandbox(workdir, probe, "/probe", "child", True)
    out = (workdir / "io" / "out").read_text()
    assert report["rc"] == "0" and "probed" in out, (report, out)
    assert "host:" not in out, out
    assert "mounts=3" in out  # the tmpfs, /dev/null and /proc
