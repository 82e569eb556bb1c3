"""The failover corpus (issue 10): every notebook of ``tests/corpus`` runs on a plain local
ipykernel and on nbcluster with ``kill -9`` of the executing replica after every cell; the
cells' outputs and the kernel's state at the end (every global by value, the identities among
the globals, IPython's history, interpreter state) must be identical, or the difference
announced in a cell by a ``[nbcluster]`` line naming the variable.

One test per notebook (``-k nb04`` runs one). ``NBCLUSTER_CORPUS_KILLS=last`` kills only once,
after the last cell (state synchronisation without failover edges), ``none`` never (tells
sync bugs from failover bugs). ``NBCLUSTER_CORPUS_REPORT=DIR`` writes each notebook's report
to ``DIR/<notebook>.txt``. The harness is ``tests/corpus_harness.py``; the notebooks and where
the public ones come from: ``tests/corpus/README.md``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..cluster import Cluster, running_cluster
from ..corpus_harness import (
    CORPUS_DIR,
    KILL_MODES,
    ClusterRunner,
    LocalRunner,
    NotebookRun,
    compare,
    corpus_notebooks,
    load_notebook,
    report,
    run_notebook,
)

pytestmark = pytest.mark.integration

KILLS = os.environ.get("NBCLUSTER_CORPUS_KILLS", "every")
REPORT_DIR = os.environ.get("NBCLUSTER_CORPUS_REPORT")


def _workdir(parent: Path, name: str = "work") -> Path:
    """``parent/name``, with ``parent`` created (each side runs in its own ``work``)."""
    parent.mkdir(parents=True, exist_ok=True)
    if name == "work":
        (parent / name).mkdir()
    return parent / name


@pytest.fixture(scope="module")
def corpus_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster for the whole corpus: each notebook gets its own kernel on it."""
    with running_cluster(tmp_path_factory.mktemp("corpus") / "state", hosts=4, replicas=3) as c:
        yield c


#: Notebooks with a difference nbcluster does not close yet, each with the reason. Strict: once
#: fixed, the test passes, the mark makes it fail, and the entry goes.
KNOWN: dict[str, str] = {}


def _params() -> list[Any]:
    return [
        pytest.param(path, marks=pytest.mark.xfail(strict=True, reason=KNOWN[path.name]))
        if path.name in KNOWN
        else path
        for path in corpus_notebooks()
    ]


@pytest.mark.timeout(420)
@pytest.mark.parametrize("path", _params(), ids=lambda p: p.name)
async def test_notebook_survives_failovers(
    path: Path, corpus_cluster: Cluster, tmp_path: Path
) -> None:
    assert KILLS in KILL_MODES, f"NBCLUSTER_CORPUS_KILLS must be one of {KILL_MODES}"
    notebook = load_notebook(path)
    missing = [m for m in notebook.requires if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{path.name} needs {', '.join(missing)}, not installed in this venv")
    local_dir, cluster_dir = _workdir(tmp_path / "local"), _workdir(tmp_path / "cluster")

    kernel = ClusterRunner(corpus_cluster, cluster_dir, KILLS)

    async def after_cell(position: int, last: bool) -> str | None:
        if KILLS == "every" or (KILLS == "last" and last):
            return await kernel.kill_executor()
        return None

    async def on_local() -> NotebookRun:
        async with LocalRunner(local_dir) as local_kernel:
            return await run_notebook(notebook, local_kernel, "local")

    async def on_nbcluster() -> NotebookRun:
        async with kernel:
            return await run_notebook(notebook, kernel, "nbcluster", after_cell)

    # the local run takes a second or two: it runs while nbcluster starts its kernel
    started = time.monotonic()
    local, cluster = await asyncio.gather(on_local(), on_nbcluster())
    elapsed = time.monotonic() - started

    diffs = compare(notebook, local, cluster)
    text = (
        f"{report(notebook, diffs, local, cluster)}\n"
        f"kills: {kernel.kills_done} ({KILLS}), {kernel.kill_seconds:.1f} s waiting for commits, "
        f"deaths and replacements; {elapsed:.1f} s in all (both kernels, start to shutdown)"
    )
    print(text)
    if REPORT_DIR:
        _workdir(Path(REPORT_DIR), f"{path.name}.txt").write_text(text + "\n")
    failing = [d for d in diffs if not d.announced]
    assert not failing, text


@pytest.mark.timeout(120)
async def test_the_harness_sees_no_difference_between_two_local_runs_and_sees_a_broken_one(
    tmp_path: Path,
) -> None:
    """The harness itself: two plain kernels running the aliasing notebook agree; when the
    second loses an alias and a variable (as a bad failover would), exactly that is reported."""
    pytest.importorskip("numpy")
    notebook = load_notebook(CORPUS_DIR / "nb04_aliasing.py")

    async def run(side: str, before_probe: str | None = None) -> NotebookRun:
        async with LocalRunner(_workdir(tmp_path / side)) as kernel:
            return await run_notebook(notebook, kernel, side, before_probe=before_probe)

    first, second, broken = await asyncio.gather(
        run("first"), run("second"), run("broken", "b = list(b)\ndel SENTINEL")
    )
    assert compare(notebook, first, second) == [], report(notebook, [], first, second)
    found = {(d.where, d.what) for d in compare(notebook, first, broken)}
    assert found == {
        ("global SENTINEL", "missing on nbcluster"),
        ("identity", "a is the same object as b locally, not on nbcluster"),
        ("identity", "b shares a mutable object with late locally, not on nbcluster"),
        ("identity", "b shares a mutable object with push locally, not on nbcluster"),
    }, found
