"""Finding package commands in a cell: which installs and uninstalls it ran, in order.

A ``%pip install x`` (or ``!pip install x``, ``%conda install x`` ...) changes the Python
environment of the host that runs it, which is only the executor's. The executor calls
:func:`package_commands` for each cell it ran, on the kernel's main thread, with the source the
user typed; the result goes into the cell's record in the replicated log (encoded by
:mod:`nbcluster.kernel._package_encode`) and is run on the other replicas by
:mod:`nbcluster.kernel._package_run`. :class:`PackageCommand`, the subcommand tables and
:func:`redact` live here because those two modules use them too.

The parser follows IPython: the cell goes through IPython's own input transformer (so strings,
continuation lines and indentation are read as IPython reads them), and the ``system`` /
``run_line_magic`` / ``run_cell_magic`` calls it produces are inspected in the AST. The shell
text of those calls is split by a small POSIX-shell tokenizer
(:mod:`nbcluster.kernel._package_shell`) that recognises quotes, comments, operators,
redirections, heredocs and expansions; anything it cannot repeat faithfully is still
returned, with :attr:`PackageCommand.not_replayable` saying why, so the caller can warn.
"""

from __future__ import annotations

import ast
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from IPython.core.inputtransformer2 import TransformerManager

from ._package_shell import _commands, _tokens, _Word

Tool = Literal["pip", "conda"]

#: Subcommands that change an environment; others (``list``, ``show``, ``freeze`` ...) are
#: ignored by the parser and refused by :func:`from_primitive`.
PIP_ACTIONS = frozenset({"install", "uninstall"})
CONDA_ACTIONS = frozenset({"install", "remove", "uninstall", "update", "upgrade"})
#: The program the user typed, per tool: ``uv`` is ``%uv pip ...`` / ``!uv pip ...``.
PROGRAMS: dict[str, frozenset[str]] = {
    "pip": frozenset({"pip", "uv"}),
    "conda": frozenset({"conda", "mamba", "micromamba"}),
}


@dataclass(frozen=True, slots=True)
class PackageCommand:
    """One install/uninstall found in a cell.

    ``args`` is the argv after the tool, as the shell would pass it (``("install", "-q",
    "requests==2.0")``); for ``python -m pip`` and ``uv pip`` also the words after ``pip``.
    ``program`` is what the user ran (``pip``, ``uv``, ``conda``, ``mamba``, ``micromamba``).
    ``magic``: typed as a line magic (``%conda`` then installs into the kernel's prefix, as
    IPython does). ``local_paths``: arguments naming files or directories of the executor's
    host (``-r FILE``, ``-e PATH``, ``./pkg``, wheels ...), which other hosts may not have.
    ``not_replayable``: why the command cannot be repeated elsewhere, or None. ``line`` is the
    source as typed, which may hold an index token: show :meth:`describe` (or :func:`redact`).
    """

    tool: Tool
    args: tuple[str, ...]
    line: str
    program: str = ""
    magic: bool = False
    local_paths: tuple[str, ...] = ()
    not_replayable: str | None = None

    def __post_init__(self) -> None:
        if not self.program:
            object.__setattr__(self, "program", self.tool)

    @property
    def replayable(self) -> bool:
        return self.not_replayable is None

    @property
    def action(self) -> str:
        """The subcommand (``install``, ``uninstall``, ``remove`` ...), or "" if there is none."""
        index = _action_index(self.tool, self.args)
        return self.args[index] if index is not None else ""

    def describe(self) -> str:
        """The command as one line for messages, with passwords in URLs masked."""
        words = [self.program] if self.program != "uv" else ["uv", "pip"]
        return redact(" ".join([*words, *self.args]))


_URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)[^/\s@]+@")


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` URL replaced by
    ``****`` (index URLs carry tokens; they must not reach logs or other users' screens)."""
    return _URL_PASSWORD.sub(r"\1****@", text)


# ---------------------------------------------------------------------------------------------
# Parsing a cell


_MAX_NESTING = 4
# Whole words, so that `Pipeline`, `pipeline` or `uvicorn` do not cost a parse.
_PROGRAM_NAMES = re.compile(r"\b(pip[\d.]*|conda|mamba|micromamba|uv)\b|-mpip")
_CONDITIONAL = (
    "inside an `if`, a loop or a conditional expression: it may not have run, or ran several times"
)
_IN_FUNCTION = "inside a function: it runs only when the function is called"
_IN_HANDLER = "inside an `except` block: it ran only if an error happened"
_PY_EXPANSION = "uses Python values (`{...}` or `$name`), which the other replicas cannot expand"
_SH_EXPANSION = "uses shell expansion (`$`, backticks or braces), which may differ on other hosts"
_SUBSTITUTION = "uses the output of another command (`...` or $(...)), which may differ elsewhere"
_IN_SHELL_BLOCK = "inside a shell `if`, loop or group: it may not have run"


def package_commands(code: str) -> list[PackageCommand]:
    """The install/uninstall commands of a cell's raw source, in the order they run.

    Called by the executor after a cell ran, with the source the user typed, on the kernel's
    main thread (it silences warnings while IPython transforms the cell, and the warnings
    filter is process-wide). Never raises: text IPython cannot parse (which would not have
    run) gives an empty list. Cells that name no package tool return at once.
    """
    try:
        return _cell(code, None, 0)
    except Exception:  # a parser bug must never fail the user's cell; nothing found is safe
        return []


def _cell(code: str, reason: str | None, nesting: int) -> list[PackageCommand]:
    # Every command names its program: most cells are done here, at the cost of a search.
    if nesting > _MAX_NESTING or "\x00" in code or not _PROGRAM_NAMES.search(code):
        return []
    with warnings.catch_warnings():
        # The user saw IPython's and Python's warnings about this code when it ran.
        warnings.simplefilter("ignore")
        # IPython's own static transforms (`!`, `%`, `%%`), as the kernel applies them to a
        # cell; IPython's class has no annotations.
        source: str = TransformerManager().transform_cell(code)  # type: ignore[no-untyped-call]
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return _automagic(source, reason)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    calls.sort(key=lambda node: (node.lineno, node.col_offset))
    found: list[PackageCommand] = []
    for call in calls:
        match = _ipython_call(call)
        if match is None:
            continue
        method, texts = match
        where = reason or _python_context(call, parents)
        found.extend(_ipython_method(method, texts, where, nesting))
    return found


def _automagic(source: str, reason: str | None) -> list[PackageCommand]:
    """IPython runs a one-line cell ``pip install x`` (no ``%``) as the magic (automagic)."""
    lines = source.strip().splitlines()
    if len(lines) != 1:
        return []
    name, _, rest = lines[0].strip().partition(" ")
    if name in ("pip", "conda", "mamba", "micromamba", "uv"):
        return _line_magic(name, rest, reason)
    return []


def _ipython_call(call: ast.Call) -> tuple[str, list[str]] | None:
    """``get_ipython().<method>("...", ...)`` with constant string arguments, as IPython's
    input transformer writes ``!cmd`` and magics."""
    func = call.func
    if not (
        isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Call)
        and isinstance(func.value.func, ast.Name)
        and func.value.func.id == "get_ipython"
    ):
        return None
    texts: list[str] = []
    for arg in call.args:
        if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
            return None
        texts.append(arg.value)
    return func.attr, texts


_BRANCHING = (
    ast.If, ast.For, ast.AsyncFor, ast.While, ast.Match, ast.IfExp, ast.BoolOp,
    ast.comprehension, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp,
)  # fmt: skip


def _runs_once(parent: ast.AST, child: ast.AST) -> bool:
    """The test of an ``if`` and the iterable of a ``for`` run once; their bodies may not."""
    if isinstance(parent, ast.If):
        return child is parent.test
    if isinstance(parent, ast.For | ast.AsyncFor):
        return child is parent.iter
    return False


def _python_context(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> str | None:
    """Why a call may not have run exactly once, from the Python around it."""
    child = node
    parent = parents.get(child)
    while parent is not None:
        if isinstance(parent, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return _IN_FUNCTION
        if isinstance(parent, ast.ExceptHandler):
            return _IN_HANDLER
        if isinstance(parent, _BRANCHING) and not _runs_once(parent, child):
            return _CONDITIONAL
        child, parent = parent, parents.get(parent)
    return None


def _ipython_method(
    method: str, texts: list[str], reason: str | None, nesting: int
) -> list[PackageCommand]:
    if method in ("system", "getoutput") and len(texts) == 1:
        return _shell(texts[0], line="!" + texts[0], ipython=True, magic=False, reason=reason)
    if method == "run_line_magic" and len(texts) == 2:
        name, arg = texts
        if name in ("sx", "system"):
            return _shell(arg, line=f"%{name} {arg}", ipython=True, magic=False, reason=reason)
        if name == "time":
            return _cell(arg, reason, nesting + 1)
        return _line_magic(name, arg, reason)
    if method == "run_cell_magic" and len(texts) == 3:
        name, arg, body = texts
        interpreter = arg.split()[0] if name == "script" and arg.split() else name
        if os.path.basename(interpreter) in ("bash", "sh", "zsh", "dash"):
            return _shell(body, line="", ipython=False, magic=False, reason=reason)
        if name in ("capture", "time"):
            return _cell(body, reason, nesting + 1)
    return []


def _line_magic(name: str, arg: str, reason: str | None) -> list[PackageCommand]:
    if name not in ("pip", "conda", "mamba", "micromamba", "uv"):
        return []
    # These magics hand `<program> <arg>` to the shell (IPython's packaging magics).
    return _shell(f"{name} {arg}", line=f"%{name} {arg}", ipython=True, magic=True, reason=reason)


# ---------------------------------------------------------------------------------------------
# Package commands in shell text


_OPENERS = frozenset({"if", "while", "until", "for", "case", "select", "{"})
_CLOSERS = frozenset({"fi", "done", "esac", "}"})
_INNER = frozenset({"then", "do", "else", "elif", "!", "time", "command", "nohup"})
#: Commands that change nothing a later pip or conda command depends on.
_HARMLESS = frozenset(
    {
        ":", "true", "echo", "printf", "set", "sleep", "date", "which", "type", "hash", "pwd",
        "ls", "nvidia-smi", "whoami", "hostname", "nproc", "free", "df", "uname", "clear",
    }
)  # fmt: skip
_PIP = re.compile(r"pip(\d+(\.\d+)*)?")
_PYTHON = re.compile(r"python(\d+(\.\d+)*)?")
_SYS_EXECUTABLE = re.compile(r"([\"']?)\{sys\.executable\}\1")


def _shell(
    text: str, *, line: str, ipython: bool, magic: bool, reason: str | None
) -> list[PackageCommand]:
    """Package commands in shell text (a ``!`` line, a magic's line, a ``%%bash`` body).

    ``line``: the source line to report, or "" to take the lines of ``text`` that hold each
    command. ``reason``: why nothing here may be replayed (from the Python around it).
    """
    if "\x00" in text:
        return []
    # `!{sys.executable} -m pip`: the kernel's interpreter, which is what a replay uses anyway.
    # Same length, so that offsets into `text` stay right.
    scanned = (
        _SYS_EXECUTABLE.sub(lambda m: "python".ljust(len(m.group(0))), text) if ipython else text
    )
    found: list[PackageCommand] = []
    block: str | None = None  # why later commands in this text depend on earlier ones
    wrote: str | None = None  # the same, for commands with local paths, after a file was written
    nesting = 0
    for command in _commands(_tokens(scanned, ipython=ipython)):
        words = command.words
        inside = nesting > 0 or command.depth > 0
        while words and _keyword(words[0]):
            head = words[0].text
            if head in _OPENERS:
                nesting += 1
                inside = True
                if head in ("for", "case", "select"):
                    words = []  # the header of a loop / case: no command here
                    break
            elif head in _CLOSERS:
                nesting = max(0, nesting - 1)
            words = words[1:]
        if not words:
            continue
        own_line = line or _lines_of(text, command.start, command.end)
        parsed = _package(words, own_line, magic)
        if parsed is None:
            harmless = _pip_query(words) or (words[0].text in _HARMLESS and not words[0].expands)
            if harmless and command.writes:
                # Only a command that reads local files can depend on the written one.
                wrote = wrote or f"may read a file written by `{redact(words[0].text)}` before it"
            if harmless:
                continue
            block = block or f"runs after `{redact(words[0].text)}` in the same shell command"
            continue
        why = (
            reason
            or (_IN_SHELL_BLOCK if inside else None)
            or ("runs only if the command before it failed" if command.after == "||" else block)
            or (wrote if parsed.local_paths else None)
            or parsed.not_replayable
        )
        if why is None and any(w.substitutes for w in words):
            why = _SUBSTITUTION
        if why is None and any(w.expands for w in words):
            why = _PY_EXPANSION if ipython else _SH_EXPANSION
        found.append(replace(parsed, not_replayable=why))
    return found


def _keyword(word: _Word) -> bool:
    """A shell reserved word that opens, continues or closes a compound command."""
    if word.text in ("{", "}"):
        return True  # a group: the scanner marks braces as expansions
    return word.text in _OPENERS | _CLOSERS | _INNER and not word.expands


def _lines_of(text: str, start: int, end: int) -> str:
    first = text.rfind("\n", 0, start) + 1
    last = text.find("\n", end)
    return text[first : len(text) if last < 0 else last]


def _split_program(words: list[_Word]) -> tuple[Tool, str, list[_Word], str | None] | None:
    """(tool, program, words after the tool, why not replayable) for a pip/conda command."""
    assigned = []
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0].text, re.DOTALL):
        assigned.append(words[0].text.split("=", 1)[0])
        words = words[1:]
    if not words:
        return None
    why = f"sets {', '.join(assigned)} for the command" if assigned else None
    name = os.path.basename(words[0].text)
    if _PIP.fullmatch(name):
        return "pip", "pip", words[1:], why
    if name in ("conda", "mamba", "micromamba"):
        return "conda", name, words[1:], why
    if name == "uv" and len(words) > 1 and words[1].text == "pip":
        return "pip", "uv", words[2:], why
    if _PYTHON.fullmatch(name):
        rest = words[1:]
        # Interpreter options before `-m` (`python -u -m pip`); `-X` and `-W` take a value.
        while rest and rest[0].text.startswith("-") and not rest[0].text.startswith("-m"):
            if rest[0].text.startswith("-c"):
                return None
            rest = rest[2:] if rest[0].text in ("-X", "-W") else rest[1:]
        if not rest or not rest[0].text.startswith("-m"):
            return None
        module = rest[0].text[2:] or (rest[1].text if len(rest) > 1 else "")
        after = rest[1:] if rest[0].text[2:] else rest[2:]
        if module == "pip":
            return "pip", "pip", after, why
        if module == "uv" and after and after[0].text == "pip":
            return "pip", "uv", after[1:], why
    return None


def _package(words: list[_Word], line: str, magic: bool) -> PackageCommand | None:
    split = _split_program(words)
    if split is None:
        return None
    tool, program, rest, why = split
    args = tuple(word.text for word in rest)
    index = _action_index(tool, args)
    if index is None:
        return None
    if args[index] not in (PIP_ACTIONS if tool == "pip" else CONDA_ACTIONS):
        return None
    globbed = tuple(word.text for word in rest if word.glob)
    local = _local_paths(tool, args[index + 1 :])
    local = tuple(dict.fromkeys((*local, *globbed)))
    return PackageCommand(tool, args, line, program, magic, local, why)


def _pip_query(words: list[_Word]) -> bool:
    """A pip or conda command that is not an install (``pip list``, ``conda info`` ...)."""
    return _split_program(words) is not None


# pip's general options that take a value (so the value is not the subcommand).
_PIP_GENERAL_VALUES = frozenset(
    {
        "--python", "--log", "--log-file", "--local-log", "--proxy", "--retries", "--timeout",
        "--exists-action", "--trusted-host", "--cert", "--client-cert", "--cache-dir",
        "--use-feature", "--use-deprecated", "--keyring-provider", "--resume-retries",
    }
)  # fmt: skip


def _action_index(tool: str, args: Sequence[str]) -> int | None:
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            return i
        if tool == "pip" and arg in _PIP_GENERAL_VALUES:
            i += 1
        i += 1
    return None


# Options whose value is a local file or directory, and options whose value is not a
# requirement (skipped so it is not mistaken for one).
_PIP_PATH_OPTIONS = {"-r": "", "--requirement": "", "-c": "", "--constraint": "",
                     "-e": "editable", "--editable": "editable", "-f": "links",
                     "--find-links": "links", "--build-constraint": ""}  # fmt: skip
_PIP_VALUE_OPTIONS = _PIP_GENERAL_VALUES | {
    "-i", "--index-url", "--extra-index-url", "-t", "--target", "--platform",
    "--python-version", "--implementation", "--abi", "--root", "--prefix", "--src",
    "--upgrade-strategy", "-C", "--config-settings", "--global-option", "--no-binary",
    "--only-binary", "--progress-bar", "--report", "--group", "--root-user-action",
}  # fmt: skip
_CONDA_PATH_OPTIONS = {"--file": "", "-c": "links", "--channel": "links"}
_CONDA_VALUE_OPTIONS = frozenset(
    {"-n", "--name", "-p", "--prefix", "--repodata-fn", "--solver", "--experimental",
     "--subdir", "--platform"}
)  # fmt: skip
_ARCHIVES = (".whl", ".tar.gz", ".tgz", ".tar.bz2", ".zip", ".tar", ".conda")
_VCS = ("git+", "hg+", "svn+", "bzr+")
_FILE_URL = re.compile(r"(^|[\s@])file:")


def _local_paths(tool: str, args: Sequence[str]) -> tuple[str, ...]:
    path_options = _PIP_PATH_OPTIONS if tool == "pip" else _CONDA_PATH_OPTIONS
    value_options = _PIP_VALUE_OPTIONS if tool == "pip" else _CONDA_VALUE_OPTIONS
    found: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        option, value = arg, None
        if arg.startswith("--") and "=" in arg:
            option, value = arg.split("=", 1)
        elif len(arg) > 2 and arg[0] == "-" and arg[1] != "-" and arg[:2] in path_options:
            option, value = arg[:2], arg[2:]  # `-rreqs.txt`
        if option in path_options:
            if value is None:
                if i >= len(args):
                    break
                value, i = args[i], i + 1
            kind = path_options[option]
            if (kind == "editable" and value.startswith(_VCS)) or (
                kind == "links" and not _looks_local(value)
            ):
                continue
            found.append(value)
            continue
        if option in value_options:
            if value is None:
                i += 1
            continue
        if arg.startswith("-"):
            continue
        if _looks_local(arg):
            found.append(arg)
    return tuple(found)


def _looks_local(arg: str) -> bool:
    """A requirement that names something on this host's disk rather than on an index."""
    if _FILE_URL.search(arg):
        return True  # `file:///...`, also as `name @ file:///...`
    if "://" in arg:
        return False
    if arg.startswith((".", "/", "~")) or "/" in arg or "\\" in arg:
        return True
    return arg.lower().endswith(_ARCHIVES)
