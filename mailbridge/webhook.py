"""The HTTP receiver (SPEC section 7): provider callbacks, /healthz, /metrics.

Input: HTTP requests on `http.listen`, in the intake's own asyncio loop
(aiohttp, RECIPES.md). Output: for a callback, its delivery and reply events
durably in the store, then `2xx`; matching, statuses and mails happen later
in the worker (mailbridge/feedback.py), from the store.

Failure behaviour, per request:
- a path whose token is not `http.token`                  -> 404 (constant time)
- an unknown callback, or the wrong method                 -> 404 / 405
- a callback its provider's parser cannot read             -> 400, nothing stored
- the store cannot take it                                 -> 503 (the provider retries)
- a body over `max_body_bytes`                             -> 413
- a body not read within `body_timeout_s`                  -> 408, connection closed
- headers over the limits                                  -> 400/431 (aiohttp)
- a request head not complete within keepalive_s + body_timeout_s, or an idle
  keep-alive past keepalive_s                              -> connection closed
- more than `max_connections` connections                 -> 503 and closed at once
The receiver knows no provider's format: each provider module's pure parser
turns its callback into events. The token never appears in a log line (no
access log; our own lines name the callback, not the path).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mailbridge.clock import Clock
from mailbridge.config import HttpConfig, parse_hostport
from mailbridge.model import InboundEvent
from mailbridge.providers import CallbackError
from mailbridge.store import Store, StoreUnavailable

log = logging.getLogger(__name__)

# (query parameters, body) -> events; raises CallbackError for a malformed callback.
CallbackParser = Callable[[Mapping[str, str], bytes], list[InboundEvent]]


@dataclass(frozen=True)
class Callback:
    """One callback endpoint: `/hooks/<token>/<name>`."""

    name: str  # "cm", "smsmode/dlr"...
    method: str
    parse: CallbackParser
    ok_status: int = 200  # what the provider expects once the callback is stored


def provider_callbacks() -> list[Callback]:
    """The callback endpoints of SPEC section 7, each with its provider's parser."""
    from mailbridge.providers import cm, kcell, smsmode

    return [
        Callback("cm", "GET", cm.parse_callback),
        Callback("smsmode/dlr", "GET", smsmode.parse_delivery_callback),
        Callback("smsmode/mo", "GET", smsmode.parse_reply_callback),
        Callback("kcell", "POST", kcell.parse_callback, ok_status=204),
    ]


@dataclass(frozen=True)
class Health:
    """What /healthz says: each check's name -> a problem, or None when fine."""

    checks: dict[str, str | None]

    @property
    def ok(self) -> bool:
        return all(problem is None for problem in self.checks.values())


