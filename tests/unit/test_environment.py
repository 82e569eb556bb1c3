"""A replica applying another replica's environment changes: interpreter state and the
package installs of a cell (run here too, as every replica must)."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

from nbcluster.kernel import _interpreter as interpreter
from nbcluster.kernel._environment import ReplicaEnvironment
from nbcluster.kernel._packages import package_commands, to_primitive

from .test_packages import _wheel


def test_a_cells_pip_install_is_replayed_where_the_payload_is_applied(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path, name="nbc_env_pkg", value=7)
    site = tmp_path / "site"
    cell = f"%pip install --no-index --target {site} {wheel}\nimport nbc_env_pkg\n"
    [command] = package_commands(cell)
    assert command.replayable
    follower = ReplicaEnvironment(None)
    problems = follower.apply({}, to_primitive([command]))
    assert problems == []
    assert (site / "nbc_env_pkg" / "__init__.py").read_text() == "VALUE = 7\n"


def test_a_failing_replay_is_reported_not_raised(tmp_path: Path) -> None:
    [command] = package_commands(f"%pip install --no-index {tmp_path / 'missing.whl'}\n")
    problems = ReplicaEnvironment(None).apply({}, to_primitive([command]))
    assert len(problems) == 1 and "packages:" in problems[0]
    assert ReplicaEnvironment(None).apply({}, ["not a command"])[0].startswith("packages:")


def test_interpreter_state_is_restored_now_and_again_before_the_next_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell(config=config)
    saved_random, saved_cwd = random.getstate(), os.getcwd()
    monkeypatch.delenv("NBC_ENV_TEST", raising=False)
    try:
        executor = ReplicaEnvironment(shell)
        random.seed(11)
        os.environ["NBC_ENV_TEST"] = "on"
        os.chdir(tmp_path)
        captured = executor.capture("import random\nrandom.seed(11)\n", ran=True)
        assert {"random_state", "environ", "cwd"} <= set(captured.interp)
        expected = random.random()
        # another process: different state
        random.seed(0)
        del os.environ["NBC_ENV_TEST"]
        os.chdir(saved_cwd)
        follower = ReplicaEnvironment(shell)
        assert follower.apply(captured.interp, []) == []
        assert os.environ["NBC_ENV_TEST"] == "on" and os.getcwd() == str(tmp_path)
        random.seed(0)  # a callback context changed it again: the next cell still sees it
        assert follower.restore_pending() == []
        assert random.random() == expected
        assert follower.restore_pending() == []  # once
        assert interpreter.decode_state(captured.interp["cwd"]) == {"cwd": str(tmp_path)}
    finally:
        random.setstate(saved_random)
        os.chdir(saved_cwd)
        shell.cleanup()
        sys.modules.pop("nbc_env_pkg", None)
