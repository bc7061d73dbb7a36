"""The benchmark's smoke run (`bench/run.py --quick`): it must keep working.

No thresholds here (speed is measured by people with the full run, see
docs/performance.md); this only proves that every scenario still runs to its
end against the real daemon and reports every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_quick_benchmark_runs_every_scenario(tmp_path: Path) -> None:
    raw = tmp_path / "raw.json"
    table = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--baseline", "HEAD",
         "--out", str(table), "--json", str(raw)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = table.read_text()
    for row in (
        "bare aiosmtpd, 1 conn, new",
        "bare aiosmtpd, 20 conn, reused",
        "mailbridge intake, 1 conn, new",
        "mailbridge intake, 20 conn, reused",
        "mailbridge end to end",
        "fan-out: 500 numbers, one text",
        "fan-out: 500 numbers, personal texts",
        "fan-out: mobiles.csv of 2000 lines",
        "fan-out: mobiles.csv of 2000 lines — baseline",
        "mailbridge delivery callbacks stored",
        "mailbridge SMPP, window 10, answers after 5 ms",
    ):
        assert row in text, row
    figures = json.loads(raw.read_text())
    # Same text to 500 numbers: one CM request; every SMS reached the provider.
    assert figures["500 numbers, one text"]["requests"] == 1
    assert figures["500 numbers, one text (baseline)"]["requests"] == 1
    assert figures["callbacks"]["stored"] > 0
    assert figures["smpp_5ms"]["parts"] == 100 and figures["smpp_5ms"]["peer"] > 0
    assert figures["intake_20_True"]["rate"] > 0
    assert figures["e2e"]["p99"] >= figures["e2e"]["p50"] > 0


def test_quick_callbacks_benchmark_runs() -> None:
    """bench/callbacks.py --quick: wrk against a bare aiohttp handler and the
    daemon's receiver, then callbacks to etatDlr mails; every line printed."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "callbacks.py"), "--quick"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in ("bare aiohttp handler", "mailbridge /hooks/…/cm", "callback -> etatDlr mail"):
        assert line in proc.stdout, proc.stdout


def test_quick_store_growth_runs_and_the_purge_keeps_email_ids() -> None:
    """bench/store_growth.py --quick: the whole life of 20 emails on each store,
    sizes before and after the purge (the script asserts the emailId is kept)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "store_growth.py"), "--quick"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| SQLite | " in proc.stdout


def test_quick_smpp_benchmark_runs() -> None:
    """bench/smpp.py --quick: the daemon bound to the node-smpp SMSC at two windows."""
    from tests.smsc_peer import smsc_available

    why = smsc_available()
    if why is not None:
        if os.environ.get("CI"):
            raise AssertionError(f"the SMSC peer must run on CI: {why}")
        pytest.skip(why)
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "smpp.py"), "--quick"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 0 ms |")]
    assert len(rows) == 2, proc.stdout
