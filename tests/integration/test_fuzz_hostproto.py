"""Hypothesis on the host protocol (issue 13, "Fuzzing in the suite"): arbitrary frames and
mutated valid ones sent over a real websocket to ``/api/cluster/hosts/connect`` with the join
token, by fake hosts, next to a real host daemon that runs a kernel and has run a job.

* First frames (``test_first_frames``): a valid hello is welcomed; anything else (not JSON,
  binary, another message, a mutated hello) is refused with close code 1008 and a reason
  naming the problem. Never an internal error (1011) or a dropped connection.
* Sessions (``test_frames_after_a_hello``): after a valid hello, any sequence of frames (events
  with the real kernel's and job's ids, mutated events, garbage): the fake host stays
  connected (a bad frame is dropped and counted, not fatal) or is closed with a clean code.
* A fake worker's own job (``test_events_of_a_fake_workers_job``): the gateway gives the fake
  host a job; its output and end events, mutated, are taken or refused.

After every example the real host is still connected, ``GET /api`` answers and the gateway
logged no unhandled exception; at the end the real host's kernel still runs a cell and the
real job is still ``succeeded`` with its output.

Bounded: ``NBCLUSTER_FUZZ_EXAMPLES`` (default 10) times 5 examples per test, derandomized.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from nbcluster.client import GatewayClient
from nbcluster.hostproto import Hello, HostProtocolError, decode_host_message

from ..cluster import Cluster, running_cluster, wait_for
from ..fuzz import EXAMPLES, fuzz_settings
from ..unit.strategies import json_values

pytestmark = pytest.mark.integration

#: Unique names for the fake hosts (a name still connected is refused, by design).
_names = (f"fuzz-{n}" for n in itertools.count(1))

#: Stands for the fake worker's job in generated frames (its id is known only once given).
THE_JOB = "__the_fake_workers_job__"

#: The jobs the gateway gave the fake hosts.
given_jobs: list[str] = []


class Live:
    """The real host's kernel and job, whose ids the fake hosts use."""

    kernel_id = ""
    replica_id = ""
    job_id = ""


LIVE = Live()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("fuzz-hosts") / "state", hosts=1) as c:

        async def start() -> None:
            async with GatewayClient(c.url, c.token) as gw:
                kernel = await gw.start_kernel()
                async with gw.channels(kernel["id"]) as channels:
                    assert (await channels.execute("x = 41")).status == "ok"
                job = await gw.submit_job({"command": ["echo", "fuzzed"]})
            LIVE.kernel_id, LIVE.job_id = kernel["id"], job["id"]

        asyncio.run(start())
        [replica] = c.replicas(LIVE.kernel_id)
        LIVE.replica_id = replica["replica_id"]
        wait_for(lambda: _job(c)["status"] == "succeeded", 30, "the real job to finish")
        yield c
        # Nothing the fake hosts sent reached the real kernel or job.
        assert c.connected_hosts()[:1] == ["host-1"]
        job = _job(c)
        assert job["status"] == "succeeded" and job["worker"] == "host-1", job
        assert c.http.get(f"/api/jobs/{LIVE.job_id}/logs").text == "fuzzed\n"

        async def still_runs() -> None:
            async with (
                GatewayClient(c.url, c.token) as gw,
                gw.channels(LIVE.kernel_id) as channels,
            ):
                result = await channels.execute("print(x + 1)")
                assert result.stream_text() == "42\n", result.reply

        asyncio.run(still_runs())


def _job(cluster: Cluster) -> dict[str, Any]:
    job: dict[str, Any] = cluster.http.get(f"/api/jobs/{LIVE.job_id}").json()
    return job


# -- strategies --------------------------------------------------------------------------------

#: Small, edge and unbounded integers (JSON has no limit; orjson and C code do).
ints = (
    st.integers(-3, 70_000) | st.sampled_from([2**31, 2**63 - 1, -(2**63), 2**64]) | st.integers()
)
texts = st.text(max_size=16)
ids = st.builds(lambda: LIVE.kernel_id) | st.builds(lambda: LIVE.replica_id) | texts
job_ids = st.builds(lambda: LIVE.job_id) | texts
host_names = st.sampled_from(["host-1", "fuzz-1", ""]) | st.from_regex(
    r"[A-Za-z0-9._-]{1,20}", fullmatch=True
)

gpus = st.fixed_dictionaries(
    {"index": ints, "uuid": texts, "name": texts, "memory_mb": ints, "virtual": st.booleans()}
)
resources = st.fixed_dictionaries(
    {"cpus": ints, "memory_mb": ints}, optional={"gpus": st.lists(gpus, max_size=4)}
)
connection = st.fixed_dictionaries(
    {
        "ip": st.sampled_from(["127.0.0.1", "", "::1", "256.0.0.1"]) | texts,
        "shell_port": ints,
        "iopub_port": ints,
        "stdin_port": ints,
        "control_port": ints,
        "hb_port": ints,
    },
    optional={"transport": st.sampled_from(["tcp", "ipc"]), "raft_port": ints | st.none()},
)
reports = st.fixed_dictionaries(
    {"kernel_id": ids, "replica_id": ids, "pid": ints, "connection": connection}
)


