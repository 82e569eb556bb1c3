"""``nbcluster user``: the users file of a gateway (on the gateway's machine), and
``nbcluster join-token``: the token host daemons join with.

Both edit or read files in the gateway's state directory directly (as ``docker swarm
join-token`` and ``jupyterhub token`` do): whoever may read that directory is the operator. A
running gateway sees changes to the users file at the next request."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..identity import Quotas, UsersFile, UsersFileError
from ._common import default_state_dir

__all__ = ["join_token_command", "user_group"]

_state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The state directory the gateway was started with (default: ./.nbcluster).",
)
_users_file_option = click.option(
    "--users-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The users file (default: STATE_DIR/gateway/users.json).",
)


@contextlib.contextmanager
def _users(state_dir: Path | None, users_file: Path | None) -> Iterator[UsersFile]:
    """The users file; what goes wrong with it (:class:`UsersFileError`) is the command's
    error."""
    try:
        yield UsersFile(users_file or (state_dir or default_state_dir()) / "gateway" / "users.json")
    except UsersFileError as exc:
        raise click.ClickException(str(exc)) from None


@click.group("user")
def user_group() -> None:
    """Users of the gateway and their tokens and quotas."""


@user_group.command("add")
@click.argument("name")
@click.option("--admin", is_flag=True, help="An admin sees and may do everything.")
@click.option("--max-kernels", type=click.IntRange(0), help="Kernels running at once.")
@click.option("--max-gpus", type=click.IntRange(0), help="GPUs committed at once (cells, jobs).")
@_state_dir_option
@_users_file_option
def user_add(
    name: str,
    admin: bool,
    max_kernels: int | None,
    max_gpus: int | None,
    state_dir: Path | None,
    users_file: Path | None,
) -> None:
    """Add a user and print their token (shown this once; only its digest is kept)."""
    with _users(state_dir, users_file) as users:
        try:
            token = users.add(name, admin, Quotas(kernels=max_kernels, gpus=max_gpus))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="NAME") from None
    click.echo(token)


@user_group.command("token")
@click.argument("name")
@_state_dir_option
@_users_file_option
def user_token(name: str, state_dir: Path | None, users_file: Path | None) -> None:
    """Give a user a new token and print it; the old one stops working at once."""
    with _users(state_dir, users_file) as users:
        click.echo(users.replace_token(name))


@user_group.command("set")
@click.argument("name")
@click.option("--admin/--no-admin", default=None, help="Make or unmake an admin.")
@click.option("--max-kernels", type=click.IntRange(-1), help="Kernels at once (-1: no limit).")
@click.option("--max-gpus", type=click.IntRange(-1), help="GPUs at once (-1: no limit).")
@_state_dir_option
@_users_file_option
def user_set(
    name: str,
    admin: bool | None,
    max_kernels: int | None,
    max_gpus: int | None,
    state_dir: Path | None,
    users_file: Path | None,
) -> None:
    """Change a user's role or quotas."""
    with _users(state_dir, users_file) as users:
        current = users.get(name)
        if current is None:
            raise UsersFileError(f"no user named {name!r} in {users.path}")
        quotas = current.quotas
        if max_kernels is not None:
            quotas = quotas.model_copy(update={"kernels": None if max_kernels < 0 else max_kernels})
        if max_gpus is not None:
            quotas = quotas.model_copy(update={"gpus": None if max_gpus < 0 else max_gpus})
        users.update(name, admin=admin, quotas=quotas)


@user_group.command("remove")
@click.argument("name")
@_state_dir_option
@_users_file_option
def user_remove(name: str, state_dir: Path | None, users_file: Path | None) -> None:
    """Remove a user; their token stops working at once (their kernels keep running)."""
    with _users(state_dir, users_file) as users:
        users.remove(name)


@user_group.command("list")
@_state_dir_option
@_users_file_option
def user_list(state_dir: Path | None, users_file: Path | None) -> None:
    """The users, their role and quotas."""
    with _users(state_dir, users_file) as opened:
        users = opened.users()
    table = Table("user", "role", "max kernels", "max GPUs", "created")
    for user in users:
        table.add_row(
            user.name,
            "admin" if user.admin else "user",
            "-" if user.quotas.kernels is None else str(user.quotas.kernels),
            "-" if user.quotas.gpus is None else str(user.quotas.gpus),
            user.created.strftime("%Y-%m-%d %H:%M"),
        )
    Console().print(table)


@click.command("join-token")
@_state_dir_option
def join_token_command(state_dir: Path | None) -> None:
    """Print the token host daemons join this machine's gateway with."""
    from ..gateway import join_token_path

    path = join_token_path((state_dir or default_state_dir()) / "gateway")
    try:
        click.echo(path.read_text().strip())
    except FileNotFoundError:
        raise click.ClickException(
            f"no join token at {path}: start the gateway once (it makes one), or give it "
            "one in NBCLUSTER_JOIN_TOKEN"
        ) from None
