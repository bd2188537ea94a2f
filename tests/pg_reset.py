"""Putting the session's PostgreSQL test database back as every test finds it: empty
tables but the seeded rows (with their original ids), sequences as after the seed, and a
fresh installation id.

The first reset of a database empties every table, restarts every sequence and runs the
seed (``full_reset``); what that leaves is kept as the baseline (the rows of the tables
that hold any, the sequences' last values). Every later reset asks in one statement which
tables hold rows, reads the seeded tables, and puts back only what differs: DELETE for a
table with rows that should have none, DELETE and the baseline's rows for a seeded table
that changed, the baseline's value for a sequence that moved, and a new installation id.
The same state as a full reset, in a handful of statements instead of ~100 (each of them
compiled again for the test's new engine): most tests write to two or three tables.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from flask import Flask

from vmapi.extensions import db
from vmapi.models import Installation
from vmapi.services.catalog_defaults import seed_defaults
from vmapi.services.names import new_installation_id

SEQUENCES = sa.text(
    "SELECT sequencename, last_value FROM pg_sequences WHERE schemaname = current_schema()"
)


def full_reset(app: Flask) -> None:
    """Empty every table and put the seeded rows back with their original ids.

    DELETE, children first, and sequences restarted: a few tables hold a few rows after a
    test, and TRUNCATE's new files for each of the ~30 tables cost 2-3 times as much on
    every one of the suite's PostgreSQL tests."""
    with app.app_context():
        db.session.remove()
        quote = db.engine.dialect.identifier_preparer.quote
        for table in reversed(db.metadata.sorted_tables):
            db.session.execute(sa.delete(table))
        sequences = db.session.execute(sa.text(
            "SELECT sequencename FROM pg_sequences WHERE schemaname = current_schema()"
        )).scalars()  # fmt: skip
        for sequence in sequences.all():
            db.session.execute(sa.text(f"ALTER SEQUENCE {quote(sequence)} RESTART"))
        db.session.commit()
        seed_defaults()
        db.session.remove()
        db.engine.dispose()


class PostgresReset:
    """The resets of one test database (see the module's docstring), on an engine of its
    own: kept for the session, so its statements are compiled once; no pool, so no
    connection of it outlives a reset."""

    def __init__(self, url: str) -> None:
        driver = sa.engine.make_url(url).set(drivername="postgresql+psycopg2")
        self.engine = sa.create_engine(driver, poolclass=sa.pool.NullPool)
        #: the baseline: rows of each table that holds any, and when they were written
        self.rows: dict[str, Baseline] | None = None
        self.sequences: dict[str, int | None] = {}
        self.installation = ""
        self.renamed: set[str] = set()

    def __call__(self, app: Flask) -> None:
        if self.rows is None:
            full_reset(app)
            self.keep_baseline()
            return
        with app.app_context():
            db.session.remove()
            db.engine.dispose()
            installation = app.config["INSTALLATION_ID"] or new_installation_id()
        self.restore(installation)

    def keep_baseline(self) -> None:
        with self.engine.connect() as conn:
            written = now()
            self.rows = {table.name: Baseline(written, rows) for table in db.metadata.sorted_tables
                         if (rows := read(conn, table))}  # fmt: skip
            self.sequences = dict(conn.execute(SEQUENCES).all())
        (row,) = self.rows[Installation.__tablename__].rows
        self.installation = row["installation_id"]
        #: the tables whose seeded rows name the installation id (its own, the seed's
        #: audit event of it): written again with each new id
        self.renamed = {name for name, baseline in self.rows.items()
                        if self.installation in values(baseline.rows)}  # fmt: skip

    def restore(self, installation: str) -> None:
        assert self.rows is not None
        tables = db.metadata.sorted_tables
        with self.engine.begin() as conn:
            quote = conn.dialect.identifier_preparer.quote
            filled = set(conn.execute(sa.union_all(*[
                sa.select(sa.literal(table.name)).where(sa.exists().select_from(table))
                for table in tables
            ])).scalars())  # fmt: skip
            changed = {table.name for table in tables if table.name in filled
                       and (table.name not in self.rows or table.name in self.renamed
                            or read(conn, table) != self.rows[table.name].rows)}  # fmt: skip
            changed |= {name for name in self.rows if name not in filled}
            for table in reversed(tables):
                if table.name in changed and table.name in filled:
                    conn.execute(sa.delete(table))
            for table in tables:
                if table.name in changed and table.name in self.rows:
                    baseline = self.rows[table.name].again(self.installation, installation)
                    self.rows[table.name] = baseline
                    conn.execute(sa.insert(table), baseline.rows)
            self.installation = installation
            for name, value in conn.execute(SEQUENCES).all():
                if value == self.sequences.get(name, value):
                    continue
                wanted = self.sequences[name]
                if wanted is None:
                    conn.execute(sa.text(f"ALTER SEQUENCE {quote(name)} RESTART"))
                else:
                    conn.execute(sa.select(sa.func.setval(quote(name), wanted)))

    def dispose(self) -> None:
        self.engine.dispose()


@dataclass(frozen=True)
class Baseline:
    """A table's rows as the full reset left them, and when they were written."""

    written: datetime
    rows: list[dict[str, Any]]

    def again(self, installation: str, new_installation: str) -> Baseline:
        """The same rows written now: their times (the seed's audit events) moved on by
        the time since, and the installation id a new one, as a full reset now would
        write them."""
        later = now()

        def again(value: Any) -> Any:
            if isinstance(value, datetime):
                return value + (later - self.written)
            if isinstance(value, dict):
                return {key: again(inner) for key, inner in value.items()}
            if isinstance(value, list):
                return [again(inner) for inner in value]
            return new_installation if value == installation else value

        return Baseline(later, [again(row) for row in self.rows])


def values(rows: list[dict[str, Any]]) -> Iterator[Any]:
    """Every value in the rows, also those inside JSON."""
    stack: list[Any] = list(rows)
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        else:
            yield value


def now() -> datetime:
    return datetime.now(UTC)


def read(conn: sa.Connection, table: sa.Table) -> list[dict[str, Any]]:
    return [row._asdict() for row in conn.execute(ordered(table))]


def ordered(table: sa.Table) -> sa.Select[Any]:
    return sa.select(table).order_by(*table.primary_key.columns)
