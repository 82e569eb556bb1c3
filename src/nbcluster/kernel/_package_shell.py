"""A small POSIX-shell tokenizer, for the package-command parser.

Only :mod:`nbcluster.kernel._package_parse` calls it, while it reads a cell for package
commands (on the executor, after the cell ran): the text of a ``!`` line, of a ``%pip`` /
``%conda`` magic, or of a ``%%bash`` body is split into words and operators (:func:`_tokens`)
and then into simple commands with their separators (:func:`_commands`). It recognises quotes,
comments, operators, redirections, heredocs and expansions, and marks words whose value the
shell (or IPython) would substitute, so the parser can tell what cannot be repeated faithfully
on another host. It knows nothing about pip or conda.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(slots=True)
class _Word:
    text: str
    start: int
    end: int
    expands: bool = False  # $, backticks, braces: the shell (or IPython) substitutes something
    glob: bool = False  # unquoted * or ?: the shell matches local files
    substitutes: bool = False  # `...` or $(...): the output of another command


@dataclass(slots=True)
class _Op:
    text: str
    start: int


_OP_CHARS = frozenset(";&|<>()")
_OPS = (
    "<<<", "<<-", "&>>", "&&", "||", ";;", "|&", "&>", ">>", ">&", ">|", "<<", "<&", "<>",
    ";", "&", "|", "<", ">", "(", ")",
)  # fmt: skip
_SEPARATORS = frozenset({";", ";;", "&&", "||", "&", "|", "|&", "\n", "(", ")"})
_SPACE = frozenset(" \t\r")


def _tokens(text: str, *, ipython: bool) -> list[_Word | _Op]:
    """POSIX-shell words and operators of ``text``. Unquoted newlines become ``"\\n"``
    operators; heredoc bodies and comments are skipped. ``ipython``: the text is an IPython
    ``!`` / magic line, where IPython itself expands ``{...}`` and ``$name`` even inside quotes.
    """
    tokens: list[_Word | _Op] = []
    heredocs: list[tuple[str, bool]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            tokens.append(_Op("\n", i))
            i += 1
            for delimiter, strip_tabs in heredocs:
                i = _skip_heredoc(text, i, delimiter, strip_tabs)
            heredocs.clear()
            continue
        if c in _SPACE:
            i += 1
            continue
        if c == "\\" and text.startswith("\n", i + 1):
            i += 2
            continue
        if c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if c in _OP_CHARS:
            op = next(o for o in _OPS if text.startswith(o, i))
            last = tokens[-1] if tokens else None
            if op[0] in "<>" and isinstance(last, _Word) and last.end == i and last.text.isdigit():
                tokens.pop()  # `2>&1`: the digits are the redirected descriptor
            tokens.append(_Op(op, i))
            i += len(op)
            continue
        word, i = _word(text, i, ipython=ipython)
        last = tokens[-1] if tokens else None
        if isinstance(last, _Op) and last.text in ("<<", "<<-"):
            heredocs.append((word.text, last.text == "<<-"))
        tokens.append(word)
    return tokens


def _word(text: str, i: int, *, ipython: bool) -> tuple[_Word, int]:
    start, n = i, len(text)
    chars: list[str] = []
    expands = glob = substitutes = False
    while i < n:
        c = text[i]
        if c in _SPACE or c == "\n" or c in _OP_CHARS:
            break
        if c == "\\":
            if text.startswith("\n", i + 1):
                i += 2
                continue
            chars.append(text[i + 1 : i + 2])
            i += 2
            continue
        if c == "'":
            end = text.find("'", i + 1)
            end = n if end < 0 else end
            quoted = text[i + 1 : end]
            expands = expands or (ipython and any(x in quoted for x in "${}"))
            chars.append(quoted)
            i = end + 1
            continue
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                d = text[i]
                if d == "\\" and i + 1 < n and text[i + 1] in '$`"\\\n':
                    if text[i + 1] != "\n":
                        chars.append(text[i + 1])
                    i += 2
                    continue
                expands = expands or d in "$`" or (ipython and d in "{}")
                substitutes = substitutes or d == "`" or text.startswith("$(", i)
                chars.append(d)
                i += 1
            i += 1
            continue
        expands = expands or c in "$`{}"
        substitutes = substitutes or c == "`" or text.startswith("$(", i)
        glob = glob or c in "*?"
        chars.append(c)
        i += 1
    return _Word("".join(chars), start, min(i, n), expands, glob, substitutes), i


def _skip_heredoc(text: str, i: int, delimiter: str, strip_tabs: bool) -> int:
    while i < len(text):
        end = text.find("\n", i)
        end = len(text) if end < 0 else end
        line = text[i:end]
        i = end + 1
        if (line.lstrip("\t") if strip_tabs else line) == delimiter:
            break
    return min(i, len(text))


@dataclass(slots=True)
class _Command:
    words: list[_Word]
    after: str  # the separator before it ("" first)
    depth: int  # nesting in shell groups / compound commands
    start: int = 0
    end: int = 0
    writes: bool = False  # redirects its output into a file


_WRITE_REDIRECTS = frozenset({">", ">>", ">|", "&>", "&>>", ">&"})


def _commands(tokens: list[_Word | _Op]) -> Iterator[_Command]:
    """Simple commands with their separators; redirections and their targets are dropped
    (noting whether one writes a file: a later command may read it)."""
    depth = 0
    current = _Command([], "", 0)
    redirect = ""  # the redirection whose target word comes next
    for token in tokens:
        if isinstance(token, _Word):
            if redirect:
                # `2>&1` and `> /dev/null` write no file.
                current.writes = current.writes or (
                    redirect in _WRITE_REDIRECTS
                    and not token.text.isdigit()
                    and token.text not in ("-", "/dev/null")
                )
                redirect = ""
                continue
            if not current.words:
                current.start = token.start
                current.depth = depth
            current.words.append(token)
            current.end = token.end
            continue
        redirect = ""
        if token.text not in _SEPARATORS:
            redirect = token.text
            continue
        if current.words:
            yield current
        if token.text == "(":
            depth += 1
        elif token.text == ")":
            depth = max(0, depth - 1)
        current = _Command([], token.text, depth)
    if current.words:
        yield current
