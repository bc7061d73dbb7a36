"""The send and report stages, and the process they run in.

`run_senders` runs the dispatcher (send) and the mailer (report) over a store
until told to stop. By default `mailbridge serve` runs them in a child process
of their own (`dispatch.separate_process`): the SMTP intake then has its
process, its core and its GIL to itself, so a burst is answered at intake speed
while the SMS and reports of earlier mail go out beside it. The two processes
share nothing but the SQLite store (WAL: readers never block the writer) and a
pipe on which the intake says "new work" (one byte, never blocking).

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
import fcntl
import logging
import os
import pickle
import signal
import sys
import time
from pathlib import Path

import anyio
import httpx

from mailbridge.clock import Clock, SystemClock
from mailbridge.config import Config
from mailbridge.dispatch import Dispatcher
from mailbridge.mailer import Mailer, make_sink
from mailbridge.providers import build_provider
from mailbridge.report import ReportRenderer
from mailbridge.store import Store, StoreUnavailable, open_store

log = logging.getLogger(__name__)
STOP_GRACE_S = 30.0  # in-flight provider calls get this long to finish on SIGTERM
LOCK_WAIT_S = 30.0  # how long a starting daemon waits for a previous one's worker to die
PR_SET_PDEATHSIG = 1


async def run_senders(
    config: Config,
    store: Store,
    clock: Clock,
    work: asyncio.Event,
    reports: asyncio.Event,
    stopping: asyncio.Event,
) -> None:
    """Send and report until `stopping` is set; then finish or park in-flight work.

    `work` says new requests may be due, `reports` new reports.
    """
    http = httpx.AsyncClient(
        limits=httpx.Limits(
            max_connections=config.dispatch.http_max_connections,
            max_keepalive_connections=config.dispatch.http_max_keepalive,
        ),
        headers={"User-Agent": "mailbridge"},
    )
    # httpx's first request imports anyio's asyncio backend (a third of a second
    # of CPU): pay it now rather than while the first SMS waits.
    anyio.Event()
    providers = {name: build_provider(name, pc, http) for name, pc in config.providers.items()}
    sink = make_sink(config.reports, store.instance_id)
    mailer = Mailer(store, sink, ReportRenderer(), config.reports, clock)
    dispatcher = Dispatcher(
        store,
        providers,
        config.providers,
        {a.keyid: a for a in config.accounts},
        config.dispatch,
        clock,
        on_done=reports.set,
    )
    try:
        await asyncio.gather(
            dispatcher.run(work, stopping, STOP_GRACE_S),
            mailer.run(reports, stopping),
        )
    finally:
        for provider in providers.values():
            await provider.aclose()
        await sink.aclose()
        await http.aclose()


# -- the store lock ------------------------------------------------------------


def lock_path(config: Config) -> Path | None:
    """The file whose lock says "a mailbridge works on this store"."""
    db = config.store.sqlite
    return None if db is None else db.with_name(db.name + ".lock")


async def acquire_store_lock(config: Config) -> int | None:
    """Lock the store for this daemon; wait while a previous run's worker dies.

    Returns the locked file descriptor (closing it releases the lock).
    """
    path = lock_path(config)
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise StoreUnavailable(
                    f"{path} is locked: another mailbridge (or its worker) uses this store"
                ) from None
            await asyncio.sleep(0.05)


# -- the worker process: parent side -------------------------------------------


class WorkerProcess:
    """The child process running `run_senders`, as its parent sees it."""

    def __init__(self, config: Config, lock_fd: int | None) -> None:
        self.config = config
        self.lock_fd = lock_fd
        self.proc: asyncio.subprocess.Process | None = None
        self._wake_w: int | None = None

    async def start(self) -> None:
        """Start the child and hand it the configuration."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        fds = [wake_r] if self.lock_fd is None else [wake_r, self.lock_fd]
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_PID")}
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # not the working directory first on sys.path: this package, as installed
                "-m",
                "mailbridge.worker",
                str(os.getpid()),
                str(wake_r),
                stdin=asyncio.subprocess.PIPE,
                pass_fds=fds,
                env=env,
            )
        finally:
            os.close(wake_r)
        self._wake_w = wake_w
        assert self.proc.stdin is not None
        self.proc.stdin.write(pickle.dumps(self.config))
        await self.proc.stdin.drain()
        self.proc.stdin.close()
        log.info("worker process %d started (send and report stages)", self.proc.pid)

    def wake(self) -> None:
        """New work: one byte on the pipe. A full pipe already says so."""
        if self._wake_w is not None:
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(self._wake_w, b"w")

    async def wait(self) -> int:
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
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), timeout)
        except TimeoutError:
            log.error("worker process %d did not stop in %.0f s: killed", self.proc.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


# -- the worker process: child side --------------------------------------------


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        # Still safe: the worker stops when the wake pipe closes, and the
        # store lock keeps a new daemon waiting until it has.
        print(f"worker: PR_SET_PDEATHSIG refused: {os.strerror(ctypes.get_errno())}",
              file=sys.stderr)  # fmt: skip
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


async def _child(config: Config, wake_fd: int) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    work, reports = asyncio.Event(), asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    def on_wake() -> None:
        try:
            data = os.read(wake_fd, 65536)
        except BlockingIOError:
            return
        if not data:  # the parent is gone (PR_SET_PDEATHSIG kills us too)
            loop.remove_reader(wake_fd)
            stopping.set()
            return
        work.set()
        reports.set()

    os.set_blocking(wake_fd, False)
    loop.add_reader(wake_fd, on_wake)
    store = open_store(config.store)
    await store.open()
    try:
        await run_senders(config, store, SystemClock(), work, reports, stopping)
    finally:
        await store.close()


def main(argv: list[str]) -> int:
    """Entry of the child: `python -m mailbridge.worker <parent pid> <wake fd>`,
    the pickled Config on stdin (from the parent, never from elsewhere)."""
    parent, wake_fd = int(argv[0]), int(argv[1])
    _die_with_parent(parent)
    config: Config = pickle.loads(sys.stdin.buffer.read())
    from mailbridge.cli import setup_logging, tune_gc

    setup_logging(config.log_level)
    tune_gc()
    if config.dispatch.process_nice:
        try:  # senders waiting on the SMTP dialogue come first when the CPU is short
            os.nice(config.dispatch.process_nice)
        except OSError as err:
            log.warning("worker: cannot lower its CPU priority (nice): %s", err)
    try:
        asyncio.run(_child(config, wake_fd))
    except StoreUnavailable as err:
        log.error("worker: store unavailable: %s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
