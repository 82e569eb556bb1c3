"""Size caps on what clients send (bodies, KERNEL_* values, job specs), the host message cap
and bounded subscriber buffers (docs/security.md, "Limits")."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from pydantic import ValidationError

from nbcluster.gateway import (
    HostMessageTooLarge,
    HostSession,
    KernelRequestError,
    RequestTooLarge,
    validate_env,
)
from nbcluster.gateway._limits import BodyLimitMiddleware
from nbcluster.gateway._subscribers import Subscription
from nbcluster.hostproto import MAX_FRAME_BYTES, StartJob
from nbcluster.jobs import JobLimits, JobSpec

# -- KERNEL_* values ---------------------------------------------------------------------------


def test_a_kernel_value_over_its_limit_is_refused_naming_the_limit() -> None:
    with pytest.raises(KernelRequestError, match="over the limit of 1024 bytes per value"):
        validate_env({"KERNEL_X": "x" * 1025}, max_value_bytes=1024)
    assert validate_env({"KERNEL_X": "x" * 1024}, max_value_bytes=1024)


def test_kernel_values_over_their_total_limit_are_refused() -> None:
    env = {f"KERNEL_V{i}": "x" * 900 for i in range(5)}
    with pytest.raises(KernelRequestError, match="over the limit of 4096 bytes together"):
        validate_env(env, max_value_bytes=1024, max_total_bytes=4096)


# -- job specs ---------------------------------------------------------------------------------

LIMITS = JobLimits(source_bytes=100, command_bytes=50, env_value_bytes=10, env_bytes=30, inputs=2)


@pytest.mark.parametrize(
    ("spec", "what"),
    [
        ({"source": "x" * 101}, "source: 101 bytes is over the limit of 100 bytes"),
        ({"command": ["echo", "y" * 60]}, "command: 64 bytes is over the limit of 50"),
        ({"source": "1", "env": {"A": "x" * 11}}, "env.A: 11 bytes"),
        ({"source": "1", "env": {f"A{i}": "x" * 9 for i in range(3)}}, "env (all variables)"),
        ({"source": "1", "outputs": ["a", "b", "c"]}, "3 entries is over the limit of 2"),
    ],
)
def test_a_job_spec_over_a_cap_is_refused_naming_it(spec: dict[str, Any], what: str) -> None:
    with pytest.raises(ValidationError, match=what.replace("(", r"\(").replace(")", r"\)")):
        JobSpec.model_validate(spec, context={"job_limits": LIMITS})
    # Without the API's context (a stored job read back) no cap applies.
    JobSpec.model_validate(spec)


# -- the host message cap ----------------------------------------------------------------------


async def test_a_request_over_the_hosts_message_cap_is_never_sent() -> None:
    sent: list[str] = []

    async def send(frame: str) -> None:
        sent.append(frame)

    session = HostSession("h1", send)
    assert session.max_frame == MAX_FRAME_BYTES
    with pytest.raises(HostMessageTooLarge, match="over the hosts' message limit"):
        await session.request(
            lambda rid: StartJob(
                request_id=rid, job_id="j", spec={"source": "x" * MAX_FRAME_BYTES}, gpus=[]
            ),
            timeout=1,
        )
    assert sent == []
    assert HostMessageTooLarge.status == 413


# -- request bodies ----------------------------------------------------------------------------


def _app(limit: int = 1000, upload_limit: int = 5000, body_timeout: float = 5.0) -> Any:
    app = FastAPI()
    reads: list[int] = []

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        body = await request.body()
        reads.append(len(body))
        return {"size": len(body)}

    @app.post("/upload")
    async def upload(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    @app.exception_handler(RequestTooLarge)
    async def too_large(request: Request, exc: RequestTooLarge) -> Any:
        from fastapi.responses import JSONResponse

        return JSONResponse({"message": str(exc)}, status_code=exc.status)

    app.add_middleware(
        BodyLimitMiddleware,
        limit=limit,
        upload_limit=upload_limit,
        upload_paths={"/upload"},
        body_timeout=body_timeout,
    )
    app.state.reads = reads
    return app


async def test_bodies_within_their_limit_pass_and_larger_ones_get_413() -> None:
    app = _app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        assert (await c.post("/echo", content=b"x" * 1000)).json() == {"size": 1000}
        r = await c.post("/echo", content=b"x" * 1001)
        assert r.status_code == 413
        assert "1001 bytes, over the limit of 1000 bytes (max_body_bytes)" in r.json()["message"]
        assert r.headers["connection"] == "close"
        # The upload endpoint has its own limit.
        assert (await c.post("/upload", content=b"x" * 5000)).json() == {"size": 5000}
        assert (await c.post("/upload", content=b"x" * 5001)).status_code == 413

        async def chunks() -> Any:
            for _ in range(100):
                yield b"x" * 300

        r = await c.post("/echo", content=chunks())  # no Content-Length: counted as read
        assert r.status_code == 413
        assert "over the limit of 1000 bytes" in r.json()["message"]
    assert app.state.reads == [1000]


async def test_a_declared_oversize_body_is_refused_before_any_of_it_is_read() -> None:
    app = _app()
    received: list[dict[str, Any]] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        received.append({})
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/echo",
        "headers": [(b"content-length", str(10 * 2**30).encode())],
        "query_string": b"",
    }
    await BodyLimitMiddleware(app, 1000, 5000)(scope, receive, send)  # type: ignore[arg-type]
    assert received == []
    assert sent[0]["status"] == 413


async def test_a_body_that_stops_arriving_gets_408() -> None:
    app = _app(body_timeout=0.2)
    sent: list[dict[str, Any]] = []
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": b"x", "more_body": True}
        await asyncio.Event().wait()  # never more
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/echo", "headers": [], "query_string": b""}
    mw = BodyLimitMiddleware(app, 1000, 5000, body_timeout=0.2)
    await asyncio.wait_for(mw(scope, receive, send), 5)  # type: ignore[arg-type]
    assert sent[0]["status"] == 408


# -- subscribers -------------------------------------------------------------------------------


async def test_a_subscriber_that_falls_behind_is_dropped_not_buffered() -> None:
    sub = Subscription(limit=1000)
    done = asyncio.Event()
    assert sub.offer({"type": "log", "data": "x" * 500})
    assert sub.offer({"type": "log", "data": "x" * 300})
    assert not sub.offer({"type": "log", "data": "x" * 300})  # past 1000 bytes: dropped
    assert sub.dropped.is_set()
    assert sub.buffered == 0
    assert await sub.next(done) is None
    assert not sub.offer({"type": "status", "status": "running"})


async def test_a_subscriber_that_keeps_up_gets_every_event_in_order() -> None:
    sub = Subscription(limit=1000)
    done = asyncio.Event()
    for i in range(50):
        assert sub.offer({"type": "log", "data": str(i)})
        event = await sub.next(done)
        assert event is not None and event["data"] == str(i)
    assert sub.buffered == 0
    done.set()
    assert await asyncio.wait_for(sub.next(done), 1) is None
