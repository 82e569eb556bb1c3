"""``host._outage.ConnectionOutage``: one line when an outage begins, reminders every minute,
the rest at debug; a gateway that said it was going away is information, not a warning."""

from __future__ import annotations

import logging

from websockets.exceptions import ConnectionClosedError
from websockets.frames import Close

from nbcluster.host._outage import REMIND_EVERY, ConnectionOutage


def test_an_outage_is_told_once_then_reminded() -> None:
    outage = ConnectionOutage()
    refused = ConnectionRefusedError(111, "Connect call failed")
    level, line = outage.failed(refused, 100.0)
    assert level == logging.WARNING and "gateway connection lost or refused" in line
    assert outage.failed(refused, 101.0)[0] == logging.DEBUG
    assert outage.failed(refused, 100.0 + REMIND_EVERY - 1)[0] == logging.DEBUG
    level, line = outage.failed(refused, 100.0 + REMIND_EVERY)
    assert level == logging.WARNING and f"after {REMIND_EVERY:.0f} s" in line
    assert outage.failed(refused, 101.0 + REMIND_EVERY)[0] == logging.DEBUG


def test_a_new_outage_after_reconnecting_is_told_again() -> None:
    outage = ConnectionOutage()
    refused = ConnectionRefusedError(111, "refused")
    outage.failed(refused, 1.0)
    outage.connected()
    assert outage.failed(refused, 2.0)[0] == logging.WARNING


def test_a_gateway_going_away_is_information() -> None:
    outage = ConnectionOutage()
    restart = ConnectionClosedError(Close(1012, "service restart"), None)
    level, line = outage.failed(restart, 5.0)
    assert level == logging.INFO and "stopping or restarting" in line
    # An abnormal close is still a warning.
    other = ConnectionOutage()
    assert other.failed(ConnectionClosedError(Close(1011, "error"), None), 5.0)[0] == (
        logging.WARNING
    )


def test_the_hint_is_kept() -> None:
    outage = ConnectionOutage()
    _, line = outage.failed(OSError("bad"), 0.0, " (use https)")
    assert line.endswith("(bad) (use https); retrying")
