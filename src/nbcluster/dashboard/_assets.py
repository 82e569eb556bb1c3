"""Where the dashboard's files are, and what was vendored from where (with which licence).

Read by the gateway's dashboard routes and by the test that checks every vendored file is
present with its licence."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["STATIC_DIR", "VENDORED", "VendoredAsset", "asset_path"]

STATIC_DIR = Path(__file__).parent / "static"


@dataclass(frozen=True)
class VendoredAsset:
    """A third-party package copied into ``static/vendor/<directory>``."""

    name: str
    version: str
    #: Where it came from (the npm package).
    source: str
    licence: str
    directory: str
    #: The files taken from it (under ``directory``), licence files included.
    files: tuple[str, ...]


VENDORED: tuple[VendoredAsset, ...] = (
    VendoredAsset(
        name="Swagger UI",
        version="5.35.0",
        source="npm swagger-ui-dist@5.35.0",
        licence="Apache-2.0",
        directory="vendor/swagger-ui-5.35.0",
        files=(
            "swagger-ui-bundle.js",
            "swagger-ui-bundle.js.LICENSE.txt",
            "swagger-ui.css",
            "LICENSE",
            "NOTICE",
        ),
    ),
    VendoredAsset(
        name="ReDoc",
        version="2.5.2",
        source="npm redoc@2.5.2 (bundles/redoc.standalone.js)",
        licence="MIT",
        directory="vendor/redoc-2.5.2",
        files=("redoc.standalone.js", "redoc.standalone.js.LICENSE.txt", "LICENSE"),
    ),
)

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
    "": "text/plain; charset=utf-8",  # LICENSE, NOTICE
}


def asset_path(relative: str) -> tuple[Path, str] | None:
    """The file under ``STATIC_DIR`` named by ``relative`` and its content type, or None when
    there is none (or the name leaves the directory, or has a type not served)."""
    if not relative or "\x00" in relative or "\\" in relative:
        return None
    root = STATIC_DIR.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    media_type = _TYPES.get(path.suffix)
    if media_type is None:
        return None
    return path, media_type
