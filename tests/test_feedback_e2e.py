"""Delivery reports, replies, STOP, health and metrics end to end (SPEC section 7),
with real parts: the daemon as a subprocess, the provider fakes answering its
HTTP calls and calling its receiver back over real HTTP the way each provider
does (CM's GET status report, sMsmode's GET notifications to the
notification_url it was sent, Kcell's JSON POSTs expecting 204), reports read
from the Maildir, /metrics read with the real curl.

The path every other test builds on is `test_email_sms_not_callback_etatdlr`:
email -> SMS accepted by Kcell -> Not -> delivery report -> etatDlr mail.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from tests.fake_cm import FakeCm
from tests.fake_kcell import FakeKcell
from tests.fake_smsmode import FakeSmsmode
from tests.httpfake import ProviderServer
from tests.support import (
    KEYID,
    REPORTS_TO,
    SENDER,
    DaemonProcess,
    config_dict,
    maildir_reports,
    not_codes,
    report_body,
    request_mail,
    wait_for,
    wait_reports,
)

pytestmark = pytest.mark.e2e

TOKEN = "e2e-callback-token-5f0c2a"
KEYID_B = "b296464ce012b8ab710b"  # the account with delivery_reports: true and reply_to
DLR_TO = "dlr@client.test"
REPLIES_TO = "replies@client.test"
PARIS = ZoneInfo("Europe/Paris")
FAST = {"retry_backoff_s": 0.05, "timeout_s": 20}
# Routes of both accounts: Kazakh numbers through Kcell, 061… through sMsmode, the
# other French numbers through CM.
ROUTES = [
    {"prefix": "+7", "providers": ["kcell"]},
    {"prefix": "+3361", "providers": ["smsmode"]},
    {"prefix": "+33", "providers": ["cm"]},
]
# The receiver's limits in these tests: a request head must be complete within
# keepalive_s + body_timeout_s = 2 s, a body read within 1 s.
HTTP_LIMITS = {"keepalive_s": 1.0, "body_timeout_s": 1.0, "max_body_bytes": 16384}
HEAD_BOUND_S = 2.0


def free_port() -> int:
    """A loopback port for the receiver: http.public_url must name it before start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def provider_configs(cm: str, smsmode: str, kcell: str) -> dict[str, Any]:
    return {
        "cm": {"type": "cm", "url": cm + FakeCm.PATH, "product_token": FakeCm.TOKEN, **FAST},
        "smsmode": {"type": "smsmode", "url": smsmode + "/http/1.6/",
                    "access_token": "test-token", **FAST},
        "kcell": {"type": "kcell", "url": kcell + FakeKcell.BASE, "username": "mailbridge",
                  "password": "secret", **FAST},
    }  # fmt: skip


@dataclass
class Bridge:
    """The daemon, the three provider fakes and the receiver's base URL."""

    tmp: Path
    proc: DaemonProcess
    cm: FakeCm
    smsmode: FakeSmsmode
    kcell: FakeKcell
    base: str

    def hook(self, name: str, token: str = TOKEN) -> str:
        return f"{self.base}/hooks/{token}/{name}"

    @property
    def maildir(self) -> Path:
        return self.proc.maildir

    def restart(self) -> None:
        """SIGTERM, then a new daemon on the same store and the same HTTP port."""
        assert self.proc.terminate() == 0, self.proc.log()[-3000:]
        self.proc = DaemonProcess(self.tmp, self.proc.config).start()
        wait_for(lambda: self.healthz()[0] == 200, what="/healthz 200 after the restart")

    def healthz(self) -> tuple[int, str]:
        resp = httpx.get(self.base + "/healthz", timeout=30)
        return resp.status_code, resp.text

    def db(self) -> contextlib.closing[sqlite3.Connection]:
        return read_store(self.tmp)

    def events(self) -> int:
        with self.db() as db:
            return int(db.execute("SELECT count(*) FROM events").fetchone()[0])


