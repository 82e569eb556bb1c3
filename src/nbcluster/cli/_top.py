"""``nbcluster top``: the dashboard's live view in the terminal (rich), for operators on ssh.

It reads the gateway's event stream (``GET /api/cluster/events/stream?overview=SECONDS``):
overview snapshots redraw hosts, kernels and jobs; notices scroll in the feed. A dropped or
broken stream is resumed from the last notice seen. ``--once`` prints one snapshot and exits
(for scripts and for checking access)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import click
import httpx
from pydantic import ValidationError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .. import envvars
from .._tls import client_context
from ..notices import ClusterNotice, ClusterOverview
from ._status import resolve_target

__all__ = ["parse_frames", "render", "top_command"]

#: Notices kept on screen, newest first.
FEED_LINES = 12
_SEVERITY_STYLE = {"info": "blue", "warning": "yellow", "error": "bold red"}


def parse_frames(buffer: str) -> tuple[list[tuple[str, str, str | None]], str]:
    """Complete server-sent-event frames in ``buffer`` as ``(event, data, id)`` and what is
    left of it (an incomplete frame). Comment lines (keep-alives) are skipped."""
    frames: list[tuple[str, str, str | None]] = []
    while "\n\n" in buffer:
        raw, buffer = buffer.split("\n\n", 1)
        event, data, frame_id = "message", [], None
        for line in raw.split("\n"):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line.startswith("id: "):
                frame_id = line[4:]
        if data:
            frames.append((event, "\n".join(data), frame_id))
    return frames, buffer


def _gpu_bar(committed: int, pending: int, total: int, width: int = 16) -> Text:
    if total <= 0:
        return Text("no GPUs", style="dim")
    cells = [round(width * committed / total), round(width * pending / total)]
    bar = Text()
    bar.append("█" * cells[0], style="red")
    bar.append("▒" * min(cells[1], width - cells[0]), style="yellow")
    bar.append("░" * max(width - sum(cells), 0), style="green")
    bar.append(f" {committed}+{pending}/{total}")
    return bar


def render(
    overview: ClusterOverview | None, notices: Iterable[ClusterNotice], status: str
) -> RenderableType:
    """One screen: totals, hosts (admins), kernels, jobs and the latest notices."""
    parts: list[RenderableType] = []
    if overview is None:
        parts.append(Text(f"nbcluster top: {status}", style="bold"))
        return Group(*parts)
    who = f"{overview.user} ({'admin' if overview.admin else 'user'})"
    head = Text(f"nbcluster top · {who} · {status} · {overview.time:%H:%M:%S}", style="bold")
    if overview.totals is not None:
        t = overview.totals
        head.append(
            f"\nhosts {t.hosts} · GPUs committed {t.committed_gpus}/{t.gpu_capacity}, "
            f"pending {t.pending_gpus} · cells waiting {t.waiting_cells} · "
            f"subscription {t.subscription_ratio:.2f}x",
            style="",
        )
    parts.append(head)
    if overview.admin:
        hosts = Table(title="Hosts", title_justify="left", expand=True)
        for column in (
            "host",
            "state",
            "CPUs",
            "memory",
            "GPUs (committed+pending/all)",
            "ratio",
            "replicas",
        ):
            hosts.add_column(column)
        for h in overview.hosts:
            hosts.add_row(
                escape(h["name"]),
                h["state"] + (" (draining)" if h.get("draining") else ""),
                str(h["cpus"]),
                f"{h['memory_mb'] / 1024:.1f} GiB",
                _gpu_bar(h.get("gpus_committed") or 0, h.get("gpus_pending") or 0, len(h["gpus"])),
                f"{h['subscription_ratio']:.2f}" if "subscription_ratio" in h else "-",
                str(len(h["replicas"])),
            )
        parts.append(hosts)
    kernels = Table(title="Kernels", title_justify="left", expand=True)
    for column in ("kernel", "owner", "state", "executor", "replicas (host: state)", "waiting"):
        kernels.add_column(column)
    for k in overview.kernels:
        state = k["execution_state"] + (" degraded" if k.get("degraded") else "")
        replicas = ", ".join(f"{r['host']}: {r['state']}" for r in k["replicas"])
        kernels.add_row(
            k["id"][:8],
            escape(k.get("owner") or ""),
            state,
            escape(k.get("executor") or "-"),
            escape(replicas),
            str(k.get("waiting_cells", 0)),
        )
    parts.append(kernels)
    queued = overview.queues
    jobs = Table(
        title=f"Jobs (queued: {queued.get('cpu', 0)} cpu, {queued.get('gpu', 0)} gpu)",
        title_justify="left",
        expand=True,
    )
    for column in ("job", "owner", "queue", "status", "worker", "attempts"):
        jobs.add_column(column)
    for j in overview.jobs[:10]:
        jobs.add_row(
            j.id[:8],
            escape(j.spec.owner),
            j.spec.queue_name,
            j.status,
            escape(j.worker or "-"),
            str(j.attempts),
        )
    parts.append(jobs)
    feed = Text()
    for n in notices:
        feed.append(f"{n.time:%H:%M:%S} ", style="dim")
        feed.append(f"{n.severity:<8}", style=_SEVERITY_STYLE[n.severity])
        feed.append(n.message + "\n")
    parts.append(Text("Notices", style="bold"))
    parts.append(feed if feed.plain else Text("none yet", style="dim"))
    return Group(*parts)


class _View:
    """What ``top`` shows, updated from the stream's frames."""

    def __init__(self) -> None:
        self.overview: ClusterOverview | None = None
        self.notices: deque[ClusterNotice] = deque(maxlen=FEED_LINES)
        self.since = 0
        self.status = "connecting"

    def take(self, event: str, data: str) -> None:
        try:
            if event == "overview":
                self.overview = ClusterOverview.model_validate_json(data)
            elif event == "notice":
                notice = ClusterNotice.model_validate_json(data)
                self.notices.appendleft(notice)
                self.since = max(self.since, notice.seq)
            elif event == "dropped" and data.isdigit():
                self.since = int(data)
        except ValidationError as exc:
            self.status = f"a frame it cannot read ({exc.error_count()} errors): newer gateway?"

    def screen(self) -> RenderableType:
        return render(self.overview, self.notices, self.status)


