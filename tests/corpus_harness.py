"""The failover corpus harness (issue 10): run a notebook on a plain local ipykernel and on
nbcluster (optionally killing the executor replica after every cell), then compare the cells'
outputs and a fingerprint of the kernel's state, listing every difference.

Pieces:

* :func:`load_notebook` reads the corpus formats: ``# %%`` percent files (ours), ``.ipynb``,
  MyST markdown (``{code-cell}`` blocks) and sphinx-gallery ``.py`` tutorials (public ones).
* :class:`LocalRunner` and :class:`ClusterRunner` run cells and return :class:`CellOutput`;
  both run :func:`kernel_probe` (sent as source, executed silently in the kernel) after the
  last cell to get the state fingerprint.
* :func:`compare` turns two :class:`NotebookRun` into a list of :class:`Difference`; those
  that nbcluster announced in a cell (a ``[nbcluster]`` line naming the variable) are marked
  ``announced`` and do not fail the test.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import importlib.util
import inspect
import json
import os
import queue
import re
import signal
import textwrap
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CORPUS_DIR = Path(__file__).parent / "corpus"
PUBLIC_DIR = CORPUS_DIR / "public"
ANNOUNCE = "[nbcluster]"

#: How the nbcluster run fails over: ``every`` kills the executor after every cell, ``last``
#: only once, after the last cell (before the fingerprint is taken, so the fingerprint is
#: that of a replica that received the state through the log), ``none`` never (the
#: fingerprint is then the executor's own).
KILL_MODES = ("every", "last", "none")

# --------------------------------------------------------------------------- notebooks


@dataclass
class Cell:
    index: int
    label: str
    source: str
    skip: str | None = None  # why the cell is not run, if it is not


@dataclass
class Notebook:
    name: str
    path: Path
    cells: list[Cell]
    requires: list[str] = field(default_factory=list)
    prelude: str | None = None  # run first on both sides (a seed for a public notebook)

    def runnable(self) -> list[Cell]:
        cells = [c for c in self.cells if c.skip is None]
        if self.prelude:
            cells.insert(0, Cell(-1, "prelude (seeds the global generators)", self.prelude))
        return cells


def _percent_cells(text: str) -> tuple[list[Cell], list[str]]:
    """``# %% label`` cells; header comment lines ``# requires: a, b`` name needed packages."""
    cells: list[Cell] = []
    requires: list[str] = []
    label: str | None = None
    lines: list[str] = []

    def flush() -> None:
        if label is not None:
            source = "\n".join(lines).strip("\n")
            if source.strip():
                cells.append(Cell(len(cells), label, source))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            label, lines = line[4:].strip() or f"cell {len(cells)}", []
        elif label is None:
            if line.startswith("# requires:"):
                requires += [r.strip() for r in line.split(":", 1)[1].split(",") if r.strip()]
        else:
            lines.append(line)
    flush()
    return cells, requires


def _ipynb_cells(text: str) -> list[Cell]:
    nb = json.loads(text)
    sources = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            src = cell["source"]
            sources.append("".join(src) if isinstance(src, list) else src)
    return [Cell(i, _first_line(s), s) for i, s in enumerate(sources)]