def read_store(tmp: Path) -> contextlib.closing[sqlite3.Connection]:
    """The daemon's store, read-only (WAL: reads beside the running daemon)."""
    uri = f"file:{tmp / 'mailbridge.db'}?mode=ro"
    return contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30))


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    tmp = tmp_path_factory.mktemp("feedback")
    cm, smsmode, kcell = FakeCm(), FakeSmsmode(), FakeKcell()
    with ProviderServer(cm) as cm_s, ProviderServer(smsmode) as sms_s, ProviderServer(kcell) as k_s:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        raw = config_dict(tmp, default_sender="INFO", routes=ROUTES)
        del raw["accounts"][0]["provider"]
        raw["accounts"].append(
            {**copy.deepcopy(raw["accounts"][0]), "keyid": KEYID_B, "name": "dlr",
             "delivery_reports": True, "reply_to": REPLIES_TO}
        )  # fmt: skip
        raw["providers"].update(provider_configs(cm_s.url, sms_s.url, k_s.url))
        raw["http"] = {"listen": f"127.0.0.1:{port}", "token": TOKEN, "public_url": base,
                       **HTTP_LIMITS}  # fmt: skip
        proc = DaemonProcess(tmp, raw).start()
        b = Bridge(tmp, proc, cm, smsmode, kcell, base)
        # CM and Kcell take the webhook URL in their consoles; sMsmode is sent
        # the notification URLs with each message (http.public_url).
        cm.callback_url = b.hook("cm")
        kcell.callback_url = b.hook("kcell")
        try:
            assert proc.http_port == port
            wait_for(lambda: b.healthz()[0] == 200, what="/healthz 200")
            yield b
        finally:
            kcell.release()
            cm.release()
            b.proc.stop()


# -- helpers ----------------------------------------------------------------------------


def submit(proc: DaemonProcess, **fields: str) -> tuple[str, EmailMessage]:
    """Mail one request (with a Message-ID); its emailId and the message."""
    email_id = fields.pop("emailId", None) or secrets.token_hex(6)
    msg = request_mail(emailId=email_id, **fields)
    msg["Message-ID"] = make_msgid(domain="client.test")
    code, text = proc.send(msg)
    assert code == 250, text
    return email_id, msg


def sent_ok(proc: DaemonProcess, **fields: str) -> tuple[str, EmailMessage]:
    """Submit a request and wait for its Not: every recipient code 0."""
    email_id, msg = submit(proc, **fields)
    codes = not_codes(wait_reports(proc.maildir, email_id)["not"][0])
    assert all(code == 0 for _, code in codes), codes
    return email_id, msg


def mails(maildir: Path, subject: str) -> list[EmailMessage]:
    return [m for m in maildir_reports(maildir) if str(m["Subject"]) == subject]


def wait_mails(maildir: Path, subject: str, n: int = 1, timeout: float = 30) -> list[EmailMessage]:
    return wait_for(
        lambda: (found := mails(maildir, subject)) and len(found) >= n and found,
        timeout=timeout,
        what=f"{n} mail(s) with Subject {subject!r}",
    )


def paris(at: datetime) -> str:
    return at.astimezone(PARIS).strftime("%Y-%m-%d %H:%M:%S")


def etat_dlr(email_id: str, rows: list[tuple[int, str, str, str, str]]) -> bytes:
    """The etatDlr body of SPEC section 7: (n, tel, statut, message, date) rows."""
    text = (
        '<?xml version="1.0" encoding="ISO-8859-1"?>\n'
        f"<etatDlr>\n<emailId>{email_id}</emailId>\n</etatDlr>\n"
    )
    for n, tel, statut, message, date in rows:
        text += (
            f"<dlr{n}>\n<tel{n}>{tel}</tel{n}>\n<statut{n}>{statut}</statut{n}>\n"
            f"<message{n}>{message}</message{n}>\n<date{n}>{date}</date{n}>\n</dlr{n}>\n"
        )
    return text.encode("iso-8859-1")


_BARRIERS = itertools.count(1)


