"""SMPP binds kept up over asyncio streams: the transport of providers/smpp.py.

Input: a `SmppProviderConfig` and a handler for `deliver_sm`. Output: `submit()`,
which writes one submit_sm and returns its submit_sm_resp, or says for certain
that the part was never written (`NotSent`: safe to submit again) or that it
was written and no answer came (`InDoubt`: it may have reached the SMSC).

- `binds` transceiver binds, each with `system_id`/`password`/`system_type`,
  TLS when `tls` is set. A bind that drops (or never comes up) is tried again
  with jittered backoff (RECONNECT_MIN_S doubling to RECONNECT_MAX_S); a
  refused bind (ESME_RBINDFAIL, ESME_RINVPASWD, ESME_RINVSYSID) is kept as
  `refused` (the provider raises ProviderAuthError from it) and tried again
  at the same pace, so that a corrected password on the SMSC side is picked up.
- The window: at most `window` submit_sm without a response per bind. Free
  slots are tokens in one queue shared by the binds: a part takes any free
  slot of any bind, and a slot of a bind that dropped is never used again.
- The throughput: at most `throughput` parts per second over all binds, by
  spacing the writes; `pause()` (ESME_RTHROTTLED, ESME_RMSGQFUL) stops every
  write for a while, growing while the SMSC keeps pushing back.
- `enquire_link` when a bind has been silent `enquire_link_s`; no answer in
  `response_timeout_s` drops the bind (a dead TCP peer is found out).
- Every request gets `response_timeout_s` for its response. A submit_sm
  without one, or in flight when its bind drops, is `InDoubt`.
- `deliver_sm` is handed to the handler, and its deliver_sm_resp is written
  only after the handler returns (it stores the receipt or reply first), with
  the status the handler gives; a handler that raises gets ESME_RX_T_APPN (the
  SMSC delivers it again later). The read loop never waits for a handler.
- `close()` unbinds every bind (waiting up to response_timeout_s for the
  unbind_resp) and closes the connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from mailbridge.config import SmppProviderConfig
from mailbridge.providers import smpp_pdu as pdu
from mailbridge.providers.smpp_pdu import Pdu

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 60.0
THROTTLE_PAUSE_S = 1.0  # the first pause after ESME_RTHROTTLED / ESME_RMSGQFUL
THROTTLE_PAUSE_MAX_S = 30.0
UNBIND_WAIT_MAX_S = 5.0

# deliver_sm -> the command_status of its deliver_sm_resp.
DeliverHandler = Callable[[Pdu], Awaitable[int]]


class NotSent(Exception):
    """The part was never written to an SMSC: submitting it again is safe."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused  # the binds are down because the SMSC refused our credentials


class InDoubt(Exception):
    """The part was written and no response came: it may have reached the SMSC."""


class _Lost(Exception):
    """The bind went away while a request waited for its response."""


class _NotWritten(_Lost):
    """The bind was not there to write the request to."""


@dataclass(eq=False)
class _Slot:
    """One place in a bind's window; useless once its bind's connection is gone."""

    bind: _Bind
    generation: int


