"""A headless Chromium for the dashboard's tests: Debian's ``chromium`` driven by its
``chromedriver`` through Selenium (no browser download). Missing, the tests are skipped, or
fail under ``NBCLUSTER_TEST_REQUIRE_CHROMIUM=1`` (CI, where ``deploy/ci/test-tools.sh``
installs them). Screenshots go to ``.test-artifacts/dashboard/`` (or
``$NBCLUSTER_TEST_ARTIFACTS/dashboard``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

__all__ = ["ARTIFACTS", "REQUIRE_ENV", "chromium", "require_chromium"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REQUIRE_ENV = "NBCLUSTER_TEST_REQUIRE_CHROMIUM"
ARTIFACTS = (
    Path(
        os.environ.get("NBCLUSTER_TEST_ARTIFACTS")
        or Path(__file__).parent.parent / ".test-artifacts"
    )
    / "dashboard"
)


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: the browser tests must run)", pytrace=False)
    pytest.skip(reason)


def require_chromium() -> None:
    """Skip the test (fail it under ``NBCLUSTER_TEST_REQUIRE_CHROMIUM=1``) without Chromium,
    its driver or Selenium."""
    for program in (CHROMIUM, CHROMEDRIVER):
        if not os.access(program, os.X_OK):
            _unavailable(
                f"{program} is not installed (apt-get install -y chromium chromium-driver)"
            )
    try:
        import selenium  # noqa: F401
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[dev]')")


def chromium(width: int = 1280, height: int = 800) -> Iterator[Any]:
    """A headless Chromium (a ``selenium.webdriver.Chrome``), quit at the end."""
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # A profile of its own: two browsers on one profile share its storage and saw each
    # other's typing (seen when two pytest workers each started one).
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