def hellos(name: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "type": st.just("hello"),
            "name": name,
            "address": st.just("127.0.0.1") | texts,
            "resources": resources,
        },
        optional={
            "protocol": ints,
            "replicas": st.lists(reports, max_size=3),
            "jobs": st.lists(job_ids, max_size=3),
            "job_attempts": st.dictionaries(job_ids, ints, max_size=3),
        },
    )


def events(job: st.SearchStrategy[str] = job_ids) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        st.fixed_dictionaries({"type": st.just("heartbeat")}, optional={"replicas": ints}),
        st.fixed_dictionaries(
            {"type": st.just("reply"), "request_id": texts, "ok": st.booleans()},
            optional={"result": st.dictionaries(texts, json_values, max_size=3), "error": texts},
        ),
        st.fixed_dictionaries(
            {
                "type": st.just("replica_exited"),
                "kernel_id": ids,
                "replica_id": ids,
                "exit_code": ints | st.none(),
                "requested": st.booleans(),
            },
            optional={"log_tail": texts},
        ),
        st.fixed_dictionaries(
            {"type": st.just("job_output"), "job_id": job, "data": st.text(max_size=64)},
            optional={"attempt": ints, "offset": ints | st.none(), "end": ints | st.none()},
        ),
        st.fixed_dictionaries(
            {"type": st.just("job_exited"), "job_id": job, "exit_code": ints | st.none()},
            optional={
                "attempt": ints,
                "error": texts,
                "log_tail": texts,
                "outputs": st.dictionaries(texts, texts, max_size=2),
                "result": texts | st.none(),
            },
        ),
        hellos(host_names),
    )


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A valid message, or one with a field dropped, retyped or added."""
    message = dict(draw(valid))
    how = draw(st.sampled_from(["keep", "keep", "drop", "retype", "add"]))
    keys = sorted(message)
    if how == "drop":
        message.pop(draw(st.sampled_from(keys)))
    elif how == "retype":
        message[draw(st.sampled_from(keys))] = draw(json_values)
    elif how == "add":
        message[draw(texts)] = draw(json_values)
    return message


#: What a frame is: (text or bytes to send).
def frames(job: st.SearchStrategy[str] = job_ids) -> st.SearchStrategy[str | bytes]:
    return st.one_of(
        mutated(events(job)).map(json.dumps),
        json_values.map(json.dumps),
        st.text(max_size=64),
        st.binary(max_size=64),
    )


# -- the fake host -----------------------------------------------------------------------------


def _connect(cluster: Cluster) -> ClientConnection:
    url = cluster.url.replace("http://", "ws://") + "/api/cluster/hosts/connect"
    return connect(
        url,
        additional_headers={"Authorization": f"token {cluster.join_token}"},
        open_timeout=10,
        close_timeout=5,
        max_size=None,
    )


class GatewayLog:
    """The gateway's log from a point on: an unhandled exception in it is a crash."""

    def __init__(self, cluster: Cluster) -> None:
        self.path = cluster.log_dir / "gateway.log"
        self.offset = self.path.stat().st_size

    def new_crashes(self) -> list[str]:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            text = f.read().decode(errors="replace")
        self.offset += len(text.encode(errors="replace"))
        lines = text.splitlines()
        return [
            "\n".join(lines[i : i + 40])
            for i, line in enumerate(lines)
            if "Exception in ASGI application" in line or line.startswith("Traceback")
        ]


def _still_serving(cluster: Cluster, log: GatewayLog) -> None:
    assert cluster.gateway is not None and cluster.gateway.poll() is None, cluster.logs()
    assert cluster.http.get("/api").status_code == 200
    hosts = {h["name"]: h["state"] for h in cluster.http.get("/api/cluster/hosts").json()}
    assert hosts["host-1"] == "connected", hosts
    crashes = log.new_crashes()
    assert not crashes, "the gateway logged an unhandled exception:\n" + crashes[0]


def _closed_cleanly(exc: ConnectionClosed) -> None:
    """The gateway closed the connection on purpose: a code it chose and a reason."""
    assert exc.rcvd is not None, f"the connection dropped without a close frame: {exc}"
    assert exc.rcvd.code in (1008, 4000), f"closed with {exc.rcvd.code} {exc.rcvd.reason!r}"
    assert exc.rcvd.reason, "closed without a reason"


def _expected_hello(frame: str | bytes) -> Hello | None:
    if isinstance(frame, bytes):
        return None
    try:
        message = decode_host_message(frame)
    except HostProtocolError:
        return None
    return message if isinstance(message, Hello) else None


