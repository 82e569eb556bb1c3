"""nbcluster: a Jupyter-compatible notebook platform for shared GPU clusters.

The package is split by process and concern; each sub-package declares its public API:

- ``nbcluster.protocol``: the Jupyter wire protocol (ZMQ frames, HMAC signing, websocket framings).
- ``nbcluster.hostproto``: the control protocol between the gateway and host daemons.
- ``nbcluster.gateway``: the global scheduler, serving the Jupyter Kernel Gateway API.
- ``nbcluster.host``: the host daemon (local scheduler) that runs kernel replicas.
- ``nbcluster.kernel``: the kernel replica, an ipykernel subclass.
- ``nbcluster.scheduling``: pure placement decisions.
- ``nbcluster.client``: an async client for the gateway's REST and websocket API.
- ``nbcluster.cli``: the ``nbcluster`` command.
"""

from ._version import __version__

__all__ = ["__version__"]
