"""CM.com Business Messaging adapter (JSON gateway, `POST .../v1.0/message`).

Input: a batch of `SmsMessage`. Output: one `Outcome` per message, matched by key.

Wire format (seeds/000 and developers.cm.com): one JSON body
`{"messages": {"authentication": {"producttoken": ...}, "msg": [...]}}`; each `msg` carries
`from` (left out when the message has no sender: CM then rejects it with 301, mapped to 33),
`to: [{"number": "0033..."}]`, `body.content`, `dcs` (0 = GSM-7, 8 = UCS-2; explicit, no
`type: auto`, so CM encodes exactly as we counted the parts), `reference` (the tracker,
reduced to CM's 1-32 characters `[A-Za-z0-9_]`; without a tracker the request's own
reference, `message_reference`, so that every status report names its request),
`minimumNumberOfMessageParts: 1`,
`maximumNumberOfMessageParts` (the part limit) and `allowedChannels: ["SMS"]` (never another
channel the account may have).

Limits relied on: at most 1000 `msg` per request (seed) and 1000 `to` per `msg` (CM's own
SDKs). Messages sharing sender, text, encoding, reference and part limit share one `msg`, so
500 numbers with one text is one request, 500 personal texts one request of 500 `msg`, 1001
distinct texts two requests. A number occurs at most once per request, because CM's answer
identifies recipients only by number: a batch naming one number twice costs one more request.
CM returns no message id; its status reports (parse_callback) carry REFERENCE and the number,
so an accepted message's `provider_message_id` is the reference it was sent with.

Failures: CM answers per recipient (`messages[].status` Accepted/Rejected, `messageErrorCode`,
`messageDetails`), classified through `codes.cm_failure`. A whole-request refusal
applies to every message of that request (400 "Insufficient balance" / 102 -> code 12).
Transport errors and HTTP statuses follow the shared rule of providers/http.py: timeouts,
transport errors, HTTP 5xx and 429 make every message of that request and of the requests
not yet sent `retry=True` (code 29 for 429, else 999), and the remaining requests are not
attempted, so a dead gateway costs one timeout per batch; HTTP 401/403/404/405 (wrong token
or wrong `url`: CM answers 405 to anything but its POST) and CM's own errorCode 101/103 are
a refusal: `ProviderAuthError` on the first request, later ones turn the rest of the batch
into retry outcomes.
CM has no idempotency field: an `in_doubt` message is simply sent again, so a duplicate SMS
is possible when the earlier attempt did reach CM.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache, partial
from typing import Any, NamedTuple

import httpx
import orjson

from mailbridge.codes import CM_AUTH_ERROR_CODES, Code, cm_failure, provider_code
from mailbridge.config import CmProviderConfig
from mailbridge.model import IN_PROGRESS, DeliveryEvent, InboundEvent
from mailbridge.providers import CallbackError, Outcome, SmsMessage
from mailbridge.providers.callbacks import (
    dedupe_key,
    e164,
    lower_keys,
    raw_query,
    required,
    timestamp,
)
from mailbridge.providers.http import CallFailure, Failure, HttpRules

MAX_MSG_PER_REQUEST = 1000
MAX_TO_PER_MSG = 1000
_REFERENCE_MAX = 32
_REFERENCE_BAD = re.compile(r"[^A-Za-z0-9_]")  # CM: alphanumeric; its own examples use "_"
_HEADERS = {"Content-Type": "application/json; charset=utf-8", "Accept": "application/json"}

_ENTRY_KEYS = ("to", "status", "parts", "messageDetails", "messageErrorCode")
_GroupKey = tuple[str | None, str, str, str | None, int, int | None]


def cm_number(e164: str) -> str:
    """`+33601020304` -> `0033601020304`, CM's international form."""
    return "00" + e164[1:] if e164.startswith("+") else e164


