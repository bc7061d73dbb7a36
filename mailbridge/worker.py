"""The worker process's plumbing: spawn, wake pipe, death signal, store lock.

By default `mailbridge serve` runs the send and report stages in a child
process of their own (`dispatch.separate_process`): the SMTP intake then has
its process, its core and its GIL to itself, so a burst is answered at intake
speed while the SMS and reports of earlier mail go out beside it. The two
processes share nothing but the SQLite store (WAL: readers never block the
writer) and a pipe on which the intake says "new work" (one byte, never
blocking). What runs in the child is built by the composition root
(`app.run_worker`); this module only starts it, talks to it and keeps it safe.

Safety across crashes: the parent holds an exclusive lock on `<store>.lock`
that the child inherits, so the lock is free only once both are gone; a new
daemon waits for it before it releases the leases of the previous run. The
child asks the kernel to kill it when its parent dies (PR_SET_PDEATHSIG), so a
`kill -9` of the daemon takes the worker along at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pickle
import secrets
import signal
import socket
import sys
from collections.abc import Callable

from mailbridge.config import Config

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
# The child's command line: `python -m mailbridge _worker <parent pid> <wake fd>`,
# a subcommand the CLI hides from --help (bench/profile.py looks for it too).
WORKER_COMMAND = "_worker"
# Bytes on the wake pipe: new work of any kind; only new delivery or reply events
# (a burst of callbacks then wakes the feedback stage, not the claims of the
# dispatcher and the mailer, each a write transaction); a new request to send
# (the dispatcher and the mailer, for its Ack: the feedback stage has nothing
# new, and its three store calls per email were a tenth of a lone email's).
WAKE_ALL = b"w"
WAKE_EVENTS = b"e"
WAKE_REQUESTS = b"r"


def woken_by(what: bytes) -> tuple[bool, bool]:
    """Who looks after these bytes of the pipe: (the feedback stage, the
    dispatcher and the mailer)."""
    return WAKE_ALL in what or WAKE_EVENTS in what, WAKE_ALL in what or WAKE_REQUESTS in what


# -- the worker process: parent side -------------------------------------------


class WorkerProcess:
    """The child process running the send and report stages, as its parent sees it."""

    def __init__(self, config: Config, lock_fd: int | None) -> None:
        self.config = config
        self.lock_fd = lock_fd
        self.proc: asyncio.subprocess.Process | None = None
        self._wake_w: int | None = None
        # The name its leases carry (a new one at each start): when it dies, the
        # daemon takes back exactly its leases, whatever other instances hold.
        self.owner = ""

    async def start(self) -> None:
        """Start the child and hand it the configuration."""
        self.owner = f"{socket.gethostname()}:{os.getpid()}:worker-{secrets.token_hex(3)}"
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        fds = [wake_r] if self.lock_fd is None else [wake_r, self.lock_fd]
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_PID")}
        # The child starts with SIGTERM blocked (a signal mask survives exec) and
        # unblocks it once its handler is in (stopsignal.install): a stop while
        # its interpreter starts, before any Python runs, is a clean stop too.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # not the working directory first on sys.path: this package, as installed
                "-m",
                "mailbridge",
                WORKER_COMMAND,
                str(os.getpid()),
                str(wake_r),
                stdin=asyncio.subprocess.PIPE,
                pass_fds=fds,
                env=env,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(wake_r)
        self._wake_w = wake_w
        assert self.proc.stdin is not None
        self.proc.stdin.write(pickle.dumps((self.config, self.owner)))
        await self.proc.stdin.drain()
        self.proc.stdin.close()
        log.info("worker process %d started (send and report stages)", self.proc.pid)

    @property
    def alive(self) -> bool:
        """Whether the child runs (it may still hang: the heartbeat tells that)."""
        return self.proc is not None and self.proc.returncode is None

    def wake(self, what: bytes = WAKE_ALL) -> None:
        """New work: one byte on the pipe (WAKE_EVENTS: only delivery and reply
        events, for the feedback stage; WAKE_REQUESTS: a new request, for the
        dispatcher and the mailer). A full pipe already says so."""
        if self._wake_w is not None:
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(self._wake_w, what)

    async def wait(self) -> int:
        """Wait for the child to exit; return its status."""
        assert self.proc is not None
        code = await self.proc.wait()
        if self._wake_w is not None:
            os.close(self._wake_w)
            self._wake_w = None
        return code

    async def stop(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL after `timeout` (its in-flight SMS stay in doubt)."""
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            code = await asyncio.wait_for(asyncio.shield(self.proc.wait()), timeout)
        except TimeoutError:
            log.error("worker process %d did not stop in %.0f s: killed", self.proc.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
            return
        if code != 0:
            log.warning("worker process %d stopped with status %d", self.proc.pid, code)


# -- the worker process: child side --------------------------------------------


def die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGKILL when the parent dies; exit if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        # Still safe: the worker stops when the wake pipe closes, and the
        # store lock keeps a new daemon waiting until it has.
        print(f"worker: PR_SET_PDEATHSIG refused: {os.strerror(ctypes.get_errno())}",
              file=sys.stderr)  # fmt: skip
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def read_config() -> tuple[Config, str]:
    """The Config and lease owner name the parent wrote on our stdin (pickled:
    from the parent, never elsewhere)."""
    config, owner = pickle.loads(sys.stdin.buffer.read())
    assert isinstance(config, Config) and isinstance(owner, str)
    return config, owner


def lower_priority(nice: int) -> None:
    """Senders waiting on the SMTP dialogue come first when the CPU is short."""
    if nice:
        try:
            os.nice(nice)
        except OSError as err:
            log.warning("worker: cannot lower its CPU priority (nice): %s", err)


def watch_wake_pipe(
    wake_fd: int, on_wake: Callable[[bytes], None], on_gone: Callable[[], None]
) -> None:
    """Call `on_wake` with the bytes on the parent's pipe, `on_gone` once it closes.

    Runs in the current event loop; the pipe closing means the parent is gone
    (PR_SET_PDEATHSIG kills us too, but it may have been refused).
    """
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data = os.read(wake_fd, 65536)
        except BlockingIOError:
            return
        if not data:
            loop.remove_reader(wake_fd)
            on_gone()
            return
        on_wake(data)

    os.set_blocking(wake_fd, False)
    loop.add_reader(wake_fd, readable)
