"""The dashboard's routes: ``/dashboard`` (its page), ``/dashboard/static/...`` (its modules,
styles and the vendored Swagger UI and ReDoc), and ``/docs`` and ``/redoc``, which FastAPI
would otherwise load from a CDN.

Every page here is a static shell with no data (``public`` in ``identity.ROUTE_RULES``): it
asks for a token and then calls the authenticated API, so a browser can open it, and each
page forbids scripts from anywhere but the gateway (Content-Security-Policy)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from ..dashboard import asset_path
from ._errors import ApiError
from ._http import ERROR_RESPONSES

__all__ = ["build_dashboard_router"]

#: Scripts, styles, images and connections from the gateway itself only. Inline styles: the
#: vendored Swagger UI and ReDoc set them; ReDoc also runs a worker from a blob.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _page(name: str) -> FileResponse:
    found = asset_path(name)
    if found is None:  # a broken install
        raise ApiError(500, f"the dashboard's {name} is missing from the package", "missing file")
    path, media_type = found
    return FileResponse(
        path, media_type=media_type, headers=_HEADERS | {"Cache-Control": "no-cache"}
    )


def build_dashboard_router() -> APIRouter:
    # Pages and files, not API: left out of the OpenAPI schema, as FastAPI's own /docs is
    # (the schema describes the JSON API; these are public, data-free pages).
    router = APIRouter(responses=ERROR_RESPONSES, include_in_schema=False)

    @router.get("/dashboard", summary="The cluster dashboard (a page; log in with a token)")
    async def dashboard() -> Response:
        return _page("index.html")

    @router.get(
        "/dashboard/static/{path:path}",
        summary="The dashboard's files and the vendored Swagger UI and ReDoc",
        response_class=FileResponse,
        responses={200: {"description": "The file", "content": {"*/*": {}}}},
    )
    async def static(path: str) -> Response:
        found = asset_path(path)
        if found is None:
            raise ApiError(404, f"the dashboard has no file {path!r}", "not found")
        file, media_type = found
        return FileResponse(
            file, media_type=media_type, headers=_HEADERS | {"Cache-Control": "no-cache"}
        )

    @router.get("/docs", summary="Swagger UI (served from the gateway; works offline)")
    async def swagger() -> Response:
        return _page("swagger.html")

    @router.get("/redoc", summary="ReDoc (served from the gateway; works offline)")
    async def redoc() -> Response:
        return _page("redoc.html")

    return router