def _myst_cells(text: str) -> list[Cell]:
    blocks = re.findall(r"^```\{code-cell\}[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    return [Cell(i, _first_line(b), b.rstrip("\n")) for i, b in enumerate(blocks)]


def _sphinx_gallery_cells(text: str) -> list[Cell]:
    """Cells as sphinx-gallery makes them: blocks between lines of 20+ ``#``; a block's
    leading comment lines are its text; the module docstring is text too."""
    text = re.sub(r'\A\s*(""".*?"""|\'\'\'.*?\'\'\')', "", text, flags=re.DOTALL)
    sources = []
    for block in re.split(r"^#{20,}\s*$", text, flags=re.MULTILINE):
        lines = block.strip("\n").splitlines()
        while lines and (lines[0].startswith("#") or not lines[0].strip()):
            lines.pop(0)
        code = "\n".join(lines).strip("\n")
        if code.strip():
            sources.append(code)
    return [Cell(i, _first_line(s), s) for i, s in enumerate(sources)]


def _first_line(source: str) -> str:
    for line in source.splitlines():
        if line.strip():
            return line.strip()[:60]
    return ""


def public_manifest() -> dict[str, dict[str, Any]]:
    manifest: dict[str, dict[str, Any]] = json.loads((PUBLIC_DIR / "notebooks.json").read_text())
    return manifest


def corpus_notebooks() -> list[Path]:
    """Every corpus notebook: ours (``tests/corpus/*.py``), then the public ones."""
    ours = sorted(CORPUS_DIR.glob("*.py"))
    return ours + [PUBLIC_DIR / name for name in public_manifest()]


def load_notebook(path: Path) -> Notebook:
    text = path.read_text()
    if path.parent == PUBLIC_DIR:
        meta = public_manifest()[path.name]
        fmt = meta["format"]
        if fmt == "ipynb":
            cells = _ipynb_cells(text)
        elif fmt == "myst":
            cells = _myst_cells(text)
        elif fmt == "sphinx-gallery":
            cells = _sphinx_gallery_cells(text)
        else:
            raise ValueError(f"{path.name}: unknown format {fmt!r}")
        for skip in meta.get("skip", []):
            if "requires" in skip and importlib.util.find_spec(skip["requires"]) is not None:
                continue  # skipped only while the package is missing
            cell = cells[skip["cell"]]
            if not cell.source.startswith(skip["starts"]):
                raise ValueError(
                    f"{path.name}: cell {skip['cell']} should start with {skip['starts']!r}, "
                    f"starts with {cell.source[:40]!r}: update notebooks.json"
                )
            cell.skip = skip["reason"] + (
                f" ({skip['requires']} is not installed)" if "requires" in skip else ""
            )
        return Notebook(path.name, path, cells, list(meta.get("requires", [])), meta.get("prelude"))
    cells, requires = _percent_cells(text)
    return Notebook(path.name, path, cells, requires)


# --------------------------------------------------------------------------- outputs

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
_CELL_TMP = re.compile(r"\S*ipykernel_\d+")
_TIMINGS = [
    re.compile(r"^(CPU times|Wall time):.*$", re.MULTILINE),
    re.compile(r"^.*per loop \(mean ± std\. dev\. of .*$", re.MULTILINE),
]


def normalise(text: str, workdir: str) -> str:
    """What may differ between two correct runs: ANSI colours, memory addresses, the working
    directory's absolute path, ipykernel's per-process cell directory, timings."""
    text = _ANSI.sub("", text)
    text = _ADDRESS.sub("0x…", text)
    if workdir:
        text = text.replace(os.path.realpath(workdir), "<work>").replace(workdir, "<work>")
    text = _CELL_TMP.sub("<ipykernel-cells>", text)
    for pattern in _TIMINGS:
        text = pattern.sub("<timing>", text)
    return text


def split_announcements(text: str) -> tuple[str, list[str]]:
    """Remove nbcluster's own ``[nbcluster]`` lines from a stream; return them apart."""
    kept, announced = [], []
    for line in text.splitlines(keepends=True):
        (announced if ANNOUNCE in line else kept).append(line)
    return "".join(kept), [a.rstrip("\n") for a in announced]


@dataclass
class CellOutput:
    """One cell's outputs, normalised, in a form both runs produce alike."""

    status: str = ""
    execution_count: int | None = None
    stdout: str = ""
    stderr: str = ""
    results: list[str] = field(default_factory=list)  # execute_result text/plain
    displays: list[str] = field(default_factory=list)  # display_data mime types + text/plain
    error: list[str] | None = None  # ename, evalue, traceback
    pages: list[str] = field(default_factory=list)  # pager payloads (``obj?``)
    announcements: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # harness events (kill, timeouts)

    @classmethod
    def from_messages(
        cls, reply: dict[str, Any], messages: Iterable[dict[str, Any]], workdir: str
    ) -> CellOutput:
        out = cls(status=str(reply.get("status")), execution_count=reply.get("execution_count"))
        stdout, stderr = [], []
        for msg in messages:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                (stdout if content.get("name") == "stdout" else stderr).append(content["text"])
            elif kind == "execute_result":
                out.results.append(normalise(content["data"].get("text/plain", ""), workdir))
            elif kind in ("display_data", "update_display_data"):
                mimes = ",".join(sorted(content["data"]))
                text = normalise(content["data"].get("text/plain", ""), workdir)
                out.displays.append(f"{kind}[{mimes}] {text}")
            elif kind == "error":
                tb = normalise("\n".join(content.get("traceback", [])), workdir)
                out.error = [
                    content.get("ename", ""),
                    normalise(content.get("evalue", ""), workdir),
                    tb,
                ]
            elif kind == "clear_output":
                out.displays.append("clear_output")
        for item in reply.get("payload", []) or []:
            if item.get("source") == "page":
                out.pages.append(normalise(item.get("data", {}).get("text/plain", ""), workdir))
            elif "text" in item:
                out.pages.append(f"{item.get('source')}: {item['text']}")
        if reply.get("status") == "error" and out.error is None:
            out.error = [reply.get("ename", ""), normalise(reply.get("evalue", ""), workdir), ""]
        text_out, ann_out = split_announcements("".join(stdout))
        text_err, ann_err = split_announcements("".join(stderr))
        out.stdout = normalise(text_out, workdir)
        out.stderr = normalise(text_err, workdir)
        out.announcements = ann_out + ann_err
        return out


PROBE_MARK = "<<<corpus-probe>>>"


@dataclass
class NotebookRun:
    side: str  # "local" or "nbcluster"
    workdir: str
    cells: list[tuple[Cell, CellOutput]] = field(default_factory=list)
    probe: dict[str, Any] | None = None
    probe_error: str | None = None
    aborted: str | None = None  # why the run stopped before the last cell
    seconds: float = 0.0

    def announcements(self) -> list[tuple[int, str]]:
        return [(i, a) for i, (_, out) in enumerate(self.cells) for a in out.announcements]


def probe_code(workdir: str) -> str:
    """A cell that runs :func:`kernel_probe` in a private namespace and prints its JSON."""
    source = textwrap.dedent(inspect.getsource(kernel_probe))
    program = f"{source}\nprint({PROBE_MARK!r} + kernel_probe({workdir!r}) + {PROBE_MARK!r})\n"
    encoded = base64.b64encode(program.encode()).decode()
    return (
        f"exec(__import__('base64').b64decode('{encoded}').decode(), "
        "{'__name__': '__corpus_probe__'})"
    )


def parse_probe(stdout: str) -> dict[str, Any]:
    start = stdout.index(PROBE_MARK) + len(PROBE_MARK)
    end = stdout.index(PROBE_MARK, start)
    result: dict[str, Any] = json.loads(stdout[start:end])
    return result


# --------------------------------------------------------------------------- the probe


def kernel_probe(workdir):
    """Runs INSIDE the kernel (sent as source; it must only use what it imports itself).

    Returns JSON: every user global's type and a deterministic structural digest (with its
    first tokens, for the report), the identity classes among the globals (names bound to
    one object; names from which one mutable object is reachable), IPython's history and
    interpreter state a cell can change.
    """
    import collections
    import contextvars
    import decimal
    import enum
    import functools
    import hashlib
    import inspect
    import io
    import json
    import os
    import random
    import re
    import reprlib
    import sys
    import traceback
    import types
    import typing
    import warnings
    import weakref

    from IPython import get_ipython

    ip = get_ipython()
    ns = ip.user_ns
    hidden = ip.user_ns_hidden
    np = sys.modules.get("numpy")
    torch = sys.modules.get("torch")
    max_tokens = 60000  # the digest covers this many tokens
    max_nodes = 400000  # the walk (for identities) goes on this far
    keep_tokens = 250
    errors = []
    address = re.compile(r"0x[0-9a-fA-F]+")
    cell_tmp = re.compile(r"\S*ipykernel_\d+")
    lib_prefixes = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix})
    history_name = re.compile(r"^(_{1,3}|_i{1,3}|_i\d+|_\d+|_ih|_oh|_dh|In|Out)$")
    # immutable values whose identity means nothing (a range shared inside pandas or not)
    atoms = (type(None), bool, int, float, complex, str, bytes, type(Ellipsis), range)
    missing = object()

    def clean(text):
        text = address.sub("0x?", str(text))
        text = text.replace(workdir, "<work>")
        return cell_tmp.sub("<ipykernel-cells>", text)

    def digest(data):
        return hashlib.blake2b(data, digest_size=8).hexdigest()

    def lib_file(filename):
        return (
            not filename
            or filename.startswith(lib_prefixes)
            or "site-packages" in filename
            or filename.startswith("<frozen")
            or (os.sep + "nbcluster" + os.sep in filename and not filename.startswith(workdir))
        )

    def user_module_name(name):
        if name in ("__main__", "builtins"):
            return name == "__main__"
        module = sys.modules.get(name)
        return module is not None and not lib_file(getattr(module, "__file__", None) or "")

    def user_class(cls):
        return isinstance(cls, type) and user_module_name(getattr(cls, "__module__", ""))

    def user_code(fn):
        code = getattr(fn, "__code__", None)
        return code is not None and not lib_file(code.co_filename)

    def qual(obj):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"

    def atom_token(o):
        t = type(o)
        if t is str or t is bytes:
            text = clean(repr(o))
            return (
                f"{t.__name__}:{text}"
                if len(text) <= 300
                else f"{t.__name__}#{len(o)}:"
                + (digest(o if t is bytes else o.encode("utf-8", "backslashreplace")))
            )
        if t is int and o.bit_length() > 4000:
            return "int#" + digest(str(o).encode())
        if t is int and 2**44 <= o < 2**48 and o % 16 == 0:
            return "int:<an id()?>"  # libraries key dicts by id(obj): a per-process number
        return f"{t.__name__}:{o!r}"

    def code_sig(co):
        consts = []
        for c in co.co_consts:
            consts.append(
                f"code({code_sig(c)})" if isinstance(c, types.CodeType) else clean(repr(c))[:200]
            )
        return ":".join(
            [
                co.co_name,
                str(co.co_argcount),
                str(co.co_kwonlyargcount),
                str(co.co_flags),
                digest(co.co_code),
                ",".join(co.co_names),
                ",".join(co.co_varnames),
                ",".join(co.co_freevars),
                ",".join(co.co_cellvars),
                os.path.basename(co.co_filename),
                str(co.co_firstlineno),
                digest("|".join(consts).encode()),
            ]
        )

    def relevant(o):
        """Whether two names reaching ``o`` means they share state (``o`` can change)."""
        if isinstance(o, (tuple, frozenset, types.ModuleType, types.CodeType)):
            return False
        if isinstance(o, type):
            return user_class(o)
        if isinstance(o, (types.FunctionType, types.BuiltinFunctionType)):
            return isinstance(o, types.FunctionType) and user_code(o)
        return not isinstance(o, (types.MethodWrapperType, types.WrapperDescriptorType))

    class Walk:
        def __init__(self):
            self.h = hashlib.blake2b(digest_size=10)
            self.n = 0
            self.tokens = []
            self.memo = {}
            self.reach = set()
            self.keep = []

        def emit(self, tok):
            self.n += 1
            if self.n < max_tokens:
                self.h.update(tok.encode("utf-8", "backslashreplace") + b"\0")
            elif self.n == max_tokens:
                self.h.update(b"<truncated>")
            if len(self.tokens) < keep_tokens:
                self.tokens.append(tok[:160])

    def items_of(mapping, sort=False):
        pairs = list(mapping.items())
        if sort:
            pairs.sort(key=lambda kv: str(kv[0]))
        out = []
        for k, v in pairs:
            if isinstance(k, str):
                out.append((1, f".{k}"))
            else:
                out.append((1, "key"))
                out.append((0, k))
            out.append((0, v))
        return out

    # pandas' own bookkeeping, not the value: caches (an index's _cache) and the copy-on-write
    # tracking of which objects share a block (_references, _id), rebuilt by unpickling
    pandas_bookkeeping = {"_cache", "_item_cache", "_references", "_id"}
    # matplotlib's: whether a transform's cached matrix must be recomputed
    matplotlib_caches = {"_invalid"}

    def artist_summary(o):
        kind = type(o).__name__
        children = []
        if hasattr(o, "get_axes") and hasattr(o, "get_size_inches"):  # a Figure
            token = f"figure:{list(o.get_size_inches())}:{o.dpi}:{len(o.axes)}"
            children = [(0, ax) for ax in o.axes]
        elif hasattr(o, "get_title") and hasattr(o, "get_lines"):  # an Axes
            token = f"axes:{o.get_title()!r}:{list(o.get_xlim())}:{list(o.get_ylim())}"
            children = [(0, line) for line in o.get_lines()]
        elif hasattr(o, "get_xydata"):  # a Line2D
            token = (
                f"line:{o.get_xydata().tolist()}:{o.get_color()!r}:{o.get_linewidth()}"
                f":{o.get_label()!r}"
            )
        else:
            token = f"artist:{kind}"
        return token, children

    def bookkeeping(t):
        module = t.__module__ or ""
        if module.startswith("pandas"):
            return pandas_bookkeeping
        if module.startswith("matplotlib"):
            return matplotlib_caches
        return set()

    def attrs(o, skip=()):
        children = []
        skip = {*skip, *bookkeeping(type(o))}
        d = getattr(o, "__dict__", None)
        if isinstance(d, dict):
            children += items_of({k: v for k, v in d.items() if k not in skip}, sort=True)
        for klass in type(o).__mro__:
            slots = klass.__dict__.get("__slots__", ())
            for slot in [slots] if isinstance(slots, str) else slots:
                if slot in ("__dict__", "__weakref__"):
                    continue
                name = f"_{klass.__name__.lstrip('_')}{slot}" if slot.startswith("__") else slot
                value = getattr(o, name, missing)
                children.append((1, f"slot {slot}" + (" unset" if value is missing else "")))
                if value is not missing:
                    children.append((0, value))
        return children

    def node(o, w):
        t = type(o)
        if t in atoms:
            return atom_token(o), []
        if t is tuple or t is frozenset:
            pass  # immutable: sharing one is not observable (but for "is"), so no back-reference
        elif id(o) in w.memo:
            return f"@{w.memo[id(o)]}", []
        else:
            w.memo[id(o)] = len(w.memo)
            w.keep.append(o)
        if relevant(o):
            w.reach.add(id(o))
        if user_class(t):
            w.reach.add(id(t))
            w.keep.append(t)
        name = t.__qualname__
        if t in (list, tuple):
            return f"{name}[{len(o)}]", [(0, v) for v in o]
        if t is dict:
            return f"dict{{{len(o)}}}", items_of(o)
        if isinstance(o, (set, frozenset)):
            subs = []
            for element in o:
                sub = walk(element)
                w.reach |= sub.reach
                w.keep += sub.keep
                subs.append(sub.h.hexdigest())
            return f"{name}{{{len(o)}}}:" + digest(",".join(sorted(subs)).encode()), attrs(o)
        if isinstance(o, dict):
            children = []
            if isinstance(o, collections.defaultdict):
                children = [(1, "default_factory"), (0, o.default_factory)]
            return f"{qual(t)}{{{len(o)}}}", children + items_of(o) + attrs(o)
        if isinstance(o, (list, tuple, collections.deque)):
            extra = f"maxlen={o.maxlen}" if isinstance(o, collections.deque) else ""
            return f"{qual(t)}[{len(o)}]{extra}", [(0, v) for v in o] + attrs(o)
        if isinstance(o, (bytearray, memoryview)):
            return f"{name}:" + digest(bytes(o)), []
        if isinstance(o, type):
            token = f"class:{qual(o)}"
            if not user_class(o):
                return token, []
            skip = {
                "__dict__",
                "__weakref__",
                "__module__",
                "__qualname__",
                "__slotnames__",
                "_abc_impl",
            }
            children = [(1, "bases")] + [(0, b) for b in o.__bases__]
            if type(o) is not type:
                children += [(1, "metaclass"), (0, type(o))]
            body = {k: v for k, v in vars(o).items() if k not in skip}
            return token, children + items_of(body, sort=True)
        if isinstance(o, types.ModuleType):
            token = f"module:{o.__name__}"
            if not user_module_name(o.__name__):
                return token, []
            body = {
                k: v for k, v in vars(o).items() if not (k.startswith("__") and k.endswith("__"))
            }
            return token, items_of(body, sort=True)
        if (
            callable(o)
            and hasattr(o, "registry")
            and hasattr(o, "dispatch")
            and hasattr(o, "register")
        ):
            registry = sorted(o.registry.items(), key=lambda kv: qual(kv[0]))
            children = [(1, "wrapped"), (0, getattr(o, "__wrapped__", None))]
            for klass, fn in registry:
                children += [(0, klass), (0, fn)]
            return f"singledispatch:{qual(o)}", children
        if isinstance(o, types.FunctionType):
            token = f"function:{qual(o)}"
            if not user_code(o):
                wrapped = getattr(o, "__wrapped__", missing)
                return token, [] if wrapped is missing else [(1, "wrapped"), (0, wrapped)]
            try:
                source = "src:" + digest(inspect.getsource(o).encode())
            except (OSError, TypeError) as exc:
                source = f"nosrc:{type(exc).__name__}"
            token += ":" + code_sig(o.__code__) + ":" + source
            children = [
                (1, "defaults"),
                (0, o.__defaults__),
                (1, "kwdefaults"),
                (0, o.__kwdefaults__),
            ]
            for cell in o.__closure__ or ():
                children.append((0, cell))
            children += items_of(dict(sorted(vars(o).items())))
            return token, children
        if isinstance(o, types.CellType):
            try:
                return "cell", [(0, o.cell_contents)]
            except ValueError:
                return "cell:empty", []
        if isinstance(o, types.MethodType):
            return "method", [(0, o.__func__), (0, o.__self__)]
        if isinstance(o, types.BuiltinFunctionType):
            owner = getattr(o, "__self__", None)
            token = f"builtin:{getattr(o, '__module__', None)}.{o.__qualname__}"
            if owner is None or isinstance(owner, types.ModuleType):
                return token, []
            return token, [(0, owner)]
        if isinstance(o, (classmethod, staticmethod)):
            return name, [(0, o.__func__)]
        if isinstance(o, property):
            return "property", [(0, o.fget), (0, o.fset), (0, o.fdel)]
        if isinstance(o, functools.cached_property):
            return f"cached_property:{o.attrname}", [(0, o.func)]
        if isinstance(o, functools.partial):
            return "partial", [(0, o.func), (0, o.args), (0, o.keywords)]
        if callable(o) and hasattr(o, "cache_info") and hasattr(o, "__wrapped__"):
            params = getattr(o, "cache_parameters", dict)()
            return f"lru_cache:{sorted(params.items())}", [(1, "wrapped"), (0, o.__wrapped__)]
        if np is not None:
            if isinstance(o, np.ma.MaskedArray):
                data = np.ascontiguousarray(o.data).tobytes()
                mask = np.ascontiguousarray(np.ma.getmaskarray(o)).tobytes()
                return f"masked:{o.dtype.str}:{o.shape}:{digest(data)}:{digest(mask)}", [
                    (0, o.fill_value)
                ]
            if isinstance(o, np.ndarray):
                base = o.base
                while base is not None:
                    w.reach.add(id(base))
                    w.keep.append(base)
                    base = getattr(base, "base", None)
                if o.dtype.hasobject:
                    return f"ndarray:{o.dtype.str}:{o.shape}", [(0, v) for v in o.ravel().tolist()]
                data = np.ascontiguousarray(o).tobytes()
                return f"ndarray:{o.dtype.descr}:{o.shape}:{digest(data)}", []
            if isinstance(o, np.generic):
                return f"numpy:{o.dtype.str}:{o.item()!r}", []
            if isinstance(o, np.random.Generator):
                return "numpy.Generator", [(0, o.bit_generator.state)]
            if isinstance(o, np.random.RandomState):
                return "numpy.RandomState", [(0, o.get_state(legacy=False))]
            if isinstance(o, np.dtype):
                return f"dtype:{o.descr}", []
        if torch is not None:
            if isinstance(o, torch.Tensor):
                flat = o.detach().cpu().contiguous().reshape(-1)
                try:
                    data = digest(flat.numpy().tobytes())
                except (TypeError, RuntimeError):
                    data = digest(repr(flat.tolist()).encode())
                ptr = o.untyped_storage().data_ptr() if o.numel() else 0
                if ptr:
                    w.reach.add(f"storage:{ptr}")
                grad_fn = type(o.grad_fn).__name__ if o.grad_fn is not None else None
                token = (
                    f"{qual(t)}:{o.dtype}:{tuple(o.shape)}:grad={o.requires_grad}:"
                    f"leaf={o.is_leaf}:fn={grad_fn}:{data}"
                )
                children = [] if o.grad is None else [(1, "grad"), (0, o.grad)]
                return token, children + attrs(o)
            if isinstance(o, torch.Generator):
                return "torch.Generator:" + digest(o.get_state().numpy().tobytes()), []
        if isinstance(o, BaseException):
            children = [(0, o.args)]
            children += items_of(dict(sorted(vars(o).items())))
            for frame in traceback.extract_tb(o.__traceback__):
                children.append((1, f"tb:{frame.name}:{frame.lineno}:{frame.line}"))
            children += [(1, "cause"), (0, o.__cause__), (1, "context"), (0, o.__context__)]
            return f"exception:{qual(t)}:suppress={o.__suppress_context__}", children
        if inspect.isgenerator(o):
            state = inspect.getgeneratorstate(o)
            frame = o.gi_frame
            if frame is None:
                return f"generator:{o.__qualname__}:{state}", []
            return f"generator:{o.__qualname__}:{state}:line={frame.f_lineno}", [
                (0, dict(frame.f_locals))
            ]
        if isinstance(o, weakref.ref):
            target = o()
            return f"weakref:alive={target is not None}", [] if target is None else [(0, target)]
        if isinstance(o, contextvars.ContextVar):
            try:
                value = o.get()
            except LookupError:
                return f"contextvar:{o.name}:unset", []
            return f"contextvar:{o.name}", [(0, value)]
        if isinstance(o, io.IOBase):
            mode = getattr(o, "mode", "?")
            return f"file:{qual(t)}:{clean(getattr(o, 'name', '?'))}:{mode}:closed={o.closed}", []
        if isinstance(o, typing.TypeVar):
            return f"TypeVar:{o.__name__}:{o.__bound__!r}:{o.__constraints__!r}", []
        if t.__module__ in ("typing", "types") and not hasattr(o, "__dict__"):
            return f"typing:{clean(repr(o))}", []
        if isinstance(o, enum.Enum):
            return f"enum:{qual(t)}.{o.name}", [(0, o.value)]
        if (t.__module__ or "").startswith("matplotlib") and hasattr(o, "get_figure"):
            # an Artist: what the user sees and asks of it, not matplotlib's caches
            # (transforms' invalidation flags, cached bounding boxes)
            return artist_summary(o)
        if qual(t) == "matplotlib.cbook.CallbackRegistry":
            # its __getstate__ advances its callback-id counter, and pickling renumbers ids
            return f"callbacks:{sorted(map(str, o.callbacks))}", []
        if getattr(t, "__getstate__", None) not in (None, object.__getstate__) and (
            hasattr(o, "__dict__") or hasattr(t, "__slots__")
        ):
            # a class that says what its state is (what pickle would carry): that is its value
            state = o.__getstate__()
            if isinstance(state, dict):
                ignored = bookkeeping(t)
                state = {k: v for k, v in state.items() if k not in ignored}
                return f"object:{qual(t)}:getstate", items_of(state, sort=True)
            return f"object:{qual(t)}:getstate", [(0, state)]
        children = attrs(o)
        if children or isinstance(getattr(o, "__dict__", None), dict):
            return f"object:{qual(t)}", children
        try:
            reduced = o.__reduce_ex__(4)
        except Exception:
            reduced = None
        if isinstance(reduced, str):
            return f"global:{qual(t)}:{reduced}", []
        if isinstance(reduced, tuple) and reduced[0] is iter and len(reduced[1]) == 1:
            # a sequence iterator: what it has left to yield (an exhausted one reduces to
            # iter(empty) without a position)
            position = reduced[2] if len(reduced) > 2 else len(reduced[1][0])
            return "iterator", [(0, list(reduced[1][0][position:]))]
        if isinstance(reduced, tuple) and len(reduced) >= 2:
            parts = list(reduced[1:3])
            for extra in reduced[3:5]:
                parts.append(None if extra is None else list(extra))
            return f"reduce:{qual(t)}", [(0, p) for p in parts]
        return f"repr:{qual(t)}:{clean(repr(o))[:300]}", []

    def walk(root):
        w = Walk()
        stack = [(0, root)]
        while stack:
            if w.n >= max_nodes:
                break  # the digest stopped at max_tokens; reach is complete up to here
            kind, item = stack.pop()
            if kind:
                w.emit(item)
                continue
            try:
                token, children = node(item, w)
            except Exception as exc:
                token, children = f"<error {type(exc).__name__}>", []
                errors.append(f"{type(item).__name__}: {type(exc).__name__}: {exc}"[:300])
            w.emit(token)
            if children:
                stack.append((1, ")"))
                stack.extend(reversed(children))
        return w

    short = reprlib.Repr()
    short.maxstring = short.maxother = 120
    short.maxlevel = 4

    def preview(value):
        try:
            return clean(short.repr(value))[:200]
        except Exception as exc:
            return f"<repr failed: {type(exc).__name__}>"

    def describe(value):
        w = walk(value)
        return w, {
            "type": qual(type(value)),
            "digest": w.h.hexdigest(),
            "tokens": w.tokens,
            "preview": preview(value),
        }

    # interpreter state first: nothing below may change it
    state = {}
    state["sys.getrecursionlimit()"] = sys.getrecursionlimit()
    ctx = decimal.getcontext()
    traps = sorted(k.__name__ for k, v in ctx.traps.items() if v)
    state["decimal.getcontext()"] = (
        f"prec={ctx.prec} rounding={ctx.rounding} Emin={ctx.Emin} Emax={ctx.Emax} "
        f"capitals={ctx.capitals} clamp={ctx.clamp} traps={traps}"
    )
    state["random (global generator)"] = digest(repr(random.getstate()).encode())
    state["os.environ"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("CORPUS_")}
    state["sys.path"] = [p for p in sys.path if "corpus" in p]
    state["os.getcwd()"] = os.path.relpath(os.getcwd(), workdir)
    # filters whose category a library defines come and go with the library's import
    state["warnings.filters"] = [
        clean(f"{a} {getattr(m, 'pattern', m)} {c.__name__} {getattr(mod, 'pattern', mod)} {ln}")
        for a, m, c, mod, ln in warnings.filters
        if getattr(c, "__module__", "") in ("builtins", "__main__")
    ]
    if np is not None:
        state["np.get_printoptions()"] = repr(sorted(np.get_printoptions().items()))
        state["np.geterr()"] = repr(sorted(np.geterr().items()))
        state["np.random (global generator)"] = digest(
            repr(np.random.get_state(legacy=False)).encode()
        )
    if torch is not None:
        state["torch (global generator)"] = digest(torch.get_rng_state().numpy().tobytes())
        state["torch.get_default_dtype()"] = str(torch.get_default_dtype())
        state["torch.is_grad_enabled()"] = torch.is_grad_enabled()
    formatter = ip.display_formatter.formatters["text/plain"]
    state["%precision"] = f"{formatter.float_precision!r} {formatter.float_format!r}"
    state["%xmode"] = ip.InteractiveTB.mode
    state["ast_node_interactivity"] = ip.ast_node_interactivity
    state["user magics"] = sorted(
        f"{kind}:{name}"
        for kind, table in ip.magics_manager.magics.items()
        for name, fn in table.items()
        if getattr(fn, "__module__", "") == "__main__"
    )
    state["event callbacks"] = sorted(
        f"{event}:{getattr(cb, '__qualname__', cb)}"
        for event, callbacks in ip.events.callbacks.items()
        for cb in callbacks
        if getattr(cb, "__module__", "") == "__main__"
    )
    state["loaded extensions"] = sorted(
        e for e in ip.extension_manager.loaded if "nbcluster" not in e
    )

    modules = {}
    for name, module in sorted(sys.modules.items()):
        filename = getattr(module, "__file__", None) or ""
        if isinstance(module, types.ModuleType) and (
            name.startswith("corpus_") or (filename and filename.startswith(workdir))
        ):
            modules[name] = describe(module)[1]

    globals_, walks, values = {}, {}, {}
    for name in sorted(ns):
        value = ns[name]
        if name.startswith("__") and name.endswith("__"):
            continue
        if history_name.match(name):
            continue
        if name in hidden and hidden[name] is value:
            continue
        w, globals_[name] = describe(value)
        walks[name], values[name] = w, value

    same = {}
    for name, value in values.items():
        if type(value) in atoms or (
            isinstance(value, (tuple, frozenset)) and not walks[name].reach
        ):
            continue
        same.setdefault(id(value), []).append(name)
    same_groups = sorted(sorted(names) for names in same.values() if len(names) > 1)

    reached = {}
    for name, w in walks.items():
        for key in w.reach:
            reached.setdefault(key, set()).add(name)
    shared = {tuple(sorted(names)) for names in reached.values() if len(names) > 1}
    shared -= {tuple(group) for group in same_groups}
    shared_groups = sorted(list(group) for group in shared)

    history = {}
    inputs = ns.get("In")
    history["In"] = [clean(s) for s in inputs] if isinstance(inputs, list) else None
    outputs = ns.get("Out")
    history["Out"] = (
        {str(k): describe(v)[1] for k, v in sorted(outputs.items())}
        if isinstance(outputs, dict)
        else None
    )
    for name in ("_", "__", "___"):
        history[name] = describe(ns[name])[1] if name in ns else None
    for name in ("_i", "_ii", "_iii"):
        history[name] = clean(ns[name]) if isinstance(ns.get(name), str) else None
    history["_iN"] = sorted(int(n[2:]) for n in ns if re.match(r"^_i\d+$", n))
    history["_N"] = sorted(int(n[1:]) for n in ns if re.match(r"^_\d+$", n))
    history["execution_count"] = ip.execution_count

    return json.dumps(
        {
            "globals": globals_,
            "same": same_groups,
            "shared": shared_groups,
            "history": history,
            "state": state,
            "modules": modules,
            "errors": errors[:20],
        },
        default=repr,
    )


