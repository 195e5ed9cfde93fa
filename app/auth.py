"""API keys: 32 random bytes shown once, stored as sha256 (a salt adds nothing to a key nobody can guess).

Each key is an account: jobs and datasets belong to the key that made them. A key marked ``admin`` (the local key
``vopd serve`` creates, or ``vopd apikey create --admin``) may also list and revoke every key over HTTP. A revoked
key is refused everywhere at once: every request looks its key up, nothing caches a verdict.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.tables import ApiKey

KEY_PREFIX = "vopd_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_api_key(session: Session, name: str, *, admin: bool = False) -> tuple[ApiKey, str]:
    """A new key row; the plain key is returned once and never stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name, key_hash=hash_key(key), prefix=key[: len(KEY_PREFIX) + 6], admin=admin)
    session.add(row)
    session.flush()
    return row, key


def find_api_key(session: Session, key: str) -> ApiKey | None:
    """The live key row for ``key``, or None (unknown or revoked)."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    return row if row is not None and not row.revoked else None


def list_api_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


class KeyNotFound(LookupError):
    """No key, or more than one, answers to what was given (the message says which)."""


def resolve_api_key(session: Session, id_or_prefix: str) -> ApiKey:
    """The one key named by its id, its prefix as ``list`` shows it (``vopd_AbC123``) or the whole key."""
    wanted = id_or_prefix.strip()
    if wanted.isdigit():
        row = session.get(ApiKey, int(wanted))
        if row is None:
            raise KeyNotFound(f"no API key with id {wanted}")
        return row
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(wanted)))
    if row is not None:
        return row
    if len(wanted) < len(KEY_PREFIX) + 3:
        raise KeyNotFound(f"{wanted!r} is too short: give the id or at least {len(KEY_PREFIX) + 3} characters")
    matches = [key for key in list_api_keys(session) if key.prefix.startswith(wanted)]
    if not matches:
        raise KeyNotFound(f"no API key with id or prefix {wanted!r}")
    if len(matches) > 1:
        ids = ", ".join(str(key.id) for key in matches)
        raise KeyNotFound(f"{wanted!r} matches several keys (ids {ids}): give the id")
    return matches[0]


def revoke_api_key(session: Session, id_or_prefix: str) -> ApiKey:
    """Mark the key revoked (idempotent); its jobs and datasets stay, nobody can act as it any more."""
    row = resolve_api_key(session, id_or_prefix)
    row.revoked = True
    session.flush()
    return row
