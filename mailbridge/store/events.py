"""The store's after-"sent" part (SPEC section 7), once for every backend.

Delivery and reply events, the recipients' delivery status, etatDlr and reply
report rows, the STOP blacklist, the metric counters, the heartbeats and the
providers' state. Plain functions of a `Tx` (store/engine.py), in the SQL
SQLite and PostgreSQL share; the rules they apply come from
mailbridge.feedback.
"""

from __future__ import annotations

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
from mailbridge.model import FINAL_STATUSES, DeliveryEvent, InboundEvent, RecipientResult
from mailbridge.store.engine import Tx

LABEL_SEP = "\x1f"
_FINALS = ",".join(f"'{s}'" for s in FINAL_STATUSES)


def bump(tx: Tx, counts: dict[tuple[str, tuple[str, ...]], float]) -> None:
    """Add to metric counters: {(name, label values): amount}, in this process's
    own rows (`tx.shard`), so that instances never wait on each other's counters."""
    tx.executemany(
        "INSERT INTO counters VALUES (?, ?, ?, ?) ON CONFLICT (name, labels, shard)"
        " DO UPDATE SET value = counters.value + excluded.value",
        ((name, LABEL_SEP.join(labels), tx.shard, n) for (name, labels), n in counts.items() if n),
    )


def observe_calls(
    counts: dict[tuple[str, tuple[str, ...]], float], calls: Sequence[tuple[str, float]]
) -> None:
    """Provider call durations into the histogram's counters (/metrics), in `counts`."""
    for provider, seconds in calls:
        for bound in call_buckets(seconds):
            bucket = (HISTOGRAM + "_bucket", (provider, bound))
            counts[bucket] = counts.get(bucket, 0) + 1
        total = (HISTOGRAM + "_sum", (provider,))
        counts[total] = counts.get(total, 0) + seconds


def counters(tx: Tx) -> list[tuple[str, tuple[str, ...], float]]:
    return [
        (name, tuple(labels.split(LABEL_SEP)) if labels else (), float(value))
        for name, labels, value in tx.execute(
            "SELECT name, labels, sum(value) FROM counters GROUP BY name, labels"
        )
    ]


# -- the receiver's side: store, once --------------------------------------------------


def add_events(tx: Tx, events: Sequence[InboundEvent], now: float) -> list[bool]:
    """Store events not seen before; True for each one that is new."""
    new: list[bool] = []
    counts: dict[tuple[str, tuple[str, ...]], float] = {}
    for e in events:
        dlr = isinstance(e, DeliveryEvent)
        status = e.status if isinstance(e, DeliveryEvent) else None
        cur = tx.execute(
            "INSERT INTO events (kind, provider_type, dedupe_key, message_id, number,"
            " to_addr, status, text, occurred_at, received_at, raw, state, next_try_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,'new',?) ON CONFLICT DO NOTHING",
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
    bump(tx, counts)
    return new


# -- the worker's side: match, apply, queue mails --------------------------------------


def _names(rules: FeedbackRules, provider_type: str) -> tuple[str, ...]:
    return rules.providers_by_type.get(provider_type, ()) or ("",)


def _find_recipient(
    tx: Tx, rules: FeedbackRules, provider_type: str,
    message_id: str | None, number: str | None,
) -> tuple[int, int] | None:  # fmt: skip
    """The recipient an event names: by the provider's message id (and the
    number, for ids a whole batch shares), else the most recent one sent to
    that number through a provider of that type."""
    names = _names(rules, provider_type)
    marks = ",".join("?" * len(names))
    if message_id is not None:
        row = tx.execute(
            "SELECT request_id, idx FROM recipients WHERE provider_message_id = ?"
            f" AND (CAST(? AS TEXT) IS NULL OR number = ?) AND provider IN ({marks})"
            " ORDER BY request_id DESC, idx LIMIT 1",
            (message_id, number, number, *names),
        ).fetchone()
        if row is None:
            # One part of a multipart SMS (SMPP: each part has its own id).
            row = tx.execute(
                "SELECT r.request_id, r.idx FROM message_parts m JOIN recipients r"
                " ON r.request_id = m.request_id AND r.idx = m.idx WHERE m.message_id = ?"
                f" AND (CAST(? AS TEXT) IS NULL OR r.number = ?) AND r.provider IN ({marks})"
                " ORDER BY r.request_id DESC, r.idx LIMIT 1",
                (message_id, number, number, *names),
            ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))
    if number is None:
        return None
    row = tx.execute(
        "SELECT request_id, idx FROM recipients WHERE number = ? AND code = 0"
        f" AND provider IN ({marks}) ORDER BY request_id DESC, idx LIMIT 1",
        (number, *names),
    ).fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


