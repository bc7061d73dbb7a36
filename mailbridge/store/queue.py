"""The queue's rules, once for every backend: requests, recipients, leases, reports.

Plain functions of a `Tx` (store/engine.py), each run inside the engine's
transaction, in the SQL that SQLite and PostgreSQL share (the `Dialect` says
the rest: the database clock, row locks for claims). The business rules
live here and nowhere else:
- a duplicate emailId (per account) is stored as an Ack 1 request that sends
  nothing (the Ack is still mailed; SPEC section 5);
- a request is done once every recipient has a code; its Not (or plain mode's
  text report, only when a number failed with `reports: failures`) is queued
  in the same transaction;
- a recipient's final code is never replaced (a late writer that lost its
  lease cannot undo another's result);
- leases: `claimed_by` and `claimed_until` on the database's clock; a lease
  that expired is taken back by the next claim, and the recipients its holder
  was submitting become in doubt (sent again with the same idempotency key);
  every completion is fenced by its owner (`AND claimed_by = ?`);
- credit is reserved before a submission and refunded for every part not
  accepted; a report row missing its recipients' codes reports 999.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Mapping, Sequence
from functools import partial
from typing import Any

from mailbridge.model import (
    Admission,
    ClaimedRequest,
    NewRequest,
    PendingRecipient,
    RecipientResult,
    ReportData,
    ReportJob,
)
from mailbridge.store import StoreStatus
from mailbridge.store import events as ev
from mailbridge.store.engine import Tx

Counts = dict[tuple[str, tuple[str, ...]], float]
# A completion by `?` (the owner): on its own lease, or on a row nobody holds
# (harmless); never on another process's lease.
FENCE = "(claimed_by = ? OR claimed_by IS NULL)"
IDS_PER_STATEMENT = 500  # ids in one IN (...): far under SQLite's and PostgreSQL's limits


def runs(idxs: list[int]) -> list[tuple[int, int]]:
    """Sorted runs of consecutive idx: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    if idxs and idxs == list(range(idxs[0], idxs[0] + len(idxs))):
        return [(idxs[0], idxs[-1])]  # already one run (the usual page): no loop
    out: list[tuple[int, int]] = []
    for idx in sorted(set(idxs)):
        if out and out[-1][1] == idx - 1:
            out[-1] = (out[-1][0], idx)
        else:
            out.append((idx, idx))
    return out


def _count(counts: Counts, name: str, *labels: str, by: float = 1) -> None:
    key = (name, labels)
    counts[key] = counts.get(key, 0) + by


# -- intake ------------------------------------------------------------------------------


_INSERT_REPORT = (
    "INSERT INTO reports (request_id, kind, to_addr, state, created_at, due_at)"
    " VALUES (?, ?, ?, 'pending', ?, ?)"
)


def add_report(tx: Tx, request_id: int, kind: str, to: str, now: float) -> None:
    tx.execute(_INSERT_REPORT, (request_id, kind, to, now, now))


def add_request(tx: Tx, req: NewRequest) -> Admission:
    """Store an accepted email; a duplicate emailId makes it an Ack 1 request."""
    ack = req.ack_code
    (request_id,) = tx.one(
        "INSERT INTO requests (account, email_id, ack_code, state, numbered, sender, reference,"
        " not_to, mail_from, client_ip, message_id, received_at, due_at, token, plain_reports,"
        " dlr_to, first_due_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
        (
            req.account, req.email_id, ack, "queued" if ack == 0 else "done", int(req.numbered),
            req.sender, req.reference, req.not_to, req.mail_from, req.client_ip, req.message_id,
            req.received_at, req.due_at, secrets.token_hex(3), req.plain_reports, req.dlr_to,
            req.due_at,
        ),
    )  # fmt: skip
    if ack == 0 and req.email_id is not None:
        # Unique per account (a constraint, so two instances at once: one wins).
        first = tx.one(
            "INSERT INTO email_ids VALUES (?, ?, ?) ON CONFLICT DO NOTHING RETURNING request_id",
            (req.account, req.email_id, request_id),
        )
        if first is None:
            ack = 1
            tx.execute(
                "UPDATE requests SET ack_code = 1, state = 'done', done_at = ? WHERE id = ?",
                (req.received_at, request_id),
            )
    if req.ack_to:
        add_report(tx, request_id, "ack", req.ack_to, req.received_at)
    counts: Counts = {}
    _count(counts, "mailbridge_emails_total", {0: "accepted", 1: "duplicate"}.get(ack, "invalid"))
    if ack == 0:
        for r in req.recipients:  # codes known at intake: no provider
            if r.code is not None:
                _count(counts, "mailbridge_sms_total", "none", str(r.code))
        tx.executemany(
            "INSERT INTO recipients (request_id, idx, tel, number, text, encoding, parts,"
            " max_parts, code, done_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            # A RecipientDraft is (tel, number, text, encoding, parts, max_parts, code).
            (
                (request_id, i, *r, None if r.code is None else req.received_at)
                for i, r in enumerate(req.recipients, start=1)
            ),
        )  # fmt: skip
        if all(r.code is not None for r in req.recipients):  # nothing to send: done now
            finish_if_done(tx, [request_id], req.received_at, owner=None)
    ev.bump(tx, counts)
    return Admission(int(request_id), ack)


