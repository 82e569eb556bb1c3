"""``%%job`` and ``%jobs`` (``nbcluster.kernel._magics``) in an IPython shell, against a fake
job API behind ``httpx.MockTransport``: option parsing, the spec sent, streamed output, outputs
downloaded, ``_job``, failures, the interrupt (cancel / detach) and the ``%jobs`` table."""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from IPython.core.error import StdinNotImplementedError, UsageError
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

from nbcluster.jobs import JobSpec
from nbcluster.kernel import _magics
from nbcluster.kernel._magics import JobError, JobMagics, build_spec, parse_job_options

KERNEL_ID = "k-1234"


class FakeJobApi:
    """The gateway's job API, enough for the magics: one job at a time."""

    def __init__(self) -> None:
        self.submitted: list[dict[str, Any]] = []
        self.cancelled: list[str] = []
        self.log_requests: list[dict[str, str]] = []
        self.list_params: list[dict[str, str]] = []
        self.headers: list[httpx.Headers] = []
        #: What each follow request streams, in turn (an exception instance is raised there).
        self.streams: list[list[bytes | BaseException]] = [[b"hello\n", b"world\n"]]
        self.final: dict[str, Any] = {"status": "succeeded", "exit_code": 0}
        #: Statuses GET /api/jobs/{id} answers before ``final`` (a stream that broke early).
        self.interim: list[str] = []
        self.outputs: dict[str, bytes] = {}
        self.jobs: list[dict[str, Any]] = []
        self.submit_error: tuple[int, str] | None = None

    def job(self, **changes: Any) -> dict[str, Any]:
        spec = self.submitted[-1]
        record = {
            "id": "job-1",
            "spec": JobSpec.model_validate(spec).model_dump(mode="json"),
            "status": "queued",
            "attempts": 0,
            "worker": None,
            "exit_code": None,
            "error": "",
            "log_tail": "",
            "output_keys": {},
            "result": None,
        }
        return record | changes

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.headers.append(request.headers)
        path, method = request.url.path, request.method
        if method == "POST" and path == "/api/jobs":
            if self.submit_error:
                status, message = self.submit_error
                return httpx.Response(status, json={"message": message})
            body = json.loads(request.content)
            JobSpec.model_validate(body)  # what the gateway would accept
            self.submitted.append(body)
            return httpx.Response(201, json=self.job())
        if method == "GET" and path == "/api/jobs":
            self.list_params.append(dict(request.url.params))
            return httpx.Response(200, json=self.jobs)
        if method == "GET" and path == "/api/jobs/job-1/logs":
            self.log_requests.append(dict(request.url.params))
            return httpx.Response(200, content=self._chunks(self.streams.pop(0)))
        if method == "GET" and path == "/api/jobs/job-1":
            if self.interim:
                return httpx.Response(200, json=self.job(status=self.interim.pop(0)))
            keys = {n: f"jobs/outputs/job-1/{n}" for n in self.outputs}
            return httpx.Response(200, json=self.job(output_keys=keys, **self.final))
        if method == "POST" and path == "/api/jobs/job-1/cancel":
            self.cancelled.append("job-1")
            return httpx.Response(
                200, json={"job": self.job(status="cancelled"), "message": "job job-1 cancelled"}
            )
        if method == "GET" and path.startswith("/api/jobs/job-1/outputs/"):
            name = path.removeprefix("/api/jobs/job-1/outputs/")
            return httpx.Response(200, content=self.outputs[name])
        return httpx.Response(404, json={"message": f"no route {method} {path}"})

    @staticmethod
    def _chunks(items: list[bytes | BaseException]) -> Iterator[bytes]:
        for item in items:
            if isinstance(item, BaseException):
                raise item
            yield item


@pytest.fixture(scope="module")
def shell() -> InteractiveShell:
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell: InteractiveShell = InteractiveShell.instance(config=config)
    return shell


