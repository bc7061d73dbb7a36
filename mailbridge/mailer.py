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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiosmtplib

from mailbridge.clock import Clock, nap
from mailbridge.config import RelayConfig, ReportsConfig
from mailbridge.logs import request_fields, request_tag
from mailbridge.model import ReportData, ReportJob, rows_needed
from mailbridge.relay import (
    Accepted,
    Outcome,
    Outgoing,
    RelayConnection,
    RelayUnavailable,
    ReportRefused,
)
from mailbridge.report import Rendered, ReplyContent, ReportRenderer, compose_mail
from mailbridge.store import Store, StoreUnavailable

__all__ = ["Letter", "MaildirSink", "Mailer", "ReportRefused", "ReportSink", "SmtpRelaySink"]

log = logging.getLogger(__name__)
CLAIM_BATCH = 200
LEASE_S = 300.0
MAILDIR_PARALLEL = 4  # file writes in flight (each fsyncs; threads overlap them)
# Reports a relay has taken that a lane may hold unrecorded while a `sent` mark
# is being committed: a crash repeats at most 2 x this many per connection. At 2
# a lane paused every second report for a commit, and while the intake held the
# write lock that capped reports at ~500/s (bench/run.py's end to end); at 8 the
# lanes keep going (docs/performance.md).
MAX_UNMARKED = 8


@dataclass(frozen=True, slots=True)
class Letter:
    """A rendered report, ready for a sink."""

    job: ReportJob
    mail: bytes