# -- leases --------------------------------------------------------------------------------


def release_owned(tx: Tx, owner: str | None) -> int:
    """Give back the leases of `owner` (None: everyone's) and put its recipients
    in doubt; how many requests it held. Right at start only where one
    instance owns the store (SQLite), or for a process known to be dead."""
    where, params = ("claimed_by = ?", (owner,)) if owner else ("claimed_until IS NOT NULL", ())
    held = tx.all(f"SELECT id FROM requests WHERE {where}", params)
    ids = [int(i) for (i,) in held]
    _in_doubt(tx, ids)
    tx.execute(f"UPDATE requests SET claimed_until = NULL, claimed_by = NULL WHERE {where}", params)
    tx.execute(f"UPDATE reports SET claimed_until = NULL, claimed_by = NULL WHERE {where}", params)
    return len(ids)


def _in_doubt(tx: Tx, request_ids: Sequence[int]) -> None:
    """An attempt of a holder that is gone may have reached the provider."""
    for start in range(0, len(request_ids), 500):
        chunk = request_ids[start : start + 500]
        tx.execute(
            "UPDATE recipients SET in_doubt = 1, submitting = 0 WHERE submitting = 1"
            f" AND request_id IN ({','.join('?' * len(chunk))})",
            chunk,
        )


def claim_requests(
    tx: Tx, now: float, lease_s: float, limit: int, owner: str
) -> list[ClaimedRequest]:
    """A lease on up to `limit` due requests, oldest first; expired leases are
    taken back here (their holder is presumed dead)."""
    d = tx.dialect
    rows = tx.all(
        "SELECT id, claimed_until FROM requests WHERE state = 'queued' AND due_at <= ?"
        f" AND (claimed_until IS NULL OR claimed_until < {d.now}) ORDER BY due_at, id LIMIT ?"
        f"{d.skip_locked}",
        (now, limit),
    )
    if not rows:
        return []
    ids = [int(r[0]) for r in rows]
    _in_doubt(tx, [int(r[0]) for r in rows if r[1] is not None])
    marks = ",".join("?" * len(ids))
    claimed = tx.all(
        f"UPDATE requests SET claimed_until = {d.now} + ?, claimed_by = ? WHERE id IN ({marks})"
        " RETURNING id, account, email_id, sender, reference, attempts, received_at, token,"
        " coalesce(first_due_at, received_at)",
        (lease_s, owner, *ids),
    )
    requests = (
        ClaimedRequest(
            id=r[0],
            account=r[1],
            email_id=r[2],
            sender=r[3],
            reference=r[4],
            attempts=r[5],
            received_at=r[6],
            token=r[7],
            first_due_at=r[8],
        )
        for r in claimed
    )
    return sorted(requests, key=lambda c: c.id)


