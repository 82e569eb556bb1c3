"""Signed state, attacked: someone who can write the object store (but does not hold the
kernel's key) plants objects in a kernel's key space whose unpickling would run code, then the
kernel loses every replica and is restored from the store. The forged objects are refused
(named to the user, counted, logged), nothing of them runs, and the kernel comes back with
everything it had (docs/security.md, "Signed state")."""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path
from typing import Any

import pytest
import xxhash

from nbcluster.client import GatewayClient
from nbcluster.kernel._checkpoint import (
    checkpoint_key,
    encode_checkpoint,
    log_key,
    log_prefix,
    rebuild,
    term_of_key,
)
from nbcluster.kernel._records import Done, encode_record
from nbcluster.kernel._sync import encode_payload
from nbcluster.store import LocalDirectoryStore

from ..cluster import Cluster, async_wait_for, process_gone, running_cluster

pytestmark = pytest.mark.integration


class Marker:
    """Unpickling this writes a file: the proof that a forged pickle ran in a replica."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.path, "forged code ran"))


def forged_done(term: int, count: int, marker: Path) -> bytes:
    """A cell's state change as the store's log holds one, well-formed (digest and all), whose
    value writes ``marker`` when loaded and whose count would hijack the cell numbering."""
    data = pickle.dumps((("a",), (Marker(marker),)))
    entry = {"slots": ["a"], "h": xxhash.xxh3_128_hexdigest(data), "v": data}
    payload = encode_payload({"count": count, "set": [entry], "del": []})
    return encode_record(Done(term, "attacker", "ok", count, payload))


def replica_logs(state: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in state.glob("hosts/*/logs/*.log"))


def log_terms(store: LocalDirectoryStore, kernel_id: str) -> list[int]:
    terms = (term_of_key(i.key) for i in store.list(log_prefix(kernel_id)))
    return sorted(t for t in terms if t is not None)


async def lose_every_replica(c: Cluster, kernel_id: str) -> None:
    pids = [r["pid"] for r in c.replicas(kernel_id) if r["state"] == "running"]
    assert len(pids) == 3
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    await async_wait_for(lambda: all(process_gone(p) for p in pids), 10, "the replicas to die")

    def restored() -> bool:
        running = [r for r in c.replicas(kernel_id) if r["state"] == "running"]
        return (
            len(running) == 3
            and not {r["pid"] for r in running} & set(pids)
            and c.kernel_summary(kernel_id)["execution_state"] == "idle"
        )

    await async_wait_for(restored, 90, "the kernel to be restored on three new replicas")


async def test_forged_log_entries_and_checkpoints_are_refused_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    marker = tmp_path / "forged-code-ran"
    with running_cluster(state, hosts=3, replicas=3) as c:
        store = LocalDirectoryStore(state / "store")
        async with GatewayClient(c.url, c.token) as gw:
            kid = (await gw.start_kernel())["id"]
            async with gw.channels(kid) as channels:

                async def run(code: str) -> Any:
                    result = await channels.execute(code, 60)
                    assert result.status == "ok", (result.reply, c.logs())
                    return result

                await run(
                    "import hashlib, os\n"
                    "big = os.urandom(3 * 2**20)\n"  # a large value: in the store by pointer
                    "digest = hashlib.sha256(big).hexdigest()\n"
                    "a = 1"
                )
                first = await gw.checkpoint_kernel(kid)
                await run("b = a + 1")
                last = await run("c = [a, b]")
                count = last.reply["execution_count"]
                await async_wait_for(
                    lambda: len([t for t in log_terms(store, kid) if t > first["term"]]) >= 2,
                    30,
                    "the log tail to reach the store",
                )
                top = max(log_terms(store, kid))

                # -- 1: a forged log entry after the last cell, written with the store's own
                # API (a valid store checksum), and an authentic entry replayed under a new
                # term's name.
                store.put(log_key(kid, top + 1), forged_done(top + 1, 999, marker))
                store.put(log_key(kid, top + 2), store.get(log_key(kid, top)))
                await lose_every_replica(c, kid)
                result = await run("print(a, b, c, hashlib.sha256(big).hexdigest() == digest)")
                assert not marker.exists()
                assert result.stream_text() == "1 2 [1, 2] True\n"
                assert result.reply["execution_count"] == count + 1  # not hijacked: not 1000
                notice = result.stream_text("stderr")
                assert "restored from its checkpoint" in notice and "2 later cell(s)" in notice
                assert "failed authentication" in notice, notice
                assert log_key(kid, top + 1) in notice and log_key(kid, top + 2) in notice
                assert c.metric("nbcluster_state_refused_total") == 2
                assert f"forged or altered state: refused {log_key(kid, top + 1)}" in (
                    replica_logs(state)
                )

                # -- 2: the newest checkpoint altered (one byte of its data changed), and a
                # forged checkpoint of a later term whose state would run code.
                older = await gw.checkpoint_kernel(kid)
                await run("d = 'between the checkpoints'")
                newest = await gw.checkpoint_kernel(kid)
                assert newest["term"] > older["term"]
                await run("e = 'after the checkpoints'")
                await async_wait_for(
                    lambda: max(log_terms(store, kid)) > newest["term"],
                    30,
                    "the last cell's log entry to reach the store",
                )
                key = checkpoint_key(kid, newest["term"])
                altered = bytearray(store.get(key))
                altered[len(altered) // 2] ^= 0x01
                store.put(key, bytes(altered))
                planted = rebuild(None, [forged_done(1, 1, marker)], members=3)
                assert planted is not None
                store.put(
                    checkpoint_key(kid, newest["term"] + 5),
                    encode_checkpoint(planted.snapshot, newest["term"] + 5, 999, "attacker"),
                )
                await lose_every_replica(c, kid)
                result = await run(
                    "print(a, b, c, d, e, hashlib.sha256(big).hexdigest() == digest)"
                )
                assert not marker.exists()
                assert result.stream_text() == (
                    "1 2 [1, 2] between the checkpoints after the checkpoints True\n"
                )
                notice = result.stream_text("stderr")
                assert key in notice and checkpoint_key(kid, newest["term"] + 5) in notice
                assert c.metric("nbcluster_state_refused_total") == 4
                assert "its authentication tag does not match" in replica_logs(state)
