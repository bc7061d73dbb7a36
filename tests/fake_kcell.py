"""A fake Kcell SMSGW2 REST API v2 (seeds/003) for `ProviderServer`.

    fake = FakeKcell()                       # username "mailbridge", password "secret"
    with ProviderServer(fake) as server:     # config url: server.url + FakeKcell.BASE
        ...
    fake.count("+77010000001")               # SMS accepted for that number (77… or +77…)

What it speaks (paths under BASE = /app/smsgw/rest/v2):
- every request needs `Authorization: Basic` with the fake's credentials, else 401;
- `POST /messages` {client_message_id, sender?, recipient, message_text, …}:
  201 `{"message_id": "…"}` + Location, or 400 `{"error_message": "…"}` for a bad
  field, a refused sender alias, a rejected number, a known client_message_id;
- `POST /batches` {"messages": […], "fail-fast": bool}: more than 200 messages
  or no messages is 400. fail-fast false (default): 201 `{"batch_id": "…"}`,
  bad messages are stored as rejected (error_code/error_message, visible in
  GET answers and `messages`) and not sent; fail-fast true: the first bad message
  makes a 400 and nothing is stored;
- `GET /senders` (a JSON list of names), `GET /messages/:id`, `GET /batches/:id`,
  `GET /users/:user/client_messages/:client_message_id`.
A sender omitted from a message is accepted (the account's default alias).

Knobs (set before or between requests; thread-safe enough for tests):
- `reject_number(number, code=11, message=None)`: refuse that recipient with an
  error of the seed's directory;
- `fail_next(n, status=503)`: the next n requests answer `status` (503, 429, …)
  without doing anything;
- `delay_s`: POSTs are processed (messages accepted) and the answer is then held
  this long, or until `release()`: a lost response after acceptance;
- `deny_auth = True`: every request gets 401;
- `batch_error = "…"`: POST /batches answers 400 with that error_message, storing
  nothing (a batch-level refusal);
- `senders`: the aliases the account may use (also the GET /senders answer).
Read back: `accepted` (Counter: recipient `77…` -> SMS accepted), `count(number)`,
`total`, `messages` (client_message_id -> stored record), and the server's
`requests`.

Reports (seed 003 "Получение отчетов (DR)"): SMSGW POSTs JSON to the client's URL
(`callback_url`) and expects 204 (or 200/201 "OK"):
- `deliver(number, status="DELIVERED")`: `{"delivery_report": [...]}` for the last
  message to `number`, naming it by its client_message_id; `delivery_report(...)` builds
  one entry and `post_reports(entries)` sends several in one request (as SMSGW batches
  them), or the same ones again;
- `send_reply(number, text)`: `{"incoming_report": [...]}` from `number` to our short code;
- a report sent while `delay_s` holds the answer is one that comes before the client
  knows the message was accepted;
- `reports`: `(body, HTTP status)` of each request sent.
Times are SMSGW's local time (Asia/Almaty).
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import threading
from collections import Counter
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from tests.httpfake import RecordedRequest, Reply, call_back

ALMATY = ZoneInfo("Asia/Almaty")

BASE = "/app/smsgw/rest/v2"
DUPLICATE_TEXT = "Duplicate client_message_id, should be unique for each message."
# Texts of the seed's error directory, for rejections the fake makes itself.
ERROR_TEXTS = {
    10: "Invalid sender / source address",
    11: "Invalid recipient / destination address (format should be 7xxxYYYzzzz)",
    23: DUPLICATE_TEXT,
    30: "Subscriber number is banned from receiving SMS. Possible reasons: subscriber "
    "complaint, m2m device, corporate number restriction.",
    34: "Subscriber number is in provider's black list / provider doesn't have routing "
    "set up for this number (MNP issue).",
    88: "Throttling error; ESME has exceeded allowed message limits.",
}
_RECIPIENT = re.compile(r"^77\d{9}$")
_JSON = {"Content-Type": "application/json; charset=utf-8"}


class _Refused(Exception):
    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class FakeKcell:
    """Handler for `ProviderServer`: the documented SMSGW2 REST behaviour plus knobs."""

    BASE = BASE
    BATCH_LIMIT = 200

    def __init__(
        self,
        username: str = "mailbridge",
        password: str = "secret",
        senders: tuple[str, ...] = ("MAILBRIDGE", "INFO"),
    ) -> None:
        self.username = username
        self.password = password
        self.senders = list(senders)
        self.deny_auth = False
        self.batch_error: str | None = None
        self.delay_s = 0.0
        self.rejections: dict[str, tuple[int, str]] = {}
        self.accepted: Counter[str] = Counter()
        self.messages: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, list[str]] = {}
        self._by_id: dict[str, dict[str, Any]] = {}  # message_id -> record
        self._failures: list[int] = []
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._next_id = 5916504900
        self.callback_url: str | None = None
        self.reports: list[tuple[dict[str, Any], int]] = []
        self._mo_ids = itertools.count(456795)

    # -- knobs ---------------------------------------------------------------

    def reject_number(self, number: str, code: int = 11, message: str | None = None) -> None:
        """Refuse SMS to `number` (+77… or 77…) with a directory error."""
        self.rejections[number.removeprefix("+")] = (code, message or ERROR_TEXTS.get(code, "?"))

    def fail_next(self, n: int = 1, status: int = 503) -> None:
        """The next `n` requests answer `status` and change nothing."""
        with self._lock:
            self._failures.extend([status] * n)

    def release(self) -> None:
        """End every current and future `delay_s` wait (call at test teardown)."""
        self._released.set()

    def count(self, number: str) -> int:
        """SMS accepted for `number` (+77… or 77…)."""
        return self.accepted[number.removeprefix("+")]

    @property
    def total(self) -> int:
        """SMS accepted in all."""
        return sum(self.accepted.values())

    # -- reports (SMSGW -> the client's URL) ---------------------------------

    def last_message(self, number: str) -> dict[str, Any]:
        """The record of the last message accepted for `number` (+77… or 77…)."""
        recipient = number.removeprefix("+")
        with self._lock:
            found = [
                m for m in self.messages.values()
                if m.get("recipient") == recipient and m["message_status"] != "UNDELIVERABLE"
            ]  # fmt: skip
        if not found:
            raise LookupError(f"SMSGW accepted no message for {number}")
        return found[-1]

    def delivery_report(
        self,
        number: str,
        status: str = "DELIVERED",
        *,
        error_code: str = "",
        error_message: str = "",
        at: datetime | None = None,
    ) -> dict[str, Any]:
        """One `delivery_report` entry for the last message to `number`."""
        record = self.last_message(number)
        when = (at or datetime.now(ALMATY)).astimezone(ALMATY).strftime("%Y-%m-%d %H:%M:%S")
        return {
            "client_message_id": record["client_message_id"],
            "message_id": record["message_id"],
            "status": status,
            "error_code": error_code,
            "error_message": error_message,
            "segment_count": 1,
            "init_time": when,
            "sent_time": when,
            "sent_confirm_time": when,
            "status_time": when,
            "rn_code": "02",
            "retry_count": "0",
        }

    def post(self, body: dict[str, Any]) -> int:
        """POST a report document to `callback_url`; the HTTP status it answered."""
        if self.callback_url is None:
            raise RuntimeError("FakeKcell.callback_url is not set")
        status = call_back("POST", self.callback_url, json_body=body)
        with self._lock:
            self.reports.append((body, status))
        return status

    def post_reports(self, entries: list[dict[str, Any]]) -> int:
        return self.post({"delivery_report": entries})

    def deliver(self, number: str, status: str = "DELIVERED", **kw: Any) -> int:
        """Report the last message to `number`; the HTTP status (SMSGW expects 204)."""
        return self.post_reports([self.delivery_report(number, status, **kw)])

    def send_reply(
        self, number: str, text: str, *, at: datetime | None = None, short_code: str = "9090"
    ) -> int:
        """An incoming (MO) message from `number`; the HTTP status."""
        when = (at or datetime.now(ALMATY)).astimezone(ALMATY).strftime("%Y-%m-%d %H:%M:%S")
        entry = {
            "message_id": next(self._mo_ids),
            "sender": number.removeprefix("+"),
            "recipient": short_code,
            "text": text,
            "segment_count": 1,
            "receive_time": when,
            "rn_code": "02",
        }
        return self.post({"incoming_report": [entry]})

    # -- the API -------------------------------------------------------------

    def __call__(self, req: RecordedRequest) -> Reply:
        if not self._authorized(req):
            return Reply(401, "", {"WWW-Authenticate": 'Basic realm="SMSGW"'})
        with self._lock:
            if self._failures:
                status = self._failures.pop(0)
                return Reply(status, f"<html><body>{status}</body></html>", {})
        if not req.path.startswith(BASE):
            return Reply(404, "")
        path = req.path[len(BASE) :].rstrip("/")
        if req.method == "POST" and path in ("/messages", "/batches"):
            with self._lock:
                reply = self._post_messages(req) if path == "/messages" else self._post_batch(req)
            if self.delay_s:
                self._released.wait(self.delay_s)
            return reply
        if req.method == "GET":
            return self._get(path)
        return Reply(405, "")

    def _authorized(self, req: RecordedRequest) -> bool:
        expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return not self.deny_auth and req.headers.get("authorization") == f"Basic {expected}"

    def _post_messages(self, req: RecordedRequest) -> Reply:
        try:
            msg = self._validate(_body(req))
            if msg["client_message_id"] in self.messages:
                raise _Refused(23, DUPLICATE_TEXT)
        except _Refused as exc:
            return _error(exc.message)
        message_id = self._store(msg, batch_id=None)
        headers = {**_JSON, "Location": f"{BASE}/messages/{message_id}"}
        return Reply(201, json.dumps({"message_id": message_id}), headers)

    def _post_batch(self, req: RecordedRequest) -> Reply:
        try:
            body = _body(req)
            items = body.get("messages")
            if not isinstance(items, list) or not 1 <= len(items) <= self.BATCH_LIMIT:
                raise _Refused(85, "Invalid number of messages")
        except _Refused as exc:
            return _error(exc.message)
        if self.batch_error is not None:
            return _error(self.batch_error)
        checked: list[tuple[dict[str, Any], _Refused | None]] = []
        seen: set[str] = set()
        for item in items:
            try:
                msg = self._validate(item)
                cid = msg["client_message_id"]
                if cid in self.messages or cid in seen:
                    raise _Refused(23, DUPLICATE_TEXT)
                seen.add(cid)
                checked.append((msg, None))
            except _Refused as exc:
                if body.get("fail-fast") is True:
                    return _error(exc.message)
                checked.append((item if isinstance(item, dict) else {}, exc))
        batch_id = str(self._new_id())
        self.batches[batch_id] = []
        for msg, refused in checked:
            self._store(msg, batch_id=batch_id, refused=refused)
        headers = {**_JSON, "Location": f"{BASE}/batches/{batch_id}"}
        return Reply(201, json.dumps({"batch_id": batch_id}), headers)

    def _validate(self, msg: Any) -> dict[str, Any]:
        if not isinstance(msg, dict):
            raise _Refused(None, "Message must be a json object")
        for name in ("client_message_id", "recipient", "message_text"):
            if not isinstance(msg.get(name), str) or not msg[name]:
                raise _Refused(None, f"Field {name} is required")
        if len(msg["client_message_id"]) > 64:
            raise _Refused(None, "Field client_message_id is longer than 64 characters")
        sender = msg.get("sender")
        if sender is not None and sender not in self.senders:
            raise _Refused(10, f"User can't use alias {sender} to send messages")
        if not _RECIPIENT.match(msg["recipient"]):
            raise _Refused(11, ERROR_TEXTS[11])
        if msg["recipient"] in self.rejections:
            raise _Refused(*self.rejections[msg["recipient"]])
        return msg

    def _store(
        self, msg: dict[str, Any], batch_id: str | None, refused: _Refused | None = None
    ) -> str:
        message_id = str(self._new_id())
        record = {
            **msg,
            "message_id": message_id,
            "batch_id": batch_id,
            "message_status": "UNDELIVERABLE" if refused else "NEW",
            "error_code": None if refused is None else str(refused.code or ""),
            "error_message": None if refused is None else refused.message,
        }
        cid = msg.get("client_message_id")
        if refused is None:
            self.accepted[msg["recipient"]] += 1
        if isinstance(cid, str) and cid not in self.messages:
            # A refused duplicate never replaces the accepted original.
            self.messages[cid] = record
        if batch_id is not None:
            self.batches[batch_id].append(message_id)
        self._by_id[message_id] = record
        return message_id

    def _get(self, path: str) -> Reply:
        parts = path.strip("/").split("/")
        with self._lock:
            if parts == ["senders"]:
                return Reply(200, json.dumps(self.senders), _JSON)
            if len(parts) == 2 and parts[0] == "messages" and parts[1] in self._by_id:
                return Reply(200, json.dumps(self._by_id[parts[1]]), _JSON)
            if len(parts) == 2 and parts[0] == "batches" and parts[1] in self.batches:
                records = [self._by_id[i] for i in self.batches[parts[1]]]
                return Reply(200, json.dumps(records), _JSON)
            if len(parts) == 4 and parts[0] == "users" and parts[2] == "client_messages":
                if parts[1] == self.username and parts[3] in self.messages:
                    return Reply(200, json.dumps(self.messages[parts[3]]), _JSON)
        return Reply(404, "")

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id


def _body(req: RecordedRequest) -> dict[str, Any]:
    if not req.headers.get("content-type", "").startswith("application/json"):
        raise _Refused(None, "Content-Type must be application/json")
    try:
        body = json.loads(req.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Refused(None, "Request body is not valid json") from exc
    if not isinstance(body, dict):
        raise _Refused(None, "Request body must be a json object")
    return body


def _error(message: str) -> Reply:
    return Reply(400, json.dumps({"error_message": message}, ensure_ascii=False), _JSON)