class ReportSink(Protocol):
    parallel: int  # lanes the sink takes at once

    async def deliver_lane(
        self, letters: Sequence[Letter], envelope_from: str, on_delivered: Accepted | None = None
    ) -> list[Outcome]:
        """Deliver `letters` in order; one outcome each (None: delivered).
        A sink that can repeat a letter after a crash awaits `on_delivered(i)`
        as soon as letter i is delivered."""
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

    def _write_all(self, letters: Sequence[Letter]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for letter in letters:
            try:
                self._write(letter.job, letter.mail)
                outcomes.append(None)
            except OSError as err:
                outcomes.append(RelayUnavailable(f"Maildir: {err}"))
        return outcomes

    async def deliver_lane(
        self, letters: Sequence[Letter], envelope_from: str, on_delivered: Accepted | None = None
    ) -> list[Outcome]:
        # No on_delivered: a file already in new/ or cur/ is not written twice.
        return await asyncio.to_thread(self._write_all, letters)

    async def aclose(self) -> None:
        return None


class SmtpRelaySink:
    """Sends through an SMTP relay: a pool of `connections` warm connections
    (relay.RelayConnection), opened on demand, one lane on each at a time; a
    lane's reports are pipelined when the relay offers PIPELINING."""

    def __init__(self, relay: RelayConfig) -> None:
        self.relay = relay
        self.parallel = relay.connections
        # Idle slots: a connection, or None for a slot not connected yet. LIFO:
        # the connection just used is reused first; others open on demand.
        self._idle: asyncio.LifoQueue[RelayConnection | None] = asyncio.LifoQueue()
        for _ in range(relay.connections):
            self._idle.put_nowait(None)
        self._open: set[RelayConnection] = set()

    async def _connect(self) -> RelayConnection:
        conn = await RelayConnection.open(self.relay)
        self._open.add(conn)
        return conn

    async def deliver_lane(
        self, letters: Sequence[Letter], envelope_from: str, on_delivered: Accepted | None = None
    ) -> list[Outcome]:
        outgoing = [Outgoing(envelope_from, letter.job.to_addr, letter.mail) for letter in letters]
        conn = await self._idle.get()
        try:
            if conn is not None and conn.usable:
                before = conn.answered
                outcomes = await conn.send(outgoing, on_delivered)
                if conn.answered > before or conn.usable:
                    return outcomes
                # The relay closed the warm connection as we wrote (not one reply):
                # nothing of this lane reached it; once more on a new connection.
            self._forget(conn)
            conn = None
            try:
                conn = await self._connect()
            except (OSError, TimeoutError, aiosmtplib.SMTPException, RelayUnavailable) as err:
                failed = RelayUnavailable(f"cannot connect to the relay: {err}")
                return [failed] * len(letters)
            return await conn.send(outgoing, on_delivered)
        finally:
            if conn is not None and not conn.usable:
                self._forget(conn)
                conn = None
            self._idle.put_nowait(conn)  # the slot goes back, connected or not

    def _forget(self, conn: RelayConnection | None) -> None:
        if conn is not None:
            conn.close()
            self._open.discard(conn)

    async def aclose(self) -> None:
        for conn in list(self._open):
            await conn.quit()
        self._open.clear()


class SentMarks:
    """`sent` marks of one lane, recorded while the lane goes on.

    One store call in flight at a time; the reports delivered meanwhile wait
    for the next (group commit makes it cheap), and the lane pauses once
    MAX_UNMARKED wait. So a crash (a kill between the relay's 250 and the
    commit) repeats at most 2 x MAX_UNMARKED reports of a lane, not the whole
    lane, and pipelining still overlaps commits with the relay's round trips.
    """

    def __init__(self, store: Store, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self._waiting: list[int] = []
        self._added: set[int] = set()
        self._flight: asyncio.Future[None] | None = None

    async def add(self, report_id: int) -> None:
        """Report `report_id` was delivered: record it now or with the next call."""
        self._waiting.append(report_id)
        self._added.add(report_id)
        if self._flight is not None and not self._flight.done():
            if len(self._waiting) < MAX_UNMARKED:
                return
        await self._land()
        self._start(self._waiting)
        self._waiting = []

    async def finish(self, sent: Sequence[int]) -> None:
        """The lane is over: record whatever of `sent` is not recorded yet."""
        await self._land()
        rest = self._waiting + [i for i in sent if i not in self._added]
        self._waiting = []
        if rest:
            await self.store.reports_sent(rest, self.clock.time())

    async def abandon(self) -> None:
        """The lane failed: let the call in flight end (its error is the lane's own)."""
        if self._flight is not None:
            await asyncio.gather(self._flight, return_exceptions=True)
            self._flight = None

    def _start(self, report_ids: list[int]) -> None:
        self._flight = asyncio.ensure_future(self.store.reports_sent(report_ids, self.clock.time()))

    async def _land(self) -> None:
        if self._flight is not None:
            flight, self._flight = self._flight, None
            await flight  # StoreUnavailable stops the lane


def make_sink(config: ReportsConfig, instance_id: str) -> ReportSink:
    if config.maildir is not None:
        return MaildirSink(config.maildir, instance_id)
    assert config.smtp is not None  # config validation guarantees one of the two
    return SmtpRelaySink(config.smtp)


def lanes_of(groups: Sequence[list[Letter]], n: int) -> list[list[Letter]]:
    """Spread the requests' reports over at most `n` lanes, each request's
    reports together and in order (an Ack before its Not)."""
    lanes: list[list[Letter]] = [[] for _ in range(max(1, min(n, len(groups))))]
    for k, group in enumerate(groups):
        lanes[k % len(lanes)].extend(group)
    return lanes


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
        letter = await self._letter(job, data)
        return await self._deliver_lane([letter], {job.request_id: data}) == 1

    async def _letter(self, job: ReportJob, data: ReportData) -> Letter:
        rendered = await self._render(job, data)
        mail = compose_mail(
            job,
            data,
            rendered,
            from_address=self.config.from_address,
            instance_id=self.store.instance_id,
        )
        return Letter(job, mail)

    async def _deliver_lane(self, lane: list[Letter], data: dict[int, ReportData]) -> int:
        """Deliver one lane, marking reports sent as the sink delivers them
        (SentMarks); return how many were sent."""
        marks = SentMarks(self.store, self.clock)

        async def delivered(i: int) -> None:
            await marks.add(lane[i].job.id)

        try:
            outcomes = await self.sink.deliver_lane(lane, self.config.envelope_from, delivered)
        except BaseException:
            await marks.abandon()
            raise
        pairs = list(zip(lane, outcomes, strict=True))
        sent = [letter.job for letter, outcome in pairs if outcome is None]
        await marks.finish([job.id for job in sent])
        if sent:
            if log.isEnabledFor(logging.INFO):
                for job in sent:
                    email_id = data[job.request_id].email_id
                    log.info(
                        "%s: %s report delivered to %s", request_tag(job.request_id, email_id),
                        job.kind, job.to_addr, extra=request_fields(job.request_id, email_id),
                    )  # fmt: skip
        for letter, outcome in pairs:
            if outcome is not None:
                await self._not_delivered(letter.job, data[letter.job.request_id], outcome)
        return len(sent)

    async def _not_delivered(self, job: ReportJob, data: ReportData, err: Exception) -> None:
        if isinstance(err, ReportRefused):
            await self._give_up(job, data, f"refused: {err}")
            return
        now = self.clock.time()
        if now - job.created_at >= self.config.max_age_s:
            await self._give_up(job, data, f"still failing after reports.max_age_s: {err}")
            return
        delay = self._backoff(job.attempts)
        log.warning(
            "%s: %s report to %s not delivered (%s); retry in %.0fs",
            request_tag(job.request_id, data.email_id), job.kind, job.to_addr, err, delay,
            extra=request_fields(job.request_id, data.email_id),
        )  # fmt: skip
        await self.store.report_failed(job.id, now + delay, str(err)[:500])

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

    async def _letters(
        self, jobs: list[ReportJob], data: dict[int, ReportData]
    ) -> list[list[Letter]]:
        """The claimed reports rendered, grouped by request in id order. One that
        cannot be rendered is left out: its claim lapses after lease_s and it is
        tried again."""
        groups: dict[int, list[Letter]] = {}
        for job in jobs:  # claim_reports returns them in id order
            try:
                request = data.get(job.request_id)
                if request is None:
                    raise LookupError(f"request {job.request_id} not found")
                letter = await self._letter(job, request)
            except StoreUnavailable:
                raise
            except Exception as err:
                log.error("reports: report %d cannot be rendered: %r", job.id, err)
                continue
            groups.setdefault(job.request_id, []).append(letter)
        return list(groups.values())

    async def run_once(self) -> int:
        """Deliver every report due now; return how many were delivered.

        The reports of a claim go out on up to the sink's `parallel` lanes (relay
        connections) at once; the reports of one request share a lane, in order,
        so an Ack is never overtaken by its Not. Each lane's `sent` marks are one
        store call.
        """
        delivered = 0
        while True:
            # One read for the whole claim, not one per report, on the claim's trip.
            jobs, data = await self.store.claim_reports_with_data(
                self.clock.time(), CLAIM_BATCH, self.lease_s
            )
            if not jobs:
                return delivered
            if data is None:  # the read after the claim failed: read again
                data = await self.store.report_data_many(
                    [job.request_id for job in jobs], rows_needed(jobs)
                )
            groups = await self._letters(jobs, data)
            outcomes = await asyncio.gather(
                *(self._deliver_lane(lane, data) for lane in lanes_of(groups, self.sink.parallel)),
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
            if len(jobs) < CLAIM_BATCH:
                # Nothing else was due at the claim: one more would find nothing
                # (a write transaction for nothing). What came due since woke
                # `run` (a finished request, a stored callback) or is next_due's.
                return delivered

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
