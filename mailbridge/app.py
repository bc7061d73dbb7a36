"""The composition root: builds every part from the Config and runs them.

Both processes of the daemon are built here. `Daemon.start()` locks and opens
the store, recovers a previous run's unfinished work, starts the SMTP listener
and the send and report stages, and tells systemd READY; `Daemon.stop()` stops
accepting mail, lets in-flight sends finish (or parks them in the store), and
closes everything. The send side (HTTP client, providers, Dispatcher, Mailer,
report sink and renderer) is built by `build_send_side` alone, whether it runs
in this process (`dispatch.separate_process: false`) or in the worker process,
whose entry `run_worker` is started by worker.py's process plumbing through
the hidden `mailbridge _worker` subcommand. No globals: tests build a Daemon
with a fake clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import httpx

from mailbridge import stopsignal
from mailbridge.clock import Clock, SystemClock, nap
from mailbridge.config import Config, ProviderConfig, SmsmodeProviderConfig, parse_hostport
from mailbridge.dispatch import Dispatcher
from mailbridge.feedback import FeedbackRules, FeedbackStage
from mailbridge.mailer import Mailer, ReportSink, make_sink
from mailbridge.model import InboundEvent
from mailbridge.providers import ListeningProvider, Provider, build_provider
from mailbridge.report import ReportRenderer
from mailbridge.sdnotify import notify, watchdog_interval
from mailbridge.store import Store, StoreUnavailable, acquire_store_lock, open_store
from mailbridge.worker import (
    WAKE_ALL,
    WAKE_EVENTS,
    WAKE_REQUESTS,
    WorkerProcess,
    watch_wake_pipe,
    woken_by,
)

# The intake side's modules (aiosmtpd, phonenumbers, holidays, lxml...) are
# imported where the intake is built, not here: the worker process imports this
# module too and never builds an intake (about 11 MiB and 0.1 s it need not pay).
if TYPE_CHECKING:
    from mailbridge.checks import AccountRules
    from mailbridge.intake import IntakeHandler
    from mailbridge.webhook import Health, Receiver

log = logging.getLogger(__name__)
STOP_GRACE_S = 30.0  # in-flight provider calls get this long to finish on SIGTERM
PURGE_FIRST_S = 3600.0  # the daily purge's first run, after the start's own work
# While busy, a worker write waits this long for others to share its commit:
# fewer commits, and SQLite's write lock free in between for the intake's 250s.
WORKER_COMMIT_WAIT_S = 0.003


class StartInterrupted(Exception):
    """A stop (SIGTERM) was asked while the daemon was starting."""


# -- the send side (both processes) ---------------------------------------------


@dataclass(kw_only=True)
class SendSide:
    """The send and report stages over one store, and what they hold open."""

    http: httpx.AsyncClient
    providers: dict[str, Provider]
    sink: ReportSink
    dispatcher: Dispatcher
    mailer: Mailer
    feedback: FeedbackStage
    store: Store
    clock: Clock
    heartbeat_s: float
    retention_days: float = 90.0
    heartbeat_as: str = "worker"

    async def run(
        self,
        work: asyncio.Event,
        reports: asyncio.Event,
        events: asyncio.Event,
        stopping: asyncio.Event,
    ) -> None:
        """Send, match callbacks and report until `stopping` is set; then finish
        or park in-flight work.

        `work` says new requests may be due, `reports` new reports, `events`
        new delivery reports or replies.
        """
        await self._listen(events)
        await asyncio.gather(
            self.dispatcher.run(work, stopping, STOP_GRACE_S),
            self.mailer.run(reports, stopping),
            self.feedback.run(events, stopping, reports),
            self._heartbeat(stopping),
            self._purge_daily(stopping),
        )

    async def _listen(self, events: asyncio.Event) -> None:
        """Open the providers that bring their own reports (SMPP binds): what
        they receive is stored here, in the worker, and matched by the feedback
        stage like the HTTP receiver's callbacks."""

        async def store(found: Sequence[InboundEvent]) -> None:
            await self.store.add_events(found, self.clock.time())
            events.set()

        for provider in self.providers.values():
            if isinstance(provider, ListeningProvider):
                await provider.start(store)

    async def _purge_daily(self, stopping: asyncio.Event) -> None:
        """store.retention_days (SPEC 11): finished requests older than that lose
        their rows, in short batches beside the work; first an hour after start."""
        await nap(stopping, stopping, PURGE_FIRST_S)
        while not stopping.is_set():
            before = self.clock.time() - self.retention_days * 86400
            total = 0
            try:
                while not stopping.is_set() and (n := await self.store.purge(before)):
                    total += n
            except StoreUnavailable as err:
                log.error("purge: store unavailable: %s", err)
            if total:
                log.info("purge: %d finished request(s) older than %g days removed",
                         total, self.retention_days)  # fmt: skip
            await nap(stopping, stopping, 86400)

    async def _heartbeat(self, stopping: asyncio.Event) -> None:
        """Say "alive" in the store: /healthz and the systemd watchdog read it."""
        while not stopping.is_set():
            try:
                await self.store.heartbeat(self.heartbeat_as, self.clock.time(), os.getpid())
            except StoreUnavailable as err:
                log.error("heartbeat: store unavailable: %s", err)
            await nap(stopping, stopping, self.heartbeat_s)

    async def aclose(self) -> None:
        """Close the providers, the report sink and the shared HTTP client."""
        for provider in self.providers.values():
            await provider.aclose()
        await self.sink.aclose()
        await self.http.aclose()


