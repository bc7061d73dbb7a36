"""Send stored requests: claim, route, batch, submit, record, retry, fail over.

Input: queued requests in the store. Output: a code for every recipient, then
the request marked done with its Not report queued. Failure behaviour:
- a transient provider failure is retried with doubling backoff and jitter up
  to the provider's `retry_attempts`, then the next provider of the route is
  tried at once; after the last one the recipient gets 29 (throttled) or 999;
- rejected credentials keep the work pending (an operator must act), loudly;
- an unexpected error in a request is retried later and, after
  `dispatch.max_attempts`, the request is quarantined for a human;
- every attempt is recorded before it starts (`submitting`), so a crash leaves
  the recipient in doubt, never forgotten; retry state lives in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

from mailbridge.clock import Clock, nap
from mailbridge.codes import Code
from mailbridge.config import AccountConfig, DispatchConfig, ProviderConfig
from mailbridge.logs import request_fields, request_tag, requests_tag
from mailbridge.model import ClaimedRequest, PendingRecipient, RecipientResult
from mailbridge.providers import (
    Outcome,
    Provider,
    ProviderAuthError,
    SmsMessage,
    TemporaryProviderError,
)
from mailbridge.routing import route_for
from mailbridge.store import Store, StoreUnavailable

log = logging.getLogger(__name__)
PAGE = 5000  # recipients loaded at once from a large request
# A request's provider calls log at INFO at most this often, each line with the
# request's running total; the calls in between log at DEBUG. A 100 000-line
# CSV is then a few lines, not a hundred identical ones.
PROGRESS_S = 10.0
FAILURES_SHOWN = 3  # numbers named in a line that groups many failures


@dataclass
class _Progress:
    """A request's running total in this process, for its log lines."""

    accepted: int = 0
    failed: int = 0
    calls: int = 0
    logged_at: float = float("-inf")


@dataclass
class CircuitBreaker:
    """A provider's health as this process sees it (in memory on purpose: after
    a restart every provider gets a fresh chance; retry counts live in the store).

    After `threshold` calls in a row that failed transiently the circuit opens:
    for `cooldown_s` the provider is skipped (its recipients fail over at once,
    or wait when it is their last provider). Then it is half-open: one call is
    let through (`probe`); a success closes the circuit, a failure opens it again.
    """

    threshold: int
    cooldown_s: float
    failures: int = 0
    open_until: float = 0.0

    def allows(self, now: float) -> bool:
        return now >= self.open_until

    def half_open(self, now: float) -> bool:
        """The cool-down is over: the next call is the probe."""
        return self.failures >= self.threshold and now >= self.open_until

    def probe(self, now: float) -> None:
        """One call goes to test the provider: while it is out the circuit reads as
        open again, so no other batch calls too; its `record` closes or re-opens it
        (and a probe that never answers leaves the circuit open one more cool-down)."""
        self.open_until = now + self.cooldown_s

    def record(self, ok: bool, now: float) -> bool:
        """Count one call; True when this call opened the circuit."""
        if ok:
            self.failures, self.open_until = 0, 0.0
            return False
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = now + self.cooldown_s
            return True
        return False


class _Item(NamedTuple):
    """One recipient on its way to a provider."""

    claimed: ClaimedRequest
    rcpt: PendingRecipient
    route: list[str]


def _tag(claimed: ClaimedRequest) -> str:
    return request_tag(claimed.id, claimed.email_id)


def _tags(claims: Iterable[ClaimedRequest]) -> str:
    return requests_tag((c.id, c.email_id) for c in claims)


def _fields(claims: Iterable[ClaimedRequest]) -> dict[str, object]:
    """`extra=` of a line about these requests: scalars for one, lists for several."""
    items = list({c.id: c for c in claims}.values())
    if len(items) == 1:
        return request_fields(items[0].id, items[0].email_id)
    return request_fields([c.id for c in items], [c.email_id for c in items])


def _ids(ids: Iterable[int]) -> str:
    """Request ids for a log line: "7", "7, 9", "12-61 (50)"."""
    unique = sorted(set(ids))
    if len(unique) <= 3:
        return ", ".join(map(str, unique))
    return f"{unique[0]}-{unique[-1]} ({len(unique)})"