def _apply_delivery(
    tx: Tx, request_id: int, idx: int, status: str, text: str, at: float,
    now: float,
) -> None:  # fmt: skip
    """`at`: the provider's time of the status (the etatDlr date); `now`: ours."""
    tx.execute(
        "UPDATE recipients SET dlr_status = ?, dlr_text = ?, dlr_at = ? WHERE request_id = ?"
        f" AND idx = ? AND (dlr_status IS NULL OR dlr_status NOT IN ({_FINALS}))",
        (status, text, at, request_id, idx),
    )
    if is_final(status):
        _mark_ready_if_all_final(tx, request_id, now)


def _mark_ready_if_all_final(tx: Tx, request_id: int, now: float) -> None:
    """Every sent recipient of a waiting request has its final status: mail now."""
    tx.execute(
        "UPDATE requests SET dlr_due_at = ? WHERE id = ? AND dlr_state = 'waiting'"
        " AND NOT EXISTS (SELECT 1 FROM recipients WHERE request_id = ? AND code = 0"
        f"  AND (dlr_status IS NULL OR dlr_status NOT IN ({_FINALS})))",
        (now, request_id, request_id),
    )


def _apply_reply(
    tx: Tx, rules: FeedbackRules, event_id: int, number: str, text: str,
    request_id: int, now: float, done: FeedbackPass,
) -> None:  # fmt: skip
    account, mail_from = tx.execute(
        "SELECT account, mail_from FROM requests WHERE id = ?", (request_id,)
    ).fetchone()
    if is_stop(text):
        tx.execute(
            "INSERT INTO blacklist VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (account, number, now, f"STOP reply {event_id}"),
        )
        done.stops.append(f"request {request_id}: {number}")
    to = rules.reply_to.get(account) or mail_from
    if to:
        tx.execute(
            "INSERT INTO reports (request_id, kind, to_addr, state, created_at, due_at, event_id)"
            " VALUES (?, 'reply', ?, 'pending', ?, ?, ?)",
            (request_id, to, now, now, event_id),
        )
        done.reply_reports += 1


def _by_message_id(
    tx: Tx, rules: FeedbackRules, wanted: Sequence[tuple[str, str | None, str]], *, parts: bool
) -> dict[tuple[str, str | None, str], tuple[int, int]]:
    """The recipients of many (message id, number or None, provider type) at
    once, chosen as `_find_recipient` chooses: the provider's type, the number
    when given, then the highest request id and the lowest idx. `parts`: by
    the id of one part of a multipart SMS (message_parts)."""
    ids = sorted({mid for mid, _, _ in wanted})
    candidates: dict[str, list[tuple[str | None, int, int, str | None]]] = {}
    sql = (
        "SELECT m.message_id, r.number, r.request_id, r.idx, r.provider FROM message_parts m"
        " JOIN recipients r ON r.request_id = m.request_id AND r.idx = m.idx"
        " WHERE m.message_id IN ({})"
        if parts
        else "SELECT provider_message_id, number, request_id, idx, provider FROM recipients"
        " WHERE provider_message_id IN ({})"
    )
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        for mid, number, request_id, idx, provider in tx.execute(
            sql.format(",".join("?" * len(chunk))), chunk
        ):
            candidates.setdefault(str(mid), []).append(
                (number, int(request_id), int(idx), provider)
            )
    found: dict[tuple[str, str | None, str], tuple[int, int]] = {}
    for key in set(wanted):
        mid, number, ptype = key
        names = _names(rules, ptype)
        rows = [
            (-request_id, idx)
            for num, request_id, idx, provider in candidates.get(mid, ())
            if provider in names and (number is None or num == number)
        ]
        if rows:
            best = min(rows)
            found[key] = (-best[0], best[1])
    return found


