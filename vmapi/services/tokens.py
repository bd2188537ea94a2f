"""Creating, listing and revoking API tokens (the admin CLI's use cases)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import or_, select

from vmapi.auth import ADMIN, CUSTOMER, generate_token, hash_token
from vmapi.extensions import db
from vmapi.models import ApiToken


class TokenError(Exception):
    """A token command could not be carried out; the message says why."""


def create_token(
    role: str,
    customer_id: int | None = None,
    name: str | None = None,
    expires_days: int | None = None,
) -> tuple[ApiToken, str]:
    """Make a token; return the row and the plain token, which is not stored anywhere."""
    if role not in (ADMIN, CUSTOMER):
        raise TokenError(f"role must be {ADMIN} or {CUSTOMER}")
    if (role == CUSTOMER) != (customer_id is not None):
        raise TokenError("a customer token needs a customer id; an admin token has none")
    if expires_days is not None and expires_days <= 0:
        raise TokenError("--expires must be a positive number of days")
    plain = generate_token()
    now = datetime.now(UTC)
    if name is None:
        owner = f"-{customer_id}" if customer_id is not None else ""
        name = f"{role}{owner}-{secrets.token_hex(4)}"
    if db.session.scalars(select(ApiToken).where(ApiToken.name == name)).first():
        raise TokenError(f"a token named {name!r} exists already")
    token = ApiToken(
        name=name,
        role=role,
        customer_id=customer_id,
        token_hash=hash_token(plain),
        created_at=now,
        expires_at=now + timedelta(days=expires_days) if expires_days else None,
    )
    db.session.add(token)
    db.session.commit()
    return token, plain


def list_tokens() -> list[ApiToken]:
    return list(db.session.scalars(select(ApiToken).order_by(ApiToken.id)))


def revoke_token(id_or_name: str) -> ApiToken:
    """Revoke by id or name; revoking twice is not an error."""
    cond = ApiToken.name == id_or_name
    if id_or_name.isdigit():
        cond = or_(cond, ApiToken.id == int(id_or_name))
    token = db.session.scalars(select(ApiToken).where(cond)).first()
    if token is None:
        raise TokenError(f"no token with id or name {id_or_name!r}")
    if token.revoked_at is None:
        token.revoked_at = datetime.now(UTC)
        db.session.commit()
    return token
