"""The ``docker`` runtime: a job runs in a container of its image, on the worker's host.

Who calls what:

* **The worker** (host daemon) picks :class:`DockerRuntime` for ``JobSpec.runtime ==
  "docker"``, calls :meth:`DockerRuntime.check` before it accepts the job and
  :meth:`DockerRuntime.start` with the job's directory (inputs already there) and its
  environment (the job's ``env`` merged with the platform's ``NBCLUSTER_*`` variables, and the
  GPUs it bound in ``NBCLUSTER_GPUS`` / ``CUDA_VISIBLE_DEVICES``). It awaits the returned
  handle's ``wait()`` for the exit code and calls ``cancel()`` on request or timeout.
* This module calls the official Docker SDK (``docker.DockerClient``) only:
  ``containers.create`` and ``start``, then ``logs``/``wait``/``stop``/``remove`` on the
  container (``images.pull`` when the image is not on the host). The SDK is imported when a
  client is first needed (no daemon is needed to import this module), and its blocking calls
  run in threads so that the worker's event loop keeps going.

What a job's container is (checked against a real engine by
``tests/integration/test_docker_jobs.py``):

* the job's command as its whole argv: it replaces the image's ``ENTRYPOINT`` (as a
  Kubernetes ``command`` does), so that ``["python", "train.py"]`` runs the same in any image;
  a source job runs ``python /job/job.py`` (the image needs ``python`` on its ``PATH``);
* the job's directory bind-mounted at ``/job``, its working directory: inputs are there, and
  the outputs it writes there are collected by the worker as for the process runtime;
* an unprivileged user: the worker's own uid:gid, or uid:gid 1000:1000 when the worker runs
  as root (the job's directory is then handed to that uid), never root;
* the host's network (default), so that a job reaches the gateway and the object store at the
  addresses the worker gave it, loopback included;
* ``init`` (the engine's tini) as PID 1, so that a cancel's SIGTERM reaches the job;
* its memory and CPU limits, and its GPUs as a device request for exactly the devices the
  worker bound (``docker run --gpus device=...``), numbered from 0 inside;
* labels ``nbcluster.job`` (the job id) and ``nbcluster.worker`` (this runtime's id).

A container does not die with its worker by itself, as a job process does
(``PR_SET_PDEATHSIG``): a job whose worker died is run again elsewhere and must not go on
beside its second run. So the first container a runtime starts also starts a *reaper*, a
small process of the worker's (``python -m nbcluster.jobs._docker --reap LABEL PID``) that
gets SIGTERM when the worker dies and then removes every container labelled with this
runtime's ``nbcluster.worker`` id.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .. import envvars
from .._lifeline import set_parent_death_signal
from ._model import JobSpec
from ._runtime import JobHandle

__all__ = [
    "CONTAINER_WORKDIR",
    "LABEL_JOB",
    "LABEL_WORKER",
    "UNPRIVILEGED_USER",
    "DockerRuntime",
    "container_env",
    "gpu_device_requests",
    "gpu_ids",
]

log = logging.getLogger(__name__)

#: Where the job's directory is mounted in the container (and its working directory).
CONTAINER_WORKDIR = "/job"

#: The variables through which the worker passes the GPUs it bound to the job.
GPU_ENV = (envvars.GPUS.name, envvars.CUDA_VISIBLE_DEVICES.name)

#: Labels of every job container: the job's id, and the id of the runtime (worker) that
#: started it, by which its reaper finds it.
LABEL_JOB = "nbcluster.job"
LABEL_WORKER = "nbcluster.worker"

#: The user a job's container runs as when the worker runs as root (the nbcluster image's
#: ``nbcluster`` user; any other image runs it nameless, which works).
UNPRIVILEGED_USER = (1000, 1000)

#: How long ``wait()`` waits for the end of the log stream once the container exited.
_LOG_DRAIN_TIMEOUT = 10.0
#: Docker's own exit status for "the engine failed" (``docker run`` exits 125 too).
_ENGINE_ERROR = 125


def _docker() -> Any:
    """The ``docker`` package, imported on first use (``Any``: it is untyped)."""
    return importlib.import_module("docker")


def _default_client() -> Any:
    # "auto": the engine's API version, so that a newer SDK talks to an older engine (Debian's
    # 20.10 speaks 1.41).
    return _docker().from_env(version="auto")


def gpu_ids(env: Mapping[str, str]) -> list[str]:
    """The GPUs the worker bound to the job, from ``NBCLUSTER_GPUS`` (the host's device
    indices) or else ``CUDA_VISIBLE_DEVICES`` ("0,2" → ``["0", "2"]``; UUIDs pass through)."""
    for name in GPU_ENV:
        value = env.get(name)
        if value and value.strip():
            return [part.strip() for part in value.split(",") if part.strip()]
    return []


def gpu_device_requests(devices: list[str]) -> list[Any]:
    """The device requests of a container given exactly ``devices`` (what ``docker run
    --gpus '"device=0,2"'`` sends): one request, those ids, the ``gpu`` capability, no count
    and no driver (the engine picks the one that offers ``gpu``, NVIDIA's)."""
    if not devices:
        return []
    return [_docker().types.DeviceRequest(device_ids=list(devices), capabilities=[["gpu"]])]


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
    """A started container. ``wait()`` and ``cancel()`` are called by the worker, in any
    order and any number of times: one task waits for the container's end, copies the rest of
    its output, removes it and keeps its exit status for every caller."""

    def __init__(self, container: Any, pump: _LogPump, log_path: Path) -> None:
        self._container = container
        self._pump = pump
        self._log_path = log_path
        self._removed = False
        self._ended: asyncio.Task[int] = asyncio.create_task(self._watch())

    async def wait(self) -> int:
        """The container's exit status (Docker's ``StatusCode``: a container killed by a
        signal ends with 128 + the signal number, e.g. 137 for SIGKILL; 125 when the engine
        lost it, said in the log). The container is removed once its output has been
        copied."""
        # Shielded: the worker's timeout cancels this wait, not the watch behind it.
        return await asyncio.shield(self._ended)

    async def cancel(self, grace: float = 5.0) -> None:
        """``docker stop`` (SIGTERM, SIGKILL after ``grace`` seconds); once it ended, its
        status is what ``wait()`` returns, and it is removed."""
        if not self._ended.done():
            try:
                await asyncio.to_thread(self._container.stop, timeout=max(0, round(grace)))
            except Exception as exc:  # already gone, or the engine refused
                log.warning("docker: stopping container %s: %s", self._container_id, exc)
            try:
                await asyncio.wait_for(asyncio.shield(self._ended), grace + _LOG_DRAIN_TIMEOUT)
            except TimeoutError:  # the engine did not stop it: force it out
                await asyncio.to_thread(self._remove)
        await asyncio.to_thread(self._remove)

    async def _watch(self) -> int:
        try:
            result = await asyncio.to_thread(self._container.wait)
        except Exception as exc:  # removed behind our back, or the engine went away
            await asyncio.to_thread(self._pump.join, _LOG_DRAIN_TIMEOUT)
            self._note(f"lost the container {self._container_id}: {exc}")
            await asyncio.to_thread(self._remove)
            return _ENGINE_ERROR
        code = int(result.get("StatusCode", 1)) if isinstance(result, Mapping) else int(result)
        error = result.get("Error") if isinstance(result, Mapping) else None
        await asyncio.to_thread(self._pump.join, _LOG_DRAIN_TIMEOUT)
        if error:
            message = error.get("Message") if isinstance(error, Mapping) else error
            if message:
                self._note(str(message))
        await asyncio.to_thread(self._remove)
        return code

    def _note(self, message: str) -> None:
        with self._log_path.open("a") as out:
            out.write(f"\n[nbcluster] docker: {message}\n")

    @property
    def _container_id(self) -> str:
        return str(getattr(self._container, "id", "?"))[:12]

    def _remove(self) -> None:
        if self._removed:
            return
        try:
            self._container.remove(force=True)
        except Exception as exc:  # removed concurrently (wait and cancel), or already gone
            log.debug("docker: removing container %s: %s", self._container_id, exc)
        self._removed = True


class DockerRuntime:
    """Runs each job in a container of ``spec.image`` (runtime name ``docker``).

    ``client_factory`` makes the ``docker.DockerClient`` (default ``docker.from_env``: the
    ``DOCKER_HOST`` of the worker's environment, else the local socket); it is called at the
    first :meth:`start`, and the client is kept for later jobs. ``network`` is the containers'
    network mode (default ``host``). ``user`` is the ``uid:gid`` they run as (default: the
    worker's, or :data:`UNPRIVILEGED_USER` for a root worker). ``reaper`` (default: on with
    the default client) removes this runtime's containers when the worker dies.
    """

    name = "docker"

    def __init__(
        self,
        client_factory: Callable[[], Any] | None = None,
        *,
        network: str | None = "host",
        user: tuple[int, int] | None = None,
        reaper: bool | None = None,
    ) -> None:
        self._client_factory = client_factory or _default_client
        self._client: Any = None
        self._lock = threading.Lock()
        self._network = network
        if user is None:
            uid, gid = os.getuid(), os.getgid()
            user = UNPRIVILEGED_USER if uid == 0 else (uid, gid)
        self.user = user
        #: This runtime's id, the ``nbcluster.worker`` label of its containers.
        self.worker_id = uuid.uuid4().hex[:16]
        # The reaper runs its own client from the worker's environment: only when that is
        # the client used here.
        self._want_reaper = client_factory is None if reaper is None else reaper
        self._reaper: asyncio.subprocess.Process | None = None
        #: Made in the event loop at the first start: jobs that start together start one.
        self._reaper_lock: asyncio.Lock | None = None

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

    def create_kwargs(
        self, job_id: str, spec: JobSpec, workdir: Path, env: Mapping[str, str]
    ) -> dict[str, Any]:
        """The keyword arguments of ``client.containers.create`` for this job (writes
        ``workdir/job.py`` for a source job)."""
        self.check(spec)
        if spec.command is not None:
            argv = list(spec.command)
        else:
            (workdir / "job.py").write_text(spec.source or "")
            argv = ["python", f"{CONTAINER_WORKDIR}/job.py"]
        environment = container_env(spec, env, keep=GPU_ENV)
        uid, gid = self.user
        kwargs: dict[str, Any] = {
            "image": spec.image,
            # The whole argv, whatever the image's ENTRYPOINT (the nbcluster image's is
            # `nbcluster`): a job's command means the same in every image.
            "entrypoint": argv[:1],
            "command": argv[1:],
            "environment": environment,
            "working_dir": CONTAINER_WORKDIR,
            "volumes": {str(workdir.resolve()): {"bind": CONTAINER_WORKDIR, "mode": "rw"}},
            "labels": {LABEL_JOB: job_id, LABEL_WORKER: self.worker_id},
            "user": f"{uid}:{gid}",
            # tini as PID 1: a process that is PID 1 ignores SIGTERM unless it handles it, and
            # a cancel would always wait for its SIGKILL.
            "init": True,
            "mem_limit": f"{spec.resources.memory_mb}m",
            "nano_cpus": int(spec.resources.cpus * 1e9),
        }
        if self._network:
            kwargs["network_mode"] = self._network
        devices = gpu_ids(env)
        if devices:
            kwargs["device_requests"] = gpu_device_requests(devices)
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

    def _give_workdir(self, workdir: Path) -> None:
        """Hand the job's directory to the container's user when the worker is root (it
        stays readable, and removable, by the worker)."""
        uid, gid = self.user
        if os.getuid() != 0 or (uid, gid) == (0, 0):
            return
        for path in (workdir, *workdir.rglob("*")):
            os.chown(path, uid, gid, follow_symlinks=False)

    async def start(
        self, job_id: str, spec: JobSpec, workdir: Path, env: dict[str, str], log_path: Path
    ) -> JobHandle:
        """Start the job's container and the copy of its output into ``log_path``.

        Raises ``ValueError`` naming the field for a job that cannot run (no image, image not
        found, GPUs asked but not bound) and ``RuntimeError`` when the engine cannot be
        reached or refuses the container (the engine's reason in the message, e.g. no GPU
        driver for a device request).
        """
        kwargs = await asyncio.to_thread(self.create_kwargs, job_id, spec, workdir, env)
        await asyncio.to_thread(self._give_workdir, workdir)
        client = await asyncio.to_thread(self._get_client)
        await self._start_reaper()
        docker = _docker()
        container = await self._create(client, kwargs)
        try:
            await asyncio.to_thread(container.start)
            stream = await asyncio.to_thread(container.logs, stream=True, follow=True)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(container.remove, force=True)
            if isinstance(exc, docker.errors.APIError):
                raise RuntimeError(
                    f"docker: the engine could not start the job's container: "
                    f"{exc.explanation or exc}"
                ) from None
            raise
        pump = _LogPump(stream, log_path)
        pump.start()
        return _DockerHandle(container, pump, log_path)

    async def _create(self, client: Any, kwargs: dict[str, Any]) -> Any:
        """``containers.create``, pulling the image first when the engine does not have it."""
        docker = _docker()
        image = kwargs["image"]
        try:
            try:
                return await asyncio.to_thread(client.containers.create, **kwargs)
            except docker.errors.ImageNotFound:
                log.info("docker: pulling %s", image)
                try:
                    await asyncio.to_thread(client.images.pull, image)
                except docker.errors.DockerException as exc:
                    raise ValueError(
                        f"image: {image!r} is not on this host and could not be pulled: "
                        f"{getattr(exc, 'explanation', None) or exc}"
                    ) from None
                return await asyncio.to_thread(client.containers.create, **kwargs)
        except docker.errors.ImageNotFound as exc:
            raise ValueError(f"image: {image!r} not found: {exc.explanation}") from None
        except docker.errors.DockerException as exc:
            raise RuntimeError(f"docker: cannot create the job's container: {exc}") from exc

    async def _start_reaper(self) -> None:
        """Start the reaper once (from the event loop's thread: the parent-death signal is
        tied to the thread that forks)."""
        if not self._want_reaper:
            return
        if self._reaper_lock is None:
            self._reaper_lock = asyncio.Lock()
        async with self._reaper_lock:
            if self._reaper is not None and self._reaper.returncode is None:
                return
            self._reaper = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                __name__,
                "--reap",
                self.worker_id,
                str(os.getpid()),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                preexec_fn=_arm_reaper,
            )