def _match_all(
    tx: Tx, rules: FeedbackRules, rows: Sequence[Any]
) -> dict[int, tuple[int, int] | None]:
    """Event id -> its recipient (or None), for a batch of due events: a few
    statements for the batch where matching by message id, not one per event
    (matching reads recipients that applying the events never changes, so the
    order does not matter)."""
    keyed = {
        int(r[0]): (str(r[3]), r[4], str(r[2])) for r in rows if r[3] is not None
    }  # eid -> (message id, number, provider type)
    by_id = _by_message_id(tx, rules, list(keyed.values()), parts=False)
    missing = [k for k in keyed.values() if k not in by_id]
    by_part = _by_message_id(tx, rules, missing, parts=True) if missing else {}
    matches: dict[int, tuple[int, int] | None] = {}
    for r in rows:
        eid = int(r[0])
        if eid in keyed:
            matches[eid] = by_id.get(keyed[eid]) or by_part.get(keyed[eid])
        else:  # by number alone (replies): the most recent recipient of that number
            matches[eid] = _find_recipient(tx, rules, r[2], None, r[4])
    return matches


def process_events(tx: Tx, now: float, limit: int, rules: FeedbackRules) -> FeedbackPass:
    """Match the due events to their recipients and apply them (see mailbridge.feedback).

    Set-based: the batch is matched in a few statements, and its updates are
    one prepared statement each (executemany), in event order, so that the
    rules apply as one event at a time would: a final status is never
    overwritten and between two finals the first wins. SMPP delivery events
    (a recipient's status is computed from the events matched before it)
    keep their one-at-a-time path."""
    done = FeedbackPass()
    rows = tx.execute(
        "SELECT id, kind, provider_type, message_id, number, status, text, occurred_at,"
        " received_at, tries FROM events WHERE state IN ('new', 'waiting') AND next_try_at <= ?"
        " ORDER BY id LIMIT ?",
        (now, limit),
    ).fetchall()
    if not rows:
        return done
    matches = _match_all(tx, rules, rows)
    orphans: list[tuple[int]] = []
    waiting: list[tuple[float, int]] = []
    matched: list[tuple[int, int, int]] = []
    deliveries: list[tuple[str, str, float, int, int]] = []
    finals: set[int] = set()
    one_by_one: list[tuple[Any, tuple[int, int]]] = []
    for row in rows:
        eid, kind, ptype, message_id, number, status, text, occurred, received, tries = row
        found = matches[int(eid)]
        if found is None:
            if now - received >= EVENT_MAX_AGE_S:
                orphans.append((eid,))
                done.orphans.append(f"{ptype} {kind} {eid} (id {message_id}, number {number})")
            else:
                waiting.append((now + event_retry_delay(tries), eid))
                done.waiting += 1
            continue
        done.matched += 1
        if kind == "dlr" and ptype.startswith("smpp"):
            one_by_one.append((row, found))
            continue
        matched.append((found[0], found[1], eid))
        if kind == "dlr":
            deliveries.append((status, text, occurred or received, found[0], found[1]))
            if is_final(status):
                finals.add(found[0])
        else:
            one_by_one.append((row, found))
    tx.executemany("UPDATE events SET state = 'orphan' WHERE id = ?", orphans)
    tx.executemany(
        "UPDATE events SET state = 'waiting', tries = tries + 1, next_try_at = ? WHERE id = ?",
        waiting,
    )
    tx.executemany(
        "UPDATE events SET state = 'matched', request_id = ?, idx = ? WHERE id = ?", matched
    )
    tx.executemany(
        "UPDATE recipients SET dlr_status = ?, dlr_text = ?, dlr_at = ? WHERE request_id = ?"
        f" AND idx = ? AND (dlr_status IS NULL OR dlr_status NOT IN ({_FINALS}))",
        deliveries,
    )
    for request_id in sorted(finals):
        _mark_ready_if_all_final(tx, request_id, now)
    for row, (request_id, idx) in one_by_one:
        eid, kind, ptype, _, number, status, text, occurred, received, _ = row
        if kind == "dlr":  # SMPP
            tx.execute(
                "UPDATE events SET state = 'matched', request_id = ?, idx = ? WHERE id = ?",
                (request_id, idx, eid),
            )
            at = occurred or received
            status, text, at = _whole_message(tx, request_id, idx, status, text, at)
            _apply_delivery(tx, request_id, idx, status, text, at, now)
        else:
            _apply_reply(tx, rules, eid, number, text, request_id, now, done)
    return done


