"""What a new user hit on the first run (issue 14, "Packaging and the first run"), against a
real `nbcluster up` (two hosts of three virtual GPUs): the JupyterLab line it prints works
from a bare shell, commands that cannot find the gateway say that --state-dir is the fix, a
job larger than every host is refused as a kernel is, `job submit --follow` says which job
it follows and how it ended, `job outputs` downloads what a job left, and a notebook can
import and plot with the data-science stack."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nbcluster.client import GatewayClient

from ..cluster import free_port, processes_mentioning, wait_for
from .test_cli import Up, clean_env

pytestmark = pytest.mark.integration

NBCLUSTER = [sys.executable, "-m", "nbcluster"]

#: A job that waits (at most two minutes) for a file to appear, then writes its output.
WAIT_FOR_FILE = """
import pathlib, sys, time
marker = pathlib.Path({marker!r})
deadline = time.monotonic() + 120
while not marker.exists():
    if time.monotonic() > deadline:
        sys.exit("the test never created " + str(marker))
    time.sleep(0.05)
pathlib.Path("out.txt").write_text("done\\n")
print("saw the marker")
"""


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """One `nbcluster up --state-dir DIR` for the module; nothing of it may be left."""
    tmp = tmp_path_factory.mktemp("first-run")
    state_dir = (tmp / "state").resolve()
    running = Up(state_dir, free_port(), "T0ken-first-run", tmp / "up.stderr")
    try:
        running.wait_for_banner()
        yield running
    finally:
        running.proc.send_signal(signal.SIGTERM)
        try:
            running.proc.wait(30)
        finally:
            running.close()
        wait_for(lambda: not processes_mentioning(state_dir), 15, "every cluster process to end")


def cli(up: Up, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``nbcluster ARGS`` finding the gateway through the state directory (the way a user of
    `nbcluster up --state-dir DIR` does), unless ``env`` says otherwise."""
    return subprocess.run(
        [*NBCLUSTER, *args],
        env=env or clean_env(NBCLUSTER_STATE_DIR=str(up.state_dir)),
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def up_stderr(up: Up) -> str:
    return (up.state_dir.parent / "up.stderr").read_text()


# -- the banner ---------------------------------------------------------------------------------


def test_the_printed_jupyterlab_line_works_from_a_bare_shell(up: Up, tmp_path: Path) -> None:
    wait_for(lambda: "Connect JupyterLab with:" in up_stderr(up), 30, "the connect line")
    printed = up_stderr(up).splitlines()
    line = printed[printed.index("Connect JupyterLab with:") + 1].strip()
    jupyter = Path(sys.executable).parent / "jupyter"
    assert line == (
        f"env JUPYTER_GATEWAY_AUTH_TOKEN={up.token} {jupyter} lab --gateway-url={up.url}"
    )
    # The banner says how `status` finds this cluster.
    assert f"Status      nbcluster status --state-dir {up.state_dir}" in up_stderr(up)

    # Run it as printed from a shell that has nothing of the virtual environment: no PATH to
    # it, no VIRTUAL_ENV, a fresh HOME.
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    extra = f" --no-browser --ip=127.0.0.1 --port={port}"
    if os.geteuid() == 0:
        extra += " --allow-root"
    lab = subprocess.Popen(
        ["/bin/sh", "-c", line + extra],
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), "JUPYTER_TOKEN": "lab-token"},
        stdin=subprocess.DEVNULL,
        stdout=(tmp_path / "lab.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        specs: dict[str, object] = {}

        def lab_lists_the_gateways_kernelspecs() -> bool:
            assert lab.poll() is None, (tmp_path / "lab.log").read_text()[-3000:]
            response = httpx.get(
                f"http://127.0.0.1:{port}/api/kernelspecs",
                headers={"Authorization": "token lab-token"},
                timeout=10,
            )
            if response.status_code != 200:
                return False
            specs.update(response.json())
            return True

        # The kernelspecs come from the gateway, which answers only with its token: the one
        # the printed line put in JupyterLab's environment.
        wait_for(lab_lists_the_gateways_kernelspecs, 120, "JupyterLab to list the kernelspecs")
        assert "python3" in specs["kernelspecs"]  # type: ignore[operator]
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        try:
            lab.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(lab.pid, signal.SIGKILL)
            lab.wait(10)


def test_commands_that_find_no_gateway_say_state_dir_is_the_fix(up: Up, tmp_path: Path) -> None:
    # A user who started `nbcluster up --state-dir DIR` and runs `nbcluster status` plain:
    # the default state directory has no gateway.
    default_env = clean_env(XDG_DATA_HOME=str(tmp_path / "data"))
    default_dir = tmp_path / "data" / "nbcluster"
    for args in (("status",), ("job", "ls"), ("job", "outputs", "0123")):
        result = cli(up, *args, env=default_env)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert f"no running gateway found in the state directory {default_dir}" in result.stderr
        assert "pass --state-dir DIR (or set NBCLUSTER_STATE_DIR) to the directory" in (
            result.stderr
        )
        assert "Traceback" not in result.stderr
    # The fix, both ways.
    fixed = cli(up, "status", "--state-dir", str(up.state_dir), env=default_env)
    assert fixed.returncode == 0, fixed.stderr
    assert "host-1" in fixed.stdout
    listed = cli(up, "job", "ls", "--json")
    assert listed.returncode == 0, listed.stderr


# -- jobs ---------------------------------------------------------------------------------------


async def test_a_job_larger_than_every_host_is_refused_as_a_kernel_is(up: Up) -> None:
    async with GatewayClient(up.url, up.token) as gw:
        before = {j["id"] for j in await gw.list_jobs()}
    kernel = up.http.post("/api/kernels", json={"env": {"KERNEL_GPUS": "4"}})
    assert kernel.status_code == 400, kernel.text
    assert "requests 4 GPUs; the largest host has 3" in kernel.json()["message"]

    job = up.http.post("/api/jobs", json={"command": ["true"], "resources": {"gpus": 4}})
    assert job.status_code == 400, job.text
    assert job.json()["message"] == (
        "cannot run the job: it requests 4 GPUs; the largest host has 3 (2 host(s) known)"
    )
    assert job.json()["reason"] == "job request cannot be satisfied"
    fast = up.http.post(
        "/api/jobs", json={"source": "print(1)", "fast": True, "resources": {"memory_mb": 10**9}}
    )
    assert fast.status_code == 400, fast.text
    assert "it requests 1000000000 MB of memory; the largest host has" in fast.json()["message"]

    refused = cli(up, "job", "submit", "--gpus", "4", "--follow", "--", "true")
    assert refused.returncode == 1
    assert "cannot run the job: it requests 4 GPUs; the largest host has 3" in refused.stderr
    async with GatewayClient(up.url, up.token) as gw:
        assert {j["id"] for j in await gw.list_jobs()} == before, "a refused job was queued"

    # The most a host has is accepted, and runs.
    fits = cli(up, "job", "submit", "--gpus", "3", "--follow", "--", "true")
    assert fits.returncode == 0, fits.stderr
    assert "succeeded" in fits.stderr


def test_submit_follow_says_which_job_and_how_it_ended(up: Up, tmp_path: Path) -> None:
    ok = tmp_path / "ok.py"
    ok.write_text("print('hello')\n")
    result = cli(up, "job", "submit", "--follow", "--python", str(ok))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello\n"  # stdout is the job's output, nothing else
    lines = result.stderr.strip().splitlines()
    first = re.match(r"job ([0-9a-f]{32}) submitted \((queued|running), 0 GPU\(s\)\)", lines[0])
    assert first is not None, result.stderr
    job_id = first.group(1)
    assert re.fullmatch(rf"job {job_id} succeeded \(exit code 0\) in [0-9.]+ s", lines[-1])

    failing = tmp_path / "failing.py"
    failing.write_text("print('partial', flush=True)\nraise SystemExit(3)\n")
    result = cli(up, "job", "submit", "-f", "--python", str(failing))
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert result.stdout == "partial\n"
    job_id = result.stderr.split()[1]
    assert re.search(rf"job {job_id} failed: exited with code 3 in [0-9.]+ s\n$", result.stderr)


def _following(up: Up, tmp_path: Path, name: str) -> tuple[subprocess.Popen[str], str, Path]:
    """`job submit -f` of a job that waits for a marker file; returns the process once it
    has printed the job's id, the id, and the marker."""
    marker = tmp_path / f"{name}.marker"
    script = tmp_path / f"{name}.py"
    script.write_text(WAIT_FOR_FILE.format(marker=str(marker)))
    stderr = tmp_path / f"{name}.stderr"
    proc = subprocess.Popen(
        [*NBCLUSTER, "job", "submit", "-f", "--output", "out.txt", "--python", str(script)],
        env=clean_env(NBCLUSTER_STATE_DIR=str(up.state_dir)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr.open("w"),
        text=True,
    )
    wait_for(lambda: "submitted" in stderr.read_text(), 60, "the job id on stderr")
    job_id = stderr.read_text().split()[1]
    return proc, job_id, marker


def _status(up: Up, job_id: str) -> str:
    status: str = up.http.get(f"/api/jobs/{job_id}").json()["status"]
    return status


def test_follow_of_a_cancelled_job_and_ctrl_c(up: Up, tmp_path: Path) -> None:
    proc, job_id, _ = _following(up, tmp_path, "cancelled")
    wait_for(lambda: _status(up, job_id) == "running", 60, "the job to run")
    assert "cancel" in cli(up, "job", "cancel", job_id).stdout
    assert proc.wait(60) == 1
    stderr = (tmp_path / "cancelled.stderr").read_text()
    assert f"job {job_id} cancelled" in stderr

    # Ctrl-C stops following, not the job.
    proc, job_id, marker = _following(up, tmp_path, "interrupted")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    stderr = (tmp_path / "interrupted.stderr").read_text()
    assert f"stopped following job {job_id}; it goes on" in stderr
    assert _status(up, job_id) in ("queued", "running")
    marker.touch()
    logs = cli(up, "job", "logs", "-f", job_id)
    assert logs.returncode == 0 and logs.stdout == "saw the marker\n", logs.stderr
    assert _status(up, job_id) == "succeeded"


def test_job_outputs_downloads_what_the_job_left(up: Up, tmp_path: Path) -> None:
    script = tmp_path / "writes.py"
    script.write_text(
        "import pathlib\n"
        "pathlib.Path('result.txt').write_text('42\\n')\n"
        "pathlib.Path('sub').mkdir()\n"
        "pathlib.Path('sub/data.bin').write_bytes(bytes(range(256)) * 1000)\n"
    )
    outputs = ("--output", "result.txt", "--output", "sub/data.bin", "--output", "missing.txt")
    submitted = cli(up, "job", "submit", "-f", *outputs, "--python", str(script))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stderr.split()[1]

    # All of them: what it left is written, what it did not is named.
    every = tmp_path / "every"
    result = cli(up, "job", "outputs", job_id, "--dir", str(every))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        str(every / "result.txt"),
        str(every / "sub" / "data.bin"),
    ]
    assert (every / "result.txt").read_text() == "42\n"
    assert (every / "sub" / "data.bin").read_bytes() == bytes(range(256)) * 1000
    assert f"job {job_id} (succeeded) did not leave 'missing.txt'" in result.stderr
    assert sorted(p.name for p in every.rglob("*")) == ["data.bin", "result.txt", "sub"]

    # One by name, replacing an older copy.
    one = tmp_path / "one"
    one.mkdir()
    (one / "result.txt").write_text("old")
    result = cli(up, "job", "outputs", job_id, "result.txt", "--dir", str(one))
    assert result.returncode == 0, result.stderr
    assert [p.name for p in one.iterdir()] == ["result.txt"]
    assert (one / "result.txt").read_text() == "42\n"

    unknown = cli(up, "job", "outputs", job_id, "nope.txt", "--dir", str(one))
    assert unknown.returncode == 1
    assert (
        f"job {job_id} has no output 'nope.txt'; its outputs: result.txt, sub/data.bin, "
        "missing.txt" in unknown.stderr
    )
    no_job = cli(up, "job", "outputs", "f" * 32, "--dir", str(one))
    assert no_job.returncode == 1 and f"no job with id {'f' * 32}" in no_job.stderr

    hello = tmp_path / "hello.py"
    hello.write_text("print('hi')\n")
    plain = cli(up, "job", "submit", "-f", "--python", str(hello))
    none = cli(up, "job", "outputs", plain.stderr.split()[1])
    assert none.returncode == 1 and "it was submitted without --output" in none.stderr


def test_job_outputs_of_a_job_that_has_not_ended(up: Up, tmp_path: Path) -> None:
    proc, job_id, marker = _following(up, tmp_path, "unfinished")
    early = cli(up, "job", "outputs", job_id, "--dir", str(tmp_path / "early"))
    assert early.returncode == 1
    assert re.search(
        rf"job {job_id} is (queued|running): its outputs are collected when it ends", early.stderr
    )
    assert not (tmp_path / "early").exists()
    marker.touch()
    assert proc.wait(60) == 0
    later = cli(up, "job", "outputs", job_id, "--dir", str(tmp_path / "later"))
    assert later.returncode == 0, later.stderr
    assert (tmp_path / "later" / "out.txt").read_text() == "done\n"


# -- the kernel's environment ---------------------------------------------------------------------


async def test_a_notebook_can_import_and_plot_with_the_data_science_stack(up: Up) -> None:
    code = (
        "import matplotlib.pyplot as plt, numpy as np, pandas as pd, scipy.stats\n"
        "from sklearn.linear_model import LinearRegression\n"
        "x = np.arange(10.0)\n"
        "model = LinearRegression().fit(x[:, None], 2 * x + 1)\n"
        "print(round(float(model.coef_[0]), 6), pd.Series(x).sum(), scipy.stats.norm.cdf(0))\n"
        "plt.plot(x, model.predict(x[:, None]))\n"
        "plt.show()\n"
    )
    async with GatewayClient(up.url, up.token, timeout=120) as gw:
        kernel = await gw.start_kernel()
        try:
            async with gw.channels(kernel["id"]) as channels:
                result = await channels.execute(code, timeout=180)
        finally:
            await gw.shutdown_kernel(kernel["id"])
    assert result.status == "ok", result.reply
    assert result.stream_text() == "2.0 45.0 0.5\n"
    images = [o for o in result.of_type("display_data") if "image/png" in o["content"]["data"]]
    assert len(images) == 1, [o["content"]["data"].keys() for o in result.of_type("display_data")]
