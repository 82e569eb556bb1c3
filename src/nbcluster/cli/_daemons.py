"""``nbcluster gateway`` and ``nbcluster host``: the two daemons, run separately.

Over 500 lines on purpose: most of it is the two commands' option declarations, each mirrored
by a parameter and a config field, which read best beside the code that checks them; the
host-provider options, a family of their own, are in ``_host_provider_options``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

import click

from .. import envvars
from .._lifeline import die_with_parent
from ._common import (
    default_state_dir,
    policy_option,
    remove_runtime,
    setup_logging,
    store_option,
    subscription_option,
    write_runtime,
)
from ._host_provider_options import (
    host_provider_config,
    host_provider_options,
    parse_devices,
    refuse_foreign_host_options,
    ssh_machines,
)

__all__ = ["gateway_command", "host_command"]

log = logging.getLogger("nbcluster")

_LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)


def _token(value: str | None) -> str:
    token = value or envvars.TOKEN.get()
    if not token:
        raise click.UsageError("a token is required: pass --token or set NBCLUSTER_TOKEN")
    return token


def _join_token(path: Path | None) -> str:
    """The join token from ``path``, else ``$NBCLUSTER_JOIN_TOKEN`` (never from argv)."""
    token = path.read_text().strip() if path is not None else envvars.JOIN_TOKEN.get()
    if not token:
        raise click.UsageError(
            "a join token is required: pass --join-token-file or set NBCLUSTER_JOIN_TOKEN "
            "(`nbcluster join-token` on the gateway's machine prints it)"
        )
    return token


def _port_range(value: str | None) -> tuple[int, int] | None:
    """``--port-range LOW..HIGH`` as (low, high); a usage error naming what is wrong."""
    if value is None:
        return None
    from ..gateway import parse_port_range

    try:
        ports = parse_port_range(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--port-range") from None
    return ports.low, ports.high


@click.command("gateway")
@click.option("--ip", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8889, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--certfile",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="TLS certificate chain (PEM): serve https and wss (with --keyfile).",
)
@click.option(
    "--keyfile",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The certificate's private key (PEM).",
)
@click.option(
    "--no-curve",
    is_flag=True,
    help="Do not encrypt the ZMQ traffic between the gateway and replicas (CurveZMQ).",
)
@click.option("--token", help="API token (default: $NBCLUSTER_TOKEN).")
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="File holding the admin token (a Docker secret, say), instead of $NBCLUSTER_TOKEN.",
)
@click.option(
    "--join-token-file",
    "gateway_join_token_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="File holding the join token hosts present (default: $NBCLUSTER_JOIN_TOKEN, else "
    "the one made in the state directory).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where kernel records live (default: $NBCLUSTER_STATE_DIR or ~/.local/share/nbcluster).",
)
@click.option(
    "--kernelspec-dir",
    "kernelspec_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Directory of extra kernelspecs (one sub-directory with a kernel.json each).",
)
@click.option(
    "--heartbeat-interval", default=1.0, show_default=True, type=click.FloatRange(0.05, 60)
)
@click.option(
    "--host-lost-timeout", default=5.0, show_default=True, type=click.FloatRange(0.2, 3600)
)
@click.option("--launch-timeout", default=30.0, show_default=True, type=click.FloatRange(1, 3600))
@click.option(
    "--port-range",
    metavar="LOW..HIGH",
    callback=lambda ctx, param, value: _port_range(value),
    help="Ports kernels' ZMQ faces bind on --ip (five a kernel; default: any free port). "
    "docs/provisioner.md.",
)
@click.option(
    "--replicas",
    default="3",
    show_default=True,
    type=click.Choice(["1", "3"]),
    help="Replicas per kernel: 3 (Raft-replicated, survives a host) or 1.",
)
@policy_option
@subscription_option
@store_option
@click.option(
    "--store-retention",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds a shut-down kernel's objects stay in the store before they are deleted.",
)
@click.option(
    "--store-threshold-mb",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Values whose pickle is larger go to the object store instead of the Raft log.",
)
@click.option(
    "--redis",
    "redis_url",
    metavar="URL",
    help="Keep jobs and queues in Redis (redis://host:6379/0) instead of the state directory.",
)
@click.option(
    "--jobs-first",
    is_flag=True,
    help="Give free GPUs to queued GPU jobs even while kernel cells wait for GPUs.",
)
@click.option(
    "--reclaim-idle-after",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Replicated kernels idle this long release their replicas (state checkpointed); "
    "their next message restores them. Default: never.",
)
@click.option(
    "--record",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    metavar="FILE",
    help="Append every scheduler event and decision to FILE (JSON lines), for "
    "`nbcluster simulate FILE` to replay.",
)
@click.option(
    "--min-hosts", default=0, show_default=True, type=click.IntRange(0), help="Auto-scaling floor."
)
@click.option(
    "--max-hosts",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Auto-scaling ceiling; 0 turns auto-scaling off. Hosts come from --hosts-from.",
)
@host_provider_options
@click.option(
    "--scaling-buffer",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Spare hosts kept beyond the minimum.",
)
@click.option(
    "--scaling-interval", default=5.0, show_default=True, type=click.FloatRange(0.1, 3600)
)
@click.option(
    "--scaling-gpus-per-host",
    default=8,
    show_default=True,
    type=click.IntRange(0, 4096),
    help="Virtual GPUs of each host the auto-scaler starts.",
)
@click.option(
    "--max-body-mb",
    default=16.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Largest request body (MiB); larger: 413.",
)
@click.option(
    "--max-upload-mb",
    default=256.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Largest upload to POST /api/jobs/inputs (MiB); larger: 413.",
)
@click.option(
    "--header-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Seconds a connection may take to send a complete request header; then it is closed.",
)
@click.option(
    "--keep-alive-timeout",
    default=5,
    show_default=True,
    type=click.IntRange(1),
    help="Seconds an idle keep-alive connection stays open.",
)
@click.option(
    "--max-connections",
    default=1000,
    show_default=True,
    type=click.IntRange(1),
    help="Open connections at once (HTTP and websockets); requests past it get 503.",
)
@click.option(
    "--subscriber-buffer-mb",
    default=4.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Job events buffered for one SSE/log-follow client (MiB); a client that falls this "
    "far behind is disconnected.",
)
@click.option(
    "--jupyterhub-api-url",
    metavar="URL",
    help="Also accept users' JupyterHub API tokens, checked against this Hub API "
    "(http://hub:8081/hub/api). Default: $JUPYTERHUB_API_URL when JupyterHub runs the gateway "
    "as a service.",
)
@click.option(
    "--jupyterhub-service-name",
    metavar="NAME",
    help="The gateway's service name in the Hub; tokens need access:services!service=NAME. "
    "Default: $JUPYTERHUB_SERVICE_NAME, else nbcluster.",
)
@click.option(
    "--jupyterhub-cache-seconds",
    default=60.0,
    show_default=True,
    type=click.FloatRange(0),
    help="How long the Hub's answer for a token is trusted (a revoked token works this long).",
)
@click.option(
    "--no-jupyterhub-admins",
    is_flag=True,
    help="Hub admins are plain users here (by default they are nbcluster admins).",
)
@click.option("--log-level", default="info", show_default=True, type=_LOG_LEVELS)
@click.option("--parent-pid", default=0, hidden=True, type=int)
def gateway_command(
    ip: str,
    port: int,
    certfile: Path | None,
    keyfile: Path | None,
    no_curve: bool,
    token: str | None,
    token_file: Path | None,
    gateway_join_token_file: Path | None,
    state_dir: Path | None,
    kernelspec_dirs: tuple[Path, ...],
    heartbeat_interval: float,
    host_lost_timeout: float,
    launch_timeout: float,
    port_range: tuple[int, int] | None,
    replicas: str,
    policy: str,
    max_subscription_ratio: float,
    store_url: str | None,
    store_retention: float,
    store_threshold_mb: float,
    redis_url: str | None,
    jobs_first: bool,
    reclaim_idle_after: float | None,
    record: Path | None,
    min_hosts: int,
    max_hosts: int,
    hosts_from: str,
    public_url: str | None,
    host_image: str,
    host_network: str,
    host_address: str | None,
    host_gpus: str,
    host_gpu_devices: str | None,
    host_constraints: tuple[str, ...],
    hosts_per_node: int,
    join_token_secret: str | None,
    host_user: str,
    host_mounts: tuple[str, ...],
    host_ca: Path | None,
    host_pod_template: str,
    host_namespace: str | None,
    ssh_hosts: tuple[str, ...],
    ssh_user: str | None,
    ssh_keys: tuple[Path, ...],
    ssh_known_hosts: Path | None,
    ssh_accept_unknown_hosts: bool,
    ssh_config: Path | None,
    ssh_nbcluster: str,
    ssh_state_dir: str | None,
    ssh_ca: str | None,
    ssh_host_args: tuple[str, ...],
    stop_hosts_on_exit: bool,
    scaling_buffer: int,
    scaling_interval: float,
    scaling_gpus_per_host: int,
    max_body_mb: float,
    max_upload_mb: float,
    header_timeout: float,
    keep_alive_timeout: int,
    max_connections: int,
    subscriber_buffer_mb: float,
    jupyterhub_api_url: str | None,
    jupyterhub_service_name: str | None,
    jupyterhub_cache_seconds: float,
    no_jupyterhub_admins: bool,
    log_level: str,
    parent_pid: int,
) -> None:
    """Run the gateway (global scheduler) serving the Jupyter Kernel Gateway API."""
    if max_hosts and min_hosts > max_hosts:
        raise click.BadParameter(
            f"--min-hosts {min_hosts} is above --max-hosts {max_hosts}", param_hint="--min-hosts"
        )
    from ..gateway import GatewayConfig, join_token_path, run
    from ..store import StoreError, open_store

    if public_url is not None and not public_url.startswith(("http://", "https://")):
        raise click.BadParameter(f"{public_url!r} is not an http(s) URL", param_hint="--public-url")
    refuse_foreign_host_options(hosts_from)
    host_provider = host_provider_config(
        hosts_from,
        pod_template=host_pod_template,
        namespace=host_namespace,
        ssh_hosts=ssh_machines(hosts_from, ssh_hosts, ssh_user, kernelspec_dirs),
        ssh_user=ssh_user,
        ssh_keys=ssh_keys,
        ssh_known_hosts=ssh_known_hosts,
        ssh_accept_unknown_hosts=ssh_accept_unknown_hosts,
        ssh_config=ssh_config,
        ssh_nbcluster=ssh_nbcluster,
        ssh_state_dir=ssh_state_dir,
        ssh_ca=ssh_ca,
        ssh_host_args=ssh_host_args,
        image=host_image,
        network=host_network,
        address=host_address,
        gpus=host_gpus,
        gpu_devices=host_gpu_devices,
        constraints=host_constraints,
        hosts_per_node=hosts_per_node,
        join_token_secret=join_token_secret,
        user=host_user,
        mounts=host_mounts,
        ca=host_ca,
        stop_on_exit=stop_hosts_on_exit,
    )

    die_with_parent(parent_pid)
    setup_logging(log_level)
    root = state_dir or default_state_dir()
    store_url = store_url or (root / "store").resolve().as_uri()
    try:
        open_store(store_url)
    except (ValueError, StoreError) as exc:
        raise click.BadParameter(str(exc), param_hint="--store") from None
    _check_transport(certfile, keyfile, no_curve)
    if record is not None and not record.resolve().parent.is_dir():
        raise click.BadParameter(f"{record.parent} is not a directory", param_hint="--record")
    hub_api_url, hub_service_name = _jupyterhub(jupyterhub_api_url, jupyterhub_service_name)
    config = GatewayConfig(
        token=_token(token or _secret_file(token_file, "--token-file")),
        join_token=_secret_file(gateway_join_token_file, "--join-token-file")
        or envvars.JOIN_TOKEN.get()
        or "",
        ip=ip,
        port=port,
        certfile=certfile.resolve() if certfile else None,
        keyfile=keyfile.resolve() if keyfile else None,
        curve=not no_curve,
        state_dir=root / "gateway",
        kernelspec_dirs=kernelspec_dirs,
        heartbeat_interval=heartbeat_interval,
        host_lost_timeout=host_lost_timeout,
        launch_timeout=launch_timeout,
        zmq_port_range=port_range,
        replicas_per_kernel=int(replicas),
        store_dir=root / "store",
        store_url=store_url,
        store_retention=store_retention,
        store_threshold=int(store_threshold_mb * 2**20),
        redis_url=redis_url,
        jobs_yield_to_cells=not jobs_first,
        reclaim_idle_after=reclaim_idle_after,
        record=record.resolve() if record is not None else None,
        policy=policy,
        max_subscription_ratio=max_subscription_ratio,
        min_hosts=min_hosts,
        max_hosts=max_hosts,
        scaling_buffer=scaling_buffer,
        scaling_interval=scaling_interval,
        scaling_gpus_per_host=scaling_gpus_per_host,
        host_provider=host_provider,
        public_url=public_url,
        max_body_bytes=int(max_body_mb * 2**20),
        max_upload_bytes=int(max_upload_mb * 2**20),
        header_timeout=header_timeout,
        keep_alive_timeout=keep_alive_timeout,
        max_connections=max_connections,
        subscriber_buffer_bytes=int(subscriber_buffer_mb * 2**20),
        hub_api_url=hub_api_url,
        hub_service_name=hub_service_name,
        hub_cache_seconds=jupyterhub_cache_seconds,
        hub_admin_is_admin=not no_jupyterhub_admins,
    )
    url = f"{config.scheme}://{ip if ':' not in ip else f'[{ip}]'}:{port}"
    write_runtime(root, {"url": url, "token": config.token, "pid": os.getpid(), "store": store_url})
    log.info("gateway listening on %s (state in %s)", url, config.state_dir)
    if not config.join_token:
        log.info(
            "host daemons join with the token in %s (`nbcluster join-token` prints it)",
            join_token_path(config.state_dir),
        )
    # uvicorn shuts down on SIGTERM, then raises it again: with the default disposition that
    # would kill us before the runtime file is removed (below). Exit normally instead.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        run(config)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        remove_runtime(root, os.getpid())


def _secret_file(path: Path | None, option: str) -> str | None:
    """The token in ``path`` (None without one); an empty file is an error naming it."""
    if path is None:
        return None
    token = path.read_text().strip()
    if not token:
        raise click.BadParameter(f"{path} is empty", param_hint=option)
    return token


def _jupyterhub(api_url: str | None, service_name: str | None) -> tuple[str | None, str]:
    """The Hub settings: the flags, else those JupyterHub gives a service it runs."""
    from ..identity import check_api_url, hub_settings_from_env

    env_url, env_name = hub_settings_from_env(os.environ)
    url = api_url or env_url
    if url is not None:
        try:
            url = check_api_url(url)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--jupyterhub-api-url") from None
    return url, service_name or env_name or "nbcluster"


def _check_transport(certfile: Path | None, keyfile: Path | None, no_curve: bool) -> None:
    """TLS files that work together (both or neither), and CURVE unless turned off."""
    from .._curve import CurveUnavailable, require_curve
    from .._tls import TlsConfigError, check_server_files

    if (certfile is None) != (keyfile is None):
        raise click.UsageError("--certfile and --keyfile go together")
    if certfile is not None and keyfile is not None:
        try:
            check_server_files(certfile, keyfile)
        except TlsConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--certfile/--keyfile") from None
    if not no_curve:
        try:
            require_curve()
        except CurveUnavailable as exc:
            raise click.UsageError(f"{exc}; or pass --no-curve") from None


def _ca(value: Path | None) -> Path | None:
    """``--ca``, else ``$NBCLUSTER_CA``; checked to be a CA file that loads."""
    from .._tls import TlsConfigError, client_context

    ca = value or (Path(env) if (env := envvars.CA.get()) else None)
    if ca is None:
        return None
    try:
        client_context(ca)
    except TlsConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--ca") from None
    return ca


@click.command("host")
@click.option(
    "--gateway", "gateway_url", required=True, help="Gateway URL, e.g. http://10.0.0.1:8889."
)
@click.option(
    "--ca",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="CA certificates (PEM) to verify an https gateway with (default: $NBCLUSTER_CA, "
    "else the system's trust store).",
)
@click.option(
    "--join-token-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="File holding the cluster's join token (default: $NBCLUSTER_JOIN_TOKEN); "
    "`nbcluster join-token` on the gateway's machine prints it.",
)
@click.option(
    "--name", default=lambda: socket.gethostname(), help="Host name (default: the hostname)."
)
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Address replicas listen on; the gateway must reach it.",
)
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--work-dir", type=click.Path(file_okay=False, path_type=Path), help="Default kernel cwd."
)
@click.option("--gpus", type=click.IntRange(0, 4096), help="Report this many virtual GPUs.")
@click.option("--gpu-devices", help="Comma-separated NVML indices of the real GPUs to offer.")
@click.option("--cpus", type=click.IntRange(1), help="CPUs to report (default: all).")
@click.option("--memory-mb", type=click.IntRange(1), help="Memory to report (default: all).")
@click.option(
    "--container-runtime",
    type=click.Choice(["docker", "kubernetes"]),
    help="Run the replicas of kernelspecs that name an image as containers of it: docker, on "
    "the engine at DOCKER_HOST or the local socket; kubernetes, as pods beside this daemon's "
    'own pod (it must run in one: docs/kubernetes.md, "Kernel images as pods"). Without it '
    "such kernels are refused here.",
)
@click.option(
    "--container-user",
    help="uid:gid replica containers run as (default: this daemon's, or 1000:1000 as root).",
)
@click.option(
    "--pool",
    help="The host pool this host is in (a-z, 0-9, '.', '_', '-'): kernelspecs and jobs that "
    "name it run only on its hosts. Default: none (it takes kernels and jobs without a pool).",
)
@click.option("--log-level", default="info", show_default=True, type=_LOG_LEVELS)
@click.option("--parent-pid", default=0, hidden=True, type=int)
def host_command(
    gateway_url: str,
    ca: Path | None,
    join_token_file: Path | None,
    name: str,
    address: str,
    state_dir: Path | None,
    work_dir: Path | None,
    gpus: int | None,
    gpu_devices: str | None,
    cpus: int | None,
    memory_mb: int | None,
    container_runtime: str | None,
    container_user: str | None,
    pool: str | None,
    log_level: str,
    parent_pid: int,
) -> None:
    """Run a host daemon that starts kernel replicas for the gateway."""
    from ..host import HostConfig, HostDaemon, HostRejected
    from ..hostproto import check_pool

    if not gateway_url.startswith(("http://", "https://")):
        raise click.BadParameter(f"{gateway_url!r} is not an http(s) URL", param_hint="--gateway")
    if pool is not None:
        try:
            check_pool(pool)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--pool") from None
    die_with_parent(parent_pid)
    setup_logging(log_level)
    root = state_dir or default_state_dir()
    config = HostConfig(
        gateway_url=gateway_url,
        ca=_ca(ca),
        token=_join_token(join_token_file),
        name=name,
        address=address,
        state_dir=root / "hosts" / name,
        working_dir=(work_dir or Path.cwd()).resolve(),
        virtual_gpus=gpus,
        gpu_devices=parse_devices(gpu_devices),
        cpus=cpus,
        memory_mb=memory_mb,
        container_runtime=container_runtime,
        container_user=container_user,
        pool=pool,
    )

    async def main() -> None:
        daemon = HostDaemon(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, daemon.stop)
        log.info(
            "host %s: %d CPUs, %d GPUs (%s), %s; gateway %s",
            name,
            daemon.resources.cpus,
            len(daemon.resources.gpus),
            "virtual" if any(g.virtual for g in daemon.resources.gpus) else "real",
            f"pool {pool}" if pool else "no pool",
            gateway_url,
        )
        await daemon.run()

    try:
        asyncio.run(main())
    except HostRejected as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
