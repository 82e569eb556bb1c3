"""JupyterHub as the identity source, against a real JupyterHub on loopback: ``jupyterhub``
(from PyPI, in the dev extra) with ``configurable-http-proxy`` (npm; ``.ci/run`` installs it),
nbcluster registered as the Hub service ``nbcluster``, users and tokens made through the
Hub's REST API, and a single-user server whose gateway client sends its own
``JUPYTERHUB_API_TOKEN`` to the gateway (``docs/security.md``, "JupyterHub").

Without ``configurable-http-proxy`` the module is skipped with the reason, unless
``NBCLUSTER_TEST_REQUIRE_JUPYTERHUB`` is set (CI sets it), when it fails."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from nbcluster.client import GatewayClient, GatewayError

from ..cluster import Cluster, free_port, running_cluster, wait_for
from ..users import refused_channels, user_client

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
#: Where ``.ci/run`` installs configurable-http-proxy when it is not on PATH.
LOCAL_CHP = ROOT / ".venv" / "node" / "node_modules" / ".bin" / "configurable-http-proxy"
REQUIRE = "NBCLUSTER_TEST_REQUIRE_JUPYTERHUB"
SERVICE = "nbcluster"
ACCESS = f"access:services!service={SERVICE}"
#: How long the gateway trusts the Hub's answer for a token (short: the revocation test).
CACHE_SECONDS = 2.0
BIN = Path(sys.executable).parent


def _cannot_run(reason: str) -> None:
    """Skip loudly, or fail where the Hub tests must run (CI)."""
    message = f"JupyterHub integration tests cannot run: {reason}"
    if os.environ.get(REQUIRE):
        pytest.fail(f"{message} ({REQUIRE} is set)", pytrace=False)
    pytest.skip(f"{message}; `.ci/run` installs what they need")


def _configurable_http_proxy() -> str:
    found = shutil.which("configurable-http-proxy") or (
        str(LOCAL_CHP) if LOCAL_CHP.exists() else None
    )
    if found is None:
        _cannot_run(
            "configurable-http-proxy is not on PATH nor in .venv/node "
            "(npm install --prefix .venv/node configurable-http-proxy)"
        )
    if not (BIN / "jupyterhub").exists():
        _cannot_run("jupyterhub is not installed in this environment (pip install -e '.[dev]')")
    assert found is not None
    return found


CONFIG = """\
c = get_config()  # noqa
c.JupyterHub.bind_url = {proxy_url!r}
c.JupyterHub.hub_bind_url = {hub_url!r}
c.ConfigurableHTTPProxy.api_url = {proxy_api_url!r}
c.ConfigurableHTTPProxy.command = [{chp!r}]
c.ConfigurableHTTPProxy.pid_file = {root!r} + "/proxy.pid"
c.JupyterHub.pid_file = {root!r} + "/jupyterhub.pid"
c.JupyterHub.db_url = "sqlite:///" + {root!r} + "/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = {root!r} + "/cookie_secret"
c.JupyterHub.cleanup_servers = True
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.Authenticator.admin_users = {{"boss"}}
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = {root!r} + "/home/{{username}}"
c.Spawner.cmd = [{singleuser!r}]
c.Spawner.args = {singleuser_args!r}
c.Spawner.start_timeout = 60
c.Spawner.http_timeout = 60
# nbcluster registered as a Hub service: it needs no URL (the servers call it directly) and no
# token of its own (it checks users' tokens with those tokens).
c.JupyterHub.services = [
    {{"name": {service!r}, "display": False}},
    {{"name": "test-admin", "api_token": {admin_token!r}}},
]
c.JupyterHub.load_roles = [
    # Users may use nbcluster, and so may the tokens of their servers (next).
    {{"name": "user", "scopes": ["self", {access!r}]}},
    {{"name": "test-admin", "scopes": ["admin:users", "admin:servers", "tokens",
      "access:servers", "read:roles"], "services": ["test-admin"]}},
]
c.Spawner.server_token_scopes = [
    "users:activity!user", "access:servers!server", {access!r},
]
# The single-user server's gateway client: nbcluster's URL, and the server's own Hub token.
c.Spawner.environment = {{
    "JUPYTER_GATEWAY_URL": {gateway_url!r},
    "JUPYTER_GATEWAY_AUTH_TOKEN": lambda spawner: spawner.api_token,
    "JUPYTER_CONFIG_DIR": {root!r} + "/jupyter-config",
    "JUPYTER_DATA_DIR": {root!r} + "/jupyter-data",
}}
"""


class Hub:
    """A JupyterHub process (and the proxy it starts) on free loopback ports."""

    def __init__(self, root: Path, chp: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.chp = chp
        # Ports are chosen before the gateway starts: it is told where the Hub's API is.
        self.proxy_url = f"http://127.0.0.1:{free_port()}"
        self.hub_url = f"http://127.0.0.1:{free_port()}"
        self.proxy_api_url = f"http://127.0.0.1:{free_port()}"
        self.api_url = f"{self.hub_url}/hub/api"
        self.admin_token = secrets.token_hex(32)
        self.http = httpx.Client(
            base_url=self.api_url,
            headers={"Authorization": f"token {self.admin_token}"},
            timeout=30,
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "jupyterhub.log"

    def start(self, gateway_url: str) -> None:
        (self.root / "jupyterhub_config.py").write_text(
            CONFIG.format(
                proxy_url=self.proxy_url,
                hub_url=self.hub_url,
                proxy_api_url=self.proxy_api_url,
                chp=self.chp,
                root=str(self.root),
                singleuser=str(BIN / "jupyterhub-singleuser"),
                singleuser_args=["--allow-root"] if os.geteuid() == 0 else [],
                service=SERVICE,
                admin_token=self.admin_token,
                access=ACCESS,
                gateway_url=gateway_url,
            )
        )
        # Nothing of an outer Hub (a test run inside a single-user server) leaks in.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "JPY_"))}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "jupyterhub"), "-f", str(self.root / "jupyterhub_config.py")],
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

        def answering() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.logs()
            return self.http.get("/").status_code == 200

        wait_for(answering, 60, "JupyterHub to answer", interval=0.2)

    def logs(self) -> str:
        return f"===== jupyterhub\n{self.log.read_text(errors='replace')[-8000:]}"

    # -- the Hub's REST API -------------------------------------------------------------------

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        assert response.status_code < 300, (
            f"{method} {path}: {response.status_code} {response.text}"
        )
        return response.json() if response.content else None

    def add_user(self, name: str) -> None:
        self.api("POST", f"/users/{name}")

    def new_token(self, user: str, scopes: list[str]) -> tuple[str, str]:
        """A token of ``user`` with ``scopes``: (token, its id)."""
        model = self.api("POST", f"/users/{user}/tokens", json={"scopes": scopes, "note": "test"})
        return model["token"], model["id"]

    def revoke(self, user: str, token_id: str) -> None:
        self.api("DELETE", f"/users/{user}/tokens/{token_id}")

    def start_server(self, user: str) -> None:
        self.api("POST", f"/users/{user}/server")

        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.logs()
            server = self.api("GET", f"/users/{user}").get("servers", {}).get("")
            return bool(server and server.get("ready"))

        wait_for(ready, 90, f"{user}'s single-user server to be ready", interval=0.25)

    def stop_server(self, user: str) -> None:
        self.http.delete(f"/users/{user}/server")

    # -- stopping -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the Hub; it stops the proxy and the single-user servers. Fails on leftovers."""
        self.http.close()
        if self.proc is None:
            return
        children: list[psutil.Process] = []
        with contextlib.suppress(psutil.NoSuchProcess):
            children = psutil.Process(self.proc.pid).children(recursive=True)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
            self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        _, alive = psutil.wait_procs(children, timeout=15)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        assert not alive, f"JupyterHub left processes behind: {alive}"


