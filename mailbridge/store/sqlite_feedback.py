"""SQLite queries of the store's after-"sent" part (SPEC section 7).

Delivery and reply events, the recipients' delivery status, etatDlr and reply
report rows, the STOP blacklist, the metric counters, the worker heartbeat and
the providers' state. Plain functions over one connection, each run inside
the store thread's transaction (see sqlite.py); the rules they apply come
from mailbridge.feedback, so that another backend applies the same ones.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from mailbridge.feedback import (
    EVENT_MAX_AGE_S,
    FeedbackPass,
    FeedbackRules,
    event_retry_delay,
    is_final,
    is_stop,
)
from mailbridge.metrics import HISTOGRAM, call_buckets
from mailbridge.model import FINAL_STATUSES, DeliveryEvent, InboundEvent

FEEDBACK_SCHEMA = [
    """CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,                  -- dlr | mo
        provider_type TEXT NOT NULL,
        dedupe_key TEXT NOT NULL UNIQUE,     -- the same callback twice is one row
        message_id TEXT,
        number TEXT,
        to_addr TEXT,                        -- mo: our number or short code
        status TEXT,                         -- dlr: DELIVRE ... or EN_COURS
        text TEXT NOT NULL,
        occurred_at REAL,
        received_at REAL NOT NULL,
        raw TEXT NOT NULL,
        state TEXT NOT NULL,                 -- new | matched | waiting | orphan
        request_id INTEGER,
        idx INTEGER,
        next_try_at REAL NOT NULL,
        tries INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX events_due ON events (state, next_try_at) WHERE state IN ('new', 'waiting')",
    "CREATE INDEX events_waiting_id ON events (message_id) WHERE state = 'waiting'",
    "ALTER TABLE recipients ADD COLUMN dlr_status TEXT",
    "ALTER TABLE recipients ADD COLUMN dlr_text TEXT",
    "ALTER TABLE recipients ADD COLUMN dlr_at REAL",
    "ALTER TABLE recipients ADD COLUMN dlr_report INTEGER",  # the etatDlr report that told it
    "CREATE INDEX recipients_pmid ON recipients (provider_message_id)"
    " WHERE provider_message_id IS NOT NULL",
    "CREATE INDEX recipients_number ON recipients (number, request_id) WHERE code = 0",
    # The queue gauge counts pending recipients without reading the finished ones.
    "CREATE INDEX recipients_pending ON recipients (due_at) WHERE code IS NULL",
    "ALTER TABLE requests ADD COLUMN dlr_to TEXT",  # where etatDlr mails go
    "ALTER TABLE requests ADD COLUMN dlr_state TEXT",  # waiting | complete
    "ALTER TABLE requests ADD COLUMN dlr_due_at REAL",
    "CREATE INDEX requests_dlr ON requests (dlr_due_at) WHERE dlr_state = 'waiting'",
    "ALTER TABLE reports ADD COLUMN event_id INTEGER",  # kind 'reply': the reply
    """CREATE TABLE blacklist (
        account TEXT NOT NULL,
        number TEXT NOT NULL,                -- E.164
        added_at REAL NOT NULL,
        source TEXT NOT NULL,                -- e.g. "STOP reply 12"
        PRIMARY KEY (account, number)
    ) WITHOUT ROWID""",
    """CREATE TABLE counters (
        name TEXT NOT NULL,
        labels TEXT NOT NULL,                -- label values joined by U+001F
        value REAL NOT NULL,
        PRIMARY KEY (name, labels)
    ) WITHOUT ROWID""",
    """CREATE TABLE heartbeats (
        process TEXT PRIMARY KEY,            -- "worker"
        at REAL NOT NULL,
        pid INTEGER NOT NULL
    )""",
    """CREATE TABLE provider_state (
        name TEXT PRIMARY KEY,
        up INTEGER NOT NULL,
        since REAL NOT NULL,
        last_error TEXT
    )""",
]

LABEL_SEP = "\x1f"
_FINALS = ",".join(f"'{s}'" for s in FINAL_STATUSES)


def bump(db: sqlite3.Connection, counts: dict[tuple[str, tuple[str, ...]], float]) -> None:
    """Add to metric counters: {(name, label values): amount}."""
    db.executemany(
        "INSERT INTO counters VALUES (?, ?, ?)"
        " ON CONFLICT (name, labels) DO UPDATE SET value = value + excluded.value",
        ((name, LABEL_SEP.join(labels), n) for (name, labels), n in counts.items() if n),
    )


