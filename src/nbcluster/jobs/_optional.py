"""Runtimes a worker offers besides ``process`` when their modules import: containers and
Kubernetes (their clients connect only when a job needs them)."""

from __future__ import annotations

import contextlib

from ._runtime import JobRuntime

__all__ = ["optional_runtimes"]


def optional_runtimes() -> dict[str, JobRuntime]:
    """``docker``, ``kubernetes``, ``tfjob`` and ``pytorchjob``, those that can be set up."""
    runtimes: dict[str, JobRuntime] = {}
    with contextlib.suppress(ImportError):
        from ._docker import DockerRuntime

        runtimes["docker"] = DockerRuntime()
    with contextlib.suppress(ImportError):
        from ._kubernetes import KubernetesJobRuntime, TrainingJobRuntime

        runtimes["kubernetes"] = KubernetesJobRuntime()
        runtimes["tfjob"] = TrainingJobRuntime(kind="TFJob")
        runtimes["pytorchjob"] = TrainingJobRuntime(kind="PyTorchJob")
    return runtimes
