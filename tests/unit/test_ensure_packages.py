"""scripts/ensure-packages.sh installs with service starts denied (invoke-rc.d asks
policy-rc.d): etcd-server's and patroni's postinsts would start a system etcd and Patroni.

apt-get and dpkg-query are stand-ins here (nothing is installed); the policy file is one
of the test's own (VMAPI_POLICY_RC_D), never /usr/sbin/policy-rc.d.
"""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALLOWS = "#!/bin/sh\nexit 0\n"
DENIES = "#!/bin/sh\n# the machine's own\nexit 101\n"


def run(tmp_path: Path, policy: Path) -> str:
    """Run the script for one missing package; what the policy answered during the
    install (as invoke-rc.d would ask it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    seen = tmp_path / "seen"
    (bin_dir / "dpkg-query").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "apt-get").write_text(
        f'#!/bin/sh\n[ "$1" = install ] || exit 0\n"{policy}" etcd start; echo $? > "{seen}"\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "VMAPI_POLICY_RC_D": str(policy),
    }
    subprocess.run([ROOT / "scripts/ensure-packages.sh", "etcd-server"], env=env, check=True,
                   capture_output=True)  # fmt: skip
    return seen.read_text().strip()


@pytest.fixture(autouse=True)
def as_root():
    if os.geteuid() != 0:
        pytest.skip("the script installs only as root")


def test_without_a_policy_one_that_denies_is_there_for_the_install_only(tmp_path):
    policy = tmp_path / "policy-rc.d"
    assert run(tmp_path, policy) == "101"
    assert not policy.exists()


def test_a_policy_that_allows_is_set_aside_and_put_back(tmp_path):
    policy = tmp_path / "policy-rc.d"
    policy.write_text(ALLOWS)
    policy.chmod(0o755)
    assert run(tmp_path, policy) == "101"
    assert policy.read_text() == ALLOWS
    assert not (tmp_path / "policy-rc.d.vmapi-saved").exists()


def test_a_policy_that_denies_is_left_alone(tmp_path):
    policy = tmp_path / "policy-rc.d"
    policy.write_text(DENIES)
    policy.chmod(0o755)
    assert run(tmp_path, policy) == "101"
    assert policy.read_text() == DENIES