def _whole_message(
    tx: Tx, request_id: int, idx: int, status: str, text: str, at: float
) -> tuple[str, str, float]:
    """The status of a recipient whose SMS went in several parts, each with its
    own id and receipt (SPEC 10): DELIVRE once every part is, else the first
    final failure to arrive; until then in progress. A single part: as it is."""
    (stored,) = tx.execute(
        "SELECT provider_message_id FROM recipients WHERE request_id = ? AND idx = ?",
        (request_id, idx),
    ).fetchone()
    ids = set(str(stored or "").split())
    if len(ids) < 2:
        return status, text, at
    finals: dict[str, tuple[str, str, float]] = {}  # part id -> its first final report
    for mid, st, words, occurred, received in tx.execute(
        "SELECT message_id, status, text, occurred_at, received_at FROM events"
        " WHERE request_id = ? AND idx = ? AND kind = 'dlr' AND state = 'matched' ORDER BY id",
        (request_id, idx),
    ):
        if mid in ids and is_final(st) and mid not in finals:
            finals[mid] = (str(st), str(words or ""), float(occurred or received))
    failures = [f for f in finals.values() if f[0] != "DELIVRE"]
    if failures:
        return failures[0]
    if len(finals) == len(ids):
        return "DELIVRE", "", max(f[2] for f in finals.values())
    return "EN_COURS", f"{len(finals)} of {len(ids)} parts delivered", at


def record_parts(tx: Tx, results: Iterable[RecipientResult]) -> None:
    """Each part id of the multipart SMS among `results` (provider_message_id
    holding several space-separated ids, as the SMPP provider writes it)."""
    rows = [
        (mid, r.request_id, r.idx, part)
        for r in results
        if r.code == 0 and r.provider_message_id and " " in r.provider_message_id
        for part, mid in enumerate(r.provider_message_id.split(), 1)
    ]
    tx.executemany("INSERT INTO message_parts VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING", rows)


def retry_waiting_events(tx: Tx, message_ids: Iterable[str | None], now: float) -> None:
    """The dispatcher recorded these provider message ids: waiting events for
    them are due now (a report that arrived before its message is matched);
    a multipart SMS's value names each part's id."""
    ids = sorted({part for m in message_ids if m for part in m.split()})
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        tx.execute(
            "UPDATE events SET next_try_at = ? WHERE state = 'waiting'"
            f" AND message_id IN ({','.join('?' * len(chunk))})",
            (now, *chunk),
        )


def start_delivery_reports(tx: Tx, request_id: int, now: float) -> None:
    """The request is done: etatDlr mails become due for its sent recipients."""
    tx.execute(
        "UPDATE requests SET dlr_state = 'waiting', dlr_due_at = NULL WHERE id = ?"
        " AND dlr_to IS NOT NULL AND EXISTS"
        " (SELECT 1 FROM recipients WHERE request_id = ? AND code = 0)",
        (request_id, request_id),
    )
    _mark_ready_if_all_final(tx, request_id, now)


def queue_delivery_reports(tx: Tx, now: float, rules: FeedbackRules) -> int:
    """Queue the etatDlr mails that are due; return how many."""
    delay, max_age = rules.delivery_report_delay_s, rules.delivery_report_max_age_s
    due = tx.execute(
        "SELECT id, dlr_to, done_at FROM requests WHERE dlr_state = 'waiting'"
        " AND coalesce(dlr_due_at, done_at + ?) <= ?",
        (delay, now),
    ).fetchall()
    queued = 0
    for request_id, to, done_at in due:
        ready = [
            idx
            for (idx,) in tx.execute(
                "SELECT idx FROM recipients WHERE request_id = ? AND code = 0"
                f" AND dlr_report IS NULL AND dlr_status IN ({_FINALS}) ORDER BY idx",
                (request_id,),
            )
        ]
        if ready:
            (report_id,) = tx.one(
                "INSERT INTO reports (request_id, kind, to_addr, state, created_at, due_at)"
                " VALUES (?, 'dlr', ?, 'pending', ?, ?) RETURNING id",
                (request_id, to, now, now),
            )
            tx.executemany(
                "UPDATE recipients SET dlr_report = ? WHERE request_id = ? AND idx = ?",
                ((report_id, request_id, idx) for idx in ready),
            )
            queued += 1
        left = tx.execute(
            "SELECT 1 FROM recipients WHERE request_id = ? AND code = 0 AND dlr_report IS NULL"
            " LIMIT 1",
            (request_id,),
        ).fetchone()
        if left is None or now - (done_at or now) >= max_age:
            tx.execute("UPDATE requests SET dlr_state = 'complete' WHERE id = ?", (request_id,))
        else:  # the rest follow in a later mail
            tx.execute("UPDATE requests SET dlr_due_at = ? WHERE id = ?", (now + delay, request_id))
    return queued


