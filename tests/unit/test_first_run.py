"""What a new user meets first (issue 14, "Packaging and the first run"), in the parts that
need no cluster: what `make up` and `make test` install, the JupyterLab line `nbcluster up`
prints, the error of a command that finds no gateway, the size check of a job against the
hosts, how `job submit --follow` ends, which outputs `job outputs` fetches, and following a
job's output across a stream the gateway ended early. The same things against a real cluster
are in tests/integration/test_first_run.py."""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import click
import pytest

from nbcluster.cli import _job as job_cli
from nbcluster.cli import _up
from nbcluster.cli._status import GatewayTarget, not_found_message, resolve_target
from nbcluster.gateway._jobs_api import job_too_big
from nbcluster.jobs import JobSpec
from nbcluster.scheduling import HostView, Resources

ROOT = Path(__file__).resolve().parents[2]

# -- packaging ---------------------------------------------------------------------------------


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_running_needs_no_test_tools_and_the_kernels_get_the_data_science_stack() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    run = _requirement_names(project["dependencies"])
    extras = {k: _requirement_names(v) for k, v in project["optional-dependencies"].items()}
    test_tools = {"torch", "mypy", "moto", "pytest", "ruff", "schemathesis", "hypothesis"}
    assert not run & test_tools, run & test_tools
    assert not (extras["lab"] | extras["datascience"]) & test_tools
    assert {"numpy", "pandas", "matplotlib", "scipy", "scikit-learn"} <= extras["datascience"]
    assert "torch" not in extras["datascience"]
    assert {"jupyterlab", "ipywidgets"} <= extras["lab"]


def _make_dry_run(tmp_path: Path, target: str) -> str:
    """``make -n TARGET`` on a copy of the Makefile and pyproject.toml with its virtual
    environment in ``tmp_path/venv``: the commands make would run, nothing run."""
    make = shutil.which("make")
    assert make is not None, "make is not installed"
    for name in ("Makefile", "pyproject.toml"):
        if not (tmp_path / name).exists():  # once: a later copy is newer than the stamps
            shutil.copy(ROOT / name, tmp_path / name)
    # Not the make that may be running these tests (`make test`): its MAKEFLAGS/MAKELEVEL would
    # make this one a sub-make, which prints "Entering/Leaving directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(
        [make, "--no-print-directory", "-n", target, f"VENV={tmp_path / 'venv'}"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _pip_installs(commands: str) -> list[str]:
    return [line for line in commands.splitlines() if " -m pip install" in line and " -e " in line]


def test_make_up_installs_what_running_needs_with_progress_and_make_test_adds_dev(
    tmp_path: Path,
) -> None:
    venv = tmp_path / "venv"
    # A fresh clone: `make up` creates the environment and installs the run extras, with
    # pip's own output (no --quiet) and a line saying what is installed and that it takes a
    # while.
    up = _make_dry_run(tmp_path, "up")
    assert f"-m venv {venv}" in up
    [install] = _pip_installs(up)
    assert "'.[lab,datascience]'" in install, install
    assert "dev" not in install and "--quiet" not in install and " -q" not in install
    assert "JupyterLab" in up and "a few minutes the first time" in up
    assert up.splitlines()[-1].strip() == f"{venv}/bin/nbcluster up"

    # After `make up` (its stamp written), `make test` installs the dev extra ...
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / ".installed-run").touch()
    test = _make_dry_run(tmp_path, "test")
    [install] = _pip_installs(test)
    assert "'.[dev,lab,datascience]'" in install, install
    assert f"touch {venv}/.installed {venv}/.installed-run" in test
    assert f"-m venv {venv}" not in test

    # ... and once it has (`.installed`: dev installed), neither installs anything.
    (venv / ".installed").touch()
    assert _pip_installs(_make_dry_run(tmp_path, "test")) == []
    assert _pip_installs(_make_dry_run(tmp_path, "up")) == []


# -- the JupyterLab line of `nbcluster up` -----------------------------------------------------


