"""tests/pg_reset.py: the reset that puts back only what a test changed leaves the test
database as the full reset (every table emptied, sequences restarted, the seed run) does."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from flask import Flask

from tests.conftest import Api
from tests.pg_reset import SEQUENCES, PostgresReset, full_reset, read
from vmapi.extensions import db
from vmapi.models import CacheOption, NodeState, StorageType, VmState


def state(reset: PostgresReset) -> tuple[dict[str, Any], dict[str, Any], str, list[datetime]]:
    """Every table's rows (their times and the installation id left out), every
    sequence's last value, the installation id, and the times in the rows (the seed's
    audit events)."""
    with reset.engine.connect() as conn:
        rows = {table.name: read(conn, table) for table in db.metadata.sorted_tables}
        sequences = dict(conn.execute(SEQUENCES).all())
    (installation,) = rows.pop("installation")
    times: list[datetime] = []

    def blank(value: Any) -> Any:
        if isinstance(value, datetime):
            times.append(value)
            return "<time>"
        if isinstance(value, dict):
            return {key: blank(inner) for key, inner in value.items()}
        return "<installation>" if value == installation["installation_id"] else value

    rows = {name: [blank(row) for row in table] for name, table in rows.items()}
    return rows, sequences, installation["installation_id"], times


def test_the_fast_reset_leaves_what_the_full_one_does(app: Flask, api: Api, pg_database: str):
    reset = PostgresReset(pg_database)
    try:
        reset(app)  # the first: the full reset, and its result kept as the baseline
        baseline = state(reset)
        api.post("ipv4", json={"network": "198.51.100.0/24", "gateway": "198.51.100.1"})
        api.post("virt_method", json={"name": "TEST", "domain_type": "test"})
        with app.app_context():
            db.session.add(NodeState(name="retired", schedulable=False))
            db.session.execute(sa.update(CacheOption).where(CacheOption.name == "none")
                               .values(description="changed"))  # fmt: skip
            db.session.execute(sa.delete(VmState).where(VmState.name == "crashed"))
            db.session.execute(sa.delete(StorageType))  # a seeded table left empty
            db.session.commit()
            db.session.remove()
        dirty = state(reset)
        assert dirty[0] != baseline[0] and dirty[1] != baseline[1]

        reset(app)
        rows, sequences, installation, times = state(reset)
        full_reset(app)
        full = state(reset)
        assert rows == full[0] == baseline[0]
        assert sequences == full[1] == baseline[1]
        # a new installation id for every test, as the seed makes after a full reset
        assert len({installation, full[2], dirty[2]}) == 3
        # the seed's audit events written again, later and in the same order
        assert len(times) == len(baseline[3]) > 0
        assert all(new > old for new, old in zip(times, baseline[3], strict=True))
        assert times == sorted(times) and baseline[3] == sorted(baseline[3])
    finally:
        reset.dispose()
