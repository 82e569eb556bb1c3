"""Scheduling decisions as pure code: events and snapshots in, decisions out, no I/O."""

from ._placement import HostLoad, PlacementError, choose_hosts

__all__ = ["HostLoad", "PlacementError", "choose_hosts"]
