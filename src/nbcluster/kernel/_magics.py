"""Ciao-style job magics of the replica kernel: ``%%job`` runs a cell as a batch job on the
cluster and streams its output back into the cell; ``%jobs`` lists this kernel's jobs.

:class:`~nbcluster.kernel._kernel.ReplicaKernel` registers :class:`JobMagics` when it starts.
The magics talk to the gateway's job API (``/api/jobs``, see ``gateway/_jobs_api.py``) with a
synchronous httpx client, at the URL and with the token the gateway gave the replica in its
environment (``NBCLUSTER_GATEWAY_URL``, ``NBCLUSTER_GATEWAY_TOKEN``; set by the gateway's
``gateway._replicas.Replicas.launch_spec``). Jobs are owned by the kernel (``NBCLUSTER_KERNEL_ID``).

How a ``%%job`` cell ends:

* the job succeeded: its declared outputs are downloaded into the kernel's current directory,
  the job's record is ``_job`` (a dict) in the user namespace, and the cell succeeds;
* the job failed or was cancelled elsewhere: status, exit code and error go to stderr and the
  cell fails with a one-line :class:`JobError` (no traceback), so that "run all" stops there;
* the user interrupted the cell: they are asked whether to cancel the job or to detach from
  it (detach when the frontend cannot answer ``input()``); either way the cell then fails with
  a one-line :class:`JobError`, as an interrupted cell does, and ``_job`` holds the record.
"""

from __future__ import annotations

import codecs
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from .. import envvars
from ..hostproto import check_pool

# httpx is imported where the magics use it: every replica loads this module, and httpx
# costs ~6 MB of memory in each, for kernels that may never submit a job.
if TYPE_CHECKING:
    import httpx

__all__ = ["JobError", "JobMagics", "parse_job_options"]

PREFIX = "[nbcluster]"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
#: How long the log stream may stay broken (gateway restarting ...) before the cell gives up.
RECONNECT_WINDOW = 60.0

_FRAMEWORKS = {"pytorch": "pytorchjob", "tensorflow": "tfjob"}


class JobError(Exception):
    """A ``%%job`` cell that did not end with a succeeded job. IPython shows it as one line
    (``_render_traceback_``), not as a traceback. ``status``: the gateway's HTTP status when
    it refused a request."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


# -- options ----------------------------------------------------------------------------------


def _int(low: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        value = int(text)
        if value < low:
            raise ValueError(f"must be at least {low}")
        return value

    return convert


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number")
    return value


def _word(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text


def _framework(text: str) -> str:
    if text not in _FRAMEWORKS:
        raise ValueError(f"must be one of {', '.join(sorted(_FRAMEWORKS))}")
    return text


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    for name in names:
        parts = name.split("/")
        if not name or name.startswith("/") or ".." in parts or "" in parts:
            raise ValueError(f"{name!r} is not a relative path inside the job's directory")
    return names


_OPTIONS: dict[str, tuple[Callable[[str], Any], str]] = {
    "gpus": (_int(0), "N"),
    "cpus": (_positive_float, "F"),
    "memory_mb": (_int(1), "N"),
    "workers": (_int(1), "N"),
    "framework": (_framework, "pytorch|tensorflow"),
    "image": (_word, "IMAGE"),
    "pool": (check_pool, "POOL"),
    "outputs": (_names, "a.pt,b.csv"),
    "name": (str, "NAME"),
    "timeout": (_positive_float, "SECONDS"),
    "retries": (_int(0), "N"),
}

USAGE = "%%job [" + "] [".join(f"{k}={v}" for k, (_, v) in _OPTIONS.items()) + "]"


def parse_job_options(line: str) -> dict[str, Any]:
    """The ``%%job`` line (``key=value`` words) as ``{option: value}``; raises
    :class:`UsageError` naming the option that is unknown or has a bad value."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"%%job: cannot parse the options: {exc}. Usage: {USAGE}") from None
    options: dict[str, Any] = {}
    for word in words:
        key, sep, text = word.partition("=")
        if not sep:
            raise UsageError(f"%%job: expected key=value, got {word!r}. Usage: {USAGE}")
        if key not in _OPTIONS:
            raise UsageError(
                f"%%job: unknown option {key!r}; the options are: {', '.join(_OPTIONS)}"
            )
        if key in options:
            raise UsageError(f"%%job: option {key!r} is given twice")
        convert, form = _OPTIONS[key]
        try:
            options[key] = convert(text)
        except ValueError as exc:
            reason = str(exc)
            if reason.startswith("invalid literal"):
                reason = "not a whole number"
            elif reason.startswith("could not convert"):
                reason = "not a number"
            raise UsageError(
                f"%%job: bad value for option {key!r}: {text!r} ({reason}; expected {key}={form})"
            ) from None
    if "framework" in options and "image" not in options:
        raise UsageError(
            f"%%job: option 'framework' ({options['framework']}) needs option 'image' "
            "(a container image with the framework)"
        )
    if options.get("workers", 1) > 1 and "framework" not in options:
        raise UsageError(
            "%%job: option 'workers' above 1 needs option 'framework' (distributed training)"
        )
    return options


