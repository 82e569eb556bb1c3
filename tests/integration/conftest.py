"""Fixtures shared by the integration tests that run containers (tests/engine.py)."""

from __future__ import annotations

from typing import Any

import pytest

from ..engine import docker_engine, nbcluster_image


@pytest.fixture(scope="module")
def engine() -> Any:
    """A ``docker.DockerClient`` on a live engine (else the test is skipped, or fails in CI)."""
    return docker_engine()


@pytest.fixture(scope="module")
def image(engine: Any) -> str:
    """The nbcluster image's tag for the sources as they are now (built if needed)."""
    return nbcluster_image()