def next_feedback_due(tx: Tx, rules: FeedbackRules) -> float | None:
    row = tx.execute(
        "SELECT min(t) FROM ("
        " SELECT min(next_try_at) AS t FROM events WHERE state IN ('new', 'waiting')"
        " UNION ALL"
        " SELECT min(coalesce(dlr_due_at, done_at + ?)) FROM requests WHERE dlr_state = 'waiting')"
        " AS due",
        (rules.delivery_report_delay_s,),
    ).fetchone()
    return None if row is None or row[0] is None else float(row[0])


# -- report data ------------------------------------------------------------------------


def delivery_rows(tx: Tx, report_id: int) -> list[tuple[int, str, str, str, float]]:
    """(idx, tel as written, status, provider's text, time) of one etatDlr mail."""
    return [
        (int(i), str(t), str(s), str(x or ""), float(a or 0))
        for i, t, s, x, a in tx.execute(
            "SELECT r.idx, r.tel, r.dlr_status, r.dlr_text, r.dlr_at FROM reports p"
            " JOIN recipients r ON r.request_id = p.request_id AND r.dlr_report = p.id"
            " WHERE p.id = ? ORDER BY r.idx",
            (report_id,),
        )
    ]


def reply_data(tx: Tx, report_id: int) -> tuple[str, str, str, bool] | None:
    """(number as the request wrote it, E.164, text, is STOP) of one reply mail."""
    row = tx.execute(
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


def blacklisted(tx: Tx, account: str, numbers: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(numbers), 500):
        chunk = list(numbers[start : start + 500])
        found.update(
            n
            for (n,) in tx.execute(
                "SELECT number FROM blacklist WHERE account = ?"
                f" AND number IN ({','.join('?' * len(chunk))})",
                (account, *chunk),
            )
        )
    return found


def beat(tx: Tx, process: str, now: float, pid: int) -> None:
    tx.execute(
        "INSERT INTO heartbeats VALUES (?, ?, ?)"
        " ON CONFLICT (process) DO UPDATE SET at = excluded.at, pid = excluded.pid",
        (process, now, pid),
    )


def heartbeats(tx: Tx) -> dict[str, float]:
    return {str(p): float(at) for p, at in tx.execute("SELECT process, at FROM heartbeats")}


def set_provider_state(tx: Tx, name: str, up: bool, now: float, error: str | None) -> None:
    tx.execute(
        "INSERT INTO provider_state VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
        " since = CASE WHEN provider_state.up = excluded.up THEN provider_state.since"
        "  ELSE excluded.since END,"
        " up = excluded.up,"
        " last_error = coalesce(excluded.last_error, provider_state.last_error)",
        (name, int(up), now, error),
    )


def gauges(tx: Tx, now: float) -> dict[str, Any]:
    """The state-derived metrics: recipients waiting by state, reports by state,
    providers up, the worker's last heartbeat, events waiting for their message."""
    queue = dict(
        tx.execute(
            "SELECT CASE WHEN submitting + in_doubt > 0 THEN 'in_doubt'"
            " WHEN due_at > ? THEN 'deferred' ELSE 'due' END, count(*)"
            " FROM recipients WHERE code IS NULL GROUP BY 1",
            (now,),
        ).fetchall()
    )
    reports = dict(tx.execute("SELECT state, count(*) FROM reports GROUP BY state").fetchall())
    providers = {str(n): bool(up) for n, up in tx.execute("SELECT name, up FROM provider_state")}
    beats = heartbeats(tx)
    waiting = tx.execute("SELECT count(*) FROM events WHERE state = 'waiting'").fetchone()[0]
    return {
        "queue": queue,
        "reports": reports,
        "providers": providers,
        "heartbeats": beats,
        "events_waiting": int(waiting),
    }
