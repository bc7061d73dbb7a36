"""The operator's commands (SPEC 11) as a newcomer uses them: the real daemon
running, `python -m mailbridge …` beside it on the same store, on SQLite and on
PostgreSQL. Each test is one "the SMS did not arrive" story:

- a provider refuses our credentials: `queue list` says why the request
  waits, `queue show` lists its recipients, `queue drop` ends it in a Not;
- with `dispatch.validity_s` short, the held recipients get 999 on their own
  (an ERROR line says why they were held);
- a relay refuses a report for good (552): one attempt, `reports list --state
  failed` shows it, `reports retry` sends it once the relay takes it;
- `purge` drops finished rows but keeps the emailId (a late duplicate: Ack 1);
- `status` on a mistyped store path is an error and creates nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fake_cm import FakeCm
from tests.httpfake import ProviderServer
from tests.report_sink import ReportSink
from tests.support import (
    DaemonProcess,
    ack_code,
    config_dict,
    not_codes,
    request_mail,
    wait_for,
    wait_reports,
)

WRONG_TOKEN = "00000000-0000-0000-0000-000000000000"


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any] | None:
    """The `store` block of each backend (None: the SQLite of config_dict)."""
    if request.param == "sqlite":
        return None
    return {"postgresql": request.getfixturevalue("pg_cluster").new_database()}


def mailbridge(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mailbridge ARGS -c CONFIG`, as an operator types it."""
    return subprocess.run(
        [sys.executable, "-m", "mailbridge", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(config: Path, *args: str) -> str:
    out = mailbridge(config, *args)
    assert out.returncode == 0, (out.stdout, out.stderr)
    return out.stdout


def cm_daemon(
    tmp: Path, server: ProviderServer, store: dict[str, Any] | None, **dispatch: Any
) -> DaemonProcess:
    raw = config_dict(tmp, provider="cm")
    raw["providers"]["cm"] = {"type": "cm", "url": server.url + FakeCm.PATH,
                              "product_token": FakeCm.TOKEN, "retry_backoff_s": 0.05}  # fmt: skip
    raw["dispatch"].update(dispatch)
    if store is not None:
        raw["store"] = store
    return DaemonProcess(tmp, raw).start()


def test_queue_list_show_and_drop_a_request_held_by_refused_credentials(
    tmp_path: Path, cm: tuple[FakeCm, ProviderServer], backend: dict[str, Any] | None
) -> None:
    fake, server = cm
    fake.token = WRONG_TOKEN  # ours is refused: the work is held, not failed
    proc = cm_daemon(tmp_path, server, backend)
    cfg = proc.config_path
    try:
        msg = request_mail(num1="0601020304", num2="06 11 22 33 44", sms="x", emailId="held-1")
        code, text = proc.send(msg)
        assert code == 250, text
        rid = int(text.rsplit(" ", 1)[1])
        wait_for(lambda: "REFUSED OUR CREDENTIALS" in proc.log(), what="the loud log line")

        (entry,) = json.loads(ok(cfg, "queue", "list", "--json"))
        assert (entry["id"], entry["email_id"], entry["account"]) == (rid, "held-1", "test")
        assert (entry["pending"], entry["total"]) == (2, 2)
        assert "credentials" in json.dumps(entry)  # why it waits, in the operator's words
        listing = ok(cfg, "queue", "list")
        assert "held-1" in listing and "2/2" in listing and "1 unfinished request" in listing

        shown = json.loads(ok(cfg, "queue", "show", str(rid), "--json"))
        assert [(c["tel"], c["code"]) for c in shown["recipients"]] == [
            ("0601020304", None),
            ("06 11 22 33 44", None),
        ]
        assert [p["kind"] for p in shown["reports"]] == ["ack"]
        assert "token" not in shown["request"] and "keyid" not in json.dumps(shown)
        status = ok(cfg, "status")
        assert "provider cm: DOWN" in status and "credentials refused" in status

        # `queue drop` may meet a recipient being submitted: it says so; drop again.
        wait_for(lambda: mailbridge(cfg, "queue", "drop", str(rid)).returncode == 0,
                 what="the drop to take every recipient")  # fmt: skip
        nots = wait_reports(proc.maildir, "held-1")["not"]
        assert not_codes(nots[0]) == [("0601020304", 999), ("06 11 22 33 44", 999)]
        assert json.loads(ok(cfg, "queue", "list", "--json")) == []
        assert "queue empty" in ok(cfg, "queue", "list")
        assert mailbridge(cfg, "queue", "drop", str(rid)).returncode == 1  # nothing left
    finally:
        proc.stop()
    assert fake.accepted_count("+33601020304") == 0  # nothing was sent behind the operator's back


def test_refused_credentials_end_in_999_at_validity_s(
    tmp_path: Path, cm: tuple[FakeCm, ProviderServer]
) -> None:
    """SPEC 8 as a newcomer sees it: held loudly, then 999 once validity_s is over
    (10 s here for the test's sake, long enough for a first attempt on a loaded
    machine; the default is a day)."""
    fake, server = cm
    fake.token = WRONG_TOKEN
    proc = cm_daemon(tmp_path, server, None, validity_s=10)
    try:
        sent = time.monotonic()
        assert proc.send(request_mail(num="0601020304", sms="x", emailId="late"))[0] == 250
        nots = wait_reports(proc.maildir, "late")["not"]
        waited = time.monotonic() - sent
    finally:
        proc.stop()
    assert not_codes(nots[0]) == [("0601020304", 999)]
    assert waited >= 10.0  # held until the validity ended, not failed at once
    log = proc.log()
    error = [ln for ln in log.splitlines() if "REFUSED OUR CREDENTIALS" in ln]
    assert error and all(" ERROR " in ln for ln in error), log
    assert "not sent within dispatch.validity_s (10s)" in log


def test_a_report_the_relay_refuses_for_good_fails_once_and_can_be_retried(
    tmp_path: Path,
) -> None:
    with ReportSink() as sink:
        sink.refuse_larger_than = 100  # every report is bigger: 552 5.3.4
        raw = config_dict(tmp_path)
        raw["reports"] = {"from": "mailbridge@bridge.test", "smtp": sink.relay_config(),
                          "retry_backoff_s": 0.05}  # fmt: skip
        proc = DaemonProcess(tmp_path, raw).start()
        cfg = proc.config_path
        try:
            assert proc.send(request_mail(num="0601020304", sms="x", emailId="big"))[0] == 250

            def failed() -> list[dict[str, Any]]:
                rows = json.loads(ok(cfg, "reports", "list", "--state", "failed", "--json"))
                return rows if len(rows) == 2 else []

            rows = wait_for(failed, what="the Ack and the Not to fail")
            assert sorted(r["kind"] for r in rows) == ["ack", "not"]
            assert all(r["email_id"] == "big" and "552" in r["error"] for r in rows), rows
            assert sink.refused == 2  # one attempt each: a 5xx is not retried
            assert "reports: failed 2" in ok(cfg, "status")
            errors = [ln for ln in proc.log().splitlines() if "552" in ln]
            assert errors and all(" ERROR " in ln for ln in errors)

            sink.refuse_larger_than = None  # the operator raised the relay's limit
            for r in rows:
                assert "pending, due now" in ok(cfg, "reports", "retry", str(r["id"]))
            wait_for(lambda: len(sink.for_email("big")["not"]) == 1, what="the Not")
            assert len(sink.for_email("big")["ack"]) == 1
            assert sink.refused == 2
            assert mailbridge(cfg, "reports", "retry", str(rows[0]["id"])).returncode == 1
        finally:
            proc.stop()


def test_purge_drops_finished_rows_and_keeps_the_email_id(
    tmp_path: Path, backend: dict[str, Any] | None
) -> None:
    raw = config_dict(tmp_path)
    if backend is not None:
        raw["store"] = backend
    proc = DaemonProcess(tmp_path, raw).start()
    cfg = proc.config_path
    try:
        code, text = proc.send(request_mail(num="0601020304", sms="x", emailId="old"))
        rid = int(text.rsplit(" ", 1)[1])
        wait_reports(proc.maildir, "old")
        assert json.loads(ok(cfg, "queue", "show", str(rid), "--json"))["recipients"]
        assert "0 finished request(s)" in ok(cfg, "purge")  # younger than 90 days
        assert "1 finished request(s)" in ok(cfg, "purge", "--days", "0")
        gone = mailbridge(cfg, "queue", "show", str(rid))
        assert gone.returncode == 1 and f"no request {rid}" in gone.stderr
        # The emailId outlives its rows: the same request again is a duplicate.
        assert proc.send(request_mail(num="0601020304", sms="x", emailId="old"))[0] == 250
        acks = wait_reports(proc.maildir, "old", acks=2)["ack"]
        assert sorted(ack_code(a) for a in acks) == [0, 1]
    finally:
        proc.stop()


def test_status_on_a_mistyped_store_path_creates_nothing(tmp_path: Path) -> None:
    raw = config_dict(tmp_path)
    raw["store"] = {"sqlite": str(tmp_path / "mailbrigde.db")}  # sic
    cfg = tmp_path / "config.yaml"
    DaemonProcess(tmp_path, raw)  # writes the config only
    for args in (("status",), ("queue", "list"), ("reports", "list"), ("purge",)):
        out = mailbridge(cfg, *args)
        assert out.returncode == 1, args
        assert f"no store at {tmp_path / 'mailbrigde.db'}" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_status_says_whether_a_daemon_holds_the_store(tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path, config_dict(tmp_path)).start()
    cfg = proc.config_path
    try:
        assert "daemon: a daemon is running on this store" in ok(cfg, "status")
        found = json.loads(ok(cfg, "status", "--json"))
        wait_for(lambda: json.loads(ok(cfg, "status", "--json"))["senders_alive"],
                 what="the worker's heartbeat")  # fmt: skip
        assert proc.proc is not None
        assert found["daemon"] == f"a daemon is running on this store (pid {proc.proc.pid})"
    finally:
        assert proc.terminate() == 0
    assert "daemon: no daemon" in ok(cfg, "status")


def test_commands_beside_a_writer_that_holds_the_store(tmp_path: Path) -> None:
    """Reads never wait for a writer (WAL); a write that cannot get the lock
    within store.busy_timeout_s is one clear line, not a traceback."""
    import sqlite3

    proc = DaemonProcess(tmp_path, config_dict(tmp_path)).start()
    proc.stop()  # the store exists, at the current schema
    raw = config_dict(tmp_path)
    raw["store"]["busy_timeout_s"] = 0.5
    cfg = DaemonProcess(tmp_path, raw).config_path
    db = sqlite3.connect(tmp_path / "mailbridge.db", isolation_level=None)
    try:
        db.execute("BEGIN EXCLUSIVE")
        assert "recipients waiting for a code: 0" in ok(cfg, "status")
        assert json.loads(ok(cfg, "queue", "list", "--json")) == []
        out = mailbridge(cfg, "queue", "retry", "--all")
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert "store unavailable" in out.stderr and "locked" in out.stderr
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert "0 request(s) due now" in ok(cfg, "queue", "retry", "--all")
