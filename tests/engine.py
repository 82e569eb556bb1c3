"""A real Docker engine and nbcluster's image, for tests that run containers.

::

    from ..engine import docker_engine, nbcluster_image, TEST_LABEL, remove_test_containers

    client = docker_engine()   # a docker.DockerClient on a live engine (else skip, or fail)
    image = nbcluster_image()  # "nbcluster:test-<hash>": gateway, host and kernel image
    client.containers.run(image, ..., labels={TEST_LABEL: "my-test"}, network_mode="host")
    ...
    remove_test_containers("my-test")  # at the end, whatever happened

* :func:`docker_engine` skips the test with the reason (how to start an engine: run
  ``deploy/docker/engine-up.sh``) when no engine answers; with
  ``NBCLUSTER_TEST_REQUIRE_DOCKER=1`` (set by ``.ci/run``) it fails instead, so that CI never
  passes by skipping.
* :func:`nbcluster_image` builds the base (``nbcluster-base:bookworm`` with
  ``deploy/docker/build-base.sh``, unless ``NBCLUSTER_TEST_IMAGE_BASE`` names another base,
  e.g. ``python:3.11-slim`` where a registry can be reached) and the nbcluster image
  (``deploy/docker/build-image.sh``) at most once per state of the sources: the image carries a
  hash of ``src/``, ``pyproject.toml``, the Dockerfile, its build script and the base image's id
  as its ``nbcluster.source-hash`` label, and a run with the same hash reuses it (even across
  pytest sessions). A build takes minutes on a fresh machine; it does not count against the
  calling test's pytest-timeout (it has its own bound, :data:`BUILD_TIMEOUT`). Builds are
  serialised with a file lock, so that concurrent pytest sessions on one machine build once.
  ``python -m tests.engine`` builds both ahead of a test run (``.ci/run`` does).

Both are cached for the process. Containers that tests start should use host networking or a
network the test creates, and carry :data:`TEST_LABEL` so that they can be removed by label.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

__all__ = [
    "BASE_IMAGE",
    "BUILD_TIMEOUT",
    "IMAGE_REPOSITORY",
    "REQUIRE_ENV",
    "SOURCE_HASH_LABEL",
    "TEST_LABEL",
    "base_image",
    "docker_engine",
    "nbcluster_image",
    "remove_test_containers",
    "source_hash",
]

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "docker"

#: Set to 1 to make a missing engine a failure rather than a skip (CI).
REQUIRE_ENV = "NBCLUSTER_TEST_REQUIRE_DOCKER"
#: The base the test image is built FROM, unless NBCLUSTER_TEST_IMAGE_BASE names another.
BASE_IMAGE = "nbcluster-base:bookworm"
#: Test images are tagged ``nbcluster:test-<first 12 hex digits of the source hash>``.
IMAGE_REPOSITORY = "nbcluster"
SOURCE_HASH_LABEL = "nbcluster.source-hash"
#: A label for containers started by tests: ``{TEST_LABEL: "<test's own value>"}``.
TEST_LABEL = "nbcluster.test"
#: Seconds a base or image build may take (a fresh machine: about 1.5 + 2.5 minutes).
BUILD_TIMEOUT = 900.0
#: Test images kept besides the current one (older ones are removed when not in use).
KEEP_OLD_IMAGES = 2

_LOCK_FILE = Path("/tmp/nbcluster-test-image.lock")
_state: dict[str, Any] = {}


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: docker tests must run)", pytrace=False)
    pytest.skip(reason)


def docker_engine() -> Any:
    """A ``docker.DockerClient`` on a live engine (API version negotiated: the Debian engine
    speaks 1.41). Skips the test, or fails it under ``NBCLUSTER_TEST_REQUIRE_DOCKER=1``, when
    none answers."""
    if "client" in _state:
        return _state["client"]
    if "no_engine" in _state:
        _unavailable(_state["no_engine"])
    try:
        import docker

        client = docker.DockerClient.from_env(version="auto", timeout=60)
        client.ping()
    except Exception as exc:
        _state["no_engine"] = (
            f"no Docker engine answers ({type(exc).__name__}: {exc}); "
            "start one with deploy/docker/engine-up.sh (as root)"
        )
        _unavailable(_state["no_engine"])
    _state["client"] = client
    return client


def base_image() -> str:
    """The base image tests build FROM (built here when it is the default and absent)."""
    base = os.environ.get("NBCLUSTER_TEST_IMAGE_BASE", BASE_IMAGE)
    client = docker_engine()
    if not _image_exists(client, base):
        if base != BASE_IMAGE:
            pytest.fail(f"NBCLUSTER_TEST_IMAGE_BASE={base}: no such image", pytrace=False)
        _run(["bash", str(DEPLOY / "build-base.sh"), base], "building the base image")
    return base


def source_hash(base: str | None = None) -> str:
    """What the image is a function of: the package's sources, pyproject.toml, the
    Dockerfile, its build script and the base image's id."""
    digest = hashlib.sha256()
    files = [REPO / "pyproject.toml", DEPLOY / "Dockerfile", DEPLOY / "build-image.sh"]
    for path in sorted((REPO / "src").rglob("*")):
        parts = path.relative_to(REPO).parts
        skipped = "__pycache__" in parts or any(p.endswith(".egg-info") for p in parts)
        if path.is_file() and not skipped and path.suffix != ".pyc":
            files.append(path)
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    if base is not None:
        digest.update(str(docker_engine().images.get(base).id).encode())
    return digest.hexdigest()


