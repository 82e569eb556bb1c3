"""Large values of a kernel live in the object store under the kernel's own prefix; they go when
the kernel does; ``nbcluster store ls|du|gc`` show and clean what is there."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from nbcluster.client import GatewayClient
from nbcluster.store import LocalDirectoryStore, tombstone_key

from ..cluster import async_wait_for, running_cluster

pytestmark = pytest.mark.integration


def _cli(*args: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbcluster", *args, "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_kernel_objects_are_listed_kept_and_deleted_with_the_kernel(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with running_cluster(state, hosts=3, replicas=3) as c:
        store = LocalDirectoryStore(state / "store")
        async with GatewayClient(c.url, c.token) as gw:
            kernel = await gw.start_kernel()
            kid = kernel["id"]
            async with gw.channels(kid) as channels:
                result = await channels.execute("import os\nbig = os.urandom(3 * 2**20)", 60)
                assert result.status == "ok", result.reply
            prefix = f"kernels/{kid}/values/"
            await async_wait_for(lambda: any(store.list(prefix)), 30, "the value to be stored")
            [stored] = list(store.list(prefix))
            assert stored.size > 3 * 2**20
            # An object of a kernel that was shut down (its gateway stopped before deleting
            # it: the deletion mark stays), and one of a kernel this gateway does not know
            # (maybe another gateway's): only the first is proven orphaned.
            store.put("kernels/ghost/values/x", b"left behind")
            store.put(tombstone_key("ghost"), b"1")
            store.put("kernels/unknown/values/x", b"not ours")

            listing = _cli("store", "ls", "kernels/", state_dir=state)
            assert listing.returncode == 0, listing.stderr
            assert stored.key in listing.stdout and "kernels/ghost/values/x" in listing.stdout
            usage = _cli("store", "du", state_dir=state)
            assert usage.returncode == 0, usage.stderr
            assert kid[:8] in usage.stdout and "ghost" in usage.stdout

            dry = _cli("store", "gc", "--dry-run", state_dir=state)
            assert dry.returncode == 0, dry.stderr
            assert "would delete 1 object(s)" in dry.stdout
            assert [i.key for i in store.list("kernels/ghost/")] == ["kernels/ghost/values/x"]
            gc = _cli("store", "gc", state_dir=state)
            assert gc.returncode == 0, gc.stderr
            assert "deleted 1 object(s)" in gc.stdout
            assert "kept the objects of 1 kernel(s)" in gc.stdout and "unknown" in gc.stdout
            assert list(store.list("kernels/ghost/")) == []
            assert list(store.list(tombstone_key("ghost"))) == []
            assert [i.key for i in store.list("kernels/unknown/")] == ["kernels/unknown/values/x"]
            assert [i.key for i in store.list(prefix)] == [stored.key]  # a live kernel's stay

            await gw.shutdown_kernel(kid)
            await async_wait_for(
                lambda: not any(store.list(f"kernels/{kid}/")),
                30,
                "the kernel's objects to be deleted",
            )


def test_a_bad_store_url_is_refused_with_the_reason(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nbcluster",
            "gateway",
            "--state-dir",
            str(tmp_path),
            "--store",
            "ftp://nowhere/x",
            "--token",
            "t",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "unknown scheme 'ftp'" in result.stderr
    hdfs = _cli("store", "ls", "--store", "hdfs://namenode/x", state_dir=tmp_path)
    assert hdfs.returncode == 2 and "HDFS is not supported" in hdfs.stderr


async def test_an_unreachable_store_warns_and_the_value_is_stored_once_it_is_back(
    tmp_path: Path,
) -> None:
    import shutil

    from ..cluster import free_port, wait_for

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0?prefix=t/"
    with running_cluster(
        tmp_path / "state", hosts=3, replicas=3, gateway_args=["--store", url]
    ) as c:
        async with GatewayClient(c.url, c.token) as gw:
            kid = (await gw.start_kernel())["id"]
            async with gw.channels(kid) as channels:
                result = await channels.execute("import os\nbig = os.urandom(2 * 2**20)", 90)
                assert result.status == "ok", result.reply  # the cell itself completes
                warning = result.stream_text("stderr")
                assert "not protected yet: big" in warning
                assert f"127.0.0.1:{port}" in warning
                server_bin = shutil.which("redis-server")
                assert server_bin is not None
                server = await asyncio.create_subprocess_exec(
                    server_bin,
                    *("--port", str(port), "--bind", "127.0.0.1", "--save", ""),
                    stdout=asyncio.subprocess.DEVNULL,
                )
                try:
                    import redis

                    client = redis.Redis(host="127.0.0.1", port=port)

                    def up() -> bool:
                        try:
                            return bool(client.ping())
                        except redis.ConnectionError:
                            return False

                    wait_for(up, 20, "redis-server to start")
                    later = await channels.execute("small = 1", 90)
                    assert later.status == "ok" and later.stream_text("stderr") == ""
                    stored = [k.decode() for k in client.scan_iter(match="t/obj/*")]
                    assert any(f"kernels/{kid}/values/" in k for k in stored), stored
                finally:
                    server.terminate()
                    await asyncio.wait_for(server.wait(), 10)


async def test_gc_on_a_store_shared_by_two_gateways_keeps_the_others_keys(
    tmp_path: Path,
) -> None:
    shared = tmp_path / "shared-store"
    store = LocalDirectoryStore(shared)
    url = shared.resolve().as_uri()
    with (
        running_cluster(
            tmp_path / "a",
            hosts=1,
            gateway_args=["--store", url, "--store-retention", "600"],
        ) as a,
        running_cluster(tmp_path / "b", hosts=1, gateway_args=["--store", url]) as b,
    ):
        async with GatewayClient(a.url, a.token) as gw_a, GatewayClient(b.url, b.token) as gw_b:
            gone = (await gw_a.start_kernel())["id"]
            theirs = (await gw_b.start_kernel())["id"]
            # What their replicas stored (large values).
            store.put(f"kernels/{gone}/values/v", b"a's, shut down")
            store.put(f"kernels/{theirs}/values/v", b"b's, alive")
            await gw_a.shutdown_kernel(gone)  # kept for the retention, marked deleted
            await async_wait_for(
                lambda: any(store.list(tombstone_key(gone))), 30, "the deletion mark"
            )
            gc = _cli("store", "gc", "--store", url, state_dir=tmp_path / "a")
            assert gc.returncode == 0, gc.stderr
            assert "deleted 1 object(s)" in gc.stdout, gc.stdout
            assert list(store.list(f"kernels/{gone}/")) == []
            assert [i.key for i in store.list(f"kernels/{theirs}/")] == [
                f"kernels/{theirs}/values/v"
            ]
            # B's own gc keeps them too (its kernel is alive), and A's mark is gone.
            gc_b = _cli("store", "gc", "--store", url, state_dir=tmp_path / "b")
            assert gc_b.returncode == 0, gc_b.stderr
            assert store.get(f"kernels/{theirs}/values/v") == b"b's, alive"
            assert list(store.list("gc/")) == []
