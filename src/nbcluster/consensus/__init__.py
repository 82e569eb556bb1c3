"""Consensus for kernel replicas: the replicated log interface and its implementations."""

from ._interface import LogError, LogStateMachine, ReplicatedLog
from ._memory import InMemoryLog, InMemoryLogGroup
from ._pysyncobj import PySyncObjLog
from ._randomness import private_random_for_pysyncobj

__all__ = [
    "InMemoryLog",
    "InMemoryLogGroup",
    "LogError",
    "LogStateMachine",
    "PySyncObjLog",
    "ReplicatedLog",
    "private_random_for_pysyncobj",
]
