"""What the fuzzers (``tests/integration/test_fuzz_*.py``) found, each pinned in process: the
OpenAPI document schemathesis reads, a log offset past any file, a fast job given up, binary
frames on the hosts' websocket."""

from __future__ import annotations

import json
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.websockets import WebSocketDisconnect

from nbcluster.gateway import GatewayConfig, create_app
from nbcluster.gateway._jobs import JobManager
from nbcluster.gateway._jobs_api import MAX_LOG_OFFSET

from ..cluster import wait_for

with warnings.catch_warnings():  # "install httpx2": the TestClient works as it is
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

TOKEN = "t"
JOIN = "join-token"
AUTH = {"Authorization": f"token {TOKEN}"}
HELLO = {
    "type": "hello",
    "name": "fuzz-host",
    "address": "127.0.0.1",
    "resources": {"cpus": 2, "memory_mb": 1024, "gpus": []},
}


def _config(tmp_path: Path) -> GatewayConfig:
    return GatewayConfig(token=TOKEN, state_dir=tmp_path / "state", join_token=JOIN)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(_config(tmp_path))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway", headers=AUTH
        ) as c,
    ):
        yield c


# -- the OpenAPI document ---------------------------------------------------------------------


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


async def test_every_reference_in_the_openapi_document_resolves(
    client: httpx.AsyncClient,
) -> None:
    """``POST /api/jobs`` once embedded the model's own schema, whose ``#/$defs/...``
    references point nowhere in the document: schemathesis could not build a body."""
    doc = (await client.get("/openapi.json")).json()
    refs = set(_refs(doc))
    assert "#/components/schemas/JobSpec" in refs
    for ref in refs:
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
            node = node[part]


async def test_the_openapi_document_says_what_the_gateway_answers(
    client: httpx.AsyncClient,
) -> None:
    doc = (await client.get("/openapi.json")).json()
    error = {"$ref": "#/components/schemas/ErrorBody"}
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            for status in ("4XX", "5XX"):
                assert responses[status]["content"]["application/json"]["schema"] == error, (
                    method,
                    path,
                )
    assert set(doc["components"]["schemas"]["ErrorBody"]["required"]) == {"message", "reason"}
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    submit = doc["paths"]["/api/jobs"]["post"]
    assert {"200", "201"} <= set(submit["responses"])  # fast jobs answer 200
    upload = doc["paths"]["/api/jobs/inputs"]["post"]
    assert "application/octet-stream" in upload["requestBody"]["content"]
    [offset] = [
        p
        for p in doc["paths"]["/api/jobs/{job_id}/logs"]["get"]["parameters"]
        if p["name"] == "offset"
    ]
    assert offset["schema"]["maximum"] == MAX_LOG_OFFSET


# -- the job API ------------------------------------------------------------------------------


@pytest.mark.parametrize("follow", ["false", "true"])
async def test_a_log_offset_past_any_log_is_refused_naming_it(
    client: httpx.AsyncClient, follow: str
) -> None:
    """``offset=651289000290346`` once answered 500: the file seek failed (EINVAL)."""
    job = (await client.post("/api/jobs", json={"command": ["true"]})).json()
    response = await client.get(
        f"/api/jobs/{job['id']}/logs", params={"offset": 651289000290346, "follow": follow}
    )
    assert response.status_code == 400, response.text
    assert "offset" in response.json()["message"]
    assert str(MAX_LOG_OFFSET) in response.json()["message"]
    at_the_limit = await client.get(
        f"/api/jobs/{job['id']}/logs", params={"offset": MAX_LOG_OFFSET}
    )
    assert at_the_limit.status_code == 200 and at_the_limit.content == b""


async def test_a_fast_job_that_does_not_finish_in_time_is_a_504_naming_it(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fast job waits for its result until its timeout and 30 s more (here: no host ever
    takes it); the ``TimeoutError`` once escaped as a 500 with a text body."""

    async def never_finishes(self: JobManager, spec: Any) -> Any:
        raise TimeoutError

    monkeypatch.setattr(JobManager, "submit", never_finishes)
    response = await client.post(
        "/api/jobs", json={"command": ["true"], "fast": True, "timeout": 5}
    )
    assert response.status_code == 504, response.text
    body = response.json()
    assert body["reason"] == "fast job timed out"
    assert "did not finish in time (its timeout of 5 s" in body["message"]


# -- the hosts' websocket ---------------------------------------------------------------------


def test_a_binary_first_frame_is_refused_naming_it(tmp_path: Path) -> None:
    """It was closed with the reason ``'text'`` (a ``KeyError``)."""
    with (
        TestClient(create_app(_config(tmp_path))) as http,
        http.websocket_connect(
            "/api/cluster/hosts/connect", headers={"Authorization": f"token {JOIN}"}
        ) as ws,
    ):
        ws.send_bytes(json.dumps(HELLO).encode())
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
    assert closed.value.code == 1008
    assert closed.value.reason.startswith("invalid host message: a binary frame (")
    assert "the protocol is JSON text" in closed.value.reason


def test_a_binary_frame_after_the_hello_is_dropped_and_counted(tmp_path: Path) -> None:
    """It failed the connection with an unhandled ``KeyError`` (a traceback in the log)."""
    app = create_app(_config(tmp_path))
    with (
        TestClient(app) as http,
        http.websocket_connect(
            "/api/cluster/hosts/connect", headers={"Authorization": f"token {JOIN}"}
        ) as ws,
    ):
        ws.send_text(json.dumps(HELLO))
        assert json.loads(ws.receive_text())["type"] == "welcome"
        ws.send_bytes(b"\x00\x01")
        ws.send_text(json.dumps({"type": "heartbeat", "replicas": 0}))

        def rejected() -> float:
            for line in http.get("/metrics", headers=AUTH).text.splitlines():
                if line.startswith("nbcluster_messages_rejected_total") and "host" in line:
                    return float(line.rsplit(" ", 1)[1])
            return 0.0

        wait_for(lambda: rejected() == 1.0, 10, "the binary frame to be counted")
        hosts = http.get("/api/cluster/hosts", headers=AUTH).json()
        assert [(h["name"], h["state"]) for h in hosts] == [("fuzz-host", "connected")]
