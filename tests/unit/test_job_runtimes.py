"""The docker, kubernetes, tfjob and pytorchjob runtimes against fakes at the client seam
(``docker.DockerClient``, ``BatchV1Api``, ``CoreV1Api``, ``CustomObjectsApi``), the manifest
builders and their validation, and ``deploy/kubernetes/*.yaml`` (kept equal to the builders'
output: regenerate with ``NBCLUSTER_REGENERATE_DEPLOY=1 pytest tests/unit/test_job_runtimes.py``).
"""

from __future__ import annotations

import asyncio
import copy
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from nbcluster.jobs import _kubernetes as kube_mod
from nbcluster.jobs._docker import (
    DockerRuntime,
    container_env,
    gpu_device_requests,
    gpu_ids,
)
from nbcluster.jobs._kubernetes import (
    KubernetesJobRuntime,
    TrainingJobRuntime,
    job_manifest,
    resource_name,
    training_manifest,
    validate_manifest,
)
from nbcluster.jobs._model import JobResources, JobSpec

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "kubernetes"


def resolved(path: Path) -> str:
    return str(path.resolve())


def spec(**fields: Any) -> JobSpec:
    base: dict[str, Any] = {"command": ["python", "train.py"], "image": "python:3.11-slim"}
    return JobSpec(**(base | fields))


# ---------------------------------------------------------------------------------------------
# Docker fakes


class FakeContainer:
    def __init__(self, chunks: list[bytes], status: int, block: bool) -> None:
        self.id = "c0ffee"
        self.chunks = chunks
        self.status = status
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.stopped = threading.Event()
        if not block:
            self.stopped.set()

    def start(self) -> None:
        self.calls.append(("start", {}))

    def logs(self, **kwargs: Any) -> Iterator[bytes]:
        self.calls.append(("logs", kwargs))
        return iter(self.chunks)

    def wait(self) -> dict[str, Any]:
        self.calls.append(("wait", {}))
        self.stopped.wait(10)
        return {"StatusCode": self.status, "Error": None}

    def stop(self, **kwargs: Any) -> None:
        self.calls.append(("stop", kwargs))
        self.status = 137
        self.stopped.set()

    def remove(self, **kwargs: Any) -> None:
        self.calls.append(("remove", kwargs))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class FakeContainers:
    def __init__(self, container: FakeContainer, error: Exception | None = None) -> None:
        self.container = container
        self.error = error
        self.runs: list[dict[str, Any]] = []  # the kwargs of each create

    def create(self, **kwargs: Any) -> FakeContainer:
        self.runs.append(kwargs)
        if self.error is not None:
            raise self.error
        return self.container


class FakeImages:
    """No registry: every pull fails as the engine's does."""

    def __init__(self) -> None:
        self.pulls: list[str] = []

    def pull(self, name: str) -> None:
        self.pulls.append(name)
        raise docker.errors.APIError(f"pull access denied for {name}")


class FakeDockerClient:
    def __init__(self, container: FakeContainer, error: Exception | None = None) -> None:
        self.containers = FakeContainers(container, error)
        self.images = FakeImages()


def docker_runtime(
    chunks: list[bytes] | None = None,
    status: int = 0,
    block: bool = False,
    error: Exception | None = None,
) -> tuple[DockerRuntime, FakeDockerClient, list[int]]:
    fake = FakeDockerClient(FakeContainer(chunks or [], status, block), error)
    made: list[int] = []

    def factory() -> FakeDockerClient:
        made.append(1)
        return fake

    return DockerRuntime(factory, user=(1000, 1000)), fake, made


# ---------------------------------------------------------------------------------------------
# Docker runtime


def test_docker_check_names_the_field() -> None:
    runtime, _, made = docker_runtime()
    with pytest.raises(ValueError, match=r"^image: required"):
        runtime.check(JobSpec(command=["true"]))  # a process-runtime spec: no image
    with pytest.raises(ValueError, match=r"^workers:"):
        runtime.check(spec(runtime="pytorchjob", workers=2))
    runtime.check(spec(runtime="docker"))
    assert made == []  # no client until a job starts


