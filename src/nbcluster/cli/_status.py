"""``nbcluster status``: hosts and kernels of a running gateway, as tables (or JSON)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import httpx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import envvars
from ._common import default_state_dir, read_runtime, runtime_path

__all__ = [
    "GatewayTarget",
    "drain_command",
    "migrate_command",
    "not_found_message",
    "resolve_gateway",
    "resolve_target",
    "status_command",
]


@dataclass(frozen=True, slots=True)
class GatewayTarget:
    """The gateway a command talks to; ``runtime_file``: the runtime file its URL came from
    (None: from --url or the environment)."""

    url: str
    token: str
    runtime_file: Path | None = None

    def unreachable(self, exc: BaseException) -> str:
        """The error for a gateway that does not answer; one found through a runtime file may
        have stopped without removing it (killed), which the message says."""
        text = f"cannot reach the gateway at {self.url}: {exc}"
        if self.runtime_file is not None:
            text += (
                f" (its address is from {self.runtime_file}: the gateway that wrote it may have "
                "been stopped without removing it; start it again, or pass --state-dir DIR "
                "or --url for another gateway)"
            )
        return text


def resolve_target(url: str | None, token: str | None, state_dir: Path | None) -> GatewayTarget:
    """URL and token from flags, else the environment, else the running gateway's runtime file
    (``STATE_DIR/gateway/runtime.json``, written by the gateway ``nbcluster up`` starts). When
    neither is found the error names the state directory looked in and how to point at
    another."""
    root = state_dir or default_state_dir()
    runtime = read_runtime(root) or {}
    given = url or envvars.URL.get()
    url = given or runtime.get("url")
    token = token or envvars.TOKEN.get() or runtime.get("token")
    if not url or not token:
        raise click.UsageError(not_found_message(root, state_dir, url))
    return GatewayTarget(url, token, None if given else runtime_path(root))


def resolve_gateway(url: str | None, token: str | None, state_dir: Path | None) -> tuple[str, str]:
    """:func:`resolve_target`'s URL and token."""
    target = resolve_target(url, token, state_dir)
    return target.url, target.token


def not_found_message(root: Path, state_dir: Path | None, url: str | None) -> str:
    """Why no gateway was found, naming the state directory looked in (and where that came
    from) and the two ways to point at the right gateway."""
    if state_dir is not None:
        origin = "given with --state-dir"
    elif envvars.STATE_DIR.get():
        origin = f"from {envvars.STATE_DIR.name}"
    else:
        origin = "the default"
    where = f"{runtime_path(root)} does not exist or cannot be read"
    hint = (
        f"If the gateway was started with 'nbcluster up --state-dir DIR', pass --state-dir "
        f"DIR (or set {envvars.STATE_DIR.name}) to the directory given to nbcluster up; for "
        f"any other gateway pass --url and --token (or set {envvars.URL.name} and "
        f"{envvars.TOKEN.name})."
    )
    if url:
        return (
            f"no token for the gateway at {url}: pass --token or set {envvars.TOKEN.name} "
            f"(the state directory looked in, {root} ({origin}), has no running gateway: "
            f"{where}). {hint}"
        )
    return f"no running gateway found in the state directory {root} ({origin}): {where}. {hint}"


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

    target = resolve_target(url, token, state_dir)
    url, token = target.url, target.token

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
        raise click.ClickException(target.unreachable(exc)) from None
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
    columns = (
        "pool",
        "host",
        "state",
        "address",
        "CPUs",
        "memory",
        "GPUs",
        "GPUs in use",
        "replicas",
    )
    for column in columns:
        host_table.add_column(column)
    # Grouped by pool (hosts in none last), by name within one.
    for h in sorted(hosts, key=lambda h: (h.get("pool") is None, h.get("pool") or "", h["name"])):
        in_use = "-" if h.get("gpus_committed") is None else str(h["gpus_committed"])
        host_table.add_row(
            h.get("pool") or "-",
            h["name"],
            h["state"] + (" [yellow](draining)[/yellow]" if h.get("draining") else ""),
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

    target = resolve_target(url, token, state_dir)
    url, token = target.url, target.token

    async def migrate() -> dict[str, Any]:
        async with GatewayClient(url, token, timeout=120) as client:
            return await client.migrate_replica(kernel_id, replica_id, host)

    try:
        with Console(stderr=True).status(f"Moving replica {replica_id}"):
            result = asyncio.run(migrate())
    except GatewayError as exc:
        raise click.ClickException(f"gateway at {url}: {exc}") from None
    except (OSError, httpx.TransportError) as exc:
        raise click.ClickException(target.unreachable(exc)) from None
    click.echo(
        f"replica {result['replica_id']} moved from {result['from_host']} to "
        f"{result['to_host']} as {result['new_replica_id']} in {result['seconds']:.2f} s"
    )


@click.command("drain")
@click.argument("host")
@click.option("--undo", is_flag=True, help="Undrain: let the host take new work again.")
@click.option("--url", help="Gateway URL (default: the running gateway).")
@click.option("--token", help="API token (default: $NBCLUSTER_TOKEN or the running gateway's).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path))
def drain_command(
    host: str, undo: bool, url: str | None, token: str | None, state_dir: Path | None
) -> None:
    """Drain a host: no new replicas, cells or jobs go there; what runs there keeps running.

    Move its replicas away with ``nbcluster migrate`` before taking it down (admins only)."""
    from ..client import GatewayClient, GatewayError

    target = resolve_target(url, token, state_dir)
    url, token = target.url, target.token

    async def drain() -> dict[str, Any]:
        async with GatewayClient(url, token, timeout=30) as client:
            return await client.drain_host(host, draining=not undo)

    try:
        result = asyncio.run(drain())
    except GatewayError as exc:
        raise click.ClickException(f"gateway at {url}: {exc}") from None
    except (OSError, httpx.TransportError) as exc:
        raise click.ClickException(target.unreachable(exc)) from None
    if undo:
        click.echo(f"host {host} undrained: it takes new replicas, cells and jobs again")
        return
    replicas = result.get("replicas") or []
    click.echo(f"host {host} drained: no new replicas, cells or jobs go there")
    for r in replicas:
        click.echo(
            f"  still running: replica {r['replica_id']} of kernel {r['kernel_id']} "
            f"(move it: nbcluster migrate {r['kernel_id']} {r['replica_id']})"
        )
