"""A fake CM.com JSON gateway (`POST /v1.0/message`) for `tests.httpfake.ProviderServer`.

It parses requests the way CM documents (seeds/000, developers.cm.com "Responses & Errors -
JSON"): case-insensitive keys, `messages.authentication.producttoken`, `msg[]` with `from`,
`to[].number`, `body.content`, `dcs`, `reference`, part limits; and answers like CM:
`{"details", "errorCode", "messages": [{"to", "status", "reference", "parts",
"messageDetails", "messageErrorCode"}]}` with 200 when at least one message was created,
400 when none was or the whole request is refused (101/103 token, 102 balance, 202 JSON,
203 msg array).

Usage::

    fake = FakeCm()                       # accepts FakeCm.TOKEN
    with ProviderServer(fake) as server:  # url: server.url + FakeCm.PATH
        fake.reject("+33601020304", 303)  # per-number rejection (code, optional details)
        fake.fail_next(2, status=503)     # the next 2 requests get 503 (also 429, 500...)
        fake.balance_exhausted = True     # 400 "Insufficient balance." errorCode 102
        fake.hold()                       # requests block until fake.release() ...
        fake.release()                    # ... then are processed normally (CM got them)
        fake.accepted_count("+33601020304")  # SMS accepted for a number (+E.164 or 00 form)
        fake.sent                         # list[SentSms], every accepted SMS in order

Status reports (seed 000 "Rapport d'état webhook"): CM calls the webhook URL configured in
its console with a GET whose query names the message by the REFERENCE it was sent with and
the recipient's number::

        fake.callback_url = daemon_url + "/hooks/<token>/cm"
        fake.deliver("+33601020304", status=2)   # GET for the last SMS to that number -> 200?
        query = fake.status_report("+33601020304", status=3, text="Absent subscriber")
        fake.send_report(query)               # the same report can be sent again (CM retries)
        fake.auto_status = 2                  # every accepted SMS gets that report at once,
                                              # from a thread (it may beat CM's own answer)
        fake.reports                          # [(query, HTTP status)] of every report sent
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import gsm0338  # noqa: F401  (registers the "gsm03.38" codec)

from tests.httpfake import RecordedRequest, Reply, call_back

_SENDER_OK = re.compile(r"^(?:[A-Za-z0-9 ]{1,11}|\+?[0-9]{1,16})$")
_REFERENCE_OK = re.compile(r"^[A-Za-z0-9_]{1,32}$")
# STATUS of a status report -> its STATUSDESCRIPTION, and a STANDARDERRORTEXT for failures.
STATUS_DESCRIPTIONS = {0: "Accepted", 1: "Rejected", 2: "Delivered", 3: "Failed"}
ERROR_TEXTS = {1: "Rejected by the operator", 3: "Absent subscriber"}


@dataclass(frozen=True)
class SentSms:
    """One SMS the fake accepted."""

    number: str  # as CM got it: 00 + country code + number
    sender: str
    text: str
    dcs: int
    reference: str | None
    parts: int
    id: int = 0  # CM's id of the message (ID in its status reports)


def _lower(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k).lower(): _lower(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_lower(v) for v in obj]
    return obj


def _plus(number: str) -> str:
    return "+" + number[2:] if number.startswith("00") else number


def count_parts(text: str, dcs: int) -> int:
    """Parts the way CM cuts: GSM 160/153 septets, UCS-2 70/67 UTF-16 units."""
    if dcs == 8:
        units, single, multi = len(text.encode("utf-16-be")) // 2, 70, 67
    else:
        units, single, multi = len(text.encode("gsm03.38", "replace")), 160, 153
    return 1 if units <= single else -(-units // multi)


class FakeCm:
    """Handler for ProviderServer speaking CM's JSON gateway; see the module docstring."""

    TOKEN = "11111111-2222-3333-4444-555555555555"
    PATH = "/v1.0/message"

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.balance_exhausted = False
        self.sent: list[SentSms] = []
        self._accepted: Counter[str] = Counter()
        self._rejections: dict[str, tuple[int, str]] = {}
        self._failures: list[int] = []
        self._gate = threading.Event()
        self._gate.set()
        self._lock = threading.Lock()
        self._next_id = 778800
        self.callback_url: str | None = None
        self.auto_status: int | None = None
        self.reports: list[tuple[dict[str, str], int]] = []

    # --- knobs -------------------------------------------------------------------------
    def reject(self, number: str, code: int = 303, details: str | None = None) -> None:
        """Reject this number (+E.164 or 00 form) with a CM messageErrorCode."""
        self._rejections[_plus(number)] = (code, details or f"Rejected (error {code})")

    def fail_next(self, n: int, status: int = 503) -> None:
        """Answer the next `n` requests with `status` without processing them."""
        with self._lock:
            self._failures.extend([status] * n)

    def hold(self) -> None:
        """Block every request until `release()` (to make clients time out)."""
        self._gate.clear()

    def release(self) -> None:
        """Let held requests through; they are then processed as CM would."""
        self._gate.set()

    def accepted_count(self, number: str) -> int:
        """How many SMS were accepted for this number (+E.164 or 00 form)."""
        with self._lock:
            return self._accepted[_plus(number)]

    # --- status reports (CM -> its client's webhook) -------------------------------------
    def last_sent(self, number: str) -> SentSms:
        """The last SMS accepted for this number (+E.164 or 00 form)."""
        with self._lock:
            found = [s for s in self.sent if _plus(s.number) == _plus(number)]
        if not found:
            raise LookupError(f"CM accepted no SMS for {number}")
        return found[-1]

    def status_report(
        self,
        number: str,
        status: int = 2,
        *,
        text: str | None = None,
        at: datetime | None = None,
        sms: SentSms | None = None,
    ) -> dict[str, str]:
        """The query of a status report for the last SMS to `number` (or `sms`): STATUS
        0 accepted by the operator, 1 rejected, 2 delivered, 3 failed; times in UTC."""
        sms = sms or self.last_sent(number)
        when = (at or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
        error = ERROR_TEXTS.get(status, "") if text is None else text
        return {
            "CREATED_S": when,
            "DATETIME_S": when,
            "GSM": sms.number,
            "REFERENCE": sms.reference or "",
            "STATUS": str(status),
            "STATUSDESCRIPTION": STATUS_DESCRIPTIONS.get(status, "Unknown"),
            "STANDARDERRORTEXT": error,
            "ID": str(sms.id),
            "OPERATOR": "20801",
            "RECIPIENT": sms.number,
            "STATUSISSUCCESS": "1" if status in (0, 2) else "0",
        }

    def send_report(self, query: dict[str, str]) -> int:
        """GET the webhook with this report's query; the HTTP status it answered."""
        if self.callback_url is None:
            raise RuntimeError("FakeCm.callback_url is not set")
        status = call_back("GET", self.callback_url, params=query)
        with self._lock:
            self.reports.append((query, status))
        return status

    def deliver(
        self, number: str, status: int = 2, *, text: str | None = None, at: datetime | None = None
    ) -> int:
        """Send a status report for the last SMS to `number`; the HTTP status."""
        return self.send_report(self.status_report(number, status, text=text, at=at))

    def _auto_reports(self, accepted: list[SentSms], status: int) -> None:
        for sms in accepted:
            self.send_report(self.status_report(sms.number, status, sms=sms))

    # --- the API -------------------------------------------------------------------------
    def __call__(self, req: RecordedRequest) -> Reply:
        self._gate.wait(timeout=60)  # bounded so a forgotten release() cannot hang the suite
        with self._lock:
            if self._failures:
                status = self._failures.pop(0)
                return Reply(status, json.dumps({"details": "Unknown error", "errorCode": 999}))
        if req.method != "POST":
            return Reply(405)
        if req.path != self.PATH:
            return Reply(404, "Not Found")
        try:
            data = _lower(json.loads(req.body.decode("utf-8")))
            messages = data["messages"]
            assert isinstance(messages, dict)
        except (ValueError, KeyError, AssertionError, TypeError):
            return _answer(400, "Invalid JSON", 202, [])
        token = (messages.get("authentication") or {}).get("producttoken")
        if not isinstance(token, str) or not re.fullmatch(r"[0-9a-fA-F-]{36}", token):
            return _answer(400, "Invalid product token.", 103, [])
        if token != self.token:
            return _answer(400, "No account found for the given authentication", 101, [])
        if self.balance_exhausted:
            return _answer(400, "Insufficient balance.", 102, [])
        msgs = messages.get("msg")
        if not isinstance(msgs, list) or not msgs:
            return _answer(400, "A MESSAGES object requires at least one MSG object", 203, [])
        accepted: list[SentSms] = []
        lines = [line for msg in msgs for line in self._msg(msg, accepted)]
        if self.auto_status is not None and accepted and self.callback_url is not None:
            threading.Thread(
                target=self._auto_reports, args=(accepted, self.auto_status), daemon=True
            ).start()
        created = sum(1 for line in lines if line["status"] == "Accepted")
        error = 0 if created == len(lines) else 201
        return _answer(200 if created else 400, f"Created {created} message(s)", error, lines)

    def _msg(self, msg: Any, accepted: list[SentSms]) -> list[dict[str, Any]]:
        if not isinstance(msg, dict) or not isinstance(msg.get("to"), list):
            return [_line("", None, 302, "The to object is an invalid type, must be an array")]
        reference = msg.get("reference")
        error: tuple[int, str] | None = None
        sender, body, dcs = msg.get("from"), msg.get("body"), msg.get("dcs", 0)
        content = body.get("content") if isinstance(body, dict) else None
        if sender is None:
            error = (301, "No FROM field found in a MSG object.")
        elif not isinstance(sender, str) or not _SENDER_OK.match(sender):
            error = (301, f"Invalid FROM field '{sender}'.")
        elif not isinstance(content, str) or not content:
            error = (304, "A body without content was found")
        elif reference is not None and not _REFERENCE_OK.match(str(reference)):
            error = (305, "Invalid reference")
        elif dcs not in (0, 8):
            error = (305, "Invalid DCS")
        lines = []
        for to in msg["to"]:
            number = str(to.get("number") or "") if isinstance(to, dict) else ""
            if error is not None:
                lines.append(_line(number, reference, *error))
            elif not number:
                lines.append(_line(number, reference, 302, "Empty mobile number field, MT ignored"))
            elif not number.isdigit() or not number.startswith("00"):
                lines.append(_line(number, reference, 303, f"Gsm '{number}' is not a number."))
            elif _plus(number) in self._rejections:
                lines.append(_line(number, reference, *self._rejections[_plus(number)]))
            else:
                assert isinstance(content, str) and isinstance(sender, str)
                parts = count_parts(content, dcs)
                with self._lock:
                    self._next_id += 1
                    sms = SentSms(number, sender, content, dcs, reference, parts, self._next_id)
                    self._accepted[_plus(number)] += 1
                    self.sent.append(sms)
                accepted.append(sms)
                lines.append(_line(number, reference, 0, None, parts))
        return lines


def _line(
    number: str, reference: Any, code: int, details: str | None, parts: int = 0
) -> dict[str, Any]:
    return {
        "to": number,
        "status": "Accepted" if code == 0 else "Rejected",
        "reference": reference,
        "parts": parts,
        "messageDetails": details,
        "messageErrorCode": code,
    }


def _answer(status: int, details: str, code: int, lines: list[dict[str, Any]]) -> Reply:
    body = {"details": details, "errorCode": code, "messages": lines}
    return Reply(status, json.dumps(body), {"Content-Type": "application/json; charset=utf-8"})
