"""The ``nbcluster`` command."""

from ._main import cli, main

__all__ = ["cli", "main"]
