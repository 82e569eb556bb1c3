"""Running the gateway: uvicorn (with uvloop where installed) on the configured address.

The HTTP protocol is uvicorn's httptools one with two bounds it lacks (``docs/security.md``,
"Limits"): a connection must send a complete request header within ``header_timeout``
seconds of being opened or of its previous response (a slow-header client is closed, not
held open forever), and a request header over ``max_header_bytes`` is answered 431. The
connection cap (``max_connections``: a request past it gets 503) and the keep-alive timeout
are uvicorn's own settings.

With ``certfile``/``keyfile`` uvicorn serves https and wss (TLS 1.2 or later, Python's server
defaults); the header clock starts once the TLS handshake is done (asyncio bounds the
handshake itself at 60 s). Listening beyond loopback without TLS is allowed but logged loudly:
tokens and everything users type would cross the network in clear (``docs/security.md``,
"Encrypted transport").
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .._tls import is_loopback
from ._asgi import create_app
from ._config import GatewayConfig

__all__ = ["clear_text_warnings", "header_limited_protocol", "serve"]

log = logging.getLogger(__name__)


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


class _HeaderLimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose request header is not complete
    within ``header_timeout`` seconds and answering 431 to one over ``max_header_bytes``."""

    header_timeout: ClassVar[float] = 10.0
    max_header_bytes: ClassVar[int] = 64 * 2**10

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None
        #: Bytes received since the header phase began (None: not in it).
        self._header_bytes: int | None = None

    def _await_header(self) -> None:
        self._stop_header_clock()
        self._header_bytes = 0
        self._header_deadline = self.loop.call_later(self.header_timeout, self._header_too_slow)

    def _stop_header_clock(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None
        self._header_bytes = None

    def _header_too_slow(self) -> None:
        self._header_deadline = None
        if self.transport is not None and not self.transport.is_closing():
            log.info(
                "closed a connection from %s: no complete request header within %g s "
                "(header_timeout)",
                self.client,
                self.header_timeout,
            )
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_header()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_clock()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_bytes is not None:
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes and not self.transport.is_closing():
                self._stop_header_clock()
                message = (
                    f"request header over the limit of {self.max_header_bytes} bytes "
                    "(max_header_bytes)"
                ).encode()
                self.transport.write(
                    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                    b"content-type: text/plain; charset=utf-8\r\n"
                    b"content-length: " + str(len(message)).encode() + b"\r\n"
                    b"connection: close\r\n\r\n" + message
                )
                self.transport.close()

    def on_headers_complete(self) -> None:
        self._stop_header_clock()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Idle again, waiting for the next request (not one already read and queued).
        if self.timeout_keep_alive_task is not None and not self.transport.is_closing():
            self._await_header()


def header_limited_protocol(header_timeout: float, max_header_bytes: int) -> type[asyncio.Protocol]:
    """The HTTP protocol class for uvicorn's ``http`` setting, with these bounds."""
    return type(
        "HeaderLimitedProtocol",
        (_HeaderLimitedProtocol,),
        {"header_timeout": header_timeout, "max_header_bytes": max_header_bytes},
    )


def clear_text_warnings(config: GatewayConfig) -> list[str]:
    """What this configuration sends in clear text beyond this machine (empty: nothing)."""
    if is_loopback(config.ip):
        return []
    warnings = []
    if config.certfile is None:
        warnings.append(
            f"the gateway listens on {config.ip}, beyond loopback, WITHOUT TLS: API tokens, "
            "join tokens, kernels' code and outputs cross the network in clear. Pass "
            "--certfile and --keyfile (docs/security.md, 'Encrypted transport')."
        )
    if not config.curve:
        warnings.append(
            "CurveZMQ is off (--no-curve): replicas on other machines send every cell's code "
            "and output to the gateway in clear."
        )
    return warnings


class _GatewayServer(uvicorn.Server):
    """uvicorn's server, telling the gateway that it stops before uvicorn closes the hosts'
    connections (``Gateway.begin_stop``): their replicas going away is then not a loss."""

    def __init__(self, config: uvicorn.Config, gateway: Any) -> None:
        super().__init__(config)
        self._gateway = gateway

    async def shutdown(self, sockets: Any = None) -> None:
        self._gateway.begin_stop()
        await super().shutdown(sockets)


async def serve(config: GatewayConfig) -> None:
    """Serve until cancelled or until SIGINT/SIGTERM (uvicorn installs the handlers)."""
    for warning in clear_text_warnings(config):
        log.warning("!!! %s !!!", warning)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(config)
    server = _GatewayServer(
        uvicorn.Config(
            app,
            host=config.ip,
            port=config.port,
            log_level="warning",
            access_log=False,
            http=header_limited_protocol(config.header_timeout, config.max_header_bytes),
            timeout_keep_alive=config.keep_alive_timeout,
            limit_concurrency=config.max_connections,
            ws_max_size=64 * 2**20,
            ws_ping_interval=30,
            ws_ping_timeout=30,
            lifespan="on",
            loop=_loop_name(),
            ssl_certfile=config.certfile,
            ssl_keyfile=config.keyfile,
        ),
        app.state.gateway,
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