@pytest.fixture(scope="module")
def unstarted_hub(tmp_path_factory: pytest.TempPathFactory) -> Hub:
    return Hub(tmp_path_factory.mktemp("jupyterhub"), _configurable_http_proxy())


@pytest.fixture(scope="module")
def cluster(unstarted_hub: Hub) -> Iterator[Cluster]:
    with running_cluster(
        unstarted_hub.root / "nbcluster",
        hosts=1,
        gateway_args=[
            "--jupyterhub-api-url",
            unstarted_hub.api_url,
            "--jupyterhub-cache-seconds",
            str(CACHE_SECONDS),
        ],
    ) as c:
        yield c


@pytest.fixture(scope="module")
def hub(unstarted_hub: Hub, cluster: Cluster) -> Iterator[Hub]:
    hub = unstarted_hub
    try:
        hub.start(cluster.url)
        for name in ("alice", "bob", "carol"):
            hub.add_user(name)
        yield hub
    except BaseException:
        print(hub.logs())
        raise
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def tokens(hub: Hub) -> dict[str, str]:
    """Each user's token with the access scope (as a server's has), and carol's without."""
    made = {name: hub.new_token(name, [ACCESS])[0] for name in ("alice", "bob", "boss")}
    made["carol-unscoped"] = hub.new_token("carol", ["read:users:name!user=carol"])[0]
    return made


alice = user_client("alice")
bob = user_client("bob")


def _get(url: str, token: str, path: str = "/api/kernels") -> httpx.Response:
    return httpx.get(url + path, headers={"Authorization": f"token {token}"}, timeout=30)


