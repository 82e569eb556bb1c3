"""``nbcluster job submit|ls|get|logs|cancel|outputs``: the job API from a shell."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx
from rich.console import Console
from rich.table import Table

from ._status import resolve_target

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

    target = resolve_target(url, token, state_dir)

    async def run() -> T:
        async with GatewayClient(target.url, target.token, timeout=600) as client:
            return await action(client)

    try:
        return asyncio.run(run())
    except GatewayError as exc:
        raise click.ClickException(exc.message) from None
    except (OSError, httpx.TransportError) as exc:
        raise click.ClickException(target.unreachable(exc)) from None


#: Statuses a job does not leave.
_TERMINAL = ("succeeded", "failed", "cancelled")


def _say(text: str) -> None:
    """A line for the person at the terminal: on stderr, so that stdout stays the job's
    output (or what a script reads)."""
    click.echo(text, err=True)


async def _follow(client: Any, job_id: str) -> dict[str, Any]:
    """Copy the job's output to stdout, byte for byte, until it ends; returns its final
    record. A stream that ends before the job does (the gateway dropped a reader that fell
    behind, or restarted) is followed again from the byte it stopped at."""
    out = sys.stdout.buffer
    position = 0
    while True:
        before = position
        async for chunk in client.follow_job_output(job_id, offset=position):
            out.write(chunk)
            out.flush()
            position += len(chunk)
        job: dict[str, Any] = await client.get_job(job_id)
        if job["status"] in _TERMINAL:
            rest = (await client.job_logs(job_id, position)).encode()
            out.write(rest)
            out.flush()
            return job
        if position == before:
            await asyncio.sleep(0.5)  # an empty stream: do not reconnect in a tight loop


#: Seconds a follow stopped by Ctrl-C has to close its stream before the command exits anyway.
_STOP_GRACE = 2.0


async def _follow_until_interrupted(
    client: Any, job_id: str, stopped: str
) -> dict[str, Any] | None:
    """:func:`_follow`, or None once Ctrl-C (SIGINT) stopped it; the caller then prints
    ``stopped`` and exits with 130.

    SIGINT is handled here rather than by ``asyncio.run`` (which cancels the main task, then
    raises ``KeyboardInterrupt`` once it has ended): once, in CI under load, a follow
    cancelled that way had not ended 60 s later, and the command ignored Ctrl-C. The stream
    gets :data:`_STOP_GRACE` seconds to close; if it has not, the command prints ``stopped``
    and exits at once, so Ctrl-C always stops following (the job is the gateway's)."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    try:
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
    except (NotImplementedError, RuntimeError, ValueError):  # no signals here: the default
        return await _follow(client, job_id)
    follow = asyncio.ensure_future(_follow(client, job_id))
    stop = asyncio.ensure_future(interrupted.wait())
    try:
        await asyncio.wait({follow, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        loop.remove_signal_handler(signal.SIGINT)
    if follow.done():
        return follow.result()
    follow.cancel()
    await asyncio.wait({follow}, timeout=_STOP_GRACE)
    if not follow.done():
        sys.stdout.flush()
        _say(stopped)
        os._exit(130)  # asyncio.run would wait for the stream that would not close
    return None


def _final_status(job: dict[str, Any]) -> tuple[str, int]:
    """The line that says how a job ended, and the exit status the command ends with: 0 when
    it succeeded, the job's own exit code when it failed with one (a signal N: 128 + N, as a
    shell reports it), else 1."""
    status, code, error = job["status"], job.get("exit_code"), job.get("error") or ""
    seconds = ""
    if job.get("started") and job.get("finished"):
        seconds = f" in {job['finished'] - job['started']:.1f} s"
    if status == "succeeded":
        return f"job {job['id']} succeeded (exit code 0){seconds}", 0
    text = f"job {job['id']} {status}"
    if error:
        text += f": {error}"
    if code is not None and f"code {code}" not in error:
        text += f" (exit code {code})"
    if status == "failed" and isinstance(code, int) and code != 0:
        return text + seconds, code if 0 < code < 256 else 128 + min(-code, 127)
    return text + seconds, 1


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
    "--pool", help="Run only on a host of this pool (`nbcluster host --pool`); default: any host."
)
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
    pool: str | None,
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
    if pool is not None:
        from ..hostproto import check_pool

        try:
            spec["pool"] = check_pool(pool)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--pool") from None

    files = {Path(p).name: Path(p).read_bytes() for p in input_files}

    submitted: list[str] = []

    def stopped(job_id: str) -> str:
        return (
            f"\nstopped following job {job_id}; it goes on (nbcluster job logs -f {job_id}, "
            f"nbcluster job cancel {job_id})"
        )

    async def submit(client: Any) -> dict[str, Any] | None:
        if fast:
            spec["inline_inputs"] = {n: d.decode() for n, d in files.items()}
        else:
            spec["inputs"] = {n: await client.upload_job_input(n, d) for n, d in files.items()}
        job: dict[str, Any] = await client.submit_job(spec)
        if follow and not fast:
            submitted.append(job["id"])
            # The id first, on stderr (stdout is the job's output): with it the job can be
            # followed again, cancelled or its outputs fetched from another shell.
            _say(
                f"job {job['id']} submitted ({job['status']}, {job['spec']['resources']['gpus']} "
                "GPU(s)); its output follows. Ctrl-C stops following, not the job."
            )
            return await _follow_until_interrupted(client, job["id"], stopped(job["id"]))
        return job

    try:
        followed = _call(url, token, state_dir, submit)
    except KeyboardInterrupt:  # before the follow began
        if not submitted:
            raise
        followed = None
    if followed is None:
        _say(stopped(submitted[0]))
        sys.exit(130)
    job = followed
    if fast:
        sys.stdout.write(job.get("result") or "")
        if job["status"] != "succeeded":
            raise click.ClickException(f"job {job['id']} {job['status']}: {job['error']}")
        return
    if follow:
        line, code = _final_status(job)
        _say(line)
        if code:
            sys.exit(code)
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

    stopped = f"\nstopped following job {job_id}"

    async def show(client: Any) -> bool:
        if follow:
            return await _follow_until_interrupted(client, job_id, stopped) is not None
        sys.stdout.write(await client.job_logs(job_id))
        return True

    try:
        finished = _call(url, token, state_dir, show)
    except KeyboardInterrupt:
        finished = False
    if not finished:
        _say(stopped)
        sys.exit(130)


@job_group.command("cancel")
@click.argument("job_id")
@_gateway_options
def job_cancel(job_id: str, url: str | None, token: str | None, state_dir: Path | None) -> None:
    """Cancel a job (a finished one: says so, changes nothing)."""
    result = _call(url, token, state_dir, lambda c: c.cancel_job(job_id))
    click.echo(result["message"])


@job_group.command("outputs")
@click.argument("job_id")
@click.argument("names", nargs=-1)
@click.option(
    "--dir",
    "directory",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to write them (made if missing); an output keeps its path relative to it.",
)
@_gateway_options
def job_outputs(
    job_id: str,
    names: tuple[str, ...],
    directory: Path,
    url: str | None,
    token: str | None,
    state_dir: Path | None,
) -> None:
    """Download the outputs of a finished job (those it was submitted with --output for):
    all of them, or the NAMEs given. Prints the path of each file written; an existing file
    is replaced."""

    async def download(client: Any) -> tuple[dict[str, Any], list[Path], list[str]]:
        job: dict[str, Any] = await client.get_job(job_id)
        wanted = _outputs_to_fetch(job, names)
        collected: dict[str, str] = job.get("output_keys") or {}
        written = [
            await _download(client, job_id, name, _destination(directory, job_id, name))
            for name in wanted
            if name in collected
        ]
        return job, written, [n for n in wanted if n not in collected]

    job, written, missing = _call(url, token, state_dir, download)
    for path in written:
        click.echo(str(path))
    if missing:
        how = job["status"] + (f": {job['error']}" if job.get("error") else "")
        raise click.ClickException(
            f"job {job_id} ({how}) did not leave {', '.join(map(repr, missing))}: the file "
            f"was not there when it ended (see its output: nbcluster job logs {job_id})"
        )


def _outputs_to_fetch(job: dict[str, Any], names: tuple[str, ...]) -> list[str]:
    """The outputs to download (``names``, or every declared one); ``ClickException`` for a
    job that has not ended or a name it was not submitted with."""
    job_id, status = job["id"], job["status"]
    declared: list[str] = list(job["spec"].get("outputs") or [])
    if status not in _TERMINAL:
        raise click.ClickException(
            f"job {job_id} is {status}: its outputs are collected when it ends (wait with "
            f"nbcluster job logs -f {job_id})"
        )
    if not declared:
        raise click.ClickException(
            f"job {job_id} has no outputs: it was submitted without --output (a job keeps "
            "only the files named with --output NAME)"
        )
    unknown = [n for n in names if n not in declared]
    if unknown:
        raise click.ClickException(
            f"job {job_id} has no output {', '.join(map(repr, unknown))}; its outputs: "
            f"{', '.join(declared)}"
        )
    return list(dict.fromkeys(names)) if names else declared


def _destination(directory: Path, job_id: str, name: str) -> Path:
    """Where output ``name`` goes: under ``directory``, never outside it."""
    root = directory.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise click.ClickException(f"output {name!r} of job {job_id} is not a relative path")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


async def _download(client: Any, job_id: str, name: str, path: Path) -> Path:
    """Write one output to ``path`` through a temporary file beside it, renamed when whole:
    an interrupted download leaves no partial file under the output's name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in client.stream_job_output(job_id, name):
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