@lru_cache(maxsize=1024)  # called per message; a batch shares a handful of trackers
def cm_reference(tracker: str | None) -> str | None:
    """The tracker as a CM reference (1-32 of `[A-Za-z0-9_]`), None when nothing is left."""
    if tracker is None:
        return None
    return _REFERENCE_BAD.sub("_", tracker.strip())[:_REFERENCE_MAX] or None


def _match_key(number: str) -> str:
    # CM echoes `to` as sent; also tolerate "+33..." or "33..." so matching never depends on it.
    return number.strip().lstrip("+").lstrip("0")


def _int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _lower(obj: Any) -> dict[str, Any]:
    # CM's JSON keys are case-insensitive; read answers the same way.
    return {str(k).lower(): v for k, v in obj.items()} if isinstance(obj, dict) else {}


class _Msg(NamedTuple):
    """One `msg` object of a request (a NamedTuple: one per personal text)."""

    head: bytes  # its JSON up to the `to` list: `{"from":…,` (see _msg_json)
    text: str
    tail: bytes  # the fields after the text, JSON without braces: `"dcs":0,…`
    reference: str | None  # what its messages were sent with (message_reference)
    items: list[SmsMessage]
    to: list[str]  # the numbers as sent, one per item


def _msg_json(msg: _Msg) -> bytes:
    """The `msg` object as orjson writes {"from", "to", "body", *tail} (the same
    bytes), assembled from orjson-encoded pieces: a dict per personal text and
    per number cost more to build than the whole encoding."""
    if "".join(msg.to).isdigit():  # `00` and E.164 digits: nothing to escape
        to = b'[{"number":"' + b'"},{"number":"'.join(n.encode() for n in msg.to) + b'"}]'
    else:
        to = orjson.dumps([{"number": n} for n in msg.to])
    return b"".join(
        (msg.head, b'"to":', to, b',"body":{"content":', orjson.dumps(msg.text), b"},", msg.tail,
         b"}")
    )  # fmt: skip


@dataclass(slots=True)
class _Request:
    msgs: list[_Msg] = field(default_factory=list)
    open: dict[_GroupKey, _Msg] = field(default_factory=dict)  # last msg of each group
    # match key -> (message, its msg)
    numbers: dict[str, tuple[SmsMessage, _Msg]] = field(default_factory=dict)
    # `to` exactly as sent -> (message, its msg): CM echoes it, so answers match
    # without normalising (numbers stays the rule: this is its shortcut)
    sent: dict[str, tuple[SmsMessage, _Msg]] = field(default_factory=dict)


CM_MAX_VALIDITY_S = 48 * 3600  # seed 000: "la période de validité maximale est de 48 heures"


def cm_validity(expires_at: float) -> str:
    """The end of a message's validity in CM's `validity` form ("… GMT"),
    at most 48 hours ahead (CM's maximum)."""
    until = min(expires_at, time.time() + CM_MAX_VALIDITY_S)
    return datetime.fromtimestamp(until, UTC).strftime("%Y-%m-%d %H:%M:%S GMT")


def message_reference(m: SmsMessage) -> str | None:
    """The CM reference a message is sent with: its tracker, else its request's own
    (the SMS key without the recipient's index: `mb<instance>_<request><token>`)."""
    return cm_reference(m.reference) or cm_reference(m.key.rpartition("-")[0] or None)


