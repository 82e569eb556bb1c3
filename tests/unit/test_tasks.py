"""The owner of background tasks: holds them until they end, logs failures, forgets finished
ones, cancels and waits on close."""

from __future__ import annotations

import asyncio
import logging

import pytest

from nbcluster._tasks import BackgroundTasks


async def test_a_task_is_held_until_it_ends_then_forgotten() -> None:
    tasks = BackgroundTasks("test")
    release = asyncio.Event()

    async def work() -> int:
        await release.wait()
        return 7

    task = tasks.spawn("work", work())
    assert len(tasks) == 1 and list(tasks) == [task]
    assert task.get_name() == "test: work"
    release.set()
    assert await task == 7
    await asyncio.sleep(0)  # done callbacks run on the next loop iteration
    assert len(tasks) == 0


async def test_a_failure_nobody_awaits_is_logged_with_its_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = BackgroundTasks("owner")

    async def boom() -> None:
        raise ValueError("broken")

    with caplog.at_level(logging.ERROR):
        task = tasks.spawn("boom", boom())
        await asyncio.wait([task])
        await asyncio.sleep(0)
    assert len(tasks) == 0
    [record] = [r for r in caplog.records if "owner: boom failed" in r.getMessage()]
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)


async def test_a_cancelled_task_is_forgotten_without_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = BackgroundTasks("owner")
    task = tasks.spawn("sleep", asyncio.sleep(60))
    await asyncio.sleep(0)
    task.cancel()
    with caplog.at_level(logging.ERROR):
        await asyncio.wait([task])
        await asyncio.sleep(0)
    assert len(tasks) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_close_cancels_and_waits_for_every_task() -> None:
    tasks = BackgroundTasks("owner")
    cleaned: list[str] = []

    async def worker(name: str) -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.01)  # cleanup that takes a moment: close waits for it
            cleaned.append(name)

    started = [tasks.spawn(n, worker(n)) for n in ("a", "b")]
    await asyncio.sleep(0)
    await tasks.close()
    assert sorted(cleaned) == ["a", "b"]
    assert all(t.cancelled() for t in started)
    assert len(tasks) == 0 and tasks.closed


async def test_after_close_spawn_refuses_and_closes_the_coroutine() -> None:
    tasks = BackgroundTasks("owner")
    await tasks.close()
    coro = asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="owner: closed, cannot start late"):
        tasks.spawn("late", coro)
    assert coro.cr_frame is None  # closed: no "never awaited" warning


async def test_cancel_all_leaves_the_owner_open() -> None:
    tasks = BackgroundTasks("owner")
    first = tasks.spawn("first", asyncio.sleep(60))
    await tasks.cancel_all()
    assert first.cancelled() and not tasks.closed
    second = tasks.spawn("second", asyncio.sleep(0, "ok"))
    assert await second == "ok"


async def test_close_gives_up_on_a_task_that_ignores_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = BackgroundTasks("owner")
    stop = asyncio.Event()

    async def stubborn() -> None:
        while not stop.is_set():
            try:
                await stop.wait()
            except asyncio.CancelledError:
                continue

    task = tasks.spawn("stubborn", stubborn())
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING):
        await tasks.close(timeout=0.05)
    assert "owner: stubborn did not stop within 0.05 s" in caplog.text
    stop.set()
    await task


async def test_close_called_from_one_of_its_tasks_does_not_wait_for_itself() -> None:
    tasks = BackgroundTasks("owner")
    other = tasks.spawn("other", asyncio.sleep(60))

    async def closer() -> str:
        await tasks.close()
        return "closed"

    task = tasks.spawn("closer", closer())
    assert await task == "closed"
    assert other.cancelled()


def test_spawn_outside_an_event_loop_closes_the_coroutine() -> None:
    tasks = BackgroundTasks("owner")

    async def never() -> None:
        raise AssertionError("must not run")

    coro = never()
    with pytest.raises(RuntimeError):
        tasks.spawn("never", coro)
    assert coro.cr_frame is None
