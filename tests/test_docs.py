"""The operator docs that can drift from the code: alert rules, the Grafana
dashboard and the metric table name only metrics /metrics really serves; the
commands the docs show are what the CLI takes. (Configuration keys and their
defaults: tests/test_configuration_doc.py.)"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
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


# -- the commands the docs tell operators to run ------------------------------------------

REPO = DOCS.parent
PROG = r"(?:(?:\S*/)?mailbridge|mb)"  # mailbridge, /opt/mailbridge/bin/mailbridge, the mb wrapper
# Placeholders the docs write in commands: a request or report id, a number, a file.
PLACEHOLDERS = {"ID": "1", "N": "1", "NAME": "x", "FILE": "x"}


def doc_commands(text: str) -> tuple[list[str], list[str]]:
    """(inline `mailbridge …` spans, command lines of sh code blocks) of a doc."""
    spans = re.findall(rf"`({PROG} [^`\n]+)`", text)
    lines = []
    for block in re.findall(r"^```(?:sh|bash|console)\n(.*?)^```", text, flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if re.match(rf"{PROG} ", line):
                lines.append(line.split(" #", 1)[0].strip())
    return spans, lines


def parse_command(command: str) -> str | None:
    """None if the CLI's parser takes `command`, else argparse's complaint."""
    from mailbridge.cli import build_parser

    argv = [PLACEHOLDERS.get(word, word) for word in shlex.split(command)[1:]]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(argv)
    except SystemExit as exit_:
        if exit_.code in (0, None):  # --version, --help: taken, and answered
            return None
        lines = err.getvalue().strip().splitlines()
        return lines[-1] if lines else f"exit {exit_.code}"
    return None


@pytest.mark.parametrize("doc", ["operations.md", "README.md", "deployment.md"])
def test_documented_commands_are_what_the_cli_takes(doc: str) -> None:
    """Every command line of the doc's shell blocks parses as written, and every
    inline `mailbridge …` names a command (and action) with options that exist:
    a mention may leave out a required argument (`mailbridge queue show`)."""
    path = REPO / doc if doc == "README.md" else DOCS / doc
    spans, lines = doc_commands(path.read_text())
    assert spans or lines
    problems = [f"{c}: {why}" for c in lines if (why := parse_command(c))]
    for span in spans:
        why = parse_command(span)
        if why and "the following arguments are required" not in why:
            problems.append(f"`{span}`: {why}")
    assert problems == [], "docs show commands the CLI does not take"


def test_operations_names_every_operator_command() -> None:
    """docs/operations.md covers each public command and each queue/reports action."""
    from mailbridge.cli import build_parser

    text = (DOCS / "operations.md").read_text()
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in sub.choices.items():
        if name.startswith("_") or name == "serve":
            continue
        assert re.search(rf"`(mailbridge|mb) {name}\b", text), name
        actions = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        for action in actions[0].choices if actions else ():
            assert re.search(rf"`(mailbridge|mb) {name} {action}\b", text), f"{name} {action}"


def test_parse_command_catches_wrong_commands() -> None:
    assert parse_command("mailbridge queue list --state quarantined") is None
    assert parse_command("mb queue show ID --json") is None
    assert parse_command("mailbridge queue list -c /etc/mailbridge/config.yaml") is None
    assert "invalid choice" in str(parse_command("mailbridge mailq"))
    assert "unrecognized arguments" in str(parse_command("mailbridge status --verbose"))
