"""Package commands of a cell: found in IPython source, encoded for the log, run on a host.

The runs use a temporary virtual environment (or a ``--target`` directory) and a wheel built
in the test, with ``--no-index``: nothing is downloaded, and the project's own environment is
never changed. conda is replaced by a small script on ``PATH`` that prints its arguments.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbcluster.kernel._packages import (
    PackageCommand,
    PackageCommandError,
    PackageResult,
    from_primitive,
    package_commands,
    redact,
    run_package_command,
    to_primitive,
)

# ---------------------------------------------------------------------------------------------
# Parsing


def one(code: str) -> PackageCommand:
    found = package_commands(code)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize(
    ("code", "tool", "program", "args"),
    [
        ("%pip install requests==2.0", "pip", "pip", ("install", "requests==2.0")),
        ("%pip install -q 'numpy>=1,<2'", "pip", "pip", ("install", "-q", "numpy>=1,<2")),
        ("%pip uninstall -y foo", "pip", "pip", ("uninstall", "-y", "foo")),
        ("!pip install -q numpy pandas", "pip", "pip", ("install", "-q", "numpy", "pandas")),
        ("!pip3 install x", "pip", "pip", ("install", "x")),
        ("!pip3.11 install x", "pip", "pip", ("install", "x")),
        ("!/opt/env/bin/pip install x", "pip", "pip", ("install", "x")),
        ("!python -m pip install y", "pip", "pip", ("install", "y")),
        ("!python3 -m pip install y", "pip", "pip", ("install", "y")),
        ("!python3.11 -u -m pip install y", "pip", "pip", ("install", "y")),
        ("!python -mpip install y", "pip", "pip", ("install", "y")),
        ("!{sys.executable} -m pip install z", "pip", "pip", ("install", "z")),
        ('!"{sys.executable}" -m pip install -U z', "pip", "pip", ("install", "-U", "z")),
        ("!pip -q install --no-deps a  # why", "pip", "pip", ("-q", "install", "--no-deps", "a")),
        ("!!pip install a", "pip", "pip", ("install", "a")),
        ("out = !pip install a", "pip", "pip", ("install", "a")),
        ("!pip install a \\\n    b", "pip", "pip", ("install", "a", "b")),
        ('!pip install "pandas[excel]"', "pip", "pip", ("install", "pandas[excel]")),
        ("%conda install -c conda-forge xgboost", "conda", "conda",
         ("install", "-c", "conda-forge", "xgboost")),
        ("!conda install -y x", "conda", "conda", ("install", "-y", "x")),
        ("%conda remove x", "conda", "conda", ("remove", "x")),
        ("%conda update x", "conda", "conda", ("update", "x")),
        ("%mamba install x", "conda", "mamba", ("install", "x")),
        ("!mamba install -y x", "conda", "mamba", ("install", "-y", "x")),
        ("%micromamba install x", "conda", "micromamba", ("install", "x")),
        ("%uv pip install x", "pip", "uv", ("install", "x")),
        ("!uv pip install x", "pip", "uv", ("install", "x")),
        ("!python -m uv pip install x", "pip", "uv", ("install", "x")),
        ("%sx pip install x", "pip", "pip", ("install", "x")),
        # Automagic: a one-line cell without `%` runs the magic.
        ("pip install foo", "pip", "pip", ("install", "foo")),
        ("conda install foo", "conda", "conda", ("install", "foo")),
        # Wrapped in cell and line magics that run the code once.
        ("%%capture\n%pip install q\n", "pip", "pip", ("install", "q")),
        ("%%capture out --no-stderr\n!pip install q\n", "pip", "pip", ("install", "q")),
        ("%%time\n%pip install q\n", "pip", "pip", ("install", "q")),
        ("%time %pip install q", "pip", "pip", ("install", "q")),
        ("%%bash\npip install s\n", "pip", "pip", ("install", "s")),
        ("%%sh\npip install s\n", "pip", "pip", ("install", "s")),
        ("%%script bash\npip install s\n", "pip", "pip", ("install", "s")),
        ("%%bash\nset -e\necho hi\npip install s\n", "pip", "pip", ("install", "s")),
    ],
)  # fmt: skip
def test_replayable_lines(code: str, tool: str, program: str, args: tuple[str, ...]) -> None:
    command = one(code)
    assert (command.tool, command.program, command.args) == (tool, program, args)
    assert command.replayable, command.not_replayable
    assert command.not_replayable is None
    assert command.local_paths == ()


@pytest.mark.parametrize(
    "code",
    [
        "%pip list",
        "!pip show numpy",
        "!pip freeze > requirements.txt",
        "%pip --version",
        "!pip download x",
        "!pip",
        "%conda list",
        "!conda info",
        "%conda create -n other python",
        "import pip",
        "x = 'pip install x'",
        "s = '''\n!pip install z\n'''",
        "# !pip install z",
        "%%writefile setup.sh\npip install z\n",
        "%%html\n<p>pip install z</p>\n",
        "%%job\n!pip install z\n",
        "!sudo pip install x",
        "!echo pip install x",
        "%%bash\ncat > r.txt <<EOF\npip install in-heredoc\nEOF\n",
        "!pip install x\nthis is a syntax error (",  # the cell never ran
        "",
    ],
)
def test_lines_that_change_nothing(code: str) -> None:
    assert package_commands(code) == []


@pytest.mark.parametrize(
    ("code", "why"),
    [
        ("if gpu:\n    !pip install cupy", "inside an `if`"),
        ("for p in ps:\n    %pip install x", "inside an `if`, a loop"),
        ("while False:\n    !pip install x", "a loop"),
        ("def setup():\n    %pip install x", "inside a function"),
        ("try:\n    import x\nexcept ImportError:\n    !pip install x", "`except` block"),
        ("!pip install {pkg}", "Python values"),
        ("!pip install $pkg", "Python values"),
        ("%pip install {name}=={version}", "Python values"),
        ("!pip install `cat reqs`", "output of another command"),
        ("!pip install $(cat reqs)", "output of another command"),
        ("%%bash\npip install $PKG\n", "shell expansion"),
        ("!cd repo && pip install -e .", "runs after `cd`"),
        ("%%bash\ncd repo\npip install .\n", "runs after `cd`"),
        ("%%bash\nexport PIP_INDEX_URL=x\npip install y\n", "runs after `export`"),
        ("!git clone https://h/r && pip install -e r", "runs after `git`"),
        ("!pip install a || pip install b", "failed"),
        ("%%bash\nif true; then pip install c; fi\n", "shell `if`"),
        ("%%bash\nfor p in a b; do pip install $p; done\n", "shell `if`"),
        ("!(pip install x)", "shell `if`, loop or group"),
        ("!PIP_INDEX_URL=https://h/simple pip install x", "sets PIP_INDEX_URL"),
        ("!echo numpy > r.txt && pip install -r r.txt", "a file written by `echo`"),
        ("%%bash\npip freeze > r.txt\npip install -r r.txt\n", "a file written by `pip`"),
    ],
)
def test_not_replayable_lines(code: str, why: str) -> None:
    found = package_commands(code)
    assert found, code
    command = found[-1]
    assert not command.replayable
    assert command.not_replayable is not None
    assert why in command.not_replayable


@pytest.mark.parametrize(
    ("code", "local"),
    [
        ("%pip install -r requirements.txt", ("requirements.txt",)),
        ("%pip install -rreqs.txt", ("reqs.txt",)),
        ("%pip install --requirement=reqs.txt x", ("reqs.txt",)),
        ("%pip install -c constraints.txt x", ("constraints.txt",)),
        ("%pip install -e .", (".",)),
        ("%pip install --editable ../lib", ("../lib",)),
        ("%pip install ./dist/x-1.0-py3-none-any.whl", ("./dist/x-1.0-py3-none-any.whl",)),
        ("%pip install x-1.0.tar.gz", ("x-1.0.tar.gz",)),
        ("%pip install /abs/path", ("/abs/path",)),
        ("%pip install ~/src/lib", ("~/src/lib",)),
        ("%pip install 'pkg @ file:///tmp/pkg'", ("pkg @ file:///tmp/pkg",)),
        ("%pip install --no-index --find-links /wheels x", ("/wheels",)),
        ("%pip install --find-links=./wheels x", ("./wheels",)),
        ("!pip install dist/*.whl", ("dist/*.whl",)),
        ("!pip uninstall -y -r installed.txt", ("installed.txt",)),
        ("%conda install --file env.txt", ("env.txt",)),
        ("%conda install ./pkg-1.0.conda", ("./pkg-1.0.conda",)),
        ("%conda install -c file:///srv/channel x", ("file:///srv/channel",)),
    ],
)
def test_local_paths_are_flagged_but_kept(code: str, local: tuple[str, ...]) -> None:
    command = one(code)
    assert command.local_paths == local
    assert command.replayable


@pytest.mark.parametrize(
    "code",
    [
        "%pip install -e git+https://github.com/org/repo#egg=repo",
        "%pip install 'repo @ git+https://github.com/org/repo'",
        "%pip install https://files.example.org/x-1.0-py3-none-any.whl",
        "%pip install -i https://user:tok@example.org/simple x",
        "%pip install --target /opt/extra x",  # a destination, not a source
        "%pip install --find-links https://example.org/wheels x",
        "%conda install -c conda-forge x",
    ],
)
def test_remote_sources_are_not_local(code: str) -> None:
    assert one(code).local_paths == ()


def test_commands_keep_cell_order_and_their_lines() -> None:
    code = (
        "import os\n"
        "%pip install a\n"
        "x = 1\n"
        "!pip install b && pip install c; echo done\n"
        "%conda install d\n"
        "!pip list\n"
        "!pip uninstall -y e\n"
    )
    found = package_commands(code)
    assert [c.args[-1] for c in found] == ["a", "b", "c", "d", "e"]
    assert [c.line for c in found] == [
        "%pip install a",
        "!pip install b && pip install c; echo done",
        "!pip install b && pip install c; echo done",
        "%conda install d",
        "!pip uninstall -y e",
    ]
    assert [c.magic for c in found] == [True, False, False, True, False]
    assert [c.action for c in found] == ["install", "install", "install", "install", "uninstall"]
    assert all(c.replayable for c in found)


def test_shell_operators_after_pip_keep_the_pip_part() -> None:
    for code in (
        "!pip install x 2>&1 | tail -1",
        "!pip install x > /dev/null",
        "!pip install x &> log.txt",
        "!pip install x && echo ok",
        "!pip install x &",
        "!echo hi > /dev/null && pip install x",
        "!echo hi 2>&1 && pip install x",
        "%%bash\nls > files.txt\npip install x\n",  # it reads no local file
    ):
        command = one(code)
        assert command.args == ("install", "x"), code
        assert command.replayable, code


def test_bash_cell_lines_are_the_lines_of_the_body() -> None:
    found = package_commands("%%bash\nset -e\npip install a \\\n  b\ncd /tmp && pip install c\n")
    assert [c.args for c in found] == [("install", "a", "b"), ("install", "c")]
    assert found[0].line == "pip install a \\\n  b"
    assert found[1].line == "cd /tmp && pip install c"
    assert found[0].replayable and not found[1].replayable


def test_code_before_an_install_in_the_same_cell_does_not_block_it() -> None:
    # Each `!` line is its own shell; Python around it runs unconditionally.
    found = package_commands("!cd /tmp\nwith open('x') as f:\n    pass\n!pip install a\n")
    assert [c.args for c in found] == [("install", "a")]
    assert found[0].replayable


def test_describe_masks_passwords() -> None:
    command = one("%pip install -i https://user:s3cret@example.org/simple x")
    assert command.args[2] == "https://user:s3cret@example.org/simple"  # replay needs it
    assert "s3cret" not in command.describe()
    assert command.describe() == "pip install -i https://user:****@example.org/simple x"
    assert one("%uv pip install x").describe() == "uv pip install x"
    assert (
        redact("see https://a:b@h/x and http://c:d@h")
        == "see https://a:****@h/x and http://c:****@h"
    )
    assert redact("https://user@host/x") == "https://user@host/x"


_fragments = st.sampled_from(
    [
        "!", "%", "%%", "pip", " install ", "uninstall", "-y", "python -m pip", "conda", "mamba",
        "{sys.executable}", "{x}", "$", "$(", "`", "'", '"', "\\", "\n", "    ", "&&", "||", ";",
        "|", ">", "2>&1", "<<", "EOF", "(", ")", "{", "}", "#", "-r", "-e", ".", "/", "file:",
        "if x:", "def f():", "bash", "capture", "time", "script", "\x00", "=", "@", "*",
    ]
)  # fmt: skip
_cells = st.lists(_fragments | st.text(max_size=8), max_size=30).map("".join) | st.text()


@settings(max_examples=300, deadline=None)
@given(_cells)
def test_parsing_never_raises_and_results_round_trip(code: str) -> None:
    found = package_commands(code)
    assert isinstance(found, list)
    for command in found:
        assert command.tool in ("pip", "conda")
        assert command.action in (
            "install", "uninstall", "remove", "update", "upgrade",
        )  # fmt: skip
    packed = msgpack.packb(to_primitive(found), use_bin_type=True)
    assert from_primitive(msgpack.unpackb(packed, raw=False)) == found


_texts = st.text(max_size=20)
_pip_commands = st.builds(
    PackageCommand,
    tool=st.just("pip"),
    args=st.tuples(st.sampled_from(["install", "uninstall"])).flatmap(
        lambda head: st.lists(_texts.filter(lambda t: "\x00" not in t), max_size=5).map(
            lambda rest: (*head, *rest)
        )
    ),
    line=_texts,
    program=st.sampled_from(["pip", "uv"]),
    magic=st.booleans(),
    local_paths=st.lists(_texts, max_size=3).map(tuple),
    not_replayable=st.none() | _texts,
)
_conda_commands = st.builds(
    PackageCommand,
    tool=st.just("conda"),
    args=st.sampled_from(["install", "remove", "update"]).map(lambda a: (a, "-y", "x")),
    line=_texts,
    program=st.sampled_from(["conda", "mamba", "micromamba"]),
    magic=st.booleans(),
    local_paths=st.lists(_texts, max_size=3).map(tuple),
    not_replayable=st.none() | _texts,
)


@given(st.lists(_pip_commands | _conda_commands, max_size=6))
def test_encoding_round_trips_through_msgpack(commands: list[PackageCommand]) -> None:
    data = to_primitive(commands)
    assert from_primitive(msgpack.unpackb(msgpack.packb(data, use_bin_type=True))) == commands
    assert from_primitive(json.loads(json.dumps(data))) == commands


def _good() -> dict[str, Any]:
    return to_primitive([one("%pip install x")])[0]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"a": 1}, "must be a list, got dict"),
        (b"raw", "must be a list, got bytes"),
        (None, "must be a list, got NoneType"),
        ([1], "package command 1 must be a map, got int"),
        ([_good(), {**_good(), "tool": "apt"}], "package command 2: 'tool' must be 'pip' or 'conda'"),
        ([{**_good(), "extra": 1}], "unknown fields ['extra']"),
        ([{**_good(), "program": "conda"}], "'program' 'conda' is not a pip program"),
        ([{**_good(), "program": 3}], "'program' must be str, got int"),
        ([{**_good(), "args": "install x"}], "'args' must be a list, got str"),
        ([{**_good(), "args": ["install", 3]}], "'args'[1] must be str"),
        ([{**_good(), "args": ["list"]}], "pip subcommand 'list' is not an install"),
        ([{**_good(), "args": ["config", "set", "global.index-url", "x"]}], "'config' is not"),
        ([{**_good(), "args": ["-q"]}], "pip subcommand None is not an install"),
        ([{**_good(), "args": ["install", "a\x00b"]}], "NUL character"),
        ([{**_good(), "tool": "conda", "program": "conda", "args": ["create", "-n", "x"]}],
         "conda subcommand 'create' is not an install"),
        ([{**_good(), "line": None}], "'line' must be str, got NoneType"),
        ([{**_good(), "magic": "yes"}], "'magic' must be bool, got str"),
        ([{**_good(), "local": [None]}], "'local'[0] must be str"),
        ([{**_good(), "why": 1}], "'why' must be str or nil, got int"),
        ([{**_good(), "line": "x" * 70000}], "'line' is longer than"),
        ([{**_good(), "args": ["install", *["x"] * 1001]}], "'args' has more than 1000 items"),
        ([_good()] * 1001, "too many package commands (1001 > 1000)"),
    ],
)  # fmt: skip
def test_decoding_names_what_is_wrong(data: object, message: str) -> None:
    with pytest.raises(PackageCommandError) as caught:
        from_primitive(data)
    assert message in str(caught.value)


def test_decoding_a_not_replayable_command_with_a_nul_is_allowed() -> None:
    # It is never run, and its text must still reach the other replicas' warnings.
    data = [{**_good(), "args": ["install", "a\x00b"], "why": "no"}]
    assert from_primitive(data)[0].not_replayable == "no"


# ---------------------------------------------------------------------------------------------
# Running


def _wheel(directory: Path, name: str = "nbc_tiny_pkg", value: int = 42) -> Path:
    """A minimal pure-Python wheel, written by hand (no build backend, nothing to download)."""
    files = {
        f"{name}/__init__.py": f"VALUE = {value}\n".encode(),
        f"{name}-0.1.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n".encode()
        ),
        f"{name}-0.1.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: nbcluster-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{name}-0.1.dist-info/RECORD,,")
    files[f"{name}-0.1.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = directory / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh virtual environment with pip (from the interpreter's bundled wheel, offline)."""
    root = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=120)
    return str(root / "bin" / "python")


