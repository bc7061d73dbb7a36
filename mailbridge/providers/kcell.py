"""Kcell SMSGW2 REST adapter (seeds/003, API v2, JSON over HTTPS, HTTP Basic auth).

Input: a batch of `SmsMessage`. One message goes to `POST {url}/messages`;
several go to `POST {url}/batches` in chunks of at most 200 (the seed's
"optimal" batch size, which we treat as a limit) with `"fail-fast": false`.
Every message carries `client_message_id` = `SmsMessage.key`, `recipient` =
the E.164 number without '+' (`77…`), `message_text`, and `sender` unless it
is None (then omitted: the account's default alias, if the gateway has one).
`expire_date` is the end of the message's validity (dispatch.validity_s);
`priority`, `time_bounds`, `flash`, `schedule` are left to
SMSGW's defaults (NB: default `time_bounds` is "def", weekdays 9:00-18:00).

Output: one `Outcome` per message. `201` on /messages gives the message id;
`201` on /batches only gives a `batch_id` (no per-message ids: delivery reports
are matched on `client_message_id`, which is our key). With fail-fast false a
batch is accepted whole and per-message errors arrive later, in delivery
reports. A `400` on /messages is that message's rejection, classified by
`codes.kcell_failure`; "duplicate client_message_id" means an earlier attempt
was accepted, so code 0. A `400` (or another 4xx but 401/403/404/405/429) on
/batches does not say which message caused it, so that chunk is resubmitted
one message per request (the duplicate rule keeps this safe).

Idempotency: SMSGW refuses a second message with the same client_message_id
(error 23), so every retry, `in_doubt` or not, is simply re-sent with the same
key: no duplicate SMS as long as SMSGW remembers the key (the seed gives no
retention period). In a fail-fast=false batch the refused duplicate is only
reported by a delivery report with error_code 23, which must be ignored.

Failures follow the shared rule of providers/http.py: a connect error, timeout,
5xx or 429 of a request gives `retry=True` outcomes (29 for 429, else 999) for
its messages, and the requests not yet made are not made (same retry
outcomes): a sick provider costs one request, not five. 401/403 (credentials),
404/405/3xx (wrong url: SMSGW's REST API never redirects) raise
`ProviderAuthError` when nothing of the batch was answered otherwise; after
that they give `retry=True` 999 "authentication rejected". The adapter never
sleeps or retries by itself.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from mailbridge.codes import Code, ProviderFailure, kcell_failure, provider_code
from mailbridge.config import KcellProviderConfig
from mailbridge.model import IN_PROGRESS, DeliveryEvent, InboundEvent, ReplyEvent
from mailbridge.providers import CallbackError, Outcome, ProviderAuthError, SmsMessage
from mailbridge.providers.callbacks import dedupe_key, e164, lenient_json, required, timestamp
from mailbridge.providers.http import (
    WRONG_URL_STATUSES,
    CallFailure,
    Failure,
    HttpRules,
    status_text,
)

log = logging.getLogger(__name__)

BATCH_LIMIT = 200  # messages per POST /batches
MAX_KEY_LENGTH = 64  # client_message_id limit (seed: "Макс. длина поля: 64 символа")
SINGLE_CONCURRENCY = 8  # parallel POST /messages when a chunk is resubmitted one by one
AUTH_DETAIL = "authentication rejected"
# The REST API answers in place and never redirects: a 3xx, like 404/405, means
# the configured url is wrong (an operator error like bad credentials).
WRONG_URL = frozenset({*WRONG_URL_STATUSES, *range(300, 400)})


@dataclass
class _Run:
    """State shared by the requests of one `send` call."""

    # Set by the first failed request: later ones are not made.
    failure: CallFailure | None = None
    answered: bool = False  # some request got an answer other than a refusal

    def fail(self, failure: CallFailure, messages: Sequence[SmsMessage]) -> list[Outcome]:
        if self.failure is None:
            self.failure = failure
        if failure.kind is Failure.REFUSED:
            return failure.outcomes(messages, f"{AUTH_DETAIL}: {failure.detail}")
        self.answered = True  # a timeout may have been accepted: never raise afterwards
        return failure.outcomes(messages)

    def skipped(self, messages: Sequence[SmsMessage]) -> list[Outcome]:
        assert self.failure is not None
        detail = f"not sent: an earlier request failed ({self.failure.detail})"
        return self.failure.outcomes(messages, detail)


class KcellProvider:
    """Kcell SMSGW2 over its REST API v2."""

    max_batch = 1000  # five /batches requests at most per send call

    def __init__(self, name: str, config: KcellProviderConfig, http: httpx.AsyncClient) -> None:
        self.name = name
        self._config = config
        self._http = http
        self._url = config.url.rstrip("/")
        self._rules = HttpRules(
            name, config.timeout_s, credentials="username/password", wrong_url=WRONG_URL
        )
        token = base64.b64encode(f"{config.username}:{config.password}".encode()).decode("ascii")
        self._headers = {
            "Authorization": f"Basic {token}",
            "Accept": "application/json, text/plain, */*",
        }

    async def send(self, batch: Sequence[SmsMessage]) -> list[Outcome]:
        """Submit the batch in the fewest requests; one Outcome per message."""
        outcomes: list[Outcome] = []
        ready: list[SmsMessage] = []
        for m in batch:
            if len(m.key) > MAX_KEY_LENGTH:  # SMSGW would refuse it; never truncate a key
                log.error("%s: key %r longer than %d characters", self.name, m.key, MAX_KEY_LENGTH)
                detail = f"internal error: key longer than {MAX_KEY_LENGTH} characters"
                outcomes.append(Outcome(m.key, Code.ERROR, detail=detail))
            else:
                ready.append(m)
        run = _Run()
        for start in range(0, len(ready), BATCH_LIMIT):
            chunk = ready[start : start + BATCH_LIMIT]
            if run.failure is not None:
                outcomes += run.skipped(chunk)
            elif len(chunk) == 1:
                outcomes.append(await self._single(chunk[0], run))
            else:
                outcomes += await self._batch(chunk, run)
        if run.failure is not None and run.failure.kind is Failure.REFUSED and not run.answered:
            raise run.failure.error(self.name)
        return outcomes

    async def check(self) -> str:
        """GET /senders with our credentials; return the senders the account may use."""
        resp = await self._rules.call(
            self._http.get(
                f"{self._url}/senders", headers=self._headers, timeout=self._config.timeout_s
            )
        )
        if isinstance(resp, CallFailure):
            raise resp.error(self.name)
        if not resp.is_success:
            raise ProviderAuthError(f"{self.name}: GET /senders answered {status_text(resp)}")
        return f"credentials accepted; senders: {_sender_names(resp)}"

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client belongs to the caller."""

    # -- requests ------------------------------------------------------------

    async def _post(self, path: str, payload: object) -> httpx.Response | CallFailure:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        headers = {**self._headers, "Content-Type": "application/json;charset=utf-8"}
        return await self._rules.call(
            self._http.post(
                self._url + path, content=body, headers=headers, timeout=self._config.timeout_s
            )
        )

    async def _single(self, m: SmsMessage, run: _Run) -> Outcome:
        if run.failure is not None:
            return run.skipped([m])[0]
        resp = await self._post("/messages", _item(m, self._config.time_bounds))
        if isinstance(resp, CallFailure):
            return run.fail(resp, [m])[0]
        run.answered = True
        if resp.is_success:
            # Reports name the message by our client_message_id (parse_callback).
            return Outcome(m.key, Code.SENT, provider_message_id=m.key)
        return _rejection(m, resp)

    async def _singles(self, chunk: Sequence[SmsMessage], run: _Run) -> list[Outcome]:
        gate = asyncio.Semaphore(SINGLE_CONCURRENCY)

        async def one(m: SmsMessage) -> Outcome:
            async with gate:
                return await self._single(m, run)

        return list(await asyncio.gather(*(one(m) for m in chunk)))

    async def _batch(self, chunk: Sequence[SmsMessage], run: _Run) -> list[Outcome]:
        payload = {
            "messages": [_item(m, self._config.time_bounds) for m in chunk],
            "fail-fast": False,
        }
        resp = await self._post("/batches", payload)
        if isinstance(resp, CallFailure):
            return run.fail(resp, chunk)
        run.answered = True
        if resp.is_success:
            detail = f"batch {_field(resp, 'batch_id') or '?'}"
            return [Outcome(m.key, Code.SENT, m.key, detail) for m in chunk]
        # Nothing of a refused batch is stored; one request per message tells
        # which one was refused, and a duplicate key still reads as accepted.
        log.warning(
            "%s: batch of %d refused (%s); resubmitting one by one",
            self.name,
            len(chunk),
            status_text(resp),
        )
        return await self._singles(chunk, run)


