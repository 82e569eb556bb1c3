"""What a host daemon says while it cannot reach its gateway.

The daemon reconnects with backoff for as long as it runs (``_daemon.HostDaemon.run``). It
used to log a warning for every failed attempt: a gateway restarted, or stopped by
``nbcluster up`` a moment before its hosts, printed a screenful of them. Now an outage is
told once when it begins (as information when the gateway said it was going away: close
code 1001 or 1012), then only every :data:`REMIND_EVERY` seconds while it lasts; the other
attempts go to the debug log. Pure: the daemon passes the clock and logs what it returns.
"""

from __future__ import annotations

import logging

from websockets.exceptions import ConnectionClosed

__all__ = ["REMIND_EVERY", "ConnectionOutage"]

#: Seconds between the warnings of one outage.
REMIND_EVERY = 60.0
#: Close codes of a gateway that stops or restarts on purpose (RFC 6455 "going away",
#: "service restart").
_GOING_AWAY = frozenset({1001, 1012})


class ConnectionOutage:
    """The daemon's connection to the gateway: up, or down since when."""

    def __init__(self) -> None:
        self._down_since: float | None = None
        self._reminded_at = 0.0

    def connected(self) -> None:
        """Registered with the gateway: the outage, if any, is over."""
        self._down_since = None

    def failed(self, exc: BaseException, now: float, hint: str = "") -> tuple[int, str]:
        """A connection attempt failed, or the connection was lost, at ``now``: the log level
        and line for it."""
        if self._down_since is None:
            self._down_since = self._reminded_at = now
            if _going_away(exc):
                return logging.INFO, f"the gateway is stopping or restarting ({exc}); reconnecting"
            return logging.WARNING, f"gateway connection lost or refused ({exc}){hint}; retrying"
        if now - self._reminded_at >= REMIND_EVERY:
            self._reminded_at = now
            return (
                logging.WARNING,
                f"still no gateway connection after {now - self._down_since:.0f} s "
                f"({exc}){hint}; retrying",
            )
        return logging.DEBUG, f"gateway connection attempt failed ({exc}){hint}; retrying"


def _going_away(exc: BaseException) -> bool:
    if not isinstance(exc, ConnectionClosed):
        return False
    frame = exc.rcvd
    return frame is not None and frame.code in _GOING_AWAY
