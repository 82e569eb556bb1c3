"""The REST API in process (httpx over ASGI), with no host connected."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nbcluster.gateway import GatewayConfig, create_app

TOKEN = "t"
AUTH = {"Authorization": f"token {TOKEN}"}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(GatewayConfig(token=TOKEN, state_dir=tmp_path / "state"))
    # ASGITransport does not run the lifespan: run it here so that the gateway starts and
    # stops (its watchdog task and ZMQ context) as it does under uvicorn.
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway", headers=AUTH
        ) as c,
    ):
        yield c


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert isinstance(body.get("message"), str) and body["message"]
    assert isinstance(body.get("reason"), str) and body["reason"]
    return body


# -- authentication ---------------------------------------------------------------------------


async def test_unknown_route_is_a_json_404(client: httpx.AsyncClient) -> None:
    body = _error(await client.get("/api/nothing-here"), 404)
    assert "/api/nothing-here" in body["message"]


async def test_missing_token_is_401(client: httpx.AsyncClient) -> None:
    response = await client.get("/api", headers={"Authorization": ""})
    body = _error(response, 401)
    assert body["reason"] == "missing token"
    assert "Authorization: token" in body["message"]
    assert response.headers["www-authenticate"] == "token"


async def test_wrong_token_is_403(client: httpx.AsyncClient) -> None:
    response = await client.get("/api", headers={"Authorization": "token wrong"})
    body = _error(response, 403)
    assert body["reason"] == "invalid token"
    assert "www-authenticate" not in response.headers
    body = _error(await client.get("/api?token=wrong", headers={"Authorization": ""}), 403)
    assert body["reason"] == "invalid token"


@pytest.mark.parametrize(
    "authorization", ["token t", "Token t", "Bearer t", "bearer t", "token  t "]
)
async def test_authorization_header_schemes(client: httpx.AsyncClient, authorization: str) -> None:
    response = await client.get("/api", headers={"Authorization": authorization})
    assert response.status_code == 200
    assert response.json()["implementation"] == "nbcluster"


async def test_query_token(client: httpx.AsyncClient) -> None:
    response = await client.get(
        "/api/kernels", params={"token": TOKEN}, headers={"Authorization": ""}
    )
    assert response.status_code == 200
    assert response.json() == []


@pytest.mark.parametrize("authorization", ["Basic dDp0", "token", "t"])
async def test_other_authorization_forms_count_as_missing(
    client: httpx.AsyncClient, authorization: str
) -> None:
    _error(await client.get("/api", headers={"Authorization": authorization}), 401)


@pytest.mark.parametrize(
    "path", ["/api/kernelspecs", "/metrics", "/openapi.json", "/kernelspecs/python3/logo-64x64.png"]
)
async def test_every_route_needs_the_token(client: httpx.AsyncClient, path: str) -> None:
    _error(await client.get(path, headers={"Authorization": ""}), 401)


# -- kernels ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/kernels/unknown"),
        ("DELETE", "/api/kernels/unknown"),
        ("POST", "/api/kernels/unknown/interrupt"),
        ("POST", "/api/kernels/unknown/restart"),
    ],
)
async def test_unknown_kernel_is_404(client: httpx.AsyncClient, method: str, path: str) -> None:
    body = _error(await client.request(method, path), 404)
    assert body["message"] == "no kernel with id unknown"
    assert body["reason"] == "kernel not found"


@pytest.mark.parametrize("payload", [b"{not json", b'{"name": "python3",}', b"\xff"])
async def test_start_with_malformed_json_is_400(client: httpx.AsyncClient, payload: bytes) -> None:
    body = _error(await client.post("/api/kernels", content=payload), 400)
    assert body["message"].startswith("request body is not valid JSON")


@pytest.mark.parametrize("payload", [b"[]", b'["python3"]', b'"python3"', b"3"])
async def test_start_with_a_non_object_body_is_400(
    client: httpx.AsyncClient, payload: bytes
) -> None:
    body = _error(await client.post("/api/kernels", content=payload), 400)
    assert body["message"] == "request body must be a JSON object"


async def test_start_with_an_unknown_kernelspec_is_400(client: httpx.AsyncClient) -> None:
    body = _error(await client.post("/api/kernels", json={"name": "julia-1.10"}), 400)
    assert "unknown kernelspec 'julia-1.10'" in body["message"]
    assert "python3" in body["message"]  # the available ones are listed


async def test_start_with_a_bad_gpu_count_is_400(client: httpx.AsyncClient) -> None:
    body = _error(await client.post("/api/kernels", json={"env": {"KERNEL_GPUS": "lots"}}), 400)
    assert "KERNEL_GPUS" in body["message"]
    assert "'lots' is not an integer" in body["message"]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"env": "KERNEL_GPUS=1"}, "invalid request body: env:"),
        ({"name": 3}, "invalid request body: name:"),
        ({"env": {"KERNEL_GPUS": 2}}, "env.KERNEL_GPUS: must be a string"),
    ],
)
async def test_start_with_wrongly_typed_fields_is_400(
    client: httpx.AsyncClient, payload: dict[str, Any], expected: str
) -> None:
    body = _error(await client.post("/api/kernels", json=payload), 400)
    assert expected in body["message"]


@pytest.mark.parametrize(
    "payload",
    [
        {"name": "python3", "env": {"KERNEL_GPUS": "1", "PATH": "/x"}},
        {},
        None,  # an empty body means the default kernelspec
    ],
)
async def test_start_without_hosts_is_503_and_says_why(
    client: httpx.AsyncClient, payload: dict[str, Any] | None
) -> None:
    if payload is None:
        response = await client.post("/api/kernels")
    else:
        response = await client.post("/api/kernels", json=payload)
    body = _error(response, 503)
    assert "cannot place the kernel" in body["message"]
    assert "the cluster has no hosts" in body["message"]
    assert "0 host(s) connected" in body["message"]
    assert body["reason"] == "no capacity for the kernel"
    # the failed kernel is not left behind
    assert (await client.get("/api/kernels")).json() == []
    assert (await client.get("/api/cluster/kernels")).json() == []


async def test_cluster_views_are_empty(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/cluster/hosts")).json() == []
    assert (await client.get("/api/cluster/kernels")).json() == []
    assert (await client.get("/api/kernels")).json() == []


# -- kernelspecs, metrics, schema -------------------------------------------------------------


async def test_kernelspecs_shape(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/kernelspecs")
    assert response.status_code == 200
    body = response.json()
    assert body["default"] == "python3"
    spec = body["kernelspecs"]["python3"]
    assert spec["name"] == "python3"
    assert {"argv", "display_name", "language"} <= set(spec["spec"])
    assert spec["resources"]["logo-64x64"] == "/kernelspecs/python3/logo-64x64.png"
    one = await client.get("/api/kernelspecs/python3")
    assert one.json() == spec


async def test_unknown_kernelspec_is_404(client: httpx.AsyncClient) -> None:
    body = _error(await client.get("/api/kernelspecs/nope"), 404)
    assert "'nope'" in body["message"]


async def test_kernelspec_logo(client: httpx.AsyncClient) -> None:
    response = await client.get("/kernelspecs/python3/logo-64x64.png")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert int(response.headers["content-length"]) == len(response.content) > 100


@pytest.mark.parametrize(
    "path",
    [
        "/kernelspecs/python3/kernel.json",
        "/kernelspecs/python3/logo-128x128.png",
        "/kernelspecs/nope/logo-64x64.png",
    ],
)
async def test_missing_kernelspec_resource_is_404(client: httpx.AsyncClient, path: str) -> None:
    _error(await client.get(path), 404)


async def test_path_traversal_finds_nothing(client: httpx.AsyncClient) -> None:
    for path in ("/kernelspecs/python3/..%2F..%2Fkernel.py", "/kernelspecs/python3/%2E%2E"):
        response = await client.get(path)
        assert response.status_code == 404
        assert not response.content.startswith(b"\x89PNG")


async def test_metrics(client: httpx.AsyncClient) -> None:
    await client.get("/api/kernels/unknown")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "# TYPE nbcluster_http_request_duration_seconds histogram" in text
    # requests are recorded by route template, not by raw path
    assert (
        'nbcluster_http_request_duration_seconds_count{method="GET",'
        'route="/api/kernels/{kernel_id}",status="404"} 1.0'
    ) in text
    assert "unknown" not in text.replace("nbcluster_", "")
    assert "nbcluster_client_connections 0.0" in text


async def test_openapi_lists_the_kernel_routes(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert {"get", "post"} <= set(paths["/api/kernels"])
    assert "/api/kernels/{kernel_id}" in paths
    assert "/api/kernelspecs" in paths
    schema = paths["/api/kernels"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"name", "env"} <= set(schema["properties"])
