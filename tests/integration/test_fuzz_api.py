"""Schemathesis against the gateway's own ``/openapi.json`` (issue 13, "Fuzzing in the suite").

A real cluster on loopback (a gateway and one host daemon, one replica per kernel); every
operation of the OpenAPI document gets generated requests, valid ones and invalid ones
(schemathesis' positive and negative modes), sent

* as the admin and as a user (with a kernel quota): no 5xx but the ones the gateway gives when
  something it depends on cannot serve (below), every status, content type and body as the
  document says (error bodies included: ``{"message", "reason"}``), and invalid input refused
  with a 4xx. Then again with the ids of a live kernel and a finished job in the path, so
  that the handlers behind the "no such kernel" check are reached too;
* with no token, a wrong token and the join token: every operation refused (401, 403, 403)
  with a JSON message, whatever the request.

Afterwards the gateway is still up, its log holds no unhandled exception, its host is still
connected, and a new kernel runs a cell.

Bounded: ``NBCLUSTER_FUZZ_EXAMPLES`` examples per operation and mode (default 10; raise it
locally for a longer run), derandomized (the same requests on every run), no shrinking.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.core.failures import Failure
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from nbcluster.client import GatewayClient
from nbcluster.identity import Quotas, UsersFile

from ..cluster import Cluster, running_cluster, wait_for
from ..fuzz import fuzz_settings

pytestmark = pytest.mark.integration

#: Examples per operation and generation mode; ``NBCLUSTER_FUZZ_EXAMPLES=200`` for a long run.
EXAMPLES = int(os.environ.get("NBCLUSTER_FUZZ_EXAMPLES", "10"))

#: The only 5xx answers that are not bugs: 503 when something the gateway depends on cannot
#: serve the request now (no host has room for the kernel yet, the object store or the
#: identity source is down, hosts cannot be started). Each names what is unavailable.
DEPENDENCY_UNAVAILABLE = {
    "kernel could not be started",
    "host provider failed",
    "store error",
    "identity source unavailable",
}

#: Seconds one request may take: longer is a hang (a request that never returns), a failure.
REQUEST_TIMEOUT = 30.0

#: A path parameter schemathesis fills with a live id in the second round.
LIVE_PARAMETERS = ("kernel_id", "job_id")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("fuzz-api") / "state", hosts=1) as c:
        yield c


@pytest.fixture(scope="module")
def tokens(cluster: Cluster) -> dict[str, str]:
    users = UsersFile(cluster.state_dir / "gateway" / "users.json")
    return {
        "admin": cluster.token,
        "user": users.add("fuzzer", quotas=Quotas(kernels=1, gpus=1)),
    }


@pytest.fixture(scope="module")
def schema(cluster: Cluster) -> Any:
    return schemathesis.openapi.from_url(
        f"{cluster.url}/openapi.json", headers=_auth(cluster.token), timeout=30
    )


def _auth(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"token {token}"}


#: Endpoints whose answer never ends (server-sent events): a client that reads a response to
#: its end would wait out REQUEST_TIMEOUT on every case. They are fuzzed without a token (the
#: refusal is immediate); their streams are tested in tests/integration/test_notices.py.
STREAMING = frozenset({"GET /api/cluster/events/stream"})


def _operations(schema: Any, streaming: bool = True) -> list[Any]:
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25, [op.label for op in operations]
    return [op for op in operations if streaming or op.label not in STREAMING]


def dependency_unavailable_only(ctx: CheckContext, response: Any, case: Case) -> bool | None:
    """``not_a_server_error``, except for a 503 that says which dependency is unavailable."""
    if response.status_code == 503:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("reason") in DEPENDENCY_UNAVAILABLE:
            return None
    return not_a_server_error(ctx, response, case)


CHECKS = [
    dependency_unavailable_only,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PATH_PART = re.compile(r"[^A-Za-z0-9_.-]")


def _safe_path(name: str) -> str:
    """``name`` made a relative path the gateway takes: the fuzzer keeps its shape."""
    parts = [_PATH_PART.sub("_", part).lstrip(".") for part in name.split("/")]
    return "/".join(part or "x" for part in parts)


def _prepare(case: Case) -> None:
    """What a generated job would run is replaced by something harmless: the fuzzer tests
    the gateway, not what a host runs (random argv could name a real program, a container
    runtime would reach for a registry).

    And a request meant to be valid is made one the gateway can accept where the document
    cannot say what it takes (one of ``command`` and ``source``; variable names; relative
    paths), so that accepted jobs and uploads are fuzzed too, not only refusals. The rest of
    what was generated stays."""
    positive = case.meta is not None and case.meta.generation.mode is GenerationMode.POSITIVE
    if case.operation.label == "POST /api/jobs/inputs" and positive:
        name = case.query.get("name") if case.query else None
        if isinstance(name, str):
            case.query = {**case.query, "name": _safe_path(name)}
    if case.operation.label != "POST /api/jobs" or not isinstance(case.body, dict):
        return
    body = dict(case.body)
    command = body.get("command")
    if isinstance(command, list) and command and all(isinstance(a, str) for a in command):
        body["command"] = ["true", *command[1:]]
    if isinstance(body.get("source"), str):
        body["source"] = "pass"
    if isinstance(body.get("runtime"), str):
        body["runtime"] = "process"
    if positive:
        if body.get("command") is None and body.get("source") is None:
            body["command"] = ["true"]
        elif body.get("command") is not None:
            body.pop("source", None)
        env = body.get("env") or {}
        body["env"] = {k: v.replace("\0", "") for k, v in env.items() if _NAME.match(k)}
        for field in ("inputs", "inline_inputs"):
            body[field] = {_safe_path(k): v for k, v in (body.get(field) or {}).items()}
        body["outputs"] = [_safe_path(name) for name in body.get("outputs") or []]
        body["workers"] = 1  # more need a distributed runtime (tfjob, pytorchjob)
        if body.get("fast"):
            body["inputs"] = {}  # a fast job takes inline inputs only
    case.body = body


def _describe(case: Case, response: Any, problem: object) -> str:
    return f"{case.operation.label}: {problem}\n    {case.as_curl_command(headers={})}" + (
        f"\n    -> {response.status_code} {response.text[:300]}" if response is not None else ""
    )


def fuzz(
    cluster: Cluster,
    operation: Any,
    headers: dict[str, str],
    *,
    examples: int = EXAMPLES,
    path_parameters: dict[str, str] | None = None,
    expect: Callable[[Any], str | None] | None = None,
    after: Callable[[Case, Any], None] | None = None,
) -> list[str]:
    """Run ``examples`` generated requests of each mode against ``operation``; returns what
    failed (empty: nothing). ``expect(response)`` may name a problem with a response;
    ``after(case, response)`` cleans up (e.g. stops a kernel the request started)."""
    failures: list[str] = []
    statuses: dict[int, int] = {}
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

        @settings(fuzz_settings, max_examples=examples)
        @given(case=strategy)
        def run(case: Case) -> None:
            _prepare(case)
            try:
                response = case.call(base_url=cluster.url, headers=headers, timeout=REQUEST_TIMEOUT)
            except Exception as exc:  # a timeout, a reset connection: the gateway failed
                failures.append(_describe(case, None, f"{type(exc).__name__}: {exc}"))
                return
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            try:
                if after is not None:
                    after(case, response)
                problem = expect(response) if expect is not None else None
                if problem:
                    failures.append(_describe(case, response, problem))
                case.validate_response(response, checks=CHECKS, headers=headers)
            except (Failure, AssertionError, BaseExceptionGroup) as exc:
                failures.append(_describe(case, response, _first_line(exc)))

        try:
            run()
        except Exception as exc:
            if type(exc).__name__ == "Unsatisfiable":
                continue  # no invalid request exists (an operation without parameters)
            raise
    # What each operation answered (pytest -s shows it): a fuzzer that only ever got 404s
    # reached nothing.
    print(f"{operation.label}: {dict(sorted(statuses.items()))}")
    return failures


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_first_line(e) for e in exc.exceptions)
    title = getattr(exc, "title", "") or type(exc).__name__
    message = str(getattr(exc, "message", "") or exc).strip().splitlines()
    return f"{title}: {' '.join(message[:3])}"


def _stop_started_kernels(cluster: Cluster) -> Callable[[Case, Any], None]:
    """A kernel a generated request started is shut down at once: at most one runs."""

    def after(case: Case, response: Any) -> None:
        if case.operation.label == "POST /api/kernels" and response.status_code == 201:
            cluster.http.delete(f"/api/kernels/{response.json()['id']}")

    return after


def _gateway_still_serves(cluster: Cluster) -> None:
    assert cluster.gateway is not None and cluster.gateway.poll() is None, cluster.logs()
    assert cluster.http.get("/api").status_code == 200
    assert cluster.connected_hosts() == ["host-1"]
    log = (cluster.log_dir / "gateway.log").read_text(errors="replace")
    unhandled = [
        m.group(0)
        for m in re.finditer(r"(Exception in ASGI application|Traceback).{0,2000}", log, re.S)
    ]
    assert not unhandled, "the gateway logged an unhandled exception:\n" + unhandled[0]

    async def run_a_cell() -> None:
        async with GatewayClient(cluster.url, cluster.token) as gw:
            kernel = await gw.start_kernel()
            try:
                async with gw.channels(kernel["id"]) as channels:
                    result = await channels.execute("print(6 * 7)")
                    assert result.status == "ok", result.reply
                    assert result.stream_text() == "42\n"
            finally:
                await gw.shutdown_kernel(kernel["id"])

    asyncio.run(run_a_cell())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("who", ["admin", "user"])
def test_every_operation_with_a_token(
    cluster: Cluster, schema: Any, tokens: dict[str, str], who: str
) -> None:
    headers = _auth(tokens[who])
    failures: list[str] = []
    for operation in _operations(schema, streaming=False):
        failures += fuzz(cluster, operation, headers, after=_stop_started_kernels(cluster))
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)
    _gateway_still_serves(cluster)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("who", ["admin", "user"])
def test_operations_on_a_live_kernel_and_job(
    cluster: Cluster, schema: Any, tokens: dict[str, str], who: str
) -> None:
    """The same with a kernel and a job of the caller's in the path: the handlers past the
    ownership check get generated bodies and parameters (migrate, checkpoint, logs with
    offsets, outputs ...). Destructive operations run last (restart, then shutdown)."""
    token = tokens[who]
    headers = _auth(token)

    async def live_ids() -> dict[str, str]:
        async with GatewayClient(cluster.url, token) as gw:
            kernel = await gw.start_kernel()
            job = await gw.submit_job({"command": ["echo", "fuzz"]})
        return {"kernel_id": kernel["id"], "job_id": job["id"]}

    ids = asyncio.run(live_ids())
    wait_for(
        lambda: cluster.http.get(f"/api/jobs/{ids['job_id']}").json()["status"] == "succeeded",
        30,
        "the job to finish",
    )
    last = ("/api/kernels/{kernel_id}/restart", "/api/kernels/{kernel_id}")
    operations = sorted(
        (
            op
            for op in _operations(schema)
            if any(f"{{{name}}}" in op.path for name in LIVE_PARAMETERS)
        ),
        key=lambda op: (op.path in last, op.method.upper() == "DELETE"),
    )
    failures: list[str] = []
    for operation in operations:
        path_parameters = {n: ids[n] for n in LIVE_PARAMETERS if f"{{{n}}}" in operation.path}
        failures += fuzz(
            cluster,
            operation,
            headers,
            examples=max(2, EXAMPLES // 3),
            path_parameters=path_parameters,
        )
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)
    _gateway_still_serves(cluster)


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("who", "status", "message"),
    [
        ("nobody", 401, "missing token"),
        ("stranger", 403, "invalid token"),
        ("host", 403, "forbidden: a host daemon may not call"),
    ],
)
def test_every_operation_is_refused_without_a_users_token(
    cluster: Cluster, schema: Any, who: str, status: int, message: str
) -> None:
    """No token, a wrong one, the hosts' join token: refused before any handler runs,
    whatever the request (the join token may call ``GET /api`` only)."""
    token = {"nobody": None, "stranger": "not-a-token", "host": cluster.join_token}[who]

    def expect(response: Any) -> str | None:
        if response.status_code != status:
            return f"expected {status}, got {response.status_code}"
        if message not in response.json()["message"]:
            return f"expected a message with {message!r}"
        return None

    failures: list[str] = []
    for operation in _operations(schema):
        if who == "host" and operation.label == "GET /api":
            continue
        failures += fuzz(cluster, operation, _auth(token), examples=3, expect=expect)
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)
    _gateway_still_serves(cluster)
