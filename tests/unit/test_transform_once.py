"""``kernel._transform.TransformOnce``: the executor transforms a cell once; ipykernel's and
IPython's calls for the same source get that result until the kernel forgets it; anything
else is transformed as before."""

from __future__ import annotations

import pytest
from IPython.core.interactiveshell import InteractiveShell

from nbcluster.kernel._transform import TransformOnce


class CountingShell:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def transform_cell(self, raw_cell: str) -> str:
        self.calls.append(raw_cell)
        if raw_cell == "raise":
            raise SyntaxError("cannot transform")
        return f"T({raw_cell})"


def test_the_prepared_transform_is_used_until_forgotten() -> None:
    shell = CountingShell()
    once = TransformOnce(shell)
    assert once.prepare("%ls") == "T(%ls)"
    assert shell.transform_cell("%ls") == "T(%ls)"  # the kernel's shell now goes through it
    assert shell.transform_cell("%ls") == "T(%ls)"
    assert shell.calls == ["%ls"]  # one real transform for three uses
    once.forget()
    assert shell.transform_cell("%ls") == "T(%ls)"
    assert shell.calls == ["%ls", "%ls"]


def test_another_source_or_a_forgotten_one_is_transformed_again() -> None:
    shell = CountingShell()
    once = TransformOnce(shell)
    once.prepare("a")
    assert shell.transform_cell("b") == "T(b)"
    assert shell.calls == ["a", "b"]
    once.prepare("c")
    once.forget()
    assert shell.transform_cell("c") == "T(c)"
    assert shell.calls == ["a", "b", "c", "c"]


def test_a_cell_that_cannot_be_transformed_raises_where_ipython_expects_it() -> None:
    shell = CountingShell()
    once = TransformOnce(shell)
    assert once.prepare("raise") is None
    with pytest.raises(SyntaxError):
        shell.transform_cell("raise")


def test_with_ipython_a_magic_becomes_a_call() -> None:
    shell = InteractiveShell.instance()
    try:
        once = TransformOnce(shell)
        transformed = once.prepare("%time x = 1")
        assert transformed is not None and "run_line_magic" in transformed
        assert shell.transform_cell("%time x = 1") == transformed
    finally:
        InteractiveShell.clear_instance()
