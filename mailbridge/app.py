"""The composition root: builds every part from the Config and runs them.

`Daemon.start()` opens the store, recovers a previous run's unfinished work,
builds the providers and the report sink, starts the SMTP listener, the
dispatcher and the mailer, and tells systemd READY. `Daemon.stop()` stops
accepting mail, lets in-flight sends finish (or parks them in the store), and
closes everything. No globals: tests build a Daemon with a fake clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from dataclasses import dataclass, field

import httpx

from mailbridge.checks import AccountRules
from mailbridge.clock import Clock, SystemClock
from mailbridge.config import Config, parse_hostport
from mailbridge.dispatch import Dispatcher
from mailbridge.intake import COMMAND_LIMITS, IntakeHandler, IntakeSMTP
from mailbridge.limits import ConnectionGate, IntakeLimits
from mailbridge.mailer import Mailer, ReportSink, make_sink
from mailbridge.numbers import normalise_blacklist
from mailbridge.providers import Provider, build_provider
from mailbridge.quiet_hours import QuietHours
from mailbridge.report import ReportRenderer
from mailbridge.sdnotify import notify, watchdog_interval
from mailbridge.store import Store, open_store

log = logging.getLogger(__name__)
STOP_GRACE_S = 30.0


def build_rules(config: Config) -> dict[str, AccountRules]:
    """Per-account checking rules, built once (holiday calendars, blacklists)."""
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
    _work: asyncio.Event = field(default_factory=asyncio.Event)
    _reports: asyncio.Event = field(default_factory=asyncio.Event)
    _http: httpx.AsyncClient | None = None
    _providers: dict[str, Provider] = field(default_factory=dict)
    _sink: ReportSink | None = None

    def wake(self) -> None:
        """New work may be due: the dispatcher and the mailer look now."""
        self._work.set()
        self._reports.set()

    async def start(self) -> None:
        config = self.config
        self.store = store = open_store(config.store)
        await store.open()
        released = await store.recover()
        if released:
            log.warning("recovered %d request(s) left in flight by a previous run", released)
        self._http = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=config.dispatch.http_max_connections,
                max_keepalive_connections=config.dispatch.http_max_keepalive,
            ),
            headers={"User-Agent": "mailbridge"},
        )
        self._providers = {
            name: build_provider(name, pc, self._http) for name, pc in config.providers.items()
        }
        self._sink = make_sink(config.reports, store.instance_id)
        mailer = Mailer(store, self._sink, ReportRenderer(), config.reports, self.clock)
        dispatcher = Dispatcher(
            store,
            self._providers,
            config.providers,
            {a.keyid: a for a in config.accounts},
            config.dispatch,
            self.clock,
            on_done=self._reports.set,
        )
        handler = IntakeHandler(
            config,
            build_rules(config),
            store,
            self.clock,
            self.wake,
            limits=IntakeLimits.from_config(config, self.clock),
        )
        await self._listen(handler)
        self._tasks = [
            asyncio.create_task(dispatcher.run(self._work, self._stopping, STOP_GRACE_S)),
            asyncio.create_task(mailer.run(self._reports, self._stopping)),
        ]
        if (interval := watchdog_interval()) is not None:
            self._tasks.append(asyncio.create_task(self._watchdog(interval)))
        listening = ", ".join(f"{h}:{p}" for h, p in self.addresses)
        log.info("mailbridge ready: SMTP on %s", listening)
        notify(f"READY=1\nSTATUS=listening on smtp {listening}")

    async def _listen(self, handler: IntakeHandler) -> None:
        smtp = self.config.smtp
        host, port = parse_hostport(smtp.listen)
        context = tls_context(self.config)
        gate = ConnectionGate(smtp.max_connections, smtp.max_connections_per_ip)
        authenticator = handler.authenticator()
        loop = asyncio.get_running_loop()

        def protocol() -> IntakeSMTP:
            return IntakeSMTP(
                handler,
                gate,
                data_size_limit=smtp.max_message_bytes,
                enable_SMTPUTF8=True,
                hostname=smtp.hostname,
                ident="mailbridge ESMTP",
                timeout=smtp.timeout_s,
                tls_context=context,
                require_starttls=bool(smtp.tls and smtp.tls.required),
                authenticator=authenticator,
                auth_require_tls=True,  # AUTH is neither offered nor accepted before STARTTLS
                command_call_limit=COMMAND_LIMITS,
                loop=loop,
            )

        server = await loop.create_server(protocol, host, port)
        self._servers.append(server)
        for sock in server.sockets:
            address = sock.getsockname()
            self.addresses.append((str(address[0]), int(address[1])))

    async def _watchdog(self, interval: float) -> None:
        while not self._stopping.is_set():
            notify("WATCHDOG=1")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)

    async def stop(self) -> None:
        """Stop accepting, finish or park in-flight work, close everything."""
        notify("STOPPING=1")
        log.info("stopping: no new mail accepted")
        for server in self._servers:
            server.close()
        self._stopping.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for provider in self._providers.values():
            await provider.aclose()
        if self._sink is not None:
            await self._sink.aclose()
        if self._http is not None:
            await self._http.aclose()
        if self.store is not None:
            await self.store.close()
        log.info("stopped")

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT."""
        await self.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.stop()
