"""The error answers of the REST API, declared in /openapi.json on every route that gives them.

A client generated from the document (or schemathesis's ``status_code_conformance`` and
``response_schema_conformance`` checks, which the suite runs) must find each status code a route can answer with,
and its body shape. Routes declare their own errors (404, 409, 429, ...) with ``errors()``; the ones that come from
shared machinery are added to the document by ``install_error_docs`` from what each route depends on: 401 from the key
dependency, 403 from the admin one, 413 on every POST (``app.limits.BodySizeLimit`` caps every body), 400 where
FastAPI parses a body.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where: body, query or path, then the field.")
    msg: str
    type: str
    input: Any = Field(None, description="The rejected value, only when short and safe to echo.")


class ErrorOut(BaseModel):
    """The body of every 4xx answer: a message, or (for a rejected field) the list of field errors."""

    detail: str | list[FieldError]


class QuotaExceeded(BaseModel):
    """The key's storage quota is used up: the figures say by how much."""

    detail: str
    used_bytes: int = Field(description="What the key's datasets and jobs hold on the server now.")
    limit_bytes: int = Field(description="The quota (VOPD_USER_QUOTA_MB).")


DESCRIPTIONS = {
    400: "The body could not be parsed at all (broken multipart or body framing); see 422 for invalid fields.",
    401: "Missing, unknown or revoked API key.",
    403: "The key may not do this (an admin key is needed).",
    404: "No such resource among the caller's own (someone else's is indistinguishable from a missing one).",
    409: "The resource's current state does not allow this; the detail says why.",
    413: "The request body is over its limit (VOPD_MAX_BODY_MB; uploads VOPD_MAX_UPLOAD_MB) or the storage quota.",
    503: "Busy: retry after the Retry-After seconds.",
    504: "The work ran past its time budget and was stopped.",
    429: "The key's storage quota (VOPD_USER_QUOTA_MB) is used up; the body gives used and limit in bytes.",
}
MODELS: dict[int, type[BaseModel]] = {429: QuotaExceeded}


def errors(*codes: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route decorator: each code with its model and a description (``d404="..."`` overrides
    the default one)."""
    return {
        code: {"model": MODELS.get(code, ErrorOut), "description": descriptions.get(f"d{code}", DESCRIPTIONS[code])}
        for code in codes
    }


async def quota_exceeded_handler(request: Request, error: Exception) -> JSONResponse:
    """``app.crud.QuotaExceeded`` from any route: 429 with the figures."""
    used, limit = getattr(error, "used", 0), getattr(error, "limit", 0)
    body = QuotaExceeded(detail=str(error), used_bytes=used, limit_bytes=limit)
    return JSONResponse(body.model_dump(), status_code=429)


def _calls(dependant: Dependant) -> set[Any]:
    found = {dependant.call}
    for child in dependant.dependencies:
        found |= _calls(child)
    return found


def shared_error_codes(route: APIRoute) -> list[int]:
    """The error codes a route gives through shared machinery rather than its own code."""
    from app.deps import get_admin_key, get_presented_key

    calls = _calls(route.dependant)
    codes = []
    if route.body_field is not None:  # FastAPI's own answer to a body it cannot even parse
        codes.append(400)
    if get_presented_key in calls:
        codes.append(401)
    if get_admin_key in calls:
        codes.append(403)
    if route.methods & {"POST", "PUT", "PATCH", "DELETE"}:
        codes.append(413)
    return codes


def _api_routes(app: FastAPI) -> list[APIRoute]:
    """Every APIRoute of the app: FastAPI >= 0.16x keeps included routers as such (their routes are reached through
    ``iter_route_contexts``), older ones copy the routes into ``app.routes``. Routers are included without a prefix of
    their own, so each route's path is the one in the document."""
    from fastapi import routing

    if hasattr(routing, "iter_route_contexts"):
        routes = [context.original_route for context in routing.iter_route_contexts(app.routes)]
    else:
        routes = list(app.routes)
    return [route for route in routes if isinstance(route, APIRoute)]


def install_error_docs(app: FastAPI) -> None:
    """Generate /openapi.json with the shared error codes added to each route that gives them."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            openapi_version=app.openapi_version,
            description=app.description,
            routes=app.routes,
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (FieldError, ErrorOut):
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            model_schema.pop("$defs", None)
            components.setdefault(model.__name__, model_schema)
        for route in _api_routes(app):
            if not route.include_in_schema:
                continue
            for method in route.methods:
                operation = schema["paths"].get(route.path_format, {}).get(method.lower())
                if operation is None:
                    continue
                for code, response in operation["responses"].items():
                    content = response.get("content", {})
                    if code.isdigit() and int(code) >= 400 and content and "application/json" not in content:
                        # FastAPI gives an error the route's media type (text/event-stream for the event stream);
                        # errors are JSON on every route (HTTPException).
                        response["content"] = {"application/json": next(iter(content.values()))}
                for code in shared_error_codes(route):
                    operation["responses"].setdefault(
                        str(code),
                        {
                            "description": DESCRIPTIONS[code],
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}},
                        },
                    )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