def renew_leases(tx: Tx, request_ids: Sequence[int], lease_s: float, owner: str) -> set[int]:
    """Extend this owner's leases; the ids it still holds (the others were taken)."""
    kept: set[int] = set()
    for start in range(0, len(request_ids), 500):
        chunk = list(request_ids[start : start + 500])
        kept.update(
            int(i)
            for (i,) in tx.all(
                f"UPDATE requests SET claimed_until = {tx.dialect.now} + ? WHERE claimed_by = ?"
                f" AND id IN ({','.join('?' * len(chunk))}) RETURNING id",
                (lease_s, owner, *chunk),
            )
        )
    return kept


def next_due(tx: Tx) -> float | None:
    """When the earliest queued request or pending report becomes due (or its
    lease ends)."""
    row = tx.one(
        "SELECT min(t) FROM ("
        " SELECT min(CASE WHEN claimed_until > due_at THEN claimed_until ELSE due_at END) AS t"
        "  FROM requests WHERE state = 'queued'"
        " UNION ALL"
        " SELECT min(CASE WHEN claimed_until > due_at THEN claimed_until ELSE due_at END)"
        "  FROM reports WHERE state = 'pending') AS due"
    )
    return None if row is None or row[0] is None else float(row[0])


def pending_recipients(
    tx: Tx,
    request_ids: Sequence[int],
    now: float,
    limit: int,
    after: Mapping[int, int] | None = None,
) -> list[PendingRecipient]:
    rows: list[Any] = []
    for request_id in request_ids:
        if len(rows) >= limit:
            break
        # From `after` on, by the primary key: the finished rows before it are not read.
        rows += tx.all(
            "SELECT request_id, idx, number, text, encoding, parts, max_parts,"
            " provider_index, attempts, in_doubt + submitting FROM recipients"
            " WHERE request_id = ? AND idx > ? AND code IS NULL AND due_at <= ?"
            " ORDER BY idx LIMIT ?",
            (request_id, (after or {}).get(request_id, 0), now, limit - len(rows)),
        )
    # The columns are PendingRecipient's fields in order: no per-field copy, and
    # tuple.__new__ is _make without its Python frame per row.
    return list(map(partial(tuple.__new__, PendingRecipient), rows))


def mark_submitting(
    tx: Tx, recipients: Sequence[tuple[int, int]], provider: str, lease_s: float, owner: str
) -> set[int]:
    """Record that these (request id, idx) are about to go to `provider`; renew
    the leases. Only requests this owner still holds: their ids are returned,
    and the caller must not submit the others."""
    by_request: dict[int, list[int]] = {}
    for request_id, idx in recipients:
        by_request.setdefault(request_id, []).append(idx)
    kept = renew_leases(tx, sorted(by_request), lease_s, owner)
    tx.executemany(
        "UPDATE recipients SET submitting = 1, provider = ?"
        " WHERE request_id = ? AND idx BETWEEN ? AND ?",
        (
            (provider, request_id, first, last)
            for request_id, idxs in by_request.items()
            if request_id in kept
            for first, last in runs(idxs)
        ),
    )
    return kept


def reserve_credit(tx: Tx, account: str, parts: int, credit: int) -> bool:
    tx.execute("INSERT INTO credits VALUES (?, 0) ON CONFLICT DO NOTHING", (account,))
    row = tx.one(
        "UPDATE credits SET used = used + ? WHERE account = ? AND used + ? <= ? RETURNING used",
        (parts, account, parts, credit),
    )
    return row is not None