def build(name: str, config: KcellProviderConfig, http: httpx.AsyncClient) -> KcellProvider:
    """The registry's factory."""
    return KcellProvider(name, config, http)


def _item(m: SmsMessage, time_bounds: str | None) -> dict[str, str]:
    # Keys in the seed's order; SMSGW picks GSM-7 or UCS-2 itself (no encoding field).
    item = {"client_message_id": m.key}
    if m.sender is not None:
        item["sender"] = m.sender
    item["recipient"] = m.to.removeprefix("+")
    item["message_text"] = m.text
    if time_bounds is not None:
        # SMSGW's own default ("def") delivers on weekdays 09:00-18:00 only.
        item["time_bounds"] = time_bounds
    if m.expires_at is not None:
        # SMSGW stops trying after this (its local time; SPEC 8 validity).
        local = datetime.fromtimestamp(m.expires_at, ZoneInfo(KCELL_ZONE))
        item["expire_date"] = local.strftime("%Y-%m-%d %H:%M:%S")
    return item


def _rejection(m: SmsMessage, resp: httpx.Response) -> Outcome:
    body = _json(resp)
    error_code = body.get("error_code") if isinstance(body, dict) else None
    message = body.get("error_message") if isinstance(body, dict) else None
    text = str(message) if message else resp.text.strip()[:200]
    kind = kcell_failure(error_code, text)
    if kind is ProviderFailure.ACCEPTED:  # the key was accepted by an earlier attempt
        return Outcome(m.key, Code.SENT, m.key, f"accepted earlier ({text})")
    code = provider_code(kind)
    detail = f"HTTP {resp.status_code}: {text}"
    return Outcome(m.key, code, detail=detail, retry=kind is ProviderFailure.THROTTLED)


