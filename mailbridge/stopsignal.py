"""SIGTERM from the first instant of the process: recorded, then honoured.

Python's default for SIGTERM is to die at once (exit -15): a stop that comes
while the daemon still imports, reads its config, waits for the store lock or
opens the store would leave it half started. The entry point (`__main__`)
calls `install()` before it imports anything heavy; the daemon's start-up
looks at `requested()` between its steps and stops cleanly (exit 0), and the
running event loop takes the signal over (`loop.add_signal_handler`). Every
other command gives the default back with `release()` (a SIGTERM that came
meanwhile is then delivered, as if it had never been held).

The worker process is spawned with SIGTERM blocked, and `install()` unblocks
it: for the worker, even a SIGTERM that comes while its interpreter starts is
recorded. The daemon itself cannot have that (systemd starts it with nothing
blocked): a SIGTERM in its interpreter's first milliseconds, before any Python
runs, still ends it, which systemd counts as a clean stop all the same.

Imports nothing but the standard library: it runs before the rest is loaded.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

_installed = False
_requested = False


def _record(signum: int, frame: FrameType | None) -> None:
    global _requested
    _requested = True


def install() -> None:
    """Record a SIGTERM instead of dying of it (idempotent)."""
    global _installed
    _installed = True
    signal.signal(signal.SIGTERM, _record)
    # The worker is started with SIGTERM blocked (worker.py): one that came
    # meanwhile is delivered now, to the handler.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def restore() -> None:
    """Record again after an event loop that had taken SIGTERM over closed (its
    close gives the default back): the process ends without dying of a signal.
    Nothing if `install()` was never called (the daemon run in-process by tests)."""
    if _installed:
        signal.signal(signal.SIGTERM, _record)


def requested() -> bool:
    """Whether a SIGTERM came since `install()`."""
    return _requested


def release() -> None:
    """Give SIGTERM its default back; one already recorded is delivered now."""
    global _installed
    if not _installed:
        return
    _installed = False
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _requested:
        os.kill(os.getpid(), signal.SIGTERM)