def barrier(bridge: Bridge) -> None:
    """A complete, unrelated Kcell round: callbacks are matched in the order they
    were stored, so once its etatDlr is out and no report mail is pending, whatever
    an earlier callback caused is in the Maildir."""
    number = f"+7701399{next(_BARRIERS):04d}"
    email_id, _ = sent_ok(bridge.proc, num=number, sms="barrier", emailDlr=DLR_TO)
    assert bridge.kcell.deliver(number) == 204
    wait_mails(bridge.maildir, f"etatDlr {email_id}")

    def pending() -> int:
        with bridge.db() as db:
            query = "SELECT count(*) FROM reports WHERE state != 'sent'"
            return int(db.execute(query).fetchone()[0])

    wait_for(lambda: pending() == 0, what="no report mail pending")


# -- delivery reports -------------------------------------------------------------------


def test_email_sms_not_callback_etatdlr(bridge: Bridge) -> None:
    """email -> SMS accepted by Kcell -> Not -> Kcell's delivery report (POST, 204)
    -> one etatDlr mail to <emailDlr>, byte for byte."""
    email_id, _ = submit(
        bridge.proc, num="+7 701 100 0001", sms="Ваш код 4521", emailDlr=DLR_TO,
        emailId="kz-dlr-1",
    )  # fmt: skip
    assert not_codes(wait_reports(bridge.maildir, email_id)["not"][0]) == [("+7 701 100 0001", 0)]
    record = bridge.kcell.last_message("+77011000001")
    assert record["message_text"] == "Ваш код 4521"
    assert mails(bridge.maildir, "etatDlr kz-dlr-1") == []
    at = datetime(2026, 7, 14, 8, 30, 5, tzinfo=UTC)  # 13:30:05 in Almaty, 10:30:05 in Paris
    assert bridge.kcell.deliver("+77011000001", "DELIVERED", at=at) == 204
    (mail,) = wait_mails(bridge.maildir, "etatDlr kz-dlr-1")
    assert report_body(mail) == (
        b'<?xml version="1.0" encoding="ISO-8859-1"?>\n'
        b"<etatDlr>\n<emailId>kz-dlr-1</emailId>\n</etatDlr>\n"
        b"<dlr1>\n<tel1>+7 701 100 0001</tel1>\n<statut1>DELIVRE</statut1>\n"
        b"<message1>DELIVERED</message1>\n<date1>2026-07-14 10:30:05</date1>\n</dlr1>\n"
    )
    assert (mail["To"], mail["Auto-Submitted"]) == (DLR_TO, "auto-replied")
    assert mail.get_content_charset() == "iso-8859-1"


def test_cm_reports_etatdlr_to_emailnot_with_delivery_reports(bridge: Bridge) -> None:
    """Account with delivery_reports: true, no <emailDlr>: the etatDlr goes to
    emailNot, once both recipients are final, with CM's texts (GET reports naming
    the REFERENCE CM was sent)."""
    email_id, _ = sent_ok(
        bridge.proc, keyid=KEYID_B, num1="06 20 00 00 01", num2="+33620000002", sms="RDV 9h",
    )  # fmt: skip
    first, second = bridge.cm.last_sent("+33620000001"), bridge.cm.last_sent("+33620000002")
    assert first.reference and first.reference == second.reference  # one request, one reference
    at1 = datetime(2026, 11, 30, 23, 59, 58, tzinfo=UTC)  # already Dec 1st in Paris
    at2 = datetime(2026, 12, 1, 7, 0, 0, tzinfo=UTC)
    assert bridge.cm.deliver("0033620000001", 2, at=at1) == 200
    assert bridge.cm.deliver("+33620000002", 3, at=at2) == 200
    (mail,) = wait_mails(bridge.maildir, f"etatDlr {email_id}")
    assert mail["To"] == REPORTS_TO
    assert report_body(mail) == etat_dlr(
        email_id,
        [
            (1, "06 20 00 00 01", "DELIVRE", "Delivered", "2026-12-01 00:59:58"),
            (2, "+33620000002", "NON_DELIVRE", "Absent subscriber", "2026-12-01 08:00:00"),
        ],
    )