def observe_calls(db: sqlite3.Connection, calls: Sequence[tuple[str, float]]) -> None:
    """Provider call durations into the histogram's counters (/metrics)."""
    counts: dict[tuple[str, tuple[str, ...]], float] = {}
    for provider, seconds in calls:
        for bound in call_buckets(seconds):
            bucket = (HISTOGRAM + "_bucket", (provider, bound))
            counts[bucket] = counts.get(bucket, 0) + 1
        total = (HISTOGRAM + "_sum", (provider,))
        counts[total] = counts.get(total, 0) + seconds
    bump(db, counts)


def counters(db: sqlite3.Connection) -> list[tuple[str, tuple[str, ...], float]]:
    return [
        (name, tuple(labels.split(LABEL_SEP)) if labels else (), float(value))
        for name, labels, value in db.execute("SELECT name, labels, value FROM counters")
    ]


# -- the receiver's side: store, once --------------------------------------------------


def add_events(db: sqlite3.Connection, events: Sequence[InboundEvent], now: float) -> list[bool]:
    """Store events not seen before; True for each one that is new."""
    new: list[bool] = []
    counts: dict[tuple[str, tuple[str, ...]], float] = {}
    for e in events:
        dlr = isinstance(e, DeliveryEvent)
        status = e.status if isinstance(e, DeliveryEvent) else None
        cur = db.execute(
            "INSERT OR IGNORE INTO events (kind, provider_type, dedupe_key, message_id, number,"
            " to_addr, status, text, occurred_at, received_at, raw, state, next_try_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,'new',?)",
            (
                "dlr" if dlr else "mo", e.provider_type, e.dedupe_key, e.message_id, e.number,
                None if isinstance(e, DeliveryEvent) else e.to, status,
                e.text, e.occurred_at, now, e.raw, now,
            ),
        )  # fmt: skip
        new.append(cur.rowcount == 1)
        if cur.rowcount == 1:
            key = (
                ("mailbridge_delivery_reports_total", (e.provider_type, e.status))
                if isinstance(e, DeliveryEvent)
                else ("mailbridge_replies_total", (e.provider_type,))
            )
            counts[key] = counts.get(key, 0) + 1
    bump(db, counts)
    return new


# -- the worker's side: match, apply, queue mails --------------------------------------


def _names(rules: FeedbackRules, provider_type: str) -> tuple[str, ...]:
    return rules.providers_by_type.get(provider_type, ()) or ("",)


def _find_recipient(
    db: sqlite3.Connection, rules: FeedbackRules, provider_type: str,
    message_id: str | None, number: str | None,
) -> tuple[int, int] | None:  # fmt: skip
    """The recipient an event names: by the provider's message id (and the
    number, for ids a whole batch shares), else the most recent one sent to
    that number through a provider of that type."""
    names = _names(rules, provider_type)
    marks = ",".join("?" * len(names))
    if message_id is not None:
        row = db.execute(
            "SELECT request_id, idx FROM recipients WHERE provider_message_id = ?"
            f" AND (? IS NULL OR number = ?) AND provider IN ({marks})"
            " ORDER BY request_id DESC, idx LIMIT 1",
            (message_id, number, number, *names),
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))
    if number is None:
        return None
    row = db.execute(
        "SELECT request_id, idx FROM recipients WHERE number = ? AND code = 0"
        f" AND provider IN ({marks}) ORDER BY request_id DESC, idx LIMIT 1",
        (number, *names),
    ).fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


def _apply_delivery(
    db: sqlite3.Connection, request_id: int, idx: int, status: str, text: str, at: float,
    now: float,
) -> None:  # fmt: skip
    """`at`: the provider's time of the status (the etatDlr date); `now`: ours."""
    db.execute(
        "UPDATE recipients SET dlr_status = ?, dlr_text = ?, dlr_at = ? WHERE request_id = ?"
        f" AND idx = ? AND (dlr_status IS NULL OR dlr_status NOT IN ({_FINALS}))",
        (status, text, at, request_id, idx),
    )
    if is_final(status):
        _mark_ready_if_all_final(db, request_id, now)


def _mark_ready_if_all_final(db: sqlite3.Connection, request_id: int, now: float) -> None:
    """Every sent recipient of a waiting request has its final status: mail now."""
    db.execute(
        "UPDATE requests SET dlr_due_at = ? WHERE id = ? AND dlr_state = 'waiting'"
        " AND NOT EXISTS (SELECT 1 FROM recipients WHERE request_id = ? AND code = 0"
        f"  AND (dlr_status IS NULL OR dlr_status NOT IN ({_FINALS})))",
        (now, request_id, request_id),
    )


