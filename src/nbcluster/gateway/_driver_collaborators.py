"""What the scheduler driver (``_driver``) needs from the rest of the gateway, as small
protocols: the kernels that run cells (:class:`CellRunner`), who moves a replica
(:class:`ReplicaMover`, the kernel manager), who asks a replica to move its GPU memory to the
host (:class:`Evictor`, ``_evictor``, answering an :class:`EvictionResult`) and who adds or
removes hosts (:class:`HostRequester`, :class:`HostSupply`: the gateway's auto-scaler and host
provider).

The kernel manager hands the implementations to the driver's constructor; the driver calls
them while it carries out the scheduler's actions. Nothing here runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..scheduling import Migrate, ScaleIn, ScaleOut

__all__ = [
    "CellRunner",
    "EvictionResult",
    "Evictor",
    "HostRequester",
    "HostSupply",
    "ReplicaMover",
]


class CellRunner(Protocol):
    """A kernel as the driver sees it (:class:`~._kernel.GatewayKernel`): it runs, announces
    and cancels its cells when told."""

    def dispatch(self, term: int, replica_id: str, devices: tuple[int, ...] | None) -> bool:
        """Run cell ``term`` on the replica with these GPUs; False: it is no longer waiting."""

    def show_waiting(self, term: int, text: str) -> None:
        """Tell the cell's users why it waits."""

    def cell_started_after_wait(self, term: int, text: str) -> None:
        """Tell the cell's users that it got its GPUs."""

    def cancel_waiting(self, term: int, ename: str, reason: str) -> None:
        """Answer a waiting cell with an error."""


class ReplicaMover(Protocol):
    """Carries out a ``Migrate`` (the kernel manager: start the new replica, let it catch up,
    retire the old one). On failure it has told the scheduler the new replica stopped."""

    async def move_replica(self, migrate: Migrate) -> bool:
        """True when the new replica runs and the old one is retired."""
        ...


@dataclass(frozen=True, slots=True)
class EvictionResult:
    """What a replica answered to an eviction (``ok``), or why it did not (``error``)."""

    ok: bool
    freed_bytes: int = 0
    moved_objects: int = 0
    error: str = ""


class Evictor(Protocol):
    """Asks a replica to move what it keeps on some GPUs to host memory (``_evictor``)."""

    async def evict(
        self, kernel_id: str, replica_id: str, devices: tuple[int, ...], reason: str
    ) -> EvictionResult:
        """Never raises for a replica's failure: an error or a timeout is ``ok=False``."""
        ...


class HostRequester(Protocol):
    """Adds and removes hosts (the gateway's auto-scaler and host provider)."""

    def request_hosts(self, action: ScaleOut) -> None:
        """The scheduler found no room: start hosts (in the background)."""

    def release_hosts(self, action: ScaleIn) -> None:
        """Stop these idle hosts (in the background)."""


class HostSupply(HostRequester, Protocol):
    """A :class:`HostRequester` the kernel manager can also wait on (reactive scale-out)."""

    async def wait_for_hosts(self, timeout: float) -> bool:
        """After a scale-out: True once a started host registered, False if none is coming."""
        ...

    def host_registered(self, name: str) -> None:
        """Hear of every host's hello."""

    def hosts_of(self, machines: Sequence[str]) -> frozenset[str]:
        """The host names of these ssh machines (a kernelspec's ``remote_hosts``); raises
        :class:`HostProviderError` when hosts do not come from machines."""
        ...
