"""Each sub-package's public names: sorted, and all of them importable."""

from __future__ import annotations

import importlib
import re

import pytest

PACKAGES = [
    "nbcluster.protocol",
    "nbcluster.hostproto",
    "nbcluster.gateway",
    "nbcluster.host",
    "nbcluster.kernel",
    "nbcluster.scheduling",
    "nbcluster.client",
    "nbcluster.cli",
    "nbcluster.consensus",
    "nbcluster.store",
]


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