async def _follow(client: httpx.AsyncClient, view: _View, interval: float) -> AsyncIterator[None]:
    """Read the stream (reconnecting from the last notice), yielding after each frame."""
    delay = 0.5
    while True:
        params = {"overview": str(interval), "since": str(view.since)}
        try:
            async with client.stream(
                "GET", "/api/cluster/events/stream", params=params, timeout=None
            ) as response:
                if response.status_code in (401, 403):
                    raise click.ClickException(
                        f"the gateway refused the token ({response.status_code}): "
                        f"{(await response.aread()).decode(errors='replace')[:300]}"
                    )
                response.raise_for_status()
                view.status = "live"
                delay = 0.5
                buffer = ""
                async for chunk in response.aiter_text():
                    frames, buffer = parse_frames(buffer + chunk)
                    for event, data, _ in frames:
                        view.take(event, data)
                        yield
        except (httpx.TransportError, httpx.HTTPStatusError) as exc:
            view.status = f"reconnecting ({type(exc).__name__})"
            yield
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)


@click.command("top")
@click.option("--url", help="Gateway URL (default: the running gateway).")
@click.option("--token", help="API token (default: $NBCLUSTER_TOKEN or the running gateway's).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CA file to verify an https gateway with (default: $NBCLUSTER_CA).",
)
@click.option(
    "--interval",
    type=click.FloatRange(0.2, 60),
    default=1.0,
    show_default=True,
    help="Seconds between redraws of hosts, kernels and jobs.",
)
@click.option("--once", is_flag=True, help="Print one snapshot and the latest notices, then exit.")
def top_command(
    url: str | None,
    token: str | None,
    state_dir: Path | None,
    ca: Path | None,
    interval: float,
    once: bool,
) -> None:
    """Watch hosts, GPUs, kernels, jobs and cluster notices live (Ctrl-C to quit)."""
    target = resolve_target(url, token, state_dir)
    ca_file = ca or envvars.CA.get()
    verify = client_context(ca_file) if target.url.startswith("https://") else True
    console = Console()

    async def run() -> None:
        async with httpx.AsyncClient(
            base_url=target.url,
            headers={"Authorization": f"token {target.token}"},
            timeout=10,
            verify=verify,
        ) as client:
            if once:
                answer = await client.get("/api/cluster/overview")
                notices = await client.get("/api/cluster/events", params={"limit": 1000})
                for response in (answer, notices):
                    if response.status_code != 200:
                        raise click.ClickException(
                            f"gateway at {target.url}: {response.status_code} {response.text[:300]}"
                        )
                view = _View()
                view.status = "snapshot"
                view.overview = ClusterOverview.model_validate_json(answer.content)
                for raw in notices.json()["notices"][-FEED_LINES:]:
                    view.notices.appendleft(ClusterNotice.model_validate(raw))
                console.print(view.screen())
                return
            view = _View()
            with Live(view.screen(), console=console, screen=True, auto_refresh=False) as live:
                async for _ in _follow(client, view, interval):
                    live.update(view.screen(), refresh=True)

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run())
    except (OSError, httpx.TransportError) as exc:
        raise click.ClickException(target.unreachable(exc)) from None
