"""The ``nbcluster`` command group."""

from __future__ import annotations

import click

from .._version import __version__
from ._daemons import gateway_command, host_command
from ._job import job_group
from ._kernelspec import kernelspec_group
from ._simulate import simulate_command
from ._status import drain_command, migrate_command, status_command
from ._store import store_group
from ._top import top_command
from ._up import up_command
from ._users import join_token_command, user_group

__all__ = ["cli", "main"]


@click.group()
@click.version_option(__version__, prog_name="nbcluster")
def cli() -> None:
    """nbcluster: Jupyter kernels replicated across a GPU cluster."""


cli.add_command(up_command)
cli.add_command(gateway_command)
cli.add_command(host_command)
cli.add_command(status_command)
cli.add_command(migrate_command)
cli.add_command(drain_command)
cli.add_command(store_group)
cli.add_command(job_group)
cli.add_command(user_group)
cli.add_command(join_token_command)
cli.add_command(simulate_command)
cli.add_command(kernelspec_group)
cli.add_command(top_command)


def main() -> None:
    cli()
