"""Host pools outside the scheduler (issue 15): pool names, kernelspecs, job specs, which
worker a job may run on, the job API's refusal, the hosts' hello, the ``%%job`` option, and
``nbcluster host --pool``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from IPython.core.error import UsageError
from pydantic import ValidationError

from nbcluster.cli._daemons import host_command
from nbcluster.gateway._jobs_api import job_too_big
from nbcluster.gateway._kernelspecs import KernelSpecError, KernelSpecRegistry
from nbcluster.hostproto import Hello, HostResources, check_pool
from nbcluster.jobs import Job, JobSpec, WorkerCapacity, assign_jobs
from nbcluster.kernel._magics import build_spec, parse_job_options
from nbcluster.scheduling import HostView, Resources

ARGV = ["python", "-m", "nbcluster.kernel", "-f", "{connection_file}"]


@pytest.mark.parametrize("name", ["a", "a100", "cpu", "containers", "gpu.big_1-x", "9" * 63])
def test_good_pool_names(name: str) -> None:
    assert check_pool(name) == name


@pytest.mark.parametrize("name", ["", "A100", "-a", ".a", "a b", "a/b", "a\n", "9" * 64])
def test_bad_pool_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(ValueError, match="is not a pool name"):
        check_pool(name)


def test_a_pool_name_must_be_a_string() -> None:
    with pytest.raises(ValueError, match="must be a string, not int"):
        check_pool(3)


def _load(tmp_path: Path, metadata: dict[str, Any]) -> Any:
    path = tmp_path / "kernel.json"
    spec = {"argv": ARGV, "display_name": "x", "language": "python", "metadata": metadata}
    path.write_text(json.dumps(spec))
    return KernelSpecRegistry.load_file(path)


def test_a_kernelspec_names_its_pool_in_either_place(tmp_path: Path) -> None:
    assert _load(tmp_path, {}).pool is None
    assert _load(tmp_path, {"nbcluster": {"pool": "a100"}}).pool == "a100"
    provisioner = {"kernel_provisioner": {"config": {"host_pool": "cpu"}}}
    assert _load(tmp_path, provisioner).pool == "cpu"
    both = {"nbcluster": {"pool": "a100"}, **provisioner}
    assert _load(tmp_path, both).pool == "a100"


@pytest.mark.parametrize(
    ("metadata", "words"),
    [
        ({"nbcluster": {"pool": "A100"}}, "nbcluster pool: pool 'A100' is not a pool name"),
        (
            {"kernel_provisioner": {"config": {"host_pool": 7}}},
            "kernel_provisioner host_pool: a pool name must be a string, not int",
        ),
    ],
)
def test_a_kernelspec_with_a_bad_pool_is_refused(
    tmp_path: Path, metadata: dict[str, Any], words: str
) -> None:
    with pytest.raises(KernelSpecError, match=words):
        _load(tmp_path, metadata)


def test_a_kernelspec_names_its_machines_in_either_place(tmp_path: Path) -> None:
    assert _load(tmp_path, {}).remote_hosts == ()
    provisioner = {"kernel_provisioner": {"config": {"remote_hosts": ["gpu1", "ubuntu@gpu2:2222"]}}}
    assert _load(tmp_path, provisioner).remote_hosts == ("gpu1", "ubuntu@gpu2:2222")
    assert _load(tmp_path, {"nbcluster": {"remote_hosts": "gpu3,gpu4"}}).remote_hosts == (
        "gpu3",
        "gpu4",
    )
    both = {"nbcluster": {"remote_hosts": ["gpu9"]}, **provisioner}
    assert _load(tmp_path, both).remote_hosts == ("gpu1", "ubuntu@gpu2:2222")


@pytest.mark.parametrize(
    ("remote_hosts", "words"),
    [
        (["gpu1;touch x"], "kernel_provisioner remote_hosts: ssh machine 'gpu1;touch x': "),
        (["-oProxyCommand=x"], "is not a host name or an IP address"),
        ([], "must be a non-empty list of machines"),
        ([3], "must be a non-empty list of machines"),
        (["gpu1", "gpu1"], "is listed twice"),
    ],
)
def test_a_kernelspec_with_bad_machines_is_refused(
    tmp_path: Path, remote_hosts: Any, words: str
) -> None:
    metadata = {"kernel_provisioner": {"config": {"remote_hosts": remote_hosts}}}
    with pytest.raises(KernelSpecError, match=re.escape(words)):
        _load(tmp_path, metadata)


def test_the_registry_lists_every_kernelspecs_machines_once(tmp_path: Path) -> None:
    for name, machines in [("b", ["gpu2", "gpu1"]), ("a", ["gpu1"]), ("c", None)]:
        (tmp_path / name).mkdir()
        metadata = {} if machines is None else {"nbcluster": {"remote_hosts": machines}}
        spec = {"argv": ARGV, "display_name": name, "language": "python", "metadata": metadata}
        (tmp_path / name / "kernel.json").write_text(json.dumps(spec))
    assert KernelSpecRegistry((tmp_path,)).remote_hosts() == ("gpu1", "gpu2")


def _job_spec(**fields: Any) -> JobSpec:
    return JobSpec.model_validate({"command": ["true"], **fields})


def test_a_job_spec_validates_its_pool() -> None:
    assert _job_spec().pool is None
    assert _job_spec(pool="a100").pool == "a100"
    with pytest.raises(ValidationError, match="is not a pool name"):
        _job_spec(pool="Big GPUs")


def test_jobs_are_assigned_only_to_workers_of_their_pool() -> None:
    jobs = [Job(id=f"j{i}", spec=_job_spec(pool=pool)) for i, pool in enumerate(["b", None, "a"])]
    workers = [
        WorkerCapacity("free", 64, 64_000),  # the most room, in no pool
        WorkerCapacity("in-a", 4, 4000, pool="a"),
        WorkerCapacity("in-b", 4, 4000, pool="b"),
    ]
    placed = {job.id: worker for job, worker, _ in assign_jobs(jobs, workers)}
    assert placed == {"j0": "in-b", "j1": "free", "j2": "in-a"}
    # A pool without a worker: its job waits.
    waiting = Job(id="jz", spec=_job_spec(pool="z"))
    assert assign_jobs([waiting], [WorkerCapacity("free", 64, 64_000)]) == []


def _host(name: str, gpus: int, pool: str | None) -> HostView:
    return HostView(
        name=name,
        spec=Resources(gpus=gpus, millicpus=8000, memory_mb=16_000),
        gpu_devices=tuple(range(gpus)),
        pending=Resources(),
        bound=(),
        replicas=(),
        draining=False,
        subscription_ratio=0.0,
        pool=pool,
    )


def test_the_job_api_checks_a_job_against_its_pools_hosts() -> None:
    hosts = {"big": _host("big", 8, None), "a1": _host("a1", 1, "a"), "b1": _host("b1", 2, "b")}
    assert job_too_big(_job_spec(pool="a", resources={"gpus": 1}), hosts) is None
    assert job_too_big(_job_spec(pool="a", resources={"gpus": 2}), hosts) == (
        "it requests 2 GPUs; the largest host in pool 'a' has 1 (1 host(s) known)"
    )
    assert job_too_big(_job_spec(resources={"gpus": 2}), hosts) is None
    assert job_too_big(_job_spec(pool="z"), hosts) == (
        "no host is in pool 'z' (pools of the known hosts: 'a', 'b')"
    )
    assert job_too_big(_job_spec(pool="z"), {"big": hosts["big"]}) == (
        "no host is in pool 'z' (pools of the known hosts: none)"
    )
    # No host at all yet (a cluster starting): queued for the hosts to come.
    assert job_too_big(_job_spec(pool="z"), {}) is None


def test_a_hello_carries_the_pool_and_older_hosts_have_none() -> None:
    old = {"name": "h", "address": "127.0.0.1", "resources": {"cpus": 2, "memory_mb": 1024}}
    assert Hello.model_validate(old).resources.pool is None
    new = {**old, "resources": {"cpus": 2, "memory_mb": 1024, "pool": "a100"}}
    assert Hello.model_validate(new).resources.pool == "a100"
    with pytest.raises(ValidationError):
        HostResources(cpus=1, memory_mb=1, pool="Not A Pool")


def test_the_job_magic_takes_a_pool() -> None:
    options = parse_job_options("gpus=1 pool=a100")
    assert build_spec(options, "print(1)")["pool"] == "a100"
    with pytest.raises(UsageError, match="bad value for option 'pool'"):
        parse_job_options("pool=A100")


def test_host_refuses_a_bad_pool() -> None:
    result = CliRunner().invoke(
        host_command, ["--gateway", "http://127.0.0.1:1", "--pool", "Bad Pool"]
    )
    assert result.exit_code == 2, result.output
    assert "--pool" in result.output and "is not a pool name" in result.output


def test_status_shows_hosts_grouped_by_pool() -> None:
    from rich.console import Console

    from nbcluster.cli._status import _print_hosts

    def host(name: str, pool: str | None) -> dict[str, Any]:
        return {
            "name": name,
            "pool": pool,
            "state": "connected",
            "address": "127.0.0.1",
            "cpus": 2,
            "memory_mb": 1024,
            "gpus": [],
            "gpus_committed": 0,
            "replicas": [],
        }

    console = Console(record=True, width=200)
    hosts = [host("h1", None), host("h2", "b"), host("h3", "a"), host("h4", "b"), host("h0", "a")]
    _print_hosts(console, "http://gw", hosts)
    rows = [line.split("│")[1:3] for line in console.export_text().splitlines() if "│ h" in line]
    assert [(p.strip(), h.strip()) for p, h in rows] == [
        ("a", "h0"),
        ("a", "h3"),
        ("b", "h2"),
        ("b", "h4"),
        ("-", "h1"),
    ]
