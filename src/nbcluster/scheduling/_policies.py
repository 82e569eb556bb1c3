"""Scheduling policies: how many replicas a kernel gets and when its GPUs are bound.

:class:`Scheduler` looks a kernel's policy up by the name carried in ``KernelRequested``
and asks it these questions at placement and at each ``ExecutionRequested``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BATCH", "NOTEBOOKOS", "POLICIES", "RESERVATION", "Policy", "policy_named"]


@dataclass(frozen=True, slots=True)
class Policy:
    """One policy's answers.

    ``commit_at_placement``: GPUs are committed when the kernel is placed and held for its
    life (else they are committed per cell). ``migrates``: a cell whose replicas' hosts are
    all busy may move a replica to another host (else it waits for its own host).
    """

    name: str
    replicas: int
    commit_at_placement: bool
    migrates: bool


#: NotebookOS: 3 replicas, GPUs bound only while a cell executes, migration on contention.
NOTEBOOKOS = Policy("notebookos", replicas=3, commit_at_placement=False, migrates=True)
#: Jupyter/Colab baseline: 1 replica holding its GPUs for its whole life.
RESERVATION = Policy("reservation", replicas=1, commit_at_placement=True, migrates=False)
#: Slurm-like baseline: 1 replica, GPUs bound per cell, waits for its host.
BATCH = Policy("batch", replicas=1, commit_at_placement=False, migrates=False)

POLICIES = {p.name: p for p in (NOTEBOOKOS, RESERVATION, BATCH)}


def policy_named(name: str) -> Policy:
    """The policy called ``name``; ``ValueError`` listing the known ones otherwise."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown scheduling policy {name!r}; known: {', '.join(sorted(POLICIES))}"
        ) from None