#: The signals that tell the reaper its worker is gone (the parent-death signal is SIGTERM).
_REAPER_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def _arm_reaper() -> None:
    """In the reaper's process, before it runs Python: SIGTERM when the worker dies, and the
    signals blocked (the mask survives exec) so that one coming while the interpreter starts
    waits for ``sigwait`` instead of killing the reaper before it has reaped anything."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _REAPER_SIGNALS)
    set_parent_death_signal(signal.SIGTERM)


def _reap(worker_id: str, worker_pid: int) -> int:
    """The reaper's life: wait for the worker's death (SIGTERM), then remove its containers."""
    # Blocked already (_arm_reaper), and again for a reaper started by hand: awaited, a
    # signal that came at any moment since the fork is not lost.
    signal.pthread_sigmask(signal.SIG_BLOCK, _REAPER_SIGNALS)
    if os.getppid() == worker_pid:  # else it died before the death signal was armed
        signal.sigwait(_REAPER_SIGNALS)
    try:
        client = _default_client()
        found = client.containers.list(all=True, filters={"label": f"{LABEL_WORKER}={worker_id}"})
        for container in found:
            with contextlib.suppress(Exception):
                container.remove(force=True)
    except Exception as exc:
        print(f"nbcluster docker reaper: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--reap":
        sys.exit(_reap(sys.argv[2], int(sys.argv[3])))
    print("usage: python -m nbcluster.jobs._docker --reap WORKER_ID PID", file=sys.stderr)
    sys.exit(2)
