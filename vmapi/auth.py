"""Bearer tokens and roles.

Tokens are 256 random bits; only their SHA-256 is stored (a slow hash adds nothing to a
secret of that entropy and would cost every request). The lookup is by the hash's unique
index, and the stored hash is compared again in constant time.

A worker remembers a verified token for ``TOKEN_CACHE_SECONDS`` (default 5): a request
then costs no token query. Expiry is still checked on every request; a revocation takes
effect within that time (0 turns the cache off).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

from flask import current_app
from sqlalchemy import select

from vmapi.errors import AuthenticationFailed, AuthenticationRequired, Forbidden
from vmapi.extensions import db
from vmapi.models import ApiToken

TOKEN_PREFIX = "vmapi_"  # noqa: S105 - a prefix that makes leaked tokens greppable
ADMIN = "admin"
CUSTOMER = "customer"
TOKEN_CACHE_KEY = "vmapi.token_cache"  # noqa: S105 - an app.extensions key, not a secret
TOKEN_CACHE_SIZE = 4096  # tokens a worker remembers at most (least recently used go)


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


#: The admin CLI acts with admin rights (it runs on the API host with its database
#: credentials); its changes are recorded as the user who ran it (services/audit.py).
CLI_PRINCIPAL = Principal(token_id=0, name="cli", role=ADMIN)


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(plain: str) -> str:
    return hashlib.sha256(plain.encode("utf-8")).hexdigest()


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


class TokenCache:
    """Verified tokens by hash: the principal, its expiry, and when it was read."""

    def __init__(self) -> None:
        self.entries: OrderedDict[str, tuple[Principal, datetime | None, float]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, digest: str, ttl: float) -> tuple[Principal, datetime | None] | None:
        with self.lock:
            entry = self.entries.get(digest)
            if entry is None:
                return None
            if time.monotonic() - entry[2] >= ttl:
                del self.entries[digest]
                return None
            self.entries.move_to_end(digest)
            return entry[0], entry[1]

    def put(self, digest: str, principal: Principal, expires: datetime | None) -> None:
        with self.lock:
            self.entries[digest] = (principal, expires, time.monotonic())
            self.entries.move_to_end(digest)
            while len(self.entries) > TOKEN_CACHE_SIZE:
                self.entries.popitem(last=False)


def lookup(digest: str) -> tuple[Principal, datetime | None] | None:
    """The unrevoked token with this hash (from the worker's cache when fresh)."""
    ttl = float(current_app.config["TOKEN_CACHE_SECONDS"])
    cache: TokenCache = current_app.extensions.setdefault(TOKEN_CACHE_KEY, TokenCache())
    if ttl > 0:
        hit = cache.get(digest, ttl)
        if hit is not None:
            return hit
    token = db.session.scalars(select(ApiToken).where(ApiToken.token_hash == digest)).first()
    if token is None or not hmac.compare_digest(token.token_hash, digest):
        return None
    if token.revoked_at is not None:
        return None
    found = Principal(token.id, token.name, token.role, token.customer_id), as_utc(token.expires_at)
    if ttl > 0:
        cache.put(digest, *found)
    return found


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
    found = lookup(hash_token(plain))
    if found is None:
        raise AuthenticationFailed()
    principal, expires = found
    if expires is not None and expires <= datetime.now(UTC):
        raise AuthenticationFailed()
    return principal


def require_role(principal: Principal, roles: frozenset[str], action: str) -> None:
    """403 unless the principal's role is one of ``roles``."""
    if principal.role not in roles:
        raise Forbidden(action=action)