def _imports(python: str, module: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-c", f"import {module}; print({module}.VALUE, {module}.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_installs_and_uninstalls_a_local_wheel_in_the_given_environment(
    venv_python: str, tmp_path: Path
) -> None:
    wheel = _wheel(tmp_path)
    install = one(f"%pip install --no-index {wheel}")
    assert install.local_paths == (str(wheel),)
    result = run_package_command(install, timeout=120, python=venv_python)
    assert result.ok, result.output
    assert result.returncode == 0
    assert result.host == socket.gethostname()
    assert result.environment == venv_python
    assert "nbc_tiny_pkg" in result.output
    assert result.duration > 0
    assert f"done on {result.host}" in result.describe()
    imported = _imports(venv_python, "nbc_tiny_pkg")
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith("42 ")
    assert str(Path(venv_python).parent.parent) in imported.stdout
    # Not in the project's environment.
    assert _imports(sys.executable, "nbc_tiny_pkg").returncode != 0

    # No `-y`: the replay adds it (nobody can answer pip's prompt on a follower).
    uninstall = one("!pip uninstall nbc_tiny_pkg")
    result = run_package_command(uninstall, timeout=120, python=venv_python)
    assert result.ok, result.output
    assert _imports(venv_python, "nbc_tiny_pkg").returncode != 0


def test_a_failing_install_is_a_result_not_an_exception(venv_python: str) -> None:
    command = one("%pip install --no-index nbc-package-that-does-not-exist")
    result = run_package_command(command, timeout=120, python=venv_python)
    assert not result.ok
    assert result.returncode not in (0, None)
    assert not result.timed_out
    assert "nbc-package-that-does-not-exist" in result.output
    assert f"failed on {result.host} (exit {result.returncode})" in result.describe()


def test_kernel_interpreter_by_default_and_the_next_import_finds_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `--target`: the default interpreter (this one) runs pip, but writes only under tmp_path.
    target = tmp_path / "site"
    target.mkdir()
    monkeypatch.syspath_prepend(str(target))
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("nbc_target_pkg")
    calls: list[int] = []
    invalidate = importlib.invalidate_caches

    def counting_invalidate() -> None:
        calls.append(1)
        invalidate()

    monkeypatch.setattr(importlib, "invalidate_caches", counting_invalidate)
    wheel = _wheel(tmp_path, "nbc_target_pkg", 7)
    command = one(f"%pip install --no-index --no-deps --target {target} {wheel}")
    try:
        result = run_package_command(command, timeout=120)
        assert result.ok, result.output
        assert result.environment == sys.executable
        assert calls == [1]
        assert importlib.import_module("nbc_target_pkg").VALUE == 7
    finally:
        sys.modules.pop("nbc_target_pkg", None)


def test_a_not_replayable_command_is_not_run(tmp_path: Path) -> None:
    command = one("!pip install {pkg}")
    result = run_package_command(command, timeout=10, python=str(tmp_path / "no-python"))
    assert result.returncode is None
    assert not result.ok
    assert result.error is not None and "not replayable" in result.error
    assert "not run on" in result.describe()


def test_a_missing_interpreter_is_a_result(tmp_path: Path) -> None:
    result = run_package_command(one("%pip install x"), timeout=10, python=str(tmp_path / "nope"))
    assert result.returncode is None
    assert result.error is not None and "could not start" in result.error


# conda, replaced by a script that prints its arguments (or misbehaves on request).
_FAKE_CONDA = """#!{python}
import os, sys, time
mode = os.environ.get("FAKE_CONDA_MODE", "")
if mode == "sleep":
    time.sleep(60)
if mode == "flood":
    sys.stdout.write("x" * 1_000_000 + "\\nlast line\\n")
print("ARGV", *sys.argv[1:])
"""


@pytest.fixture
def fake_conda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Path]:
    """Installs a fake conda-like program on PATH (and nowhere else); returns its bin folder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("CONDA_EXE", raising=False)
    monkeypatch.delenv("MAMBA_EXE", raising=False)
    monkeypatch.delenv("CONDA_PREFIX", raising=False)

    def add(name: str) -> Path:
        script = bin_dir / name
        script.write_text(_FAKE_CONDA.format(python=sys.executable))
        script.chmod(0o755)
        return script

    return add


def _argv(result: PackageResult) -> list[str]:
    line = next(x for x in result.output.splitlines() if x.startswith("ARGV"))
    return line.split()[1:]


def test_conda_magic_gets_yes_and_the_kernel_prefix(
    fake_conda: Callable[[str], Path], tmp_path: Path
) -> None:
    fake_conda("conda")
    prefix = tmp_path / "env"
    (prefix / "conda-meta").mkdir(parents=True)
    (prefix / "conda-meta" / "history").write_text("")
    python = str(tmp_path / "elsewhere" / "python")
    command = one("%conda install -c conda-forge x")
    result = run_package_command(command, timeout=30, python=python, prefix=str(prefix))
    assert result.ok, result
    assert _argv(result) == ["install", "--yes", "--prefix", str(prefix), "-c", "conda-forge", "x"]
    assert result.environment == str(prefix)
    # An explicit environment and an explicit yes are kept as typed.
    command = one("%conda install -n other -y x")
    result = run_package_command(command, timeout=30, python=python, prefix=str(prefix))
    assert _argv(result) == ["install", "-n", "other", "-y", "x"]


def test_shell_conda_gets_yes_only_and_mamba_falls_back_to_conda(
    fake_conda: Callable[[str], Path], tmp_path: Path
) -> None:
    fake_conda("conda")
    python = str(tmp_path / "elsewhere" / "python")
    result = run_package_command(one("!mamba remove x"), timeout=30, python=python)
    assert result.ok, result
    assert _argv(result) == ["remove", "--yes", "x"]


def test_conda_missing_is_said_clearly(fake_conda: Callable[[str], Path], tmp_path: Path) -> None:
    result = run_package_command(
        one("!conda install x"), timeout=30, python=str(tmp_path / "elsewhere" / "python")
    )
    assert result.returncode is None
    assert result.error == f"conda is not available on {socket.gethostname()} (no executable found)"


def test_conda_magic_outside_a_conda_environment(
    fake_conda: Callable[[str], Path], tmp_path: Path
) -> None:
    fake_conda("conda")
    result = run_package_command(
        one("%conda install x"),
        timeout=30,
        python=str(tmp_path / "elsewhere" / "python"),
        prefix=str(tmp_path),
    )
    assert result.returncode is None
    assert result.error is not None and "is not a conda environment" in result.error


def test_timeout_kills_the_command(
    fake_conda: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_conda("conda")
    monkeypatch.setenv("FAKE_CONDA_MODE", "sleep")
    started = time.monotonic()
    result = run_package_command(
        one("!conda install x"), timeout=0.5, python=str(tmp_path / "elsewhere" / "python")
    )
    assert time.monotonic() - started < 10
    assert result.timed_out
    assert not result.ok
    assert result.error == "timed out after 0.5 s"
    assert "timed out on" in result.describe()


def test_output_is_only_a_bounded_tail(
    fake_conda: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_conda("conda")
    monkeypatch.setenv("FAKE_CONDA_MODE", "flood")
    result = run_package_command(
        one("!conda install x"),
        timeout=30,
        python=str(tmp_path / "elsewhere" / "python"),
        tail_chars=500,
    )
    assert result.ok
    assert len(result.output) == 500
    assert result.output.rstrip().endswith("ARGV install --yes x")
    assert "last line" in result.output


def test_commands_run_without_prompts(fake_conda: Callable[[str], Path], tmp_path: Path) -> None:
    script = fake_conda("conda")
    script.write_text(
        f"#!{sys.executable}\nimport os, sys\n"
        "print('ARGV', os.environ.get('PIP_NO_INPUT'), sys.stdin.read() == '')\n"
    )
    before = dict(os.environ)
    result = run_package_command(
        one("!conda install x"), timeout=30, python=str(tmp_path / "elsewhere" / "python")
    )
    assert _argv(result) == ["1", "True"]  # no pip prompt, stdin closed
    assert dict(os.environ) == before  # set for the command only


def test_pip_and_uv_argv(tmp_path: Path) -> None:
    # A stand-in interpreter that prints the argv it got.
    python = tmp_path / "python"
    python.write_text(f"#!{sys.executable}\nimport sys\nprint('ARGV', *sys.argv[1:])\n")
    python.chmod(0o755)
    cases = {
        "%pip install -q x": ["-m", "pip", "install", "-q", "x"],
        "!pip uninstall x": ["-m", "pip", "uninstall", "x", "-y"],
        "!pip uninstall --yes x": ["-m", "pip", "uninstall", "--yes", "x"],
        "%uv pip uninstall x": ["-m", "uv", "pip", "uninstall", "x"],
        "!python -m pip -q install x": ["-m", "pip", "-q", "install", "x"],
    }
    for code, argv in cases.items():
        result = run_package_command(one(code), timeout=30, python=str(python))
        assert result.ok, result
        assert _argv(result) == argv, code