def build_send_side(
    config: Config, store: Store, clock: Clock, on_done: Callable[[], None]
) -> SendSide:
    """Build the send side over an open store; `on_done` says a Not report is due."""
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
    configs = provider_configs(config)
    providers = {name: build_provider(name, pc, http) for name, pc in configs.items()}
    sink = make_sink(config.reports, store.instance_id)
    mailer = Mailer(store, sink, ReportRenderer(), config.reports, clock, config.dispatch.lease_s)
    feedback = FeedbackStage(store, feedback_rules(config), clock, config.dispatch.linger_s)
    dispatcher = Dispatcher(
        store,
        providers,
        config.providers,
        {a.keyid: a for a in config.accounts},
        config.dispatch,
        clock,
        on_done=on_done,
    )
    return SendSide(
        http=http,
        providers=providers,
        sink=sink,
        dispatcher=dispatcher,
        mailer=mailer,
        feedback=feedback,
        store=store,
        clock=clock,
        heartbeat_s=config.dispatch.heartbeat_s,
        retention_days=config.store.retention_days,
    )


def provider_configs(config: Config) -> dict[str, ProviderConfig]:
    """The providers' settings, with the callback URLs of our receiver filled in
    where an API takes them per message (sMsmode) and `http.public_url` is set."""
    http = config.http
    out: dict[str, ProviderConfig] = {}
    for name, pc in config.providers.items():
        if isinstance(pc, SmsmodeProviderConfig) and http is not None and http.public_url:
            base = f"{http.public_url}/hooks/{http.token}/smsmode"
            pc = pc.model_copy(
                update={
                    "notification_url": pc.notification_url or base + "/dlr",
                    "reply_notification_url": pc.reply_notification_url or base + "/mo",
                }
            )
        out[name] = pc
    return out


def feedback_rules(config: Config) -> FeedbackRules:
    """What the delivery-report and reply rules need from the configuration."""
    by_type: dict[str, list[str]] = {}
    for name, pc in config.providers.items():
        by_type.setdefault(pc.type, []).append(name)
        if pc.type == "smpp":
            # SMPP events name their bind's provider ("smpp:<name>"): two SMSCs
            # numbering their message ids alike never match each other's.
            by_type[f"smpp:{name}"] = [name]
    return FeedbackRules(
        providers_by_type={t: tuple(names) for t, names in by_type.items()},
        reply_to={a.keyid: a.reply_to for a in config.accounts},
        delivery_report_delay_s=config.reports.delivery_report_delay,
        delivery_report_max_age_s=config.reports.delivery_report_max_age,
    )


