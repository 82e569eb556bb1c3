"""Each package's public names: sorted, and all of them importable; and no module imports
another package's private module."""

from __future__ import annotations

import importlib
import re

import pytest

from .module_graph import graph, modules, packages

#: Every package under src/nbcluster (and nbcluster itself), found on the filesystem.
PACKAGES = packages()


def isort_key(name: str) -> tuple[int, list[str | int]]:
    """The order ruff's RUF022 keeps ``__all__`` in: CONSTANTS, then Classes, then functions,
    each in natural order."""
    if name.upper() == name and name.lower() != name:
        group = 0
    elif name[:1].isupper():
        group = 1
    else:
        group = 2
    natural = [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
    return group, natural


def test_isort_key() -> None:
    names = ["run", "Signer", "V1_SUBPROTOCOL", "DELIMITER", "Message", "decode_v1", "decode_v10"]
    assert sorted(names, key=isort_key) == [
        "DELIMITER",
        "V1_SUBPROTOCOL",
        "Message",
        "Signer",
        "decode_v1",
        "decode_v10",
        "run",
    ]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_sorted_and_complete(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported, f"{name}.__all__ is empty"
    assert exported == sorted(exported, key=isort_key), f"{name}.__all__ is not sorted"
    assert len(set(exported)) == len(exported), f"{name}.__all__ has duplicates"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"


@pytest.mark.parametrize("name", PACKAGES)
def test_star_import_gives_exactly_all(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from {name} import *", namespace)
    namespace.pop("__builtins__")
    assert sorted(namespace) == sorted(importlib.import_module(name).__all__)


def test_every_package_is_checked() -> None:
    assert {"nbcluster.gateway", "nbcluster.jobs", "nbcluster.store"} <= set(PACKAGES)
    assert len(PACKAGES) >= 12


def _owner_of_private(module: str) -> str | None:
    """The package whose private module ``module`` is (``nbcluster.jobs._docker`` → ``nbcluster.
    jobs``; ``nbcluster._net`` → ``nbcluster``), or None for a public module."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def test_no_module_imports_another_packages_private_module() -> None:
    """A private module (``_name``) is for its own package and the packages inside it (so the
    top-level ``nbcluster._net`` serves every sub-package); everyone else goes through the
    package's ``__init__``. Function-level imports count, ``TYPE_CHECKING`` ones do not."""
    known = modules()
    violations = []
    for name, imports in graph().items():
        _, is_package = known[name]
        package = name if is_package else name.rpartition(".")[0]
        for imported in imports:
            owner = _owner_of_private(imported.target)
            if owner is None:
                continue
            if package != owner and not package.startswith(owner + "."):
                violations.append(f"{name}:{imported.line} imports {imported.target}")
    assert not violations, "\n".join(violations)


def test_owner_of_private() -> None:
    assert _owner_of_private("nbcluster.jobs._docker") == "nbcluster.jobs"
    assert _owner_of_private("nbcluster._net") == "nbcluster"
    assert _owner_of_private("nbcluster.jobs") is None
    assert _owner_of_private("nbcluster.kernel.__main__") is None
