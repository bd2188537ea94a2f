"""Run only by test_ci_rules.py: a test that skips, to show CI=true turns it into a failure."""

import pytest


def test_skips():
    pytest.skip("a service this test needs is down")
