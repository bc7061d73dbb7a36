"""Deliver report mails: into a Maildir, or through an SMTP relay.

Input: pending report rows in the store. Output: each report delivered, then
marked sent. Failure: a temporary failure (4xx, connection, timeout) stays
pending and is retried with doubling backoff capped at
`reports.retry_max_backoff_s`, for up to `reports.max_age_s`; a permanent
refusal (5xx, or a mail over the relay's advertised SIZE) and a report past
its max age are marked `failed` at once, logged at ERROR, and wait for
`mailbridge reports retry`. Never dropped silently, never retried forever.

Exactly once into a Maildir: the file name is derived from the report row, so
a retry after a crash between the rename and the `sent` mark finds the file
and does not deliver it again. Through a relay: at least once (SMTP has no
way to ask whether a message arrived); a duplicate carries the same
Message-ID, and happens only if the daemon dies between the relay's 250 and
the store commit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from collections import defaultdict
from pathlib import Path
from typing import Protocol

import aiosmtplib

from mailbridge.clock import Clock, nap
from mailbridge.config import RelayConfig, ReportsConfig
from mailbridge.logs import request_fields, request_tag
from mailbridge.model import ReportData, ReportJob
from mailbridge.report import Rendered, ReplyContent, ReportRenderer, compose_mail
from mailbridge.store import Store, StoreUnavailable

log = logging.getLogger(__name__)
CLAIM_BATCH = 200
LEASE_S = 300.0
MAILDIR_PARALLEL = 4  # file writes in flight (each fsyncs; threads overlap them)


class ReportRefused(Exception):
    """The relay refused the report for good (5xx, or too big for it): retrying
    cannot help, a human must (`mailbridge reports list`)."""


class ReportSink(Protocol):
    parallel: int  # deliveries the sink takes at once

    async def deliver(self, job: ReportJob, mail: bytes, envelope_from: str) -> None:
        """Deliver one mail or raise."""
        ...

    async def aclose(self) -> None: ...


class MaildirSink:
    """Writes each report as a file in Maildir/new (tmp, fsync, rename)."""

    parallel = MAILDIR_PARALLEL

    def __init__(self, root: Path, instance_id: str) -> None:
        self.root = root
        self.instance_id = instance_id
        for sub in ("tmp", "new", "cur"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def file_name(self, job: ReportJob) -> str:
        host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        return f"{int(job.created_at)}.M{job.id}I{self.instance_id}.{host}"

    def _delivered(self, name: str) -> bool:
        if (self.root / "new" / name).exists():
            return True
        # A mail reader moves read mail to cur/ with an ":2,<flags>" suffix.
        return (
            any(self.root.joinpath("cur").glob(f"{name}:*")) or (self.root / "cur" / name).exists()
        )

    def _write(self, job: ReportJob, mail: bytes) -> None:
        name = self.file_name(job)
        if self._delivered(name):
            return
        tmp = self.root / "tmp" / name
        with open(tmp, "wb") as f:
            f.write(mail)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.root / "new" / name)
        fd = os.open(self.root / "new", os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself must survive power loss
        finally:
            os.close(fd)

    async def deliver(self, job: ReportJob, mail: bytes, envelope_from: str) -> None:
        await asyncio.to_thread(self._write, job, mail)

    async def aclose(self) -> None:
        return None


class SmtpRelaySink:
    """Sends through an SMTP relay with aiosmtplib: a pool of `connections`
    reused connections, opened on demand, one delivery on each at a time."""

    def __init__(self, relay: RelayConfig) -> None:
        self.relay = relay
        self.parallel = relay.connections
        # Idle slots: a connected client, or None for a slot not connected yet.
        # LIFO: the connection just used is reused first; others open on demand.
        self._idle: asyncio.LifoQueue[aiosmtplib.SMTP | None] = asyncio.LifoQueue()
        for _ in range(relay.connections):
            self._idle.put_nowait(None)
        self._open: set[aiosmtplib.SMTP] = set()

    async def _connect(self) -> aiosmtplib.SMTP:
        r = self.relay
        smtp = aiosmtplib.SMTP(
            hostname=r.host,
            port=r.port,
            use_tls=r.tls,
            start_tls=r.starttls if not r.tls else False,
            timeout=r.timeout_s,
            username=r.username,
            password=r.password,
        )
        await smtp.connect()
        return smtp

    async def deliver(self, job: ReportJob, mail: bytes, envelope_from: str) -> None:
        smtp = await self._idle.get()
        try:
            for attempt in (1, 2):
                if smtp is None or not smtp.is_connected:
                    self._forget(smtp)
                    smtp = None
                    smtp = await self._connect()
                    self._open.add(smtp)
                try:
                    if smtp.is_ehlo_or_helo_needed:
                        await smtp.ehlo()  # its extensions say whether SIZE is advertised
                    _check_size(smtp, mail)
                    await smtp.sendmail(envelope_from, [job.to_addr], mail)
                    return
                except aiosmtplib.SMTPResponseException as err:
                    if err.code >= 500:
                        raise ReportRefused(f"{err.code} {err.message}") from err
                    raise
                except aiosmtplib.SMTPServerDisconnected:
                    # The relay closed an idle reused connection: reconnect once.
                    self._forget(smtp)
                    smtp = None
                    if attempt == 2:
                        raise
        finally:
            if smtp is not None and not smtp.is_connected:
                self._forget(smtp)
                smtp = None
            self._idle.put_nowait(smtp)  # the slot goes back, connected or not

    def _forget(self, smtp: aiosmtplib.SMTP | None) -> None:
        if smtp is not None:
            self._open.discard(smtp)

    async def aclose(self) -> None:
        for smtp in list(self._open):
            if smtp.is_connected:
                try:
                    await smtp.quit()
                except aiosmtplib.SMTPException:
                    smtp.close()
        self._open.clear()


def _check_size(smtp: aiosmtplib.SMTP, mail: bytes) -> None:
    """RFC 1870: a relay that advertises SIZE refuses larger mail; know it before
    sending 14 MB (a Not of a 100 000-line request)."""
    limit = smtp.esmtp_extensions.get("size", "")
    # On the wire every line ends in CRLF: that is the size the relay counts.
    size = len(mail) + mail.count(b"\n") - mail.count(b"\r\n")
    if limit.isdigit() and int(limit) > 0 and size > int(limit):
        raise ReportRefused(f"{size} bytes, over the relay's SIZE limit of {limit}")


def make_sink(config: ReportsConfig, instance_id: str) -> ReportSink:
    if config.maildir is not None:
        return MaildirSink(config.maildir, instance_id)
    assert config.smtp is not None  # config validation guarantees one of the two
    return SmtpRelaySink(config.smtp)


class Mailer:
    """Takes due reports from the store and delivers them."""

    def __init__(
        self,
        store: Store,
        sink: ReportSink,
        renderer: ReportRenderer,
        config: ReportsConfig,
        clock: Clock,
        lease_s: float = LEASE_S,
    ) -> None:
        self.store = store
        self.sink = sink
        self.renderer = renderer
        self.config = config
        self.clock = clock
        # A report claimed by a process that dies is delivered by another after
        # this (dispatch.lease_s: the same bound as for requests).
        self.lease_s = lease_s

    def _backoff(self, attempts: int) -> float:
        base = self.config.retry_backoff_s * (2 ** min(attempts, 20))
        return float(min(base, self.config.retry_max_backoff_s) * random.uniform(0.8, 1.2))

    async def deliver(self, job: ReportJob, data: ReportData | None = None) -> bool:
        """Deliver one report; True when sent, False when it stays pending.

        `data`: the request's report data when the caller has read it already."""
        if data is None:
            data = await self.store.report_data(job.request_id)
        rendered = await self._render(job, data)
        mail = compose_mail(
            job,
            data,
            rendered,
            from_address=self.config.from_address,
            instance_id=self.store.instance_id,
        )
        try:
            await self.sink.deliver(job, mail, self.config.envelope_from)
        except ReportRefused as err:
            await self._give_up(job, data, f"refused: {err}")
            return False
        except (TimeoutError, OSError, aiosmtplib.SMTPException) as err:
            now = self.clock.time()
            if now - job.created_at >= self.config.max_age_s:
                await self._give_up(job, data, f"still failing after reports.max_age_s: {err}")
                return False
            delay = self._backoff(job.attempts)
            log.warning(
                "%s: %s report to %s not delivered (%s); retry in %.0fs",
                request_tag(job.request_id, data.email_id), job.kind, job.to_addr, err, delay,
                extra=request_fields(job.request_id, data.email_id),
            )  # fmt: skip
            await self.store.report_failed(job.id, now + delay, str(err)[:500])
            return False
        await self.store.report_sent(job.id, self.clock.time())
        log.info(
            "%s: %s report delivered to %s", request_tag(job.request_id, data.email_id),
            job.kind, job.to_addr, extra=request_fields(job.request_id, data.email_id),
        )  # fmt: skip
        return True

    async def _give_up(self, job: ReportJob, data: ReportData, why: str) -> None:
        log.error(
            "%s: %s report to %s FAILED for good: %s (see `mailbridge reports list`;"
            " `mailbridge reports retry %d` once fixed)",
            request_tag(job.request_id, data.email_id), job.kind, job.to_addr, why, job.id,
            extra=request_fields(job.request_id, data.email_id),
        )  # fmt: skip
        await self.store.report_given_up(job.id, self.clock.time(), why[:500])

    async def _render(self, job: ReportJob, data: ReportData) -> Rendered:
        if job.kind == "dlr":
            rows = await self.store.delivery_rows(job.id)
            return self.renderer.render("dlr", data, dlr_rows=rows)
        if job.kind == "reply":
            reply = await self.store.reply_data(job.id)
            if reply is None:
                raise LookupError(f"reply report {job.id} has no reply")
            return self.renderer.render("reply", data, reply=ReplyContent(*reply))
        return self.renderer.render(job.kind, data)

    async def run_once(self) -> int:
        """Deliver every report due now; return how many were delivered.

        Reports of different requests go out concurrently (up to the sink's
        `parallel`); the reports of one request go in order, so an Ack is
        never overtaken by its Not. Their `sent` marks share commits.
        """
        delivered = 0
        slots = asyncio.Semaphore(max(1, self.sink.parallel))

        async def deliver_in_order(jobs: list[ReportJob], data: ReportData | None) -> int:
            async with slots:
                done = 0
                for job in jobs:
                    done += await self.deliver(job, data)
                return done

        while True:
            jobs = await self.store.claim_reports(self.clock.time(), CLAIM_BATCH, self.lease_s)
            if not jobs:
                return delivered
            by_request: dict[int, list[ReportJob]] = defaultdict(list)
            for job in jobs:  # claim_reports returns them in id order
                by_request[job.request_id].append(job)
            # One read for the whole claim, not one per report.
            data = await self.store.report_data_many(list(by_request))
            outcomes = await asyncio.gather(
                *(deliver_in_order(j, data.get(r)) for r, j in by_request.items()),
                return_exceptions=True,
            )
            for outcome in outcomes:
                if isinstance(outcome, StoreUnavailable):
                    raise outcome
                if isinstance(outcome, BaseException):
                    # Its claim lapses after lease_s and it is tried again.
                    log.error("reports: unexpected error: %r", outcome)
                else:
                    delivered += outcome

    async def run(self, wake: asyncio.Event, stopping: asyncio.Event) -> None:
        """Deliver reports until `stopping` is set; `wake` says new ones may be due."""
        while not stopping.is_set():
            wake.clear()
            try:
                await self.run_once()
            except StoreUnavailable as err:
                log.error("reports: store unavailable: %s", err)
            except Exception:
                log.exception("reports: unexpected error; retrying")
            await nap(wake, stopping, await self._idle_time())

    async def _idle_time(self) -> float:
        try:
            due = await self.store.next_due()
        except StoreUnavailable:
            return 5.0
        if due is None:
            return 60.0
        return max(0.05, min(60.0, due - self.clock.time()))