def test_smsmode_notification_url_and_automatic_report(bridge: Bridge) -> None:
    """sMsmode is sent our notification URLs with the message (http.public_url);
    its delivery notification, sent there at once after acceptance, makes the etatDlr
    (statut 11 'Reçu', ISO-8859-1)."""
    bridge.smsmode.auto_status = 11
    try:
        email_id, _ = sent_ok(bridge.proc, num="0611000001", sms="Bonjour", emailDlr=DLR_TO)
    finally:
        bridge.smsmode.auto_status = None
    sms = bridge.smsmode.last_sms("+33611000001")
    assert sms.notification_url == bridge.hook("smsmode/dlr")
    assert sms.reply_url == bridge.hook("smsmode/mo")
    (mail,) = wait_mails(bridge.maildir, f"etatDlr {email_id}")
    url, query, status = wait_for(
        lambda: [n for n in bridge.smsmode.notifications if n[1]["smsID"] == sms.sms_id],
        what="the automatic notification",
    )[0]
    assert (url, status) == (bridge.hook("smsmode/dlr"), 200)
    assert report_body(mail) == etat_dlr(
        email_id, [(1, "0611000001", "DELIVRE", "Re\xe7u", query["date_reception"])]
    )
    assert b"<message1>Re\xe7u</message1>" in report_body(mail)


def test_the_same_report_twice_is_one_etatdlr(bridge: Bridge) -> None:
    """CM and Kcell retry a report they think lost: the second copy changes nothing;
    a later contradicting final status does not either (the first final wins)."""
    cm_id, _ = sent_ok(bridge.proc, num="0620000011", sms="x", emailDlr=DLR_TO)
    kz_id, _ = sent_ok(bridge.proc, num="+77011000011", sms="x", emailDlr=DLR_TO)
    before = bridge.events()
    query = bridge.cm.status_report("+33620000011", 2)
    entry = bridge.kcell.delivery_report("+77011000011", "DELIVERED")
    assert [bridge.cm.send_report(query) for _ in range(2)] == [200, 200]
    assert [bridge.kcell.post_reports([entry]) for _ in range(2)] == [204, 204]
    assert bridge.events() == before + 2
    assert bridge.cm.deliver("+33620000011", 3) == 200  # stored, never over DELIVRE
    barrier(bridge)
    for email_id in (cm_id, kz_id):
        (mail,) = mails(bridge.maildir, f"etatDlr {email_id}")
        assert b"<statut1>DELIVRE</statut1>" in report_body(mail)
    with bridge.db() as db:
        status = db.execute("SELECT dlr_status FROM recipients WHERE tel = '0620000011'")
        assert status.fetchall() == [("DELIVRE",)]


def test_report_before_its_message_is_recorded(bridge: Bridge) -> None:
    """Kcell accepts, reports DELIVERED while its own answer is still on the way:
    the report is kept, matched once the answer is recorded, one etatDlr, soon."""
    kcell = bridge.kcell
    kcell.delay_s = 60  # the answer is held until release()
    try:
        email_id, _ = submit(bridge.proc, num="+77011000021", sms="early", emailDlr=DLR_TO)
        wait_for(lambda: kcell.count("+77011000021") == 1, what="Kcell to accept the SMS")
        assert kcell.deliver("+77011000021") == 204
        with bridge.db() as db:  # the daemon has no id for it yet: the report waits
            cid = kcell.last_message("+77011000021")["client_message_id"]
            wait_for(
                lambda: db.execute(
                    "SELECT state FROM events WHERE message_id = ?", (cid,)
                ).fetchone() == ("waiting",),
                what="the early report to wait for its message",
            )  # fmt: skip
        released = time.monotonic()
    finally:
        kcell.delay_s = 0
        kcell.release()
    codes = not_codes(wait_reports(bridge.maildir, email_id)["not"][0])
    assert codes == [("+77011000021", 0)]
    (mail,) = wait_mails(bridge.maildir, f"etatDlr {email_id}", timeout=20)
    assert time.monotonic() - released < 20  # not the unmatched report's 30 s retry
    assert b"<statut1>DELIVRE</statut1>" in report_body(mail)
    barrier(bridge)
    assert len(mails(bridge.maildir, f"etatDlr {email_id}")) == 1


