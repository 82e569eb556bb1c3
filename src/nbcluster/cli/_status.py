"""``nbcluster status``: hosts and kernels of a running gateway, as tables (or JSON)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click
import httpx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import envvars
from ._common import default_state_dir, read_runtime

__all__ = ["migrate_command", "status_command"]


def resolve_gateway(url: str | None, token: str | None, state_dir: Path | None) -> tuple[str, str]:
    """URL and token from flags, else the environment, else the running gateway's runtime file."""
    runtime = read_runtime(state_dir or default_state_dir()) or {}
    url = url or envvars.URL.get() or runtime.get("url")
    token = token or envvars.TOKEN.get() or runtime.get("token")
    if not url or not token:
        raise click.UsageError(
            "no running gateway found: pass --url and --token (or set NBCLUSTER_URL and "
            "NBCLUSTER_TOKEN), or run this where 'nbcluster up' runs"
        )
    return url, token


def _gpus(host: dict[str, Any]) -> str:
    gpus = host["gpus"]
    if not gpus:
        return "0"
    kind = "virtual" if all(g["virtual"] for g in gpus) else gpus[0]["name"]
    return f"{len(gpus)} ({kind})"


def _replica_count(kernel: dict[str, Any]) -> str:
    """``running/wanted``, marked when the kernel runs with fewer replicas than configured."""
    wanted = kernel.get("replicas_wanted")
    if wanted is None:  # an older gateway
        return "-"
    count = f"{kernel.get('replicas_running', 0)}/{wanted}"
    return f"[yellow]{count} degraded[/yellow]" if kernel.get("degraded") else count


def _repair_text(kernel: dict[str, Any]) -> str:
    """What is done about a degraded kernel, in one line."""
    running, wanted = kernel.get("replicas_running"), kernel.get("replicas_wanted")
    text = f"runs on {running} of {wanted} replicas"
    repair = kernel.get("repair") or {}
    if repair.get("attempting"):
        text += "; a replacement is starting"
    if repair.get("failed_attempts"):
        text += f"; {repair['failed_attempts']} replacement attempt(s) failed"
        if repair.get("last_error"):
            text += f" (last: {repair['last_error']})"
    if repair.get("retry_at"):
        text += f"; next attempt at {repair['retry_at']}"
    return text


@click.command("status")
@click.option("--url", help="Gateway URL (default: the running gateway).")
@click.option("--token", help="API token (default: $NBCLUSTER_TOKEN or the running gateway's).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def status_command(
    url: str | None, token: str | None, state_dir: Path | None, as_json: bool
) -> None:
    """Show hosts (CPUs, memory, GPUs) and kernels with the hosts their replicas run on."""
    from ..client import GatewayClient, GatewayError

    url, token = resolve_gateway(url, token, state_dir)

    async def fetch() -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]]]:
        async with GatewayClient(url, token, timeout=10) as client:
            kernels = await client.cluster_kernels()
            try:
                return await client.hosts(), kernels
            except GatewayError as exc:
                if exc.status != 403:
                    raise
                return None, kernels  # the hosts are the operator's view

    try:
        hosts, kernels = asyncio.run(fetch())
    except GatewayError as exc:
        raise click.ClickException(f"gateway at {url}: {exc}") from None
    except (OSError, httpx.TransportError) as exc:
        raise click.ClickException(f"cannot reach the gateway at {url}: {exc}") from None
    if as_json:
        click.echo(json.dumps({"hosts": hosts, "kernels": kernels}, indent=2))
        return
    console = Console()
    if hosts is None:
        console.print(f"Hosts ({url}): only an admin may list them", highlight=False)
    else:
        _print_hosts(console, url, hosts)
    kernel_table = Table(title="Kernels")
    kernel_columns = (
        "kernel",
        "spec",
        "state",
        "connections",
        "running",
        "replicas (host: state, *executor)",
    )
    for column in kernel_columns:
        kernel_table.add_column(column)
    for k in kernels:
        # Live replicas first; the executor is starred.
        shown = [r for r in k["replicas"] if r["state"] != "dead"] or k["replicas"]
        replicas = ", ".join(
            f"{r['host']}: {r['state']}{'*' if r['replica_id'] == k.get('executor') else ''}"
            for r in shown
        )
        kernel_table.add_row(
            k["id"],
            k["name"],
            k["execution_state"],
            str(k["connections"]),
            _replica_count(k),
            replicas,
        )
    console.print(kernel_table)
    for k in kernels:
        if k.get("degraded"):
            # Escaped: a failure's reason may contain brackets that rich would take as markup.
            text = escape(f"kernel {k['id']}: {_repair_text(k)}")
            console.print(f"[yellow]{text}[/yellow]", highlight=False)


def _print_hosts(console: Console, url: str, hosts: list[dict[str, Any]]) -> None:
    host_table = Table(title=f"Hosts ({url})")
    columns = ("host", "state", "address", "CPUs", "memory", "GPUs", "GPUs in use", "replicas")
    for column in columns:
        host_table.add_column(column)
    for h in hosts:
        in_use = "-" if h.get("gpus_committed") is None else str(h["gpus_committed"])
        host_table.add_row(
            h["name"],
            h["state"],
            h["address"],
            str(h["cpus"]),
            f"{h['memory_mb'] / 1024:.1f} GiB",
            _gpus(h),
            in_use,
            str(len(h["replicas"])),
        )
    console.print(host_table)


@click.command("migrate")
@click.argument("kernel_id")
@click.argument("replica_id")
@click.option("--to", "host", help="Target host (default: the least loaded host with room).")
@click.option("--url", help="Gateway URL (default: the running gateway).")
@click.option("--token", help="API token (default: $NBCLUSTER_TOKEN or the running gateway's).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path))
def migrate_command(
    kernel_id: str,
    replica_id: str,
    host: str | None,
    url: str | None,
    token: str | None,
    state_dir: Path | None,
) -> None:
    """Move one replica of a kernel to another host; its state follows through Raft.

    Find the ids with ``nbcluster status --json``."""
    from ..client import GatewayClient, GatewayError

    url, token = resolve_gateway(url, token, state_dir)

    async def migrate() -> dict[str, Any]:
        async with GatewayClient(url, token, timeout=120) as client:
            return await client.migrate_replica(kernel_id, replica_id, host)

    try:
        with Console(stderr=True).status(f"Moving replica {replica_id}"):
            result = asyncio.run(migrate())
    except GatewayError as exc:
        raise click.ClickException(f"gateway at {url}: {exc}") from None
    except (OSError, httpx.TransportError) as exc:
        raise click.ClickException(f"cannot reach the gateway at {url}: {exc}") from None
    click.echo(
        f"replica {result['replica_id']} moved from {result['from_host']} to "
        f"{result['to_host']} as {result['new_replica_id']} in {result['seconds']:.2f} s"
    )