def final_result(
    rcpt: PendingRecipient, provider: str, outcome: Outcome, now: float
) -> RecipientResult:
    """A provider's final word on one recipient (the path of every accepted SMS:
    tuple.__new__ is _make without its Python frame, a fifth of the keyword call)."""
    return tuple.__new__(
        RecipientResult,
        (
            rcpt.request_id,
            rcpt.idx,
            outcome.code,
            provider,
            outcome.provider_message_id,
            outcome.detail,
            now,  # due_at
            rcpt.provider_index,
            rcpt.attempts + 1,  # attempts
            0 if outcome.code == 0 else rcpt.parts,  # refund_parts
            False,  # unsent
        ),
    )


def backoff(base_s: float, attempt: int, jitter: float | None = None) -> float:
    """Delay before attempt `attempt + 1`: base doubling per attempt, ±20% jitter
    (one jitter per batch, so the recipients of a batch stay together)."""
    factor = random.uniform(0.8, 1.2) if jitter is None else jitter
    return float(base_s * (2 ** max(0, attempt - 1)) * factor)


class Dispatcher:
    """Worker pool over the store's queued requests."""

    def __init__(
        self,
        store: Store,
        providers: Mapping[str, Provider],
        provider_configs: Mapping[str, ProviderConfig],
        accounts: Mapping[str, AccountConfig],
        config: DispatchConfig,
        clock: Clock,
        on_done: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.providers = providers
        self.provider_configs = provider_configs
        self.accounts = accounts
        self.config = config
        self.clock = clock
        self.on_done = on_done  # a request finished: its Not report is due
        self.breakers = {
            name: CircuitBreaker(pc.circuit_failures, pc.circuit_cooldown_s)
            for name, pc in provider_configs.items()
        }
        # What the store (and /metrics' provider_up) was last told of each provider.
        self._told_up: dict[str, bool] = {}
        # Requests this dispatcher is working on (their leases are renewed), and
        # those whose lease another instance took over (work on them stops).
        self._held: set[int] = set()
        self._lost: set[int] = set()
        self._progress: dict[int, _Progress] = {}  # per request, while process() has it

    async def _tell_up(self, name: str, up: bool, error: str | None = None) -> None:
        """Record a provider going down (circuit open, credentials refused) or up."""
        if self._told_up.get(name, True) == up:
            return
        self._told_up[name] = up
        try:
            await self.store.set_provider_state(name, up, self.clock.time(), error)
        except StoreUnavailable:
            self._told_up.pop(name, None)  # tell it again next time

    # -- the loop --------------------------------------------------------

    async def renew_leases(self) -> None:
        """Extend the leases of the requests in progress, all in one write; note
        those another instance took over (after a pause longer than the lease)."""
        held = sorted(self._held)
        if not held:
            return
        try:
            kept = await self.store.renew_leases(held, self.config.lease_s)
        except StoreUnavailable as err:
            log.error("dispatch: leases not renewed, store unavailable: %s", err)
            return
        lost = set(held) - kept
        if lost:
            log.error("requests %s: lease lost (another instance took them over)", _ids(lost))
            self._lost |= lost

    async def _renew_every(self, stopping: asyncio.Event) -> None:
        # A third of the lease: two renewals may fail before another instance may claim.
        while not stopping.is_set():
            await nap(stopping, stopping, self.config.lease_s / 3)
            await self.renew_leases()

    async def run(self, wake: asyncio.Event, stopping: asyncio.Event, grace_s: float) -> None:
        """Serve until `stopping`; then let in-flight batches finish for `grace_s`."""
        slots = asyncio.Semaphore(self.config.workers)
        tasks: set[asyncio.Task[None]] = set()
        renewer = asyncio.create_task(self._renew_every(stopping))
        while not stopping.is_set():
            wake.clear()
            while not stopping.is_set():
                await slots.acquire()
                try:
                    claims, first = await self.store.claim_requests_with_page(
                        self.clock.time(), self.config.lease_s, self.config.batch_requests, PAGE
                    )
                except StoreUnavailable as err:
                    log.error("dispatch: store unavailable: %s", err)
                    claims, first = [], None
                if not claims:
                    slots.release()
                    break
                task = asyncio.create_task(self.process(claims, first))
                tasks.add(task)

                def finished(task: asyncio.Task[None]) -> None:
                    tasks.discard(task)
                    slots.release()
                    # Requests may be due again soon (a retry): look again.
                    wake.set()

                task.add_done_callback(finished)
            await nap(wake, stopping, await self._idle_time())
            if self.config.linger_s > 0 and wake.is_set():
                # Woken by new work: let the rest of a burst arrive first.
                await nap(stopping, stopping, self.config.linger_s)
        if tasks:
            log.info("dispatch: stopping, waiting for %d batch(es) in flight", len(tasks))
            _, late = await asyncio.wait(tasks, timeout=grace_s)
            for task in late:
                task.cancel()  # their recipients stay `submitting`: in doubt at next start
            if late:
                await asyncio.wait(late)
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer

    async def _idle_time(self) -> float:
        try:
            due = await self.store.next_due()
        except StoreUnavailable:
            return 5.0
        return 60.0 if due is None else max(0.05, min(60.0, due - self.clock.time()))

    async def run_once(self) -> int:
        """Process every request due now (tests); return how many batches ran."""
        count = 0
        while claims := await self.store.claim_requests(
            self.clock.time(), 60.0, self.config.batch_requests
        ):
            await self.process(claims)
            count += 1
        return count

    # -- a batch of requests ---------------------------------------------

    async def process(
        self, claims: Sequence[ClaimedRequest], first: list[PendingRecipient] | None = None
    ) -> None:
        """Send what is due in these claimed requests, together; never raises.

        Requests claimed together share provider calls: the same provider gets
        the recipients of all of them in as few requests as it allows. `first`:
        their first page, when the claim read it (claim_requests_with_page).
        """
        by_id = {c.id: c for c in claims}
        self._held.update(by_id)
        try:
            # Where each request's last page ended: the next page reads on from there.
            after: dict[int, int] = {}
            while True:
                for request_id in self._lost & set(by_id):
                    del by_id[request_id]  # another instance has it now
                now = self.clock.time()
                if first is not None and len(by_id) == len(claims):  # none lost since
                    pending, first = first, None
                else:
                    first = None
                    pending = await self.store.pending_recipients(list(by_id), now, PAGE, after)
                if not pending:
                    if not after:
                        break
                    # One more look from the start: recipients of earlier pages due
                    # again now (a failover, a probe's wait) go in this pass too.
                    after = {}
                    continue
                for rcpt in pending:
                    after[rcpt.request_id] = rcpt.idx  # by idx within a request: the last wins
                # A short page holds everything due now: its last write may finish
                # the requests too (one commit, and no reads to find nothing left).
                finish = list(by_id) if len(pending) < PAGE else []
                self._finished(by_id, await self._send_page(by_id, pending, finish))
                if not by_id:
                    break
            if by_id:
                done = await self.store.finish_if_done(list(by_id), self.clock.time())
                self._finished(by_id, done)
            if by_id:
                await self.store.release_requests(list(by_id), None, None, count_attempt=False)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if len(claims) > 1 and not isinstance(err, StoreUnavailable):
                # Find the culprit: each request alone, with its own attempt count.
                log.exception("dispatch: a batch of %d requests failed; one by one", len(claims))
                for claim in claims:
                    await self.process([claim])
                return
            await self._failed(claims, err)
        finally:
            self._held.difference_update(c.id for c in claims)
            self._lost.difference_update(c.id for c in claims)
            for c in claims:
                self._progress.pop(c.id, None)

    def _finished(self, by_id: dict[int, ClaimedRequest], done: Sequence[int]) -> None:
        """Requests the store marked done (their Not is due): out of `by_id`."""
        for request_id in done:
            self._log_done(by_id.pop(request_id))
        if done:
            self.on_done()

    async def _failed(self, claims: Sequence[ClaimedRequest], err: Exception) -> None:
        ids = [c.id for c in claims]
        try:
            if isinstance(err, StoreUnavailable):
                # The store failed (disk full, locked), not these requests: retry at
                # a steady pace without counting an attempt, so that the work
                # resumes soon after the store does, however long the outage lasted.
                log.error("%s: store unavailable: %s", _tags(claims), err, extra=_fields(claims))
                due = self.clock.time() + backoff(self.config.provider_wait_s, 1)
                await self.store.release_requests(ids, due, str(err)[:500], False)
                return
            (claimed,) = claims
            attempts = claimed.attempts + 1
            tag, fields = request_tag(claimed.id, claimed.email_id), _fields(claims)
            log.exception("%s: unexpected error (attempt %d)", tag, attempts, extra=fields)
            if attempts >= self.config.max_attempts:
                await self.store.quarantine(claimed.id, f"{type(err).__name__}: {err}")
                log.error(
                    "%s: quarantined after %d attempts (`mailbridge queue retry %d` once fixed)",
                    tag, attempts, claimed.id, extra=fields,
                )  # fmt: skip
            else:
                due = self.clock.time() + backoff(self.config.provider_wait_s, attempts)
                await self.store.release_requests(ids, due, str(err)[:500], True)
        except StoreUnavailable:
            pass  # the leases expire by themselves and the requests are claimed again

    async def _send_page(
        self,
        claims: Mapping[int, ClaimedRequest],
        pending: Sequence[PendingRecipient],
        finish: Sequence[int] = (),
    ) -> list[int]:
        """Send a page of recipients and record every result. With `finish`, the
        page's last write also finishes those requests when it can (one write:
        no provider call, or one chunk); returns the requests it finished."""
        now = self.clock.time()
        final: list[RecipientResult] = []
        groups: dict[str, list[_Item]] = defaultdict(list)
        stopped = await self._stop_listed(claims, pending)
        # Half-open providers this page probes -> room left in the probe call.
        probing: dict[str, int] = {}
        fixed_routes: dict[str, list[str]] = {}  # accounts whose route is one provider
        # What the checks below found once and holds for the whole page (`now` is
        # fixed): requests within their validity on a fixed route, providers whose
        # circuit is closed. Their recipients skip the checks.
        plain: dict[int, list[str]] = {}
        healthy: set[str] = set()
        new_item = tuple.__new__
        for rcpt in pending:
            claimed = claims[rcpt.request_id]
            route = plain.get(rcpt.request_id)
            if (
                route is not None
                and rcpt.provider_index < len(route)
                and route[rcpt.provider_index] in healthy
                and not (stopped and (claimed.account, rcpt.number) in stopped)
            ):
                # _Item's fields in order, by tuple.__new__: one per recipient.
                groups[route[rcpt.provider_index]].append(new_item(_Item, (claimed, rcpt, route)))
                continue
            if stopped and (claimed.account, rcpt.number) in stopped:
                # The number answered STOP to this account since the email came in.
                final.append(
                    RecipientResult(
                        request_id=rcpt.request_id,
                        idx=rcpt.idx,
                        code=Code.BLACKLISTED,
                        detail="STOP",
                    )
                )
                continue
            if now >= self._expires_at(claimed):
                # SPEC 8: a late alarm SMS is worse than a Not that says it failed.
                why = f"not sent within dispatch.validity_s ({self.config.validity_s:g}s)"
                final.append(
                    RecipientResult(
                        request_id=rcpt.request_id, idx=rcpt.idx, code=Code.ERROR, detail=why
                    )
                )
                continue
            route = self._route(claimed.account, rcpt.number, fixed_routes)
            if claimed.account in fixed_routes:
                plain[rcpt.request_id] = route
            if rcpt.provider_index >= len(route):
                configured = claimed.account in self.accounts
                why = "no route" if configured else "account no longer configured"
                final.append(
                    RecipientResult(
                        request_id=rcpt.request_id, idx=rcpt.idx, code=Code.ERROR, detail=why
                    )
                )
                continue
            name = route[rcpt.provider_index]
            breaker = self.breakers[name]
            if name in probing:
                if probing[name] == 0:
                    # One call only while half-open: the rest wait for its answer,
                    # which process() reads at once (due now) after this page.
                    wait = f"{name}: waiting for the probe of its circuit"
                    final.append(
                        RecipientResult(
                            request_id=rcpt.request_id,
                            idx=rcpt.idx,
                            code=None,
                            provider=name,
                            detail=wait,
                            due_at=now,
                            provider_index=rcpt.provider_index,
                            attempts=rcpt.attempts,
                            unsent=True,
                        )
                    )
                    continue
                probing[name] -= 1
            elif breaker.half_open(now):
                breaker.probe(now)
                probing[name] = self.providers[name].max_batch - 1
            elif not breaker.allows(now):
                # Skipped without an attempt: the next provider at once, or wait
                # for this one, within the outage hold only (SPEC 8).
                last = rcpt.provider_index + 1 >= len(route)
                hold_end = min(self._hold_ends_at(claimed), self._expires_at(claimed))
                if last and now >= hold_end:
                    why = f"{name} is down (its circuit is open) past dispatch.outage_hold_s"
                    final.append(
                        RecipientResult(
                            request_id=rcpt.request_id,
                            idx=rcpt.idx,
                            code=Code.ERROR,
                            provider=name,
                            detail=why,
                        )
                    )
                    continue
                final.append(
                    RecipientResult(
                        request_id=rcpt.request_id,
                        idx=rcpt.idx,
                        code=None,
                        provider=name,
                        provider_message_id=None,
                        detail=f"{name}: circuit open",
                        due_at=min(breaker.open_until, hold_end) if last else now,
                        provider_index=rcpt.provider_index if last else rcpt.provider_index + 1,
                        attempts=rcpt.attempts if last else 0,
                        unsent=True,
                    )
                )
                continue
            else:
                healthy.add(name)  # closed: stays so through this page
            groups[name].append(_Item(claimed, rcpt, route))
        chunks = [
            (name, group[start : start + self.providers[name].max_batch])
            for name, group in groups.items()
            for start in range(0, len(group), self.providers[name].max_batch)
        ]
        done: list[int] = []
        if final:
            done = await self.store.record_results(final, now, finish=() if chunks else finish)
            numbers = {(r.request_id, r.idx): r.number for r in pending}
            self._log_failures(claims, numbers, final)
        if not chunks:
            return done
        if len(chunks) == 1:
            return await self._send_chunk(*chunks[0], finish=finish)
        slots = asyncio.Semaphore(self.config.calls_in_flight)

        async def send(name: str, chunk: Sequence[_Item]) -> None:
            async with slots:
                await self._send_chunk(name, chunk)

        # Every chunk runs to its end (none is cut off mid-call by another's
        # failure, which would leave its recipients in doubt); then the first
        # error, if any, goes up to process().
        errors = [
            e
            for e in await asyncio.gather(*(send(n, c) for n, c in chunks), return_exceptions=True)
            if e is not None
        ]
        for error in errors:
            if isinstance(error, asyncio.CancelledError):
                raise error
        if errors:
            raise errors[0]
        return []

    def _route(self, keyid: str, number: str, fixed: dict[str, list[str]]) -> list[str]:
        """route_for, once per account (in `fixed`) when the account names one provider."""
        route = fixed.get(keyid)
        if route is not None:
            return route
        account = self.accounts.get(keyid)
        if account is None:
            return []
        if account.provider is not None:
            route = fixed[keyid] = route_for(account, number)
            return route
        return route_for(account, number)

    def _expires_at(self, claimed: ClaimedRequest) -> float:
        """After this no SMS of the request goes to a provider (dispatch.validity_s)."""
        return claimed.first_due_at + self.config.validity_s

    def _hold_ends_at(self, claimed: ClaimedRequest) -> float:
        """Until this its recipients may wait for a provider that is down as a whole."""
        return claimed.first_due_at + self.config.outage_hold_s

    async def _stop_listed(
        self, claims: Mapping[int, ClaimedRequest], pending: Sequence[PendingRecipient]
    ) -> set[tuple[str, str]]:
        """(account, number) pairs of these recipients on their account's STOP list."""
        by_account: dict[str, set[str]] = defaultdict(set)
        for rcpt in pending:
            by_account[claims[rcpt.request_id].account].add(rcpt.number)
        found: set[tuple[str, str]] = set()
        for account, numbers in by_account.items():
            for number in await self.store.blacklisted(account, sorted(numbers)):
                found.add((account, number))
        return found

    async def _reserve(self, chunk: Sequence[_Item]) -> tuple[list[_Item], list[RecipientResult]]:
        """Take credit for the chunk; recipients beyond their account's credit get 12."""
        ok: list[_Item] = []
        refused: list[RecipientResult] = []
        if all(self.accounts[k].credit is None for k in {i.claimed.account for i in chunk}):
            return list(chunk), refused  # no credit to take (the usual account)
        by_account: dict[str, list[_Item]] = defaultdict(list)
        for item in chunk:
            by_account[item.claimed.account].append(item)
        for keyid, items in by_account.items():
            account = self.accounts[keyid]
            if account.credit is None or await self.store.reserve_credit(
                keyid, sum(i.rcpt.parts for i in items), account.credit
            ):
                ok += items
                continue
            for item in items:
                if await self.store.reserve_credit(keyid, item.rcpt.parts, account.credit):
                    ok.append(item)
                else:
                    r = item.rcpt
                    refused.append(
                        RecipientResult(
                            request_id=r.request_id,
                            idx=r.idx,
                            code=Code.NO_CREDIT,
                            detail="no credit",
                        )
                    )
        return ok, refused

    async def _send_chunk(
        self, name: str, group: Sequence[_Item], finish: Sequence[int] = ()
    ) -> list[int]:
        """One provider call for `group` and its results recorded (with `finish`
        as in _send_page); returns the requests finished."""
        provider = self.providers[name]
        chunk, results = await self._reserve(group)
        calls: list[tuple[str, float]] = []  # (provider, seconds) for the call histogram
        if chunk:
            kept = await self.store.mark_submitting(
                [(i.rcpt.request_id, i.rcpt.idx) for i in chunk], name, self.config.lease_s
            )
            lost = {i.claimed.id for i in chunk} - kept
            if lost:
                # Taken over by another instance while we waited: it sends them
                # (their reserved credit stays used: credit errs on sending less).
                gone = [i.claimed for i in chunk if i.claimed.id in lost]
                log.error("%s: lease lost; their SMS are not sent here", _tags(gone),
                          extra=_fields(gone))  # fmt: skip
                self._lost |= lost
                chunk = [i for i in chunk if i.claimed.id in kept]
                results = [r for r in results if r.request_id in kept]
            messages = self._messages(chunk)
        if chunk:
            started = time.perf_counter()
            try:
                outcomes = await self._submit(provider, messages)
            except ProviderAuthError as err:
                calls.append((name, time.perf_counter() - started))
                await self._tell_up(name, False, f"credentials refused: {err}"[:500])
                held = [i.claimed for i in chunk]
                log.error(
                    "%s: PROVIDER %s REFUSED OUR CREDENTIALS: %s -- fix the configuration;"
                    " the SMS stay queued until dispatch.validity_s (%gs), then get 999",
                    _tags(held), name, err, self.config.validity_s, extra=_fields(held),
                )  # fmt: skip
                # Not the recipients' fault: hold them without counting an attempt,
                # until the validity ends (then 999: SPEC 8).
                hold = min(
                    self.clock.time() + self.config.provider_wait_s,
                    min(self._expires_at(i.claimed) for i in chunk),
                )
                results += [
                    RecipientResult(
                        request_id=i.rcpt.request_id,
                        idx=i.rcpt.idx,
                        code=None,
                        provider=name,
                        provider_message_id=None,
                        detail=f"credentials refused: {err}",
                        due_at=hold,
                        provider_index=i.rcpt.provider_index,
                        attempts=i.rcpt.attempts,
                        refund_parts=i.rcpt.parts,
                        unsent=True,  # refused: nothing reached the provider
                    )
                    for i in chunk
                ]
            else:
                calls.append((name, time.perf_counter() - started))
                now = self.clock.time()
                ok = any(not o.retry for o in outcomes)
                if self.breakers[name].record(ok, now):
                    log.error(
                        "provider %s failed %d calls in a row: skipped for %.0fs",
                        name, self.breakers[name].failures, self.breakers[name].cooldown_s,
                    )  # fmt: skip
                    await self._tell_up(name, False, outcomes[0].detail[:500] if outcomes else None)
                elif ok:
                    await self._tell_up(name, True)
                jitter = random.uniform(0.8, 1.2)
                if [o.key for o in outcomes] == [m.key for m in messages]:
                    answers: Iterable[Outcome] = outcomes  # in the batch's order: no lookup
                else:
                    by_key = {o.key: o for o in outcomes}
                    answers = [
                        by_key.get(m.key)
                        or Outcome(
                            m.key, Code.ERROR, detail="no answer for this message", retry=True
                        )
                        for m in messages
                    ]
                decide, append = self._decide, results.append
                for item, outcome in zip(chunk, answers, strict=True):
                    if outcome.retry:
                        append(decide(name, item, outcome, now, jitter))
                    else:
                        append(final_result(item.rcpt, name, outcome, now))  # _decide's first case
        done = await self.store.record_results(results, self.clock.time(), calls, finish)
        self._log_call(name, group, len(chunk), results)
        return done

    def _log_call(
        self, name: str, group: Sequence[_Item], submitted: int, results: Sequence[RecipientResult]
    ) -> None:
        """One line per provider call (with each request's running total at most
        every PROGRESS_S, else at DEBUG), and a WARNING per request and distinct
        failure with the provider's own words."""
        # One pass over each list (a 1000-recipient call): consecutive items share
        # their request, so a claim is looked at once per run, not per recipient.
        claims: dict[int, ClaimedRequest] = {}
        last: ClaimedRequest | None = None
        for claimed, _, _ in group:
            if claimed is not last:
                claims[claimed.id] = last = claimed
        failed: list[RecipientResult] = []
        retried: list[RecipientResult] = []
        accepted_by: dict[int, int] = defaultdict(int)
        for r in results:
            if r.code == 0:
                accepted_by[r.request_id] += 1
            elif r.code is None:
                retried.append(r)
            else:
                failed.append(r)
        accepted = sum(accepted_by.values())
        for rid, n in accepted_by.items():
            self._progress.setdefault(rid, _Progress()).accepted += n
        for r in failed:
            self._progress.setdefault(r.request_id, _Progress()).failed += 1
        now = time.monotonic()
        totals = []
        level = logging.DEBUG
        for rid in claims:
            progress = self._progress.setdefault(rid, _Progress())
            progress.calls += 1
            if now - progress.logged_at >= PROGRESS_S:
                level = logging.INFO
                progress.logged_at = now
            if progress.calls > 1:
                totals.append(f"{progress.accepted} accepted and {progress.failed} failed so far")
        why = ""
        if submitted and retried and not accepted and not failed:
            # The call failed as a whole (an outage, a timeout): say so, in the
            # provider's words, where an operator looks first.
            level = max(level, logging.WARNING)
            why = f"; {retried[0].detail}" if retried[0].detail else ""
        log.log(
            level,
            "%s: %s: %d submitted, %d accepted, %d final other, %d to retry%s%s",
            _tags(claims.values()), name, submitted, accepted, len(failed), len(retried),
            f" ({'; '.join(totals)})" if len(totals) == 1 else "", why,
            extra=_fields(claims.values()),
        )  # fmt: skip
        if failed:
            numbers = {(i.rcpt.request_id, i.rcpt.idx): i.rcpt.number for i in group}
            self._log_failures(claims, numbers, failed)

    def _log_failures(
        self,
        claims: Mapping[int, ClaimedRequest],
        numbers: Mapping[tuple[int, int], str],
        results: Sequence[RecipientResult],
    ) -> None:
        """A WARNING per request and distinct final failure, in the provider's own
        words (SPEC 11): 500 numbers refused alike are one line, not 500."""
        by_failure: dict[tuple[int, int, str, str], list[str]] = defaultdict(list)
        for r in results:
            if r.code is not None and r.code != 0:
                key = (r.request_id, r.code, r.provider or "", r.detail or "(no text)")
                by_failure[key].append(numbers.get((r.request_id, r.idx), "?"))
        for (rid, code, provider, detail), failed_numbers in by_failure.items():
            more = len(failed_numbers) - FAILURES_SHOWN
            log.warning(
                "%s: code %d for %s%s: %s%s",
                _tag(claims[rid]), code, ", ".join(failed_numbers[:FAILURES_SHOWN]),
                f" and {more} more" if more > 0 else "", f"{provider}: " if provider else "",
                detail, extra=_fields([claims[rid]]),
            )  # fmt: skip

    def _log_done(self, claimed: ClaimedRequest) -> None:
        progress = self._progress.pop(claimed.id, _Progress())
        log.info(
            "%s: every recipient has its code (%d accepted, %d failed, %d provider call(s)"
            " from this process)", _tag(claimed), progress.accepted, progress.failed,
            progress.calls, extra=_fields([claimed]),
        )  # fmt: skip

    def _messages(self, chunk: Sequence[_Item]) -> list[SmsMessage]:
        """The chunk's SMS; what a request's messages share is computed once."""
        shared: dict[int, tuple[str, float]] = {}  # request id -> (key prefix, expiry)
        messages = []
        make = partial(tuple.__new__, SmsMessage)  # _make without its Python frame
        for claimed, r, _ in chunk:
            found = shared.get(claimed.id)
            if found is None:
                prefix = f"mb{self.store.instance_id}-{claimed.id}{claimed.token}-"
                found = shared[claimed.id] = (prefix, self._expires_at(claimed))
            # One unpacking of the row (PendingRecipient's order), not a lookup per field.
            _, idx, number, text, encoding, parts, max_parts, _, _, in_doubt = r
            # One per recipient, in SmsMessage's field order.
            messages.append(
                make(
                    (
                        found[0] + str(idx),  # key
                        number,  # to
                        claimed.sender,
                        text,
                        encoding,
                        parts,
                        max_parts,
                        claimed.reference,
                        claimed.id,  # request_id
                        bool(in_doubt),
                        found[1],  # expires_at
                    )
                )
            )
        return messages

    async def _submit(self, provider: Provider, messages: list[SmsMessage]) -> list[Outcome]:
        """Call the provider; turn transient whole-batch failures into per-message
        retry outcomes (ProviderAuthError goes up: it is not the messages' fault)."""
        try:
            return await provider.send(messages)
        except ProviderAuthError:
            raise
        except TemporaryProviderError as err:
            code = Code.OVERFLOW if err.throttled else Code.ERROR
            return [Outcome(m.key, code, detail=str(err), retry=True) for m in messages]
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.exception("provider %s raised", provider.name)
            return [Outcome(m.key, Code.ERROR, detail=repr(err), retry=True) for m in messages]

    def _decide(
        self, name: str, item: _Item, outcome: Outcome, now: float, jitter: float
    ) -> RecipientResult:
        """The outcome of one attempt -> a final code, a retry, or a failover."""
        claimed, rcpt, route = item
        rid, idx = rcpt.request_id, rcpt.idx
        if not outcome.retry:
            return final_result(rcpt, name, outcome, now)
        attempts = rcpt.attempts + 1
        settings = self.provider_configs[name]

        def again(due_at: float, provider_index: int, tries: int, detail: str) -> RecipientResult:
            # Not final: tried again at due_at (this provider or the next one).
            return RecipientResult(
                request_id=rid, idx=idx, code=None, provider=name, detail=detail,
                due_at=due_at, provider_index=provider_index, attempts=tries,
                refund_parts=rcpt.parts, unsent=outcome.unsent,
            )  # fmt: skip

        if attempts < settings.retry_attempts:
            due = now + backoff(settings.retry_backoff_s, attempts, jitter)
            return again(due, rcpt.provider_index, attempts, outcome.detail)
        if rcpt.provider_index + 1 < len(route):
            log.warning(
                "%s: %s failed %d times for %s (%s); failing over to %s",
                _tag(claimed), name, attempts, rcpt.number, outcome.detail,
                route[rcpt.provider_index + 1], extra=_fields([claimed]),
            )  # fmt: skip
            return again(now, rcpt.provider_index + 1, 0, outcome.detail)
        breaker = self.breakers[name]
        if not breaker.allows(now) and now < self._hold_ends_at(claimed):
            # The provider is down as a whole, not refusing this message: wait
            # for it to come back rather than fail the recipient.
            detail = f"{name} is down: {outcome.detail}"
            return again(breaker.open_until, rcpt.provider_index, attempts, detail)
        return RecipientResult(
            request_id=rid,
            idx=idx,
            code=outcome.code,
            provider=name,
            provider_message_id=None,
            detail=outcome.detail,
            due_at=now,
            provider_index=rcpt.provider_index,
            attempts=attempts,
            refund_parts=rcpt.parts,
        )
