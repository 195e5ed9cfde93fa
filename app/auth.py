"""API keys, browser sessions and one-time sign-in codes: 32 random bytes each, stored only as their sha256 (a salt
adds nothing to a secret nobody can guess).

Each key is an account: jobs and datasets belong to the key that made them. A key marked ``admin`` (the local key
``vopd serve`` creates, or ``vopd apikey create --admin``) may also list and revoke every key over HTTP. A revoked
key is refused everywhere at once: every request looks its key up, nothing caches a verdict.

A browser never holds the key. The link ``vopd serve`` prints carries a sign-in *code* (``vopdc_...``: minutes long,
good once) and the sign-in form takes a key; either is exchanged for a *session* (``vopds_...``), which the studio
keeps in its HttpOnly cookie and forwards to the API as its Bearer credential. A session acts as its key until it
expires, is ended (sign-out), or its key is revoked (which ends its sessions too). A URL, a cookie or a log line
that leaks a session gives away one revocable, expiring session, never the key.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from app.tables import ApiKey, BrowserSession, SigninCode, utcnow

KEY_PREFIX = "vopd_"
SESSION_PREFIX = "vopds_"
CODE_PREFIX = "vopdc_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_api_key(session: Session, name: str, *, admin: bool = False) -> tuple[ApiKey, str]:
    """A new key row; the plain key is returned once and never stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name, key_hash=hash_key(key), prefix=key[: len(KEY_PREFIX) + 6], admin=admin)
    session.add(row)
    session.flush()
    return row, key


def is_session_token(credential: str) -> bool:
    return credential.startswith(SESSION_PREFIX)


def find_api_key(session: Session, credential: str) -> ApiKey | None:
    """The live key row a credential acts as (a key itself, or a live session of a live key), or None."""
    if is_session_token(credential):
        return session.scalar(
            select(ApiKey)
            .join(BrowserSession, BrowserSession.key_id == ApiKey.id)
            .where(
                BrowserSession.token_hash == hash_key(credential),
                BrowserSession.ended_at.is_(None),
                BrowserSession.expires_at > utcnow(),
                ApiKey.revoked.is_(False),
            )
        )
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(credential)))
    return row if row is not None and not row.revoked else None


def create_session(session: Session, key: ApiKey, ttl_s: float) -> tuple[BrowserSession, str]:
    """A new session acting as ``key``; the token is returned once and only its hash is kept."""
    token = SESSION_PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    row = BrowserSession(
        token_hash=hash_key(token), key_id=key.id, created_at=now, expires_at=now + timedelta(seconds=ttl_s)
    )
    session.add(row)
    session.flush()
    return row, token


def end_session(session: Session, token: str) -> bool:
    """Sign-out: the session stops working at once (True when a live one was ended)."""
    ended = session.execute(
        update(BrowserSession)
        .where(BrowserSession.token_hash == hash_key(token), BrowserSession.ended_at.is_(None))
        .values(ended_at=utcnow())
    )
    return bool(ended.rowcount)


def end_sessions_of(session: Session, key_id: int) -> int:
    """Every live session of a key ends (its revocation); unused sign-in codes of the key are spent too."""
    now = utcnow()
    ended = session.execute(
        update(BrowserSession)
        .where(BrowserSession.key_id == key_id, BrowserSession.ended_at.is_(None))
        .values(ended_at=now)
    )
    session.execute(
        update(SigninCode).where(SigninCode.key_id == key_id, SigninCode.used_at.is_(None)).values(used_at=now)
    )
    return int(ended.rowcount or 0)


def prune_sessions(session: Session, keep_s: float = 86400.0) -> int:
    """Forget sessions and sign-in codes that stopped working more than ``keep_s`` ago (the reaper calls this)."""
    cutoff = utcnow() - timedelta(seconds=keep_s)
    gone = session.execute(
        delete(BrowserSession).where(or_(BrowserSession.expires_at < cutoff, BrowserSession.ended_at < cutoff))
    ).rowcount
    gone += session.execute(
        delete(SigninCode).where(or_(SigninCode.expires_at < cutoff, SigninCode.used_at < cutoff))
    ).rowcount
    return int(gone or 0)


def create_signin_code(session: Session, key: ApiKey, ttl_s: float) -> tuple[SigninCode, str]:
    """A one-time code that signs a browser in as ``key`` (the link ``vopd serve`` prints); returned once."""
    code = CODE_PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    row = SigninCode(code_hash=hash_key(code), key_id=key.id, created_at=now, expires_at=now + timedelta(seconds=ttl_s))
    session.add(row)
    session.flush()
    return row, code


def redeem_signin_code(session: Session, code: str, session_ttl_s: float) -> tuple[BrowserSession, str] | None:
    """Spend a code for a new session of its key; None when the code is unknown, used, expired or its key revoked.

    The code is spent by a conditional UPDATE, so two browsers racing with one link get one session between them."""
    row = session.scalar(select(SigninCode).where(SigninCode.code_hash == hash_key(code)))
    if row is None:
        return None
    now = utcnow()
    spent = session.execute(
        update(SigninCode)
        .where(SigninCode.id == row.id, SigninCode.used_at.is_(None), SigninCode.expires_at > now)
        .values(used_at=now)
    )
    key = session.get(ApiKey, row.key_id)
    if not spent.rowcount or key is None or key.revoked:
        return None
    return create_session(session, key, session_ttl_s)


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
    """Mark the key revoked (idempotent) and end its sessions; its jobs and datasets stay, nobody can act as it."""
    row = resolve_api_key(session, id_or_prefix)
    row.revoked = True
    end_sessions_of(session, row.id)
    session.flush()
    return row
