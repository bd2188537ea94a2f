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

The same holds for the probe CGI (rootfs/www/cgi-bin/probe, run by the guest's httpd, so
it guards like the PWRF helper) and for the guest's compiled helper (src/vmapi-sendframe.c,
built here with the guest's own gcc command into a folder of the test's): each refuses
outside the guest, and each, without its guard, would act (a listener opened; a frame
read and about to be sent, which the sandbox's network, a loopback that is down, could not
carry).
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
from tests.guest.build import GRUB_CFG, GUEST_MARKER, HELPERS, compile_helpers, init_script

HERE = Path(__file__).resolve().parent
GUEST = HERE.parent / "guest"
SANDBOX = HERE / "guest_sandbox.sh"
REFUSED = "vmapi test guest: refused"
NOBODY = "65534"
POWER_BUTTON = "etc/acpi/PWRF/00000080"
PROBE_CGI = "www/cgi-bin/probe"
SENDFRAME = "vmapi-sendframe"
#: the C helpers' guard: the first statement of main (nothing runs before it)
C_GUARD = "if (!in_test_guest()) {"


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


def in_sandbox(work: Path, script: str | bytes, target: str, mode: str, marker: bool,
               wait_for: str = "", env: str = "") -> dict[str, str]:  # fmt: skip
    """Run ``script`` (a script, or a program's bytes) as ``target`` in the sandbox, with
    ``env`` (NAME=VALUE words) added to its environment; what it reports, by name."""
    if isinstance(script, bytes):
        (work / "subject").write_bytes(script)
    else:
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
               "sh", str(SANDBOX), str(work), mode, "yes" if marker else "no", wait_for, env]  # fmt: skip
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
    assert rootfs_programs() == [GUEST / "rootfs" / POWER_BUTTON, GUEST / "rootfs" / PROBE_CGI]
    assert all(len(guard_lines(p.read_text())) == 1 for p in rootfs_programs())
    # the guard is the first thing each one runs: nothing comes before it
    for script in [*parts, *rootfs_programs()]:
        assert REFUSED in first_command(script.read_text()), script
    assert REFUSED in first_command(init_script(GUEST))
    assert REFUSED not in first_command(f"#!/bin/sh\n# a note\n\nhostname x\n{REFUSED}\n")
    for awk in (GUEST / "rootfs").rglob("*.awk"):  # they only print what they parse
        text = awk.read_text()
        assert not re.search(r'system\(|getline|\|\s*"|>>?\s*"', text), awk
    # the compiled helpers: the guard's refusal, and the guard first in main
    assert HELPERS == (SENDFRAME,)
    for name in HELPERS:
        source = (GUEST / "src" / f"{name}.c").read_text()
        assert REFUSED in source and source.count(C_GUARD) == 1, name
        main = source.split("int main(", 1)[1]
        assert main.split("{", 1)[1].lstrip().startswith(C_GUARD), name
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


@pytest.fixture(scope="module")
def helpers(tmp_path_factory) -> dict[str, bytes]:
    """The guest's helpers, compiled as the guest's build does, and each once more with
    its guard made a no-op (the test's own copy: never in the guest): by name."""
    if shutil.which("gcc") is None or not Path("/usr/lib/x86_64-linux-gnu/libc.a").exists():
        unavailable("the guest's helpers need gcc and libc6-dev (static libc)")
    built = tmp_path_factory.mktemp("helpers")
    source = built / "src"
    source.mkdir()
    for name in HELPERS:
        text = (GUEST / "src" / f"{name}.c").read_text()
        (source / f"{name}.c").write_text(text)
        (source / f"{name}-unguarded.c").write_text(text.replace(C_GUARD, "if (0) {"))
    compile_helpers(built, built)
    found = {name: (built / name).read_bytes() for name in HELPERS}
    for name in HELPERS:
        out = built / f"{name}-unguarded"
        subprocess.run(["gcc", "-static", "-Os", "-s", "-o", out, source / f"{name}-unguarded.c"],
                       check=True, capture_output=True)  # fmt: skip
        found[f"{name}-unguarded"] = out.read_bytes()
    return found


def test_probe_cgi_refuses_outside_the_guest(sandbox_ready, workdir):
    script = (GUEST / "rootfs" / PROBE_CGI).read_text()
    report = in_sandbox(workdir, script, f"/{PROBE_CGI}", "pid1", False,
                        env="QUERY_STRING=action=tcp-listen&port=8080")  # fmt: skip
    assert_refused(report)


def test_without_its_guard_the_probe_cgi_would_open_a_listener(sandbox_ready, workdir):
    """What the CGI's guard prevents, on a guard-less copy in the sandbox only."""
    script = without_guard((GUEST / "rootfs" / PROBE_CGI).read_text())
    # as a child of the sandbox (as of httpd in the guest): the server outlives the CGI
    report = in_sandbox(workdir, script, f"/{PROBE_CGI}", "child", False,
                        env="QUERY_STRING=action=tcp-listen&port=8080")  # fmt: skip
    out = (workdir / "io" / "out").read_text()
    assert report["rc"] == "0", report
    assert "VMAPI-PROBE action=tcp-listen port=8080 state=started listening=yes" in out, out
    assert int(report["after_listeners"]) == 1  # a web server on port 8080
    assert "VMAPI-PROBE action=tcp-listen" in report["console"]  # and said so on the console


@pytest.mark.parametrize(
    ("query", "reason"),
    [("action=reboot", "unknown-action"),
     ("action=tcp-listen&port=80;reboot", "bad-port"),
     ("action=tcp-listen&port=8080&count=11", "bad-count"),
     ("action=tcp-listen&port=8080&count=$(reboot)", "bad-count"),
     ("action=info&dev=../../x", "no-such-dev")],
)  # fmt: skip
def test_the_probe_cgi_runs_only_values_it_checked(sandbox_ready, workdir, query, reason):
    """Even guard-less, in the sandbox: a value outside its pattern is refused, nothing
    run."""
    script = without_guard((GUEST / "rootfs" / PROBE_CGI).read_text())
    report = in_sandbox(workdir, script, f"/{PROBE_CGI}", "pid1", False,
                        env=f"QUERY_STRING={query}")  # fmt: skip
    out = (workdir / "io" / "out").read_text()
    assert f"result=refused reason={reason}" in out, (out, report)
    for what in ("hostname", "resolv", "listeners", "mounts", "files"):
        assert report[f"after_{what}"] == report[f"before_{what}"], (what, report)


def test_the_frame_sender_refuses_outside_the_guest(sandbox_ready, workdir, helpers):
    report = in_sandbox(workdir, helpers[SENDFRAME], f"/bin/{SENDFRAME}", "pid1", False)
    assert_refused(report)


def test_without_its_guard_the_frame_sender_would_send(sandbox_ready, workdir, helpers):
    """The guard-less copy, in the sandbox (whose only network is a loopback that is
    down): past the guard, it goes on to read what to send (given nothing: its usage)."""
    report = in_sandbox(workdir, helpers[f"{SENDFRAME}-unguarded"], f"/bin/{SENDFRAME}",
                        "pid1", False)  # fmt: skip
    assert report["rc"] == "2" and "usage: vmapi-sendframe" in report["stderr"], report
