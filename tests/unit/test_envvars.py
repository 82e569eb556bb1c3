"""``nbcluster.envvars``: every environment variable is declared once, used through its
declaration, documented, and read with errors that name it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nbcluster import envvars
from nbcluster.envvars import EnvVar

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "nbcluster"
#: A variable's full name as a string literal (a prefix such as "NBCLUSTER_" is not one).
LITERAL = re.compile(r"""["'](NBCLUSTER_[A-Z0-9_]*[A-Z0-9])["']""")


def test_declarations_are_unique_and_complete() -> None:
    names = [var.name for var in envvars.ALL]
    assert len(set(names)) == len(names)
    declared = {v.name for v in vars(envvars).values() if isinstance(v, EnvVar)}
    assert declared == set(names), "a declaration is missing from envvars.ALL"
    for var in envvars.ALL:
        assert var.meaning and var.type and var.set_by and var.read_by, var.name
        assert envvars.by_name(var.name) is var
    assert all(n.startswith(envvars.PREFIX) for n in names if not n.startswith("CUDA_"))


def test_no_module_spells_a_variable_name_itself() -> None:
    """Writers and readers go through the declarations: a quoted ``"NBCLUSTER_X"`` appears
    in envvars.py only."""
    spelled = [
        f"{path.relative_to(ROOT)}: {match}"
        for path in sorted(SRC.rglob("*.py"))
        if path.name != "envvars.py"
        for match in LITERAL.findall(path.read_text())
    ]
    assert spelled == []


def test_the_docs_list_every_variable() -> None:
    docs = (ROOT / "docs" / "architecture.md").read_text()
    missing = [var.name for var in envvars.ALL if f"`{var.name}`" not in docs]
    assert missing == []


def test_reading_values() -> None:
    var = EnvVar("NBCLUSTER_T", "int", "m", set_by="s", read_by="r", default="20")
    assert var.get({}) == "20"
    assert var.get({"NBCLUSTER_T": ""}) == ""  # set, if empty, is not the default
    assert var.get_int({}) == 20
    assert var.get_int({"NBCLUSTER_T": " 7 "}) == 7
    assert var.get_int({"NBCLUSTER_T": " "}) == 20  # blank: as if unset
    assert var.get_float({"NBCLUSTER_T": "2.5"}) == 2.5
    with pytest.raises(ValueError, match=r"NBCLUSTER_T='x' is not an integer"):
        var.get_int({"NBCLUSTER_T": "x"})
    with pytest.raises(ValueError, match=r"NBCLUSTER_T='x' is not a number"):
        var.get_float({"NBCLUSTER_T": "x"})
    bare = EnvVar("NBCLUSTER_U", "str", "m", set_by="s", read_by="r")
    assert bare.get({}) is None
    with pytest.raises(ValueError, match="NBCLUSTER_U is not set"):
        bare.get_int({})


def test_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(envvars.STORE_THRESHOLD.name, "1024")
    assert envvars.STORE_THRESHOLD.get_int() == 1024
    monkeypatch.delenv(envvars.STORE_THRESHOLD.name)
    assert envvars.STORE_THRESHOLD.get_int() == 2**20
    monkeypatch.delenv(envvars.KERNEL_ID.name, raising=False)
    assert envvars.KERNEL_ID.get() is None


def test_exports_are_sorted() -> None:
    from .test_exports import isort_key

    exported = list(envvars.__all__)
    assert exported == sorted(exported, key=isort_key)
    assert all(hasattr(envvars, name) for name in exported)