async def test_a_hub_users_token_makes_them_the_owner_and_others_cannot_reach_it(
    cluster: Cluster, hub: Hub, alice: GatewayClient, bob: GatewayClient, tokens: dict[str, str]
) -> None:
    kernel = await alice.start_kernel()
    kid = kernel["id"]
    try:
        async with alice.channels(kid) as channels:
            result = await channels.execute("secret = 'alice'")
            assert result.status == "ok", result.reply
        assert cluster.kernel_summary(kid)["owner"] == "alice"
        # Bob, a Hub user too, neither sees nor touches it.
        assert kid not in {k["id"] for k in await bob.list_kernels()}
        for call in (bob.get_kernel(kid), bob.interrupt_kernel(kid), bob.shutdown_kernel(kid)):
            with pytest.raises(GatewayError) as caught:
                await call
            assert caught.value.status == 404, caught.value.message
        assert await refused_channels(cluster.url, kid, tokens["bob"])
        # A Hub user is a user here: the hosts are the operator's.
        with pytest.raises(GatewayError) as caught:
            await bob.hosts()
        assert caught.value.status == 403 and "user 'bob' may not call" in caught.value.message
        # A Hub admin is an admin: sees alice's kernel and the hosts.
        async with GatewayClient(cluster.url, tokens["boss"]) as boss:
            assert kid in {k["id"] for k in await boss.list_kernels()}
            assert [h["name"] for h in await boss.hosts()] == ["host-1"]
        async with alice.channels(kid) as channels:
            result = await channels.execute("print(secret)")
            assert result.stream_text() == "alice\n"
    finally:
        await alice.shutdown_kernel(kid)


def test_tokens_the_gateway_may_not_accept_are_refused(
    cluster: Cluster, hub: Hub, tokens: dict[str, str]
) -> None:
    # A Hub user's token without access to the nbcluster service: 403 naming the scope.
    response = _get(cluster.url, tokens["carol-unscoped"])
    assert response.status_code == 403, response.text
    assert f"'carol''s token lacks the scope {ACCESS}" in response.json()["message"]
    # A Hub service's token (this one is a Hub admin): users' tokens only.
    response = _get(cluster.url, hub.admin_token)
    assert response.status_code == 403, response.text
    assert "users' tokens only" in response.json()["message"]
    # Something the Hub does not know.
    response = _get(cluster.url, secrets.token_hex(16))
    assert response.status_code == 403 and response.json()["reason"] == "invalid token"


def test_a_revoked_hub_token_is_refused_once_the_cache_expires(cluster: Cluster, hub: Hub) -> None:
    token, token_id = hub.new_token("bob", [ACCESS])
    assert _get(cluster.url, token).status_code == 200
    hub.revoke("bob", token_id)
    revoked = time.monotonic()
    wait_for(
        lambda: _get(cluster.url, token).status_code == 403,
        CACHE_SECONDS + 10,
        "the revoked token to be refused",
        interval=0.2,
    )
    assert time.monotonic() - revoked <= CACHE_SECONDS + 5


def test_an_unreachable_hub_is_a_503_naming_it(cluster: Cluster, hub: Hub) -> None:
    token, _ = hub.new_token("alice", [ACCESS])  # not yet cached by the gateway
    assert hub.proc is not None
    hub.proc.send_signal(signal.SIGSTOP)
    try:
        response = _get(cluster.url, token)
    finally:
        hub.proc.send_signal(signal.SIGCONT)
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["reason"] == "identity source unavailable"
    assert f"JupyterHub at {hub.api_url}" in body["message"] and token not in body["message"]
    # Nothing was cached: with the Hub back, the same token works.
    wait_for(lambda: _get(cluster.url, token).status_code == 200, 20, "the Hub to answer again")


async def test_a_single_user_server_uses_its_own_hub_token(cluster: Cluster, hub: Hub) -> None:
    """The deployment the issue asks for: alice's server (started by the Hub, with
    ``JUPYTER_GATEWAY_URL`` and its own ``JUPYTERHUB_API_TOKEN`` as the gateway token) starts
    a kernel on nbcluster, which belongs to alice."""
    hub.start_server("alice")
    try:
        server = httpx.AsyncClient(
            base_url=f"{hub.proxy_url}/user/alice",
            headers={"Authorization": f"token {hub.admin_token}"},
            timeout=60,
        )
        async with server:
            specs = (await server.get("/api/kernelspecs")).json()
            assert specs["kernelspecs"]["python3"]["spec"]["display_name"] == (
                "Python 3 (nbcluster)"
            )
            response = await server.post("/api/kernels", json={"name": "python3"})
            assert response.status_code == 201, response.text
            kid = response.json()["id"]
            try:
                assert cluster.kernel_summary(kid)["owner"] == "alice"
            finally:
                response = await server.delete(f"/api/kernels/{kid}")
                assert response.status_code == 204, response.text
    except BaseException:
        print(hub.logs())
        raise
    finally:
        hub.stop_server("alice")