def build_spec(options: dict[str, Any], source: str) -> dict[str, Any]:
    """The ``JobSpec`` (as JSON) of a ``%%job`` cell: ``source`` is the cell's body. Its
    owner and kernel are not in it: the gateway sets them from the kernel's token."""
    framework = options.get("framework")
    if framework is not None:
        runtime = _FRAMEWORKS[framework]
    elif "image" in options:
        runtime = "docker"
    else:
        runtime = "process"
    spec: dict[str, Any] = {"source": source, "runtime": runtime}
    resources = {k: options[k] for k in ("gpus", "cpus", "memory_mb") if k in options}
    if resources:
        spec["resources"] = resources
    for key in ("image", "pool", "workers", "outputs", "name", "timeout", "retries"):
        if key in options:
            spec[key] = options[key]
    return spec


def _queue(job: dict[str, Any]) -> str:
    spec = job.get("spec") or {}
    queue = spec.get("queue")
    if queue:
        return str(queue)
    return "gpu" if (spec.get("resources") or {}).get("gpus") else "cpu"


# -- the magics -------------------------------------------------------------------------------


@magics_class
class JobMagics(Magics):
    """``%%job`` and ``%jobs``. Registered by ``ReplicaKernel.__init__``; ``transport``
    replaces the network (tests give an ``httpx.MockTransport``)."""

    def __init__(self, shell: Any = None, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(shell)
        self._transport = transport

    # -- gateway access -----------------------------------------------------------------------

    def _kernel_id(self) -> str:
        return envvars.KERNEL_ID.get() or ""

    def _client(self) -> httpx.Client:
        """A client for the gateway that started this kernel; a :class:`UsageError` if none."""
        import httpx

        url = envvars.GATEWAY_URL.get() or ""
        token = envvars.GATEWAY_TOKEN.get() or ""
        missing = [
            var.name
            for var, value in (
                (envvars.GATEWAY_URL, url),
                (envvars.GATEWAY_TOKEN, token),
                (envvars.KERNEL_ID, self._kernel_id()),
            )
            if not value
        ]
        if missing:
            raise UsageError(
                "this kernel was not started by an nbcluster gateway (it has no "
                f"{', '.join(missing)}), so it cannot submit or list jobs; start it from the "
                "gateway, or use `nbcluster job submit` from a shell"
            )
        # An https gateway is verified with the CA this replica's host verifies it with.
        from .._net import CLIENT_KEEPALIVE_EXPIRY
        from .._tls import client_context

        https = url.startswith("https://")
        return httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"token {token}"},
            timeout=httpx.Timeout(30.0),
            limits=httpx.Limits(keepalive_expiry=CLIENT_KEEPALIVE_EXPIRY),
            transport=self._transport,
            verify=client_context(envvars.GATEWAY_CA.get()) if https else True,
        )

    @staticmethod
    def _check(response: httpx.Response, what: str) -> None:
        import httpx

        if response.status_code < 400:
            return
        message: str | None = None
        try:
            response.read()
            message = response.text.strip() or None
            body = response.json()
            if isinstance(body, dict) and body.get("message"):
                message = str(body["message"])
        except (ValueError, httpx.HTTPError):
            pass  # not JSON (or unreadable): the text, or the reason phrase
        raise JobError(
            f"{what}: the gateway answered {response.status_code}: "
            f"{message or response.reason_phrase}",
            response.status_code,
        )

    def _call(self, client: httpx.Client, method: str, path: str, what: str, **kw: Any) -> Any:
        import httpx

        try:
            response = client.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise JobError(
                f"{what}: cannot reach the gateway at {client.base_url}: {exc}"
            ) from None
        self._check(response, what)
        return response.json()

    # -- %%job --------------------------------------------------------------------------------

    @cell_magic
    def job(self, line: str, cell: str) -> None:
        """Run this cell as a batch job on the cluster and stream its output here.

        Options (``key=value``): gpus=N cpus=F memory_mb=N workers=N
        framework=pytorch|tensorflow image=IMAGE pool=POOL outputs=a.pt,b.csv name=NAME
        timeout=SECONDS retries=N. ``pool`` runs it only on hosts of that pool. ``framework`` runs a distributed training job (PyTorchJob/TFJob, needs
        ``image``); ``image`` alone runs the cell in that container; otherwise it runs as a
        Python process on a worker. Declared outputs are downloaded here when it succeeds; the
        job's record is then ``_job``. Interrupt the cell to cancel the job or detach from it.
        """
        options = parse_job_options(line)
        spec = build_spec(options, cell)
        with self._client() as client:
            job: dict[str, Any] = self._call(client, "POST", "/api/jobs", "submit", json=spec)
            job_id = str(job["id"])
            self._publish(job)
            print(
                f"{PREFIX} job {job_id} submitted to the {_queue(job)} queue; streaming its "
                "output (interrupt to cancel or detach)",
                flush=True,
            )
            try:
                job = self._stream(client, job_id)
            except KeyboardInterrupt:
                self._interrupted(client, job_id)
            self._publish(job)
            self._finish(client, job)

    def _publish(self, job: dict[str, Any]) -> None:
        if self.shell is not None:
            self.shell.user_ns["_job"] = job

    def _stream(self, client: httpx.Client, job_id: str) -> dict[str, Any]:
        """Print the job's output as it comes until the job ends; returns its final record.
        A broken stream (the gateway restarting) is resumed where it stopped."""
        import httpx

        offset = 0
        broken_since: float | None = None
        while True:
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            try:
                with client.stream(
                    "GET",
                    f"/api/jobs/{job_id}/logs",
                    params={"follow": "true", "offset": offset},
                    timeout=httpx.Timeout(30.0, read=None),
                ) as response:
                    self._check(response, f"job {job_id}'s output")
                    for chunk in response.iter_bytes():
                        offset += len(chunk)
                        broken_since = None
                        text = decoder.decode(chunk)
                        if text:
                            sys.stdout.write(text)
                            sys.stdout.flush()
                tail = decoder.decode(b"", final=True)
                if tail:
                    sys.stdout.write(tail)
                    sys.stdout.flush()
                job: dict[str, Any] = self._call(
                    client, "GET", f"/api/jobs/{job_id}", f"job {job_id}"
                )
                if job["status"] in TERMINAL:
                    return job
            except (httpx.TransportError, JobError) as exc:
                if isinstance(exc, JobError) and exc.status is not None and exc.status < 500:
                    raise  # the gateway refused (the job is gone ...): no use retrying
                now = time.monotonic()
                broken_since = now if broken_since is None else broken_since
                if now - broken_since > RECONNECT_WINDOW:
                    raise JobError(
                        f"lost job {job_id}'s output stream and could not resume it: {exc}; "
                        f"it may still run: `nbcluster job logs -f {job_id}`"
                    ) from None
            time.sleep(0.5)

    def _interrupted(self, client: httpx.Client, job_id: str) -> NoReturn:
        """The user interrupted the cell while the job ran: cancel it or detach from it."""
        print(flush=True)
        try:
            answer = input("Cancel the job [c] or detach from it [d]? ").strip().lower()
        except (Exception, KeyboardInterrupt):  # no stdin here (StdinNotImplementedError ...)
            answer = "d"
        if answer.startswith("c"):
            result: dict[str, Any] = self._call(
                client, "POST", f"/api/jobs/{job_id}/cancel", f"cancel job {job_id}", json={}
            )
            self._publish(result["job"])
            print(f"{PREFIX} {result['message']}", flush=True)
            raise JobError(f"job {job_id} cancelled (interrupted)")
        print(
            f"{PREFIX} detached from job {job_id}; it keeps running. Follow it with "
            f"`nbcluster job logs -f {job_id}`, or list this kernel's jobs with %jobs.",
            flush=True,
        )
        raise JobError(f"detached from job {job_id} (interrupted); it keeps running")

    def _finish(self, client: httpx.Client, job: dict[str, Any]) -> None:
        """Report how the job ended; download its outputs when it succeeded."""
        job_id, status = job["id"], job["status"]
        if status != "succeeded":
            exit_code = job.get("exit_code")
            print(
                f"{PREFIX} job {job_id} {status}"
                + (f" (exit code {exit_code})" if exit_code is not None else "")
                + (f": {job['error']}" if job.get("error") else ""),
                file=sys.stderr,
                flush=True,
            )
            raise JobError(f"job {job_id} {status}")
        print(f"{PREFIX} job {job_id} succeeded", flush=True)
        keys: dict[str, str] = job.get("output_keys") or {}
        for name in job["spec"].get("outputs") or []:
            if name not in keys:
                print(
                    f"{PREFIX} job {job_id} did not write output {name!r}",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            target = self._download(client, job_id, name)
            print(f"{PREFIX} output {name} saved to {target}", flush=True)

    def _download(self, client: httpx.Client, job_id: str, name: str) -> Path:
        """Write output ``name`` of the job under the current directory (a temporary file
        first, so that a failed download leaves no half file)."""
        import httpx

        cwd = Path.cwd().resolve()
        target = (cwd / name).resolve()
        if not target.is_relative_to(cwd):
            raise JobError(f"output {name!r} would be written outside {cwd}")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.nbcluster-partial")
        try:
            with client.stream("GET", f"/api/jobs/{job_id}/outputs/{name}") as response:
                self._check(response, f"output {name!r} of job {job_id}")
                with partial.open("wb") as file:
                    for chunk in response.iter_bytes():
                        file.write(chunk)
            partial.replace(target)
        except httpx.TransportError as exc:
            raise JobError(f"output {name!r} of job {job_id}: download failed: {exc}") from None
        finally:
            partial.unlink(missing_ok=True)
        return target

    # -- %jobs --------------------------------------------------------------------------------

    @line_magic
    def jobs(self, line: str = "") -> None:
        """List this kernel's jobs: id, name, status, queue, exit code."""
        if line.strip():
            raise UsageError("%jobs takes no arguments")
        kernel_id = self._kernel_id()
        with self._client() as client:
            jobs: list[dict[str, Any]] = self._call(
                client, "GET", "/api/jobs", "list jobs", params={"kernel_id": kernel_id}
            )
        if not jobs:
            print("no jobs from this kernel")
            return
        print(format_jobs(jobs))


def format_jobs(jobs: list[dict[str, Any]]) -> str:
    """A small text table of jobs (``%jobs``)."""
    rows = [("id", "name", "status", "queue", "exit")]
    for job in jobs:
        exit_code = job.get("exit_code")
        rows.append(
            (
                str(job["id"]),
                str((job.get("spec") or {}).get("name") or ""),
                str(job["status"]),
                _queue(job),
                "" if exit_code is None else str(exit_code),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
