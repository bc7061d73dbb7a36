"""Logs as an operator reads them (SPEC 11): under journald (`JOURNAL_STREAM`
naming the daemon's stderr) no timestamp of ours and a syslog priority per
line; `logging.format: json` one object per line with the request's ids; the
request id and emailId on every line about a request; final failures at
WARNING in the provider's words, grouped; a big request's calls as a running
total; provider calls summarised at DEBUG without secrets."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailbridge.config import LoggingConfig
from mailbridge.logs import setup_logging, under_journald
from tests.fake_cm import FakeCm
from tests.fake_smsmode import FakeSmsmode
from tests.httpfake import ProviderServer
from tests.support import (
    DaemonProcess,
    config_dict,
    not_codes,
    request_mail,
    wait_reports,
)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def journal_stream_of(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def cm_daemon(tmp: Path, server: ProviderServer, **top: Any) -> DaemonProcess:
    raw = config_dict(tmp, provider="cm")
    raw["providers"]["cm"] = {"type": "cm", "url": server.url + FakeCm.PATH,
                              "product_token": FakeCm.TOKEN, "retry_backoff_s": 0.05}  # fmt: skip
    raw.update(top)
    return DaemonProcess(tmp, raw)


# -- the formatter, in this process ------------------------------------------------------


def test_journald_is_recognised_by_the_stream_it_names(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        assert under_journald({"JOURNAL_STREAM": journal_stream_of(path)}, stream)
        # Inherited by a process whose stderr went elsewhere: not the journal.
        other = tmp_path / "other"
        other.touch()
        assert not under_journald({"JOURNAL_STREAM": journal_stream_of(other)}, stream)
        assert not under_journald({}, stream)
        assert not under_journald({"JOURNAL_STREAM": "garbage"}, stream)


def test_journal_lines_carry_a_priority_and_no_timestamp(
    tmp_path: Path, restore_logging: None
) -> None:
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        setup_logging(LoggingConfig(), {"JOURNAL_STREAM": journal_stream_of(path)}, stream)
        log = logging.getLogger("mailbridge.test")
        log.info("hello")
        log.warning("careful")
        log.error("broken")
        log.debug("not shown at INFO")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    lines = path.read_text().splitlines()
    assert lines[:3] == [
        "<6>INFO mailbridge.test: hello",
        "<4>WARNING mailbridge.test: careful",
        "<3>ERROR mailbridge.test: broken",
    ]
    # A traceback's every line is an entry of its own, each at the error's priority.
    assert lines[3] == "<3>ERROR mailbridge.test: failed"
    assert len(lines) > 4 and all(ln.startswith("<3>") for ln in lines[3:])


def test_json_lines_carry_the_request_ids(restore_logging: None) -> None:
    stream = io.StringIO()
    setup_logging(LoggingConfig(level="DEBUG", format="json"), {}, stream)
    log = logging.getLogger("mailbridge.test")
    log.info("request 12 emailId 1548: x", extra={"request_id": 12, "email_id": "1548"})
    log.debug("plain")
    first, second = (json.loads(ln) for ln in stream.getvalue().splitlines())
    assert (first["request_id"], first["email_id"], first["level"]) == (12, "1548", "INFO")
    assert first["message"] == "request 12 emailId 1548: x" and first["ts"].endswith("Z")
    assert second["level"] == "DEBUG" and "request_id" not in second


# -- the daemon ---------------------------------------------------------------------------


def test_daemon_under_journald(tmp_path: Path, cm: tuple[FakeCm, ProviderServer]) -> None:
    fake, server = cm
    for n in range(5):
        fake.reject(f"+3361111000{n}", 303, "Invalid recipient")
    proc = cm_daemon(tmp_path, server)
    proc.log_path.touch()
    proc.env["JOURNAL_STREAM"] = journal_stream_of(proc.log_path)
    proc.start()
    try:
        numbers = {f"num{i + 1}": f"+3361111000{i}" for i in range(5)}
        msg = request_mail(**numbers, num6="0601020304", sms="x", emailId="jr-1")
        code, text = proc.send(msg)
        rid = int(text.rsplit(" ", 1)[1])
        codes = not_codes(wait_reports(proc.maildir, "jr-1")["not"][0])
    finally:
        assert proc.terminate() == 0
    assert [c for _, c in codes] == [7] * 5 + [0]
    lines = proc.log().splitlines()
    # Both processes (the worker inherits stderr): a priority on every line, no date.
    assert lines and all(ln[:3] in ("<6>", "<4>", "<3>", "<7>") for ln in lines), lines
    assert not any(ln[3:7] == "2026" or ln[3:5] == "20" for ln in lines)
    tag = f"request {rid} emailId jr-1: "
    about = [ln for ln in lines if f"request {rid} " in ln]
    assert about and all(tag in ln for ln in about), about
    assert any(ln.startswith(f"<6>INFO mailbridge.intake: {tag}account test envoi") for ln in lines)
    # Five numbers refused alike: one WARNING, in CM's words, with the numbers.
    (warning,) = [ln for ln in lines if ln.startswith("<4>") and "code 7" in ln]
    assert warning.startswith(f"<4>WARNING mailbridge.dispatch: {tag}code 7 for +33611110000,")
    assert "and 2 more: cm: " in warning and "Invalid recipient" in warning


def test_json_logs_from_both_processes(tmp_path: Path, cm: tuple[FakeCm, ProviderServer]) -> None:
    fake, server = cm
    fake.reject("+33611110000", 303, "Invalid recipient")
    proc = cm_daemon(tmp_path, server, logging={"format": "json"}).start()
    try:
        msg = request_mail(num1="+33611110000", num2="0601020304", sms="x", emailId="js-1")
        code, text = proc.send(msg)
        rid = int(text.rsplit(" ", 1)[1])
        wait_reports(proc.maildir, "js-1")
    finally:
        assert proc.terminate() == 0
    entries = [json.loads(ln) for ln in proc.log().splitlines()]
    assert len({e["pid"] for e in entries}) == 2  # the intake and its worker
    ours = [e for e in entries if e.get("request_id") == rid]
    assert {e["logger"] for e in ours} >= {"mailbridge.intake", "mailbridge.dispatch",
                                           "mailbridge.mailer"}  # fmt: skip
    assert all(e["email_id"] == "js-1" for e in ours)
    (warning,) = [e for e in ours if e["level"] == "WARNING"]
    assert "code 7 for +33611110000: cm: " in warning["message"]


def test_a_big_request_logs_a_running_total(
    tmp_path: Path, cm: tuple[FakeCm, ProviderServer]
) -> None:
    _, server = cm
    proc = cm_daemon(tmp_path, server).start()
    csv = "".join(f"06{10_000_000 + i:08d}\n" for i in range(3000)).encode()
    msg = request_mail(sms="x", emailId="big-1")
    msg.add_attachment(csv, maintype="text", subtype="csv", filename="mobiles.csv")
    try:
        code, text = proc.send(msg)
        assert code == 250, text
        rid = int(text.rsplit(" ", 1)[1])
        codes = not_codes(wait_reports(proc.maildir, "big-1")["not"][0])
    finally:
        proc.stop()
    assert len(codes) == 3000 and {c for _, c in codes} == {0}
    lines = [ln for ln in proc.log().splitlines() if f"request {rid} emailId big-1:" in ln]
    calls = [ln for ln in lines if " submitted, " in ln]
    assert len(calls) == 1, lines  # two CM calls (2000 + 1000): one INFO line
    assert any("every recipient has its code (3000 accepted, 0 failed, 2 provider call(s)" in ln
               for ln in lines), lines  # fmt: skip


def test_debug_summarises_provider_calls_without_secrets(
    tmp_path: Path, cm: tuple[FakeCm, ProviderServer]
) -> None:
    fake_sms = FakeSmsmode(access_token="sEcReTtOkEn")
    with ProviderServer(fake_sms) as sms_server:
        _, server = cm
        proc = cm_daemon(tmp_path, server, logging={"level": "DEBUG"})
        proc.config["providers"]["smsmode"] = {
            "type": "smsmode", "url": sms_server.url + "/http/1.6/",
            "access_token": "sEcReTtOkEn", "retry_backoff_s": 0.05,
        }  # fmt: skip
        proc.config["accounts"][0]["routes"] = [
            {"prefix": "+7", "providers": ["smsmode"]},
            {"prefix": "", "providers": ["cm"]},
        ]
        del proc.config["accounts"][0]["provider"]
        proc = DaemonProcess(tmp_path, proc.config).start()
        try:
            msg = request_mail(num1="0601020304", num2="+77011234567", sms="x", emailId="dbg")
            assert proc.send(msg)[0] == 250
            wait_reports(proc.maildir, "dbg")
        finally:
            proc.stop()
    log = proc.log()
    cm_line = [ln for ln in log.splitlines() if "DEBUG mailbridge.providers: cm: POST" in ln]
    assert cm_line and f"{server.url}{FakeCm.PATH} (" in cm_line[0] and "-> HTTP 200 OK in" in log
    assert "DEBUG mailbridge.providers: smsmode: " in log
    assert FakeCm.TOKEN not in log and "sEcReTtOkEn" not in log


def test_a_provider_outage_is_a_warning_in_its_own_words(
    tmp_path: Path, cm: tuple[FakeCm, ProviderServer]
) -> None:
    fake, server = cm
    fake.fail_next(1, status=503)
    proc = cm_daemon(tmp_path, server).start()
    try:
        code, text = proc.send(request_mail(num="0601020304", sms="x", emailId="down-1"))
        rid = int(text.rsplit(" ", 1)[1])
        codes = not_codes(wait_reports(proc.maildir, "down-1")["not"][0])
    finally:
        proc.stop()
    assert codes == [("0601020304", 0)]  # the retry went through
    tag = f"request {rid} emailId down-1"
    (line,) = [ln for ln in proc.log().splitlines() if "1 to retry" in ln]
    assert f"WARNING mailbridge.dispatch: {tag}: cm: 1 submitted, 0 accepted" in line
    assert "HTTP 503" in line