class _Bind:
    """One transceiver bind and its reconnect loop."""

    def __init__(self, pool: SmppPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.generation = 0
        self.writer: asyncio.StreamWriter | None = None
        self.up = False
        self.sequence = 0
        self.waiting: dict[int, asyncio.Future[Pdu]] = {}
        self.last_read = 0.0
        self.handlers: set[asyncio.Task[None]] = set()
        self.task: asyncio.Task[None] | None = None

    @property
    def label(self) -> str:
        return f"{self.pool.name}[{self.index}]"

    def next_sequence(self) -> int:
        self.sequence = self.sequence % 0x7FFFFFFF + 1
        return self.sequence

    async def run(self) -> None:
        """Connect, bind, serve; again after a drop, with jittered backoff."""
        delay = RECONNECT_MIN_S
        while not self.pool.closing:
            try:
                reader = await self._connect()
            except (OSError, TimeoutError, pdu.PduError, _Lost, ConnectionError) as err:
                self.pool.last_error = f"{self.label}: cannot bind: {err}"
                if self.pool.refused is None:
                    log.warning("%s", self.pool.last_error)
                self.pool.changed()
            except Exception:  # a bug must not end the binds for good
                log.exception("%s: unexpected error while binding", self.label)
            else:
                delay = RECONNECT_MIN_S
                try:
                    await self._serve(reader)
                except Exception:
                    log.exception("%s: unexpected error on the bind", self.label)
                finally:
                    self._down("connection lost")
                if self.pool.closing:
                    break
            # Jitter: binds (and instances) that dropped together do not come back together.
            await self.pool.nap(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _connect(self) -> asyncio.StreamReader:
        config = self.pool.config
        context = ssl.create_default_context() if config.tls else None
        timeout = config.response_timeout_s
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(config.host, config.port, ssl=context), timeout
        )
        self.writer = writer
        self.sequence = 0
        try:
            bind = Pdu(
                pdu.BIND_TRANSCEIVER,
                self.next_sequence(),
                fields={
                    "system_id": pdu.c_octets(config.system_id, 16, "system_id"),
                    "password": pdu.c_octets(config.password, 9, "password"),
                    "system_type": pdu.c_octets(config.system_type, 13, "system_type"),
                    "interface_version": pdu.INTERFACE_VERSION,
                },
            )
            writer.write(pdu.encode(bind))
            await writer.drain()
            resp = await asyncio.wait_for(self._read_until(reader, bind.sequence), timeout)
        except BaseException:
            writer.close()
            self.writer = None
            raise
        if resp.status != pdu.ESME_ROK:
            writer.close()
            self.writer = None
            what = f"{self.label}: bind_transceiver refused: {pdu.status_name(resp.status)}"
            if resp.status in pdu.BIND_REFUSALS:
                if self.pool.refused is None:
                    log.error("%s (system_id %r)", what, config.system_id)
                self.pool.refused = what
                self.pool.last_error = what
                self.pool.changed()
            raise ConnectionError(what)
        self.generation += 1
        self.up = True
        self.last_read = time.monotonic()
        self.pool.refused = None
        self.pool.last_error = None
        log.info(
            "%s: bound to %s:%d as %r (SMSC %r)",
            self.label, config.host, config.port, config.system_id, resp.text("system_id"),
        )  # fmt: skip
        for _ in range(config.window):
            self.pool.slots.put_nowait(_Slot(self, self.generation))
        self.pool.changed()
        return reader

    async def _read_until(self, reader: asyncio.StreamReader, sequence: int) -> Pdu:
        """Before the bind is up: read PDUs until the response to `sequence`."""
        while True:
            frame = await _read_frame(reader)
            answer = pdu.decode(frame)
            if answer.is_response and answer.sequence == sequence:
                return answer
            if answer.command_id == pdu.ENQUIRE_LINK:
                self._write(pdu.response(answer))

    async def _serve(self, reader: asyncio.StreamReader) -> None:
        keeper = asyncio.create_task(self._keep_alive())
        try:
            while True:
                try:
                    frame = await _read_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError, OSError):
                    return
                except pdu.PduError as err:
                    log.error("%s: unreadable frame (%s): dropping the bind", self.label, err)
                    return
                self.last_read = time.monotonic()
                try:
                    message = pdu.decode(frame)
                except pdu.PduError as err:
                    # A frame of the right length we cannot read: say so, keep the bind.
                    sequence = int.from_bytes(frame[12:16], "big")
                    log.warning("%s: unreadable PDU (%s): generic_nack", self.label, err)
                    self._write(pdu.Pdu(pdu.GENERIC_NACK, sequence, err.status))
                    continue
                try:
                    if not self._dispatch(message):
                        return
                except _Lost:
                    return
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    def _dispatch(self, message: Pdu) -> bool:
        """Handle one PDU from the SMSC; False when the bind is to end."""
        if message.is_response:
            future = self.waiting.pop(message.sequence, None)
            if future is not None and not future.done():
                future.set_result(message)
            elif message.command_id != pdu.GENERIC_NACK:
                log.info("%s: late %s (sequence %d) ignored", self.label, message.name,
                         message.sequence)  # fmt: skip
            return True
        if message.command_id == pdu.DELIVER_SM:
            task = asyncio.create_task(self._deliver(message))
            self.handlers.add(task)
            task.add_done_callback(self.handlers.discard)
        elif message.command_id == pdu.ENQUIRE_LINK:
            self._write(pdu.response(message))
        elif message.command_id == pdu.UNBIND:
            log.warning("%s: the SMSC unbinds", self.label)
            self._write(pdu.response(message))
            return False
        else:
            self._write(pdu.response(message, pdu.ESME_RINVCMDID))
        return True

    async def _deliver(self, message: Pdu) -> None:
        generation = self.generation
        try:
            status = await self.pool.on_deliver(message)
        except Exception:
            log.exception("%s: deliver_sm not stored: ESME_RX_T_APPN (redelivered later)",
                          self.label)  # fmt: skip
            status = pdu.ESME_RX_T_APPN
        if self.up and self.generation == generation:
            # Never before the handler returned: the receipt is stored when we ack.
            # A bind gone meanwhile: the SMSC delivers it again (stored once: dedupe key).
            with contextlib.suppress(_Lost):
                self._write(pdu.response(message, status, message_id=b""))

    async def _keep_alive(self) -> None:
        config = self.pool.config
        while True:
            idle = time.monotonic() - self.last_read
            if idle < config.enquire_link_s:
                await asyncio.sleep(config.enquire_link_s - idle)
                continue
            try:
                await self.request(Pdu(pdu.ENQUIRE_LINK, 0))
            except (_Lost, TimeoutError):
                log.warning(
                    "%s: no enquire_link_resp in %gs: dropping the bind",
                    self.label, config.response_timeout_s,
                )  # fmt: skip
                if self.writer is not None:
                    self.writer.close()
                return
            self.last_read = time.monotonic()

    def _write(self, message: Pdu) -> None:
        if self.writer is None or self.writer.is_closing():
            raise _NotWritten("not connected")
        self.writer.write(pdu.encode(message))

    async def request(self, message: Pdu) -> Pdu:
        """Write a request and wait for its response (response_timeout_s).

        _Lost before it was written or when the bind goes; TimeoutError without a response."""
        if not self.up:
            raise _NotWritten("not bound")
        sequence = self.next_sequence()
        future: asyncio.Future[Pdu] = asyncio.get_running_loop().create_future()
        self.waiting[sequence] = future
        try:
            self._write(
                Pdu(message.command_id, sequence, message.status, message.fields, message.tlvs)
            )
        except _Lost:
            self.waiting.pop(sequence, None)
            raise
        try:
            async with asyncio.timeout(self.pool.config.response_timeout_s):
                return await future
        finally:
            self.waiting.pop(sequence, None)

    def _down(self, why: str) -> None:
        if self.up and not self.pool.closing:
            log.warning("%s: bind down (%s)", self.label, why)
        self.up = False
        self.generation += 1  # its window slots are void from now on
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(_Lost(why))
        self.waiting.clear()
        self.pool.changed()

    async def unbind(self) -> None:
        """Unbind (waiting a little for unbind_resp) and close."""
        if self.up and self.writer is not None:
            wait = min(self.pool.config.response_timeout_s, UNBIND_WAIT_MAX_S)
            with contextlib.suppress(_Lost, TimeoutError, OSError, ConnectionError):
                await asyncio.wait_for(self.request(Pdu(pdu.UNBIND, 0)), wait)
                log.info("%s: unbound", self.label)
        self._down("closed")


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(4)
    return head + await reader.readexactly(pdu.frame_length(head) - 4)


