"""With CI=true a skipped test fails the run (tests/conftest.py); locally it stays a skip."""

import os
import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).with_name("ci_skip_probe.py")
ROOT = Path(__file__).resolve().parents[2]


def run_probe(ci: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": ci}
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(PROBE), "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_skip_fails_in_ci():
    result = run_probe("true")
    assert result.returncode == 1, result.stdout
    assert "1 failed" in result.stdout


def test_skip_is_a_skip_locally():
    result = run_probe("")
    assert result.returncode == 0, result.stdout
    assert "1 skipped" in result.stdout