def nbcluster_image() -> str:
    """The tag of the nbcluster image for the sources as they are now, built if needed."""
    if "image" in _state:
        return str(_state["image"])
    client = docker_engine()
    # The alarm is paused first: waiting for another session's build counts as building.
    with _timeout_paused(), _build_lock():
        base = base_image()
        wanted = source_hash(base)
        tag = f"{IMAGE_REPOSITORY}:test-{wanted[:12]}"
        if not _has_hash(client, tag, wanted):
            _run(
                [
                    "bash",
                    str(DEPLOY / "build-image.sh"),
                    "--base",
                    base,
                    "--tag",
                    tag,
                    "--label",
                    f"{SOURCE_HASH_LABEL}={wanted}",
                ],
                f"building {tag}",
            )
            if not _has_hash(client, tag, wanted):
                pytest.fail(f"{tag} was built without its {SOURCE_HASH_LABEL} label")
        _remove_old_images(client, tag)
    _state["image"] = tag
    return tag


def remove_test_containers(value: str | None = None) -> list[str]:
    """Remove (forcibly) the containers labelled ``TEST_LABEL=value`` (any value: None);
    returns their names."""
    client = docker_engine()
    selector = TEST_LABEL if value is None else f"{TEST_LABEL}={value}"
    removed = []
    for container in client.containers.list(all=True, filters={"label": selector}):
        with contextlib.suppress(Exception):  # removed concurrently
            container.remove(force=True)
            removed.append(str(container.name))
    return removed


# -- internals --------------------------------------------------------------------------------


def _image_exists(client: Any, name: str) -> bool:
    import docker

    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def _has_hash(client: Any, tag: str, wanted: str) -> bool:
    import docker

    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return bool((image.labels or {}).get(SOURCE_HASH_LABEL) == wanted)


def _remove_old_images(client: Any, current: str) -> None:
    """Keep the current test image and the newest few others: each rebuild after a source
    change leaves one behind, and disks fill. One still used by a container stays."""
    old = [
        image
        for image in client.images.list(filters={"label": SOURCE_HASH_LABEL})
        if current not in image.tags
        and any(t.startswith(f"{IMAGE_REPOSITORY}:test-") for t in image.tags)
    ]
    old.sort(key=lambda image: str(image.attrs.get("Created", "")), reverse=True)
    for image in old[KEEP_OLD_IMAGES:]:
        for tag in image.tags:
            with contextlib.suppress(Exception):
                client.images.remove(tag, noprune=False)


def _run(argv: list[str], what: str) -> None:
    started = time.monotonic()
    try:
        done = subprocess.run(
            argv,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: not done after {BUILD_TIMEOUT:g} s", pytrace=False)
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        pytest.fail(
            f"{what} failed ({Path(argv[1]).name} exited {done.returncode}):\n{output[-4000:]}",
            pytrace=False,
        )
    summary = [line for line in output.splitlines() if line.startswith("build-")]
    print(f"{what}: {time.monotonic() - started:.0f} s; " + "; ".join(summary), file=sys.stderr)


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """One build at a time on this machine (another pytest session may be building), waiting
    at most BUILD_TIMEOUT for the lock."""
    deadline = time.monotonic() + BUILD_TIMEOUT
    with _LOCK_FILE.open("a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{_LOCK_FILE} held for {BUILD_TIMEOUT:g} s by another build")
                time.sleep(0.5)  # another session builds: poll its lock
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _timeout_paused() -> Iterator[None]:
    """Stop pytest-timeout's alarm (its ``signal`` method: an ITIMER_REAL) while an image is
    built, and restart it with the time that was left: a build on a fresh machine takes
    longer than any test may, and is bounded by BUILD_TIMEOUT instead."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    remaining, interval = signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        yield
    finally:
        if remaining > 0:
            signal.setitimer(signal.ITIMER_REAL, remaining, interval)


def _main() -> int:
    """``python -m tests.engine``: build the base and the test image now (ahead of pytest)."""
    started = time.monotonic()
    try:
        tag = nbcluster_image()
    except BaseException as exc:  # pytest's skip/fail outcomes are BaseExceptions
        print(f"tests.engine: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"tests.engine: {tag} ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
