"""``nbcluster top``'s pure parts: reading server-sent-event frames and drawing a screen."""

from __future__ import annotations

from datetime import UTC, datetime

from rich.console import Console

from nbcluster.cli._top import parse_frames, render
from nbcluster.notices import ClusterNotice, ClusterOverview, GpuTotals


def test_frames_are_split_and_partial_ones_kept() -> None:
    text = 'id: 4\nevent: notice\ndata: {"a": 1}\n\n: keep-alive\n\nevent: overview\ndata: {'
    frames, rest = parse_frames(text)
    assert frames == [("notice", '{"a": 1}', "4")]
    assert rest == "event: overview\ndata: {"
    frames, rest = parse_frames(rest + '"b": 2}\n\n')
    assert frames == [("overview", '{"b": 2}', None)] and rest == ""


def test_a_screen_shows_hosts_kernels_and_notices() -> None:
    now = datetime.now(UTC)
    overview = ClusterOverview(
        time=now,
        user="admin",
        admin=True,
        last_seq=1,
        totals=GpuTotals(
            hosts=1,
            gpu_capacity=4,
            committed_gpus=1,
            pending_gpus=2,
            waiting_cells=0,
            subscription_ratio=0.5,
        ),
        hosts=[
            {
                "name": "gpu-a",
                "state": "connected",
                "cpus": 8,
                "memory_mb": 8192,
                "gpus": [{}, {}, {}, {}],
                "gpus_committed": 1,
                "gpus_pending": 2,
                "subscription_ratio": 0.5,
                "replicas": [{}],
            }
        ],
        kernels=[
            {
                "id": "0123456789abcdef",
                "owner": "alice",
                "execution_state": "busy",
                "executor": "r1",
                "replicas": [{"host": "gpu-a", "state": "running"}],
                "waiting_cells": 1,
                "degraded": True,
            }
        ],
    )
    notice = ClusterNotice(
        seq=1,
        time=now,
        severity="error",
        kind="host_lost",
        subject="host/x",
        message="host x is lost",
    )
    console = Console(width=160, record=True)
    console.print(render(overview, [notice], "live"))
    screen = console.export_text()
    for expected in ("gpu-a", "1+2/4", "01234567", "busy degraded", "alice", "host x is lost"):
        assert expected in screen, expected
    assert "subscription 0.50x" in screen
    waiting = Console(width=80, record=True)
    waiting.print(render(None, [], "connecting"))
    assert "connecting" in waiting.export_text()


def test_a_drained_host_says_so() -> None:
    overview = ClusterOverview(
        time=datetime.now(UTC),
        user="admin",
        admin=True,
        last_seq=0,
        hosts=[
            {
                "name": "gpu-b",
                "state": "connected",
                "draining": True,
                "cpus": 8,
                "memory_mb": 8192,
                "gpus": [{}],
                "replicas": [],
            }
        ],
    )
    console = Console(width=160, record=True)
    console.print(render(overview, [], "live"))
    assert "connected (draining)" in console.export_text()
