from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from .cluster import Cluster


def _kernel_processes(state_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if any(str(state_dir) in part for part in cmdline):
            found.append(proc)
    return found


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A gateway and two host daemons (2 virtual GPUs each) as real processes on loopback."""
    c = Cluster(tmp_path / "state", hosts=2)
    try:
        c.start()
    except BaseException:
        print(c.logs())
        c.stop()
        raise
    yield c
    c.stop()
    leftovers = _kernel_processes(tmp_path / "state")
    if leftovers:
        for proc in leftovers:
            proc.kill()
        pytest.fail(f"processes left behind: {[p.info['cmdline'] for p in leftovers]}")