def record_results(
    tx: Tx, results: Sequence[RecipientResult], now: float, calls: Sequence[tuple[str, float]]
) -> None:
    """Codes (or the next retry) for recipients; refunds; counters. A code
    already set is kept (the first final word wins)."""
    # Recipients with the same outcome (500 numbers accepted by CM in one call)
    # are updated by runs of idx: one statement instead of one per recipient.
    # Key: (request_id, (code, provider, provider_message_id, detail, due_at,
    # provider_index, attempts), in doubt); the middle is a slice of the tuple.
    same: dict[tuple[Any, ...], list[int]] = {}
    for r in results:
        key = (r[0], r[2:9], r[2] is None and not r[10])
        idxs = same.get(key)
        if idxs is None:
            same[key] = [r[1]]
        else:
            idxs.append(r[1])
    tx.executemany(
        "UPDATE recipients SET code = ?, provider = coalesce(?, provider),"
        " provider_message_id = coalesce(?, provider_message_id), detail = ?, due_at = ?,"
        " provider_index = ?, attempts = ?, submitting = 0,"
        # A retry is in doubt unless the attempt certainly reached no provider.
        " in_doubt = CASE WHEN CAST(? AS INTEGER) = 1 THEN 1 ELSE in_doubt END,"
        " done_at = CASE WHEN CAST(? AS INTEGER) IS NULL THEN NULL"
        "  ELSE CAST(? AS DOUBLE PRECISION) END"
        " WHERE request_id = ? AND idx BETWEEN ? AND ? AND code IS NULL",
        (
            (*fields, int(doubt), fields[0], now, request_id, first, last)
            for (request_id, fields, doubt), idxs in same.items()
            for first, last in runs(idxs)
        ),
    )
    counts: Counts = {}
    refunds: dict[int, int] = {}
    by_code: dict[tuple[str | None, int], int] = {}
    for (_, fields, _), idxs in same.items():  # per group, not per recipient
        if fields[0] is not None:
            outcome = (fields[1], fields[0])  # (provider, code)
            by_code[outcome] = by_code.get(outcome, 0) + len(idxs)
    for r in [r for r in results if r.refund_parts]:
        refunds[r.request_id] = refunds.get(r.request_id, 0) + r.refund_parts
    for (provider, code), n in by_code.items():
        _count(counts, "mailbridge_sms_total", provider or "none", str(code), by=n)
    ev.observe_calls(counts, calls)
    ev.bump(tx, counts)
    message_ids = {fields[2] for _, fields, _ in same}
    if any(m and " " in m for m in message_ids):  # multipart ids (SMPP) only
        ev.record_parts(tx, results)
    # A delivery report that came before its message id was recorded is due now
    # (a CM batch's messages share one id: each distinct id once).
    ev.retry_waiting_events(tx, message_ids, now)
    tx.executemany(
        "UPDATE credits SET used = CASE WHEN used > ? THEN used - ? ELSE 0 END"
        " WHERE account = (SELECT account FROM requests WHERE id = ?)",
        ((parts, parts, request_id) for request_id, parts in refunds.items()),
    )


def release_requests(
    tx: Tx,
    request_ids: Sequence[int],
    due_at: float | None,
    error: str | None,
    count_attempt: bool,
    owner: str,
) -> None:
    """Give this owner's leases back; due again at `due_at` (None: when the first
    pending recipient of each is)."""
    tx.executemany(
        "UPDATE requests SET claimed_until = NULL, claimed_by = NULL,"
        " due_at = coalesce(CAST(? AS DOUBLE PRECISION), (SELECT min(due_at) FROM recipients"
        "  WHERE request_id = requests.id AND code IS NULL), due_at),"
        " last_error = coalesce(CAST(? AS TEXT), last_error), attempts = attempts + ?"
        f" WHERE id = ? AND {FENCE}",
        ((due_at, error, int(count_attempt), request_id, owner) for request_id in request_ids),
    )


