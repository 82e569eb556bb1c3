"""IPython's history on a replica that did not run the cells: ``In``, ``Out``, ``_``, ``__``,
``___``, ``_N``, ``_iN``, ``_i``, ``_ii``, ``_iii``, and the cells' sources in ``linecache``.

Used by :class:`~._sync.StateSynchronizer`: outputs travel as ``Out[N]`` slots (so that
``Out[3] is x`` holds on every replica), inputs as ``[N, raw source]`` pairs. Without a shell
(unit tests) only the namespace's ``Out`` dict and ``In`` list are kept, when present.
"""

from __future__ import annotations

import linecache
from typing import Any

__all__ = ["History"]


class History:
    def __init__(self, namespace: dict[str, Any], shell: Any = None) -> None:
        self.namespace = namespace
        self.shell = shell

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
        self._recent()

    def remove_output(self, number: int) -> bool:
        out = self._outputs()
        if out is None or number not in out:
            return False
        del out[number]
        self.namespace.pop(f"_{number}", None)
        self._recent()
        return True

    def _recent(self) -> None:
        """``_``, ``__``, ``___``: the last three outputs, as IPython's display hook keeps them
        (in the namespace and in the hook, which shifts them at the next output)."""
        out = self._outputs() or {}
        latest = [out[n] for n in sorted((n for n in out if isinstance(n, int)), reverse=True)[:3]]
        latest += [""] * (3 - len(latest))
        names = ("_", "__", "___")
        hook = getattr(self.shell, "displayhook", None)
        for name, value in zip(names, latest, strict=True):
            self.namespace[name] = value
            if hook is not None:
                setattr(hook, name, value)

    # -- inputs -----------------------------------------------------------------------------

    @staticmethod
    def inputs(count: int, source: str, raw: str | None) -> list[list[Any]]:
        """The executor's input record for its cell."""
        text = raw if raw is not None else source
        if count < 1 or not text:
            return []
        return [[count, text]]

    def apply_inputs(self, inputs: list[list[Any]]) -> None:
        """Put other replicas' inputs where IPython keeps them, so that ``In[N]``, ``_iN`` and
        the next cell's ``_i`` are those of a kernel that ran every cell."""
        if not inputs:
            return
        manager = getattr(self.shell, "history_manager", None)
        parsed = self.namespace.get("In")
        lists = [parsed] if isinstance(parsed, list) else []
        raw_list = getattr(manager, "input_hist_raw", None)
        if isinstance(raw_list, list) and raw_list is not parsed:
            lists.append(raw_list)
        for number, text in sorted(inputs):
            text = text.rstrip("\n")
            for history in lists:
                if len(history) <= number:
                    history.extend([""] * (number + 1 - len(history)))
                history[number] = text
            self.namespace[f"_i{number}"] = text
        last = max(n for n, _ in inputs)
        source = lists[0] if lists else None

        def at(n: int) -> str:
            return source[n] if source is not None and 0 < n < len(source) else ""

        # IPython shifts _i00 -> _i -> _ii -> _iii when it stores the next cell's input.
        values = {"_i00": at(last), "_i": at(last - 1), "_ii": at(last - 2), "_iii": at(last - 3)}
        for name, value in values.items():
            if name != "_i00":
                self.namespace[name] = value
            if manager is not None:
                setattr(manager, name, value)

    @staticmethod
    def register_source(filename: str, source: str) -> None:
        """Put a cell's source in linecache, as IPython does for the cells it compiles, so that
        tracebacks and ``inspect.getsource`` work for code defined on another replica."""
        if not filename or not source:
            return
        lines = [line + "\n" for line in source.splitlines()]
        linecache.cache[filename] = (len(source), None, lines, filename)