class _Refused(asyncio.Protocol):
    """Answers 503 and closes: the connection cap was reached."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        transport.close()


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, with a deadline on each request head.

    aiohttp bounds idle keep-alive, not a request head sent a byte at a time
    (slowloris): this deadline runs from the connection's start and from the
    end of each response, and stops while a handler runs (see _Receiver)."""

    def __init__(self, inner: Any, receiver: Receiver) -> None:
        self.inner = inner
        self.receiver = receiver
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        self.disarm()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.receiver.head_timeout_s, self._expired)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        if self.transport is not None:
            log.info("http: a request head took too long; connection closed")
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.receiver.guards[transport] = self
        self.arm()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        result: bool | None = self.inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        if self.transport is not None:
            self.receiver.guards.pop(self.transport, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class Receiver:
    """The HTTP listener. Construct, `await start()`, `await stop()`."""

    def __init__(
        self,
        config: HttpConfig,
        store: Store,
        clock: Clock,
        *,
        on_events: Callable[[], None],
        health: Callable[[], Awaitable[Health]],
        metrics: Callable[[], Awaitable[bytes]],
        callbacks: list[Callback] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.on_events = on_events  # wakes the worker's feedback stage
        self.health = health
        self.metrics = metrics
        self.callbacks = {c.name: c for c in (callbacks or provider_callbacks())}
        self.head_timeout_s = config.keepalive_s + config.body_timeout_s
        self.guards: dict[asyncio.BaseTransport, _Guarded] = {}
        self.address: tuple[str, int] | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.base_events.Server | None = None
        self._wake_due = False  # a wake of the feedback stage is scheduled

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        """Listen; return the bound (host, port)."""
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._guard])
        app.router.add_route("*", "/hooks/{token}/{name:.+}", self._hook)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,  # the path holds the token
            keepalive_timeout=self.config.keepalive_s,
            max_line_size=self.config.max_header_bytes,
            max_field_size=self.config.max_header_bytes,
            max_headers=self.config.max_headers,
        )
        await runner.setup()
        self._runner = runner
        factory = runner.server
        assert factory is not None
        cap = self.config.max_connections

        def protocol() -> asyncio.Protocol:
            if len(self.guards) >= cap:
                return _Refused()
            return _Guarded(factory(), self)

        host, port = parse_hostport(self.config.listen)
        context = self._tls_context()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(protocol, host, port, ssl=context)
        bound = self._server.sockets[0].getsockname()
        self.address = (str(bound[0]), int(bound[1]))
        return self.address

    def _tls_context(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        if tls is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(tls.cert), str(tls.key))
        return context

    async def stop(self) -> None:
        """Stop listening; let requests in progress finish (briefly)."""
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            if self._runner.server is not None:
                await self._runner.server.shutdown(2.0)
            await self._runner.cleanup()
        if self._server is not None:
            await self._server.wait_closed()
        self._server = self._runner = None

    # -- requests --------------------------------------------------------

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        guard = self.guards.get(request.transport) if request.transport else None
        if guard is not None:
            guard.disarm()  # the head is in; the handler bounds the body itself
        try:
            return await handler(request)
        finally:
            if guard is not None:
                guard.arm()  # the next request head has its own deadline

    async def _hook(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"].encode()
        if not hmac.compare_digest(token, self.config.token.encode()):
            return web.Response(status=404)
        callback = self.callbacks.get(request.match_info["name"])
        if callback is None:
            return web.Response(status=404)
        if request.method != callback.method:
            return web.Response(status=405, headers={"Allow": callback.method})
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                body = await request.read()
        except TimeoutError:
            log.info("http: callback %s: body not read in %.0fs", callback.name,
                     self.config.body_timeout_s)  # fmt: skip
            return web.Response(status=408, headers={"Connection": "close"})
        query = {k: v for k, v in request.query.items()}
        try:
            events = callback.parse(query, body)
        except CallbackError as err:
            log.warning("http: callback %s malformed (400): %s", callback.name, err)
            return web.Response(status=400, text=f"malformed callback: {err}\n")
        try:
            new = await self.store.add_events(events, self.clock.time())
        except StoreUnavailable as err:
            log.error("http: callback %s not stored (503): %s", callback.name, err)
            return web.Response(status=503, text="store unavailable, retry later\n")
        if any(new):
            self._wake_soon()
        log.info("http: callback %s: %d event(s), %d new", callback.name, len(events), sum(new))
        if callback.ok_status == 204:
            return web.Response(status=204)
        return web.Response(status=callback.ok_status, text="OK")

    def _wake_soon(self) -> None:
        """Wake the feedback stage once for the callbacks stored together: the
        handlers of one group commit resume in the same loop iteration, and
        one wake after them says it for all."""
        if not self._wake_due:
            self._wake_due = True
            asyncio.get_running_loop().call_soon(self._wake)

    def _wake(self) -> None:
        self._wake_due = False
        self.on_events()

    async def _healthz(self, request: web.Request) -> web.Response:
        health = await self.health()
        lines = [f"{name}: {problem or 'ok'}" for name, problem in health.checks.items()]
        return web.Response(status=200 if health.ok else 503, text="\n".join(lines) + "\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await self.metrics()
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
