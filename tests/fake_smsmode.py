"""A fake sMsmode HTTP API 1.6 (seeds/002) to plug into `tests.httpfake.ProviderServer`.

    fake = FakeSmsmode(access_token="tok")
    with ProviderServer(fake) as server:
        config = SmsmodeProviderConfig(type="smsmode", url=server.url + "/http/1.6/",
                                       access_token="tok")

Endpoints (under any path prefix): `sendSMS.do` (GET or POST form; `message` decoded with the
charset the Content-Type declares, else UTF-8 when `classe_msg=9`, else ISO-8859-15, the API
default; `numero` a comma list, national `06…` or international `336…`), `sendSMSBatch.do`
(multipart CSV upload in ISO-8859-15 with a `numero,message,emetteur,refClient` header row,
`accessToken` and the other parameters in the query string) and `credit.do` (the balance).
Answers are `code | description | smsID` as the seed documents; every answer code is for the
whole request, as on the real platform.

Knobs (set them before or between requests; all are thread-safe enough for tests):
- `access_token`: the only token accepted; any other gets `32 | Erreur d'authentification`.
- `reject[number] = code`: a request that contains `number` (E.164 `+336…`) is refused as a
  whole with `code | <its description>` (e.g. 33 credit, 35 parameters, 32 auth) and
  nothing of it is sent.
- `fail_next(n, status=503, code=None)`: the next `n` API requests get HTTP `status` (429,
  503, …), or, with `code`, HTTP 200 and that answer code (31, 50); nothing is sent.
- `hold`: a `threading.Event` (default None); while it is unset, each request waits for it
  (at most `hold_timeout` s) BEFORE doing anything, so a short client timeout fires; with
  `hold_after_accept = True` it waits AFTER the SMS were counted, to model an answer lost on
  the way back. Tests `set()` it to release the server threads.
- `balance`: the text `credit.do` answers (default "212.5").

Records: `accepted` counts accepted SMS per E.164 number (`Counter`, so tests can assert
"every recipient submitted exactly once"); `sms` lists every accepted SMS as a `FakeSms`
(to, text, sender, ref_client, nbr_msg, unicode, sms_id, endpoint). `wait_accepted(n)`
blocks until `n` SMS in all were accepted (for answers the client gave up on), no sleeping.

Notifications (seed 002 items 12 and 14), GET requests to the client's server:
- `send_status(number, statut=11)`: the delivery notification of the last SMS to `number`
  (`numero, date_reception, statut, smsID, refClient, mcc_mnc`), sent to the
  `notification_url` that SMS was sent with, else to `callback_url` (None: an error);
- `send_reply(number, text)`: a reply from `number` (`numero` our short code, `message`,
  `emetteur`, `date_reception`, `smsID` and `refClient` of its last SMS, `responseID`), sent
  to the SMS's `notification_url_reponse`, else to `reply_url` (the account setting);
- `auto_status = 11`: every accepted SMS gets that notification at once, from a thread
  (it may come before the sendSMS answer reaches the client);
- `status_query(...)`/`reply_query(...)` build a notification without sending it and
  `notify(url, query)` sends one (the same notification twice); `notifications` records
  `(url, query, HTTP status)` of each.
"""

from __future__ import annotations

import csv
import io
import itertools
import re
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo

from tests.httpfake import RecordedRequest, Reply, call_back

PARIS = ZoneInfo("Europe/Paris")  # sMsmode writes its times in French local time

DESCRIPTIONS = {
    0: "Accepté",
    31: "Erreur interne",
    32: "Erreur d'authentification",
    33: "Crédits insuffisants",
    35: "Paramètre obligatoire manquant",
    50: "Temporairement inaccessible",
}


@dataclass(frozen=True)
class FakeSms:
    """One accepted SMS, as the fake platform understood it."""

    to: str  # E.164 with '+'
    text: str
    sender: str | None  # None: account default
    ref_client: str | None
    nbr_msg: int | None
    unicode: bool  # classe_msg=9
    sms_id: str  # smsID of a sendSMS.do request, campaign id of an upload
    endpoint: str
    notification_url: str | None = None  # where its delivery notification goes
    reply_url: str | None = None  # notification_url_reponse: where replies to it go


def _e164(numero: str) -> str | None:
    """'0612345678' (France only) or '33612345678' → '+33612345678'; None if invalid."""
    n = numero.strip()
    if not n.isascii() or not n.isdigit():
        return None
    if n.startswith("0") and len(n) == 10:
        return "+33" + n[1:]
    return "+" + n if 8 <= len(n) <= 15 and not n.startswith("0") else None