def finish_if_done(tx: Tx, request_ids: Sequence[int], now: float, owner: str | None) -> list[int]:
    """Mark done those of these requests whose every recipient has a code,
    queueing each one's Not (or plain mode's report) and starting its delivery
    reports; fenced by `owner` (None: at intake or by an operator, where nobody
    holds it). Returns the requests finished, in the order given (their
    reports' ids follow it)."""
    fence, fenced = ("", ()) if owner is None else (f" AND {FENCE}", (owner,))
    done: list[int] = []
    for start in range(0, len(request_ids), IDS_PER_STATEMENT):
        chunk = list(dict.fromkeys(request_ids[start : start + IDS_PER_STATEMENT]))
        # One statement for the batch; NOT EXISTS stops at a request's first
        # pending recipient (a deferred 100 000-line request is not read through).
        rows = tx.all(
            "UPDATE requests SET state = 'done', done_at = ?, claimed_until = NULL,"
            f" claimed_by = NULL WHERE id IN ({','.join('?' * len(chunk))})"
            f" AND state = 'queued'{fence} AND NOT EXISTS (SELECT 1 FROM recipients"
            "  WHERE recipients.request_id = requests.id AND code IS NULL)"
            " RETURNING id, not_to, plain_reports, dlr_to",
            (now, *chunk, *fenced),
        )
        finished = {int(r[0]): r[1:] for r in rows}
        ordered = [i for i in chunk if i in finished]
        reports: list[tuple[int, str, str, float, float]] = []
        for request_id in ordered:
            not_to, plain_reports, dlr_to = finished[request_id]
            if dlr_to is not None:  # without it no etatDlr is ever due
                ev.start_delivery_reports(tx, request_id, now)
            if not not_to:
                continue
            if plain_reports is None:
                reports.append((request_id, "not", not_to, now, now))
            elif plain_reports == "all" or tx.one(
                "SELECT 1 FROM recipients WHERE request_id = ? AND code != 0 LIMIT 1",
                (request_id,),
            ):
                # Plain mode (SPEC section 9): with "failures", only when a number failed.
                reports.append((request_id, "plain", not_to, now, now))
        if reports:
            tx.executemany(_INSERT_REPORT, reports)
        done += ordered
    return done


def quarantine(tx: Tx, request_id: int, error: str, owner: str) -> None:
    tx.execute(
        "UPDATE requests SET state = 'quarantined', claimed_until = NULL, claimed_by = NULL,"
        f" last_error = ? WHERE id = ? AND {FENCE}",
        (error, request_id, owner),
    )


# -- reports -------------------------------------------------------------------------------


def claim_reports(tx: Tx, now: float, limit: int, lease_s: float, owner: str) -> list[ReportJob]:
    d = tx.dialect
    ids = [
        int(i)
        for (i,) in tx.all(
            "SELECT id FROM reports WHERE state = 'pending' AND due_at <= ?"
            f" AND (claimed_until IS NULL OR claimed_until < {d.now}) ORDER BY id LIMIT ?"
            f"{d.skip_locked}",
            (now, limit),
        )
    ]
    if not ids:
        return []
    rows = tx.all(
        f"UPDATE reports SET claimed_until = {d.now} + ?, claimed_by = ?"
        f" WHERE id IN ({','.join('?' * len(ids))})"
        " RETURNING id, request_id, kind, to_addr, created_at, attempts",
        (lease_s, owner, *ids),
    )
    jobs = (
        ReportJob(id=r[0], request_id=r[1], kind=r[2], to_addr=r[3], created_at=r[4], attempts=r[5])
        for r in rows
    )
    return sorted(jobs, key=lambda j: j.id)


def report_data(tx: Tx, request_id: int) -> ReportData:
    row = tx.one(
        "SELECT email_id, ack_code, numbered, message_id, plain_reports FROM requests WHERE id = ?",
        (request_id,),
    )
    if row is None:
        raise LookupError(f"request {request_id} not found")
    rows = tx.all(
        "SELECT tel, coalesce(code, 999) FROM recipients WHERE request_id = ? ORDER BY idx",
        (request_id,),
    )
    return ReportData(
        email_id=row[0],
        ack_code=row[1],
        numbered=bool(row[2]),
        rows=[(t, c) for t, c in rows],
        in_reply_to=row[3],
        plain_reports=row[4],
    )


