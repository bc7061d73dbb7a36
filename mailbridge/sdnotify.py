"""systemd's notify protocol (Type=notify): READY=1, STATUS=, STOPPING=1, WATCHDOG=1.

Ten lines instead of a dependency: one datagram to $NOTIFY_SOCKET (a path, or
an abstract socket when it starts with '@'). Without the variable it does
nothing, so the daemon runs the same outside systemd.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send one notification; True if a notify socket was there to receive it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Half of WatchdogSec when systemd asked for pings, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit():
        return None
    return int(usec) / 2_000_000