def test_a_provider_clock_ahead_does_not_hold_the_etatdlr(bridge: Bridge) -> None:
    """Kcell's status_time an hour ahead of ours (its clock, or times still written in
    UTC+6, Almaty's zone before 2024): the etatDlr goes now, with Kcell's date."""
    email_id, _ = sent_ok(bridge.proc, num="+77011000071", sms="x", emailDlr=DLR_TO)
    ahead = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    assert bridge.kcell.deliver("+77011000071", at=ahead) == 204
    (mail,) = wait_mails(bridge.maildir, f"etatDlr {email_id}", timeout=20)
    assert report_body(mail) == etat_dlr(
        email_id, [(1, "+77011000071", "DELIVRE", "DELIVERED", paris(ahead))]
    )


def test_500_numbers_one_etatdlr(bridge: Bridge) -> None:
    """500 recipients in one CM request, 500 status reports (one GET each, sent as
    CM accepts): one etatDlr mail with the 500 rows, not 500 mails."""
    numbers = [f"0630{i:06d}" for i in range(500)]
    before = len(bridge.cm.reports)
    bridge.cm.auto_status = 2
    try:
        tags = {f"num{i}": n for i, n in enumerate(numbers, start=1)}
        email_id, _ = sent_ok(bridge.proc, sms="Promo", emailDlr=DLR_TO, **tags)
        wait_for(
            lambda: len(bridge.cm.reports) >= before + 500, timeout=60, what="500 reports sent"
        )
    finally:
        bridge.cm.auto_status = None
    reports = bridge.cm.reports[before:]
    assert sorted(q["GSM"] for q, _ in reports) == ["0033" + n[1:] for n in numbers]
    assert {status for _, status in reports} == {200}
    (mail,) = wait_mails(bridge.maildir, f"etatDlr {email_id}", timeout=60)
    body = report_body(mail).decode("iso-8859-1")
    assert re.findall(r"<tel\d+>(.*?)</tel\d+>", body) == numbers
    assert set(re.findall(r"<statut\d+>(.*?)</statut\d+>", body)) == {"DELIVRE"}
    barrier(bridge)
    assert len(mails(bridge.maildir, f"etatDlr {email_id}")) == 1


# -- replies and STOP ------------------------------------------------------------------


def test_reply_goes_to_the_requests_sender(bridge: Bridge) -> None:
    """A Kcell reply (incoming_report, matched by number): mailed to the request's
    sender, Subject 'SMS de <number as written>', UTF-8 text, In-Reply-To."""
    _, request = sent_ok(bridge.proc, num="+7 701 100 0031", sms="Как дела?")
    text = "Всё хорошо, merci ! 👍"
    assert bridge.kcell.send_reply("+77011000031", text) == 204
    (mail,) = wait_mails(bridge.maildir, "SMS de +7 701 100 0031")
    assert mail["To"] == SENDER
    assert mail["In-Reply-To"] == request["Message-ID"]
    assert mail["Auto-Submitted"] == "auto-replied"
    assert mail.get_content_type() == "text/plain" and mail.get_content_charset() == "utf-8"
    assert report_body(mail) == (text + "\n").encode("utf-8")
    assert mail["X-Mailbridge-Stop"] is None


def test_reply_goes_to_the_accounts_reply_to(bridge: Bridge) -> None:
    """A sMsmode reply, sent to the notification_url_reponse the SMS carried: to
    the account's reply_to."""
    _, request = sent_ok(bridge.proc, keyid=KEYID_B, num="06 11 00 00 41", sms="Confirmez ?")
    assert bridge.smsmode.send_reply("+33611000041", "Oui, c'est confirmé") == 200
    (mail,) = wait_mails(bridge.maildir, "SMS de 06 11 00 00 41")
    assert mail["To"] == REPLIES_TO
    assert mail["In-Reply-To"] == request["Message-ID"]
    assert report_body(mail).decode("utf-8") == "Oui, c'est confirmé\n"