def _fake_env(tmp_path: Path, *commands: str) -> Path:
    """A ``bin`` directory with a ``python`` and the given executables in it."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", *commands):
        path = bin_dir / name
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    return bin_dir


def test_the_connect_line_names_this_environments_jupyter_and_keeps_the_token_off_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = _fake_env(tmp_path, "jupyter", "jupyter-lab")
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    assert _up.venv_jupyter() == bin_dir / "jupyter"
    lines = _up.connect_lines("https://127.0.0.1:8889", "tok en", "/etc/my ca.pem")
    assert lines[0] == "Connect JupyterLab with:"
    assert lines[1] == (
        f"  env JUPYTER_GATEWAY_AUTH_TOKEN='tok en' {bin_dir}/jupyter lab "
        "--gateway-url=https://127.0.0.1:8889 --GatewayClient.ca_certs='/etc/my ca.pem'"
    )
    assert "auth_token" not in lines[1]


def test_without_jupyterlab_the_banner_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # jupyter_core (a dependency) brings `jupyter`, but `jupyter lab` needs JupyterLab.
    bin_dir = _fake_env(tmp_path, "jupyter")
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    assert _up.venv_jupyter() is None
    text = "\n".join(_up.connect_lines("http://127.0.0.1:8889", "t", None))
    assert f"JupyterLab is not installed in {sys.prefix}" in text
    assert f"{bin_dir}/python -m pip install 'nbcluster[lab]'" in text
    assert "env JUPYTER_GATEWAY_AUTH_TOKEN=t jupyter lab --gateway-url=http://127.0.0.1:8889" in (
        text
    )


# -- finding the gateway -----------------------------------------------------------------------


def test_no_gateway_found_names_the_state_dir_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NBCLUSTER_URL", "NBCLUSTER_TOKEN", "NBCLUSTER_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    with pytest.raises(click.UsageError) as raised:
        resolve_target(None, None, None)
    text = raised.value.message
    assert text.startswith(f"no running gateway found in the state directory {tmp_path}/data")
    assert "(the default)" in text
    assert f"{tmp_path}/data/nbcluster/gateway/runtime.json does not exist" in text
    assert "pass --state-dir DIR (or set NBCLUSTER_STATE_DIR) to the directory given to" in text
    assert "--url and --token (or set NBCLUSTER_URL and NBCLUSTER_TOKEN)" in text

    monkeypatch.setenv("NBCLUSTER_STATE_DIR", str(tmp_path / "env"))
    assert "from NBCLUSTER_STATE_DIR" in not_found_message(tmp_path / "env", None, None)
    given = not_found_message(tmp_path / "flag", tmp_path / "flag", None)
    assert f"{tmp_path}/flag (given with --state-dir)" in given
    no_token = not_found_message(tmp_path / "flag", tmp_path / "flag", "http://gw:8889")
    assert no_token.startswith("no token for the gateway at http://gw:8889: pass --token")


def test_an_unreachable_gateway_from_a_runtime_file_says_where_its_address_came_from(
    tmp_path: Path,
) -> None:
    error = ConnectionRefusedError("refused")
    found = GatewayTarget("http://127.0.0.1:1", "t", tmp_path / "gateway" / "runtime.json")
    assert found.unreachable(error).startswith("cannot reach the gateway at http://127.0.0.1:1")
    assert f"its address is from {tmp_path}/gateway/runtime.json" in found.unreachable(error)
    given = GatewayTarget("http://127.0.0.1:1", "t")
    assert given.unreachable(error) == "cannot reach the gateway at http://127.0.0.1:1: refused"


# -- a job larger than every host ---------------------------------------------------------------


def _host(name: str, gpus: int, cpus: int, memory_mb: int) -> HostView:
    return HostView(
        name=name,
        spec=Resources(gpus=gpus, millicpus=cpus * 1000, memory_mb=memory_mb),
        gpu_devices=tuple(range(gpus)),
        pending=Resources(),
        bound=(),
        replicas=(),
        draining=False,
        subscription_ratio=0.0,
    )


def _spec(gpus: int = 0, cpus: float = 1.0, memory_mb: int = 1024) -> JobSpec:
    return JobSpec.model_validate(
        {"command": ["true"], "resources": {"gpus": gpus, "cpus": cpus, "memory_mb": memory_mb}}
    )


def test_a_job_no_host_could_run_is_named_and_one_that_fits_is_not() -> None:
    hosts = {"gpu": _host("gpu", 4, 2, 8000), "cpu": _host("cpu", 0, 16, 64000)}
    assert job_too_big(_spec(gpus=4, cpus=2, memory_mb=8000), hosts) is None
    assert job_too_big(_spec(cpus=16, memory_mb=64000), hosts) is None
    assert job_too_big(_spec(gpus=8), hosts) == (
        "it requests 8 GPUs; the largest host has 4 (2 host(s) known)"
    )
    assert job_too_big(_spec(cpus=16.5), hosts) == (
        "it requests 16.5 CPUs; the largest host has 16 (2 host(s) known)"
    )
    assert job_too_big(_spec(memory_mb=70000), hosts) == (
        "it requests 70000 MB of memory; the largest host has 64000 (2 host(s) known)"
    )
    # Each amount exists somewhere, but not together on one host.
    together = job_too_big(_spec(gpus=1, cpus=8), hosts)
    assert together is not None
    assert together.startswith("it requests 1 GPUs, 8 CPUs and 1024 MB of memory on one host;")
    assert "gpu: 4 GPUs, 2 CPUs, 8000 MB" in together
    # No host yet (a cluster starting): the job waits for them.
    assert job_too_big(_spec(gpus=64), {}) is None


# -- how `job submit --follow` ends -------------------------------------------------------------


def _job(status: str, exit_code: int | None, error: str = "") -> dict[str, Any]:
    return {
        "id": "j1",
        "status": status,
        "exit_code": exit_code,
        "error": error,
        "started": 10.0,
        "finished": 12.5,
    }


def test_the_final_status_line_and_exit_code() -> None:
    assert job_cli._final_status(_job("succeeded", 0)) == (
        "job j1 succeeded (exit code 0) in 2.5 s",
        0,
    )
    assert job_cli._final_status(_job("failed", 3, "exited with code 3")) == (
        "job j1 failed: exited with code 3 in 2.5 s",
        3,
    )
    assert job_cli._final_status(_job("failed", -9, "timed out after 5 s")) == (
        "job j1 failed: timed out after 5 s (exit code -9) in 2.5 s",
        137,
    )
    assert job_cli._final_status(_job("failed", None, "host-1 was lost")) == (
        "job j1 failed: host-1 was lost in 2.5 s",
        1,
    )
    assert job_cli._final_status(_job("cancelled", None, "cancelled")) == (
        "job j1 cancelled: cancelled in 2.5 s",
        1,
    )


# -- which outputs `job outputs` fetches ---------------------------------------------------------


def _finished(status: str = "succeeded", outputs: tuple[str, ...] = ("a.txt", "b/c.bin")) -> Any:
    return {"id": "j1", "status": status, "spec": {"outputs": list(outputs)}}


def test_outputs_to_fetch_and_the_errors_that_name_what_is_wrong() -> None:
    assert job_cli._outputs_to_fetch(_finished(), ()) == ["a.txt", "b/c.bin"]
    assert job_cli._outputs_to_fetch(_finished(), ("b/c.bin", "b/c.bin")) == ["b/c.bin"]
    with pytest.raises(click.ClickException, match=r"job j1 is running: its outputs are "):
        job_cli._outputs_to_fetch(_finished("running"), ())
    with pytest.raises(click.ClickException, match=r"has no output 'x'; its outputs: a.txt"):
        job_cli._outputs_to_fetch(_finished(), ("x",))
    with pytest.raises(click.ClickException, match="submitted without --output"):
        job_cli._outputs_to_fetch(_finished(outputs=()), ())


def test_an_output_never_lands_outside_the_directory(tmp_path: Path) -> None:
    assert job_cli._destination(tmp_path, "j1", "b/c.bin") == tmp_path / "b" / "c.bin"
    assert (tmp_path / "b").is_dir()
    with pytest.raises(click.ClickException, match="is not a relative path"):
        job_cli._destination(tmp_path, "j1", "../escape")


# -- following a job's output --------------------------------------------------------------------


class _FakeClient:
    """A gateway whose first follow stream ends before the job does (as when it drops a
    reader that fell behind); the job has ended by the second."""

    def __init__(self) -> None:
        self.output = b"first line\nsecond \xc3\xa9 line\n"
        self.offsets: list[int] = []

    async def follow_job_output(self, job_id: str, offset: int = 0) -> AsyncIterator[bytes]:
        self.offsets.append(offset)
        end = 11 if len(self.offsets) == 1 else len(self.output) - 3
        for i in range(offset, end, 4):
            yield self.output[i : min(i + 4, end)]

    async def get_job(self, job_id: str) -> dict[str, Any]:
        return {"id": job_id, "status": "running" if len(self.offsets) == 1 else "succeeded"}

    async def job_logs(self, job_id: str, offset: int = 0) -> str:
        return self.output[offset:].decode()


def test_follow_resumes_where_the_stream_stopped_and_reads_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out))
    client = _FakeClient()
    job = asyncio.run(job_cli._follow(client, "j1"))
    assert job["status"] == "succeeded"
    assert client.offsets == [0, 11]
    assert out.getvalue() == client.output
