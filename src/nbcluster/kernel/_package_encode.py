"""Package commands as msgpack-friendly primitives for the replicated log, and back.

The executor calls :func:`to_primitive` to put the commands that
:func:`nbcluster.kernel._package_parse.package_commands` found in a cell into the cell's log
record. Replicas call :func:`from_primitive` when they read such a record from a peer (when
they apply it, or replay the log on joining): it validates everything, and raises
:class:`PackageCommandError` naming the first problem, so a broken peer cannot make a replica
run anything but an install/uninstall of a known tool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._package_parse import CONDA_ACTIONS, PIP_ACTIONS, PROGRAMS, PackageCommand, _action_index

# Limits of a decoded list: far above any real cell, low enough that a broken peer cannot
# make a replica run a million commands.
MAX_COMMANDS = 1000
MAX_ARGS = 1000
MAX_TEXT = 65536


class PackageCommandError(ValueError):
    """A list of package commands could not be decoded; the text names what is wrong."""


def to_primitive(commands: Sequence[PackageCommand]) -> list[dict[str, Any]]:
    """Commands as a list of maps of str / bool / None / lists of str (msgpack- and
    JSON-friendly). The executor calls it to put a cell's commands into its log record."""
    return [
        {
            "tool": command.tool,
            "program": command.program,
            "args": list(command.args),
            "line": command.line,
            "magic": command.magic,
            "local": list(command.local_paths),
            "why": command.not_replayable,
        }
        for command in commands
    ]


def from_primitive(data: object) -> list[PackageCommand]:
    """The commands encoded by :func:`to_primitive`; raises :class:`PackageCommandError`
    naming the first problem. Replicas call it on a record from a peer, so it checks that each
    command is an install/uninstall of a known tool (a broken peer cannot make a replica run
    another pip or conda subcommand)."""
    if not isinstance(data, list | tuple):
        raise PackageCommandError(f"package commands must be a list, got {type(data).__name__}")
    if len(data) > MAX_COMMANDS:
        raise PackageCommandError(f"too many package commands ({len(data)} > {MAX_COMMANDS})")
    return [_decode_one(number, item) for number, item in enumerate(data, 1)]


def _decode_one(number: int, item: object) -> PackageCommand:
    where = f"package command {number}"
    if not isinstance(item, dict):
        raise PackageCommandError(f"{where} must be a map, got {type(item).__name__}")
    unknown = set(item) - {"tool", "program", "args", "line", "magic", "local", "why"}
    if unknown:
        raise PackageCommandError(f"{where} has unknown fields {sorted(map(str, unknown))}")
    tool = item.get("tool")
    if tool not in PROGRAMS:
        raise PackageCommandError(f"{where}: 'tool' must be 'pip' or 'conda', got {tool!r}")
    program = _text(item, "program", where)
    if program not in PROGRAMS[tool]:
        raise PackageCommandError(f"{where}: 'program' {program!r} is not a {tool} program")
    args = _texts(item, "args", where)
    line = _text(item, "line", where)
    magic = item.get("magic")
    if not isinstance(magic, bool):
        raise PackageCommandError(f"{where}: 'magic' must be bool, got {type(magic).__name__}")
    local = _texts(item, "local", where)
    why = item.get("why")
    if why is not None and not (isinstance(why, str) and len(why) <= MAX_TEXT):
        raise PackageCommandError(f"{where}: 'why' must be str or nil, got {type(why).__name__}")
    index = _action_index(tool, args)
    action = args[index] if index is not None else None
    if action not in (PIP_ACTIONS if tool == "pip" else CONDA_ACTIONS):
        raise PackageCommandError(f"{where}: {tool} subcommand {action!r} is not an install")
    if why is None and any("\x00" in arg for arg in args):
        raise PackageCommandError(f"{where}: an argument contains a NUL character")
    return PackageCommand(tool, args, line, program, magic, local, why)


def _text(item: dict[Any, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise PackageCommandError(f"{where}: {name!r} must be str, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise PackageCommandError(f"{where}: {name!r} is longer than {MAX_TEXT} characters")
    return value


def _texts(item: dict[Any, Any], name: str, where: str) -> tuple[str, ...]:
    value = item.get(name)
    if not isinstance(value, list | tuple):
        raise PackageCommandError(f"{where}: {name!r} must be a list, got {type(value).__name__}")
    if len(value) > MAX_ARGS:
        raise PackageCommandError(f"{where}: {name!r} has more than {MAX_ARGS} items")
    for index, text in enumerate(value):
        if not isinstance(text, str) or len(text) > MAX_TEXT:
            raise PackageCommandError(
                f"{where}: {name!r}[{index}] must be str of at most {MAX_TEXT} characters,"
                f" got {type(text).__name__}"
            )
    return tuple(value)