def test_stop_reply_blacklists_the_number_across_a_restart(bridge: Bridge) -> None:
    """'Stop' from a number: the reply mail says so, the account's next request to
    it gets code 11 (no SMS), also after a restart; other numbers and other
    accounts are not affected."""
    sent_ok(bridge.proc, num="0611000051", sms="Promo")
    assert bridge.smsmode.send_reply("+33611000051", "Stop") == 200
    (mail,) = wait_mails(bridge.maildir, "SMS de 0611000051")
    assert mail["X-Mailbridge-Stop"] == "yes"
    assert "a répondu STOP" in report_body(mail).decode("utf-8")
    sent = bridge.smsmode.accepted["+33611000051"]

    def codes(keyid: str = KEYID) -> list[tuple[str, int]]:
        email_id, _ = submit(bridge.proc, keyid=keyid, num1="0611000051", num2="0611000052",
                             sms="Promo 2")  # fmt: skip
        return not_codes(wait_reports(bridge.maildir, email_id)["not"][0])

    assert codes() == [("0611000051", 11), ("0611000052", 0)]
    bridge.restart()
    assert codes() == [("0611000051", 11), ("0611000052", 0)]
    assert bridge.smsmode.accepted["+33611000051"] == sent
    assert codes(KEYID_B) == [("0611000051", 0), ("0611000052", 0)]  # another account's list


# -- the receiver's hardening -----------------------------------------------------------


def test_wrong_token_404_malformed_400_nothing_changed(bridge: Bridge) -> None:
    email_id, _ = sent_ok(bridge.proc, num="0620000061", sms="x", emailDlr=DLR_TO)
    good = bridge.cm.status_report("+33620000061", 2)
    before = bridge.events()
    assert httpx.get(bridge.hook("cm", "not-the-token-0123456"), params=good).status_code == 404
    assert httpx.get(bridge.base + "/hooks/cm", params=good).status_code == 404
    assert httpx.get(bridge.hook("cm"), params={**good, "STATUS": "7"}).status_code == 400
    no_number = {k: v for k, v in good.items() if k not in ("GSM", "RECIPIENT")}
    assert httpx.get(bridge.hook("cm"), params=no_number).status_code == 400
    bad_json = httpx.post(bridge.hook("kcell"), content=b'{"delivery_report": [',
                          headers={"Content-Type": "application/json"})  # fmt: skip
    assert bad_json.status_code == 400
    no_id = httpx.post(bridge.hook("kcell"), json={"delivery_report": [{"status": "DELIVERED"}]})
    assert no_id.status_code == 400
    url, query = bridge.smsmode.status_query("+33611000001", 11)
    assert httpx.get(url, params={**query, "statut": "onze"}).status_code == 400
    assert httpx.post(bridge.hook("cm"), params=good).status_code == 405
    assert bridge.events() == before
    barrier(bridge)
    assert mails(bridge.maildir, f"etatDlr {email_id}") == []
    assert bridge.cm.send_report(good) == 200  # the right report still counts
    wait_mails(bridge.maildir, f"etatDlr {email_id}")