@pytest.fixture
def api(
    shell: InteractiveShell, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[FakeJobApi]:
    fake = FakeJobApi()
    monkeypatch.setenv("NBCLUSTER_GATEWAY_URL", "http://gateway.test:8889")
    monkeypatch.setenv("NBCLUSTER_GATEWAY_TOKEN", "secret")
    monkeypatch.setenv("NBCLUSTER_KERNEL_ID", KERNEL_ID)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(_magics.time, "sleep", lambda _s: None)
    shell.register_magics(JobMagics(shell, transport=httpx.MockTransport(fake.handler)))
    shell.user_ns.pop("_job", None)
    yield fake


def run_job(shell: InteractiveShell, line: str, body: str = "print('hi')\n") -> None:
    shell.run_cell_magic("job", line, body)


# -- options and spec -------------------------------------------------------------------------


def test_options_build_the_spec() -> None:
    options = parse_job_options(
        "gpus=2 cpus=0.5 memory_mb=2048 outputs=a.pt,sub/b.csv name='my run' timeout=60 retries=2"
    )
    spec = build_spec(options, "print(1)\n")
    assert spec == {
        "source": "print(1)\n",
        "runtime": "process",
        "resources": {"gpus": 2, "cpus": 0.5, "memory_mb": 2048},
        "outputs": ["a.pt", "sub/b.csv"],
        "name": "my run",
        "timeout": 60.0,
        "retries": 2,
    }
    assert JobSpec.model_validate(spec).queue_name == "gpu"
    assert build_spec({}, "1") == {"source": "1", "runtime": "process"}


@pytest.mark.parametrize(
    ("line", "runtime"),
    [
        ("framework=pytorch image=torch:2 workers=4", "pytorchjob"),
        ("framework=tensorflow image=tf:2", "tfjob"),
        ("image=python:3.11-slim", "docker"),
        ("", "process"),
    ],
)
def test_runtime_follows_framework_and_image(line: str, runtime: str) -> None:
    spec = build_spec(parse_job_options(line), "1")
    assert spec["runtime"] == runtime
    JobSpec.model_validate(spec)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("bogus=1", "unknown option 'bogus'"),
        ("gpus", "expected key=value, got 'gpus'"),
        ("gpus=-1", "option 'gpus': '-1' (must be at least 0"),
        ("gpus=two", "option 'gpus': 'two' (not a whole number"),
        ("cpus=0", "option 'cpus'"),
        ("cpus=lots", "option 'cpus': 'lots' (not a number"),
        ("memory_mb=0", "option 'memory_mb'"),
        ("workers=0", "option 'workers'"),
        ("framework=jax image=x", "option 'framework': 'jax' (must be one of pytorch, tensorflow"),
        ("image=", "option 'image'"),
        ("outputs=../x.pt", "option 'outputs'"),
        ("outputs=a,,b", "option 'outputs'"),
        ("timeout=-5", "option 'timeout'"),
        ("timeout=inf", "option 'timeout'"),
        ("retries=1.5", "option 'retries'"),
        ("gpus=1 gpus=2", "option 'gpus' is given twice"),
        ("framework=pytorch", "option 'framework' (pytorch) needs option 'image'"),
        ("workers=2", "option 'workers' above 1 needs option 'framework'"),
        ("name='unclosed", "cannot parse the options"),
    ],
)
def test_bad_options_are_named_and_nothing_is_submitted(
    shell: InteractiveShell, api: FakeJobApi, line: str, words: str
) -> None:
    with pytest.raises(UsageError) as caught:
        run_job(shell, line)
    assert words in str(caught.value)
    assert api.submitted == []


