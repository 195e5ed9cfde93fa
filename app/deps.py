"""FastAPI dependencies: settings, a database session per request, and the caller's API key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.auth import find_api_key
from app.db import session_scope
from app.settings import Settings
from app.tables import ApiKey

_bearer = HTTPBearer(
    auto_error=False,
    description=(
        "An API key from `vopd apikey create` (the local one is in VOPD_HOME/local_api_key), or a studio session "
        "(`vopds_...`, from POST /api/sessions), which acts as its key until it expires, ends or its key is revoked."
    ),
)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with session_scope(request.app.state.session_factory) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
# scope="function": the unit of work commits when the route returns, before its answer is sent. By default FastAPI
# runs a yield dependency's exit after the response, so a client's next request could miss the write it was just
# told about (seen on PostgreSQL: a just-revoked key's session still served).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def get_presented_key(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The key the caller sent, not yet checked (no database work, so it runs on the event loop)."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send 'Authorization: Bearer <key>' (create one with `vopd apikey create`)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return credentials.credentials


PresentedKeyDep = Annotated[str, Depends(get_presented_key)]


async def get_optional_presented_key(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str | None:
    """The Bearer credential when one was sent (a route that also takes other proof, such as a sign-in code)."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        return None
    return credentials.credentials


OptionalPresentedKeyDep = Annotated[str | None, Depends(get_optional_presented_key)]


def unknown_key_error() -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"}
    )


def get_api_key(session: SessionDep, presented: PresentedKeyDep) -> ApiKey:
    key = find_api_key(session, presented)
    if key is None:
        raise unknown_key_error()
    return key


ApiKeyDep = Annotated[ApiKey, Depends(get_api_key)]


def get_admin_key(key: ApiKeyDep) -> ApiKey:
    if not key.admin:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "this needs an admin key (the local key printed by `vopd serve`, or `vopd apikey create --admin`)",
        )
    return key


AdminKeyDep = Annotated[ApiKey, Depends(get_admin_key)]
