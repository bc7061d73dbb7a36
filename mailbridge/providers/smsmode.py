"""sMsmode HTTP API 1.6 adapter (seeds/002; `url` is the base ending in `/http/1.6/`).

Input: a batch of at most `max_batch` (500) `SmsMessage`s. Output: one `Outcome` per
message; every recipient of one HTTP request gets that request's answer, and its smsID (the
campaign id for an upload) as `provider_message_id`: delivery reports carry smsID + number.

Requests, fewest first (the API answers once per request, never per recipient):
- GSM-7 messages that all share one text, sender and reference: `POST sendSMS.do`, form
  fields `accessToken message numero emetteur refClient nbr_msg`, `numero` a comma list of
  international numbers without '+' (`33612345678`). POST has no documented recipient limit
  (GET stops at 300); we cap a request at 500 numbers, so 500 recipients take 1 request.
- GSM-7 messages with two or more different texts (or senders, references): ONE
  `POST sendSMSBatch.do?accessToken=…&nbr_msg=…` uploading, in multipart field `fichier`,
  a CSV `"numero","message","emetteur","refClient"` (every field quoted, `""` doubled,
  CRLF rows, empty `emetteur` = account default) of at most 500 rows.
- UCS-2 messages: `sendSMS.do` with `classe_msg=9` and the text in UTF-8, one request per
  distinct text/sender/reference: the upload is ISO-8859-15 only, so personal UCS-2 texts
  cost one request each.
GSM-7 texts travel in ISO-8859-15 (`charset` declared in the form's Content-Type, as the
provider's own Java sample does); the 11 GSM-7 characters ISO-8859-15 lacks (`¤` and the
Greek capitals) become `?`, as sMsmode itself does with characters outside its table.
`nbr_msg` is the largest `max_parts` of the request (the text is already cut to fit it).
`stop` is never sent: mailbridge has already added the STOP mention. A number appears at
most once per request (a repeat goes to a further request) so that no SMS is merged away.

Failures: code 0 → accepted; 33 → 12; 35 and unknown codes → 999; HTTP statuses the API
does not use (other 4xx, 3xx) → 999, not retried. Transport errors and HTTP statuses follow
the shared rule of providers/http.py, with sMsmode's own codes on top: 31, 50, HTTP 5xx,
timeouts, network errors and unreadable answers → `retry=True` code 999 (HTTP 429 → 29).
After the first such failure the remaining requests of the batch are not attempted (they
get the same retry outcome), so a dead provider costs one timeout. Code 32, HTTP 401/403
and HTTP 404 (wrong `url`) raise `ProviderAuthError`, or, once a request of the batch was
accepted, give the rest `retry=True` 999 "authentication rejected".

Idempotency: none. `refClient` is only echoed back in reports, so an `in_doubt` message is
simply sent again and its recipient may get the SMS twice.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlencode

import httpx

from mailbridge.codes import (
    SMSMODE_ACCEPTED,
    SMSMODE_AUTH_CODES,
    SMSMODE_TRANSIENT_CODES,
    Code,
    ProviderFailure,
    provider_code,
    smsmode_failure,
)
from mailbridge.config import SmsmodeProviderConfig
from mailbridge.model import IN_PROGRESS, DeliveryEvent, InboundEvent, ReplyEvent
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

MAX_BATCH = 500
MAX_PER_REQUEST = 500  # our cap: the document sets none for POST
CSV_HEADER = ("numero", "message", "emetteur", "refClient")

# The API answers errors in its body with HTTP 200; a 405 or a redirect is none of its
# answers, so only 404 says the `url` is wrong (the others fail their request: 999).
WRONG_URL_STATUSES = frozenset({404})
Endpoint = Literal["sendSMS.do", "sendSMSBatch.do"]


@dataclass
class _Request:
    endpoint: Endpoint
    messages: list[SmsMessage] = field(default_factory=list)
    numbers: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class _Answer:
    """sMsmode's verdict on a whole request: accepted (code 0) or refused for good."""

    code: int
    detail: str
    message_id: str | None = None