def _charset(content_type: str, default: str) -> str:
    m = re.search(r"charset=\"?([\w.:-]+)", content_type, re.I)
    return m.group(1) if m else default


def _multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """(lower-cased headers, raw content) of every part of a multipart/form-data body."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        return []
    parts = []
    for chunk in body.split(b"--" + m.group(1).encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, data.removesuffix(b"\r\n")))
    return parts


class FakeSmsmode:
    """Handler for ProviderServer speaking the sMsmode HTTP 1.6 wire format."""

    def __init__(self, access_token: str = "test-token", balance: str = "212.5") -> None:
        self.access_token = access_token
        self.balance = balance
        self.reject: dict[str, int] = {}
        self.hold: threading.Event | None = None
        self.hold_after_accept = False
        self.hold_timeout = 30.0
        self.accepted: Counter[str] = Counter()
        self.sms: list[FakeSms] = []
        self._failures: list[tuple[int, int | None]] = []
        self._ids = 0
        self._lock = threading.Condition()
        self.callback_url: str | None = None
        self.reply_url: str | None = None
        self.auto_status: int | None = None
        self.notifications: list[tuple[str, dict[str, str], int]] = []
        self._response_ids = itertools.count(1)

    def fail_next(self, n: int, status: int = 503, code: int | None = None) -> None:
        """Answer the next `n` API requests with HTTP `status`, or HTTP 200 and `code`."""
        with self._lock:
            self._failures += [(status, code)] * n

    def wait_accepted(self, total: int, timeout: float = 30.0) -> bool:
        """Block until at least `total` SMS were accepted; False if `timeout` s pass first."""
        with self._lock:
            return self._lock.wait_for(lambda: sum(self.accepted.values()) >= total, timeout)

    def __call__(self, req: RecordedRequest) -> Reply:
        endpoint = req.path.rsplit("/", 1)[-1]
        if endpoint not in ("sendSMS.do", "sendSMSBatch.do", "credit.do"):
            return Reply(404, "Not Found")
        if self.hold is not None and not self.hold_after_accept:
            self.hold.wait(self.hold_timeout)
        with self._lock:
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            status, code = failure
            return self._answer(code) if code is not None else Reply(status, f"HTTP {status}")
        params = {k: v[-1] for k, v in req.query.items()}
        content_type = req.headers.get("content-type", "")
        if content_type.startswith("application/x-www-form-urlencoded"):
            fields = parse_qs(req.body.decode("ascii"), keep_blank_values=True, encoding="latin-1")
            params.update({k: v[-1] for k, v in fields.items()})
            params = self._decode_text(params, content_type)
        if params.get("accessToken") != self.access_token:
            return self._answer(32)
        if endpoint == "credit.do":
            return Reply(200, self.balance)
        if endpoint == "sendSMS.do":
            rows = self._single(req, params)
        else:
            rows = self._batch(req, params)
        if rows is None:
            return self._answer(35)
        for to, _, _, _ in rows:
            if to in self.reject:
                return self._answer(self.reject[to])
        with self._lock:
            self._ids += 1
            sms_id = f"fake{self._ids:08d}"
            nbr = params.get("nbr_msg")
            accepted = []
            for to, text, sender, ref in rows:
                unicode = params.get("classe_msg") == "9"
                nbr_msg = int(nbr) if nbr and nbr.isdigit() else None
                sms = FakeSms(
                    to, text, sender, ref, nbr_msg, unicode, sms_id, endpoint,
                    params.get("notification_url") or None,
                    params.get("notification_url_reponse") or None,
                )  # fmt: skip
                self.sms.append(sms)
                accepted.append(sms)
                self.accepted[to] += 1
            self._lock.notify_all()
        if self.auto_status is not None:
            threading.Thread(
                target=self._auto_status, args=(accepted, self.auto_status), daemon=True
            ).start()
        if self.hold is not None and self.hold_after_accept:
            self.hold.wait(self.hold_timeout)
        return self._answer(0, sms_id)

    # -- notifications (sMsmode -> the client's server) ----------------------------------

    def last_sms(self, number: str) -> FakeSms:
        """The last SMS accepted for `number` (E.164 with '+')."""
        with self._lock:
            found = [s for s in self.sms if s.to == number]
        if not found:
            raise LookupError(f"sMsmode accepted no SMS for {number}")
        return found[-1]

    def status_query(
        self, number: str, statut: int = 11, *, at: datetime | None = None,
        sms: FakeSms | None = None,
    ) -> tuple[str, dict[str, str]]:  # fmt: skip
        """(url, query) of the delivery notification of the last SMS to `number`."""
        sms = sms or self.last_sms(number)
        url = sms.notification_url or self.callback_url
        if url is None:
            raise RuntimeError(f"no notification_url for {number} and no callback_url")
        when = (at or datetime.now(PARIS)).astimezone(PARIS).strftime("%Y-%m-%d %H:%M:%S")
        query = {
            "numero": sms.to.removeprefix("+"),
            "date_reception": when,
            "statut": str(statut),
            "smsID": sms.sms_id,
            "refClient": sms.ref_client or "",
            "mcc_mnc": "20801",
        }
        return url, query

    def reply_query(
        self, number: str, text: str, *, at: datetime | None = None, short_code: str = "36034"
    ) -> tuple[str, dict[str, str]]:
        """(url, query) of a reply from `number` to its last SMS."""
        sms = self.last_sms(number)
        url = sms.reply_url or self.reply_url
        if url is None:
            raise RuntimeError(f"no notification_url_reponse for {number} and no reply_url")
        when = (at or datetime.now(PARIS)).astimezone(PARIS).strftime("%d%m%Y-%H%M%S")
        query = {
            "numero": short_code,
            "message": text,
            "emetteur": number.removeprefix("+"),
            "date_reception": when,
            "smsID": sms.sms_id,
            "refClient": sms.ref_client or "",
            "responseID": f"resp{next(self._response_ids):06d}",
        }
        return url, query

    def notify(self, url: str, query: dict[str, str]) -> int:
        """GET `url` with the notification's query; the HTTP status it answered."""
        status = call_back("GET", url, params=query)
        with self._lock:
            self.notifications.append((url, query, status))
        return status

    def send_status(self, number: str, statut: int = 11, *, at: datetime | None = None) -> int:
        return self.notify(*self.status_query(number, statut, at=at))

    def send_reply(self, number: str, text: str, *, at: datetime | None = None) -> int:
        return self.notify(*self.reply_query(number, text, at=at))

    def _auto_status(self, accepted: list[FakeSms], statut: int) -> None:
        for sms in accepted:
            self.notify(*self.status_query(sms.to, statut, sms=sms))

    @staticmethod
    def _decode_text(params: dict[str, str], content_type: str) -> dict[str, str]:
        # parse_qs ran with latin-1, i.e. bytes as code points: re-decode in the real charset.
        default = "utf-8" if params.get("classe_msg") == "9" else "iso-8859-15"
        charset = _charset(content_type, default)
        return {k: v.encode("latin-1").decode(charset, errors="replace") for k, v in params.items()}

    @staticmethod
    def _single(
        req: RecordedRequest, params: dict[str, str]
    ) -> list[tuple[str, str, str | None, str | None]] | None:
        numbers = [_e164(n) for n in params.get("numero", "").split(",")]
        if "message" not in params or not numbers or None in numbers:
            return None
        if req.method == "GET" and len(numbers) > 300:
            return None  # "Limité à 300 destinataires en HTTP GET"
        sender, ref = params.get("emetteur") or None, params.get("refClient") or None
        return [(n, params["message"], sender, ref) for n in numbers if n is not None]

    @staticmethod
    def _batch(
        req: RecordedRequest, params: dict[str, str]
    ) -> list[tuple[str, str, str | None, str | None]] | None:
        if req.method != "POST":
            return None
        files = [
            d
            for h, d in _multipart(req.body, req.headers.get("content-type", ""))
            if "filename=" in h.get("content-disposition", "")
        ]
        if not files:
            return None
        reader = csv.reader(io.StringIO(files[0].decode("iso-8859-15"), newline=""))
        rows = list(reader)
        if not rows or [c.strip() for c in rows[0]][:2] != ["numero", "message"]:
            return None
        header = [c.strip() for c in rows[0]]
        out = []
        for row in rows[1:]:
            if not row:
                continue
            cells = dict(zip(header, row, strict=False))
            to = _e164(cells.get("numero", ""))
            if to is None or "message" not in cells:
                return None
            out.append(
                (
                    to,
                    cells["message"],
                    cells.get("emetteur") or None,
                    cells.get("refClient") or None,
                )
            )
        return out or None

    @staticmethod
    def _answer(code: int, sms_id: str | None = None) -> Reply:
        body = f"{code} | {DESCRIPTIONS.get(code, 'Erreur')}" + (f" | {sms_id}" if sms_id else "")
        return Reply(200, body.encode("iso-8859-15"), {"Content-Type": "text/plain"})