class _Planner:
    """What the messages of one batch share, computed once per distinct value:
    a 100 000-recipient request has one reference and one validity."""

    def __init__(self) -> None:
        self._references: dict[tuple[str | None, str], str | None] = {}
        self._validities: dict[float, str] = {}
        self._tails: dict[tuple[int, str | None, int | None, int], bytes] = {}

    def reference(self, m: SmsMessage) -> str | None:
        """message_reference(m), cached on what it depends on."""
        key = (m.reference, m.key.rpartition("-")[0])
        if key not in self._references:
            self._references[key] = message_reference(m)
        return self._references[key]

    def tail(self, m: SmsMessage, reference: str | None, expiry: int | None) -> bytes:
        """The fields of `m`'s `msg` after its text (CM's order), as JSON without
        its braces, shared by value."""
        # Never below the text's own count, so CM cannot cut a text we already cut to fit.
        most = max(m.max_parts, m.parts, 1)
        dcs = 8 if m.encoding == "ucs2" else 0
        key = (dcs, reference, expiry, most)
        found = self._tails.get(key)
        if found is not None:
            return found
        tail: dict[str, Any] = {"dcs": dcs}
        if reference is not None:
            tail["reference"] = reference
        if m.expires_at is not None:
            tail["validity"] = self._validity(m.expires_at)
        tail["minimumNumberOfMessageParts"] = 1
        tail["maximumNumberOfMessageParts"] = most
        tail["allowedChannels"] = ["SMS"]
        encoded = self._tails[key] = orjson.dumps(tail)[1:-1]
        return encoded

    def _validity(self, expires_at: float) -> str:
        if expires_at not in self._validities:
            self._validities[expires_at] = cm_validity(expires_at)
        return self._validities[expires_at]


def plan(batch: Sequence[SmsMessage]) -> list[_Request]:
    """Split a batch into the fewest requests CM allows (first fit, batch order kept)."""
    requests: list[_Request] = []
    planner = _Planner()
    # Consecutive messages mostly share their request, tracker and expiry: the
    # last ones computed are reused while they match (no hashing per message).
    last_tracker: str | None = None
    last_base: str | None = None
    last_reference: str | None = None
    last_expires: float | None = None
    last_expiry: int | None = None
    last_shape: tuple[Any, ...] | None = None
    tail = b""
    heads: dict[str | None, bytes] = {}  # sender -> `{"from":…,`
    new_msg = tuple.__new__  # _Msg._make without its Python frame: one per personal text
    for m in batch:
        # One unpacking, not an attribute lookup per field (SmsMessage's order).
        key_, to, sender, text, encoding, parts, max_parts, tracker, _, _, expires_at = m
        cut = key_.rfind("-")
        base = key_[:cut] if cut >= 0 else ""  # key_.rpartition("-")[0]
        if base != last_base or tracker != last_tracker or last_base is None:
            last_reference = planner.reference(m)
            last_base, last_tracker = base, tracker
        reference = last_reference
        if expires_at != last_expires or last_expiry is None:
            last_expiry = None if expires_at is None else int(expires_at)
            last_expires = expires_at
        expiry = last_expiry
        key: _GroupKey = (sender, text, encoding, reference, max_parts, expiry)
        number = to.strip().lstrip("+").lstrip("0")  # _match_key, inline: once per message
        sent = "00" + to[1:] if to[0] == "+" else to  # cm_number, inline
        found: _Request | None = None
        msg: _Msg | None = None
        for req in requests:
            if number in req.numbers:
                continue
            msg = req.open.get(key)
            if msg is not None and len(msg.items) < MAX_TO_PER_MSG:
                found = req
                break
            msg = None
            if len(req.msgs) < MAX_MSG_PER_REQUEST:
                found = req
                break
        if found is None:
            found = _Request()
            requests.append(found)
        if msg is None:
            # A new `msg` (planner.msg inline: one per personal text).
            shape = (encoding, reference, expiry, max_parts, parts)
            if shape != last_shape:
                tail, last_shape = planner.tail(m, reference, expiry), shape
            head = heads.get(sender)
            if head is None:
                head = heads[sender] = (
                    b"{" if sender is None else b'{"from":%s,' % orjson.dumps(sender)
                )
            msg = new_msg(_Msg, (head, text, tail, reference, [m], [sent]))  # its fields in order
            found.msgs.append(msg)
            found.open[key] = msg
        else:
            msg.items.append(m)
            msg.to.append(sent)
        found.numbers[number] = found.sent[sent] = (m, msg)
    return requests