def _json(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


def _field(resp: httpx.Response, name: str) -> str | None:
    """A top-level field of a JSON answer; the seed once writes it `" batch_id"`."""
    body = _json(resp)
    if isinstance(body, dict):
        for key, value in body.items():
            if str(key).strip() == name and value is not None:
                return str(value)
    return None


def _sender_names(resp: httpx.Response) -> str:
    # The seed does not show the /senders body: accept a list of names or of
    # objects, possibly wrapped in an object; else show the raw text.
    body = _json(resp)
    if isinstance(body, dict):
        body = next((v for v in body.values() if isinstance(v, list)), body)
    if isinstance(body, list):
        names = []
        for entry in body:
            if isinstance(entry, dict):
                entry = next((entry[k] for k in ("sender", "name", "alias") if k in entry), entry)
            names.append(str(entry))
        return ", ".join(names) or "(none)"
    return resp.text.strip()[:200] or "(empty answer)"


# -- reports (seed 003 "Получение отчетов (DR)"; SPEC section 7) ------------------------

# Final statuses of a delivery report; NEW, SENT and EN_ROUTE are intermediate.
KCELL_STATUSES = {
    "DELIVERED": "DELIVRE", "EXPIRED": "EXPIRE", "REJECTED": "REJETE",
    "UNDELIVERABLE": "NON_DELIVRE", "FAILED": "NON_DELIVRE", "INVALID": "NON_DELIVRE",
    "DELETED": "NON_DELIVRE", "ACCEPTED": "NON_DELIVRE",
}  # fmt: skip
KCELL_TIME = ("%Y-%m-%d %H:%M:%S",)
KCELL_ZONE = "Asia/Almaty"  # SMSGW writes local times (UTC+5)


def parse_callback(query: Mapping[str, str], body: bytes) -> list[InboundEvent]:
    """A Kcell report (POST JSON) -> its events: `{"delivery_report": [...]}`
    names each message by our client_message_id (the recipient's
    provider_message_id); `{"incoming_report": [...]}` carries replies."""
    document = lenient_json(body)
    if not isinstance(document, dict):
        raise CallbackError("body is not a JSON object")
    events: list[InboundEvent] = []
    deliveries = document.get("delivery_report")
    incoming = document.get("incoming_report")
    if not isinstance(deliveries, list | None) or not isinstance(incoming, list | None):
        raise CallbackError("delivery_report / incoming_report is not a list")
    if deliveries is None and incoming is None:
        raise CallbackError("neither delivery_report nor incoming_report")
    for item in deliveries or []:
        if not isinstance(item, dict):
            raise CallbackError("a delivery_report entry is not an object")
        message_id = required(item, "client_message_id")
        status = required(item, "status").upper()
        error = " ".join(
            str(item[k]).strip() for k in ("error_code", "error_message") if item.get(k)
        )
        when = item.get("status_time") or item.get("sent_time")
        events.append(DeliveryEvent(
            provider_type="kcell",
            message_id=message_id,
            number=None,
            status=KCELL_STATUSES.get(status, IN_PROGRESS),
            text=error or status,
            occurred_at=timestamp(str(when) if when else None, KCELL_TIME, KCELL_ZONE),
            dedupe_key=dedupe_key("kcell", message_id, status, when),
            raw=json.dumps(item, ensure_ascii=False, sort_keys=True),
        ))  # fmt: skip
    for item in incoming or []:
        if not isinstance(item, dict):
            raise CallbackError("an incoming_report entry is not an object")
        number = e164(required(item, "sender"), "sender")
        when = item.get("receive_time")
        events.append(ReplyEvent(
            provider_type="kcell",
            message_id=None,  # a reply names no message: matched by number
            number=number,
            to=str(item.get("recipient") or "") or None,
            text=str(item.get("text") or ""),
            occurred_at=timestamp(str(when) if when else None, KCELL_TIME, KCELL_ZONE),
            dedupe_key=dedupe_key("kcell-mo", item.get("message_id"), number, when,
                                  item.get("text")),
            raw=json.dumps(item, ensure_ascii=False, sort_keys=True),
        ))  # fmt: skip
    return events