async def test_docker_start_passes_exact_kwargs_with_gpus(tmp_path: Path) -> None:
    runtime, fake, made = docker_runtime([b"epoch 1\n", b"done\n"], status=0)
    job = spec(
        runtime="docker",
        env={"FOO": "bar"},
        resources=JobResources(gpus=2, cpus=1.5, memory_mb=2048),
    )
    env = {
        "FOO": "bar",
        "PATH": "/host/venv/bin:/usr/bin",
        "HOME": "/root",
        "NBCLUSTER_JOB_ID": "j1",
        "NBCLUSTER_GPUS": "0,2",
        "CUDA_VISIBLE_DEVICES": "0,2",
    }
    log_path = tmp_path / "job.log"
    handle = await runtime.start("j1", job, tmp_path, env, log_path)
    assert made == [1]
    assert fake.containers.runs == [
        {
            "image": "python:3.11-slim",
            "entrypoint": ["python"],  # the command replaces the image's entrypoint
            "command": ["train.py"],
            "environment": {
                "FOO": "bar",
                "NBCLUSTER_JOB_ID": "j1",
                "NBCLUSTER_GPUS": "0,2",  # the host's device indices
                "CUDA_VISIBLE_DEVICES": "0,1",  # as the container numbers them
            },
            "working_dir": "/job",
            "volumes": {resolved(tmp_path): {"bind": "/job", "mode": "rw"}},
            "labels": {"nbcluster.job": "j1", "nbcluster.worker": runtime.worker_id},
            "user": "1000:1000",
            "init": True,
            "mem_limit": "2048m",
            "nano_cpus": 1_500_000_000,
            "network_mode": "host",
            "device_requests": [
                docker.types.DeviceRequest(device_ids=["0", "2"], capabilities=[["gpu"]])
            ],
        }
    ]
    request = fake.containers.runs[0]["device_requests"][0]
    assert request["DeviceIDs"] == ["0", "2"] and request["Capabilities"] == [["gpu"]]
    assert await handle.wait() == 0
    container = fake.containers.container
    assert ("logs", {"stream": True, "follow": True}) in container.calls
    assert container.names()[:2] == ["start", "logs"]
    assert container.names()[-1] == "remove"
    assert log_path.read_bytes() == b"epoch 1\ndone\n"


async def test_docker_without_gpus_has_no_device_request(tmp_path: Path) -> None:
    runtime, fake, _ = docker_runtime(status=3)
    handle = await runtime.start(
        "j2", spec(runtime="docker"), tmp_path, {"CUDA_VISIBLE_DEVICES": ""}, tmp_path / "log"
    )
    kwargs = fake.containers.runs[0]
    assert "device_requests" not in kwargs
    assert kwargs["mem_limit"] == "1024m" and kwargs["nano_cpus"] == 1_000_000_000
    assert kwargs["environment"] == {"CUDA_VISIBLE_DEVICES": ""}
    assert await handle.wait() == 3


async def test_docker_source_job_runs_job_py_in_the_container(tmp_path: Path) -> None:
    runtime, fake, _ = docker_runtime()
    job = JobSpec(source="print('hi')", image="python:3.11-slim", runtime="docker")
    handle = await runtime.start("j3", job, tmp_path, {}, tmp_path / "log")
    run = fake.containers.runs[0]
    assert [*run["entrypoint"], *run["command"]] == ["python", "/job/job.py"]
    assert (tmp_path / "job.py").read_text() == "print('hi')"
    assert await handle.wait() == 0


async def test_docker_gpus_asked_but_not_bound(tmp_path: Path) -> None:
    runtime, fake, _ = docker_runtime()
    job = spec(runtime="docker", resources=JobResources(gpus=1))
    with pytest.raises(ValueError, match=r"^resources\.gpus:"):
        await runtime.start("j4", job, tmp_path, {}, tmp_path / "log")
    assert fake.containers.runs == []


async def test_docker_image_not_found_names_image(tmp_path: Path) -> None:
    error = docker.errors.ImageNotFound("No such image: nope:1")
    runtime, fake, _ = docker_runtime(error=error)
    with pytest.raises(ValueError, match=r"^image: 'nope:1' is not on this host and could not"):
        await runtime.start(
            "j5", spec(runtime="docker", image="nope:1"), tmp_path, {}, tmp_path / "l"
        )
    assert fake.images.pulls == ["nope:1"]  # the engine lacked it: a pull was tried


async def test_docker_engine_unreachable(tmp_path: Path) -> None:
    def factory() -> Any:
        raise docker.errors.DockerException("Error while fetching server API version")

    runtime = DockerRuntime(factory)
    with pytest.raises(RuntimeError, match="cannot reach the Docker engine"):
        await runtime.start("j6", spec(runtime="docker"), tmp_path, {}, tmp_path / "log")


async def test_docker_cancel_stops_then_removes(tmp_path: Path) -> None:
    runtime, fake, _ = docker_runtime([b"working\n"], block=True)
    handle = await runtime.start("j7", spec(runtime="docker"), tmp_path, {}, tmp_path / "log")
    waiter = asyncio.create_task(handle.wait())
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await handle.cancel(grace=2.0)
    container = fake.containers.container
    assert ("stop", {"timeout": 2}) in container.calls
    assert container.names().index("stop") < container.names().index("remove")
    assert ("remove", {"force": True}) in container.calls
    assert await asyncio.wait_for(waiter, 5) == 137
    assert (tmp_path / "log").read_bytes() == b"working\n"


