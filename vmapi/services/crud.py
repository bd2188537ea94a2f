"""Generic create/read/update/delete over one model, with the contract's conflict rules.

Each resource's service is a :class:`CrudService` (or a subclass adding its own checks).
Uniqueness, references and "still in use" are derived from the table's own constraints,
so a new column or foreign key is covered without new code. The database constraints
stay the last line of defence: an ``IntegrityError`` that slips past a check (a race)
still answers 409/400, never 500.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, UniqueConstraint, and_, select
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import defaultload, selectinload

from vmapi import error_ids
from vmapi.auth import Principal
from vmapi.errors import ApiError, Conflict, NotFound, ValidationError, at_index
from vmapi.extensions import db
from vmapi.services.locks import vm_locks

M = TypeVar("M")
T = TypeVar("T")

IN_USE_SAMPLE = 100  # referencing ids listed in an in_use error


@dataclass
class Outcome(Generic[M]):
    """What a write did: the objects (as they are now, or were just before deletion) and
    notes for the person asking (e.g. what takes effect only at the next start)."""

    objects: list[M]
    messages: list[str] = field(default_factory=list)
    #: answer keyed by id even for a single-object request (one request made many)
    keyed: bool = False


@dataclass
class ListParams:
    """A parsed list request: equality filters by column, keyset position, page size."""

    filters: list[tuple[str, Any]] = field(default_factory=list)
    after: int | None = None
    limit: int = 100
    nest: Sequence[str] = ()


def model_for_table(table_name: str) -> type:
    for mapper in db.Model.registry.mappers:
        if mapper.local_table.name == table_name:
            return mapper.class_
    raise LookupError(table_name)


class CrudService(Generic[M]):
    """Database-only CRUD for ``model``, named ``resource`` in URLs and error ids."""

    #: every service by its model, so a nested load can apply the target's read options
    by_model: dict[type, CrudService] = {}

    def __init__(self, model: type[M], resource: str) -> None:
        self.model = model
        self.resource = resource
        CrudService.by_model.setdefault(model, self)

    def nest_options(self, names: Sequence[str]) -> list:
        """Loader options for ``nest=``: each relationship, with its target's own options,
        so a nested field costs one query per page whatever its size. A list (``interfaces``)
        is loaded by every read already (its ids are answered); only its targets' options
        are added to however this read loads it (joined for one object, selectin for a page).
        """
        options = []
        for name in names:
            relationship = getattr(self.model, name)
            target = CrudService.by_model.get(relationship.property.mapper.class_)
            extra = target.load_options() if target is not None else []
            load = defaultload if relationship.property.uselist else selectinload
            options.append(load(relationship).options(*extra))
        return options

    # ------------------------------------------------------------------ reading
    def scope(self, stmt: Select, principal: Principal) -> Select:
        """Restrict a query to what ``principal`` may see: admins everything, customers
        what :meth:`customer_scope` allows (others' objects then answer 404)."""
        if principal.is_admin:
            return stmt
        return self.customer_scope(stmt, principal.customer_id)

    def customer_scope(self, stmt: Select, customer_id: int | None) -> Select:
        """A customer's view; the catalog shows everything (its role rules still apply)."""
        return stmt

    def load_options(self) -> list:
        """Loader options every read applies (e.g. selectinload of listed relationships,
        so a page costs a fixed number of queries)."""
        return []

    def get_options(self) -> list:
        """Loader options for reading one object (default: those of every read). One
        object's collections are cheaper joined than fetched by a second query."""
        return self.load_options()

    def loaded(self, objs: list[M]) -> list[M]:
        """``objs`` with the read options applied (one query), ready to be answered."""
        options = self.load_options()
        if not options or not objs:
            return objs
        ids = [obj.id for obj in objs]
        stmt = (
            select(self.model)
            .where(self.model.id.in_(ids))
            .options(*options)
            .execution_options(populate_existing=True)
        )
        by_id = {obj.id: obj for obj in db.session.scalars(stmt)}
        return [by_id[i] for i in ids]

    def not_found(self, ident: int) -> NotFound:
        return NotFound(
            error_id=error_ids.not_found(self.resource), resource=self.resource, id=ident
        )

    def get(self, ident: int, principal: Principal, nest: Sequence[str] = ()) -> M:
        stmt = select(self.model).where(self.model.id == ident).options(*self.get_options())
        stmt = self.scope(stmt, principal).options(*self.nest_options(nest))
        obj = db.session.scalars(stmt).unique().first()
        if obj is None:
            raise self.not_found(ident)
        return obj

    def list_page(self, principal: Principal, params: ListParams) -> tuple[list[M], bool]:
        """One page in id order, and whether more follow. Keyset: ``id > after``, no OFFSET."""
        stmt = select(self.model)
        for column, value in params.filters:
            stmt = stmt.where(getattr(self.model, column) == value)
        if params.after is not None:
            stmt = stmt.where(self.model.id > params.after)
        stmt = self.scope(stmt, principal).order_by(self.model.id).limit(params.limit + 1)
        stmt = stmt.options(*self.load_options(), *self.nest_options(params.nest))
        objs = list(db.session.scalars(stmt))
        return objs[: params.limit], len(objs) > params.limit

    # ------------------------------------------------------------------ writing, one object
    def create(self, data: dict[str, Any], principal: Principal) -> M:
        self.check_references(data)
        obj = self.model(**data)
        self.check_unique(obj)
        self.complete(obj, data, principal)
        db.session.add(obj)
        db.session.flush()
        return obj

    def update(self, obj: M, data: dict[str, Any], principal: Principal) -> M:
        if getattr(obj, "seeded", False) and "name" in data and data["name"] != obj.name:
            raise Conflict(
                f"{self.resource} {obj.name!r} is seeded; other code relies on its name.",
                error_id=error_ids.protected(self.resource),
            )
        self.check_references(data)
        with db.session.no_autoflush:
            for key, value in data.items():
                setattr(obj, key, value)
            self.check_unique(obj)
            self.complete(obj, data, principal)
        db.session.flush()
        return obj

    def complete(self, obj: M, data: dict[str, Any], principal: Principal) -> None:
        """Hook after the cheap checks, before the write: derive values, ask hosts."""

    def delete(self, obj: M, principal: Principal, options: dict[str, Any]) -> None:
        if getattr(obj, "seeded", False):
            raise Conflict(
                f"{self.resource} {obj.name!r} is seeded and cannot be deleted.",
                error_id=error_ids.protected(self.resource),
            )
        self.check_in_use(obj)
        db.session.delete(obj)
        db.session.flush()

    # ------------------------------------------------------------------ batches
    # A batch runs holding the locks of the VMs it changes on their nodes
    # (:mod:`vmapi.services.locks`): ``*_locks`` name them (none by default), ``*_all``
    # does the work; a service overrides those, never the entry points.
    def create_many(
        self, items: list[dict[str, Any]], principal: Principal, indexed: bool
    ) -> Outcome[M]:
        with vm_locks(self.create_locks(items)):
            return self.create_all(items, principal, indexed)

    def update_many(
        self,
        items: list[tuple[int, dict[str, Any]]],
        principal: Principal,
        indexed: bool,
        options: dict[str, Any],
    ) -> Outcome[M]:
        with vm_locks(self.update_locks(items)):
            return self.update_all(items, principal, indexed, options)

    def delete_many(
        self, ids: list[int], principal: Principal, options: dict[str, Any], indexed: bool
    ) -> Outcome[M]:
        with vm_locks(self.delete_locks(ids)):
            return self.delete_all(ids, principal, options, indexed)

    def remove_abandoned(self, ids: list[int]) -> None:
        """A retry took an Idempotency-Key of this resource over from a request that is
        gone: remove ``ids``, what that request committed unfinished and never named
        made (:func:`vmapi.services.idempotency.abandoned_ids`), so the retry's objects
        are the only ones. An error raised here is the retry's answer, before it makes
        anything; the key still names ``ids`` for the next retry. A create that commits
        nothing before it is whole names none."""

    def create_locks(self, items: list[dict[str, Any]]) -> Iterable[int]:
        """The VMs whose locks a create of ``items`` holds."""
        return ()

    def update_locks(self, items: list[tuple[int, dict[str, Any]]]) -> Iterable[int]:
        """The VMs whose locks an update of ``items`` holds."""
        return ()

    def delete_locks(self, ids: list[int]) -> Iterable[int]:
        """The VMs whose locks a delete of ``ids`` holds."""
        return ()

    def create_all(
        self, items: list[dict[str, Any]], principal: Principal, indexed: bool
    ) -> Outcome[M]:
        made = self.in_transaction(items, indexed, lambda data: self.create(data, principal))
        return Outcome(self.loaded(made))

    def update_all(
        self,
        items: list[tuple[int, dict[str, Any]]],
        principal: Principal,
        indexed: bool,
        options: dict[str, Any],
    ) -> Outcome[M]:
        def one(item: tuple[int, dict[str, Any]]) -> M:
            ident, data = item
            return self.update(self.get(ident, principal), data, principal)

        return Outcome(self.loaded(self.in_transaction(items, indexed, one)))

    def delete_all(
        self, ids: list[int], principal: Principal, options: dict[str, Any], indexed: bool
    ) -> Outcome[M]:
        def one(ident: int) -> M:
            obj = self.get(ident, principal)
            self.delete(obj, principal, options)
            return obj

        return Outcome(self.in_transaction(ids, indexed, one))

    def in_transaction(self, items: Iterable[T], indexed: bool, fn: Callable[[T], M]) -> list[M]:
        """Apply ``fn`` to every item in one transaction: all of them, or none."""
        done: list[M] = []
        try:
            for index, item in enumerate(items):
                with at_index(index if indexed else None):
                    try:
                        done.append(fn(item))
                    except IntegrityError as exc:
                        raise self.integrity_error(exc) from exc
                    except DataError as exc:  # a value the column cannot hold
                        first = str(getattr(exc, "orig", exc)).splitlines()[0]
                        raise ValidationError(f"A value does not fit its column: {first}") from exc
            db.session.commit()
        except IntegrityError as exc:  # at commit time (deferred constraints)
            db.session.rollback()
            raise self.integrity_error(exc) from exc
        except BaseException:
            db.session.rollback()
            raise
        return done

    # ------------------------------------------------------------------ checks
    def check_references(self, data: dict[str, Any]) -> None:
        """Every foreign key in ``data`` must name an existing row (400 otherwise)."""
        problems: dict[str, list[str]] = {}
        for column in self.model.__table__.columns:
            if column.name not in data or data[column.name] is None:
                continue
            for fk in column.foreign_keys:
                target = model_for_table(fk.column.table.name)
                if db.session.get(target, data[column.name]) is None:
                    name = column.name.removesuffix("_id")
                    problems[name] = [f"No {fk.column.table.name} with id {data[column.name]}."]
        if problems:
            raise ValidationError(data=problems)

    def check_unique(self, obj: M) -> None:
        """409 ``<resource>/duplicate`` if another row holds ``obj``'s unique values."""
        table = self.model.__table__
        groups = [[c] for c in table.columns if c.unique]
        groups += [list(c.columns) for c in table.constraints if isinstance(c, UniqueConstraint)]
        with db.session.no_autoflush:
            for columns in groups:
                values = {c.name: getattr(obj, c.name) for c in columns}
                if any(v is None for v in values.values()):
                    continue
                cond = and_(*(getattr(self.model, name) == v for name, v in values.items()))
                stmt = select(self.model.id).where(cond)
                if obj.id is not None:
                    stmt = stmt.where(self.model.id != obj.id)
                other = db.session.scalars(stmt.limit(1)).first()
                if other is not None:
                    shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
                    raise Conflict(
                        f"Another {self.resource} (id {other}) already has {shown}.",
                        error_id=error_ids.duplicate(self.resource),
                        data={"id": other, "fields": list(values)},
                    )

    def referencing(self, obj: M) -> dict[str, list[int]]:
        """Ids of rows in other tables whose foreign keys point at ``obj``."""
        found: dict[str, list[int]] = {}
        own = self.model.__table__
        for table in db.metadata.sorted_tables:
            for fk in table.foreign_keys:
                if fk.column.table is not own:
                    continue
                if fk.ondelete == "CASCADE" and "id" not in table.c:
                    continue  # rows that go with it (a node's Ceph access): no reference
                stmt = select(table.c.id).where(fk.parent == obj.id).order_by(table.c.id)
                ids = list(db.session.scalars(stmt.limit(IN_USE_SAMPLE)))
                if ids:
                    found.setdefault(table.name, []).extend(ids)
        return found

    def check_in_use(self, obj: M) -> None:
        found = self.referencing(obj)
        if found:
            listing = "; ".join(f"{t} {', '.join(map(str, ids))}" for t, ids in found.items())
            raise Conflict(
                f"{self.resource} {obj.id} is still referenced by {listing}; delete or change "
                "those first.",
                error_id=error_ids.in_use(self.resource),
                data=found,
            )

    def integrity_error(self, exc: IntegrityError) -> ApiError:
        """A constraint the checks did not catch (usually a concurrent request won)."""
        code = getattr(getattr(exc, "orig", None), "pgcode", None)
        text = str(getattr(exc, "orig", exc))
        if code == "23505" or "UNIQUE constraint failed" in text:
            return Conflict(
                f"Another {self.resource} with the same unique values was written concurrently.",
                error_id=error_ids.duplicate(self.resource),
            )
        if code == "23503" or "FOREIGN KEY constraint failed" in text:
            return Conflict(
                f"The {self.resource} is referenced by, or references, a row that changed "
                "concurrently.",
                error_id=error_ids.in_use(self.resource),
            )
        return ValidationError(
            f"The {self.resource} violates a database constraint: {text.splitlines()[0]}"
        )
