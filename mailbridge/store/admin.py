"""The operator's view of the store: `mailbridge queue …`, `reports …`, `purge` (SPEC 11).

Plain functions of a `Tx` in the SQL both backends share, safe while the
daemon runs (each is one short transaction; nothing here waits for a lease):
- `queue_list` / `queue_show`: unfinished requests, like `mailq`;
- `queue_retry`: held, deferred or quarantined work due now;
- `queue_drop`: every pending recipient gets 999 and the Not goes out (the
  client is always told); recipients a worker is submitting right now are
  left to it (their outcome is a fact) and reported;
- `reports_list` / `reports_retry` / `reports_drop`;
- `purge`: finished requests older than the retention lose their rows; their
  (account, emailId) stays, so a late duplicate still gets Ack 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mailbridge.store import queue as q
from mailbridge.store.engine import Tx


@dataclass(frozen=True, kw_only=True)
class QueueEntry:
    """One unfinished request, as `queue list` shows it."""

    id: int
    account: str
    email_id: str | None
    state: str  # queued | quarantined
    received_at: float
    due_at: float
    pending: int
    total: int
    waiting: str  # why it waits, in words
    last_error: str | None


@dataclass(frozen=True)
class RequestDetail:
    """One request, each recipient and each report, for `queue show`."""

    request: dict[str, Any]
    recipients: list[dict[str, Any]] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)


def _why(state: str, due_at: float, claimed_until: float | None, now: float, detail: str) -> str:
    if state == "quarantined":
        return "quarantined after repeated errors: `queue retry` once fixed"
    if claimed_until is not None and claimed_until > now:
        return "being sent"
    if due_at > now:
        return f"due in {due_at - now:.0f}s" + (f" ({detail})" if detail else "")
    return "due now"


def queue_list(
    tx: Tx, now: float, state: str | None, account: str | None, limit: int
) -> list[QueueEntry]:
    where = ["state != 'done'"]
    params: list[Any] = []
    if state is not None:
        where.append("state = ?")
        params.append(state)
    if account is not None:
        where.append("account = ?")
        params.append(account)
    rows = tx.all(
        "SELECT r.id, r.account, r.email_id, r.state, r.received_at, r.due_at, r.claimed_until,"
        " r.last_error,"
        " (SELECT count(*) FROM recipients c WHERE c.request_id = r.id AND c.code IS NULL),"
        " (SELECT count(*) FROM recipients c WHERE c.request_id = r.id),"
        " (SELECT max(c.detail) FROM recipients c WHERE c.request_id = r.id AND c.code IS NULL)"
        f" FROM requests r WHERE {' AND '.join(where)} ORDER BY r.id LIMIT ?",
        (*params, limit),
    )
    return [
        QueueEntry(
            id=int(rid),
            account=str(acc),
            email_id=eid,
            state=str(st),
            received_at=float(rec),
            due_at=float(due),
            pending=int(pending),
            total=int(total),
            waiting=_why(str(st), float(due), claimed, now, str(detail or "")),
            last_error=err,
        )  # fmt: skip
        for rid, acc, eid, st, rec, due, claimed, err, pending, total, detail in rows
    ]


def queue_show(tx: Tx, request_id: int) -> RequestDetail | None:
    cur = tx.execute("SELECT * FROM requests WHERE id = ?", (request_id,))
    row = cur.fetchone()
    if row is None:
        return None
    names = [d[0] for d in cur.description]
    request = dict(zip(names, row, strict=True))
    recipients = [
        dict(zip(("idx", "tel", "number", "provider", "code", "provider_message_id",
                  "delivery", "attempts", "in_doubt", "detail"), r, strict=True))
        for r in tx.all(
            "SELECT idx, tel, number, provider, code, provider_message_id, dlr_status,"
            " attempts, in_doubt, detail FROM recipients WHERE request_id = ? ORDER BY idx",
            (request_id,),
        )
    ]  # fmt: skip
    reports = [
        dict(zip(("id", "kind", "to", "state", "attempts", "last_error"), r, strict=True))
        for r in tx.all(
            "SELECT id, kind, to_addr, state, attempts, last_error FROM reports"
            " WHERE request_id = ? ORDER BY id",
            (request_id,),
        )
    ]
    return RequestDetail(request, recipients, reports)


def queue_retry(tx: Tx, request_ids: Sequence[int] | None, now: float) -> int:
    """Due now: held, deferred or quarantined requests and their waiting recipients."""
    where, params = _ids_where(request_ids)
    tx.execute(
        f"UPDATE recipients SET due_at = ? WHERE code IS NULL AND request_id IN"
        f" (SELECT id FROM requests WHERE state IN ('queued', 'quarantined'){where})",
        (now, *params),
    )
    rows = tx.all(
        "UPDATE requests SET state = 'queued', due_at = ?, attempts = 0"
        f" WHERE state IN ('queued', 'quarantined'){where} RETURNING id",
        (now, *params),
    )
    return len(rows)


def queue_drop(tx: Tx, request_id: int, now: float, why: str) -> tuple[int, int] | None:
    """Every pending recipient not being submitted gets 999; the Not is queued
    once none is left. (dropped, still in flight), or None for no such request."""
    if tx.one("SELECT 1 FROM requests WHERE id = ? AND state != 'done'", (request_id,)) is None:
        return None
    dropped = tx.execute(
        "UPDATE recipients SET code = 999, detail = ?, done_at = ?"
        " WHERE request_id = ? AND code IS NULL AND submitting = 0",
        (why, now, request_id),
    ).rowcount
    (in_flight,) = tx.one(
        "SELECT count(*) FROM recipients WHERE request_id = ? AND code IS NULL", (request_id,)
    )
    tx.execute(
        "UPDATE requests SET state = 'queued' WHERE id = ? AND state = 'quarantined'",
        (request_id,),
    )
    q.finish_if_done(tx, [request_id], now, owner=None)
    return int(dropped), int(in_flight)


def reports_list(tx: Tx, state: str | None, limit: int) -> list[dict[str, Any]]:
    where, params = ("WHERE p.state = ?", (state,)) if state else ("", ())
    rows = tx.all(
        "SELECT p.id, p.request_id, r.email_id, p.kind, p.to_addr, p.state, p.attempts,"
        " p.created_at, p.last_error FROM reports p LEFT JOIN requests r ON r.id = p.request_id"
        f" {where} ORDER BY p.id DESC LIMIT ?",
        (*params, limit),
    )
    keys = ("id", "request", "email_id", "kind", "to", "state", "attempts", "created_at", "error")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def reports_retry(tx: Tx, report_id: int, now: float) -> bool:
    cur = tx.execute(
        "UPDATE reports SET state = 'pending', due_at = ?, attempts = 0, claimed_until = NULL,"
        " claimed_by = NULL WHERE id = ? AND state IN ('failed', 'pending', 'dropped')",
        (now, report_id),
    )
    return int(cur.rowcount) == 1


def reports_drop(tx: Tx, report_id: int, why: str) -> bool:
    cur = tx.execute(
        "UPDATE reports SET state = 'dropped', last_error = ?, claimed_until = NULL"
        " WHERE id = ? AND state IN ('failed', 'pending')",
        (why, report_id),
    )
    return int(cur.rowcount) == 1


def purge(tx: Tx, before: float, limit: int) -> int:
    """Up to `limit` finished requests done before `before` lose their rows (not
    their emailId); how many were purged. The caller repeats until 0."""
    ids = [
        int(i)
        for (i,) in tx.all(
            "SELECT id FROM requests WHERE state = 'done' AND done_at < ?"
            " AND NOT EXISTS (SELECT 1 FROM reports p WHERE p.request_id = requests.id"
            "  AND p.state = 'pending')"
            " AND (dlr_state IS NULL OR dlr_state != 'waiting') ORDER BY id LIMIT ?",
            (before, limit),
        )
    ]
    if not ids:
        return 0
    where, params = _ids_where(ids, column="request_id", prefix="")
    for table in ("recipients", "reports", "events", "message_parts"):
        tx.execute(f"DELETE FROM {table} WHERE {where}", params)
    tx.execute(f"DELETE FROM requests WHERE {_ids_where(ids, 'id', '')[0]}", params)
    return len(ids)


def _ids_where(
    ids: Sequence[int] | None, column: str = "id", prefix: str = " AND "
) -> tuple[str, tuple[int, ...]]:
    if ids is None:
        return "", ()
    return f"{prefix}{column} IN ({','.join('?' * len(ids))})", tuple(ids)


def oldest_pending(tx: Tx) -> float | None:
    (t,) = tx.one("SELECT min(received_at) FROM requests WHERE state != 'done'")
    return None if t is None else float(t)


def provider_errors(tx: Tx) -> list[tuple[str, bool, float, str | None]]:
    """(provider, up, since, last error) of every provider that ever went down."""
    return [
        (str(n), bool(up), float(since), err)
        for n, up, since, err in tx.all(
            "SELECT name, up, since, last_error FROM provider_state ORDER BY name"
        )
    ]
