"""IPython's history on a replica that did not run the cells: ``In``, ``Out``, ``_N``, ``_iN``,
``_i``, ``_ii``, ``_iii``, the display hook's last outputs, the cells' sources in
``linecache``; and what the notebook registered with the shell: its own magics
(``@register_line_magic``) and event callbacks (``get_ipython().events.register``).

Used by :class:`~._sync.StateSynchronizer`: outputs travel as ``Out[N]`` slots (so that
``Out[3] is x`` holds on every replica), inputs as ``[N, raw source]`` pairs. Without a shell
(unit tests) only the namespace's ``Out`` dict and ``In`` list are kept, when present.
"""

from __future__ import annotations

import linecache
import re
from typing import Any

__all__ = ["SHELL_SLOT", "History"]

#: ``%line:name``, ``%cell:name``: a magic the notebook defined; ``!event:name``: the
#: notebook's callbacks for a shell event.
SHELL_SLOT = re.compile(r"%(line|cell):([A-Za-z_]\w*)|!event:([A-Za-z_]\w*)")


class History:
    def __init__(self, namespace: dict[str, Any], shell: Any = None) -> None:
        self.namespace = namespace
        self.shell = shell
        self._event_callbacks: dict[str, tuple[Any, ...]] = {}

    # -- outputs ----------------------------------------------------------------------------

    def _outputs(self) -> dict[int, Any] | None:
        out = self.namespace.get("Out")
        return out if isinstance(out, dict) else None

    def output_slots(self) -> dict[str, object]:
        """``Out[N]`` -> value, for the capture."""
        out = self._outputs()
        if not out:
            return {}
        return {f"Out[{n}]": v for n, v in list(out.items()) if isinstance(n, int)}

    def set_output(self, number: int, value: object) -> None:
        out = self._outputs()
        if out is None:
            return
        out[number] = value
        self.namespace[f"_{number}"] = value
        self._hook_recent()

    def remove_output(self, number: int) -> bool:
        out = self._outputs()
        if out is None or number not in out:
            return False
        del out[number]
        self.namespace.pop(f"_{number}", None)
        self._hook_recent()
        return True

    def note_underscore(self, name: str, value: object, hidden: object) -> None:
        """``_``, ``__`` or ``___`` arrived. IPython updates them at the next output only if
        it set them itself: it compares them with what it recorded in ``user_ns_hidden``. An
        output it is (``_ is Out[3]``) is recorded so; one the user bound is left unrecorded,
        as on the executor."""
        out = self._outputs() or {}
        if isinstance(hidden, dict) and name in hidden and any(v is value for v in out.values()):
            hidden[name] = value

    def _hook_recent(self) -> None:
        """IPython's display hook keeps the last three outputs (``hook._``, ``__``, ``___``)
        and shifts them at the next output, unless the user rebound ``_`` and friends (then
        the namespace's differ from the hook's). The namespace's ``_``, ``__``, ``___`` are
        slots of their own (the executor's values); the hook's follow the outputs."""
        hook = getattr(self.shell, "displayhook", None)
        if hook is None:
            return
        out = self._outputs() or {}
        latest = [out[n] for n in sorted((n for n in out if isinstance(n, int)), reverse=True)[:3]]
        latest += [""] * (3 - len(latest))
        for name, value in zip(("_", "__", "___"), latest, strict=True):
            setattr(hook, name, value)

    # -- inputs -----------------------------------------------------------------------------

    @staticmethod
    def inputs(count: int, source: str, raw: str | None) -> list[list[Any]]:
        """The executor's input record for its cell: [count, raw, transformed] (IPython's
        ``_iN`` holds the raw input, ``In[N]`` the transformed one)."""
        text = raw if raw is not None else source
        if count < 1 or not text:
            return []
        return [[count, text, source or text]]

    def apply_inputs(self, inputs: list[list[Any]]) -> None:
        """Put other replicas' inputs where IPython keeps them, so that ``In[N]``, ``_iN`` and
        the next cell's ``_i`` are those of a kernel that ran every cell."""
        if not inputs:
            return
        manager = getattr(self.shell, "history_manager", None)
        parsed_list = self.namespace.get("In")
        raw_list = getattr(manager, "input_hist_raw", None)
        if raw_list is parsed_list:
            raw_list = None
        raws: dict[int, str] = {}
        for number, raw, *rest in sorted(inputs):
            raw = raw.rstrip("\n")
            parsed = (rest[0] if rest else raw).rstrip("\n")
            for history, text in ((parsed_list, parsed), (raw_list, raw)):
                if not isinstance(history, list):
                    continue
                if len(history) <= number:
                    history.extend([""] * (number + 1 - len(history)))
                history[number] = text
            self.namespace[f"_i{number}"] = raw
            raws[number] = raw
        last = max(raws)

        def at(n: int) -> str:
            if n in raws:
                return raws[n]
            value = self.namespace.get(f"_i{n}")
            return value if isinstance(value, str) else ""

        # IPython shifts _i00 -> _i -> _ii -> _iii when it stores the next cell's input.
        values = {"_i00": at(last), "_i": at(last - 1), "_ii": at(last - 2), "_iii": at(last - 3)}
        for name, value in values.items():
            if name != "_i00":
                self.namespace[name] = value
            if manager is not None:
                setattr(manager, name, value)

    def register_source(self, filename: str, source: str, count: int = 0) -> None:
        """Put a cell's source in linecache, as IPython does for the cells it compiles, so that
        tracebacks and ``inspect.getsource`` work for code defined on another replica; and
        tell IPython's compiler which cell it was, so tracebacks say ``Cell In[N]``."""
        if not filename or not source:
            return
        lines = [line + "\n" for line in source.splitlines()]
        linecache.cache[filename] = (len(source), None, lines, filename)
        names = getattr(getattr(self.shell, "compile", None), "_filename_map", None)
        if isinstance(names, dict) and count > 0:
            names[filename] = count

    # -- what the notebook registered with the shell ------------------------------------------

    def _mine(self, func: Any) -> bool:
        """Code of the notebook (its functions, bound methods of its objects)."""
        func = getattr(func, "__func__", func)
        return getattr(func, "__globals__", None) is self.namespace

    def shell_slots(self) -> dict[str, object]:
        """The notebook's magics and event callbacks, for the capture."""
        shell = self.shell
        manager = getattr(shell, "magics_manager", None)
        if manager is None:
            return {}
        slots: dict[str, object] = {}
        for kind in ("line", "cell"):
            for name, func in list(manager.magics.get(kind, {}).items()):
                if self._mine(func):
                    slots[f"%{kind}:{name}"] = func
        events = getattr(shell, "events", None)
        for event, callbacks in list(getattr(events, "callbacks", {}).items()):
            mine = tuple(cb for cb in callbacks if self._mine(cb))
            if mine:
                # The same tuple object while the callbacks are the same: unchanged, unshipped.
                last = self._event_callbacks.get(event, ())
                if len(last) == len(mine) and all(a is b for a, b in zip(last, mine, strict=True)):
                    mine = last
                self._event_callbacks[event] = mine
                slots[f"!event:{event}"] = mine
        return slots

    def assign_shell_slot(self, slot: str, value: object) -> None:
        match = SHELL_SLOT.fullmatch(slot)
        shell = self.shell
        if match is None or shell is None:
            return
        kind, name, event = match.groups()
        if event is None:
            shell.register_magic_function(value, kind, name)
            return
        self.remove_shell_slot(slot)
        for callback in value if isinstance(value, tuple) else ():
            shell.events.register(event, callback)

    def remove_shell_slot(self, slot: str) -> bool:
        match = SHELL_SLOT.fullmatch(slot)
        shell = self.shell
        if match is None or shell is None:
            return False
        kind, name, event = match.groups()
        if event is None:
            return shell.magics_manager.magics[kind].pop(name, None) is not None
        callbacks = shell.events.callbacks.get(event, [])
        mine = [cb for cb in callbacks if self._mine(cb)]
        for callback in mine:
            shell.events.unregister(event, callback)
        return bool(mine)