def _hosts(cluster: Cluster) -> dict[str, str]:
    return {h["name"]: h["state"] for h in cluster.http.get("/api/cluster/hosts").json()}


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_first_frames(cluster: Cluster) -> None:
    log = GatewayLog(cluster)

    @fuzz_settings
    @given(frame=frames() | mutated(hellos(st.builds(lambda: next(_names)))).map(json.dumps))
    def first(frame: str | bytes) -> None:
        note(f"first frame: {frame!r}")
        hello = _expected_hello(frame)
        with _connect(cluster) as ws:
            ws.send(frame)
            try:
                answer = json.loads(ws.recv(timeout=15))
            except ConnectionClosed as exc:
                _closed_cleanly(exc)
                assert exc.rcvd is not None
                reason = exc.rcvd.reason
                if hello is not None:  # only a name in use refuses a valid hello
                    assert "already connected" in reason, reason
                else:
                    assert reason.startswith(("invalid host message", "expected a hello")), reason
                    assert "binary frame" in reason or not isinstance(frame, bytes), reason
            else:
                assert hello is not None, f"welcomed after {frame!r}"
                assert answer["type"] == "welcome"
        _still_serving(cluster, log)

    first()


@pytest.mark.timeout(600)
def test_frames_after_a_hello(cluster: Cluster) -> None:
    log = GatewayLog(cluster)

    @fuzz_settings
    @given(hello=hellos(st.builds(lambda: next(_names))), sent=st.lists(frames(), max_size=6))
    def session(hello: dict[str, Any], sent: list[str | bytes]) -> None:
        note(f"hello: {hello!r}\nthen: {sent!r}")
        if _expected_hello(json.dumps(hello)) is None:
            return  # not a valid hello: test_first_frames covers it
        with _connect(cluster) as ws:
            ws.send(json.dumps(hello))
            assert json.loads(ws.recv(timeout=15))["type"] == "welcome"
            try:
                for frame in sent:
                    ws.send(frame)
                    _answer_requests(ws)
                # Still connected, as far as the gateway knows: a bad frame is not fatal.
                wait_for(
                    lambda: _hosts(cluster).get(hello["name"]) == "connected",
                    10,
                    "the fake host to be listed",
                )
                assert ws.ping().wait(10)
            except ConnectionClosed as exc:
                _closed_cleanly(exc)
        _still_serving(cluster, log)

    session()


@pytest.mark.timeout(600)
def test_events_of_a_fake_workers_job(cluster: Cluster) -> None:
    """A job only a host with 16 GPUs can take goes to the fake host, which says it started
    and then sends mutated output and end events of it."""
    log = GatewayLog(cluster)
    gpu = {"uuid": "GPU-fuzz", "name": "fuzz", "memory_mb": 80_000, "virtual": True}

    @settings(fuzz_settings, max_examples=max(5, EXAMPLES // 3))
    @given(sent=st.lists(frames(st.just(THE_JOB) | job_ids), min_size=1, max_size=6))
    def worker(sent: list[str | bytes]) -> None:
        note(f"frames: {sent!r}")
        name = next(_names)
        hello = {
            "type": "hello",
            "name": name,
            "address": "127.0.0.1",
            "resources": {
                "cpus": 4,
                "memory_mb": 64_000,
                "gpus": [{"index": i, **gpu} for i in range(16)],
            },
        }
        with _connect(cluster) as ws:
            ws.send(json.dumps(hello))
            assert json.loads(ws.recv(timeout=15))["type"] == "welcome"
            # Submitted once the host is known: a job larger than every host is refused.
            submitted = cluster.http.post(
                "/api/jobs", json={"command": ["true"], "resources": {"gpus": 16}, "retries": 0}
            )
            assert submitted.status_code == 201, submitted.text
            job_id = submitted.json()["id"]
            try:
                deadline = time.monotonic() + 15
                while job_id not in given_jobs and time.monotonic() < deadline:
                    _answer_requests(ws, timeout=0.5)
                assert job_id in given_jobs, "the fake host got no job"
                for frame in sent:
                    ws.send(frame.replace(THE_JOB, job_id) if isinstance(frame, str) else frame)
                    _answer_requests(ws)
                assert ws.ping().wait(10)
            except ConnectionClosed as exc:
                _closed_cleanly(exc)
        # Whatever the fake host said, the job ends (or waits for another worker) once it
        # is gone: cancel it so that it does not go to the next fake host.
        cluster.http.post(f"/api/jobs/{job_id}/cancel")
        _still_serving(cluster, log)

    worker()


def _answer_requests(ws: ClientConnection, timeout: float = 0.05) -> None:
    """Answer what the gateway asked (start a job: yes; stop a replica or a run: done);
    records the jobs it gave."""
    while True:
        try:
            frame = ws.recv(timeout=timeout)
        except TimeoutError:
            return
        request = json.loads(frame)
        if request.get("type") == "start_job":
            given_jobs.append(request["job_id"])
        if "request_id" in request:
            result = {"started": time.time()} if request["type"] == "start_job" else {}
            ws.send(
                json.dumps(
                    {
                        "type": "reply",
                        "request_id": request["request_id"],
                        "ok": True,
                        "result": result,
                    }
                )
            )