def test_without_a_gateway_the_error_says_so(
    shell: InteractiveShell, api: FakeJobApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NBCLUSTER_GATEWAY_URL")
    monkeypatch.delenv("NBCLUSTER_GATEWAY_TOKEN")
    with pytest.raises(UsageError, match="not started by an nbcluster gateway") as caught:
        run_job(shell, "")
    assert "NBCLUSTER_GATEWAY_URL, NBCLUSTER_GATEWAY_TOKEN" in str(caught.value)
    with pytest.raises(UsageError, match="not started by an nbcluster gateway"):
        shell.run_line_magic("jobs", "")
    assert api.submitted == []


# -- running a job ----------------------------------------------------------------------------


def test_a_job_streams_downloads_outputs_and_sets_job(
    shell: InteractiveShell,
    api: FakeJobApi,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    api.outputs = {"model.pt": b"\x00weights", "sub/metrics.csv": b"loss\n0.1\n"}
    api.streams = [[b"epoch 1\n", "caf\u00e9 ".encode()[:4], "caf\u00e9 ".encode()[4:], b"done\n"]]
    run_job(shell, "gpus=1 outputs=model.pt,sub/metrics.csv name=train", "train()\n")
    [spec] = api.submitted
    assert spec["source"] == "train()\n" and "owner" not in spec
    assert spec["resources"] == {"gpus": 1} and spec["outputs"] == ["model.pt", "sub/metrics.csv"]
    assert api.headers[0]["authorization"] == "token secret"
    assert api.log_requests == [{"follow": "true", "offset": "0"}]
    out = capsys.readouterr()
    assert out.out.startswith(
        "[nbcluster] job job-1 submitted to the gpu queue; streaming its output "
        "(interrupt to cancel or detach)\nepoch 1\ncaf\u00e9 done\n"
    )
    assert "[nbcluster] job job-1 succeeded" in out.out
    assert f"output model.pt saved to {tmp_path / 'model.pt'}" in out.out
    assert (tmp_path / "model.pt").read_bytes() == b"\x00weights"
    assert (tmp_path / "sub" / "metrics.csv").read_text() == "loss\n0.1\n"
    assert not list(tmp_path.rglob("*.nbcluster-partial"))
    job = shell.user_ns["_job"]
    assert isinstance(job, dict) and job["status"] == "succeeded" and job["id"] == "job-1"
    assert out.err == ""


def test_a_broken_stream_resumes_at_its_offset(
    shell: InteractiveShell, api: FakeJobApi, capsys: pytest.CaptureFixture[str]
) -> None:
    api.streams = [[b"abc", httpx.ReadError("gateway went away")], [b"def\n"]]
    api.interim = []
    run_job(shell, "")
    assert api.log_requests == [
        {"follow": "true", "offset": "0"},
        {"follow": "true", "offset": "3"},
    ]
    assert "abcdef\n" in capsys.readouterr().out
    # A stream that ended while the job still runs (the gateway restarted) is followed again.
    api.streams = [[b"one\n"], [b"two\n"]]
    api.interim = ["running"]
    api.log_requests.clear()
    run_job(shell, "")
    assert [r["offset"] for r in api.log_requests] == ["0", "4"]
    assert "one\ntwo\n" in capsys.readouterr().out


def test_a_failed_job_reports_on_stderr_and_fails_the_cell_in_one_line(
    shell: InteractiveShell, api: FakeJobApi, capsys: pytest.CaptureFixture[str]
) -> None:
    api.streams = [[b"oops\n"]]
    api.final = {"status": "failed", "exit_code": 3, "error": "exited with code 3"}
    with pytest.raises(JobError, match="job job-1 failed"):
        run_job(shell, "outputs=x.txt")
    out = capsys.readouterr()
    assert "[nbcluster] job job-1 failed (exit code 3): exited with code 3" in out.err
    assert shell.user_ns["_job"]["status"] == "failed"
    assert not Path("x.txt").exists()
    # Through a whole cell: the error is one line, not a traceback.
    api.streams = [[b"oops\n"]]
    result = shell.run_cell("%%job\nimport sys; sys.exit(3)\n")
    assert isinstance(result.error_in_exec, JobError)
    shown = capsys.readouterr()
    assert "Traceback" not in shown.out + shown.err
    assert "JobError: job job-1 failed" in shown.out + shown.err


def test_a_refused_submission_names_the_gateways_reason(
    shell: InteractiveShell, api: FakeJobApi
) -> None:
    api.submit_error = (400, "invalid job: image: required by the docker runtime")
    with pytest.raises(JobError, match="answered 400: invalid job: image: required"):
        run_job(shell, "")


# -- interrupting -----------------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["c", "cancel"])
def test_interrupt_then_cancel_cancels_the_job(
    shell: InteractiveShell,
    api: FakeJobApi,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    answer: str,
) -> None:
    prompts: list[str] = []
    monkeypatch.setattr(builtins, "input", lambda p="": prompts.append(p) or answer)
    api.streams = [[b"step 0\n", KeyboardInterrupt()]]
    with pytest.raises(JobError, match="cancelled"):
        run_job(shell, "")
    assert prompts == ["Cancel the job [c] or detach from it [d]? "]
    assert api.cancelled == ["job-1"]
    out = capsys.readouterr().out
    assert "step 0\n" in out and "[nbcluster] job job-1 cancelled" in out
    assert shell.user_ns["_job"]["status"] == "cancelled"


def test_interrupt_then_detach_leaves_the_job_running(
    shell: InteractiveShell,
    api: FakeJobApi,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(builtins, "input", lambda p="": "d")
    api.streams = [[b"step 0\n", KeyboardInterrupt()]]
    with pytest.raises(JobError, match="detached from job job-1"):
        run_job(shell, "")
    assert api.cancelled == []
    out = capsys.readouterr().out
    assert "nbcluster job logs -f job-1" in out and "%jobs" in out
    assert shell.user_ns["_job"]["id"] == "job-1"


@pytest.mark.parametrize("error", [StdinNotImplementedError("no stdin"), EOFError()])
def test_interrupt_without_stdin_detaches(
    shell: InteractiveShell,
    api: FakeJobApi,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
) -> None:
    def no_input(prompt: str = "") -> str:
        raise error

    monkeypatch.setattr(builtins, "input", no_input)
    api.streams = [[KeyboardInterrupt()]]
    with pytest.raises(JobError, match="detached"):
        run_job(shell, "")
    assert api.cancelled == []


# -- %jobs ------------------------------------------------------------------------------------


def test_jobs_lists_this_kernels_jobs_as_a_table(
    shell: InteractiveShell, api: FakeJobApi, capsys: pytest.CaptureFixture[str]
) -> None:
    shell.run_line_magic("jobs", "")
    assert api.list_params == [{"kernel_id": KERNEL_ID}]
    assert capsys.readouterr().out == "no jobs from this kernel\n"
    api.submitted.append({"source": "1", "name": "train", "resources": {"gpus": 1}})
    first = api.job(id="aaaa", status="succeeded", exit_code=0)
    api.submitted.append({"source": "1", "queue": "cpu"})
    second = api.job(id="bbbbbbbb", status="running")
    api.jobs = [first, second]
    shell.run_line_magic("jobs", "")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "name", "status", "queue", "exit"]
    assert lines[1].split() == ["aaaa", "train", "succeeded", "gpu", "0"]
    assert lines[2].split() == ["bbbbbbbb", "running", "cpu"]
    assert lines[1].index("succeeded") == lines[0].index("status") == lines[2].index("running")