def _number(to: str) -> str | None:
    """E.164 '+33612345678' → '33612345678', the international form sMsmode takes."""
    digits = to.removeprefix("+")
    return digits if digits.isascii() and digits.isdigit() and len(digits) <= 15 else None


def _decode(body: bytes) -> str:
    # The answer's charset is undocumented: UTF-8 when it decodes, else ISO-8859-15.
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return body.decode("iso-8859-15")


def _chunks(endpoint: Endpoint, msgs: list[SmsMessage]) -> list[_Request]:
    """Split into requests of at most MAX_PER_REQUEST, a number at most once per request."""
    out: list[_Request] = []
    for m in msgs:
        number = _number(m.to) or ""
        req = next(
            (r for r in out if len(r.messages) < MAX_PER_REQUEST and number not in r.numbers), None
        )
        if req is None:
            req = _Request(endpoint)
            out.append(req)
        req.messages.append(m)
        req.numbers.add(number)
    return out


class SmsmodeProvider:
    """sMsmode HTTP 1.6: `sendSMS.do` for one text, `sendSMSBatch.do` for personal texts."""

    def __init__(self, name: str, config: SmsmodeProviderConfig, http: httpx.AsyncClient) -> None:
        self.name = name
        self.max_batch = MAX_BATCH
        self._config = config
        self._http = http
        self._base = config.url if config.url.endswith("/") else config.url + "/"
        self._rules = HttpRules(
            name, config.timeout_s, credentials="access token", wrong_url=WRONG_URL_STATUSES
        )

    def _plan(self, batch: Sequence[SmsMessage]) -> list[_Request]:
        """The HTTP requests `send` makes for `batch` (valid numbers only), in order."""
        groups: dict[tuple[str, str, str | None, str | None], list[SmsMessage]] = {}
        for m in batch:
            groups.setdefault((m.encoding, m.text, m.sender, m.reference), []).append(m)
        gsm = [g for k, g in groups.items() if k[0] == "gsm7"]
        requests: list[_Request] = []
        if len(gsm) == 1:
            requests += _chunks("sendSMS.do", gsm[0])
        elif gsm:  # one upload carries any mix of GSM-7 texts, senders and references
            requests += _chunks("sendSMSBatch.do", [m for m in batch if m.encoding == "gsm7"])
        for key, group in groups.items():
            if key[0] == "ucs2":
                requests += _chunks("sendSMS.do", group)
        return requests

    async def send(self, batch: Sequence[SmsMessage]) -> list[Outcome]:
        """Submit the batch in the fewest requests; one Outcome per message (see module doc)."""
        outcomes: dict[str, Outcome] = {}
        valid: list[SmsMessage] = []
        for m in batch:
            if _number(m.to) is None:
                code = provider_code(ProviderFailure.INVALID_NUMBER)
                outcomes[m.key] = Outcome(m.key, code, detail=f"not an E.164 number: {m.to!r}")
            else:
                valid.append(m)
        accepted_any = False
        stop: CallFailure | None = None  # the failure that ends the batch early
        for req in self._plan(valid):
            if stop is not None:
                detail = f"not sent, an earlier request failed: {stop.detail}"
                outcomes.update((o.key, o) for o in stop.outcomes(req.messages, detail))
                continue
            v = await self._submit(req)
            if isinstance(v, _Answer):
                accepted_any = accepted_any or v.code == Code.SENT
                for m in req.messages:
                    outcomes[m.key] = Outcome(m.key, v.code, v.message_id, v.detail)
                continue
            if v.kind is Failure.REFUSED:
                if not accepted_any:
                    raise v.error(f"sMsmode provider {self.name!r}")
                v = CallFailure(Failure.REFUSED, f"authentication rejected: {v.detail}")
            if v.kind is not Failure.PERMANENT:
                stop = v
            outcomes.update((o.key, o) for o in v.outcomes(req.messages))
        return [outcomes[m.key] for m in batch]

    def _request(self, req: _Request) -> httpx.Request:
        msgs = req.messages
        nbr_msg = str(max(m.max_parts for m in msgs))
        if req.endpoint == "sendSMSBatch.do":
            buf = io.StringIO()
            writer = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
            writer.writerow(CSV_HEADER)
            for m in msgs:
                writer.writerow((_number(m.to), m.text, m.sender or "", m.reference or ""))
            data = buf.getvalue().encode("iso-8859-15", errors="replace")
            return self._http.build_request(
                "POST",
                self._base + req.endpoint,
                params={
                    "accessToken": self._config.access_token,
                    "nbr_msg": nbr_msg,
                    **self._notification_params(),
                },  # fmt: skip
                files={"fichier": ("mailbridge.csv", data, "text/csv")},
                timeout=self._config.timeout_s,
            )
        first = msgs[0]
        fields = [
            ("accessToken", self._config.access_token),
            ("message", first.text),
            ("numero", ",".join(_number(m.to) or "" for m in msgs)),
        ]
        if first.sender is not None:
            fields.append(("emetteur", first.sender))
        if first.reference is not None:
            fields.append(("refClient", first.reference))
        fields.append(("nbr_msg", nbr_msg))
        fields.extend(self._notification_params().items())
        charset = "ISO-8859-15"
        if first.encoding == "ucs2":
            fields.append(("classe_msg", "9"))
            charset = "UTF-8"
        body = urlencode(fields, encoding=charset, errors="replace").encode("ascii")
        headers = {"Content-Type": f"application/x-www-form-urlencoded; charset={charset}"}
        return self._http.build_request(
            "POST",
            self._base + req.endpoint,
            content=body,
            headers=headers,
            timeout=self._config.timeout_s,
        )

    def _notification_params(self) -> dict[str, str]:
        """Where sMsmode calls back for this message's delivery report and replies
        (seed 002 item 12): our receiver, when `http.public_url` is configured."""
        params = {}
        if self._config.notification_url:
            params["notification_url"] = self._config.notification_url
        if self._config.reply_notification_url:
            params["notification_url_reponse"] = self._config.reply_notification_url
        return params

    async def _submit(self, req: _Request) -> _Answer | CallFailure:
        resp = await self._rules.call(self._http.send(self._request(req)))
        return resp if isinstance(resp, CallFailure) else _classify(resp)

    async def check(self) -> str:
        """`credit.do`: the balance when the token is accepted; raises otherwise."""
        resp = await self._rules.call(
            self._http.get(
                self._base + "credit.do",
                params={"accessToken": self._config.access_token},
                timeout=self._config.timeout_s,
            )
        )
        if isinstance(resp, CallFailure):
            raise resp.error(f"sMsmode provider {self.name!r}: credit.do")
        text = _decode(resp.content).strip()
        if resp.status_code == 200:
            try:
                float(text)  # a bare number (negative on post-paid accounts) is the balance
                return f"credentials accepted (balance {text})"
            except ValueError:
                pass  # an error answer `code | description`
        v = _classify(resp)
        failure = v if isinstance(v, CallFailure) else CallFailure(Failure.PERMANENT, v.detail)
        raise failure.error(f"sMsmode provider {self.name!r}: credit.do answered")

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client belongs to the caller."""


def _classify(resp: httpx.Response) -> _Answer | CallFailure:
    """sMsmode's own answer (`code | description | smsID`) once the shared rule let it by."""
    status = resp.status_code
    text = _decode(resp.content).strip()
    if not 200 <= status < 300:
        return CallFailure(Failure.PERMANENT, f"HTTP {status}: {text[:200]}")
    fields = [f.strip() for f in text.split("|")]
    if not fields[0].isdigit():
        return CallFailure(Failure.TEMPORARY, f"unreadable answer: {text[:200]!r}")
    code = int(fields[0])
    detail = " | ".join(fields[:2])
    if code == SMSMODE_ACCEPTED:
        sms_id = fields[2] if len(fields) > 2 and fields[2] else None
        return _Answer(Code.SENT, detail, sms_id)
    if code in SMSMODE_AUTH_CODES:
        return CallFailure(Failure.REFUSED, f"access token refused: {detail}")
    if code in SMSMODE_TRANSIENT_CODES:
        return CallFailure(Failure.TEMPORARY, detail)
    return _Answer(provider_code(smsmode_failure(code)), detail)