# --------------------------------------------------------------------------- comparison


@dataclass
class Difference:
    notebook: str
    where: str  # "cell 3 'label'" or "state" / "global x" ...
    what: str
    expected: str
    got: str
    names: set[str] = field(default_factory=set)  # variables this difference is about
    announced: str | None = None  # the [nbcluster] line that announced it

    def render(self) -> str:
        head = f"[{self.notebook}] {self.where}: {self.what}"
        if self.announced:
            head += f"  (announced: {self.announced.strip()})"
        return (
            f"{head}\n      local:     {_clip(self.expected)}\n      nbcluster: {_clip(self.got)}"
        )


def _clip(text: str, limit: int = 1500) -> str:
    text = repr(text) if isinstance(text, str) else str(text)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} chars)"


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")  # in announcements: "os.environ" too
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PROSE = {
    "a",
    "an",
    "and",
    "are",
    "as",
    "be",
    "by",
    "in",
    "is",
    "it",
    "of",
    "on",
    "or",
    "the",
    "to",
}


def announced_names(line: str) -> set[str]:
    """The names an ``[nbcluster]`` line announces: those listed after its last colon
    ("... will not survive a failover: fh, lock"), else every word that is not prose."""
    text = line.split(ANNOUNCE, 1)[-1]
    if ":" in text:
        listed = text.rsplit(":", 1)[1]
        listed = re.sub(r"\([^)]*\)", "", listed)  # "(why)" after a name
        names = {n.rstrip(".") for n in _IDENT.findall(listed)}
    else:
        names = {n.rstrip(".") for n in _IDENT.findall(text)} - _PROSE
    return names | {n.split(".")[0] for n in names}


