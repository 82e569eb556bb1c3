"""Ctrl-C stops ``nbcluster job submit -f`` / ``job logs -f`` even when the output stream
does not end when cancelled (``cli/_job._follow_until_interrupted``): the command says so and
exits with 130 within its grace period."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from nbcluster.cli import _job

    class StubbornClient:
        async def follow_job_output(self, job_id, offset=0):
            print("following", flush=True)
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    if {stubborn}:
                        continue  # a stream that will not close
                    raise
            yield b""

    async def main():
        result = await _job._follow_until_interrupted(StubbornClient(), "j1", "stopped j1")
        print("returned", result, flush=True)

    asyncio.run(main())
    """
)


def _interrupt(stubborn: bool) -> tuple[int, str, str, float]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT.format(stubborn=stubborn)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "following"
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err, time.monotonic() - started


def test_a_stream_that_ends_when_cancelled_returns_none() -> None:
    code, out, _, _ = _interrupt(stubborn=False)
    assert code == 0 and "returned None" in out


def test_a_stream_that_will_not_end_still_lets_ctrl_c_exit() -> None:
    code, out, err, seconds = _interrupt(stubborn=True)
    assert code == 130, (out, err)
    assert "stopped j1" in err and "returned" not in out
    assert seconds < 20  # the grace is 2 s; generous for a loaded machine
