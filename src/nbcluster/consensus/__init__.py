"""Consensus for kernel replicas: the replicated log interface and its implementations."""

from ._interface import LogError, LogStateMachine, ReplicatedLog
from ._memory import InMemoryLog, InMemoryLogGroup
from ._pysyncobj import PySyncObjLog

__all__ = [
    "InMemoryLog",
    "InMemoryLogGroup",
    "LogError",
    "LogStateMachine",
    "PySyncObjLog",
    "ReplicatedLog",
]
