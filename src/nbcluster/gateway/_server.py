"""Running the gateway: uvicorn (with uvloop where installed) on the configured address."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from ._asgi import create_app
from ._config import GatewayConfig

__all__ = ["serve"]

log = logging.getLogger(__name__)


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


async def serve(config: GatewayConfig) -> None:
    """Serve until cancelled or until SIGINT/SIGTERM (uvicorn installs the handlers)."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.ip,
            port=config.port,
            log_level="warning",
            access_log=False,
            ws_max_size=64 * 2**20,
            ws_ping_interval=30,
            ws_ping_timeout=30,
            lifespan="on",
            loop=_loop_name(),
        )
    )
    await server.serve()
    if not server.started:
        raise OSError(f"the gateway could not listen on {config.ip}:{config.port}")


def run(config: GatewayConfig) -> None:
    """Blocking entry point used by the CLI."""
    loop_name = _loop_name()
    if loop_name == "uvloop":
        import uvloop

        uvloop.run(serve(config))
    else:
        asyncio.run(serve(config))