def report_data_many(
    tx: Tx, request_ids: Sequence[int], rows_of: Collection[int] | None = None
) -> dict[int, ReportData]:
    """report_data of several requests: two statements per chunk of ids, not
    two per request; a request not found is left out. Recipient rows are read
    for the requests in `rows_of` only (None: all); the others get none."""
    found: dict[int, ReportData] = {}
    unique = list(dict.fromkeys(request_ids))
    for start in range(0, len(unique), IDS_PER_STATEMENT):
        chunk = unique[start : start + IDS_PER_STATEMENT]
        marks = ",".join("?" * len(chunk))
        wanted = chunk if rows_of is None else [i for i in chunk if i in rows_of]
        rows: dict[int, list[tuple[str, int]]] = {i: [] for i in chunk}
        if len(wanted) == 1:  # the rows as read: no copy of each (a CSV's 100 000)
            rows[wanted[0]] = tx.all(
                "SELECT tel, coalesce(code, 999) FROM recipients WHERE request_id = ? ORDER BY idx",
                (wanted[0],),
            )
        elif wanted:
            for request_id, tel, code in tx.all(
                "SELECT request_id, tel, coalesce(code, 999) FROM recipients"
                f" WHERE request_id IN ({','.join('?' * len(wanted))})"
                " ORDER BY request_id, idx",
                tuple(wanted),
            ):
                rows[request_id].append((tel, code))
        for request_id, email_id, ack_code, numbered, message_id, plain in tx.all(
            "SELECT id, email_id, ack_code, numbered, message_id, plain_reports FROM requests"
            f" WHERE id IN ({marks})",
            tuple(chunk),
        ):
            found[request_id] = ReportData(
                email_id=email_id,
                ack_code=ack_code,
                numbered=bool(numbered),
                rows=rows[request_id],
                in_reply_to=message_id,
                plain_reports=plain,
            )
    return found


def report_sent(tx: Tx, report_id: int, now: float) -> None:
    """A fact, whoever holds the lease now: not fenced (a fenced-out mark would
    only make another instance deliver the report again)."""
    tx.execute(
        "UPDATE reports SET state = 'sent', sent_at = ?, claimed_until = NULL, claimed_by = NULL,"
        " attempts = attempts + 1 WHERE id = ?",
        (now, report_id),
    )


def reports_sent(tx: Tx, report_ids: Sequence[int], now: float) -> None:
    """report_sent of several reports in one statement."""
    for start in range(0, len(report_ids), IDS_PER_STATEMENT):
        chunk = report_ids[start : start + IDS_PER_STATEMENT]
        tx.execute(
            "UPDATE reports SET state = 'sent', sent_at = ?, claimed_until = NULL,"
            " claimed_by = NULL, attempts = attempts + 1"
            f" WHERE id IN ({','.join('?' * len(chunk))})",
            (now, *chunk),
        )


def report_failed(tx: Tx, report_id: int, due_at: float, error: str, owner: str) -> None:
    tx.execute(
        "UPDATE reports SET due_at = ?, last_error = ?, claimed_until = NULL, claimed_by = NULL,"
        f" attempts = attempts + 1 WHERE id = ? AND {FENCE}",
        (due_at, error, report_id, owner),
    )


def report_given_up(tx: Tx, report_id: int, now: float, error: str) -> None:
    """The report failed for good: kept, state `failed`, until a human retries it."""
    tx.execute(
        "UPDATE reports SET state = 'failed', last_error = ?, claimed_until = NULL,"
        " claimed_by = NULL, attempts = attempts + 1, sent_at = ? WHERE id = ?",
        (error, now, report_id),
    )


# -- status --------------------------------------------------------------------------------


def status(tx: Tx, now: float, size: tuple[int, int | None]) -> StoreStatus:
    """Counts by state and the last errors, for `mailbridge status`."""
    requests = {
        str(state): int(n)
        for state, n in tx.all(
            "SELECT CASE WHEN state = 'queued' AND due_at > ? THEN 'waiting' ELSE state END,"
            " count(*) FROM requests GROUP BY 1",
            (now,),
        )
    }
    reports = {
        str(s): int(n) for s, n in tx.all("SELECT state, count(*) FROM reports GROUP BY state")
    }
    (pending,) = tx.one("SELECT count(*) FROM recipients WHERE code IS NULL")
    errors = [
        f"request {i}: {e}"
        for i, e in tx.all(
            "SELECT id, last_error FROM requests WHERE last_error IS NOT NULL"
            " AND state != 'done' ORDER BY id DESC LIMIT 5"
        )
    ] + [
        f"report {i} to {t}: {e}"
        for i, t, e in tx.all(
            "SELECT id, to_addr, last_error FROM reports WHERE last_error IS NOT NULL"
            " AND state IN ('pending', 'failed') ORDER BY id DESC LIMIT 5"
        )
    ]
    return StoreStatus(
        requests=requests,
        recipients_pending=int(pending),
        reports=reports,
        last_errors=errors,
        database_bytes=size[0],
        database_max_bytes=size[1],
    )