async def run_senders(
    config: Config,
    store: Store,
    clock: Clock,
    work: asyncio.Event,
    reports: asyncio.Event,
    events: asyncio.Event,
    stopping: asyncio.Event,
    beat_as: str,
) -> None:
    """Build the send side, run it until `stopping`, close it; `beat_as`: its
    heartbeat's name."""

    def done() -> None:
        # A finished request has its Not due, and maybe its etatDlr: delivery
        # reports that came before their message id was recorded are due now too.
        reports.set()
        events.set()

    side = build_send_side(config, store, clock, on_done=done)
    side.heartbeat_as = beat_as
    try:
        await side.run(work, reports, events, stopping)
    finally:
        await side.aclose()


def heartbeat_name(daemon_pid: int) -> str:
    """The name the send side of the daemon `daemon_pid` beats under (unique
    across the hosts of several instances)."""
    return f"worker:{socket.gethostname()}:{daemon_pid}"


async def run_worker(config: Config, wake_fd: int, owner: str, daemon_pid: int) -> None:
    """The worker process: the send side over its own store connection.

    Woken by the intake's pipe (`wake_fd`); stops on SIGTERM/SIGINT or when the
    pipe closes (the intake is gone).
    """
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    work, reports, events = asyncio.Event(), asyncio.Event(), asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    if stopsignal.requested():  # came before the loop took the signal over
        stopping.set()

    def wake(what: bytes = WAKE_ALL) -> None:
        feedback, sending = woken_by(what)
        if feedback:
            events.set()
        if sending:
            work.set()
            reports.set()

    watch_wake_pipe(wake_fd, wake, stopping.set)
    store = open_store(config.store, owner, commit_wait_s=WORKER_COMMIT_WAIT_S)
    await store.open()
    try:
        if stopping.is_set():  # stopped while it opened the store
            return
        await store.watch(wake)  # work added by other instances (PostgreSQL)
        await run_senders(
            config, store, SystemClock(), work, reports, events, stopping,
            heartbeat_name(daemon_pid),
        )  # fmt: skip
    finally:
        await store.close()


# -- the intake side ------------------------------------------------------------


