"""Every vendored file of the dashboard is in the package with its licence, no page loads
anything from another site, and static names cannot leave the static directory."""

from __future__ import annotations

import re

from nbcluster.dashboard import STATIC_DIR, VENDORED, asset_path


def test_every_vendored_file_is_there_with_its_licence() -> None:
    for vendored in VENDORED:
        directory = STATIC_DIR / vendored.directory
        assert vendored.version in vendored.directory
        for name in vendored.files:
            assert (directory / name).is_file(), f"{vendored.name}: {name} is missing"
        assert (directory / "LICENSE").read_text().strip(), f"{vendored.name}: empty LICENSE"


def test_no_page_or_module_loads_from_another_site() -> None:
    own = [*STATIC_DIR.glob("*.html"), *STATIC_DIR.glob("js/*.js"), *STATIC_DIR.glob("*.css")]
    assert len(own) >= 6
    for path in own:
        text = path.read_text()
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), path.name
        assert "import(" not in text or "http" not in text, path.name
        assert not re.search(r"""from ["']https?://""", text), path.name


def test_asset_names_stay_inside_the_static_directory() -> None:
    assert asset_path("index.html") is not None
    found = asset_path("js/app.js")
    assert found is not None and found[1].startswith("text/javascript")
    for bad in ("", "../_assets.py", "js/../../__init__.py", "/etc/passwd", "js\\app.js", "a\x00b"):
        assert asset_path(bad) is None, bad
    assert asset_path("js") is None  # a directory
