from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .cluster import Cluster, running_cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A gateway and two host daemons (2 virtual GPUs each) as real processes on loopback;
    the test fails if any of their processes is left behind."""
    with running_cluster(tmp_path / "state", hosts=2) as c:
        yield c