def _announced(names: Iterable[str], announcements: list[tuple[int, str]], upto: int) -> str | None:
    """The first ``[nbcluster]`` line (of a cell up to position ``upto``) naming one of
    ``names``."""
    wanted = set(names)
    for index, line in announcements:
        if index <= upto and wanted & announced_names(line):
            return line
    return None


def _first_token_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    ta, tb = a.get("tokens", []), b.get("tokens", [])
    for i, (x, y) in enumerate(zip(ta, tb, strict=False)):
        if x != y:
            return f"; first difference at token {i}: {x!r} vs {y!r}"
    if len(ta) != len(tb):
        return f"; {len(ta)} vs {len(tb)} tokens"
    return f"; the first {len(ta)} tokens agree"


OUTPUT_FIELDS = (
    "status",
    "execution_count",
    "stdout",
    "stderr",
    "results",
    "displays",
    "error",
    "pages",
)


#: Cells whose output lists the whole namespace: any announced loss shows in them.
_LISTS_NAMESPACE = re.compile(r"%who|\bdir\(\)|\bglobals\(\)|\blocals\(\)|\*\?")


def bindings(source: str) -> tuple[set[str], set[str]]:
    """The names a cell binds and the strings it mentions (file names it may write)."""
    from IPython.core.inputtransformer2 import TransformerManager

    try:
        tree = ast.parse(TransformerManager().transform_cell(source))
    except SyntaxError:
        return set(_WORD.findall(source)), set()
    names, strings = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if 3 <= len(node.value) <= 200 and "\n" not in node.value:
                strings.add(node.value)
        elif isinstance(node, ast.Attribute) and node.attr in ("system", "getoutput"):
            names.add("_exit_code")  # a shell escape (!cmd) sets it
    return names, strings


