"""Email -> provider -> Not, with the real daemon and each provider's fake API
served over loopback HTTP: batching counts, retries, failover, circuit
breaker, a restart in the middle of a retry, credentials refused."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_cm import FakeCm
from tests.fake_kcell import FakeKcell
from tests.fake_smsmode import FakeSmsmode
from tests.httpfake import ProviderServer
from tests.support import (
    DaemonProcess,
    config_dict,
    not_codes,
    outbox_lines,
    request_mail,
    wait_for,
    wait_reports,
)

FAST = {"retry_backoff_s": 0.05, "timeout_s": 10}


@pytest.fixture
def smsmode() -> Iterator[tuple[FakeSmsmode, ProviderServer]]:
    fake = FakeSmsmode()
    with ProviderServer(fake) as server:
        yield fake, server


@pytest.fixture
def kcell() -> Iterator[tuple[FakeKcell, ProviderServer]]:
    fake = FakeKcell()
    with ProviderServer(fake) as server:
        yield fake, server
    fake.release()


def cm_config(server: ProviderServer, **kw: Any) -> dict[str, Any]:
    return {"type": "cm", "url": server.url + FakeCm.PATH, "product_token": FakeCm.TOKEN,
            **FAST, **kw}  # fmt: skip


def smsmode_config(server: ProviderServer, **kw: Any) -> dict[str, Any]:
    return {"type": "smsmode", "url": server.url + "/http/1.6/", "access_token": "test-token",
            **FAST, **kw}  # fmt: skip


def kcell_config(server: ProviderServer, **kw: Any) -> dict[str, Any]:
    return {"type": "kcell", "url": server.url + FakeKcell.BASE, "username": "mailbridge",
            "password": "secret", **FAST, **kw}  # fmt: skip


def start(
    tmp: Path, providers: dict[str, Any], dispatch: dict[str, Any] | None = None, **account: Any
) -> DaemonProcess:
    raw = config_dict(tmp, **account)
    raw["providers"].update(providers)
    raw["dispatch"].update(dispatch or {})
    if "routes" in account:
        del raw["accounts"][0]["provider"]
    return DaemonProcess(tmp, raw).start()


def numbered(numbers: list[str], **fields: str) -> Any:
    tags = {f"num{i}": n for i, n in enumerate(numbers, start=1)}
    return request_mail(**tags, **fields)


def send_and_wait(proc: DaemonProcess, msg: Any) -> list[tuple[str, int]]:
    email_id = str(msg.get_content()).split("<emailId>")[1].split("<")[0]
    code, text = proc.send(msg)
    assert code == 250, text
    return not_codes(wait_reports(proc.maildir, email_id, nots=1)["not"][0])


def posts(server: ProviderServer, suffix: str = "") -> int:
    return sum(1 for r in server.requests if r.method == "POST" and r.path.endswith(suffix))


FR_500 = [f"06{10_000_000 + i:08d}" for i in range(500)]
KZ_500 = [f"+7701{1_000_000 + i:07d}" for i in range(500)]


def test_cm_500_numbers_one_request(tmp_path: Path, cm: tuple[FakeCm, ProviderServer]) -> None:
    fake, server = cm
    proc = start(tmp_path, {"cm": cm_config(server)}, provider="cm")
    try:
        codes = send_and_wait(proc, numbered(FR_500, sms="Promo -10%", tracker="t-1"))
    finally:
        proc.stop()
    assert [c for _, c in codes] == [0] * 500
    assert posts(server) == 1
    assert all(fake.accepted_count("+33" + n[1:]) == 1 for n in FR_500)


def test_smsmode_500_numbers_one_request_and_personal_texts_one_upload(
    tmp_path: Path, smsmode: tuple[FakeSmsmode, ProviderServer]
) -> None:
    fake, server = smsmode
    proc = start(tmp_path, {"smsmode": smsmode_config(server)}, provider="smsmode")
    try:
        same = send_and_wait(proc, numbered(FR_500, sms="Même texte pour tous"))
        assert (posts(server, "sendSMS.do"), posts(server, "sendSMSBatch.do")) == (1, 0)
        msg = request_mail(emailId=(email_id := secrets.token_hex(4)))
        csv = "".join(f"{n};;client {i}\n" for i, n in enumerate(FR_500))
        msg.add_attachment(csv.encode(), maintype="text", subtype="csv", filename="mobiles.csv")
        msg.add_attachment(b"Bonjour [1]", maintype="text", subtype="csv", filename="message.csv")
        assert proc.send(msg)[0] == 250
        personal = not_codes(wait_reports(proc.maildir, email_id)["not"][0])
    finally:
        proc.stop()
    assert [c for _, c in same] == [0] * 500 and [c for _, c in personal] == [0] * 500
    assert (posts(server, "sendSMS.do"), posts(server, "sendSMSBatch.do")) == (1, 1)
    assert sum(fake.accepted.values()) == 1000
    assert {s.text for s in fake.sms if s.to == "+33610000007"} == {
        "Même texte pour tous",
        "Bonjour client 7",
    }


def test_kcell_500_numbers_three_batches(
    tmp_path: Path, kcell: tuple[FakeKcell, ProviderServer]
) -> None:
    fake, server = kcell
    proc = start(tmp_path, {"kcell": kcell_config(server)}, provider="kcell", default_sender="INFO")
    try:
        codes = send_and_wait(proc, numbered(KZ_500, sms="Привет"))
    finally:
        proc.stop()
    assert [c for _, c in codes] == [0] * 500
    assert posts(server, "/batches") == 3 and posts(server, "/messages") == 0
    assert fake.total == 500


def test_503_then_success(tmp_path: Path, kcell: tuple[FakeKcell, ProviderServer]) -> None:
    fake, server = kcell
    fake.fail_next(1, status=503)
    proc = start(tmp_path, {"kcell": kcell_config(server)}, provider="kcell", default_sender="INFO")
    try:
        codes = send_and_wait(proc, request_mail(num="+77011234567", sms="x"))
    finally:
        proc.stop()
    assert codes == [("+77011234567", 0)]
    assert posts(server) == 2 and fake.count("+77011234567") == 1


def test_total_outage_fails_over_to_the_next_provider(
    tmp_path: Path, cm: tuple[FakeCm, ProviderServer], smsmode: tuple[FakeSmsmode, ProviderServer]
) -> None:
    cm_fake, cm_server = cm
    sms_fake, sms_server = smsmode
    cm_fake.fail_next(1000, status=503)
    routes = [{"prefix": "+33", "providers": ["cm", "smsmode"]}]
    proc = start(
        tmp_path,
        {"cm": cm_config(cm_server, retry_attempts=3), "smsmode": smsmode_config(sms_server)},
        routes=routes,
    )
    try:
        codes = send_and_wait(proc, numbered(["0601020304", "0601020305"], sms="x"))
    finally:
        proc.stop()
    assert codes == [("0601020304", 0), ("0601020305", 0)]
    assert posts(cm_server) == 3  # retry_attempts, then failover at once
    assert sum(sms_fake.accepted.values()) == 2
    assert "failing over to smsmode" in proc.log()


def test_throttled_after_retries_gives_29(
    tmp_path: Path, cm: tuple[FakeCm, ProviderServer]
) -> None:
    fake, server = cm
    fake.fail_next(1000, status=429)
    # No outage hold: 29 straight after the retries (SPEC 8).
    proc = start(
        tmp_path, {"cm": cm_config(server, retry_attempts=2)}, {"outage_hold_s": 0}, provider="cm"
    )
    try:
        codes = send_and_wait(proc, request_mail(num="0601020304", sms="x"))
    finally:
        proc.stop()
    assert codes == [("0601020304", 29)] and posts(server) == 2


def test_lost_response_is_not_a_second_sms(
    tmp_path: Path, kcell: tuple[FakeKcell, ProviderServer]
) -> None:
    fake, server = kcell
    fake.delay_s = 60  # accepted, then the answer never comes in time
    config = kcell_config(server, timeout_s=0.5)
    proc = start(tmp_path, {"kcell": config}, provider="kcell", default_sender="INFO")
    try:
        msg = request_mail(num="+77011234567", sms="x", emailId=(email_id := "lost"))
        assert proc.send(msg)[0] == 250
        wait_for(lambda: fake.total == 1, what="the first submission")
        wait_for(lambda: "1 to retry" in proc.log(), what="the client to time out")
        fake.release()  # answers come again; the retry meets the duplicate key
        codes = not_codes(wait_reports(proc.maildir, email_id)["not"][0])
    finally:
        proc.stop()
    assert codes == [("+77011234567", 0)]
    assert fake.count("+77011234567") == 1 and posts(server) >= 2


def test_restart_in_the_middle_of_a_retry(
    tmp_path: Path, kcell: tuple[FakeKcell, ProviderServer]
) -> None:
    """The attempt count and the retry time live in the store: a restart
    neither forgets the failed attempt nor retries before it is due."""
    fake, server = kcell
    fake.fail_next(1, status=503)
    config = kcell_config(server, retry_backoff_s=2.0, retry_attempts=2, circuit_failures=2)
    proc = start(tmp_path, {"kcell": config}, provider="kcell", default_sender="INFO")
    msg = request_mail(num="+77011234567", sms="x", emailId="restart")
    assert proc.send(msg)[0] == 250
    wait_for(lambda: posts(server) == 1, what="the failed first attempt")
    wait_for(lambda: "1 to retry" in proc.log(), what="the retry to be recorded")
    proc.kill()
    proc = DaemonProcess(tmp_path, proc.config).start()
    try:
        codes = not_codes(wait_reports(proc.maildir, "restart")["not"][0])
    finally:
        proc.stop()
    assert codes == [("+77011234567", 0)]
    assert posts(server) == 2 and fake.count("+77011234567") == 1


def test_rejected_credentials_keep_the_work_pending(
    tmp_path: Path, cm: tuple[FakeCm, ProviderServer]
) -> None:
    fake, server = cm
    fake.token = "00000000-0000-0000-0000-000000000000"  # ours is no longer valid
    proc = start(tmp_path, {"cm": cm_config(server)}, provider="cm")
    try:
        assert proc.send(request_mail(num="0601020304", sms="x", emailId="auth"))[0] == 250
        wait_for(lambda: "REFUSED OUR CREDENTIALS" in proc.log(), what="the loud log line")
    finally:
        proc.stop()
    import sqlite3

    db = sqlite3.connect(tmp_path / "mailbridge.db")
    pending = db.execute("SELECT count(*) FROM recipients WHERE code IS NULL").fetchone()[0]
    nots = db.execute("SELECT count(*) FROM reports WHERE kind = 'not'").fetchone()[0]
    db.close()
    assert (pending, nots) == (1, 0)  # not told "your number is wrong": still to send


def test_circuit_breaker_skips_a_failing_provider(
    tmp_path: Path, cm: tuple[FakeCm, ProviderServer]
) -> None:
    fake, server = cm
    fake.fail_next(1000, status=503)
    routes = [{"prefix": "", "providers": ["cm", "outbox"]}]
    config = cm_config(server, retry_attempts=1, circuit_failures=2, circuit_cooldown_s=600)
    proc = start(tmp_path, {"cm": config}, routes=routes)
    try:
        for n in range(4):
            codes = send_and_wait(proc, request_mail(num="0601020304", sms=f"n{n}"))
            assert codes == [("0601020304", 0)]
    finally:
        proc.stop()
    assert posts(server) == 2  # after two failed calls CM is skipped
    assert len(outbox_lines(tmp_path / "outbox.jsonl")) == 4
    assert "skipped for 600s" in proc.log()


def test_number_no_route_covers_gets_999(tmp_path: Path) -> None:
    routes = [{"prefix": "+7", "providers": ["outbox"]}]
    proc = start(tmp_path, {}, routes=routes)
    try:
        codes = send_and_wait(proc, numbered(["0601020304", "+77011234567"], sms="x"))
    finally:
        proc.stop()
    assert codes == [("0601020304", 999), ("+77011234567", 0)]
    assert "code 999 for +33601020304: no route" in proc.log()


def test_check_config_online(
    tmp_path: Path,
    smsmode: tuple[FakeSmsmode, ProviderServer],
    kcell: tuple[FakeKcell, ProviderServer],
) -> None:
    import subprocess
    import sys

    import yaml

    raw = config_dict(tmp_path)
    raw["providers"]["smsmode"] = smsmode_config(smsmode[1])
    raw["providers"]["kcell"] = kcell_config(kcell[1])
    raw["providers"]["broken"] = kcell_config(kcell[1], password="wrong")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = subprocess.run(
        [sys.executable, "-m", "mailbridge", "check-config", "--online", "-c", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1, out.stdout
    assert "provider smsmode (smsmode): credentials accepted (balance 212.5)" in out.stdout
    assert "provider kcell (kcell): credentials accepted; senders: MAILBRIDGE, INFO" in out.stdout
    assert "provider broken (kcell): FAILED: ProviderAuthError" in out.stdout
