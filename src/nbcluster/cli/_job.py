"""``nbcluster job submit|ls|get|logs|cancel``: the job API from a shell."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx
from rich.console import Console
from rich.table import Table

from ._status import resolve_gateway

__all__ = ["job_group"]

T = TypeVar("T")

_common = [
    click.option("--url", help="Gateway URL (default: the running gateway)."),
    click.option("--token", help="API token (default: $NBCLUSTER_TOKEN or the running gateway's)."),
    click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path)),
]


def _gateway_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_common):
        func = option(func)
    return func


def _call(
    url: str | None,
    token: str | None,
    state_dir: Path | None,
    action: Callable[[Any], Awaitable[T]],
) -> T:
    from ..client import GatewayClient, GatewayError

    base, secret = resolve_gateway(url, token, state_dir)

    async def run() -> T:
        async with GatewayClient(base, secret, timeout=600) as client:
            return await action(client)

    try:
        return asyncio.run(run())
    except GatewayError as exc:
        raise click.ClickException(exc.message) from None
    except (OSError, httpx.TransportError) as exc:
        raise click.ClickException(f"cannot reach the gateway at {base}: {exc}") from None


@click.group("job")
def job_group() -> None:
    """Run commands and Python files as batch jobs on the cluster's CPU and GPU queues."""


@job_group.command("submit")
@click.argument("command", nargs=-1)
@click.option("--python", "source_file", type=click.File("r"), help="Run this Python file.")
@click.option("--gpus", default=0, show_default=True, type=click.IntRange(0))
@click.option("--cpus", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--memory-mb", default=1024, show_default=True, type=click.IntRange(1))
@click.option("--queue", type=click.Choice(["cpu", "gpu"]))
@click.option("--image", help="Container image (docker, kubernetes, tfjob, pytorchjob runtimes).")
@click.option(
    "--runtime",
    default="process",
    show_default=True,
    type=click.Choice(["process", "docker", "kubernetes", "tfjob", "pytorchjob"]),
)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1))
@click.option("--env", "env_pairs", multiple=True, metavar="NAME=VALUE")
@click.option("--input", "input_files", multiple=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--output", "outputs", multiple=True, help="A file the job writes, to keep.")
@click.option(
    "--timeout", default=3600.0, show_default=True, type=click.FloatRange(0, min_open=True)
)
@click.option("--retries", default=0, show_default=True, type=click.IntRange(0))
@click.option("--fast", is_flag=True, help="Run ahead of standard jobs; wait for the result.")
@click.option("--name", default="")
@click.option("--follow", "-f", is_flag=True, help="Stream the job's output until it ends.")
@_gateway_options
def job_submit(
    command: tuple[str, ...],
    source_file: Any,
    gpus: int,
    cpus: float,
    memory_mb: int,
    queue: str | None,
    image: str | None,
    runtime: str,
    workers: int,
    env_pairs: tuple[str, ...],
    input_files: tuple[str, ...],
    outputs: tuple[str, ...],
    timeout: float,
    retries: int,
    fast: bool,
    name: str,
    follow: bool,
    url: str | None,
    token: str | None,
    state_dir: Path | None,
) -> None:
    """Submit COMMAND (an argv, no shell) or --python FILE; prints the job id (a fast job:
    its result). Example: nbcluster job submit --gpus 1 -- python train.py --epochs 3"""
    if bool(command) == bool(source_file):
        raise click.UsageError("give a COMMAND or --python FILE (one of them)")
    env = {}
    for pair in env_pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--env")
        env[key] = value
    spec: dict[str, Any] = {
        "name": name,
        "resources": {"gpus": gpus, "cpus": cpus, "memory_mb": memory_mb},
        "runtime": runtime,
        "workers": workers,
        "env": env,
        "outputs": list(outputs),
        "timeout": timeout,
        "retries": retries,
        "fast": fast,
    }
    if command:
        spec["command"] = list(command)
    else:
        spec["source"] = source_file.read()
    if queue:
        spec["queue"] = queue
    if image:
        spec["image"] = image

    files = {Path(p).name: Path(p).read_bytes() for p in input_files}

    async def submit(client: Any) -> dict[str, Any]:
        if fast:
            spec["inline_inputs"] = {n: d.decode() for n, d in files.items()}
        else:
            spec["inputs"] = {n: await client.upload_job_input(n, d) for n, d in files.items()}
        job: dict[str, Any] = await client.submit_job(spec)
        if follow and not fast:
            async for chunk in client.follow_job_logs(job["id"]):
                sys.stdout.write(chunk)
                sys.stdout.flush()
            job = await client.get_job(job["id"])
        return job

    job = _call(url, token, state_dir, submit)
    if fast:
        sys.stdout.write(job.get("result") or "")
        if job["status"] != "succeeded":
            raise click.ClickException(f"job {job['id']} {job['status']}: {job['error']}")
        return
    if follow:
        if job["status"] != "succeeded":
            raise click.ClickException(f"job {job['id']} {job['status']}: {job['error']}")
        return
    click.echo(job["id"])


@job_group.command("ls")
@click.option(
    "--status", type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"])
)
@click.option("--queue", type=click.Choice(["cpu", "gpu"]))
@click.option("--json", "as_json", is_flag=True)
@_gateway_options
def job_ls(
    status: str | None,
    queue: str | None,
    as_json: bool,
    url: str | None,
    token: str | None,
    state_dir: Path | None,
) -> None:
    """List jobs (oldest first)."""
    jobs: list[dict[str, Any]] = _call(
        url, token, state_dir, lambda c: c.list_jobs(status=status or "", queue=queue or "")
    )
    if as_json:
        click.echo(json.dumps(jobs, indent=2))
        return
    table = Table(title="Jobs")
    for column in ("id", "name", "status", "queue", "worker", "attempts", "exit"):
        table.add_column(column)
    for j in jobs:
        spec = j["spec"]
        queue_name = spec.get("queue") or ("gpu" if spec["resources"]["gpus"] else "cpu")
        table.add_row(
            j["id"],
            spec.get("name") or "",
            j["status"],
            queue_name,
            j.get("worker") or "",
            str(j["attempts"]),
            "" if j.get("exit_code") is None else str(j["exit_code"]),
        )
    Console().print(table)


@job_group.command("get")
@click.argument("job_id")
@_gateway_options
def job_get(job_id: str, url: str | None, token: str | None, state_dir: Path | None) -> None:
    """A job's record, as JSON."""
    job = _call(url, token, state_dir, lambda c: c.get_job(job_id))
    click.echo(json.dumps(job, indent=2))


@job_group.command("logs")
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the job ends.")
@_gateway_options
def job_logs(
    job_id: str, follow: bool, url: str | None, token: str | None, state_dir: Path | None
) -> None:
    """A job's output."""

    async def show(client: Any) -> None:
        if follow:
            async for chunk in client.follow_job_logs(job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        else:
            sys.stdout.write(await client.job_logs(job_id))

    _call(url, token, state_dir, show)


@job_group.command("cancel")
@click.argument("job_id")
@_gateway_options
def job_cancel(job_id: str, url: str | None, token: str | None, state_dir: Path | None) -> None:
    """Cancel a job (a finished one: says so, changes nothing)."""
    result = _call(url, token, state_dir, lambda c: c.cancel_job(job_id))
    click.echo(result["message"])