def build_rules(config: Config) -> dict[str, AccountRules]:
    """Per-account checking rules, built once (holiday calendars, blacklists)."""
    from mailbridge.checks import AccountRules
    from mailbridge.numbers import normalise_blacklist
    from mailbridge.quiet_hours import QuietHours

    calendars: dict[str | None, QuietHours] = {}
    rules: dict[str, AccountRules] = {}
    for account in config.accounts:
        sub = account.holiday_subdivision
        if sub not in calendars:
            calendars[sub] = QuietHours(sub)
        blacklist = normalise_blacklist(
            [*account.blacklist, *config.blacklist], account.default_region
        )
        rules[account.keyid] = AccountRules(account, blacklist, calendars[sub])
    return rules


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The server side of STARTTLS: our certificate, TLS 1.2 or newer, no client
    certificates asked for (clients authenticate with AUTH, per account)."""
    tls = config.smtp.tls
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert), str(tls.key))
    return context


@dataclass
class Daemon:
    config: Config
    clock: Clock = field(default_factory=SystemClock)
    store: Store | None = None
    addresses: list[tuple[str, int]] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _servers: list[asyncio.base_events.Server] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _stop_asked: asyncio.Event = field(default_factory=asyncio.Event)  # SIGTERM, SIGINT
    _work: asyncio.Event = field(default_factory=asyncio.Event)
    _reports: asyncio.Event = field(default_factory=asyncio.Event)
    _events: asyncio.Event = field(default_factory=asyncio.Event)
    _worker: WorkerProcess | None = None
    _lock_fd: int | None = None
    _handler: IntakeHandler | None = None
    receiver: Receiver | None = None
    http_address: tuple[str, int] | None = None
    _started_at: float = 0.0

    def wake(self) -> None:
        """New work may be due: the dispatcher, the mailer and the feedback stage look now."""
        self._wake(WAKE_ALL)

    def request_stored(self, finished: bool) -> None:
        """A new request: the dispatcher and the mailer (its Ack) look now; the
        feedback stage too when it was finished at intake (its etatDlr may be due)."""
        self._wake(WAKE_ALL if finished else WAKE_REQUESTS)

    def wake_events(self) -> None:
        """New delivery or reply events: the feedback stage looks now."""
        self._wake(WAKE_EVENTS)

    def _wake(self, what: bytes) -> None:
        # The worker process reads the same bytes (run_worker): one rule for both.
        if self._worker is not None:
            self._worker.wake(what)
            return
        feedback, sending = woken_by(what)
        if feedback:
            self._events.set()
        if sending:
            self._work.set()
            self._reports.set()

    async def start(self) -> None:
        from mailbridge.intake import IntakeHandler
        from mailbridge.limits import IntakeLimits

        config = self.config
        self._started_at = self.clock.time()
        # Before recover(): a previous run's worker may still be sending.
        # `mailbridge queue retry|drop`, `reports retry`: the queue changed, look now.
        # Before the lock, which publishes our pid to them (SIGUSR1 would kill us).
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.wake)
        self._lock_fd = await self._lock_store()
        self._check_stop()
        self.store = store = open_store(config.store)
        await store.open()
        self._check_stop()
        released = await store.recover()
        if released:
            log.warning("recovered %d request(s) left in flight by a previous run", released)
        handler = IntakeHandler(
            config,
            build_rules(config),
            store,
            self.clock,
            self.request_stored,
            limits=IntakeLimits.from_config(config, self.clock),
        )
        self._handler = handler
        self._check_stop()
        await self._listen(handler)
        if config.http is not None:
            from mailbridge.webhook import Receiver

            self.receiver = Receiver(
                config.http, store, self.clock,
                on_events=self.wake_events, health=self.health, metrics=self.metrics,
            )  # fmt: skip
            self.http_address = await self.receiver.start()
        self._check_stop()
        if config.dispatch.separate_process:
            self._worker = WorkerProcess(config, self._lock_fd)
            await self._worker.start()
            self._tasks = [asyncio.create_task(self._supervise(self._worker))]
        else:
            await store.watch(self.wake)  # work added by other instances (PostgreSQL)
            senders = run_senders(
                config, store, self.clock, self._work, self._reports, self._events,
                self._stopping, heartbeat_name(os.getpid()),
            )  # fmt: skip
            self._tasks = [asyncio.create_task(senders)]
        if (interval := watchdog_interval()) is not None:
            self._tasks.append(asyncio.create_task(self._watchdog(interval)))
        self._check_stop()
        listening = ", ".join(f"{h}:{p}" for h, p in self.addresses)
        if self.http_address is not None:
            listening += "; http {}:{}".format(*self.http_address)
        log.info("mailbridge ready: SMTP on %s", listening)
        notify(f"READY=1\nSTATUS=listening on smtp {listening}")

    def _check_stop(self) -> None:
        """Between the steps of start(): a stop asked meanwhile ends it there
        (stop() then closes what it had opened)."""
        if self._stop_asked.is_set():
            raise StartInterrupted

    async def _lock_store(self) -> int | None:
        """acquire_store_lock, given up at once when a stop is asked: it may wait
        up to 30 s for a previous run's worker to die."""
        lock = asyncio.ensure_future(acquire_store_lock(self.config.store))
        asked = asyncio.ensure_future(self._stop_asked.wait())
        try:
            await asyncio.wait({lock, asked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            asked.cancel()
            lock.cancel()  # nothing if it is done; else it closes its file
        try:
            return await lock
        except asyncio.CancelledError:
            if lock.cancelled() and self._stop_asked.is_set():
                raise StartInterrupted from None
            raise

    async def _supervise(self, worker: WorkerProcess) -> None:
        """Restart the worker process if it dies while the daemon runs.

        Its claims and in-flight attempts are released first (as at a start),
        which is safe because it is gone; restarts back off up to a minute.
        """
        assert self.store is not None
        delay = 1.0
        while True:
            started = time.monotonic()
            code = await worker.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started > 60:
                delay = 1.0
            log.error("worker process exited with status %s: restarting in %.0f s", code, delay)
            await nap(self._stopping, self._stopping, delay)
            if self._stopping.is_set():
                return
            delay = min(60.0, delay * 2)
            try:
                await self.store.recover(worker.owner)  # the dead worker's leases only
                await worker.start()
            except (OSError, StoreUnavailable) as err:
                log.error("worker process: cannot restart: %s", err)

    async def _listen(self, handler: IntakeHandler) -> None:
        from mailbridge.intake import smtp_protocol

        smtp = self.config.smtp
        host, port = parse_hostport(smtp.listen)
        protocol = smtp_protocol(handler, smtp, tls=tls_context(self.config))
        loop = asyncio.get_running_loop()
        server = await loop.create_server(protocol, host, port)
        self._servers.append(server)
        for sock in server.sockets:
            address = sock.getsockname()
            self.addresses.append((str(address[0]), int(address[1])))

    async def _watchdog(self, interval: float) -> None:
        # Fed only while healthy: a hung send side (its heartbeat stale) or a
        # store that does not answer make systemd restart the service.
        while not self._stopping.is_set():
            health = await self.health()
            if health.ok:
                notify("WATCHDOG=1")
            else:
                log.error("watchdog not fed: %s", health.checks)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)

    async def health(self) -> Health:
        """The store answers, SMTP listens, the send side is alive (its heartbeat)."""
        from mailbridge.webhook import Health

        checks: dict[str, str | None] = {}
        heartbeats: dict[str, float] = {}
        try:
            assert self.store is not None
            heartbeats = await asyncio.wait_for(self.store.heartbeats(), 5.0)
            checks["store"] = None
        except (StoreUnavailable, TimeoutError, AssertionError) as err:
            checks["store"] = f"not answering ({err or type(err).__name__})"
        serving = bool(self._servers) and all(s.is_serving() for s in self._servers)
        checks["smtp"] = None if serving else "not listening"
        beat = heartbeats.get(heartbeat_name(os.getpid()))
        if self._worker is not None and not self._worker.alive:
            checks["sending"] = "worker process not running"
        elif checks["store"] is not None:
            checks["sending"] = "unknown (store not answering)"
        elif beat is None:
            # A worker just started has not beaten yet: it gets heartbeat_stale_s.
            young = self.clock.time() - self._started_at < self.config.dispatch.heartbeat_stale_s
            checks["sending"] = None if young else "no heartbeat yet"
        elif (age := self.clock.time() - beat) > self.config.dispatch.heartbeat_stale_s:
            checks["sending"] = f"heartbeat {age:.0f}s old"
        else:
            checks["sending"] = None
        return Health(checks)

    async def metrics(self) -> bytes:
        """/metrics: the store's counters and gauges, and the intake's refusals."""
        from mailbridge.metrics import render_metrics

        assert self.store is not None
        snapshot = await self.store.metrics(self.clock.time())
        refused = self._handler.refused if self._handler is not None else 0
        return render_metrics(snapshot, refused=refused, providers=self.config.providers)

    async def stop(self) -> None:
        """Stop accepting, finish or park in-flight work, close everything."""
        notify("STOPPING=1")
        log.info("stopping: no new mail accepted")
        for server in self._servers:
            server.close()
        if self.receiver is not None:
            await self.receiver.stop()
        self._stopping.set()
        if self._worker is not None:
            await self._worker.stop(STOP_GRACE_S + 15)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.store is not None:
            await self.store.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("stopped")

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT. One that comes while it starts (even
        before the loop, see stopsignal.py) is a clean stop too."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop_asked.set)
        if stopsignal.requested():
            self._stop_asked.set()
        try:
            await self.start()
        except StartInterrupted:
            log.info("stop asked while starting")
        except Exception:
            # Port taken, store locked...: the caller says why; nothing half
            # started (a worker, the store, the lock) is left behind.
            with contextlib.suppress(Exception):
                await self.stop()
            raise
        else:
            await self._stop_asked.wait()
        await self.stop()
