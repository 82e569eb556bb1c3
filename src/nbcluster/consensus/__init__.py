"""Consensus for kernel replicas: the replicated log interface and its implementations."""

from ._interface import LogError, LogStateMachine, ReplicatedLog

__all__ = ["LogError", "LogStateMachine", "ReplicatedLog"]
