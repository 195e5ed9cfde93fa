"""/api/sessions: what a browser holds instead of a key.

The studio signs a browser in by exchanging a one-time sign-in code (the link ``vopd serve`` prints) or a pasted key
for a session here, and keeps only the session in its HttpOnly cookie; every API route takes the session as its
Bearer credential and acts as its key. Sign-out ends the session here, server-side: a copied cookie dies with it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Response, status
from pydantic import BaseModel, ConfigDict, Field

from app.auth import create_session, create_signin_code, end_session, find_api_key, is_session_token
from app.auth import redeem_signin_code as redeem
from app.deps import OptionalPresentedKeyDep, PresentedKeyDep, SessionDep, SettingsDep, unknown_key_error

router = APIRouter(prefix="/api/sessions", tags=["sessions"])


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="A one-time sign-in code (`vopdc_...`). Without one, the Bearer API key opens the session.",
    )


class SessionOpened(BaseModel):
    session: str = Field(description="The session (`vopds_...`), shown this once: send it as 'Authorization: Bearer'.")
    expires_at: datetime
    key_id: int
    name: str = Field(description="The name of the key (the account) the session acts as.")


class SigninCodeOut(BaseModel):
    code: str = Field(description="Good once, until expires_at: open /signin?code=CODE in a browser.")
    expires_at: datetime


class Refusal(BaseModel):
    detail: str


_UNAUTHORIZED = {401: {"model": Refusal, "description": "No key, an unknown or revoked one, or a spent code."}}
_SESSION_REFUSED = {403: {"model": Refusal, "description": "A session was sent where an API key is needed."}}


def _session_refusal() -> HTTPException:
    return HTTPException(
        status.HTTP_403_FORBIDDEN, "a session cannot open sessions or sign-in codes: use an API key for that"
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=SessionOpened,
    responses={**_UNAUTHORIZED, **_SESSION_REFUSED},
)
def open_session(
    session: SessionDep,
    settings: SettingsDep,
    presented: OptionalPresentedKeyDep,
    body: Annotated[SessionCreate | None, Body()] = None,
) -> SessionOpened:
    """Open a session: with ``{"code": ...}`` (a one-time sign-in code, spent by this call), else for the Bearer API
    key. The studio calls this when a browser signs in; the session lasts VOPD_SESSION_TTL_HOURS."""
    ttl_s = settings.session_ttl_hours * 3600
    if body is not None and body.code is not None:
        opened = redeem(session, body.code.strip(), ttl_s)
        if opened is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "this sign-in code is unknown, already used or expired: ask for a new one"
            )
        row, token = opened
    else:
        if presented is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "send an API key as 'Authorization: Bearer <key>', or a one-time sign-in code as {\"code\": ...}",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if is_session_token(presented):
            raise _session_refusal()
        key = find_api_key(session, presented)
        if key is None:
            raise unknown_key_error()
        row, token = create_session(session, key, ttl_s)
    owner = find_api_key(session, token)
    if owner is None:  # revoked in the meantime
        raise unknown_key_error()
    session.commit()  # before the answer (the dependency commits after it): the next request may use the session
    return SessionOpened(session=token, expires_at=row.expires_at, key_id=owner.id, name=owner.name)


@router.delete(
    "/current",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**_UNAUTHORIZED, 400: {"model": Refusal, "description": "An API key was sent, not a session."}},
)
def close_session(session: SessionDep, presented: PresentedKeyDep) -> Response:
    """Sign-out: the Bearer session ends now, everywhere (idempotent). A key is revoked at /api/keys/{id}/revoke."""
    if not is_session_token(presented):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, "this ends a session (vopds_...); to end a key, revoke it at /api/keys"
        )
    end_session(session, presented)
    session.commit()  # ended before the answer, not after it
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/codes",
    status_code=status.HTTP_201_CREATED,
    response_model=SigninCodeOut,
    responses={**_UNAUTHORIZED, **_SESSION_REFUSED},
)
def new_signin_code(session: SessionDep, settings: SettingsDep, presented: PresentedKeyDep) -> SigninCodeOut:
    """A one-time sign-in code for the Bearer API key: a link that signs a browser in without pasting the key."""
    if is_session_token(presented):
        raise _session_refusal()
    key = find_api_key(session, presented)
    if key is None:
        raise unknown_key_error()
    row, code = create_signin_code(session, key, settings.signin_code_ttl_s)
    session.commit()
    return SigninCodeOut(code=code, expires_at=row.expires_at)
