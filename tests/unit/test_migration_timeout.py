"""MIGRATION_TIMEOUT: a move, its abort and its undo end before gunicorn kills the worker."""

import pytest
from flask import Flask

from vmapi.config import load_config


@pytest.fixture
def config(tmp_path, monkeypatch):
    """``config(**environment)``: the configuration loaded with those VMAPI_* variables."""
    for key in ("MIGRATION_TIMEOUT", "WORKER_TIMEOUT", "LIBVIRT_TIMEOUT"):
        monkeypatch.delenv(f"VMAPI_{key}", raising=False)

    def load(**env: str) -> dict:
        for key, value in env.items():
            monkeypatch.setenv(f"VMAPI_{key}", value)
        app = Flask("t", instance_path=str(tmp_path))
        load_config(app)
        return app.config

    return load


def test_without_gunicorn_the_default_is_thirty_seconds(config):
    loaded = config()
    assert (loaded["MIGRATION_TIMEOUT"], loaded["WORKER_TIMEOUT"]) == (30.0, None)
    assert config(MIGRATION_TIMEOUT="900")["MIGRATION_TIMEOUT"] == 900.0  # the CLI's own


def test_under_gunicorn_a_configured_timeout_must_leave_room_for_the_abort_and_undo(config):
    loaded = config(WORKER_TIMEOUT="60", LIBVIRT_TIMEOUT="10", MIGRATION_TIMEOUT="39")
    assert loaded["MIGRATION_TIMEOUT"] == 39.0
    with pytest.raises(RuntimeError, match=r"MIGRATION_TIMEOUT 40 s must be below .* below 40 s"):
        config(MIGRATION_TIMEOUT="40")
    with pytest.raises(RuntimeError, match="raise GUNICORN_TIMEOUT"):
        config(WORKER_TIMEOUT="60", LIBVIRT_TIMEOUT="20", MIGRATION_TIMEOUT="30")


@pytest.mark.parametrize(
    ("worker", "libvirt", "used"),
    [("60", "10", 30.0), ("60", "20", 19.0), ("5", "10", 1.0), ("600", "10", 30.0)],
)
def test_the_default_shrinks_to_fit_a_smaller_worker_timeout(config, worker, libvirt, used):
    loaded = config(WORKER_TIMEOUT=worker, LIBVIRT_TIMEOUT=libvirt)
    assert loaded["MIGRATION_TIMEOUT"] == used


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_a_timeout_that_is_no_positive_number_stops_the_start(config, value):
    with pytest.raises(RuntimeError, match="MIGRATION_TIMEOUT must be a"):
        config(MIGRATION_TIMEOUT=value)
