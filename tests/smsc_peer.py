"""The node-smpp SMSC (tests/smsc/smsc.js) as a test peer: start it, steer it over
its HTTP control port, read what it recorded.

`npm ci` in tests/smsc installs it (scripts/test.sh does, when node_modules is
missing); tests that need it are skipped with a clear reason when node is absent
(a developer machine without it), never on CI, where scripts/test.sh installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import wait_for

SMSC_DIR = Path(__file__).parent / "smsc"
SYSTEM_ID = "mailbridge"
PASSWORD = "secret12"


def smsc_available() -> str | None:
    """Why the SMSC cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "node is not installed (scripts/test.sh installs nodejs and npm)"
    if not (SMSC_DIR / "node_modules" / "smpp").is_dir():
        return "tests/smsc/node_modules missing: run `npm ci` in tests/smsc (scripts/test.sh does)"
    return None


class Smsc:
    """One running smsc.js; `port` is its SMPP port, `record` its JSON-lines record."""

    def __init__(
        self,
        record: Path,
        system_id: str = SYSTEM_ID,
        password: str = PASSWORD,
        id_mode: str = "dec",
    ) -> None:
        self.record = record
        self.args = ["--system-id", system_id, "--password", password, "--id-mode", id_mode]
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.control = 0

    def start(self) -> Smsc:
        why = smsc_available()
        if why is not None:
            if os.environ.get("CI"):
                raise AssertionError(f"the SMSC peer must run on CI: {why}")
            pytest.skip(why)
        self.proc = subprocess.Popen(
            ["node", str(SMSC_DIR / "smsc.js"), "--record", str(self.record), *self.args],
            stdin=subprocess.PIPE,  # closed when the test process goes: the SMSC exits
            stdout=subprocess.PIPE,
            stderr=open(self.record.with_suffix(".stderr"), "ab"),  # noqa: SIM115
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until it listens (or exits)
        if not line:
            raise AssertionError("smsc.js exited at start: " + self.stderr())
        ports = json.loads(line)
        self.port, self.control = int(ports["smpp"]), int(ports["control"])
        return self

    def stderr(self) -> str:
        path = self.record.with_suffix(".stderr")
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    # -- control ---------------------------------------------------------------

    def call(self, path: str, **query: Any) -> dict[str, Any]:
        """POST to the control port (see smsc.js for the commands)."""
        qs = "&".join(f"{k}={urllib.parse.quote(str(v))}" for k, v in query.items())
        url = f"http://127.0.0.1:{self.control}/{path}" + (f"?{qs}" if qs else "")
        req = urllib.request.Request(url, method="POST" if path != "state" else "GET")
        with urllib.request.urlopen(req, timeout=30) as resp:
            result: dict[str, Any] = json.loads(resp.read())
            return result

    def state(self) -> dict[str, Any]:
        return self.call("state")

    # -- the record ------------------------------------------------------------

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        with open(self.record, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()]
        return [e for e in lines if kind is None or e["kind"] == kind]

    def submits(self, answer: str | None = "ok") -> list[dict[str, Any]]:
        """submit_sm events, those answered `answer` (None: all)."""
        return [e for e in self.events("submit") if answer is None or e.get("answer") == answer]

    def wait_submits(self, n: int, answer: str | None = "ok", timeout: float = 30) -> list[Any]:
        return wait_for(
            lambda: (found := self.submits(answer)) and len(found) >= n and found,
            timeout=timeout,
            what=f"{n} submit_sm answered {answer} at the SMSC",
        )

    def texts(self, destination: str) -> list[str]:
        """The messages the SMSC got for one destination, parts reassembled in
        UDH order (node-smpp's own decoding of text and UDH)."""
        return reassemble([e for e in self.submits() if e["destination_addr"] == destination])


def reassemble(submits: list[dict[str, Any]]) -> list[str]:
    """Whole texts from submit events: single parts as they are, concatenated
    parts (UDH 0500 03 ref total seq) grouped by reference in sequence order."""
    whole: list[str] = []
    groups: dict[tuple[str, int], dict[int, str]] = {}
    totals: dict[tuple[str, int], int] = {}
    for e in submits:
        concat = next((u for u in e["udh"] if u.startswith("0003")), None)
        if concat is None:
            whole.append(e["text"])
            continue
        ref, total, seq = bytes.fromhex(concat)[2:5]
        key = (e["destination_addr"], ref)
        groups.setdefault(key, {})[seq] = e["text"]
        totals[key] = total
    for key, parts in groups.items():
        assert sorted(parts) == list(range(1, totals[key] + 1)), (key, sorted(parts))
        whole.append("".join(parts[i] for i in sorted(parts)))
    return whole


@pytest.fixture
def smsc(tmp_path: Path) -> Iterator[Smsc]:
    """A fresh SMSC for one test."""
    peer = Smsc(tmp_path / "smsc.jsonl").start()
    try:
        yield peer
    finally:
        peer.stop()