def test_oversized_and_slow_requests_are_closed(bridge: Bridge) -> None:
    """A body over max_body_bytes: 413; a request head sent a byte at a time: closed
    within keepalive_s + body_timeout_s; a body that stops coming: 408 and closed.
    Callbacks are served meanwhile and afterwards."""
    huge = httpx.post(bridge.hook("kcell"), content=b'{"delivery_report": []}'.ljust(20000),
                      headers={"Content-Type": "application/json"}, timeout=30)  # fmt: skip
    assert huge.status_code == 413
    slow_head = socket.create_connection(("127.0.0.1", bridge.proc.http_port), timeout=30)
    slow_body = socket.create_connection(("127.0.0.1", bridge.proc.http_port), timeout=30)
    try:
        started = time.monotonic()
        slow_head.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow_body.sendall(
            f"POST /hooks/{TOKEN}/kcell HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            "\r\nContent-Length: 100\r\n\r\n".encode()
            + b'{"delivery_report": '
        )
        assert bridge.healthz()[0] == 200  # served while both hang
        closed_at = None
        slow_head.settimeout(0.2)
        while closed_at is None and time.monotonic() - started < 15:
            try:
                slow_head.sendall(b"a")  # a byte every 0.2 s: never idle
                if slow_head.recv(4096) == b"":
                    closed_at = time.monotonic()
            except TimeoutError:
                continue
            except OSError:  # reset: closed as well
                closed_at = time.monotonic()
        assert closed_at is not None, "the slow request head was never cut"
        # keepalive_s + body_timeout_s (aiohttp's own keep-alive timer, armed at the
        # connection's start, may cut it sooner), with slack for a loaded machine
        assert closed_at - started < HEAD_BOUND_S + 3
        slow_body.settimeout(15)
        answer = slow_body.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - started < 10
        slow_body.settimeout(5)
        rest = b""
        try:
            while chunk := slow_body.recv(4096):
                rest += chunk
        except ConnectionResetError:
            pass  # closed as well
        assert b"HTTP/" not in rest  # closed after the 408, nothing more
    finally:
        slow_head.close()
        slow_body.close()
    barrier(bridge)  # a whole email -> SMS -> report -> etatDlr round still works


# -- /metrics and /healthz on a daemon of their own --------------------------------------


@dataclass
class Watched:
    tmp: Path
    proc: DaemonProcess
    kcell: FakeKcell

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.proc.http_port}"


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watched]:
    """A daemon with its worker in a process of its own (dispatch.separate_process),
    a heartbeat every 0.2 s, stale after 1.5 s; Kcell for +7, the outbox otherwise."""
    tmp = tmp_path_factory.mktemp("watched")
    kcell = FakeKcell()
    with ProviderServer(kcell) as server:
        routes = [{"prefix": "+7", "providers": ["kcell"]}, {"prefix": "", "providers": ["outbox"]}]
        raw = config_dict(tmp, default_sender="INFO", routes=routes)
        del raw["accounts"][0]["provider"]
        raw["providers"]["kcell"] = provider_configs("", "", server.url)["kcell"]
        raw["http"] = {"listen": "127.0.0.1:0", "token": TOKEN}
        raw["dispatch"].update(separate_process=True, heartbeat_s=0.2, heartbeat_stale_s=1.5)
        proc = DaemonProcess(tmp, raw).start()
        kcell.callback_url = f"http://127.0.0.1:{proc.http_port}/hooks/{TOKEN}/kcell"
        try:
            yield Watched(tmp, proc, kcell)
        finally:
            proc.stop()


def curl(url: str) -> tuple[int, str]:
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-w", "\n%{http_code}", url],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    body, _, status = out.stdout.rpartition("\n")
    return int(status), body


