"""``nbcluster kernelspec install|list``: Jupyter kernelspecs whose kernels run on an
nbcluster gateway through the ``nbcluster-provisioner`` kernel provisioner, as
``jupyter-k8s-spec install`` writes them for Gateway Provisioners (``docs/provisioner.md``).

A kernelspec names the gateway, the gateway's kernelspec to start (which fixes the image and
the host pool: the operator's, ``--kernelspec-dir``) and the resources each kernel asks for.
It never holds the token: the Jupyter server reads it from ``--token-env`` (default
``NBCLUSTER_TOKEN``) or ``--token-file``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
import httpx
from rich.console import Console
from rich.table import Table

from .. import envvars

__all__ = ["kernelspec_group"]

PROVISIONER_NAME = "nbcluster-provisioner"


@click.group("kernelspec")
def kernelspec_group() -> None:
    """Jupyter kernelspecs that run their kernels on nbcluster."""


def _display_name(gpus: int | None) -> str:
    if not gpus:
        return "Python 3 (nbcluster)"
    return f"Python 3 (nbcluster, {gpus} GPU{'' if gpus == 1 else 's'})"


def _kernel_json(config: dict[str, Any], display_name: str) -> dict[str, Any]:
    return {
        # The gateway's kernelspec says what runs; jupyter_client wants a command anyway.
        "argv": [],
        "display_name": display_name,
        "language": "python",
        # SIGINT through the provisioner: POST /api/kernels/{id}/interrupt.
        "interrupt_mode": "signal",
        "env": {},
        "metadata": {
            "kernel_provisioner": {"provisioner_name": PROVISIONER_NAME, "config": config},
            # The face's sockets are CurveZMQ servers (jupyter_client's transport_encryption).
            "supported_encryption": ["curve"],
            "debugger": False,
        },
    }


def _gateway_spec_for(
    url: str, token_env: str, ca: Path | None, image: str | None, pool: str | None
) -> str:
    """The gateway kernelspec whose image and pool are those asked for (the operator defines
    them: a kernel's image and pool are its kernelspec's)."""
    from ..client import GatewayClient, GatewayError
    from ..gateway import KernelSpec

    token = os.environ.get(token_env, "").strip()
    if not token:
        raise click.UsageError(
            f"--image/--pool choose among the gateway's kernelspecs: set {token_env} to "
            "a token of the gateway, or name the gateway's kernelspec with --kernel-name"
        )

    async def specs() -> dict[str, Any]:
        async with GatewayClient(url, token, ca=ca) as gateway:
            return await gateway.kernelspecs()

    try:
        listing = asyncio.run(specs())
    except (GatewayError, httpx.HTTPError, OSError) as exc:
        raise click.ClickException(
            f"cannot list the gateway's kernelspecs at {url}: {exc}"
        ) from None
    matches: list[str] = []
    offered: list[str] = []
    for name, model in sorted(listing.get("kernelspecs", {}).items()):
        spec = KernelSpec.model_validate(model["spec"])
        offered.append(f"{name} (image {spec.image or '-'}, pool {spec.pool or '-'})")
        if (image is None or spec.image == image) and (pool is None or spec.pool == pool):
            matches.append(name)
    if len(matches) != 1:
        wanted = ", ".join(
            f"{what} {value!r}" for what, value in (("image", image), ("pool", pool)) if value
        )
        raise click.UsageError(
            f"{'no' if not matches else 'more than one'} kernelspec of the gateway has {wanted}"
            f"{': ' + ', '.join(matches) if matches else ''}; it offers: "
            f"{'; '.join(offered) or 'none'}. Name one with --kernel-name."
        )
    return matches[0]


@kernelspec_group.command("install")
@click.argument("name")
@click.option("--gateway", "gateway_url", required=True, help="The gateway's URL.")
@click.option("--gpus", type=click.IntRange(0, 4096), help="GPUs each cell gets (KERNEL_GPUS).")
@click.option("--cpus", type=click.FloatRange(min=0, min_open=True), help="KERNEL_CPUS.")
@click.option("--memory-mb", type=click.IntRange(1), help="KERNEL_MEMORY_MB.")
@click.option(
    "--kernel-name",
    help="The gateway's kernelspec to start (default: python3, or the one with --image/--pool).",
)
@click.option("--image", help="Start the gateway's kernelspec that runs in this image.")
@click.option("--pool", help="Start the gateway's kernelspec that runs in this host pool.")
@click.option(
    "--display-name", help="What JupyterLab shows (default: 'Python 3 (nbcluster, N GPUs)')."
)
@click.option(
    "--token-env",
    default=envvars.TOKEN.name,
    show_default=True,
    help="Environment variable of the Jupyter server that holds the gateway token.",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the gateway token (read by the Jupyter server), instead of --token-env.",
)
@click.option(
    "--ca",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="CA of an https gateway.",
)
@click.option(
    "--launch-timeout",
    default=120.0,
    show_default=True,
    type=click.FloatRange(1, 3600),
    help="Seconds a kernel may take to start before the start fails.",
)
@click.option("--user", "scope", flag_value="user", help="Install for this user only.")
@click.option(
    "--sys-prefix", "scope", flag_value="sys-prefix", help="Install into this Python's prefix."
)
@click.option(
    "--prefix",
    type=click.Path(file_okay=False, path_type=Path),
    help="Install under PREFIX/share/jupyter/kernels.",
)
def install_command(
    name: str,
    gateway_url: str,
    gpus: int | None,
    cpus: float | None,
    memory_mb: int | None,
    kernel_name: str | None,
    image: str | None,
    pool: str | None,
    display_name: str | None,
    token_env: str,
    token_file: Path | None,
    ca: Path | None,
    launch_timeout: float,
    scope: str | None,
    prefix: Path | None,
) -> None:
    """Write kernelspec NAME: its kernels run on the nbcluster gateway at --gateway."""
    from jupyter_client.kernelspec import KernelSpecManager, _is_valid_kernel_name

    from ..provisioner import ProvisionerConfig, ProvisionerConfigError

    if not _is_valid_kernel_name(name):
        raise click.BadParameter(
            f"{name!r}: a kernelspec name has letters, digits, '.', '_' and '-' only",
            param_hint="NAME",
        )
    if prefix is not None and scope is not None:
        raise click.UsageError("--prefix goes without --user and --sys-prefix")
    if kernel_name is None:
        kernel_name = (
            _gateway_spec_for(gateway_url, token_env, ca, image, pool)
            if image is not None or pool is not None
            else "python3"
        )
    stanza: dict[str, Any] = {
        "gateway_url": gateway_url,
        "kernel_name": kernel_name,
        "launch_timeout": launch_timeout,
    }
    if token_file is not None:
        stanza["token_file"] = str(token_file.resolve())
    else:
        stanza["token_env"] = token_env
    if ca is not None:
        stanza["ca"] = str(ca.resolve())
    for key, value in (("gpus", gpus), ("cpus", cpus), ("memory_mb", memory_mb)):
        if value is not None:
            stanza[key] = value
    try:
        ProvisionerConfig.from_stanza(stanza)
    except ProvisionerConfigError as exc:
        raise click.UsageError(str(exc)) from None
    spec = _kernel_json(stanza, display_name or _display_name(gpus))
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / name
        source.mkdir()
        (source / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
        _copy_logos(source)
        where = KernelSpecManager().install_kernel_spec(
            str(source),
            kernel_name=name,
            user=scope == "user",
            prefix=str(prefix)
            if prefix is not None
            else (_sys_prefix() if scope == "sys-prefix" else None),
        )
    click.echo(f"installed kernelspec {name} ({spec['display_name']}) in {where}")


def _sys_prefix() -> str:
    return sys.prefix


def _copy_logos(target: Path) -> None:
    try:
        import ipykernel
    except ImportError:  # pragma: no cover - ipykernel is a dependency
        return
    resources = Path(ipykernel.__file__).parent / "resources"
    for logo in resources.glob("logo-*"):
        shutil.copy(logo, target / logo.name)


@kernelspec_group.command("list")
@click.option("--all", "show_all", is_flag=True, help="Also list kernelspecs not on nbcluster.")
def list_command(show_all: bool) -> None:
    """The installed kernelspecs that run on nbcluster: gateway, gateway kernelspec, GPUs."""
    from jupyter_client.kernelspec import KernelSpecManager

    table = Table("name", "display name", "gateway", "gateway kernelspec", "GPUs", "location")
    for name, entry in sorted(KernelSpecManager().get_all_specs().items()):
        spec = entry.get("spec", {})
        provisioner = spec.get("metadata", {}).get("kernel_provisioner", {})
        ours = provisioner.get("provisioner_name") == PROVISIONER_NAME
        if not ours and not show_all:
            continue
        config = provisioner.get("config", {}) if ours else {}
        table.add_row(
            name,
            spec.get("display_name", ""),
            config.get("gateway_url", "-" if not ours else "?"),
            config.get("kernel_name", "-"),
            str(config.get("gpus", "-")),
            entry.get("resource_dir", ""),
        )
    Console().print(table)
