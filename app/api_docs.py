"""The API's own page (Swagger UI at /docs) served from installed files, never from a CDN.

FastAPI's default pages load Swagger UI's script and style from a CDN, so on a machine without internet access
(the offline installs this project is made for) /docs was a blank page ("SwaggerUIBundle is not defined"). The
``fastapi-offline`` package ships the same assets; this module mounts its static folder and renders FastAPI's own
page template pointing at it. ReDoc is not offered: its page fetches its branding from a CDN whatever it is given.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/api-docs-assets"
DOCS_URL = "/docs"


def assets_dir() -> str:
    """The folder of Swagger UI's script, style and favicon inside the installed package."""
    return str(files("fastapi_offline") / "static")


def install_api_docs(app: FastAPI) -> None:
    """Serve /docs from local assets; build ``app`` with ``docs_url=None, redoc_url=None`` first."""
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="api-docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get(DOCS_URL, include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - API",
            oauth2_redirect_url=f"{root}{oauth2_redirect_url}",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(oauth2_redirect_url, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
