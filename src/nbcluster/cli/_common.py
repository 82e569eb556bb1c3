"""Helpers shared by the CLI commands: default paths, the runtime file, logging."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.logging import RichHandler

from .. import envvars

__all__ = [
    "default_state_dir",
    "policy_option",
    "read_runtime",
    "remove_runtime",
    "runtime_path",
    "setup_logging",
    "store_option",
    "subscription_option",
    "write_runtime",
]

#: ``--policy`` of ``nbcluster gateway`` and ``nbcluster up``.
policy_option = click.option(
    "--policy",
    default="notebookos",
    show_default=True,
    type=click.Choice(["notebookos", "reservation", "batch"]),
    help="Scheduling policy: GPUs bound per cell on 3 replicas (notebookos), for the "
    "kernel's life (reservation), or per cell on 1 replica (batch).",
)
#: ``--store`` of ``nbcluster gateway``, ``nbcluster up`` and ``nbcluster store``.
store_option = click.option(
    "--store",
    "store_url",
    metavar="URL",
    help="Object store for large values: file:///dir, redis://host:6379/0?prefix=p/, or "
    "s3://bucket/prefix?endpoint_url=http://... (default: a directory under the state dir).",
)
#: ``--max-subscription-ratio`` of ``nbcluster gateway`` and ``nbcluster up``.
subscription_option = click.option(
    "--max-subscription-ratio",
    default=7.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="How far a host's GPUs may be oversubscribed by placed replicas.",
)


def default_state_dir() -> Path:
    """``$NBCLUSTER_STATE_DIR``, else ``$XDG_DATA_HOME/nbcluster`` (``~/.local/share/nbcluster``)."""
    explicit = envvars.STATE_DIR.get()
    if explicit:
        return Path(explicit).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "nbcluster"


def runtime_path(state_dir: Path) -> Path:
    """Where a running gateway records its URL and token (``nbcluster status`` reads it)."""
    return state_dir / "gateway" / "runtime.json"


def write_runtime(state_dir: Path, info: dict[str, Any]) -> None:
    """Record where the running gateway listens and its token (owner-readable only), so that
    ``nbcluster status`` works without flags."""
    path = runtime_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)


def read_runtime(state_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(runtime_path(state_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove_runtime(state_dir: Path, pid: int) -> None:
    info = read_runtime(state_dir)
    if info is not None and info.get("pid") == pid:
        runtime_path(state_dir).unlink(missing_ok=True)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(name)s: %(message)s",
        handlers=[
            RichHandler(
                console=Console(stderr=True),
                show_path=False,
                rich_tracebacks=False,
                markup=False,
            )
        ],
    )
    # pysyncobj/uvicorn chatter is not for operators
    logging.getLogger("uvicorn.error").setLevel(max(logging.WARNING, logging.getLogger().level))
