"""Package installs in a cell, found so that every replica can make the same environment change.

A ``%pip install x`` (or ``!pip install x``, ``%conda install x`` ...) changes the Python
environment of the host that runs it, which is only the executor's; after a failover
``import x`` would fail on the next executor. The kernel repeats those commands on every
replica (and on replicas that join later) with three pieces, each in its own module; this one
only re-exports their public names, so ``from nbcluster.kernel._packages import ...`` works:

* :func:`package_commands` (:mod:`._package_parse`, with the shell tokenizer in
  :mod:`._package_shell`) reads a cell's raw source (IPython syntax included) and returns the
  commands that install or uninstall packages, in the order they run. The executor calls it
  for each cell it ran; the result goes into the cell's record in the replicated log.
* :func:`to_primitive` / :func:`from_primitive` (:mod:`._package_encode`) turn a list of
  commands into msgpack-friendly primitives and back (validated: a record comes from a peer).
* :func:`run_package_command` (:mod:`._package_run`) runs one command on this replica's host,
  the way IPython's ``%pip`` / ``%conda`` magics do (the kernel's own interpreter and prefix),
  without a shell, with a timeout; followers call it when they apply the record, a joining
  replica for every recorded command in log order. It never raises: the result says what
  happened and where.
"""

from __future__ import annotations

from ._package_encode import MAX_ARGS as MAX_ARGS
from ._package_encode import MAX_COMMANDS as MAX_COMMANDS
from ._package_encode import MAX_TEXT as MAX_TEXT
from ._package_encode import PackageCommandError, from_primitive, to_primitive
from ._package_parse import CONDA_ACTIONS as CONDA_ACTIONS
from ._package_parse import PIP_ACTIONS as PIP_ACTIONS
from ._package_parse import PROGRAMS as PROGRAMS
from ._package_parse import PackageCommand, package_commands, redact
from ._package_parse import Tool as Tool
from ._package_run import TAIL_CHARS as TAIL_CHARS
from ._package_run import PackageResult, run_package_command

__all__ = [
    "PackageCommand",
    "PackageCommandError",
    "PackageResult",
    "from_primitive",
    "package_commands",
    "redact",
    "run_package_command",
    "to_primitive",
]