def metric_lines(text: str) -> dict[str, float]:
    """`name{labels} value` lines of the exposition text (comments left out)."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def test_metrics_after_a_known_run(watched: Watched) -> None:
    """A known run, then the real curl on /metrics: the exact counts."""
    proc, kcell = watched.proc, watched.kcell
    # 1 accepted email: two Kazakh numbers through Kcell (one batch), one malformed
    email_id, _ = submit(proc, num1="+77012000001", num2="+77012000002", num3="12ab", sms="x")
    assert not_codes(wait_reports(proc.maildir, email_id)["not"][0]) == [
        ("+77012000001", 0), ("+77012000002", 0), ("12ab", 7),
    ]  # fmt: skip
    # 1 accepted email through the outbox, its emailId again (duplicate), an email
    # without <envoi> (invalid), an unknown keyid (refused in the dialogue)
    sent_ok(proc, num="0601020304", sms="y", emailId="m-outbox")
    assert proc.send(request_mail(num="0601020304", sms="y", emailId="m-outbox"))[0] == 250
    no_envoi = f"<keyid>{KEYID}</keyid> <emailId>m-inv</emailId> <emailAck>{REPORTS_TO}</emailAck>"
    assert proc.send(request_mail(no_envoi))[0] == 250
    assert proc.send(request_mail(keyid="0" * 20, num="0601020304", sms="z"))[0] == 550
    # Kcell reports: delivered (sent twice), undeliverable; a reply
    delivered = kcell.delivery_report("+77012000001", "DELIVERED")
    failed = kcell.delivery_report(
        "+77012000002",
        "UNDELIVERABLE",
        error_code="34",
        error_message="Subscriber number is in provider's black list",
    )
    assert [kcell.post_reports(r) for r in ([delivered], [failed], [delivered])] == [204] * 3
    assert kcell.send_reply("+77012000001", "merci") == 204
    wait_mails(proc.maildir, "SMS de +77012000001")

    def scrape() -> tuple[str, dict[str, float]]:
        status, text = curl(watched.base + "/metrics")
        assert status == 200
        return text, metric_lines(text)

    # Acks (4), Nots (2), the reply mail: 7 report mails; no etatDlr (no emailDlr)
    text, found = wait_for(
        lambda: (m := scrape())[1].get('mailbridge_reports{state="sent"}') == 7 and m,
        what="7 report mails sent",
    )
    print("\n".join(ln for ln in text.splitlines() if not ln.startswith("#")))
    assert len(maildir_reports(proc.maildir)) == 7
    expected = {
        'mailbridge_emails_total{outcome="accepted"}': 2,
        'mailbridge_emails_total{outcome="duplicate"}': 1,
        'mailbridge_emails_total{outcome="invalid"}': 1,
        'mailbridge_emails_total{outcome="refused"}': 1,
        'mailbridge_sms_total{code="0",provider="kcell"}': 2,
        'mailbridge_sms_total{code="0",provider="outbox"}': 1,
        'mailbridge_sms_total{code="7",provider="none"}': 1,
        'mailbridge_delivery_reports_total{provider="kcell",status="DELIVRE"}': 1,
        'mailbridge_delivery_reports_total{provider="kcell",status="NON_DELIVRE"}': 1,
        'mailbridge_replies_total{provider="kcell"}': 1,
        'mailbridge_provider_call_seconds_count{provider="kcell"}': 1,
        'mailbridge_queue_recipients{state="due"}': 0,
        'mailbridge_queue_recipients{state="deferred"}': 0,
        'mailbridge_queue_recipients{state="in_doubt"}': 0,
        'mailbridge_reports{state="pending"}': 0,
        'mailbridge_reports{state="sent"}': 7,
        'mailbridge_provider_up{provider="kcell"}': 1,
        "mailbridge_events_waiting": 0,
    }
    assert {k: found.get(k) for k in expected} == expected
    status, body = curl(watched.base + "/healthz")
    assert status == 200, body


def test_healthz_503_while_the_worker_is_stopped(watched: Watched) -> None:
    """SIGSTOP the worker process: its heartbeat goes stale and /healthz answers
    503 within a bound; SIGCONT: 200 again."""
    match = wait_for(
        lambda: re.search(r"worker process (\d+) started", watched.proc.log()),
        what="the worker's pid in the log",
    )
    pid = int(match.group(1))
    with read_store(watched.tmp) as db:
        beat = wait_for(
            lambda: db.execute(
                "SELECT pid FROM heartbeats WHERE process LIKE 'worker:%'"
            ).fetchone(),
            what="a heartbeat",
        )
    assert beat == (pid,)
    wait_for(lambda: curl(watched.base + "/healthz")[0] == 200, what="/healthz 200")
    os.kill(pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        status, body = wait_for(
            lambda: (r := curl(watched.base + "/healthz"))[0] == 503 and r,
            timeout=15, what="/healthz 503",
        )  # fmt: skip
        assert time.monotonic() - stopped < 10
        assert re.search(r"sending: heartbeat \d+s old", body), body
        assert "store: ok" in body and "smtp: ok" in body
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: curl(watched.base + "/healthz")[0] == 200, timeout=15, what="/healthz 200")
