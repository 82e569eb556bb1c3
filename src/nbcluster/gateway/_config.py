"""Settings of the gateway process."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..jobs import JobLimits

__all__ = ["GatewayConfig", "HostProviderConfig"]


@dataclass(frozen=True)
class HostProviderConfig:
    """Where the auto-scaler's hosts come from (``nbcluster gateway --hosts-from``) and what
    the container providers start them with. ``docs/architecture.md``, "Host providers"."""

    #: ``local`` (host daemons as child processes), ``docker`` (containers on one engine),
    #: ``swarm`` (one Swarm service per host daemon), ``kubernetes`` (one pod per host) or
    #: ``ssh`` (a daemon per machine, over ssh).
    kind: str = "local"
    #: The image host daemons run (its entry point is ``nbcluster``).
    image: str = "nbcluster:latest"
    #: ``host`` (the engine's network namespace), or a Docker network's name.
    network: str = "host"
    #: The ``--address`` of the hosts (where their replicas listen). None: with host
    #: networking ``127.0.0.1`` for ``docker`` and the node's address for ``swarm``; on any
    #: other network the container's own address.
    address: str | None = None
    #: ``virtual`` (``--gpus N``, N the auto-scaler's GPUs per host) or ``nvidia`` (real
    #: devices: a share of ``gpu_devices`` per container for ``docker``, ``NVIDIA-GPU``
    #: generic resources for ``swarm``; the host daemon finds them with NVML).
    gpus: str = "virtual"
    #: ``docker`` with ``gpus="nvidia"``: the engine's GPUs (NVML indices) shared out.
    gpu_devices: tuple[int, ...] = ()
    #: ``swarm``: placement constraints, as ``docker service create --constraint`` takes them.
    constraints: tuple[str, ...] = ()
    #: ``swarm``: host daemons the provider puts on one node (1: one per GPU machine).
    hosts_per_node: int = 1
    #: ``swarm``: the Docker secret holding the join token (the operator's); None: the
    #: provider makes one from the gateway's join token.
    join_token_secret: str | None = None
    #: The uid:gid the image runs as (owner of the join-token secret file in the container).
    user: str = "1000:1000"
    #: Extra mounts, ``SOURCE:TARGET[:ro]`` (a path or a volume name).
    mounts: tuple[str, ...] = ()
    #: CA file (PEM) the hosts verify an https gateway with, given to them read-only.
    ca: Path | None = None
    #: Stop the provider's hosts when the gateway stops (else they wait for it, and a
    #: restarted gateway adopts them).
    stop_on_exit: bool = False
    #: Host names are ``<prefix>-<n>``.
    name_prefix: str = "auto"
    #: ``kubernetes``: the PodTemplate host pods are made from.
    pod_template: str = "nbcluster-host"
    #: ``kubernetes``: the namespace of host pods; None: the gateway pod's own.
    namespace: str | None = None
    #: ``ssh``: the machines (``[USER@]HOST[:PORT][/ADDRESS]``), one host daemon each.
    ssh_hosts: tuple[str, ...] = ()
    #: ``ssh``: the login user; None: ssh's default.
    ssh_user: str | None = None
    #: ``ssh``: private keys to log in with; empty: the agent and ``~/.ssh/id_*``.
    ssh_keys: tuple[Path, ...] = ()
    #: ``ssh``: the known_hosts file; None: ``~/.ssh/known_hosts``.
    ssh_known_hosts: Path | None = None
    #: ``ssh``: accept (and pin) keys of machines known_hosts does not list.
    ssh_accept_unknown_hosts: bool = False
    #: ``ssh``: an ssh_config file to read; None: none.
    ssh_config: Path | None = None
    #: ``ssh``: the ``nbcluster`` program on the machines.
    ssh_nbcluster: str = "nbcluster"
    #: ``ssh``: the hosts' ``--state-dir`` and ``--ca``, paths on the machines.
    ssh_state_dir: str | None = None
    ssh_ca: str | None = None
    #: ``ssh``: more arguments of ``nbcluster host`` on the machines.
    ssh_host_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class GatewayConfig:
    """What ``nbcluster gateway`` (or ``nbcluster up``) starts the gateway with.

    The defaults suit one machine: loopback only, state under ``./.nbcluster/gateway``.
    """

    token: str
    ip: str = "127.0.0.1"
    port: int = 8889
    state_dir: Path = field(default_factory=lambda: Path.cwd() / ".nbcluster" / "gateway")
    kernelspec_dirs: tuple[Path, ...] = ()
    #: How often host daemons send heartbeats.
    heartbeat_interval: float = 1.0
    #: A host silent (or disconnected) this long is lost, and its replicas are dead.
    host_lost_timeout: float = 5.0
    #: How long a replica may take to start and answer kernel_info.
    launch_timeout: float = 30.0
    #: Replicas per kernel: 3 replicated ones, or 1 (a plain remote kernel, no Raft).
    replicas_per_kernel: int = 3
    #: Directory of the local object store that replicas share for large values.
    store_dir: Path = field(default_factory=lambda: Path.cwd() / ".nbcluster" / "store")
    #: The object store replicas use (``file://``, ``redis://``, ``s3://``); None: a local
    #: directory store in ``store_dir``.
    store_url: str | None = None
    #: Seconds a shut-down kernel's objects stay in the store before the gateway deletes them.
    store_retention: float = 0.0
    #: Values whose pickle is larger than this many bytes go to the store, not the Raft log.
    store_threshold: int = 2**20
    #: Bytes a slow websocket client may have queued before it is disconnected.
    client_queue_limit: int = 64 * 2**20
    #: Scheduling policy: ``notebookos`` (replicas share GPUs, bound per cell),
    #: ``reservation`` (1 replica, GPUs for the kernel's life) or ``batch`` (1 replica,
    #: GPUs per cell, waits for its own host).
    policy: str = "notebookos"
    #: A host refuses replicas past ``pending / capacity / replicas_per_kernel`` of this.
    max_subscription_ratio: float = 7.0
    #: Auto-scaling bounds (hosts in the cluster); ``max_hosts`` 0 turns auto-scaling off.
    min_hosts: int = 0
    max_hosts: int = 0
    #: Replicated kernels idle this many seconds release their replicas (state checkpointed
    #: to the store); the next message restores them. None: never.
    reclaim_idle_after: float | None = None
    #: Append every scheduler event, with its time and the decisions taken, to this file
    #: (``--record``; ``nbcluster simulate`` replays it: docs/simulation.md). None: no recording.
    record: Path | None = None
    #: Spare hosts kept beyond what the committed GPUs need (NotebookOS keeps 3).
    scaling_buffer: int = 0
    #: Seconds between two auto-scaling rounds.
    scaling_interval: float = 5.0
    #: Jobs and queues in Redis (shared by gateways, survives their restarts); None: files
    #: under the state directory.
    redis_url: str | None = None
    #: GPU jobs wait while kernel cells wait for GPUs (cells first), else plain FIFO.
    jobs_yield_to_cells: bool = True
    #: Virtual GPUs of each host the auto-scaler starts.
    scaling_gpus_per_host: int = 8
    #: What starts and stops the auto-scaler's hosts.
    host_provider: HostProviderConfig = field(default_factory=HostProviderConfig)
    #: The gateway's URL as host daemons and kernels are told it (``--public-url``): one
    #: that works from where they run (inside a container, on another node). None: the
    #: listening address, loopback for a wildcard one.
    public_url: str | None = None
    # -- identities (docs/security.md, "Users and credentials") -------------------------------
    #: The name of the admin user ``token`` authenticates.
    admin_name: str = "admin"
    #: The users file (``nbcluster user add``); None: ``users.json`` in ``state_dir``.
    users_file: Path | None = None
    #: The token host daemons join with; empty: the one in ``state_dir/join-token``, made at
    #: the first start (``nbcluster join-token`` prints it).
    join_token: str = ""
    #: Users who may start no kernel of any kernelspec (the Gateway Provisioners default).
    unauthorized_users: tuple[str, ...] = ("root",)
    #: JupyterHub's API (``http://hub:8081/hub/api``): the gateway then also accepts users' Hub
    #: API tokens that may access the Hub service ``hub_service_name`` (docs/security.md,
    #: "JupyterHub"). None: Hub tokens are not accepted.
    hub_api_url: str | None = None
    hub_service_name: str = "nbcluster"
    #: Hub admins are admins here too (else plain users).
    hub_admin_is_admin: bool = True
    #: Seconds the Hub's answer for a token is trusted: a revoked Hub token, a removed user or
    #: a demoted admin keeps working this long.
    hub_cache_seconds: float = 60.0
    # -- transport (docs/security.md, "Encrypted transport") ----------------------------------
    #: The TLS certificate chain and key (PEM) the gateway serves https and wss with; None:
    #: plain http (a bind beyond loopback then logs a loud warning).
    certfile: Path | None = None
    keyfile: Path | None = None
    #: CurveZMQ on every ZMQ socket between the gateway and replicas (a keypair per replica).
    curve: bool = True
    #: The ports kernels' ZMQ faces bind (``--port-range LOW..HIGH``, both included; five a
    #: kernel), on ``ip``; None: any free port (docs/provisioner.md).
    zmq_port_range: tuple[int, int] | None = None
    # -- limits (docs/security.md, "Limits") ---------------------------------------------------
    #: Bytes of one request body; larger: 413 (Content-Length checked first, then counted
    #: while it is read, never buffered whole).
    max_body_bytes: int = 16 * 2**20
    #: Bytes of one upload to ``POST /api/jobs/inputs`` (the only upload endpoint).
    max_upload_bytes: int = 256 * 2**20
    #: Seconds a request body may stop arriving before the request fails (408).
    body_timeout: float = 60.0
    #: Bytes of one ``KERNEL_*`` value, and of all of them (names and values) together.
    max_env_value_bytes: int = 64 * 2**10
    max_env_bytes: int = 512 * 2**10
    #: Caps on a job spec (source, command, env, inputs).
    job_limits: JobLimits = field(default_factory=JobLimits)
    #: Seconds a connection may take, from being opened (or from its last response), to send
    #: a complete request header; then it is closed.
    header_timeout: float = 10.0
    #: Bytes of one request header (request line and fields); larger: 431.
    max_header_bytes: int = 64 * 2**10
    #: Seconds an idle keep-alive connection stays open.
    keep_alive_timeout: int = 5
    #: Open connections (HTTP and websockets) at once; a request past it is answered 503.
    max_connections: int = 1000
    #: Bytes of job events buffered for one SSE / log-follow subscriber; a subscriber that
    #: falls this far behind is dropped (its stream closes; it may reconnect).
    subscriber_buffer_bytes: int = 4 * 2**20
    #: Cluster notices kept in memory (and in the Redis stream) for ``/api/cluster/events``.
    notice_capacity: int = 10_000

    @property
    def scheme(self) -> str:
        """``https`` when the gateway serves TLS, else ``http`` (``wss``/``ws`` alike)."""
        return "https" if self.certfile is not None else "http"

    @property
    def advertised_url(self) -> str:
        """The URL hosts and kernels reach the gateway at: ``public_url``, else the listening
        address (loopback for a wildcard one) and port."""
        if self.public_url:
            return self.public_url.rstrip("/")
        ip = "127.0.0.1" if self.ip in ("0.0.0.0", "::", "") else self.ip
        host = f"[{ip}]" if ":" in ip else ip
        return f"{self.scheme}://{host}:{self.port}"