def _apply_reply(
    db: sqlite3.Connection, rules: FeedbackRules, event_id: int, number: str, text: str,
    request_id: int, now: float, done: FeedbackPass,
) -> None:  # fmt: skip
    account, mail_from = db.execute(
        "SELECT account, mail_from FROM requests WHERE id = ?", (request_id,)
    ).fetchone()
    if is_stop(text):
        db.execute(
            "INSERT OR IGNORE INTO blacklist VALUES (?, ?, ?, ?)",
            (account, number, now, f"STOP reply {event_id}"),
        )
        done.stops.append(f"request {request_id}: {number}")
    to = rules.reply_to.get(account) or mail_from
    if to:
        db.execute(
            "INSERT INTO reports (request_id, kind, to_addr, state, created_at, due_at, event_id)"
            " VALUES (?, 'reply', ?, 'pending', ?, ?, ?)",
            (request_id, to, now, now, event_id),
        )
        done.reply_reports += 1


def process_events(
    db: sqlite3.Connection, now: float, limit: int, rules: FeedbackRules
) -> FeedbackPass:
    """Match the due events to their recipients and apply them (see mailbridge.feedback)."""
    done = FeedbackPass()
    rows = db.execute(
        "SELECT id, kind, provider_type, message_id, number, status, text, occurred_at,"
        " received_at, tries FROM events WHERE state IN ('new', 'waiting') AND next_try_at <= ?"
        " ORDER BY id LIMIT ?",
        (now, limit),
    ).fetchall()
    for eid, kind, ptype, message_id, number, status, text, occurred, received, tries in rows:
        found = _find_recipient(db, rules, ptype, message_id, number)
        if found is None:
            if now - received >= EVENT_MAX_AGE_S:
                db.execute("UPDATE events SET state = 'orphan' WHERE id = ?", (eid,))
                done.orphans.append(f"{ptype} {kind} {eid} (id {message_id}, number {number})")
            else:
                db.execute(
                    "UPDATE events SET state = 'waiting', tries = tries + 1, next_try_at = ?"
                    " WHERE id = ?",
                    (now + event_retry_delay(tries), eid),
                )
                done.waiting += 1
            continue
        request_id, idx = found
        db.execute(
            "UPDATE events SET state = 'matched', request_id = ?, idx = ? WHERE id = ?",
            (request_id, idx, eid),
        )
        done.matched += 1
        if kind == "dlr":
            _apply_delivery(db, request_id, idx, status, text, occurred or received, now)
        else:
            _apply_reply(db, rules, eid, number, text, request_id, now, done)
    return done


def retry_waiting_events(
    db: sqlite3.Connection, message_ids: Iterable[str | None], now: float
) -> None:
    """The dispatcher recorded these provider message ids: waiting events for
    them are due now (a report that arrived before its message is matched)."""
    ids = sorted({m for m in message_ids if m})
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        db.execute(
            "UPDATE events SET next_try_at = ? WHERE state = 'waiting'"
            f" AND message_id IN ({','.join('?' * len(chunk))})",
            (now, *chunk),
        )


def start_delivery_reports(db: sqlite3.Connection, request_id: int, now: float) -> None:
    """The request is done: etatDlr mails become due for its sent recipients."""
    db.execute(
        "UPDATE requests SET dlr_state = 'waiting', dlr_due_at = NULL WHERE id = ?"
        " AND dlr_to IS NOT NULL AND EXISTS"
        " (SELECT 1 FROM recipients WHERE request_id = ? AND code = 0)",
        (request_id, request_id),
    )
    _mark_ready_if_all_final(db, request_id, now)


def queue_delivery_reports(db: sqlite3.Connection, now: float, rules: FeedbackRules) -> int:
    """Queue the etatDlr mails that are due; return how many."""
    delay, max_age = rules.delivery_report_delay_s, rules.delivery_report_max_age_s
    due = db.execute(
        "SELECT id, dlr_to, done_at FROM requests WHERE dlr_state = 'waiting'"
        " AND coalesce(dlr_due_at, done_at + ?) <= ?",
        (delay, now),
    ).fetchall()
    queued = 0
    for request_id, to, done_at in due:
        ready = [
            idx
            for (idx,) in db.execute(
                "SELECT idx FROM recipients WHERE request_id = ? AND code = 0"
                f" AND dlr_report IS NULL AND dlr_status IN ({_FINALS}) ORDER BY idx",
                (request_id,),
            )
        ]
        if ready:
            cur = db.execute(
                "INSERT INTO reports (request_id, kind, to_addr, state, created_at, due_at)"
                " VALUES (?, 'dlr', ?, 'pending', ?, ?)",
                (request_id, to, now, now),
            )
            db.executemany(
                "UPDATE recipients SET dlr_report = ? WHERE request_id = ? AND idx = ?",
                ((cur.lastrowid, request_id, idx) for idx in ready),
            )
            queued += 1
        left = db.execute(
            "SELECT 1 FROM recipients WHERE request_id = ? AND code = 0 AND dlr_report IS NULL"
            " LIMIT 1",
            (request_id,),
        ).fetchone()
        if left is None or now - (done_at or now) >= max_age:
            db.execute("UPDATE requests SET dlr_state = 'complete' WHERE id = ?", (request_id,))
        else:  # the rest follow in a later mail
            db.execute("UPDATE requests SET dlr_due_at = ? WHERE id = ?", (now + delay, request_id))
    return queued