@pytest.mark.parametrize("devices", [["3"], ["0", "2"], ["1", "4", "5", "7"]])
def test_docker_gpu_request_for_n_gpus(tmp_path: Path, devices: list[str]) -> None:
    """A job with gpus=N whose worker bound N devices: one device request for exactly those
    devices, in the form `docker run --gpus '"device=..."'` sends it, and the devices
    numbered from 0 inside the container."""
    runtime, _, _ = docker_runtime()
    job = spec(runtime="docker", resources=JobResources(gpus=len(devices)))
    env = {"NBCLUSTER_GPUS": ",".join(devices), "CUDA_VISIBLE_DEVICES": ",".join(devices)}
    kwargs = runtime.create_kwargs("g1", job, tmp_path, env)
    assert kwargs["device_requests"] == gpu_device_requests(devices)
    (request,) = kwargs["device_requests"]
    # The API's DeviceRequest, as the docker CLI (28.x) builds it for --gpus device=...
    assert dict(request) == {
        "Driver": "",
        "Count": 0,
        "DeviceIDs": devices,
        "Capabilities": [["gpu"]],
        "Options": {},
    }
    assert kwargs["environment"]["CUDA_VISIBLE_DEVICES"] == ",".join(
        str(i) for i in range(len(devices))
    )
    assert kwargs["environment"]["NBCLUSTER_GPUS"] == ",".join(devices)
    assert gpu_device_requests([]) == []


async def test_docker_wait_after_cancel_returns_the_status(tmp_path: Path) -> None:
    """The worker's timeout path: cancel, then wait (the container is removed by then)."""
    runtime, fake, _ = docker_runtime(block=True)
    handle = await runtime.start("j8", spec(runtime="docker"), tmp_path, {}, tmp_path / "log")
    await handle.cancel(grace=1.0)
    assert await asyncio.wait_for(handle.wait(), 5) == 137
    assert await asyncio.wait_for(handle.wait(), 5) == 137  # and again
    assert fake.containers.container.names().count("wait") == 1


async def test_docker_start_refused_removes_the_container(tmp_path: Path) -> None:
    runtime, fake, _ = docker_runtime()
    container = fake.containers.container

    def refuse() -> None:
        container.calls.append(("start", {}))
        raise docker.errors.APIError(
            "500 Server Error",
            explanation='could not select device driver "" with capabilities: [[gpu]]',
        )

    container.start = refuse  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match=r"could not select device driver"):
        await runtime.start("j9", spec(runtime="docker"), tmp_path, {}, tmp_path / "log")
    assert container.names() == ["start", "remove"]


async def test_docker_lost_container_ends_with_125(tmp_path: Path) -> None:
    runtime, fake, _ = docker_runtime()
    container = fake.containers.container

    def gone() -> dict[str, Any]:
        raise docker.errors.NotFound("No such container: c0ffee")

    container.wait = gone  # type: ignore[method-assign]
    handle = await runtime.start("j10", spec(runtime="docker"), tmp_path, {}, tmp_path / "log")
    assert await asyncio.wait_for(handle.wait(), 5) == 125
    assert "lost the container" in (tmp_path / "log").read_text()


@pytest.mark.skipif(os.getuid() != 0, reason="a root worker only")
async def test_docker_root_worker_gives_the_job_dir_to_the_container_user(
    tmp_path: Path,
) -> None:
    runtime, fake, _ = docker_runtime()
    workdir = tmp_path / "job"
    (workdir / "data").mkdir(parents=True)
    (workdir / "data" / "in.csv").write_text("1\n")
    job = JobSpec(source="print(1)", image="img", runtime="docker")
    await runtime.start("j11", job, workdir, {}, tmp_path / "log")
    assert fake.containers.runs[0]["user"] == "1000:1000"
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in (workdir, *workdir.rglob("*"))}
    assert owners == {(1000, 1000)}  # job.py and the inputs too
    assert DockerRuntime(lambda: None).user == (1000, 1000)  # never root in the container


def test_docker_env_helpers() -> None:
    assert gpu_ids({"NBCLUSTER_GPUS": "1, 3", "CUDA_VISIBLE_DEVICES": "9"}) == ["1", "3"]
    assert gpu_ids({"CUDA_VISIBLE_DEVICES": "GPU-abc"}) == ["GPU-abc"]
    assert gpu_ids({"NBCLUSTER_GPUS": " "}) == []
    job = spec(env={"A": "1"})
    assert container_env(job, {"A": "2", "PATH": "/x", "NBCLUSTER_X": "y"}) == {
        "A": "2",
        "NBCLUSTER_X": "y",
    }


