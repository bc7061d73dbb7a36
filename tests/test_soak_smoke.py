"""The soak benchmark's smoke run (`bench/soak.py --quick`): it must keep working.

No thresholds (flatness is judged by people on the full run, docs/performance.md):
this proves that the whole pipeline runs to its end through the real daemon,
that every tenth has its figures, and that the purge empties the store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_soak_runs_and_reports_every_tenth(tmp_path: Path) -> None:
    raw = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak.py"), "--quick", "--backend", "sqlite",
         "--json", str(raw)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "last tenth vs first" in proc.stdout and "after `mailbridge purge" in proc.stdout
    (result,) = json.loads(raw.read_text())
    assert result["backend"] == "sqlite" and result["purged"] == result["emails"]
    tenths = result["tenths"]
    assert len(tenths) == 10
    assert all(t["emails_s"] > 0 and t["sms_s"] > 0 and t["rss_worker_mb"] > 0 for t in tenths)
    assert result["hwm_intake_mb"] > 0 and result["hwm_worker_mb"] > 0
    sizes = result["bytes"]
    assert sizes["full"] > sizes["purged"] >= sizes["empty"] > 0
