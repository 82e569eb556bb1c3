"""What the tests of users and their tokens share (tests/integration/test_users.py, with a
users file, and test_jupyterhub.py, with the Hub's tokens)::

    from ..users import refused_channels, user_client

    alice = user_client("alice")  # a fixture: the module's cluster, as tokens["alice"]
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest_asyncio
import websockets

from nbcluster.client import GatewayClient

from .cluster import Cluster

__all__ = ["refused_channels", "user_client"]


def user_client(name: str) -> Callable[..., Any]:
    """A fixture called ``name``: a :class:`GatewayClient` of the module's ``cluster`` with
    the token its ``tokens`` fixture has for ``name``."""

    @pytest_asyncio.fixture(name=name)
    async def client(cluster: Cluster, tokens: dict[str, str]) -> AsyncIterator[GatewayClient]:
        """A gateway client of the module's cluster with one user's token (``user_client``)."""
        async with GatewayClient(cluster.url, tokens[name]) as gw:
            yield gw

    return client


async def refused_channels(url: str, kernel_id: str, token: str) -> bool:
    """Whether the channels websocket of ``kernel_id`` is refused to ``token``."""
    ws_url = url.replace("http://", "ws://") + f"/api/kernels/{kernel_id}/channels?token={token}"
    try:
        async with websockets.connect(ws_url, open_timeout=10) as ws:
            # Accepted and then closed with a reason counts as refused too.
            await ws.recv()
    except websockets.InvalidStatus as exc:
        return exc.response.status_code == 403
    except websockets.ConnectionClosed as exc:
        return exc.rcvd is not None and exc.rcvd.code == 1008
    return False
