"""Bearer tokens and roles.

Tokens are 256 random bits; only their SHA-256 is stored (a slow hash adds nothing to a
secret of that entropy and would cost every request). The lookup is by the hash's unique
index, and the stored hash is compared again in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select

from vmapi.errors import AuthenticationFailed, AuthenticationRequired, Forbidden
from vmapi.extensions import db
from vmapi.models import ApiToken

TOKEN_PREFIX = "vmapi_"  # noqa: S105 - a prefix that makes leaked tokens greppable
ADMIN = "admin"
CUSTOMER = "customer"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id, name, role and (for customers) customer id."""

    token_id: int
    name: str
    role: str
    customer_id: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(plain: str) -> str:
    return hashlib.sha256(plain.encode("utf-8")).hexdigest()


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


def authenticate(authorization: str | None) -> Principal:
    """The principal behind an ``Authorization`` header value, or a 401 error."""
    if not authorization:
        raise AuthenticationRequired()
    scheme, _, plain = authorization.partition(" ")
    plain = plain.strip()
    if scheme.lower() != "bearer" or not plain:
        raise AuthenticationRequired()
    if len(plain) > 256 or not plain.isascii():
        raise AuthenticationFailed()
    digest = hash_token(plain)
    token = db.session.scalars(select(ApiToken).where(ApiToken.token_hash == digest)).first()
    if token is None or not hmac.compare_digest(token.token_hash, digest):
        raise AuthenticationFailed()
    now = datetime.now(UTC)
    if token.revoked_at is not None:
        raise AuthenticationFailed()
    expires = as_utc(token.expires_at)
    if expires is not None and expires <= now:
        raise AuthenticationFailed()
    return Principal(token.id, token.name, token.role, token.customer_id)


def require_role(principal: Principal, roles: frozenset[str], action: str) -> None:
    """403 unless the principal's role is one of ``roles``."""
    if principal.role not in roles:
        raise Forbidden(action=action)