class CmProvider:
    """CM.com JSON gateway; see the module docstring for the wire format and limits."""

    # Two full requests of personal texts, or many numbers sharing a text in one request.
    max_batch = 2 * MAX_MSG_PER_REQUEST

    def __init__(self, name: str, config: CmProviderConfig, http: httpx.AsyncClient) -> None:
        self.name = name
        self._config = config
        self._http = http  # shared and owned by the caller: never closed here
        self._rules = HttpRules(name, config.timeout_s, credentials="product token")
        self._refused = f"CM refused provider {name!r} (url {config.url})"
        token = orjson.dumps(config.product_token)
        self._body_head = b'{"messages":{"authentication":{"producttoken":%s},"msg":[' % token

    async def send(self, batch: Sequence[SmsMessage]) -> list[Outcome]:
        """Submit the batch; one Outcome per message (see the module docstring)."""
        requests = plan(batch)
        outcomes: list[Outcome] = []
        for i, req in enumerate(requests):
            result = await self._submit(req)
            if not isinstance(result, CallFailure):
                outcomes.extend(result)
                continue
            if result.kind is Failure.REFUSED:
                if i == 0:
                    # Nothing of this batch was sent: the dispatcher keeps it pending.
                    raise result.error(self._refused)
                first = rest = f"authentication rejected: {result.detail}"
            else:
                first = result.detail
                rest = f"not sent: an earlier request of the batch failed ({first})"
            outcomes.extend(result.outcomes(_all(req), first))
            for later in requests[i + 1 :]:
                outcomes.extend(result.outcomes(_all(later), rest))
            break
        return outcomes

    async def check(self) -> str:
        """Probe with an empty `msg` list (sends nothing): reachability and token refusal."""
        result = await self._post([])
        if isinstance(result, CallFailure):
            raise result.error(self._refused if result.kind is Failure.REFUSED else "CM")
        status, data, text = result
        details = data.get("details") or text[:200]
        return (
            f"CM gateway reachable, product token not refused (empty probe: HTTP {status}, "
            f"{details!r}); CM has no call proving the token without sending an SMS"
        )

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client belongs to the caller."""

    async def _post(self, msgs: list[bytes]) -> tuple[int, dict[str, Any], str] | CallFailure:
        # `msgs`: each `msg` object's JSON (_msg_json). Compact UTF-8, as
        # json.dumps(ensure_ascii=False) writes.
        body = b"".join((self._body_head, b",".join(msgs), b"]}}"))
        resp = await self._rules.call(
            self._http.post(
                self._config.url, content=body, headers=_HEADERS, timeout=self._config.timeout_s
            )
        )
        if isinstance(resp, CallFailure):
            return resp
        text = resp.text
        try:
            data = _lower(orjson.loads(resp.content))
        except orjson.JSONDecodeError:
            data = {}
        code = _int(data.get("errorcode"))
        if code in CM_AUTH_ERROR_CODES:  # CM's own words for a refused product token
            words = data.get("details") or text[:200]
            detail = f"product token refused: {words!r} (HTTP {resp.status_code}, errorCode {code})"
            return CallFailure(Failure.REFUSED, detail)
        return resp.status_code, data, text

    async def _submit(self, req: _Request) -> list[Outcome] | CallFailure:
        result = await self._post([_msg_json(msg) for msg in req.msgs])
        if isinstance(result, CallFailure):
            return result
        status, data, text = result
        error_code, details = _int(data.get("errorcode")), data.get("details")
        raw_entries = data.get("messages")
        entries: list[Any] = raw_entries if isinstance(raw_entries, list) else []
        if not data or (not entries and status >= 300):
            # The whole request was refused (e.g. 102 insufficient balance) or is unreadable:
            # no retry, an unreadable 2xx may have been sent.
            kind = cm_failure(error_code)
            what = details or text[:200] or "empty answer"
            detail = f"CM answered HTTP {status}: {what} (errorCode {error_code})"
            return [Outcome(m.key, provider_code(kind), detail=detail) for m in _all(req)]
        results: dict[str, Outcome] = {}
        accepted: dict[Any, str] = {}  # parts -> the detail of an accepted message
        sent, numbers, make, ok = req.sent, req.numbers, partial(tuple.__new__, Outcome), Code.SENT
        for raw in entries:
            # CM's own spelling first; other casings through _lower (keys are
            # case-insensitive), which costs a dict per entry.
            entry = raw if isinstance(raw, dict) and "to" in raw and "status" in raw else None
            if entry is None:
                low = _lower(raw)
                entry = {k: low.get(k.lower()) for k in _ENTRY_KEYS}
            to = entry.get("to")
            found = sent.get(to) if isinstance(to, str) else None  # `to` as we sent it
            if found is None:
                found = numbers.get(_match_key(str(to or "")))
            if found is None:
                continue
            m, msg = found
            key = m.key
            if key in results:
                continue
            status_word = entry.get("status", "")
            if status_word == "Accepted" or str(status_word).lower() == "accepted":
                parts = entry.get("parts")
                words = accepted.get(parts)
                if words is None:
                    words = accepted[parts] = f"accepted, {parts} part(s)"
                # One per accepted message (Outcome's fields in order).
                results[key] = make((key, ok, msg.reference, words, False, False))
            else:
                err = entry.get("messageErrorCode")
                words = entry.get("messageDetails") or entry.get("status") or "rejected"
                detail = f"{words} (messageErrorCode {err})"
                results[m.key] = Outcome(m.key, provider_code(cm_failure(err)), detail=detail)
        if len(results) == len(req.numbers):
            return list(results.values())
        for msg in req.msgs:
            for m in msg.items:
                if m.key in results:
                    continue
                if error_code == 0 and status < 300:
                    # errorCode 0 means every msg of the request is Ok.
                    results[m.key] = Outcome(
                        m.key, Code.SENT, msg.reference, "accepted (no per-number line)"
                    )
                else:
                    # Unknown fate: not retried, so that a recipient never gets the SMS twice.
                    detail = f"no result for this number in CM's answer: {details!r}"
                    results[m.key] = Outcome(m.key, Code.ERROR, detail=detail)
        return list(results.values())


def _all(req: _Request) -> list[SmsMessage]:
    return [m for msg in req.msgs for m in msg.items]


def build(name: str, config: CmProviderConfig, http: httpx.AsyncClient) -> CmProvider:
    """Factory used by the provider registry."""
    return CmProvider(name, config, http)


# -- the status-report webhook (seed 000 "Rapport d'état webhook"; SPEC section 7) -----

# STATUS: 0 accepted by the operator, 1 rejected by CM or the operator, 2 delivered,
# 3 failed (not delivered and will not be).
CM_STATUSES = {"0": IN_PROGRESS, "1": "REJETE", "2": "DELIVRE", "3": "NON_DELIVRE"}


def parse_callback(query: Mapping[str, str], body: bytes) -> list[InboundEvent]:
    """A CM status report (GET query) -> its delivery event.

    CM names the message by the REFERENCE we sent (the tracker, or the
    request's own reference: `message_reference`) and the recipient's number,
    which is what `provider_message_id` and the number of the recipient hold.
    """
    values = lower_keys(query)
    status = required(values, "status")
    if status not in CM_STATUSES:
        raise CallbackError(f"STATUS {status!r} is not 0-3")
    number = e164(values.get("gsm") or values.get("recipient") or required(values, "gsm"), "GSM")
    reference = values.get("reference", "").strip() or None
    text = values.get("standarderrortext") or values.get("statusdescription") or ""
    created = values.get("created_s") or values.get("srcreated_s")
    event = DeliveryEvent(
        provider_type="cm",
        message_id=reference,
        number=number,
        status=CM_STATUSES[status],
        text=text.strip(),
        occurred_at=timestamp(created, ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"), "UTC"),
        dedupe_key=dedupe_key("cm", values.get("id"), reference, number, status, created),
        raw=raw_query(query),
    )
    return [event]
