"""Cluster notices that real faults produce, read from the server-sent-event stream of a real
gateway over loopback: a host daemon killed (disconnected, its replica lost, the host lost),
the host back (joined, the replica replaced) and a job that fails (and one requeued).
(The dashboard's browser test watches ``replica_lost``/``replica_replaced`` for a killed
replica process; ``tests/unit/test_notices.py`` covers the ring and the API's filters.)"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ..cluster import Cluster, running_cluster, wait_for

pytestmark = pytest.mark.integration


class StreamReader:
    """Reads ``/api/cluster/events/stream`` in a thread; ``notices`` grows as frames come."""

    def __init__(self, cluster: Cluster, since: int = 0) -> None:
        self.notices: list[dict[str, Any]] = []
        self._client = httpx.Client(
            base_url=cluster.url, headers={"Authorization": f"token {cluster.token}"}, timeout=None
        )
        self._since = since
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            with self._client.stream(
                "GET", "/api/cluster/events/stream", params={"since": self._since}
            ) as response:
                response.raise_for_status()
                event = ""
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event == "notice":
                        self.notices.append(json.loads(line[6:]))
        except (httpx.HTTPError, RuntimeError):
            pass  # closed by the test

    def kinds(self, subject: str = "") -> list[str]:
        return [n["kind"] for n in self.notices if n["subject"].startswith(subject)]

    def close(self) -> None:
        self._client.close()


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("notices") / "state", hosts=3, replicas=3) as c:
        yield c


def test_a_lost_host_and_its_return_and_a_failed_job_are_told(cluster: Cluster) -> None:
    reader = StreamReader(cluster)  # replays the hosts' joins first (since=0)
    try:
        wait_for(lambda: reader.kinds("host/").count("host_joined") == 3, 20, "3 joins")
        kernel = cluster.http.post("/api/kernels", json={}).json()["id"]
        wait_for(
            lambda: sum(r["state"] == "running" for r in cluster.replicas(kernel)) == 3,
            60,
            "three replicas",
        )
        cluster.kill_host("host-3")
        wait_for(
            lambda: {"host_disconnected", "host_lost"} <= set(reader.kinds("host/host-3")),
            30,
            "host-3 disconnected and lost",
        )
        wait_for(lambda: "replica_lost" in reader.kinds(f"kernel/{kernel}"), 30, "replica_lost")
        lost = next(n for n in reader.notices if n["kind"] == "replica_lost")
        assert lost["kernel_id"] == kernel and lost["owner"] == "admin"
        assert "host-3" in lost["message"]

        cluster.start_host("host-3")
        wait_for(lambda: reader.kinds("host/host-3").count("host_joined") == 2, 30, "a rejoin")
        wait_for(
            lambda: "replica_replaced" in reader.kinds(f"kernel/{kernel}"), 60, "replica_replaced"
        )

        job = cluster.http.post(
            "/api/jobs", json={"command": ["python", "-c", "raise SystemExit(3)"], "retries": 1}
        )
        assert job.status_code == 201, job.text
        job_id = job.json()["id"]
        wait_for(
            lambda: reader.kinds(f"job/{job_id}") == ["job_requeued", "job_failed"],
            60,
            "the job requeued, then failed",
        )
        failed = next(n for n in reader.notices if n["kind"] == "job_failed")
        assert "exit code 3" in failed["message"] and failed["severity"] == "error"
        # The log says the same, once (the line comes from the notice).
        # (Whitespace normalised: rich wraps long log lines.)
        gateway_log = " ".join((cluster.log_dir / "gateway.log").read_text().split())
        assert gateway_log.count(" ".join(failed["message"].split())) == 1
        # Paging from a cursor gives the same notices as the stream did.
        page = cluster.http.get("/api/cluster/events", params={"limit": 1000}).json()
        assert [n["seq"] for n in page["notices"]] == [n["seq"] for n in reader.notices]
    finally:
        reader.close()
