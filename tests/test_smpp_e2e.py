"""SMPP end to end (SPEC section 10): the real daemon as a subprocess, its worker
bound to the node-smpp SMSC (tests/smsc), reports read from the Maildir, what the
SMSC received read from its record (node-smpp's own decoding of texts and UDH).

One daemon and one SMSC serve the tests that do not disturb the bind (a module
fixture; each test uses numbers of its own); the drop, the wrong password, the
500 numbers under a tight window and SIGTERM get a daemon and an SMSC each.
"""

from __future__ import annotations

import re
import secrets
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.smsc_peer import PASSWORD, SYSTEM_ID, Smsc
from tests.support import (
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

DLR_TO = "dlr@client.test"


def smpp_config(smsc: Smsc, **kw: Any) -> dict[str, Any]:
    return {
        "type": "smpp", "host": "127.0.0.1", "port": smsc.port, "system_id": SYSTEM_ID,
        "password": PASSWORD, "response_timeout_s": 5, "throughput": 0,
        "retry_backoff_s": 0.05, **kw,
    }  # fmt: skip


def start_bridge(tmp: Path, smsc: Smsc, **provider: Any) -> DaemonProcess:
    raw = config_dict(tmp, provider="smsc")
    raw["providers"]["smsc"] = smpp_config(smsc, **provider)
    return DaemonProcess(tmp, raw).start()


@dataclass
class Bridge:
    tmp: Path
    proc: DaemonProcess
    smsc: Smsc

    @property
    def maildir(self) -> Path:
        return self.proc.maildir


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    tmp = tmp_path_factory.mktemp("smpp")
    smsc = Smsc(tmp / "smsc.jsonl").start()
    proc = start_bridge(tmp, smsc)
    try:
        wait_for(lambda: smsc.state()["bound"] == 1, what="the daemon's bind")
        yield Bridge(tmp, proc, smsc)
    finally:
        proc.stop()
        smsc.stop()


@pytest.fixture
def fresh(tmp_path: Path, smsc: Smsc) -> Iterator[tuple[Smsc, Path]]:
    """An SMSC of its own (the daemon is started by the test, with its settings)."""
    yield smsc, tmp_path


def submit(proc: DaemonProcess, **fields: str) -> str:
    email_id = fields.pop("emailId", None) or secrets.token_hex(6)
    code, text = proc.send(request_mail(emailId=email_id, **fields))
    assert code == 250, text
    return email_id


def codes_of(proc: DaemonProcess, email_id: str, timeout: float = 60) -> list[tuple[str, int]]:
    def the_not() -> bytes | None:
        found = _reports(proc, email_id).get("not")
        return found[0] if found else None

    return not_codes(wait_for(the_not, timeout=timeout, what=f"the Not of {email_id}"))


def _reports(proc: DaemonProcess, email_id: str) -> dict[str, list[bytes]]:
    try:
        return wait_reports(proc.maildir, email_id)
    except AssertionError:
        return {}


def mails(maildir: Path, subject: str) -> list[Any]:
    return [m for m in maildir_reports(maildir) if str(m["Subject"]) == subject]


def wait_mail(maildir: Path, subject: str, timeout: float = 60) -> Any:
    found = wait_for(lambda: mails(maildir, subject), timeout=timeout, what=f"mail {subject!r}")
    assert len(found) == 1
    return found[0]


def intl(national: str) -> str:
    """0612000001 -> 33612000001, as the SMSC sees the destination."""
    return "33" + national[1:]


# -- sending ---------------------------------------------------------------------------------


def test_one_sms(bridge: Bridge) -> None:
    email_id = submit(bridge.proc, num="06 12 00 00 01", sms="Bonjour, votre RDV est confirmé")
    assert codes_of(bridge.proc, email_id) == [("06 12 00 00 01", 0)]
    [sub] = [s for s in bridge.smsc.submits() if s["destination_addr"] == "33612000001"]
    assert sub["text"] == "Bonjour, votre RDV est confirmé"
    assert (sub["source_addr"], sub["source_addr_ton"], sub["source_addr_npi"]) == (
        "MaSociete", 5, 0,
    )  # fmt: skip
    assert (sub["dest_addr_ton"], sub["dest_addr_npi"], sub["data_coding"]) == (1, 1, 0)
    assert sub["registered_delivery"] == 1 and sub["validity_period"]  # dispatch.validity_s


def test_three_part_gsm_message_reassembled_exactly(bridge: Bridge) -> None:
    text = "Alerte [niveau 2] : " + "€ de plus ~ " * 20 + "{fin} | ^ \\ ok"
    email_id = submit(bridge.proc, num="0612000002", sms=text, smslong="5")
    assert codes_of(bridge.proc, email_id) == [("0612000002", 0)]
    parts = [s for s in bridge.smsc.submits() if s["destination_addr"] == intl("0612000002")]
    assert len(parts) == 3
    assert all(s["esm_class"] & 0x40 and s["registered_delivery"] == 1 for s in parts)
    assert bridge.smsc.texts(intl("0612000002")) == [text]


def test_ucs2_message(bridge: Bridge) -> None:
    text = "Привет ! ça marche 😀 — œuvre"
    email_id = submit(bridge.proc, num="0612000003", sms=text)
    assert codes_of(bridge.proc, email_id) == [("0612000003", 0)]
    [sub] = [s for s in bridge.smsc.submits() if s["destination_addr"] == intl("0612000003")]
    assert sub["data_coding"] == 8 and sub["text"] == text


def test_throttling_costs_no_code(bridge: Bridge) -> None:
    bridge.smsc.call("throttle", n=4)
    numbers = [f"06120001{i:02d}" for i in range(6)]
    tags = {f"num{i}": n for i, n in enumerate(numbers, 1)}
    email_id = submit(bridge.proc, sms="Flux tendu", **tags)
    assert codes_of(bridge.proc, email_id) == [(n, 0) for n in numbers]
    throttled = [s for s in bridge.smsc.submits("throttled") if s["text"] == "Flux tendu"]
    assert len(throttled) == 4
    for n in numbers:
        assert bridge.smsc.texts(intl(n)) == ["Flux tendu"]  # once each, throttled or not


# -- receipts and replies ----------------------------------------------------------------------


def test_receipts_give_etatdlr(bridge: Bridge) -> None:
    """Two recipients, each of two parts: one gets both parts delivered (DELIVRE),
    the other one delivered and one undeliverable (NON_DELIVRE: the first final
    failure). One etatDlr mail once both are final."""
    text = "z" * 200
    email_id = submit(
        bridge.proc, num1="0612000201", num2="0612000202", sms=text, emailDlr=DLR_TO,
        emailId="smpp-dlr-1",
    )  # fmt: skip
    assert codes_of(bridge.proc, email_id) == [("0612000201", 0), ("0612000202", 0)]
    first = [
        s["receipt_id"]
        for s in bridge.smsc.submits()
        if s["destination_addr"] == intl("0612000201")
    ]
    second = [
        s["receipt_id"]
        for s in bridge.smsc.submits()
        if s["destination_addr"] == intl("0612000202")
    ]
    assert len(first) == len(second) == 2
    bridge.smsc.call("receipts", ids=",".join(first), stat="DELIVRD")
    bridge.smsc.call("receipts", ids=second[0], stat="DELIVRD")
    bridge.smsc.call("receipts", ids=second[1], stat="UNDELIV", tlv=0)
    mail = wait_mail(bridge.maildir, "etatDlr smpp-dlr-1")
    body = report_body(mail).decode("iso-8859-1")
    assert re.findall(r"<statut\d>(.*?)</statut\d>", body) == ["DELIVRE", "NON_DELIVRE"]
    assert "<message2>stat:UNDELIV err:0A3</message2>" in body
    wait_for(lambda: bridge.smsc.state()["receipts_acked"] >= 4, what="receipts acknowledged")


def test_receipt_before_its_submit_sm_resp(bridge: Bridge) -> None:
    """The SMSC sends the receipt before it even answers the submit_sm: kept and
    matched once the message id is recorded."""
    bridge.smsc.call("auto_receipt", when="before", stat="DELIVRD")
    try:
        email_id = submit(bridge.proc, num="0612000301", sms="Vite", emailDlr=DLR_TO,
                          emailId="smpp-dlr-early")  # fmt: skip
        assert codes_of(bridge.proc, email_id) == [("0612000301", 0)]
    finally:
        bridge.smsc.call("auto_receipt", when="off")
    mail = wait_mail(bridge.maildir, "etatDlr smpp-dlr-early")
    assert "<statut1>DELIVRE</statut1>" in report_body(mail).decode("iso-8859-1")


def test_mo_reply_is_forwarded(bridge: Bridge) -> None:
    email_id = submit(bridge.proc, num="0612000401", sms="Confirmez-vous ?")
    assert codes_of(bridge.proc, email_id) == [("0612000401", 0)]
    bridge.smsc.call("mo", **{"from": "+33612000401", "to": "36111", "text": "Oui, ça marche"})
    mail = wait_mail(bridge.maildir, "SMS de 0612000401")
    assert mail["To"] == SENDER
    assert report_body(mail).decode("utf-8") == "Oui, ça marche\n"


def test_mo_stop_gives_code_11_next_time(bridge: Bridge) -> None:
    email_id = submit(bridge.proc, num="0612000501", sms="Promo")
    assert codes_of(bridge.proc, email_id) == [("0612000501", 0)]
    bridge.smsc.call("mo", **{"from": "+33612000501", "to": "36111", "text": "STOP"})
    mail = wait_mail(bridge.maildir, "SMS de 0612000501")
    assert mail["X-Mailbridge-Stop"] == "yes"
    again = submit(bridge.proc, num1="0612000501", num2="0612000502", sms="Promo 2")
    assert codes_of(bridge.proc, again) == [("0612000501", 11), ("0612000502", 0)]
    assert bridge.smsc.texts(intl("0612000501")) == ["Promo"]  # no second SMS


# -- a daemon and an SMSC of their own ---------------------------------------------------------


def test_500_numbers_within_window_and_throughput(fresh: tuple[Smsc, Path]) -> None:
    smsc, tmp = fresh
    smsc.call("delay", ms=20)  # the SMSC takes its time: the window fills
    proc = start_bridge(tmp, smsc, binds=2, window=5, throughput=100)
    try:
        numbers = [f"0613{i:06d}" for i in range(500)]
        email_id = submit(proc, sms="Rappel", **{f"num{i}": n for i, n in enumerate(numbers, 1)})
        assert codes_of(proc, email_id, timeout=120) == [(n, 0) for n in numbers]
    finally:
        proc.stop()
    subs = smsc.submits()
    assert sorted(s["destination_addr"] for s in subs) == sorted(intl(n) for n in numbers)
    state = smsc.state()
    assert state["max_outstanding"] <= 5  # per bind
    times = sorted(s["received"] for s in subs)
    # 100 parts/s over both binds: 101 submits never within much less than a
    # second (the SMSC's millisecond clock, and slack for two busy cores
    # delivering a few segments together).
    assert min(times[i + 100] - times[i] for i in range(len(times) - 100)) >= 900
    assert (times[-1] - times[0]) / 1000 >= 4.9


def test_smsc_drops_the_connection_mid_batch(fresh: tuple[Smsc, Path]) -> None:
    """The SMSC closes the bind after 15 answers: the parts in flight are in doubt
    (999, never sent again); the rest go after the reconnect; nobody twice."""
    smsc, tmp = fresh
    smsc.call("delay", ms=10)
    smsc.call("drop", after=15)
    proc = start_bridge(tmp, smsc, window=4)
    try:
        numbers = [f"0614{i:06d}" for i in range(40)]
        email_id = submit(proc, sms="Coupure", **{f"num{i}": n for i, n in enumerate(numbers, 1)})
        codes = dict(codes_of(proc, email_id, timeout=120))
    finally:
        proc.stop()
    doubtful = [n for n in numbers if codes[n] == 999]
    assert 1 <= len(doubtful) <= 4  # what was in flight: at most the window
    assert all(codes[n] == 0 for n in numbers if n not in doubtful)
    seen = [s["destination_addr"] for s in smsc.submits(None)]
    assert len(seen) == len(set(seen)), "a recipient got two submit_sm"
    # Code 0 for exactly the submit_sm the SMSC answered; the others were in
    # flight (received and never answered, or not even read) when it dropped.
    answered = {s["destination_addr"] for s in smsc.submits()}
    assert answered == {intl(n) for n in numbers if n not in doubtful}
    unanswered = {s["destination_addr"] for s in smsc.submits(None) if s["answer"] != "ok"}
    assert unanswered <= {intl(n) for n in doubtful} and unanswered
    assert smsc.state()["binds"] == 2  # it bound again
    assert "in doubt" in proc.log()


def test_wrong_password_sends_nothing_and_holds(fresh: tuple[Smsc, Path]) -> None:
    smsc, tmp = fresh
    proc = start_bridge(tmp, smsc, password="nope")
    try:
        code, _ = proc.send(request_mail(num="0615000001", sms="x", emailId="smpp-auth"))
        assert code == 250
        wait_for(lambda: "REFUSED OUR CREDENTIALS" in proc.log(), what="the loud log line")
        assert "ESME_RINVPASWD" in proc.log()
    finally:
        proc.stop()
    assert smsc.submits(None) == [] and smsc.state()["refused_binds"] >= 1
    db = sqlite3.connect(tmp / "mailbridge.db")
    pending = db.execute("SELECT count(*) FROM recipients WHERE code IS NULL").fetchone()[0]
    nots = db.execute("SELECT count(*) FROM reports WHERE kind = 'not'").fetchone()[0]
    up = db.execute("SELECT up FROM provider_state WHERE name = 'smsc'").fetchone()
    doubt = db.execute("SELECT in_doubt FROM recipients").fetchone()[0]
    db.close()
    assert (pending, nots, up, doubt) == (1, 0, (0,), 0)  # held, not in doubt: sent once fixed


def test_sigterm_unbinds(fresh: tuple[Smsc, Path]) -> None:
    smsc, tmp = fresh
    proc = start_bridge(tmp, smsc)
    try:
        email_id = submit(proc, num="0616000001", sms="Au revoir")
        assert codes_of(proc, email_id) == [("0616000001", 0)]
        assert proc.terminate() == 0
    finally:
        proc.stop()
    kinds = [e["kind"] for e in smsc.events() if e["kind"] in ("unbind", "close")]
    assert kinds[:1] == ["unbind"], kinds