def test_modules_import_without_the_clients() -> None:
    code = (
        "import sys, nbcluster.jobs._docker, nbcluster.jobs._kubernetes;"
        "print('docker' in sys.modules, 'kubernetes' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "False"]


# ---------------------------------------------------------------------------------------------
# Manifests


def test_job_manifest_shape() -> None:
    job = spec(
        runtime="kubernetes",
        env={"B": "2", "A": "1"},
        resources=JobResources(gpus=1, cpus=0.5, memory_mb=512),
        timeout=90.5,
    )
    m = job_manifest("abc123", job, "ml", env={"NBCLUSTER_JOB_ID": "abc123"})
    validate_manifest(m)
    assert m["apiVersion"] == "batch/v1" and m["kind"] == "Job"
    assert m["metadata"]["name"] == "nbcluster-abc123"
    assert m["metadata"]["namespace"] == "ml"
    assert m["metadata"]["labels"]["nbcluster.io/job"] == "abc123"
    assert m["spec"]["backoffLimit"] == 0
    assert m["spec"]["activeDeadlineSeconds"] == 91
    pod = m["spec"]["template"]
    assert pod["metadata"]["labels"]["nbcluster.io/job"] == "abc123"
    assert pod["spec"]["restartPolicy"] == "Never"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "python:3.11-slim"
    assert container["command"] == ["python", "train.py"]
    assert container["env"] == [
        {"name": "A", "value": "1"},
        {"name": "B", "value": "2"},
        {"name": "NBCLUSTER_JOB_ID", "value": "abc123"},
    ]
    quantities = {"cpu": "500m", "memory": "512Mi", "nvidia.com/gpu": "1"}
    assert container["resources"] == {"requests": quantities, "limits": quantities}
    # The official client's model keeps every field (an unknown one would be dropped).
    api = k8s.ApiClient()
    assert api.sanitize_for_serialization(k8s.V1Job.from_dict(m)) == m


def test_source_job_manifest_runs_python_c() -> None:
    m = job_manifest("s", JobSpec(source="print(1)", image="py", runtime="kubernetes"))
    container = m["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-c", "print(1)"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert container["resources"]["limits"]["cpu"] == "1"


def test_pytorchjob_manifest_shape() -> None:
    job = spec(runtime="pytorchjob", workers=4, resources=JobResources(gpus=2))
    m = training_manifest("t1", job, "default", "PyTorchJob")
    validate_manifest(m)
    assert m["apiVersion"] == "kubeflow.org/v1" and m["kind"] == "PyTorchJob"
    replicas = m["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 3
    api = k8s.ApiClient()
    for replica in replicas.values():
        (container,) = replica["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
        template = replica["template"]
        assert api.sanitize_for_serialization(k8s.V1PodTemplateSpec.from_dict(template)) == template
    assert m["spec"]["runPolicy"]["backoffLimit"] == 0
    single = training_manifest("t1", spec(runtime="pytorchjob"), "default", "PyTorchJob")
    assert list(single["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    validate_manifest(single)


def test_tfjob_manifest_shape() -> None:
    m = training_manifest("t2", spec(runtime="tfjob", workers=3), "default", "TFJob")
    validate_manifest(m)
    assert list(m["spec"]["tfReplicaSpecs"]) == ["Worker"]
    worker = m["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 3
    assert worker["template"]["spec"]["containers"][0]["name"] == "tensorflow"
    with pytest.raises(ValueError, match=r"^kind:"):
        training_manifest("t2", spec(), "default", "MPIJob")  # type: ignore[arg-type]


def test_resource_names_are_dns_labels() -> None:
    assert resource_name("abc") == "nbcluster-abc"
    assert resource_name("abc", "f00d") == "nbcluster-abc-f00d"
    for job_id in ("Job_ID.With Spaces", "x" * 100, "UPPER", "--", "a" * 32):
        name = resource_name(job_id, "a1b2c3")
        assert len(name) <= 63
        validate_manifest(job_manifest(job_id, spec(runtime="kubernetes"), name=name))
    assert resource_name("A") != resource_name("a")


def _job() -> dict[str, Any]:
    return job_manifest("abc", spec(runtime="kubernetes"))


def _pytorch() -> dict[str, Any]:
    return training_manifest("abc", spec(runtime="pytorchjob", workers=2), "default", "PyTorchJob")


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(m: dict[str, Any]) -> None:
        target: Any = m
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return mutate


_DELETE = object()
_JOB_CONTAINER = ["spec", "template", "spec", "containers", 0]
_MASTER = ["spec", "pytorchReplicaSpecs", "Master"]
_WORKER = ["spec", "pytorchReplicaSpecs", "Worker"]


@pytest.mark.parametrize(
    ("build", "mutate", "path"),
    [
        (_job, _set(["apiVersion"], "batch/v2"), "apiVersion"),
        (_job, _set(["kind"], "CronJob"), "kind"),
        (_job, _set(["metadata", "name"], "Bad_Name"), "metadata.name"),
        (_job, _set(["metadata", "name"], "a" * 64), "metadata.name"),
        (_job, _set(["metadata", "name"], _DELETE), "metadata.name"),
        (_job, _set(["metadata", "namespace"], "-ns"), "metadata.namespace"),
        (_job, _set(["metadata", "labels", "nbcluster.io/job"], "a b"), "metadata.labels"),
        (_job, _set(["spec", "backoffLimit"], -1), "spec.backoffLimit"),
        (_job, _set(["spec", "activeDeadlineSeconds"], "60"), "spec.activeDeadlineSeconds"),
        (_job, _set(["spec", "template", "spec", "restartPolicy"], "Always"), "restartPolicy"),
        (_job, _set(["spec", "template", "spec", "containers"], []), "spec.containers"),
        (_job, _set([*_JOB_CONTAINER, "image"], _DELETE), "containers[0].image"),
        (_job, _set([*_JOB_CONTAINER, "image"], ""), "containers[0].image"),
        (_job, _set([*_JOB_CONTAINER, "name"], _DELETE), "containers[0].name"),
        (_job, _set([*_JOB_CONTAINER, "command"], "python x.py"), "containers[0].command"),
        (_job, _set([*_JOB_CONTAINER, "env"], [{"name": "A", "value": 1}]), "env[0].value"),
        (_job, _set([*_JOB_CONTAINER, "env"], [{"name": "1 A"}]), "env[0].name"),
        (
            _job,
            _set([*_JOB_CONTAINER, "resources", "limits", "cpu"], 2),
            "resources.limits.cpu",
        ),
        (
            _job,
            _set([*_JOB_CONTAINER, "resources", "requests", "memory"], "lots"),
            "resources.requests.memory",
        ),
        (_pytorch, _set([*_WORKER, "replicas"], 0), "Worker.replicas"),
        (_pytorch, _set([*_WORKER, "replicas"], True), "Worker.replicas"),
        (_pytorch, _set([*_MASTER, "replicas"], 2), "Master.replicas"),
        (_pytorch, _set([*_MASTER], _DELETE), "pytorchReplicaSpecs.Master"),
        (_pytorch, _set(["spec", "pytorchReplicaSpecs", "Chief"], {}), "pytorchReplicaSpecs.Chief"),
        (
            _pytorch,
            _set([*_WORKER, "template", "spec", "containers", 0, "name"], "trainer"),
            "Worker.template.spec.containers",
        ),
        (_pytorch, _set(["spec", "pytorchReplicaSpecs"], {}), "spec.pytorchReplicaSpecs"),
        (_pytorch, _set(["spec", "runPolicy", "backoffLimit"], "0"), "runPolicy.backoffLimit"),
    ],
)
def test_validate_names_each_bad_field(
    build: Callable[[], dict[str, Any]], mutate: Callable[[dict[str, Any]], None], path: str
) -> None:
    manifest = build()
    validate_manifest(manifest)
    bad = copy.deepcopy(manifest)
    mutate(bad)
    with pytest.raises(ValueError) as info:
        validate_manifest(bad)
    assert path in str(info.value).split(":")[0], str(info.value)


def test_validate_rejects_non_mappings() -> None:
    with pytest.raises(ValueError, match=r"^manifest:"):
        validate_manifest([])
    with pytest.raises(ValueError, match=r"^spec:"):
        validate_manifest({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "a"}})


# ---------------------------------------------------------------------------------------------
# deploy/kubernetes: generated from the builders


EXAMPLE_ENV = {"NBCLUSTER_STORE_URL": "s3://nbcluster-jobs/"}

EXAMPLES: dict[str, Callable[[], dict[str, Any]]] = {
    "job-example.yaml": lambda: job_manifest(
        "example",
        JobSpec(
            name="hello",
            command=["python", "-c", "import os; print('hello from', os.uname().nodename)"],
            image="python:3.11-slim",
            runtime="kubernetes",
            env={"GREETING": "hello"},
            resources=JobResources(gpus=0, cpus=2, memory_mb=4096),
            timeout=3600,
        ),
        "default",
        env=EXAMPLE_ENV,
    ),
    "pytorchjob-example.yaml": lambda: training_manifest(
        "example-ddp",
        JobSpec(
            name="ddp smoke test",
            command=[
                "python",
                "-c",
                "import torch.distributed as dist; dist.init_process_group('gloo'); "
                "print('rank', dist.get_rank(), 'of', dist.get_world_size())",
            ],
            image="pytorch/pytorch:2.3.1-cuda12.1-cudnn8-runtime",
            runtime="pytorchjob",
            workers=3,
            resources=JobResources(gpus=1, cpus=4, memory_mb=16384),
            timeout=7200,
        ),
        "default",
        "PyTorchJob",
        env=EXAMPLE_ENV,
    ),
    "tfjob-example.yaml": lambda: training_manifest(
        "example-tf",
        JobSpec(
            name="tf multi-worker smoke test",
            command=[
                "python",
                "-c",
                "import json, os; print(json.loads(os.environ['TF_CONFIG'])['task'])",
            ],
            image="tensorflow/tensorflow:2.16.1-gpu",
            runtime="tfjob",
            workers=2,
            resources=JobResources(gpus=1, cpus=4, memory_mb=16384),
            timeout=7200,
        ),
        "default",
        "TFJob",
        env=EXAMPLE_ENV,
    ),
}

_HEADER = """\
# Generated from nbcluster.jobs._kubernetes ({builder}) by tests/unit/test_job_runtimes.py;
# do not edit by hand. Regenerate after changing the builders with
#   NBCLUSTER_REGENERATE_DEPLOY=1 .venv/bin/pytest tests/unit/test_job_runtimes.py -k deploy
# The worker creates the same object per attempt with a random name suffix; apply this one
# with `kubectl apply -f {file}` to try the cluster side alone.
"""


@pytest.mark.parametrize("file", sorted(EXAMPLES))
def test_deploy_examples_match_the_builders(file: str) -> None:
    manifest = EXAMPLES[file]()
    validate_manifest(manifest)
    path = DEPLOY / file
    if os.environ.get("NBCLUSTER_REGENERATE_DEPLOY") == "1":
        builder = "job_manifest" if manifest["kind"] == "Job" else "training_manifest"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            _HEADER.format(builder=builder, file=f"deploy/kubernetes/{file}")
            + yaml.safe_dump(manifest, sort_keys=False, width=100)
        )
    assert path.is_file(), f"{path} is missing: regenerate it (see this module's docstring)"
    loaded = yaml.safe_load(path.read_text())
    validate_manifest(loaded)
    assert loaded == manifest, f"{path} drifted from the builders: regenerate it"


# ---------------------------------------------------------------------------------------------
# Kubernetes fakes


class FakeLogResponse:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.released = False

    def stream(self, amt: int) -> Iterator[bytes]:
        yield from self.chunks

    def release_conn(self) -> None:
        self.released = True


def pod(name: str, phase: str, labels: dict[str, str] | None = None, waiting: str = "") -> Any:
    statuses = None
    if waiting:
        state = k8s.V1ContainerState(
            waiting=k8s.V1ContainerStateWaiting(reason=waiting, message="pull access denied")
        )
        statuses = [
            k8s.V1ContainerStatus(
                name="job", image="x", image_id="", ready=False, restart_count=0, state=state
            )
        ]
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=name, labels=labels or {}),
        status=k8s.V1PodStatus(phase=phase, container_statuses=statuses),
    )


class FakeCoreApi:
    def __init__(self, pods: list[list[Any]], logs: dict[str, list[bytes]]) -> None:
        self.pods = pods  # one list per call, the last one repeats
        self.logs = logs
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.responses: list[FakeLogResponse] = []

    def list_namespaced_pod(self, **kwargs: Any) -> Any:
        self.calls.append(("list_namespaced_pod", kwargs))
        items = self.pods.pop(0) if len(self.pods) > 1 else self.pods[0]
        return k8s.V1PodList(items=items)

    def read_namespaced_pod_log(self, **kwargs: Any) -> FakeLogResponse:
        self.calls.append(("read_namespaced_pod_log", kwargs))
        response = FakeLogResponse(self.logs[kwargs["name"]])
        self.responses.append(response)
        return response


class FakeBatchApi:
    def __init__(self, statuses: list[Any]) -> None:
        self.statuses = statuses  # one per read, the last one repeats; an exception is raised
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.deleted = False

    def create_namespaced_job(self, **kwargs: Any) -> Any:
        self.calls.append(("create_namespaced_job", kwargs))
        return k8s.V1Job(metadata=k8s.V1ObjectMeta(name=kwargs["body"]["metadata"]["name"]))

    def read_namespaced_job_status(self, **kwargs: Any) -> Any:
        self.calls.append(("read_namespaced_job_status", kwargs))
        if self.deleted:
            raise ApiException(status=404, reason="Not Found")
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if isinstance(status, Exception):
            raise status
        return k8s.V1Job(status=status)

    def delete_namespaced_job(self, **kwargs: Any) -> None:
        self.calls.append(("delete_namespaced_job", kwargs))
        self.deleted = True

    def created(self) -> dict[str, Any]:
        return next(kw["body"] for name, kw in self.calls if name == "create_namespaced_job")


def condition(kind: str, reason: str = "", message: str = "") -> Any:
    return k8s.V1JobCondition(type=kind, status="True", reason=reason, message=message)


RUNNING = k8s.V1JobStatus(active=1)


def kube_runtime(
    statuses: list[Any], pods: list[list[Any]], logs: dict[str, list[bytes]]
) -> tuple[KubernetesJobRuntime, FakeBatchApi, FakeCoreApi]:
    batch, core = FakeBatchApi(statuses), FakeCoreApi(pods, logs)
    return KubernetesJobRuntime(lambda: batch, lambda: core, namespace="ml", poll=0.01), batch, core


# ---------------------------------------------------------------------------------------------
# Kubernetes Job runtime


async def test_kubernetes_job_succeeds_and_logs(tmp_path: Path) -> None:
    statuses = [RUNNING, RUNNING, k8s.V1JobStatus(succeeded=1, conditions=[condition("Complete")])]
    pods = [[pod("p0", "Pending")], [pod("p0", "Running")]]
    runtime, batch, core = kube_runtime(statuses, pods, {"p0": [b"step 1\nst", b"ep 2\n"]})
    job = spec(runtime="kubernetes", env={"A": "1"})
    env = {"A": "1", "PATH": "/host", "NBCLUSTER_JOB_ID": "j1", "NBCLUSTER_GPUS": "0"}
    log_path = tmp_path / "log"
    handle = await runtime.start("j1", job, tmp_path, env, log_path)
    body = batch.created()
    name = body["metadata"]["name"]
    assert name.startswith("nbcluster-j1-") and len(name) == len("nbcluster-j1-") + 6
    assert batch.calls[0] == ("create_namespaced_job", {"namespace": "ml", "body": body})
    validate_manifest(body)
    assert body == job_manifest("j1", job, "ml", name=name, env={"NBCLUSTER_JOB_ID": "j1"})
    assert await handle.wait() == 0
    assert ("read_namespaced_job_status", {"name": name, "namespace": "ml"}) in batch.calls
    assert core.calls[0] == (
        "list_namespaced_pod",
        {"namespace": "ml", "label_selector": f"nbcluster.io/run={name}"},
    )
    reads = [kw for call, kw in core.calls if call == "read_namespaced_pod_log"]
    assert reads == [
        {
            "name": "p0",
            "namespace": "ml",
            "container": "job",
            "follow": True,
            "_preload_content": False,
        }
    ]
    assert log_path.read_bytes() == b"step 1\nstep 2\n"
    assert all(r.released for r in core.responses)
    assert await handle.wait() == 0  # the result is kept


async def test_kubernetes_job_failure_reason_in_log(tmp_path: Path) -> None:
    failed = k8s.V1JobStatus(
        failed=1,
        conditions=[
            condition("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
        ],
    )
    pods = [[pod("p0", "Failed")]]
    runtime, _, _ = kube_runtime([RUNNING, failed], pods, {"p0": [b"training...\n"]})
    log_path = tmp_path / "log"
    handle = await runtime.start("j2", spec(runtime="kubernetes"), tmp_path, {}, log_path)
    assert await handle.wait() == 1
    text = log_path.read_text()
    assert text.startswith("training...\n")
    assert "failed: DeadlineExceeded: Job was active longer than specified deadline" in text


async def test_kubernetes_job_failed_count_without_condition(tmp_path: Path) -> None:
    runtime, _, _ = kube_runtime([k8s.V1JobStatus(failed=1)], [[]], {})
    handle = await runtime.start("j3", spec(runtime="kubernetes"), tmp_path, {}, tmp_path / "l")
    assert await handle.wait() == 1
    assert "its pod failed" in (tmp_path / "l").read_text()


async def test_kubernetes_pod_that_cannot_start_is_reported(tmp_path: Path) -> None:
    stuck = pod("p0", "Pending", waiting="ErrImagePull")
    statuses = [RUNNING, RUNNING, RUNNING, k8s.V1JobStatus(failed=1)]
    runtime, _, core = kube_runtime(statuses, [[stuck]], {})
    handle = await runtime.start("j4", spec(runtime="kubernetes"), tmp_path, {}, tmp_path / "l")
    assert await handle.wait() == 1
    text = (tmp_path / "l").read_text()
    assert text.count("pod p0: ErrImagePull: pull access denied") == 1
    assert not [c for c, _ in core.calls if c == "read_namespaced_pod_log"]


async def test_kubernetes_cancel_deletes_foreground(tmp_path: Path) -> None:
    runtime, batch, _ = kube_runtime([RUNNING], [[]], {})
    handle = await runtime.start("j5", spec(runtime="kubernetes"), tmp_path, {}, tmp_path / "l")
    waiter = asyncio.create_task(handle.wait())
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await handle.cancel()
    name = batch.created()["metadata"]["name"]
    assert (
        "delete_namespaced_job",
        {
            "name": name,
            "namespace": "ml",
            "propagation_policy": "Foreground",
        },
    ) in batch.calls
    assert await asyncio.wait_for(waiter, 5) == -15


async def test_kubernetes_transient_status_errors_are_retried(tmp_path: Path) -> None:
    statuses = [ApiException(status=500, reason="etcd"), k8s.V1JobStatus(succeeded=1)]
    runtime, _, _ = kube_runtime(statuses, [[]], {})
    handle = await runtime.start("j6", spec(runtime="kubernetes"), tmp_path, {}, tmp_path / "l")
    assert await handle.wait() == 0


async def test_kubernetes_create_refused(tmp_path: Path) -> None:
    batch = FakeBatchApi([RUNNING])

    def refuse(**kwargs: Any) -> None:
        raise ApiException(status=403, reason="Forbidden")

    batch.create_namespaced_job = refuse  # type: ignore[method-assign]
    runtime = KubernetesJobRuntime(lambda: batch, lambda: FakeCoreApi([[]], {}))
    with pytest.raises(RuntimeError, match=r"cannot create Job nbcluster-j7-.*403 Forbidden"):
        await runtime.start("j7", spec(runtime="kubernetes"), tmp_path, {}, tmp_path / "l")


def test_kubernetes_check_names_the_field() -> None:
    made: list[str] = []
    runtime = KubernetesJobRuntime(lambda: made.append("batch"), lambda: made.append("core"))
    with pytest.raises(ValueError, match=r"^image:"):
        runtime.check(JobSpec(command=["true"]))
    with pytest.raises(ValueError, match=r"^workers:"):
        runtime.check(spec(runtime="pytorchjob", workers=2))
    with pytest.raises(ValueError, match=r"^inputs:"):
        runtime.check(spec(runtime="kubernetes", inputs={"data.csv": "k"}))
    with pytest.raises(ValueError, match=r"^outputs:"):
        runtime.check(spec(runtime="kubernetes", outputs=["model.pt"]))
    runtime.check(spec(runtime="kubernetes"))
    assert made == []  # no client until a job starts
    assert runtime.name == "kubernetes"


def test_default_factories_load_the_config_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubernetes import config

    loaded: list[str] = []

    def incluster() -> None:
        loaded.append("incluster")
        raise config.ConfigException("not in a cluster")

    monkeypatch.setattr(config, "load_incluster_config", incluster)
    monkeypatch.setattr(config, "load_kube_config", lambda: loaded.append("kube_config"))
    monkeypatch.setattr(kube_mod, "_config_loaded", False)
    runtime = KubernetesJobRuntime()
    TrainingJobRuntime(kind="TFJob")
    assert loaded == []
    assert isinstance(kube_mod.default_batch_api(), k8s.BatchV1Api)
    assert isinstance(kube_mod.default_core_api(), k8s.CoreV1Api)
    assert isinstance(kube_mod.default_custom_api(), k8s.CustomObjectsApi)
    assert loaded == ["incluster", "kube_config"]  # once
    assert runtime.namespace == "default"


# ---------------------------------------------------------------------------------------------
# Training job runtimes


class FakeCustomApi:
    def __init__(self, statuses: list[dict[str, Any]]) -> None:
        self.statuses = statuses
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def create_namespaced_custom_object(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("create", kwargs))
        return dict(kwargs["body"])

    def get_namespaced_custom_object(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("get", kwargs))
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {"status": status}

    def delete_namespaced_custom_object(self, **kwargs: Any) -> None:
        self.calls.append(("delete", kwargs))


def kubeflow_conditions(*kinds: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {
        "conditions": [
            {"type": "Created", "status": "True", "reason": "Created"},
            *(
                {"type": kind, "status": "True", "reason": reason, "message": message}
                for kind in kinds
            ),
        ]
    }


def replica_pod(name: str, kind: str, index: int) -> Any:
    labels = {
        "training.kubeflow.org/replica-type": kind,
        "training.kubeflow.org/replica-index": str(index),
    }
    return pod(name, "Running", labels)


@pytest.mark.parametrize(
    ("kind", "plural", "container", "workers"),
    [("PyTorchJob", "pytorchjobs", "pytorch", 2), ("TFJob", "tfjobs", "tensorflow", 2)],
)
async def test_training_job_succeeds(
    tmp_path: Path, kind: Any, plural: str, container: str, workers: int
) -> None:
    statuses = [
        kubeflow_conditions(),
        kubeflow_conditions("Running"),
        {"conditions": [{"type": "Succeeded", "status": "True", "reason": "Done"}]},
    ]
    custom = FakeCustomApi(statuses)
    core = FakeCoreApi(
        [[replica_pod("m0", "master", 0), replica_pod("w0", "worker", 0)]],
        {"m0": [b"rank 0\npartial", b" line\n"], "w0": [b"rank 1\n"]},
    )
    runtime = TrainingJobRuntime(lambda: custom, lambda: core, kind, namespace="ml", poll=0.01)
    assert runtime.name == kind.lower()
    runtime_name = "pytorchjob" if kind == "PyTorchJob" else "tfjob"
    job = spec(runtime=runtime_name, workers=workers)
    log_path = tmp_path / "log"
    handle = await runtime.start("t1", job, tmp_path, {"NBCLUSTER_JOB_ID": "t1"}, log_path)
    call, kwargs = custom.calls[0]
    body = kwargs["body"]
    name = body["metadata"]["name"]
    assert call == "create"
    assert kwargs == {
        "group": "kubeflow.org",
        "version": "v1",
        "namespace": "ml",
        "plural": plural,
        "body": body,
    }
    validate_manifest(body)
    assert body == training_manifest(
        "t1", job, "ml", kind, name=name, env={"NBCLUSTER_JOB_ID": "t1"}
    )
    assert await handle.wait() == 0
    assert (
        "get",
        {
            "group": "kubeflow.org",
            "version": "v1",
            "namespace": "ml",
            "plural": plural,
            "name": name,
        },
    ) in custom.calls
    reads = [kw for c, kw in core.calls if c == "read_namespaced_pod_log"]
    assert {r["container"] for r in reads} == {container}
    lines = sorted(log_path.read_text().splitlines())
    assert lines == ["[master-0] partial line", "[master-0] rank 0", "[worker-0] rank 1"]


async def test_training_job_failure_and_cancel(tmp_path: Path) -> None:
    failed = kubeflow_conditions("Running", "Failed", reason="PyTorchJobFailed", message="oom")
    custom = FakeCustomApi([kubeflow_conditions("Running"), failed])
    core = FakeCoreApi([[]], {})
    runtime = TrainingJobRuntime(lambda: custom, lambda: core, "PyTorchJob", poll=0.01)
    handle = await runtime.start(
        "t2", spec(runtime="pytorchjob", workers=2), tmp_path, {}, tmp_path / "log"
    )
    assert await handle.wait() == 1
    assert "PyTorchJobFailed: oom" in (tmp_path / "log").read_text()
    await handle.cancel()
    name = custom.calls[0][1]["body"]["metadata"]["name"]
    assert custom.calls[-1] == (
        "delete",
        {
            "group": "kubeflow.org",
            "version": "v1",
            "namespace": "default",
            "plural": "pytorchjobs",
            "name": name,
            "propagation_policy": "Foreground",
        },
    )


def test_training_runtime_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match=r"^kind:"):
        TrainingJobRuntime(kind="MPIJob")  # type: ignore[arg-type]
