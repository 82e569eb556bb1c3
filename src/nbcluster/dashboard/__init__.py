"""The operator's dashboard and the offline API docs: static files only (HTML, plain ES
modules, CSS, and vendored Swagger UI and ReDoc with their licences), served by the gateway
(``gateway/_dashboard.py``). Nothing here is fetched from a CDN. See ``docs/dashboard.md``."""

from ._assets import STATIC_DIR, VENDORED, VendoredAsset, asset_path

__all__ = ["STATIC_DIR", "VENDORED", "VendoredAsset", "asset_path"]
