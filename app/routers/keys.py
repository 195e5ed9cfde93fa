"""/api/keys: the admin's view of every key (each key is an account): list, create, revoke.

An admin key is one with ``admin`` set: the local key ``vopd serve`` creates, or ``vopd apikey create --admin``.
Any key may revoke itself (a leaked key can be killed by whoever holds it). A revoked key is refused by every
route and by the studio on its next request: nothing caches a key's verdict.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, ConfigDict, Field

from app.auth import create_api_key, end_sessions_of, list_api_keys
from app.crud import storage_used_by_key
from app.deps import AdminKeyDep, ApiKeyDep, SessionDep
from app.responses import errors
from app.tables import ApiKey

router = APIRouter(prefix="/api/keys", tags=["keys"])


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    prefix: str = Field(description="The key's first characters, enough to recognise it; the key itself is never kept.")
    admin: bool
    revoked: bool
    created_at: datetime
    storage_used_bytes: int | None = Field(
        None,
        description=(
            "In the admin's listing: what the key's datasets and jobs hold (the figure its quota, VOPD_USER_QUOTA_MB, "
            "is held against)."
        ),
    )


class KeyList(BaseModel):
    items: list[KeyOut]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, description="Who the key is for.")
    admin: bool = False


class KeyCreated(KeyOut):
    key: str = Field(description="The new key, shown this once.")


@router.get("", response_model=KeyList)
def list_keys(session: SessionDep, _admin: AdminKeyDep) -> KeyList:
    used = storage_used_by_key(session)
    return KeyList(
        items=[
            KeyOut.model_validate(row).model_copy(update={"storage_used_bytes": used.get(row.id, 0)})
            for row in list_api_keys(session)
        ]
    )


@router.post("", response_model=KeyCreated, status_code=status.HTTP_201_CREATED)
def create_key(body: KeyCreate, session: SessionDep, _admin: AdminKeyDep) -> KeyCreated:
    row, key = create_api_key(session, body.name, admin=body.admin)
    return KeyCreated(**KeyOut.model_validate(row).model_dump(), key=key)


@router.get("/me", response_model=KeyOut)
def my_key(key: ApiKeyDep) -> KeyOut:
    return KeyOut.model_validate(key)


@router.post("/{key_id}/revoke", response_model=KeyOut, responses=errors(403, 404))
def revoke_key(key_id: int, session: SessionDep, caller: ApiKeyDep) -> KeyOut:
    if key_id != caller.id and not caller.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "only an admin key may revoke another key")
    row = session.get(ApiKey, key_id) if 0 < key_id < 2**31 else None
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no API key with id {key_id}")
    row.revoked = True
    end_sessions_of(session, row.id)  # its signed-in browsers too (they were refused anyway: the key is checked)
    # Committed before the answer: the session dependency commits only after the response is sent, and a caller
    # told "revoked" must find the key refused by its very next request.
    session.commit()
    return KeyOut.model_validate(row)
