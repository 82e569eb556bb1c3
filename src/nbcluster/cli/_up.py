"""``nbcluster up``: a gateway and N host daemons on this machine, as separate processes,
stopped together on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import click
import httpx
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from .. import envvars
from .._net import free_port, port_is_free
from .._tls import TlsConfigError, client_context
from ..identity import JOIN_TOKEN_PREFIX, new_token
from ._common import default_state_dir, policy_option, store_option, subscription_option

__all__ = ["up_command"]

console = Console(stderr=True)


class _Children:
    """The processes ``up`` started, stopped in reverse order of start."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
        self.procs.append((name, proc))
        return proc

    def exited(self) -> list[tuple[str, int]]:
        return [(n, p.returncode) for n, p in self.procs if p.poll() is not None]

    def stop_all(self, grace: float = 10.0) -> None:
        """JupyterLab first (it shuts its kernels down through the gateway), then the gateway
        (it stops recovering lost replicas and detaches from its kernels), then the hosts
        (which stop their replicas). Hosts first made the gateway see every replica lost and
        try to restore the kernels elsewhere, with an error for each."""
        order = ("jupyterlab", "gateway", "host")
        for phase in order:
            group = [p for n, p in self.procs if n.startswith(phase)]
            for proc in group:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for proc in group:
                try:
                    proc.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def _wait_until(what: str, check: Callable[[], bool], children: _Children, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with console.status(what):
        while time.monotonic() < deadline:
            dead = children.exited()
            if dead:
                names = ", ".join(f"{n} (exit code {c})" for n, c in dead)
                raise click.ClickException(f"{names} stopped while {what.lower()}")
            try:
                if check():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise click.ClickException(f"timed out after {timeout:.0f} s {what.lower()}")


def _partition_real_gpus(hosts: int) -> list[str | None]:
    from ..host import discover_nvml_gpus

    gpus = discover_nvml_gpus()
    if not gpus:
        return [None] * hosts
    shares: list[list[int]] = [[] for _ in range(hosts)]
    for i, gpu in enumerate(gpus):
        shares[i % hosts].append(gpu.index)
    return [",".join(map(str, share)) if share else "" for share in shares]


@click.command("up")
@click.option(
    "--hosts", default=4, show_default=True, type=click.IntRange(1, 64), help="Host daemons."
)
@click.option(
    "--gpus-per-host",
    type=click.IntRange(0, 4096),
    help="Virtual GPUs per host (default: real GPUs shared out if NVML finds any, else 8).",
)
@click.option("--port", default=8889, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--certfile",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="TLS certificate chain (PEM) for the gateway: https and wss (with --keyfile; it must "
    "name 127.0.0.1).",
)
@click.option(
    "--keyfile",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The certificate's private key (PEM).",
)
@click.option(
    "--ca",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="CA certificates (PEM) the hosts and clients verify the gateway with (default: "
    "$NBCLUSTER_CA, else the system's trust store).",
)
@click.option(
    "--no-curve",
    is_flag=True,
    help="Do not encrypt the ZMQ traffic between the gateway and replicas (CurveZMQ).",
)
@click.option("--token", help="API token (default: $NBCLUSTER_TOKEN, else a random one).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--replicas",
    type=click.Choice(["1", "3"]),
    help="Replicas per kernel: 3 (Raft-replicated; the default with 3 or more hosts) or 1.",
)
@policy_option
@click.option(
    "--min-hosts",
    type=click.IntRange(0, 64),
    help="Auto-scaling floor (default: --hosts).",
)
@click.option(
    "--max-hosts",
    type=click.IntRange(0, 64),
    help="Auto-scaling ceiling: above --hosts, the gateway starts and stops extra local "
    "hosts with the load (default: --hosts, no auto-scaling).",
)
@subscription_option
@store_option
@click.option(
    "--redis",
    "redis_url",
    metavar="URL",
    help="Keep jobs and queues in Redis (redis://host:6379/0) instead of the state directory.",
)
@click.option("--lab", is_flag=True, help="Also start JupyterLab wired to the gateway.")
@click.option("--lab-port", default=8888, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Log level of the gateway and hosts.",
)
def up_command(
    hosts: int,
    gpus_per_host: int | None,
    port: int,
    certfile: Path | None,
    keyfile: Path | None,
    ca: Path | None,
    no_curve: bool,
    token: str | None,
    state_dir: Path | None,
    replicas: str | None,
    policy: str,
    min_hosts: int | None,
    max_hosts: int | None,
    max_subscription_ratio: float,
    store_url: str | None,
    redis_url: str | None,
    lab: bool,
    lab_port: int,
    log_level: str,
) -> None:
    """Start a gateway and host daemons on this machine (loopback only)."""
    ip = "127.0.0.1"
    if replicas is None:
        replicas = "3" if hosts >= 3 else "1"
        if hosts < 3:
            console.print(f"[yellow]{hosts} host(s): kernels run 1 replica (3 need 3 hosts).[/]")
    if int(replicas) > hosts:
        raise click.BadParameter(
            f"{replicas} replicas per kernel need at least {replicas} hosts", param_hint="--hosts"
        )
    min_hosts = hosts if min_hosts is None else min_hosts
    max_hosts = hosts if max_hosts is None else max_hosts
    if max_hosts < hosts:
        raise click.BadParameter(
            f"--max-hosts {max_hosts} is below --hosts {hosts}", param_hint="--max-hosts"
        )
    if min_hosts > max_hosts:
        raise click.BadParameter(
            f"--min-hosts {min_hosts} is above --max-hosts {max_hosts}", param_hint="--min-hosts"
        )
    if not port_is_free(ip, port):
        raise click.ClickException(f"port {port} on {ip} is in use; choose another with --port")
    token = token or envvars.TOKEN.get() or secrets.token_urlsafe(24)
    root = (state_dir or default_state_dir()).resolve()
    if (certfile is None) != (keyfile is None):
        raise click.UsageError("--certfile and --keyfile go together")
    url = f"{'https' if certfile else 'http'}://{ip}:{port}"
    ca = ca or (Path(value) if (value := envvars.CA.get()) else None)
    try:
        verify = client_context(ca) if certfile else None
    except TlsConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--ca") from None
    # Passed on to the gateway (its options, and its env for the hosts it starts itself) and
    # to the hosts and JupyterLab this command starts, which verify the gateway with ``ca``.
    transport_args = [
        *(
            ["--certfile", str(certfile.resolve()), "--keyfile", str(keyfile.resolve())]
            if certfile and keyfile
            else []
        ),
        *(["--no-curve"] if no_curve else []),
    ]
    ca_args = ["--ca", str(ca.resolve())] if ca and certfile else []
    # The gateway gets the admin token and the join token; the hosts only the join token.
    join_token = envvars.JOIN_TOKEN.get() or new_token(JOIN_TOKEN_PREFIX)
    env = {**os.environ, envvars.TOKEN.name: token, envvars.JOIN_TOKEN.name: join_token}
    host_env = {k: v for k, v in env.items() if k != envvars.TOKEN.name}
    if ca_args:
        env |= {envvars.CA.name: ca_args[1], "JUPYTER_GATEWAY_CA_CERTS": ca_args[1]}
    me = str(os.getpid())
    python = [sys.executable, "-m", "nbcluster"]
    children = _Children()

    stop_requested = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        children.start(
            "gateway",
            [
                *python,
                "gateway",
                "--ip",
                ip,
                "--port",
                str(port),
                "--state-dir",
                str(root),
                "--replicas",
                str(replicas),
                "--policy",
                policy,
                *transport_args,
                "--max-subscription-ratio",
                str(max_subscription_ratio),
                *(["--store", store_url] if store_url else []),
                *(["--redis", redis_url] if redis_url else []),
                *(
                    [
                        "--min-hosts",
                        str(min_hosts),
                        "--max-hosts",
                        str(max_hosts),
                        "--scaling-gpus-per-host",
                        str(8 if gpus_per_host is None else gpus_per_host),
                    ]
                    if max_hosts > hosts
                    else []
                ),
                "--log-level",
                log_level,
                "--parent-pid",
                me,
            ],
            env,
        )
        http = httpx.Client(
            base_url=url,
            headers={"Authorization": f"token {token}"},
            timeout=2,
            verify=verify or True,
        )
        _wait_until(
            "Starting the gateway", lambda: http.get("/api").status_code == 200, children, 60
        )
        gpu_shares = [None] * hosts if gpus_per_host is not None else _partition_real_gpus(hosts)
        for i in range(hosts):
            name = f"host-{i + 1}"
            argv = [
                *python,
                "host",
                "--gateway",
                url,
                *ca_args,
                "--name",
                name,
                "--state-dir",
                str(root),
                "--log-level",
                log_level,
                "--parent-pid",
                me,
            ]
            share = gpu_shares[i]
            if share is None:
                argv += ["--gpus", str(8 if gpus_per_host is None else gpus_per_host)]
            elif share:
                argv += ["--gpu-devices", share]
            else:
                argv += ["--gpus", "0"]
            children.start(name, argv, host_env)

        def hosts_ready() -> bool:
            listed = http.get("/api/cluster/hosts").json()
            return sum(1 for h in listed if h["state"] == "connected") >= hosts

        _wait_until(f"Starting {hosts} host daemon(s)", hosts_ready, children, 60)
        ca_file = ca_args[1] if ca_args else None
        # The token in JupyterLab's environment, as in the panel's connect line: never on
        # a command line, which every user of the machine can read while it runs.
        lab_line = (
            f"env JUPYTER_GATEWAY_AUTH_TOKEN={shlex.quote(token)} jupyter lab --gateway-url={url}"
        )
        if ca_file:
            lab_line += f" --GatewayClient.ca_certs={shlex.quote(ca_file)}"
        lines = [
            f"[bold]Gateway[/]     {url}",
            f"[bold]Token[/]       {token}",
            f"[bold]Hosts[/]       {hosts}   (see them with: nbcluster status)",
            f"[bold]Replicas[/]    {replicas} per kernel, policy {policy}",
        ]
        if state_dir is not None:
            # The other commands find this gateway through its state directory.
            lines[2] = f"[bold]Hosts[/]       {hosts}"
            lines.append(
                "[bold]Status[/]      "
                + escape(f"nbcluster status --state-dir {shlex.quote(str(root))}")
            )
        if max_hosts > hosts:
            lines.append(f"[bold]Scaling[/]     {min_hosts} to {max_hosts} hosts")
        if lab:
            lab_url = _start_lab(children, env, url, token, lab_port)
            lines.append(f"[bold]JupyterLab[/]  {lab_url}")
        console.print(Panel("\n".join(lines), title="nbcluster is up", expand=False))
        # The connect lines stay unwrapped so that they can be copied whole.
        for line in connect_lines(url, token, ca_file):
            console.print(line, soft_wrap=True, highlight=False)
        console.print("Press Ctrl-C to stop everything.", highlight=False)
        # Plain lines on stdout, for scripts (a terminal has the panel above: the same
        # things, and a connect line that works from any shell).
        if not sys.stdout.isatty():
            click.echo(f"URL: {url}\nTOKEN: {token}\nCONNECT: {lab_line}", err=False)
            if lab:
                click.echo(f"LAB: {lab_url}", err=False)
        while not stop_requested:
            dead = children.exited()
            if any(name == "gateway" for name, _ in dead):
                raise click.ClickException("the gateway stopped unexpectedly; stopping everything")
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with console.status("Stopping"):
            children.stop_all()
            # Every replica stopped with its host: records of those kernels would only come
            # back as dead kernels at the next start.
            for record in (root / "gateway" / "kernels").glob("*.json"):
                record.unlink(missing_ok=True)
        console.print("nbcluster stopped.")


def venv_jupyter() -> Path | None:
    """The ``jupyter`` command of this Python's environment (beside ``sys.executable``, not
    resolved: a virtual environment's ``python`` is a link to the system's) when JupyterLab is
    installed there (its ``jupyter-lab`` is beside it; ``jupyter`` alone comes with
    jupyter_core, a dependency, and has no ``lab`` subcommand); else None. Run by its absolute
    path it finds its subcommands beside itself, from any shell."""
    bin_dir = Path(os.path.abspath(sys.executable)).parent
    jupyter = bin_dir / "jupyter"
    if not (os.access(jupyter, os.X_OK) and os.access(bin_dir / "jupyter-lab", os.X_OK)):
        return None
    return jupyter


def connect_lines(url: str, token: str, ca_file: str | None) -> list[str]:
    """How to connect JupyterLab, as lines to print: a command that works from any shell
    (``env`` is a program, so csh and fish take it too), this environment's ``jupyter`` by its
    absolute path, the token in JupyterLab's environment rather than on its command line
    (which every user of the machine sees for as long as it runs). Without JupyterLab here,
    how to install it, and the command for a JupyterLab installed elsewhere."""
    args = f"lab --gateway-url={url}"
    if ca_file:
        args += f" --GatewayClient.ca_certs={shlex.quote(ca_file)}"
    env = f"env JUPYTER_GATEWAY_AUTH_TOKEN={shlex.quote(token)}"
    jupyter = venv_jupyter()
    if jupyter is not None:
        return ["Connect JupyterLab with:", f"  {env} {shlex.quote(str(jupyter))} {args}"]
    python = shlex.quote(os.path.abspath(sys.executable))
    return [
        f"JupyterLab is not installed in {sys.prefix}: install it with",
        f"  {python} -m pip install 'nbcluster[lab]'",
        "(make up installs it), or connect any JupyterLab 4 with:",
        f"  {env} jupyter {args}",
    ]


def _start_lab(children: _Children, env: dict[str, str], url: str, token: str, port: int) -> str:
    jupyter = venv_jupyter()
    # This environment's JupyterLab, else one on PATH.
    command = [str(jupyter), "lab"] if jupyter else [shutil.which("jupyter-lab") or ""]
    if not command[0]:
        raise click.ClickException(
            f"JupyterLab is not installed in {sys.prefix} (nor on PATH): install it with "
            f"{shlex.quote(os.path.abspath(sys.executable))} -m pip install 'nbcluster[lab]'"
        )
    if not port_is_free("127.0.0.1", port):
        port = free_port("127.0.0.1")
    lab_token = secrets.token_urlsafe(24)
    # JupyterLab refuses to run as root unless told; containers often run as root.
    as_root = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    children.start(
        "jupyterlab",
        [
            *command,
            *as_root,
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--gateway-url={url}",
        ],
        # Both tokens by environment, never on the command line (``ps`` shows argv to
        # every user of the machine); nbcluster's own secrets stay out of it.
        {
            **{
                k: v
                for k, v in env.items()
                if k not in (envvars.TOKEN.name, envvars.JOIN_TOKEN.name)
            },
            "JUPYTER_TOKEN": lab_token,
            "JUPYTER_GATEWAY_AUTH_TOKEN": token,
        },
    )
    lab_url = f"http://127.0.0.1:{port}/lab?token={lab_token}"
    probe = httpx.Client(timeout=2)
    _wait_until(
        "Starting JupyterLab",
        lambda: (
            probe.get(f"http://127.0.0.1:{port}/api", params={"token": lab_token}).status_code
            == 200
        ),
        children,
        120,
    )
    return lab_url