def next_feedback_due(db: sqlite3.Connection, rules: FeedbackRules) -> float | None:
    row = db.execute(
        "SELECT min(t) FROM ("
        " SELECT min(next_try_at) AS t FROM events WHERE state IN ('new', 'waiting')"
        " UNION ALL"
        " SELECT min(coalesce(dlr_due_at, done_at + ?)) FROM requests WHERE dlr_state = 'waiting')",
        (rules.delivery_report_delay_s,),
    ).fetchone()
    return None if row is None or row[0] is None else float(row[0])


# -- report data ------------------------------------------------------------------------


def delivery_rows(db: sqlite3.Connection, report_id: int) -> list[tuple[int, str, str, str, float]]:
    """(idx, tel as written, status, provider's text, time) of one etatDlr mail."""
    return [
        (int(i), str(t), str(s), str(x or ""), float(a or 0))
        for i, t, s, x, a in db.execute(
            "SELECT r.idx, r.tel, r.dlr_status, r.dlr_text, r.dlr_at FROM reports p"
            " JOIN recipients r ON r.request_id = p.request_id AND r.dlr_report = p.id"
            " WHERE p.id = ? ORDER BY r.idx",
            (report_id,),
        )
    ]


def reply_data(db: sqlite3.Connection, report_id: int) -> tuple[str, str, str, bool] | None:
    """(number as the request wrote it, E.164, text, is STOP) of one reply mail."""
    row = db.execute(
        "SELECT r.tel, e.number, e.text FROM reports p JOIN events e ON e.id = p.event_id"
        " LEFT JOIN recipients r ON r.request_id = e.request_id AND r.idx = e.idx"
        " WHERE p.id = ?",
        (report_id,),
    ).fetchone()
    if row is None:
        return None
    tel, number, text = row
    return (str(tel or number), str(number), str(text), is_stop(str(text)))


# -- the account's STOP list, the worker's heartbeat, the providers' state --------------


def blacklisted(db: sqlite3.Connection, account: str, numbers: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(numbers), 500):
        chunk = list(numbers[start : start + 500])
        found.update(
            n
            for (n,) in db.execute(
                "SELECT number FROM blacklist WHERE account = ?"
                f" AND number IN ({','.join('?' * len(chunk))})",
                (account, *chunk),
            )
        )
    return found


def beat(db: sqlite3.Connection, process: str, now: float, pid: int) -> None:
    db.execute(
        "INSERT INTO heartbeats VALUES (?, ?, ?)"
        " ON CONFLICT (process) DO UPDATE SET at = excluded.at, pid = excluded.pid",
        (process, now, pid),
    )


def heartbeats(db: sqlite3.Connection) -> dict[str, float]:
    return {str(p): float(at) for p, at in db.execute("SELECT process, at FROM heartbeats")}


def set_provider_state(
    db: sqlite3.Connection, name: str, up: bool, now: float, error: str | None
) -> None:
    db.execute(
        "INSERT INTO provider_state VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
        " since = CASE WHEN up = excluded.up THEN since ELSE excluded.since END,"
        " up = excluded.up, last_error = coalesce(excluded.last_error, last_error)",
        (name, int(up), now, error),
    )


def gauges(db: sqlite3.Connection, now: float) -> dict[str, Any]:
    """The state-derived metrics: recipients waiting by state, reports by state,
    providers up, the worker's last heartbeat, events waiting for their message."""
    queue = dict(
        db.execute(
            "SELECT CASE WHEN submitting OR in_doubt THEN 'in_doubt'"
            " WHEN due_at > ? THEN 'deferred' ELSE 'due' END, count(*)"
            " FROM recipients WHERE code IS NULL GROUP BY 1",
            (now,),
        ).fetchall()
    )
    reports = dict(db.execute("SELECT state, count(*) FROM reports GROUP BY state").fetchall())
    providers = {str(n): bool(up) for n, up in db.execute("SELECT name, up FROM provider_state")}
    beats = heartbeats(db)
    waiting = db.execute("SELECT count(*) FROM events WHERE state = 'waiting'").fetchone()[0]
    return {
        "queue": queue,
        "reports": reports,
        "providers": providers,
        "heartbeats": beats,
        "events_waiting": int(waiting),
    }
