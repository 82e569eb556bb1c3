"""The kernel replica: an IPython kernel that knows which replica of which kernel it is.

This issue runs one replica per kernel; the Raft node and executor election attach here.
"""

from __future__ import annotations

import os
from typing import Any

from ipykernel.ipkernel import IPythonKernel
from traitlets import Unicode

from .._version import __version__

__all__ = ["ReplicaKernel"]


class ReplicaKernel(IPythonKernel):
    """One replica of a distributed kernel. Started by a host daemon via :mod:`nbcluster.kernel`."""

    implementation = "nbcluster"
    implementation_version = __version__
    banner = f"nbcluster replica kernel {__version__} (IPython)"

    kernel_id = Unicode(
        os.environ.get("NBCLUSTER_KERNEL_ID", ""), help="The kernel this replica belongs to."
    ).tag(config=True)
    replica_id = Unicode(os.environ.get("NBCLUSTER_REPLICA_ID", ""), help="This replica's id.").tag(
        config=True
    )

    @property
    def kernel_info(self) -> dict[str, Any]:
        info: dict[str, Any] = dict(super().kernel_info)
        info["nbcluster"] = {"kernel_id": self.kernel_id, "replica_id": self.replica_id}
        return info