def compare(notebook: Notebook, local: NotebookRun, cluster: NotebookRun) -> list[Difference]:
    """Every difference between the two runs, cell by cell, then in the fingerprints.

    A difference is accepted (``announced`` set) when a ``[nbcluster]`` line of the nbcluster
    run names one of its variables: for a cell, a name in the cell's source (any name, for a
    cell that lists the namespace such as ``%whos``), announced in that cell or before. What a
    cell with an accepted difference binds (and the files it names) may differ or be lost too:
    later differences that involve those are accepted as "downstream" of it.
    """
    diffs: list[Difference] = []
    nb = notebook.name
    announcements = cluster.announcements()
    every_announced = set().union(*(announced_names(line) for _, line in announcements))
    lost_names: dict[str, str] = {}  # name -> why it is lost (downstream of which cell)
    lost_strings: dict[str, str] = {}
    for position, ((cell, exp), (_, got)) in enumerate(
        zip(local.cells, cluster.cells, strict=False)
    ):
        where = f"cell {cell.index} {cell.label!r}"
        for note in got.notes:
            diffs.append(Difference(nb, where, "failover", "", note))
        changed = [f for f in OUTPUT_FIELDS if getattr(exp, f) != getattr(got, f)]
        if not changed:
            continue
        names = set(_WORD.findall(cell.source))
        if _LISTS_NAMESPACE.search(cell.source):
            names |= every_announced
        diff = Difference(
            nb,
            where,
            "output differs: " + ", ".join(changed),
            _fields(exp, changed),
            _fields(got, changed),
            names,
        )
        diff.announced = _announced(names, announcements, position)
        if diff.announced is None:
            because = [lost_names[n] for n in sorted(names & set(lost_names))]
            because += [why for text, why in lost_strings.items() if text in cell.source]
            diff.announced = because[0] if because else None
        if diff.announced:
            # what this cell binds may differ too (and what it would have written)
            why = diff.announced
            if not why.startswith("downstream"):
                why = f"downstream of cell {cell.index}: {why}"
            bound, strings = bindings(cell.source)
            lost_names.update(dict.fromkeys(bound - set(lost_names), why))
            lost_strings.update(dict.fromkeys(strings - set(lost_strings), why))
        diffs.append(diff)
    if len(cluster.cells) < len(local.cells):
        missing = len(local.cells) - len(cluster.cells)
        diffs.append(
            Difference(
                nb, "run", f"{missing} cells not run on nbcluster", "", cluster.aborted or ""
            )
        )
    if local.probe is None or cluster.probe is None:
        side, run = ("local", local) if local.probe is None else ("nbcluster", cluster)
        diffs.append(
            Difference(nb, "fingerprint", f"{side} probe failed", "", run.probe_error or "")
        )
        return diffs
    sources = "\n".join(cell.source for cell in notebook.runnable())
    unseeded = {key for key, seed in SEEDS.items() if not any(re.search(p, sources) for p in seed)}
    for diff in _compare_probes(nb, local.probe, cluster.probe, announcements, unseeded):
        if diff.announced is None and diff.names and diff.names <= set(lost_names):
            diff.announced = lost_names[sorted(diff.names)[0]]
        diffs.append(diff)
    return diffs


