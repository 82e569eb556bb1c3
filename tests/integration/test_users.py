"""Users, kernel tokens and join tokens on a real cluster: each attack of issue 13's first two
items is made and refused, and what the user owns keeps working.

One cluster for the module (one replica per kernel: ownership does not depend on Raft)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from nbcluster.client import GatewayClient, GatewayError
from nbcluster.identity import Quotas, UsersFile

from ..cluster import Cluster, async_wait_for, running_cluster
from ..users import refused_channels, user_client

pytestmark = pytest.mark.integration

LIMITED_SPEC = {
    "argv": ["python", "-m", "nbcluster.kernel", "-f", "{connection_file}"],
    "display_name": "Only for alice",
    "language": "python",
    "metadata": {"kernel_provisioner": {"config": {"authorized_users": "alice"}}},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("users")
    specs = root / "kernelspecs"
    (specs / "alice-only").mkdir(parents=True)
    (specs / "alice-only" / "kernel.json").write_text(json.dumps(LIMITED_SPEC))
    with running_cluster(
        root / "state", hosts=1, gateway_args=["--kernelspec-dir", str(specs)]
    ) as c:
        yield c


@pytest.fixture(scope="module")
def tokens(cluster: Cluster) -> dict[str, str]:
    """Users added while the gateway runs (it reads the file at the next request)."""
    users = UsersFile(cluster.state_dir / "gateway" / "users.json")
    return {
        "alice": users.add("alice"),
        "bob": users.add("bob"),
        "carol": users.add("carol", quotas=Quotas(kernels=1, gpus=1)),
        "ops": users.add("ops", admin=True),
        "erin": users.add("erin", quotas=Quotas(gpus=1)),
    }


alice = user_client("alice")
bob = user_client("bob")


async def test_a_second_user_cannot_reach_the_first_users_kernel(
    cluster: Cluster, alice: GatewayClient, bob: GatewayClient, tokens: dict[str, str]
) -> None:
    kernel = await alice.start_kernel()
    kid = kernel["id"]
    try:
        async with alice.channels(kid) as channels:
            result = await channels.execute("secret = 42")
            assert result.status == "ok", result.reply
        # Bob sees nothing of it: not listed, and every direct call answers "no such kernel".
        assert kid not in {k["id"] for k in await bob.list_kernels()}
        assert kid not in {k["id"] for k in await bob.cluster_kernels()}
        for call in (
            bob.get_kernel(kid),
            bob.interrupt_kernel(kid),
            bob.restart_kernel(kid),
            bob.checkpoint_kernel(kid),
            bob.shutdown_kernel(kid),
        ):
            with pytest.raises(GatewayError) as caught:
                await call
            assert caught.value.status == 404, caught.value.message
            assert f"no kernel with id {kid}" in caught.value.message
        assert await refused_channels(cluster.url, kid, tokens["bob"])
        # Alice's kernel is untouched; the admin sees it with its owner.
        async with alice.channels(kid) as channels:
            result = await channels.execute("print(secret)")
            assert result.stream_text() == "42\n"
        [summary] = [k for k in cluster.http.get("/api/cluster/kernels").json() if k["id"] == kid]
        assert summary["owner"] == "alice"
        # An admin from the users file sees it too; a user may not list the hosts.
        async with GatewayClient(cluster.url, tokens["ops"]) as ops:
            assert kid in {k["id"] for k in await ops.list_kernels()}
        with pytest.raises(GatewayError) as caught:
            await bob.hosts()
        assert caught.value.status == 403 and "user 'bob' may not call" in caught.value.message
    finally:
        await alice.shutdown_kernel(kid)


async def test_the_token_a_cell_reads_is_only_good_for_its_kernels_jobs(
    cluster: Cluster, alice: GatewayClient, bob: GatewayClient, tokens: dict[str, str]
) -> None:
    kernel = await alice.start_kernel()
    kid = kernel["id"]
    other = await bob.start_kernel()
    try:
        async with alice.channels(kid) as channels:
            result = await channels.execute(
                "import os\nprint(os.environ['NBCLUSTER_GATEWAY_TOKEN'])\n"
                "print(sorted(v for v in os.environ.values()))"
            )
            assert result.status == "ok", result.reply
            stolen, values = result.stream_text().splitlines()
        assert stolen.startswith("nbk_")
        # No admin, user or join token anywhere in the kernel's environment.
        for secret in (cluster.token, cluster.join_token, *tokens.values()):
            assert secret not in values
        async with GatewayClient(cluster.url, stolen) as thief:
            for call in (thief.list_kernels(), thief.hosts(), thief.cluster_kernels()):
                with pytest.raises(GatewayError) as caught:
                    await call
                assert caught.value.status == 403, caught.value.message
                assert f"kernel {kid} of user 'alice' may not call" in caught.value.message
            for target in (kid, other["id"]):
                assert await refused_channels(cluster.url, target, stolen)
            # What %%job needs works, for alice.
            job = await thief.submit_job({"fast": True, "source": "print('from the kernel')"})
            assert job["status"] == "succeeded" and job["spec"]["owner"] == "alice"
            queued = await thief.submit_job({"source": "print(1)", "owner": "bob"})
            assert queued["spec"]["owner"] == "alice", "a kernel cannot submit as someone else"
            assert queued["spec"]["kernel_id"] == kid
            assert [j["id"] for j in await thief.list_jobs()] == [queued["id"]]
            # The host endpoint is not for it either.
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(
                    cluster.url.replace("http", "ws") + "/api/cluster/hosts/connect",
                    additional_headers={"Authorization": f"token {stolen}"},
                    open_timeout=10,
                ):
                    pass
            assert refused.value.response.status_code == 403
        # Bob cannot see alice's job; alice can.
        with pytest.raises(GatewayError) as caught:
            await bob.get_job(queued["id"])
        assert caught.value.status == 404
        assert queued["id"] not in {j["id"] for j in await bob.list_jobs()}
        assert (await alice.get_job(queued["id"]))["spec"]["owner"] == "alice"
    finally:
        await alice.shutdown_kernel(kid)
        await bob.shutdown_kernel(other["id"])
    # The kernel gone, its token is dead.
    async with httpx.AsyncClient() as http:
        response = await http.get(
            cluster.url + "/api/jobs", headers={"Authorization": f"token {stolen}"}
        )
    assert response.status_code == 403 and response.json()["reason"] == "invalid token"


async def test_jobs_read_only_their_owners_inputs(alice: GatewayClient, bob: GatewayClient) -> None:
    key = await alice.upload_job_input("data.txt", b"alice's data")
    assert key.startswith("jobs/inputs/alice/")
    done = await alice.submit_job(
        {"source": "print(open('data.txt').read())", "inputs": {"data.txt": key}}
    )
    with pytest.raises(GatewayError) as caught:
        await bob.submit_job({"source": "print(open('x').read())", "inputs": {"x": key}})
    assert caught.value.status == 403 and "inputs.x" in caught.value.message
    # Nor another kernel's state.
    with pytest.raises(GatewayError) as caught:
        await bob.submit_job({"source": "1", "inputs": {"x": "kernels/k/checkpoint"}})
    assert caught.value.status == 403
    assert done["spec"]["owner"] == "alice"


async def test_quotas_and_kernelspec_access(
    cluster: Cluster, alice: GatewayClient, bob: GatewayClient, tokens: dict[str, str]
) -> None:
    # alice-only is offered to alice and to admins, not to bob, who may not start it.
    assert "alice-only" in (await alice.kernelspecs())["kernelspecs"]
    assert "alice-only" not in (await bob.kernelspecs())["kernelspecs"]
    with pytest.raises(GatewayError) as caught:
        await bob.start_kernel("alice-only")
    assert caught.value.status == 403 and "authorized_users" in caught.value.message
    async with GatewayClient(cluster.url, tokens["carol"]) as carol:
        with pytest.raises(GatewayError) as caught:
            await carol.start_kernel(env={"KERNEL_GPUS": "2"})
        assert caught.value.status == 403 and "quotas.gpus" in caught.value.message
        first = await carol.start_kernel()
        try:
            with pytest.raises(GatewayError) as caught:
                await carol.start_kernel()
            assert caught.value.status == 429 and "quotas.kernels" in caught.value.message
            held = await carol.submit_job(
                {"source": "import time; time.sleep(30)", "resources": {"gpus": 1}}
            )
            with pytest.raises(GatewayError) as caught:
                await carol.submit_job({"source": "1", "resources": {"gpus": 1}})
            assert (
                caught.value.status == 429 and "holds 1 of their quota of 1" in caught.value.message
            )
            await carol.cancel_job(held["id"])
        finally:
            await carol.shutdown_kernel(first["id"])
        # Room again: the quota counts what is held now.
        second = await carol.start_kernel()
        await carol.shutdown_kernel(second["id"])


def test_user_commands_and_the_join_token(cluster: Cluster, tmp_path: Path) -> None:
    """``nbcluster user add`` prints a token that works at once; ``join-token`` prints what
    hosts join with."""
    import subprocess
    import sys

    def run(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "nbcluster", *args, "--state-dir", str(cluster.state_dir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    token = run("user", "add", "dave", "--max-kernels", "3")
    assert token.startswith("nbu_")
    response = httpx.get(cluster.url + "/api/kernels", headers={"Authorization": f"token {token}"})
    assert response.status_code == 200 and response.json() == []
    assert "dave" in run("user", "list")
    run("user", "remove", "dave")
    response = httpx.get(cluster.url + "/api/kernels", headers={"Authorization": f"token {token}"})
    assert response.status_code == 403
    # The cluster harness gives the gateway its join token; on its own it makes one.
    assert not (cluster.state_dir / "gateway" / "join-token").exists()


async def test_a_cell_past_the_users_gpu_quota_waits_and_says_why(
    cluster: Cluster, tokens: dict[str, str]
) -> None:
    """Erin may hold 1 GPU at once: her second kernel's cell waits for her first one's, although
    the host has a second GPU idle."""
    async with GatewayClient(cluster.url, tokens["erin"]) as erin:
        first = await erin.start_kernel(env={"KERNEL_GPUS": "1"})
        second = await erin.start_kernel(env={"KERNEL_GPUS": "1"})
        try:
            async with erin.channels(first["id"]) as one, erin.channels(second["id"]) as two:
                long_cell = asyncio.ensure_future(
                    one.execute("import time\ntime.sleep(3)\nprint('first done')")
                )

                async def bound() -> bool:
                    [k] = [k for k in await erin.cluster_kernels() if k["id"] == first["id"]]
                    return k["binding"] is not None

                await async_wait_for(bound, 30, "the first cell to hold its GPU")
                result = await two.execute("print('second ran')")
                first_result = await long_cell
            assert first_result.stream_text().endswith("first done\n")
            waited = result.stream_text("stderr")
            assert "quota" in waited and "erin" in waited, result.outputs
            assert result.stream_text() == "second ran\n"
        finally:
            await erin.shutdown_kernel(first["id"])
            await erin.shutdown_kernel(second["id"])
