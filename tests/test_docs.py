"""The operator docs that can drift from the code: alert rules, the Grafana
dashboard and the metric table name only metrics /metrics really serves."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mailbridge.metrics import render_metrics
from mailbridge.store import StoreMetrics

DOCS = Path(__file__).parent.parent / "docs"
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None and not os.environ.get("CI"),
    reason="scripts/test.sh installs promtool (Debian's prometheus package)",
)


def served_metrics() -> set[str]:
    """Every metric name /metrics serves (a histogram's _bucket/_sum/_count too)."""
    counters = [
        ("mailbridge_provider_call_seconds_bucket", ("cm", "+Inf"), 1.0),
        ("mailbridge_sms_total", ("cm", "0"), 1.0),
        ("mailbridge_delivery_reports_total", ("cm", "DELIVRE"), 1.0),
        ("mailbridge_replies_total", ("cm",), 1.0),
    ]
    snapshot = StoreMetrics(counters, {"providers": {}})
    text = render_metrics(snapshot, refused=0, providers=["cm"]).decode()
    return {m.group(1) for m in re.finditer(r"^(mailbridge_\w+?)(?:\{| )", text, re.M)}


def test_names_used_by_the_docs_are_served() -> None:
    served = served_metrics()
    texts = {
        "alerts.yml": (DOCS / "alerts.yml").read_text(),
        "grafana-dashboard.json": (DOCS / "grafana-dashboard.json").read_text(),
        "feedback.md": (DOCS / "feedback.md").read_text(),
    }
    for name, text in texts.items():
        used = set(re.findall(r"mailbridge_[a-z_]+[a-z]", text))
        # The docs name a histogram by its base name, queries by _bucket.
        unknown = {u for u in used if u not in served and f"{u}_bucket" not in served}
        assert unknown == set(), f"{name} names metrics /metrics does not serve: {unknown}"
    assert {"mailbridge_emails_total", "mailbridge_provider_up"} <= served


def test_grafana_dashboard_is_json_with_panels() -> None:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    assert dashboard["panels"] and all(p["targets"] for p in dashboard["panels"])


@needs_promtool
def test_alert_rules_pass_promtool() -> None:
    out = subprocess.run(
        ["promtool", "check", "rules", str(DOCS / "alerts.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 5 rules found" in out.stdout