#: The global generators the probe reports, and how a notebook seeds them: a generator the
#: notebook never seeds starts from OS entropy in each process, so its state is compared only
#: when the notebook seeds it.
SEEDS = {
    "random (global generator)": [r"\brandom\.seed\("],
    "np.random (global generator)": [r"\b(np|numpy)\.random\.seed\("],
    "torch (global generator)": [r"\bmanual_seed\("],
}


def _fields(out: CellOutput, fields: list[str]) -> str:
    if len(fields) == 1:
        return _fmt(getattr(out, fields[0]))
    return " | ".join(f"{f}={_fmt(getattr(out, f))}" for f in fields)


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _compare_probes(
    nb: str,
    exp: dict[str, Any],
    got: dict[str, Any],
    announcements: list[tuple[int, str]],
    unseeded: set[str],
) -> list[Difference]:
    diffs: list[Difference] = []
    last = 1 << 30

    def add(where: str, what: str, a: Any, b: Any, names: set[str]) -> None:
        diff = Difference(nb, where, what, _fmt(a), _fmt(b), names)
        diff.announced = _announced(names, announcements, last)
        diffs.append(diff)

    eg, gg = exp["globals"], got["globals"]
    for name in sorted(set(eg) | set(gg)):
        if name not in gg:
            add(f"global {name}", "missing on nbcluster", eg[name]["preview"], "<missing>", {name})
        elif name not in eg:
            add(f"global {name}", "only on nbcluster", "<missing>", gg[name]["preview"], {name})
        elif eg[name]["type"] != gg[name]["type"]:
            add(f"global {name}", "type differs", eg[name]["type"], gg[name]["type"], {name})
        elif eg[name]["digest"] != gg[name]["digest"]:
            what = "value differs" + _first_token_difference(eg[name], gg[name])
            add(f"global {name}", what, eg[name]["preview"], gg[name]["preview"], {name})
    common = set(eg) & set(gg)  # a name missing on one side is reported above

    def pairs(*found: list[list[str]]) -> set[tuple[str, str]]:
        kept = [sorted(n for n in group if n in common) for groups in found for group in groups]
        return {(a, b) for group in kept for i, a in enumerate(group) for b in group[i + 1 :]}

    checks = (
        ("is the same object as", pairs(exp["same"]), pairs(got["same"])),
        (
            "shares a mutable object with",
            pairs(exp["same"], exp["shared"]),
            pairs(got["same"], got["shared"]),
        ),
    )
    reported: set[tuple[str, str]] = set()  # "same object" lost implies "shares" lost
    for relation, local_pairs, cluster_pairs in checks:
        for a, b in sorted(local_pairs - cluster_pairs - reported):
            add("identity", f"{a} {relation} {b} locally, not on nbcluster", "yes", "no", {a, b})
        for a, b in sorted(cluster_pairs - local_pairs - reported):
            add("identity", f"{a} {relation} {b} only on nbcluster", "no", "yes", {a, b})
        reported |= local_pairs ^ cluster_pairs
    eh, gh = exp["history"], got["history"]
    for key in eh:
        a, b = eh[key], gh.get(key)
        if key in ("_", "__", "___") and a and b:
            a, b = (a["type"], a["digest"], a["preview"]), (b["type"], b["digest"], b["preview"])
        if key == "Out" and isinstance(a, dict) and isinstance(b, dict):
            a = {k: (v["type"], v["digest"], v["preview"]) for k, v in a.items()}
            b = {k: (v["type"], v["digest"], v["preview"]) for k, v in b.items()}
        if a != b:
            add("IPython history", key, a, b, {key})
    es, gs = exp["state"], got["state"]
    for key in es:
        if key not in unseeded and es[key] != gs.get(key, "<absent>"):
            add("interpreter state", key, es[key], gs.get(key, "<absent>"), {key})
    em, gm = exp["modules"], got["modules"]
    for name in sorted(set(em) | set(gm)):
        a, b = em.get(name), gm.get(name)
        if a is None or b is None or a["digest"] != b["digest"]:
            what = "module state differs" + (_first_token_difference(a, b) if a and b else "")
            add(f"module {name}", what, a and a["preview"], b and b["preview"], {name})
    if got.get("errors"):
        add("fingerprint", "probe errors on nbcluster", exp.get("errors"), got["errors"], set())
    return diffs