class _Pace:
    """Parts per second over all binds, and the pauses the SMSC asks for."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_at = 0.0
        self.paused_until = 0.0
        self.pause_s = THROTTLE_PAUSE_S

    async def wait(self) -> None:
        while True:
            now = time.monotonic()
            if now < self.paused_until:
                await asyncio.sleep(self.paused_until - now)
                continue
            at = max(now, self.next_at)
            self.next_at = at + self.interval
            if at > now:
                await asyncio.sleep(at - now)
            return

    def pause(self) -> float:
        now = time.monotonic()
        if now >= self.paused_until:
            # A new push-back after the last pause ended: pause longer. Those that
            # come during a pause (the rest of the window) do not add to it.
            if now - self.paused_until > 2 * self.pause_s:
                self.pause_s = THROTTLE_PAUSE_S
            else:
                self.pause_s = min(self.pause_s * 2, THROTTLE_PAUSE_MAX_S)
            self.paused_until = now + self.pause_s
        return self.paused_until - now


class SmppPool:
    """The binds of one SMPP provider (see the module docstring)."""

    def __init__(self, name: str, config: SmppProviderConfig, on_deliver: DeliverHandler) -> None:
        self.name = name
        self.config = config
        self.on_deliver = on_deliver
        self.binds = [_Bind(self, i) for i in range(config.binds)]
        self.slots: asyncio.Queue[_Slot] = asyncio.Queue()
        self.pace = _Pace(config.throughput)
        self.closing = False
        self.refused: str | None = None  # why the last bind was refused, until one succeeds
        self.last_error: str | None = None
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()
        self.started = False

    def start(self) -> None:
        """Open the binds (in the background; they stay up until close())."""
        if self.started:
            return
        self.started = True
        for bind in self.binds:
            bind.task = asyncio.create_task(bind.run())

    def changed(self) -> None:
        """A bind came up, went down or was refused: submitters waiting look again."""
        self._changed.set()

    @property
    def bound(self) -> int:
        return sum(1 for b in self.binds if b.up)

    async def nap(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def wait_bound(self, timeout: float) -> bool:
        """Wait until a bind is up (True), refused or `timeout` passed (False)."""
        self.start()
        deadline = time.monotonic() + timeout
        while not self.bound:
            if self.refused is not None:
                return False  # refused credentials: no use waiting for the next attempt
            left = deadline - time.monotonic()
            if left <= 0 or self.closing:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return True

    async def _slot(self, patience_s: float) -> _Slot:
        """A free window slot of a bound bind; NotSent when none is bound for patience_s."""
        self.start()
        deadline = time.monotonic() + patience_s
        while True:
            if self.closing:
                raise NotSent(f"{self.name}: closing")
            if not self.bound:
                if not await self.wait_bound(max(0.0, deadline - time.monotonic())):
                    why = self.refused or self.last_error or "no bind up"
                    raise NotSent(f"{self.name}: {why}", refused=self.refused is not None)
            try:
                if self.slots.empty():
                    # While binds are up, a full window is a normal wait: look at
                    # the binds again every second in case they all drop meanwhile.
                    async with asyncio.timeout(1.0):
                        slot = await self.slots.get()
                else:
                    slot = self.slots.get_nowait()
            except TimeoutError:
                if self.bound:
                    deadline = time.monotonic() + patience_s
                continue
            if slot.bind.up and slot.generation == slot.bind.generation:
                return slot
            # A slot of a connection that is gone: dropped for good.

    async def submit(
        self, fields: Mapping[str, pdu.FieldValue], patience_s: float | None = None
    ) -> Pdu:
        """One submit_sm; its submit_sm_resp (any status). NotSent: certainly not
        written (no bind for `patience_s`, default response_timeout_s); InDoubt:
        written, and no response (timeout, or the bind dropped)."""
        patience = self.config.response_timeout_s if patience_s is None else patience_s
        while True:
            slot = await self._slot(patience)
            await self.pace.wait()
            bind = slot.bind
            if not (bind.up and slot.generation == bind.generation):
                continue  # it dropped while we waited for our turn: nothing written
            break
        try:
            return await bind.request(Pdu(pdu.SUBMIT_SM, 0, fields=fields))
        except _NotWritten as err:
            raise NotSent(f"{bind.label}: {err}") from None
        except _Lost:
            raise InDoubt(f"{bind.label}: the bind dropped before the submit_sm_resp") from None
        except TimeoutError:
            raise InDoubt(
                f"{bind.label}: no submit_sm_resp within {self.config.response_timeout_s:g}s"
            ) from None
        finally:
            # The slot goes back while its connection lasts (after a timeout too:
            # else a few late answers would shrink the window for good).
            if bind.up and slot.generation == bind.generation:
                self.slots.put_nowait(slot)

    def pause(self) -> float:
        """The SMSC pushes back: stop writing for a while; how long."""
        return self.pace.pause()

    async def close(self) -> None:
        """Unbind every bind and stop reconnecting."""
        self.closing = True
        self._stop.set()
        self.changed()
        await asyncio.gather(*(b.unbind() for b in self.binds), return_exceptions=True)
        for bind in self.binds:
            if bind.task is not None:
                bind.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await bind.task
            for handler in list(bind.handlers):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(handler, self.config.response_timeout_s)
