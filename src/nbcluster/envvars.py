"""Every environment variable through which nbcluster's processes talk to one another.

The gateway, ``nbcluster up``, the host daemons, the replica kernels, batch jobs and the CLI
pass settings and secrets down through the environment: the gateway names them in a replica's
``StartReplica.env``, the host daemon adds its own when it spawns the replica or a job, and the
replica (or the job, or user code through :mod:`nbcluster.runtime`) reads them. Each variable
is declared once here, with its meaning, the type of its value, who sets it and who reads it;
writers and readers use these declarations (``KERNEL_ID.name``, ``STORE_THRESHOLD.get_int()``)
rather than spelling the names. ``docs/architecture.md`` ("Environment variables") lists them
for operators.

Stdlib only: :mod:`nbcluster.runtime` imports it into notebook processes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "ALL",
    "CA",
    "CHECKPOINT_EVERY",
    "CHECKPOINT_INTERVAL",
    "CUDA_DEVICE_ORDER",
    "CUDA_VISIBLE_DEVICES",
    "GATEWAY_CA",
    "GATEWAY_TOKEN",
    "GATEWAY_URL",
    "GPUS",
    "JOB_ID",
    "JOIN_TOKEN",
    "KERNEL_ID",
    "LIFELINE_PATH",
    "PARENT_PID",
    "PREFIX",
    "RAFT_PASSWORD",
    "REPLICA_ID",
    "REPORT_FD",
    "REPORT_PATH",
    "STATE_DIR",
    "STORE_THRESHOLD",
    "STORE_URL",
    "TOKEN",
    "URL",
    "EnvVar",
    "by_name",
]

#: The prefix of nbcluster's own variables (replicas never capture nor restore them; job
#: runtimes pass them into containers and pods).
PREFIX = "NBCLUSTER_"


@dataclass(frozen=True, slots=True)
class EnvVar:
    """One environment variable: what it holds, and which processes set and read it."""

    name: str
    #: The form of its value ("int", "URL", "comma-separated GPU indices" ...).
    type: str
    meaning: str
    set_by: str
    read_by: str
    #: The value when it is unset (None: no default; readers treat it as absent).
    default: str | None = None
    #: A credential: the host daemon keeps it from the processes it starts that need not have it.
    secret: bool = False

    def get(self, environ: Mapping[str, str] | None = None) -> str | None:
        """Its value in ``environ`` (default: this process's), else the default, else None."""
        env = os.environ if environ is None else environ
        value = env.get(self.name)
        return self.default if value is None else value

    def get_int(self, environ: Mapping[str, str] | None = None) -> int:
        """Its value as an int (unset or blank: the default); ValueError naming it if invalid."""
        text = self._number_text(environ)
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{self.name}={text!r} is not an integer") from None

    def get_float(self, environ: Mapping[str, str] | None = None) -> float:
        """Its value as a float (unset or blank: the default); ValueError naming it if invalid."""
        text = self._number_text(environ)
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{self.name}={text!r} is not a number") from None

    def _number_text(self, environ: Mapping[str, str] | None) -> str:
        env = os.environ if environ is None else environ
        value = (env.get(self.name) or "").strip()
        if value:
            return value
        if self.default is None:
            raise ValueError(f"{self.name} is not set")
        return self.default


# -- for the operator and the command line ----------------------------------------------------

TOKEN = EnvVar(
    "NBCLUSTER_TOKEN",
    "str",
    "An API token: the admin token the gateway is started with, or a user's token "
    "(`nbcluster user add`) for the command-line clients.",
    set_by="the operator; `nbcluster up` for the gateway it starts",
    read_by="`nbcluster gateway|status|migrate|store|job` (when --token is not given)",
    secret=True,
)
JOIN_TOKEN = EnvVar(
    "NBCLUSTER_JOIN_TOKEN",
    "str",
    "The token host daemons join the cluster with (good for nothing else). The gateway makes "
    "one at its first start (`nbcluster join-token` prints it) unless this is set.",
    set_by="the operator; `nbcluster up` and the gateway's host provider for the host daemons "
    "they start",
    read_by="`nbcluster host` (when --join-token-file is not given), `nbcluster gateway`",
    secret=True,
)
URL = EnvVar(
    "NBCLUSTER_URL",
    "URL",
    "The gateway the command-line clients talk to.",
    set_by="the operator",
    read_by="`nbcluster status|migrate|store|job` (when --url is not given)",
)
CA = EnvVar(
    "NBCLUSTER_CA",
    "path (PEM file)",
    "The CA certificates that the gateway's TLS certificate is verified against (default: the "
    "system's trust store).",
    set_by="the operator; `nbcluster up --ca` for the gateway and hosts it starts (the "
    "gateway's auto-scaled local hosts inherit it)",
    read_by="`nbcluster host|status|migrate|store|job` (when --ca is not given); "
    "nbcluster.client.GatewayClient",
)
STATE_DIR = EnvVar(
    "NBCLUSTER_STATE_DIR",
    "path",
    "Where the gateway keeps kernel records and `nbcluster up` its runtime file.",
    set_by="the operator",
    read_by="every `nbcluster` command (when --state-dir is not given); default "
    "$XDG_DATA_HOME/nbcluster",
)

# -- host daemon → replica --------------------------------------------------------------------

KERNEL_ID = EnvVar(
    "NBCLUSTER_KERNEL_ID",
    "str",
    "The kernel a replica belongs to (also the owner of the jobs its cells submit).",
    set_by="the host daemon, for each replica it starts (from StartReplica.kernel_id)",
    read_by="the replica kernel; `%%job`/`%jobs`; nbcluster.runtime.in_nbcluster() in the "
    "replica and the processes its cells start",
)
REPLICA_ID = EnvVar(
    "NBCLUSTER_REPLICA_ID",
    "str",
    "The replica's id within its kernel (who proposes and wins a term).",
    set_by="the host daemon, for each replica it starts",
    read_by="the replica kernel",
)
REPORT_FD = EnvVar(
    "NBCLUSTER_REPORT_FD",
    "int (file descriptor)",
    "The inherited pipe on which a replica reports its bound ports as one JSON line.",
    set_by="the host daemon, for each replica it starts",
    read_by="the replica's app, once at start-up",
)
REPORT_PATH = EnvVar(
    "NBCLUSTER_REPORT_PATH",
    "path (a FIFO)",
    "For a replica in a container (no fd can be inherited): the FIFO, in the directory the "
    "host daemon mounts into the container, on which it reports its ports as one JSON line.",
    set_by="the host daemon, for each replica it starts as a container",
    read_by="the replica's app, once at start-up",
)
LIFELINE_PATH = EnvVar(
    "NBCLUSTER_LIFELINE_PATH",
    "path (a FIFO)",
    "For a replica in a container (it cannot see the daemon's pid): a FIFO the host daemon "
    "holds open for writing; end of file means the daemon is gone, and the replica exits.",
    set_by="the host daemon, for each replica it starts as a container",
    read_by="the replica's app, which watches it on a thread",
)
PARENT_PID = EnvVar(
    "NBCLUSTER_PARENT_PID",
    "int (process id)",
    "The host daemon's pid: the replica dies with it (a dead daemon means a lost host).",
    set_by="the host daemon, for each replica it starts",
    read_by="the replica's app, once at start-up",
)

# -- gateway → replica (StartReplica.env) -----------------------------------------------------

RAFT_PASSWORD = EnvVar(
    "NBCLUSTER_RAFT_PASSWORD",
    "str",
    "The kernel's Raft group password (its replicas' Raft traffic is encrypted with it).",
    set_by="the gateway, per kernel",
    read_by="the replica kernel, when it joins its group",
    secret=True,
)
STORE_URL = EnvVar(
    "NBCLUSTER_STORE_URL",
    "URL (file://, redis://, s3://)",
    "The object store for large values, state changes and checkpoints.",
    set_by="the gateway (--store, else a directory under its state dir); the operator for jobs",
    read_by="the replica kernel, when it joins its group; jobs (Docker and Kubernetes "
    "runtimes pass it into the container or pod)",
)
STORE_THRESHOLD = EnvVar(
    "NBCLUSTER_STORE_THRESHOLD",
    "int (bytes)",
    "Values pickled larger than this go to the object store.",
    set_by="the gateway (--store-threshold-mb)",
    read_by="the replica kernel, when it joins its group",
    default=str(2**20),
)
GATEWAY_URL = EnvVar(
    "NBCLUSTER_GATEWAY_URL",
    "URL",
    "The gateway's job API, for the kernel's `%%job` and `%jobs` magics.",
    set_by="the gateway; the host daemon replaces it with the URL it reaches the gateway at "
    "(reachable from its machine, and the name the gateway's certificate carries)",
    read_by="`%%job`, `%jobs` in the replica",
)
GATEWAY_TOKEN = EnvVar(
    "NBCLUSTER_GATEWAY_TOKEN",
    "str",
    "The kernel's own token for GATEWAY_URL: it may only submit and follow this kernel's "
    "jobs, for the kernel's owner (not a user's or the admin's token).",
    set_by="the gateway",
    read_by="`%%job`, `%jobs` in the replica",
    secret=True,
)
GATEWAY_CA = EnvVar(
    "NBCLUSTER_GATEWAY_CA",
    "path (PEM file)",
    "The CA file the host daemon verifies the gateway with, for GATEWAY_URL when it is https "
    "(unset: the system's trust store).",
    set_by="the host daemon (its --ca), for each replica and job it starts",
    read_by="`%%job`, `%jobs` in the replica",
)
GPUS = EnvVar(
    "NBCLUSTER_GPUS",
    "comma-separated GPU indices (the host's NVML indices; empty: none)",
    "The GPUs bound to a kernel for its whole life, to the running cell, or to a job.",
    set_by="the gateway at launch (policy reservation); the replica while a cell with bound "
    "GPUs runs; the host daemon for a job",
    read_by="nbcluster.runtime.gpus() (cells and the processes they start); the Docker job "
    "runtime (the container's GPUs)",
)

# -- tuning, from the environment the host daemon passes on -----------------------------------

CHECKPOINT_EVERY = EnvVar(
    "NBCLUSTER_CHECKPOINT_EVERY",
    "int (cells)",
    "The executor writes a checkpoint after this many of its cells.",
    set_by="the operator (inherited from the host daemon's environment)",
    read_by="the replica kernel, at import",
    default="20",
)
CHECKPOINT_INTERVAL = EnvVar(
    "NBCLUSTER_CHECKPOINT_INTERVAL",
    "float (seconds)",
    "The executor also writes one after a cell when its last is older than this.",
    set_by="the operator (inherited from the host daemon's environment)",
    read_by="the replica kernel, at import",
    default="300",
)

# -- host daemon → job ------------------------------------------------------------------------

JOB_ID = EnvVar(
    "NBCLUSTER_JOB_ID",
    "str",
    "The batch job a process runs for.",
    set_by="the host daemon, for each job it runs",
    read_by="the job's own code (the Docker and Kubernetes runtimes pass it into the "
    "container or pod)",
)

# -- not ours, but set by nbcluster -----------------------------------------------------------

CUDA_VISIBLE_DEVICES = EnvVar(
    "CUDA_VISIBLE_DEVICES",
    "comma-separated GPU indices (empty: no device)",
    "The GPUs CUDA may use, the same list as NBCLUSTER_GPUS.",
    set_by="wherever NBCLUSTER_GPUS is set, to the same value",
    read_by="CUDA (the libraries a cell or job uses)",
)
CUDA_DEVICE_ORDER = EnvVar(
    "CUDA_DEVICE_ORDER",
    "str",
    "Made PCI_BUS_ID so that CUDA numbers devices as NVML (and so the gateway) does.",
    set_by="the replica kernel at start-up, unless already set",
    read_by="CUDA",
)

#: Every variable declared here, in the order above.
ALL: tuple[EnvVar, ...] = (
    TOKEN,
    JOIN_TOKEN,
    URL,
    CA,
    STATE_DIR,
    KERNEL_ID,
    REPLICA_ID,
    REPORT_FD,
    REPORT_PATH,
    LIFELINE_PATH,
    PARENT_PID,
    RAFT_PASSWORD,
    STORE_URL,
    STORE_THRESHOLD,
    GATEWAY_URL,
    GATEWAY_TOKEN,
    GATEWAY_CA,
    GPUS,
    CHECKPOINT_EVERY,
    CHECKPOINT_INTERVAL,
    JOB_ID,
    CUDA_VISIBLE_DEVICES,
    CUDA_DEVICE_ORDER,
)

_BY_NAME = {var.name: var for var in ALL}


def by_name(name: str) -> EnvVar:
    """The declaration of ``name``; KeyError if nbcluster declares no such variable."""
    return _BY_NAME[name]
