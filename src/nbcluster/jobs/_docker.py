"""The ``docker`` runtime: a job runs in a container of its image, on the worker's host.

Who calls what:

* **The worker** (host daemon) picks :class:`DockerRuntime` for ``JobSpec.runtime ==
  "docker"``, calls :meth:`DockerRuntime.check` before it accepts the job and
  :meth:`DockerRuntime.start` with the job's directory (inputs already there) and its
  environment (the job's ``env`` merged with the platform's ``NBCLUSTER_*`` variables, and the
  GPUs it bound in ``NBCLUSTER_GPUS`` / ``CUDA_VISIBLE_DEVICES``). It awaits the returned
  handle's ``wait()`` for the exit code and calls ``cancel()`` on request or timeout.
* This module calls the official Docker SDK (``docker.DockerClient``) only: ``containers.run``,
  then ``logs``/``wait``/``stop``/``remove`` on the container. The SDK is imported when a
  client is first needed (no daemon is needed to import this module), and its blocking calls
  run in threads so that the worker's event loop keeps going.

The job's directory is bind-mounted at ``/job`` (the container's working directory), so the
outputs it writes there are collected by the worker as for the process runtime. A source job
runs ``python /job/job.py``: the image must have ``python`` on its ``PATH``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .. import envvars
from ._model import JobSpec
from ._runtime import JobHandle

__all__ = ["CONTAINER_WORKDIR", "DockerRuntime", "container_env", "gpu_ids"]

log = logging.getLogger(__name__)

#: Where the job's directory is mounted in the container (and its working directory).
CONTAINER_WORKDIR = "/job"

#: The variables through which the worker passes the GPUs it bound to the job.
GPU_ENV = (envvars.GPUS.name, envvars.CUDA_VISIBLE_DEVICES.name)

#: How long ``wait()`` waits for the end of the log stream once the container exited.
_LOG_DRAIN_TIMEOUT = 10.0


def _docker() -> Any:
    """The ``docker`` package, imported on first use (``Any``: it is untyped)."""
    return importlib.import_module("docker")


def _default_client() -> Any:
    return _docker().from_env()


def gpu_ids(env: Mapping[str, str]) -> list[str]:
    """The GPUs the worker bound to the job, from ``NBCLUSTER_GPUS`` (the host's device
    indices) or else ``CUDA_VISIBLE_DEVICES`` ("0,2" → ``["0", "2"]``; UUIDs pass through)."""
    for name in GPU_ENV:
        value = env.get(name)
        if value and value.strip():
            return [part.strip() for part in value.split(",") if part.strip()]
    return []


def container_env(
    spec: JobSpec, env: Mapping[str, str], *, keep: Iterable[str] = ()
) -> dict[str, str]:
    """The environment of a job's container: the job's own variables (``spec.env``, with the
    values the worker put in ``env``), the platform's ``NBCLUSTER_*`` ones and the names in
    ``keep``. The rest of the worker's environment (its ``PATH``, ``HOME``, virtualenv...)
    describes the host, not the image, and is left out."""
    kept = set(keep)
    out = dict(spec.env)
    for name, value in env.items():
        if name in spec.env or name in kept or name.startswith(envvars.PREFIX):
            out[name] = value
    return out


class _LogPump:
    """Copies a container's log stream (an iterator of byte chunks) into ``log_path`` from a
    daemon thread, flushing each chunk so that the log can be followed."""

    def __init__(self, stream: Iterable[bytes], log_path: Path) -> None:
        self._stream = stream
        self._log_path = log_path
        self._thread = threading.Thread(target=self._run, name="nbcluster-docker-logs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        with self._log_path.open("ab") as out:
            try:
                for chunk in self._stream:
                    out.write(chunk if isinstance(chunk, bytes) else str(chunk).encode())
                    out.flush()
            except Exception as exc:  # the engine went away: say so where the user looks
                out.write(f"\n[nbcluster] container log stream ended: {exc}\n".encode())


class _DockerHandle:
    """A started container. ``wait()`` and ``cancel()`` are called by the worker."""

    def __init__(self, container: Any, pump: _LogPump, log_path: Path) -> None:
        self._container = container
        self._pump = pump
        self._log_path = log_path
        self._removed = False

    async def wait(self) -> int:
        """The container's exit status (Docker's ``StatusCode``: a container killed by a
        signal ends with 128 + the signal number, e.g. 137 for SIGKILL). The container is
        removed once its output has been copied."""
        result = await asyncio.to_thread(self._container.wait)
        code = int(result.get("StatusCode", 1)) if isinstance(result, Mapping) else int(result)
        error = result.get("Error") if isinstance(result, Mapping) else None
        await asyncio.to_thread(self._pump.join, _LOG_DRAIN_TIMEOUT)
        if error:
            message = error.get("Message") if isinstance(error, Mapping) else error
            if message:
                with self._log_path.open("a") as out:
                    out.write(f"\n[nbcluster] docker: {message}\n")
        await asyncio.to_thread(self._remove)
        return code

    async def cancel(self, grace: float = 5.0) -> None:
        """``docker stop`` (SIGTERM, SIGKILL after ``grace`` seconds), then remove it."""
        try:
            await asyncio.to_thread(self._container.stop, timeout=max(0, round(grace)))
        except Exception as exc:  # already gone, or the engine refused: remove it anyway
            log.warning("docker: stopping container %s: %s", self._container_id, exc)
        await asyncio.to_thread(self._remove)

    @property
    def _container_id(self) -> str:
        return str(getattr(self._container, "id", "?"))

    def _remove(self) -> None:
        if self._removed:
            return
        try:
            self._container.remove(force=True)
        except Exception as exc:  # removed concurrently (wait and cancel), or already gone
            log.debug("docker: removing container %s: %s", self._container_id, exc)
        self._removed = True


class DockerRuntime:
    """Runs each job in a detached container of ``spec.image`` (runtime name ``docker``).

    ``client_factory`` makes the ``docker.DockerClient`` (default ``docker.from_env``: the
    ``DOCKER_HOST`` of the worker's environment, else the local socket); it is called at the
    first :meth:`start`, and the client is kept for later jobs.
    """

    name = "docker"

    def __init__(self, client_factory: Callable[[], Any] | None = None) -> None:
        self._client_factory = client_factory or _default_client
        self._client: Any = None
        self._lock = threading.Lock()

    def check(self, spec: JobSpec) -> None:
        """Raise ``ValueError`` naming the field if a container cannot run ``spec``."""
        if not spec.image:
            raise ValueError("image: required by the docker runtime (the container's image)")
        if spec.workers > 1:
            raise ValueError("workers: the docker runtime runs one container per job")

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    self._client = self._client_factory()
                except Exception as exc:
                    raise RuntimeError(f"docker: cannot reach the Docker engine: {exc}") from exc
            return self._client

    def run_kwargs(
        self, job_id: str, spec: JobSpec, workdir: Path, env: Mapping[str, str]
    ) -> dict[str, Any]:
        """The keyword arguments of ``client.containers.run`` for this job (writes
        ``workdir/job.py`` for a source job)."""
        self.check(spec)
        if spec.command is not None:
            argv = list(spec.command)
        else:
            (workdir / "job.py").write_text(spec.source or "")
            argv = ["python", f"{CONTAINER_WORKDIR}/job.py"]
        environment = container_env(spec, env, keep=GPU_ENV)
        kwargs: dict[str, Any] = {
            "image": spec.image,
            "command": argv,
            "environment": environment,
            "working_dir": CONTAINER_WORKDIR,
            "volumes": {str(workdir.resolve()): {"bind": CONTAINER_WORKDIR, "mode": "rw"}},
            "detach": True,
            "labels": {"nbcluster.job": job_id},
            "mem_limit": f"{spec.resources.memory_mb}m",
            "nano_cpus": int(spec.resources.cpus * 1e9),
        }
        devices = gpu_ids(env)
        if devices:
            docker = _docker()
            kwargs["device_requests"] = [
                docker.types.DeviceRequest(device_ids=devices, capabilities=[["gpu"]])
            ]
            # Inside the container the devices it was given are numbered from 0; the host's
            # indices stay in NBCLUSTER_GPUS (what nbcluster.runtime.gpus() reports).
            environment[envvars.CUDA_VISIBLE_DEVICES.name] = ",".join(
                str(i) for i in range(len(devices))
            )
            environment[envvars.GPUS.name] = ",".join(devices)
        elif spec.resources.gpus > 0:
            raise ValueError(
                f"resources.gpus: the job asks for {spec.resources.gpus} GPU(s) but the worker "
                "bound none (NBCLUSTER_GPUS / CUDA_VISIBLE_DEVICES are empty)"
            )
        return kwargs

    async def start(
        self, job_id: str, spec: JobSpec, workdir: Path, env: dict[str, str], log_path: Path
    ) -> JobHandle:
        """Start the job's container and the copy of its output into ``log_path``.

        Raises ``ValueError`` naming the field for a job that cannot run (no image, image not
        found, GPUs asked but not bound) and ``RuntimeError`` when the engine cannot be
        reached or refuses the container.
        """
        kwargs = await asyncio.to_thread(self.run_kwargs, job_id, spec, workdir, env)
        client = await asyncio.to_thread(self._get_client)
        docker = _docker()
        try:
            container = await asyncio.to_thread(client.containers.run, **kwargs)
        except docker.errors.ImageNotFound as exc:
            raise ValueError(f"image: {spec.image!r} not found: {exc.explanation}") from None
        except docker.errors.DockerException as exc:
            raise RuntimeError(f"docker: cannot start the job's container: {exc}") from exc
        try:
            stream = await asyncio.to_thread(container.logs, stream=True, follow=True)
        except Exception:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(container.remove, force=True)
            raise
        pump = _LogPump(stream, log_path)
        pump.start()
        return _DockerHandle(container, pump, log_path)
