"""The official ``kubernetes`` client as nbcluster's two users of it make and read it: the
gateway's ``kubernetes`` host provider (``gateway/_kubernetes_provider``) and the host
daemon's kernel pods (``host/_kube_replicas``).

The client is imported on first use (it is slow to import, and only these need it).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from typing import Any

__all__ = ["KubeConfigMissing", "api_status", "describe_api_error", "kubernetes", "new_core_api"]


class KubeConfigMissing(Exception):
    """Neither a pod's service account nor a kube config: there is no API to talk to."""


def kubernetes() -> Any:
    """The ``kubernetes`` package (``Any``: it is untyped)."""
    return importlib.import_module("kubernetes")


def new_core_api() -> Any:
    """A ``CoreV1Api`` on its own configuration: the pod's service account in a cluster, else
    the kube config (``KUBECONFIG`` as it is now, else ``~/.kube/config``). Blocking (reads
    files). Raises :class:`KubeConfigMissing` naming why neither works."""
    k8s = kubernetes()
    configuration = k8s.client.Configuration()
    try:
        k8s.config.load_incluster_config(client_configuration=configuration)
    except k8s.config.ConfigException:
        try:
            # KUBECONFIG as it is now (the client reads it once, when it is imported).
            k8s.config.load_kube_config(
                config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration
            )
        except (k8s.config.ConfigException, OSError) as exc:
            raise KubeConfigMissing(
                f"no Kubernetes API to talk to: not in a cluster, and no kube config ({exc})"
            ) from None
    return k8s.client.CoreV1Api(k8s.client.ApiClient(configuration))


def api_status(exc: BaseException) -> int | None:
    """The HTTP status of a client ``ApiException``; None for anything else."""
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def describe_api_error(exc: BaseException) -> str:
    """The API server's message (its ``Status`` body) rather than the client's dump."""
    status = api_status(exc)
    body = getattr(exc, "body", None)
    if status is not None and body:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            return f"{status} {json.loads(body).get('message') or getattr(exc, 'reason', '')}"
    if status is not None:
        return f"{status} {getattr(exc, 'reason', '')}".strip()
    return f"{type(exc).__name__}: {exc}"