def build(name: str, config: SmsmodeProviderConfig, http: httpx.AsyncClient) -> SmsmodeProvider:
    """Factory used by the provider registry."""
    return SmsmodeProvider(name, config, http)


# -- notifications (seed 002, items 12 and 14; SPEC section 7) --------------------------

# statut of a delivery notification (seed 002, item 10) -> SPEC's final status;
# the rest (0 Envoyé, 1 En cours, 10 Programmé, 13 Délivré opérateur, 35xx
# temporary errors, 999 Indéfini...) is intermediate.
SMSMODE_STATUSES = {
    **dict.fromkeys((11, 14, 16, 100, 101), "DELIVRE"),
    **dict.fromkeys((2, 12, 15, 21, 35, 50, 3521, 3522, 3523), "NON_DELIVRE"),
    **dict.fromkeys((22, 33, 34, 36, 38, 3524, 3999), "REJETE"),
    37: "EXPIRE",
}
SMSMODE_STATUS_TEXT = {
    0: "Envoyé", 1: "En cours", 2: "Erreur interne", 10: "Programmé", 11: "Reçu",
    12: "Partiellement délivré", 13: "Délivré opérateur", 14: "Délivré",
    15: "Partiellement reçu", 16: "Ecouté", 21: "Non délivrable", 22: "Rejeté",
    33: "Non envoyé - crédit insuffisant", 34: "Erreur routage", 35: "Erreur réception",
    36: "Erreur message", 37: "Message expiré", 38: "Message trop long", 50: "Non délivré",
    100: "Lu", 101: "Non lu", 999: "Indéfini", 3501: "Erreur temporaire opérateur",
    3502: "Erreur temporaire absence", 3503: "Erreur temporaire téléphone",
    3504: "Erreur temporaire portabilité", 3521: "Erreur permanente opérateur",
    3522: "Erreur permanente absence", 3523: "Erreur permanente téléphone",
    3524: "Erreur permanente anti spam", 3999: "Destinataire blacklisté",
}  # fmt: skip