def report(
    notebook: Notebook, diffs: list[Difference], local: NotebookRun, cluster: NotebookRun
) -> str:
    failing = [d for d in diffs if not d.announced]
    announced = [d for d in diffs if d.announced]
    skipped = [c for c in notebook.cells if c.skip]
    lines = [
        f"{notebook.name}: {len(failing)} unannounced differences, {len(announced)} announced "
        f"({len(local.cells)} cells; local {local.seconds:.1f} s, nbcluster {cluster.seconds:.1f} s)"
    ]
    lines += [d.render() for d in failing]
    if announced:
        lines.append("announced by nbcluster (accepted):")
        lines += [d.render() for d in announced]
    if skipped:
        lines.append("cells not run: " + "; ".join(f"{c.index} ({c.skip})" for c in skipped))
    return "\n".join(lines)


# --------------------------------------------------------------------------- runners

CELL_TIMEOUT = 120.0
#: A replacement joins in 1-7 s on the 2-core test machine when alone, but `make test` runs two
#: workers, and beside another heavy test a join of a torch kernel took over 20 s (the time the
#: gateway gives one join before it retries): wait for a retried join too.
REPLACEMENT_TIMEOUT = 60.0


class LocalRunner:
    """A plain ipykernel (this venv's ``python3`` kernelspec) via jupyter_client."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.km: Any = None
        self.kc: Any = None

    async def __aenter__(self) -> LocalRunner:
        from jupyter_client.manager import AsyncKernelManager

        self.km = AsyncKernelManager(kernel_name="python3")
        await self.km.start_kernel(cwd=str(self.workdir))
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=60)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km is not None:
            await self.km.shutdown_kernel(now=True)

    async def execute(self, code: str, silent: bool = False) -> CellOutput:
        msg_id = self.kc.execute(
            code, silent=silent, store_history=not silent, allow_stdin=False, stop_on_error=True
        )
        deadline = time.monotonic() + CELL_TIMEOUT
        messages = []
        try:
            while True:
                msg = await self.kc.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.01))
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "status":
                    if msg["content"]["execution_state"] == "idle":
                        break
                    continue
                messages.append(msg)
            while True:
                reply = await self.kc.get_shell_msg(timeout=max(deadline - time.monotonic(), 0.01))
                if reply["parent_header"].get("msg_id") == msg_id:
                    break
        except queue.Empty:
            raise TimeoutError(f"no reply and idle within {CELL_TIMEOUT} s") from None
        return CellOutput.from_messages(reply["content"], messages, str(self.workdir))


class ClusterRunner:
    """A kernel on nbcluster through the gateway; ``kills`` (see :data:`KILL_MODES`) says
    after which cells the executor replica gets ``kill -9``."""

    def __init__(self, cluster: Any, workdir: Path, kills: str) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.kills = kills
        self.gw: Any = None
        self.channels: Any = None
        self.kernel_id = ""
        self.term = 0
        self.kills_done = 0
        self.kill_seconds = 0.0
        self.broken: str | None = None  # set when a replacement failed: no more kills

    async def __aenter__(self) -> ClusterRunner:
        from nbcluster.client import GatewayClient

        self.gw = GatewayClient(self.cluster.url, self.cluster.token)
        await self.gw.__aenter__()
        kernel = await self.gw.start_kernel(env={"KERNEL_WORKING_DIR": str(self.workdir)})
        self.kernel_id = kernel["id"]
        self.channels = self.gw.channels(self.kernel_id)
        await self.channels.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.channels is not None:
            await self.channels.__aexit__(None, None, None)
        if self.gw is not None:
            with contextlib.suppress(Exception):
                await self.gw.shutdown_kernel(self.kernel_id)
            await self.gw.__aexit__(None, None, None)

    async def execute(self, code: str, silent: bool = False) -> CellOutput:
        result = await self.channels.execute(code, timeout=CELL_TIMEOUT, silent=silent)
        self.term += 1
        return CellOutput.from_messages(result.reply, result.outputs, str(self.workdir))

    def _running(self) -> list[dict[str, Any]]:
        return [r for r in self.cluster.replicas(self.kernel_id) if r["state"] == "running"]

    async def kill_executor(self) -> str | None:
        """Wait until the last cell's state is committed, ``kill -9`` the executor, wait for
        the kernel to have 3 running replicas again. Returns a note if something failed."""
        from .cluster import async_wait_for, process_gone

        if self.broken:
            return None
        started = time.monotonic()
        term = self.term

        async def committed() -> bool:
            reply = await self.channels.request("shell", "kernel_info_request", {}, 15)
            return int(reply["content"]["nbcluster"]["last_term"]) >= term

        try:
            await async_wait_for(committed, 30, f"the state of term {term} to be committed")
        except (AssertionError, TimeoutError) as exc:
            self.broken = f"no kill after this cell: {exc}; no more kills in this notebook"
            return self.broken
        summary = self.cluster.kernel_summary(self.kernel_id)
        executors = [r for r in self._running() if r["replica_id"] == summary["executor"]]
        if not executors:
            return f"no kill after this cell: the executor {summary['executor']} is not running"
        executor = executors[0]
        os.kill(executor["pid"], signal.SIGKILL)
        gone = executor["replica_id"]
        try:
            await async_wait_for(lambda: process_gone(executor["pid"]), 10, "the executor to die")

            def replaced() -> bool:
                running = self._running()
                return len(running) == 3 and gone not in {r["replica_id"] for r in running}

            await async_wait_for(replaced, REPLACEMENT_TIMEOUT, "a replacement replica to join")
        except AssertionError as exc:
            self.broken = f"after the kill of {gone}: {exc}; no more kills in this notebook"
            return self.broken
        finally:
            self.kills_done += 1
            self.kill_seconds += time.monotonic() - started
        return None


async def run_notebook(
    notebook: Notebook,
    runner: LocalRunner | ClusterRunner,
    side: str,
    after_cell: Callable[[int, bool], Any] | None = None,
    before_probe: str | None = None,
) -> NotebookRun:
    """Run the notebook's cells, then the probe. ``after_cell(position, is_last)`` may return
    an awaitable that yields a note for the cell (the nbcluster side kills there)."""
    run = NotebookRun(side, str(runner.workdir))
    started = time.monotonic()
    cells = notebook.runnable()
    for position, cell in enumerate(cells):
        try:
            out = await runner.execute(cell.source)
        except TimeoutError as exc:
            run.aborted = f"cell {cell.index} timed out after {CELL_TIMEOUT} s ({exc!r})"
            break
        if after_cell is not None:
            note = await after_cell(position, position == len(cells) - 1)
            if note:
                out.notes.append(note)
        run.cells.append((cell, out))
    if before_probe:  # the harness's self-test breaks the state on purpose
        await runner.execute(before_probe, silent=True)
    probe: CellOutput | None = None
    try:
        probe = await runner.execute(probe_code(str(runner.workdir)), silent=True)
        run.probe = parse_probe(probe.stdout)
    except (ValueError, TimeoutError) as exc:
        details = ""
        if probe is not None:
            error = probe.error or ["", "", ""]
            details = f"{error[0]}: {error[1]} {error[2][-800:]} {probe.stderr[-800:]}"
        run.probe_error = f"{exc!r} {details}"
    run.seconds = time.monotonic() - started
    return run