def parse_delivery_callback(query: Mapping[str, str], body: bytes) -> list[InboundEvent]:
    """A sMsmode delivery notification (GET) -> its delivery event, named by
    smsID (one per sendSMS request: every recipient of it shares it) and number."""
    values = lower_keys(query)
    sms_id = required(values, "smsid")
    number = e164(required(values, "numero"), "numero")
    raw_status = required(values, "statut")
    try:
        status = int(raw_status)
    except ValueError:
        raise CallbackError(f"statut {raw_status!r} is not a number") from None
    date = values.get("date_reception")
    event = DeliveryEvent(
        provider_type="smsmode",
        message_id=sms_id,
        number=number,
        status=SMSMODE_STATUSES.get(status, IN_PROGRESS),
        text=SMSMODE_STATUS_TEXT.get(status, f"statut {status}"),
        occurred_at=timestamp(date, ("%Y-%m-%d %H:%M:%S",), "Europe/Paris"),
        dedupe_key=dedupe_key("smsmode", sms_id, number, status, date),
        raw=raw_query(query),
    )
    return [event]


def parse_reply_callback(query: Mapping[str, str], body: bytes) -> list[InboundEvent]:
    """A sMsmode reply notification (GET) -> its reply event (the original SMS's
    smsID names the request; emetteur is the person who replied)."""
    values = lower_keys(query)
    number = e164(required(values, "emetteur"), "emetteur")
    if "message" not in values:
        raise CallbackError("message is missing")
    date = values.get("date_reception")
    event = ReplyEvent(
        provider_type="smsmode",
        message_id=values.get("smsid", "").strip() or None,
        number=number,
        to=values.get("numero", "").strip() or None,
        text=values["message"],
        occurred_at=timestamp(date, ("%d%m%Y-%H%M%S",), "Europe/Paris"),
        dedupe_key=dedupe_key(
            "smsmode-mo", values.get("responseid") or None, number, values["message"], date
        ),
        raw=raw_query(query),
    )
    return [event]
